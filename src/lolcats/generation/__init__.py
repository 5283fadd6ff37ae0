"""Constant-memory generation for converted models.

    convert_model(model, cfg); set_attention_mode(model, "student")
    enable_lolcats_generation(model)           # plain model.generate(...) now uses a LolcatsCache
    model.generate(ids, attention_mask=mask, max_new_tokens=256)
    FastGenerator(model, batch_size=64, max_new_tokens=256).generate(ids, mask)   # CUDA-graph decode

The cache and the layer's prefill/decode math live in the attention package
(``attention/cache.py``, ``attention/module.py``); they are named here for convenience. The decode step itself
(static buffers, CUDA graphs per key, step metadata, logits, sampling) is ``generation/runner.py``'s
:class:`~lolcats.generation.runner.DecodeRunner`, which the serving engines use too.
"""

from lolcats.attention.cache import LolcatsCache, LolcatsLayer
from lolcats.attention.generate import enable_lolcats_generation, make_cache
from lolcats.generation.fast import FastGenerator

__all__ = ["LolcatsCache", "LolcatsLayer", "make_cache", "enable_lolcats_generation", "FastGenerator"]
