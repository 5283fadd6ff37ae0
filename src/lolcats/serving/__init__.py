"""Serving: an OpenAI-compatible HTTP server with continuous batching over constant-size states.

    engine.py     slots over the model's states (StateEngine) or softmax KV buffers (KVEngine, baseline)
    scheduler.py  continuous batching: admission, chunked prefill, decode steps, stop strings
    api.py        FastAPI routes (/v1/completions, /v1/chat/completions, /v1/models, /health)
    logprobs.py   token log-probabilities in OpenAI's response shapes
    cli.py        ``lolcats serve``

The HTTP parts need the ``serve`` extra (``pip install 'lolcats[serve]'``); engine and scheduler do not.
"""
