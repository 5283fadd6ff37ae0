"""Text in, text out, for a loaded model: completions, stop strings, chat sessions.

``lolcats generate`` and ``lolcats chat`` (``lolcats.cli``) load a model with
``lolcats.models.trained.load_trained`` and call :func:`complete` or :func:`run_chat`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lolcats.attention.generate import cache_kwarg_name, enable_lolcats_generation, make_cache
from lolcats.generation.fast import FastGenerator


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Cut ``text`` before the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _streamer(tokenizer, shown: list[str] | None = None):
    """A TextStreamer printing the new text; with ``shown``, the printed pieces are appended to it too."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if shown is not None:
                shown.append(text)
            super().on_finalized_text(text, stream_end)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, stream: bool = False,
                 fast: bool = False, compile: bool = False) -> list[str]:
    """Completions (new text only, cut at ``stop``) of ``prompts``; streamed to stdout if asked.

    ``fast`` uses :class:`FastGenerator` (CUDA graphs on GPU), its step through ``torch.compile`` with
    ``compile``; otherwise ``model.generate``. Streaming shows one prompt at a time.
    """
    if compile and not fast:
        raise ValueError("compile: only with fast (FastGenerator compiles its decode step)")
    stop = list(stop or [])
    if stream and len(prompts) > 1:
        return [run_generate(model, tokenizer, [p], max_new_tokens, temperature, top_p, stop, True, fast, compile)[0]
                for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    eos = eos_ids(model, tokenizer)
    streamer = _streamer(tokenizer) if stream else None
    if fast:
        gen = FastGenerator(model, len(prompts), max_new_tokens, temperature, top_p, eos, tokenizer.pad_token_id,
                            compile=compile)
        if streamer is not None:
            streamer.next_tokens_are_prompt = False
        new = gen.generate(enc["input_ids"], enc["attention_mask"], streamer=streamer)
    else:
        enable_lolcats_generation(model)
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if stop:
            kw.update(stop_strings=stop, tokenizer=tokenizer)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [truncate_at_stop(t, stop) for t in texts]


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template (with the generation prompt), or a plain User/Assistant layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant: "


class ChatSession:
    """A conversation whose LolcatsCache is kept between turns: each turn prefills only the new tokens."""

    def __init__(self, model, tokenizer, system: str | None = None):
        self.model, self.tok = model, tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.reset_cache()
        enable_lolcats_generation(model)

    def reset_cache(self) -> None:
        self.cache, self.fed = None, []  # fed: token ids the cache has consumed

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.reset_cache()

    def reply(self, text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              stream: bool = True) -> str:
        """The model's answer to ``text`` (streamed to stdout). Interrupted (Ctrl-C), the text shown so far
        is kept as the answer, the cache is dropped (the next turn prefills again) and KeyboardInterrupt
        propagates."""
        self.messages.append({"role": "user", "content": text})
        shown: list[str] = []
        try:
            return self._generate(max_new_tokens, temperature, top_p, shown if stream else None)
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(shown)})
            self.reset_cache()
            raise

    def _generate(self, max_new_tokens: int, temperature: float, top_p: float, shown: list[str] | None) -> str:
        prompt = chat_prompt(self.tok, self.messages)
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        full = ids[0].tolist()
        if self.cache is None or full[:len(self.fed)] != self.fed or len(self.fed) >= len(full):
            self.cache, self.fed = make_cache(self.model), []
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                      max_new_tokens=max_new_tokens, **{cache_kwarg_name(self.model): self.cache},
                                      eos_token_id=eos_ids(self.model, self.tok),
                                      pad_token_id=self.tok.pad_token_id,
                                      streamer=_streamer(self.tok, shown) if shown is not None else None, **kw)
        new = out[0, len(full):].tolist()
        self.fed = full + new[:-1]  # generate never feeds its last token
        answer = self.tok.decode(new, skip_special_tokens=True)  # unstripped: re-renders to the same tokens
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             system: str | None = None, input_fn: Callable[[str], str] | None = None,
             print_fn: Callable[..., None] = print) -> list[dict[str, str]]:
    """Interactive loop on stdin: an empty line, EOF (Ctrl-D) or Ctrl-C at the prompt quits, ``/reset``
    forgets the conversation, Ctrl-C during a reply stops it and returns to the prompt.

    Replies are streamed; returns the messages exchanged.
    """
    read = input_fn or input
    session = ChatSession(model, tokenizer, system)
    print_fn("Chat with the model (empty line or Ctrl-D to quit, /reset to start over, Ctrl-C stops a reply).")
    while True:
        try:
            text = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print_fn()
            break
        if not text:
            break
        if text == "/reset":
            session.reset()
            continue
        try:
            session.reply(text, max_new_tokens, temperature, top_p, stream=True)
        except KeyboardInterrupt:
            print_fn("\n[reply stopped; Ctrl-C again or Ctrl-D to quit]")
    return session.messages


def check_prompts(prompts: list[str]) -> list[str]:
    """``prompts`` if there is at least one and none is empty (checked before a model loads)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate: every prompt must be non-empty text")
    return prompts


def complete(model, tokenizer, prompts: list[str], chat_template: bool = False, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None, stream: bool = False,
             fast: bool = False, compile: bool = False) -> list[str]:
    """:func:`run_generate` on ``prompts``, each first wrapped as a user message through the
    tokenizer's chat template when ``chat_template`` (instruct models)."""
    check_prompts(prompts)
    if chat_template:
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return run_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop, stream, fast, compile)
