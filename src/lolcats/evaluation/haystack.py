"""Natural text to hide needles in (RULER's essay haystack): a file's text in sentences, and seeded
contiguous spans of it in tokens.

The file is any text the training-data reader takes (:func:`lolcats.data.read_documents`): plain text
(``.txt``, ``.tokens``, ``.raw``; WikiText articles), ``.json`` / ``.jsonl`` records (``text``, or
Alpaca-style records written as plain lines), each optionally gzipped. Its documents, joined by blank
lines, are one text, split into pieces that each end a sentence or a line; a piece keeps the whitespace
before it, so pieces put back together are the text, and a needle goes in between two of them.

A span starts at a piece the caller's seeded ``random.Random`` picks and runs on through the pieces that
follow (past the end of the text it goes on from its start) until it holds the tokens asked for; a text
with fewer tokens than that is refused, so a span never repeats itself.

    hay = read_haystack("../shared/data/wikitext-2/wiki.test.tokens")
    ids = hay.span(random.Random(0), 4000, tokenizer)  # token ids of consecutive pieces, >= 4,000 in all
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\S)(?=\n)")  # after . ! ? before whitespace, or at a line's end
CHUNK = 128  # pieces per tokenizer call


@dataclass(frozen=True)
class Haystack:
    """The pieces of one file's text (see the module docstring)."""

    path: str
    pieces: tuple[str, ...]

    def span(self, rng: random.Random, n_tokens: int, tokenizer) -> list[list[int]]:
        """Token ids of consecutive pieces from a seeded start, ``n_tokens`` or more in all (the first piece
        without its leading whitespace); raises ValueError when the whole text has fewer tokens."""
        from lolcats.data import tokenize_documents

        n = len(self.pieces)
        start, out, total, taken = rng.randrange(n), [], 0, 0
        while total < n_tokens:
            if taken >= n:
                raise ValueError(f"recall haystack {self.path}: its text is {total:,} tokens, fewer than the "
                                 f"{n_tokens:,} a prompt of this length needs from it; give a longer file "
                                 "or shorter --recall-lengths")
            batch = [self.pieces[(start + taken + j) % n] for j in range(min(CHUNK, n - taken))]
            if taken == 0:
                batch[0] = batch[0].lstrip()
            taken += len(batch)
            for ids in tokenize_documents(batch, tokenizer):
                out.append(list(ids))
                total += len(ids)
                if total >= n_tokens:
                    break
        return out


def split_sentences(text: str) -> list[str]:
    """Pieces of ``text`` that each end a sentence or a line, with the whitespace before them;
    ``"".join`` of the pieces (blank ones included) is ``text``."""
    return SENTENCE_END.split(text)


def read_haystack(path: str | Path) -> Haystack:
    """The haystack of a text file (cached while the file is unchanged: base and linearized read it once)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--recall-haystack: no such file: {path}")
    st = p.stat()
    return _read(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int, size: int) -> Haystack:
    from lolcats.data import format_record, read_documents

    docs = [format_record(r, "auto", "none").strip() for r in read_documents(path)]
    pieces = tuple(p for p in split_sentences("\n\n".join(d for d in docs if d)) if p.strip())
    if not pieces:
        raise ValueError(f"recall haystack {path}: the file holds no text")
    return Haystack(path, pieces)
