"""Entry points for ``lolcats generate`` and ``lolcats chat`` (the CLI parses; these only run).

``run_generate`` / ``run_chat`` take a ready model and tokenizer; ``generate_main`` /
``chat_main`` load them from a :class:`~lolcats.config.Config` when the caller does not pass them.
``args`` is any object with the attributes read below (an ``argparse.Namespace`` will do).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch

from lolcats.generation.cache import cache_kwarg_name, enable_lolcats_generation, make_cache
from lolcats.generation.fast import FastGenerator


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Cut ``text`` before the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _streamer(tokenizer):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, stream: bool = False,
                 fast: bool = False) -> list[str]:
    """Completions (new text only, cut at ``stop``) of ``prompts``; streamed to stdout if asked.

    ``fast`` uses :class:`FastGenerator` (CUDA graphs on GPU); otherwise ``model.generate``.
    Streaming shows one prompt at a time.
    """
    stop = list(stop or [])
    if stream and len(prompts) > 1:
        return [run_generate(model, tokenizer, [p], max_new_tokens, temperature, top_p, stop, True, fast)[0]
                for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    eos = _eos_ids(model, tokenizer)
    streamer = _streamer(tokenizer) if stream else None
    if fast:
        gen = FastGenerator(model, len(prompts), max_new_tokens, temperature, top_p, eos, tokenizer.pad_token_id)
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
        self.messages.append({"role": "user", "content": text})
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
                                      eos_token_id=_eos_ids(self.model, self.tok),
                                      pad_token_id=self.tok.pad_token_id,
                                      streamer=_streamer(self.tok) if stream else None, **kw)
        new = out[0, len(full):].tolist()
        self.fed = full + new[:-1]  # generate never feeds its last token
        answer = self.tok.decode(new, skip_special_tokens=True)  # unstripped: re-renders to the same tokens
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             system: str | None = None, input_fn: Callable[[str], str] = input,
             print_fn: Callable[..., None] = print) -> list[dict[str, str]]:
    """Interactive loop on stdin: an empty line or EOF quits, ``/reset`` forgets the conversation.

    Replies are streamed; returns the messages exchanged.
    """
    session = ChatSession(model, tokenizer, system)
    print_fn("Chat with the model (empty line to quit, /reset to start over).")
    while True:
        try:
            text = input_fn("> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            session.reset()
            continue
        session.reply(text, max_new_tokens, temperature, top_p, stream=True)
    return session.messages


# ---------------------------------------------------------------- wiring for the CLI


def load_for_generation(cfg):
    """Base model + tokenizer from ``cfg.model``, converted by ``cfg.attention``, student mode.

    The feature maps are untrained here; a caller with a trained checkpoint passes its own model.
    """
    from lolcats.attention.convert import convert_model, set_attention_mode
    from lolcats.models.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    convert_model(model, cfg.attention)
    set_attention_mode(model, "student")
    enable_lolcats_generation(model)
    return model, tok


def _prompts(args) -> list[str]:
    prompts = getattr(args, "prompt", None) or []
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    path = getattr(args, "prompt_file", None)
    if path:
        with open(path) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts and not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    if not prompts:
        raise ValueError("generate: give --prompt TEXT (repeatable), --prompt-file FILE, or text on stdin")
    return prompts


def generate_main(cfg, args, model=None, tokenizer=None) -> list[str]:
    """``args``: prompt (str | list), prompt_file, max_new_tokens, temperature, top_p, stop (list), stream, fast,
    chat_template (wrap each prompt as a user message)."""
    if model is None or tokenizer is None:
        model, tokenizer = load_for_generation(cfg)
    stream = bool(getattr(args, "stream", False))
    prompts = _prompts(args)
    if getattr(args, "chat_template", False):
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    texts = run_generate(model, tokenizer, prompts, getattr(args, "max_new_tokens", 128),
                         getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0),
                         getattr(args, "stop", None), stream, bool(getattr(args, "fast", False)))
    if not stream:
        for i, t in enumerate(texts):
            print(f"=== {i}\n{t}" if len(texts) > 1 else t)
    return texts


def chat_main(cfg, args, model=None, tokenizer=None) -> list[dict[str, str]]:
    """``args``: max_new_tokens, temperature, top_p, system."""
    if model is None or tokenizer is None:
        model, tokenizer = load_for_generation(cfg)
    return run_chat(model, tokenizer, getattr(args, "max_new_tokens", 256), getattr(args, "temperature", 0.0),
                    getattr(args, "top_p", 1.0), getattr(args, "system", None))
