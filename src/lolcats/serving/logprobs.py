"""Token log-probabilities in OpenAI's response shapes: chat's ``logprobs.content`` and the legacy
completions form (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

The scheduler hands each generated token as ``(id, logprob, [(id, logprob), ...])`` (the top ones in
descending order); the log-probabilities are the model's distribution, before temperature, top-p and
penalties.
"""

from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a sentencepiece byte-fallback token


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte -> the byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}


BYTE_LEVEL = _byte_level_alphabet()


class TokenPieces:
    """Token id -> (its text, its UTF-8 bytes), cached. A piece of a multi-byte character decodes to
    U+FFFD alone; its bytes then come from the token's spelling (byte-level BPE, or ``<0xNN>``)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self.cache:
            text = self.tok.decode([token])
            raw = text.encode()
            if "\ufffd" in text:
                spelled = self.tok.convert_ids_to_tokens(token)
                byte = _BYTE_TOKEN.fullmatch(spelled)
                if byte:
                    raw = bytes([int(byte.group(1), 16)])
                elif all(c in BYTE_LEVEL for c in spelled):
                    raw = bytes(BYTE_LEVEL[c] for c in spelled)
            self.cache[token] = (text, raw)
        return self.cache[token]


def chat_entry(pieces: TokenPieces, lp: tuple) -> dict:
    """One token of chat's ``logprobs.content``: token, logprob, bytes and its ``top_logprobs``."""
    def one(token: int, logprob: float) -> dict:
        text, raw = pieces(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    token, logprob, top = lp
    return {**one(token, logprob), "top_logprobs": [one(i, v) for i, v in top]}


def completion_logprobs(pieces: TokenPieces, lps: list[tuple], offset: int = 0) -> dict:
    """Tokens ``lps`` in the legacy completions form; ``offset``: where the first one's text starts."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in lps:
        text = pieces(token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        top_dict = {pieces(i)[0]: v for i, v in top}
        top_dict.setdefault(text, logprob)  # the picked token, also when outside the top
        out["top_logprobs"].append(top_dict)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
