"""Training data: read records, format prompts, tokenise, pack into fixed-length sequences.

Sources (``DataConfig.train``) are files or Hub dataset names:

* ``.json``: a list of records (a file of one record per line also works);
* ``.jsonl``: one JSON record per line;
* ``.txt`` / ``.tokens`` / ``.raw``: plain text. A file with WikiText article headings
  (lines `` = Title = ``) gives one document per article; any other file is split into
  documents at runs of two or more blank lines (a file without them is one document);
* any of these gzipped (``.gz``); a directory stands for the supported files inside it;
* anything else that is not a path: ``datasets.load_dataset(name, split=hub_split)``.

Records are ``alpaca`` (``instruction``, optional ``input``, ``output``; GSM8K-style
``question``/``answer`` map to instruction/output) or ``text`` (``text``); ``auto`` decides
per source from the keys of its first record. Alpaca records become one string through a
template (the Stanford Alpaca prompt, the tokenizer's chat template, or plain lines); text
records are used as they are.

Each document is tokenised without special tokens and framed as
``[bos if the tokenizer adds one] + ids + [eos]``; all documents are concatenated and cut
into rows of ``seq_len`` tokens (the remainder is dropped). The train/validation split is
by document: the sha256 of the record's content decides, so it does not depend on the order
of records or files, the template or the seed. Train documents then go in a seeded random
order, val documents in hash order (a mix of all sources, the same for every seed and file
order); each split takes documents in its order until its token cap.

The packed arrays are cached under ``cache_dir`` as plain ``.npy`` files (uint16 when the
vocabulary fits, else uint32), keyed by the tokenizer's behaviour, the sources' contents and
every setting that changes the result. The key holds no absolute paths, so a cache built on
one machine can be copied to another.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lolcats.checkpoint import atomic_write, file_sha256, write_json
from lolcats.config import DataConfig
from lolcats.hub import OFFLINE_MODE, is_repo_id, offline_reason

FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".tokens", ".raw")
FORMATS = ("auto", "alpaca", "text")
TEMPLATES = ("alpaca", "chat", "none")
CACHE_VERSION = 1  # bump when the packing changes
TOKENIZE_BATCH = (1024, 1 << 22)  # most documents, characters per tokenizer call

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# keys of a record -> (instruction, input, output) for the alpaca format
ALPACA_KEYS = (("instruction", "input", "output"), ("question", None, "answer"))
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $", re.M)
BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


class DataError(ValueError):
    """Bad or empty training data; the message names the source."""


@dataclass
class PackedData:
    train: torch.Tensor
    "(N, seq_len) int64 token ids."
    val: torch.Tensor
    "(M, seq_len) int64 token ids; M may be 0 when val_fraction is 0."
    stats: dict[str, Any] = field(default_factory=dict)
    "files, documents, tokens, train/val counts, cache path."


# ---------------------------------------------------------------- reading


def _open_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); give .json/.jsonl/.txt files "
                        "(optionally .gz)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: the gzip file is truncated or corrupt ({type(e).__name__}: {e}); "
                        "download or compress it again") from None


def _base_suffix(path: Path) -> str:
    """``a.jsonl.gz`` -> ``.jsonl``."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _json_records(text: str, path: Path, lines: bool) -> list[tuple[int, Any]]:
    """(line or item number, record) pairs of a JSON list or a JSONL text."""
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _json_records(text, path, lines=True)  # a .json file holding JSONL
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return list(enumerate(data, 1))
    out = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold \u2028
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
    return out


def split_plain_text(text: str) -> list[str]:
    """Documents of a plain-text file: WikiText articles, else blank-line-separated blocks."""
    starts = [m.start() for m in WIKITEXT_TITLE.finditer(text)]
    if starts:
        bounds = [0] + starts + [len(text)]
        parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        parts = BLANK_RUN.split(text)
    return [p.strip("\n") for p in parts if p.strip()]


def _file_records(path: Path) -> list[tuple[int, Any]]:
    suffix = _base_suffix(path)
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix!r}; known: "
                        + ", ".join(FILE_SUFFIXES) + " (each optionally .gz)")
    text = _open_text(path)
    if suffix in (".json", ".jsonl"):
        return _json_records(text, path, lines=suffix == ".jsonl")
    return [(i, {"text": doc}) for i, doc in enumerate(split_plain_text(text), 1)]


def _check_hub_name(name: str) -> None:
    """``name`` (not an existing file) can only be a Hub dataset: a missing path is FileNotFoundError."""
    if _is_file_like(name) or not is_repo_id(name):
        raise FileNotFoundError(f"training data file not found: {name}")


def check_sources(cfg: DataConfig) -> None:
    """Every ``data.train`` entry is an existing file, or a Hub dataset while the Hub can be asked
    (checked at start-up: offline, a Hub name fails at once instead of after minutes of retries)."""
    for name in _sources(cfg.train):
        if Path(name).is_file():
            continue
        _check_hub_name(name)
        why = offline_reason()
        if why is not None and why != OFFLINE_MODE:  # in offline mode datasets reads its cache at once
            raise DataError(f"data.train {name!r} is not a local file, and the Hugging Face Hub cannot be used "
                            f"({why}): give .json/.jsonl/.txt files, or set HF_HUB_OFFLINE=1 to use a cached copy")


def _hub_dataset(name: str, split: str):
    _check_hub_name(name)
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{name!r} is not an existing file; to load it as a Hugging Face Hub dataset "
                        "run `pip install datasets`, or give a .json/.jsonl/.txt file") from e
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds)
        raise DataError(f"{name!r} is neither an existing file nor a loadable Hub dataset "
                        f"(split {split!r}): {type(e).__name__}: {e}") from e


def _is_file_like(name: str) -> bool:
    """Names that can only mean a local path (so a missing one is FileNotFoundError)."""
    p = Path(name)
    return p.is_absolute() or name.startswith(".") or _base_suffix(p) in FILE_SUFFIXES or p.suffix == ".gz"


def _raw_records(path_or_name: str, hub_split: str) -> list[tuple[int, Any]]:
    path = Path(path_or_name)
    if path.is_file():
        return _file_records(path)
    return list(enumerate(_hub_dataset(path_or_name, hub_split), 1))


def detect_format(record: Any, where: str) -> str:
    """``alpaca`` or ``text`` from the keys of one record."""
    keys = set(record) if isinstance(record, dict) else set()
    if any(k[0] in keys and k[2] in keys for k in ALPACA_KEYS):
        return "alpaca"  # before text: some Alpaca sets also carry a pre-formatted 'text'
    if "text" in keys:
        return "text"
    raise DataError(f"{where}: cannot tell the record format from keys {sorted(keys)}; expected "
                    "'text', or 'instruction'/'output' (optional 'input'), or 'question'/'answer'")


def normalize_record(record: Any, fmt: str, where: str) -> dict[str, str]:
    """{'text'} or {'instruction', 'input', 'output'}; ``where`` names file and line in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        if not isinstance(record.get("text"), str):
            raise DataError(f"{where}: format 'text' needs key 'text'; found keys {sorted(record)}")
        return {"text": record["text"]}
    for ins, inp, out in ALPACA_KEYS:
        if ins in record and out in record:
            return {"instruction": str(record[ins]), "input": str(record.get(inp) or "") if inp else "",
                    "output": str(record[out])}
    raise DataError(f"{where}: format 'alpaca' needs keys 'instruction' and 'output' (or 'question' and "
                    f"'answer'); found keys {sorted(record)}")


def read_documents(path_or_name: str, fmt: str = "auto", hub_split: str = "train") -> list[dict]:
    """Normalised records of one file or Hub dataset (see :func:`normalize_record`)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    raw = _raw_records(path_or_name, hub_split)
    if not raw:
        return []
    if fmt == "auto":
        fmt = detect_format(raw[0][1], f"{path_or_name}, line {raw[0][0]}")
    return [normalize_record(r, fmt, f"{path_or_name}, line {i}") for i, r in raw]


# ---------------------------------------------------------------- formatting


def _record_format(record: dict, fmt: str) -> str:
    return ("alpaca" if "output" in record else "text") if fmt == "auto" else fmt


def user_message(record: dict) -> str:
    """The user's turn of a normalised alpaca record: the instruction, then its input after a blank line."""
    return record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")


def _chat_text(record: dict, tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'chat' needs a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', tokenizer)!r} has none (use template 'alpaca')")
    messages = [{"role": "user", "content": user_message(record)}, {"role": "assistant", "content": record["output"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")


def format_record(record: dict, fmt: str, template: str, tokenizer=None) -> str:
    """The training text of one normalised record (without eos; packing adds it)."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if _record_format(record, fmt) == "text":
        return record["text"]
    if template == "chat":
        return _chat_text(record, tokenizer)
    if template == "none":
        return "\n".join(s for s in (record["instruction"], record["input"], record["output"]) if s)
    prompt = ALPACA_PROMPT_INPUT if record["input"] else ALPACA_PROMPT
    return prompt.format(**record) + record["output"]


# ---------------------------------------------------------------- tokenising and packing


def tokenize_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched fast-tokenizer call)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
    return enc["input_ids"]


def framing(tokenizer) -> tuple[list[int], int]:
    """(ids the tokenizer puts before a text, e.g. [bos]; eos id)."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; packing needs one")
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    k = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return list(full[:k]), int(tokenizer.eos_token_id)


def _token_dtype(tokenizer) -> np.dtype:
    vocab = max(len(tokenizer), tokenizer.vocab_size or 0)
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.uint32)


def _batches(texts: list[str]) -> Iterator[list[str]]:
    """Consecutive slices of ``texts`` of at most TOKENIZE_BATCH documents / characters (one doc at least)."""
    max_docs, max_chars = TOKENIZE_BATCH
    batch, chars = [], 0
    for t in texts:
        if batch and (len(batch) == max_docs or chars + len(t) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(t)
        chars += len(t)
    if batch:
        yield batch


def _tokenize_until(texts: list[str], tokenizer, limit: int | None, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Framed token stream of ``texts`` in order, stopping once ``limit`` tokens are reached.

    Returns (ids (L,), documents used)."""
    prefix, eos = framing(tokenizer)
    parts, total = [], 0
    for batch in _batches(texts):
        for ids in tokenize_documents(batch, tokenizer):
            head = prefix if prefix and ids[:len(prefix)] != prefix else []
            tail = [] if ids and ids[-1] == eos else [eos]  # chat templates may end with eos already
            parts.append(np.asarray(head + ids + tail, dtype=dtype))
            total += len(parts[-1])
            if limit is not None and total >= limit:
                return np.concatenate(parts), len(parts)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), len(parts)


def pack(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """(L,) -> (L // seq_len, seq_len), capped at ``max_tokens // seq_len`` rows."""
    rows = len(stream) // seq_len
    if max_tokens is not None:
        rows = min(rows, max_tokens // seq_len)
    return stream[: rows * seq_len].reshape(rows, seq_len)


def document_position(record: dict) -> float:
    """Where the record's content hashes to in [0, 1): below val_fraction means validation."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train in a seeded random order, val in hash order): both independent of the input order
    up to the seed, and the val set independent of the seed."""
    pos = [document_position(r) for r in records]
    val = sorted((p, i) for i, p in enumerate(pos) if p < val_fraction)
    train = sorted((p, i) for i, p in enumerate(pos) if p >= val_fraction)  # canonical order first
    order = np.random.default_rng(seed).permutation(len(train))
    return [records[train[j][1]] for j in order], [records[i] for _, i in val]


# ---------------------------------------------------------------- cache


def _sources(train: list[str]) -> list[str]:
    """Config entries with directories expanded to the supported files inside them (sorted)."""
    out = []
    for name in train:
        p = Path(name)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _base_suffix(f) in FILE_SUFFIXES)
            if not files:
                raise DataError(f"{name}: directory holds no data files ({', '.join(FILE_SUFFIXES)}, .gz)")
            out += files
        else:
            out.append(name)
    return out


def _source_id(name: str, hub_split: str) -> str:
    path = Path(name)
    if path.is_file():
        return file_sha256(path)
    ds = _hub_dataset(name, hub_split)
    return f"hub:{name}:{hub_split}:{getattr(ds, '_fingerprint', '')}"


def tokenizer_id(tokenizer) -> str:
    """Hash of how the tokenizer behaves (portable: no absolute paths)."""
    probes = ["Hello world!", " the  quick\tbrown\n\nfox", "café 東京 🙂", "def f(x):\n    return x**2"]
    ident = {
        "name": Path(str(tokenizer.name_or_path)).name, "vocab": len(tokenizer), "eos": tokenizer.eos_token_id,
        "framing": framing(tokenizer), "probes": tokenize_documents(probes, tokenizer),
        "chat": hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer, sources: list[str], seed: int) -> str:
    ident = {"v": CACHE_VERSION, "tok": tokenizer_id(tokenizer),
             "src": [_source_id(s, cfg.hub_split) for s in sources],
             "format": cfg.format, "template": cfg.template, "seq_len": cfg.seq_len, "val": cfg.val_fraction,
             "max_train": cfg.max_train_tokens, "max_val": cfg.max_val_tokens, "seed": seed,
             "max_file": cfg.max_file_tokens}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, arr)


def save_cache(folder: Path, data: PackedData, dtype: np.dtype) -> None:
    """train.npy, val.npy, then stats.json (its presence marks a complete cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        arr = getattr(data, split).numpy().astype(dtype)
        atomic_write(folder / f"{split}.npy", lambda p, a=arr: _save_npy(p, a))
    write_json(folder / "stats.json", data.stats)


def load_cache(folder: Path) -> PackedData | None:
    if not (folder / "stats.json").is_file():
        return None
    arrays = {s: torch.from_numpy(np.load(folder / f"{s}.npy").astype(np.int64)) for s in ("train", "val")}
    stats = json.loads((folder / "stats.json").read_text())
    return PackedData(arrays["train"], arrays["val"], {**stats, "cache": str(folder), "cached": True})


# ---------------------------------------------------------------- building


def _tokens_needed(cap: int | None, seq_len: int) -> int | None:
    return None if cap is None else (cap // seq_len) * seq_len


def _check_enough(rows: np.ndarray, found: int, cfg: DataConfig, sources: list[str], split: str) -> None:
    if len(rows) == 0:
        cap = cfg.max_train_tokens if split == "train" else cfg.max_val_tokens
        hint = f" (cap {cap})" if cap is not None and cap < cfg.seq_len else ""
        hint += f" (val_fraction {cfg.val_fraction})" if split == "val" else ""
        raise DataError(f"not enough {split} data in {', '.join(sources)}: found {found} tokens, "
                        f"need at least seq_len={cfg.seq_len} for one sequence{hint}")


def _build_split(records: list[dict], cfg: DataConfig, tokenizer, dtype: np.dtype,
                 cap: int | None) -> tuple[np.ndarray, int, int]:
    """(rows (N, seq_len), documents used, tokens found) of one split."""
    texts = [format_record(r, "auto", cfg.template, tokenizer) for r in records]
    stream, used = _tokenize_until(texts, tokenizer, _tokens_needed(cap, cfg.seq_len), dtype)
    return pack(stream, cfg.seq_len, cap), used, len(stream)


def file_prefix(records: list[dict], cfg: DataConfig, tokenizer, dtype: np.dtype) -> list[dict]:
    """The first ``records`` (in file order) whose framed tokens reach ``cfg.max_file_tokens``; all if no cap."""
    if cfg.max_file_tokens is None:
        return records
    texts = [format_record(r, "auto", cfg.template, tokenizer) for r in records]
    _, used = _tokenize_until(texts, tokenizer, cfg.max_file_tokens, dtype)
    return records[:used]


def _pack_sources(cfg: DataConfig, tokenizer, sources: list[str], seed: int, dtype: np.dtype) -> PackedData:
    records = [r for src in sources
               for r in file_prefix(read_documents(src, cfg.format, cfg.hub_split), cfg, tokenizer, dtype)]
    train_recs, val_recs = split_documents(records, cfg.val_fraction, seed)
    train, n_train, t_train = _build_split(train_recs, cfg, tokenizer, dtype, cfg.max_train_tokens)
    _check_enough(train, t_train, cfg, sources, "train")
    val, n_val, t_val = _build_split(val_recs, cfg, tokenizer, dtype, cfg.max_val_tokens)
    if cfg.val_fraction > 0:
        _check_enough(val, t_val, cfg, sources, "val")
    stats = {"files": [Path(s).name if Path(s).exists() else s for s in sources], "documents": len(records),
             "train_documents": n_train, "val_documents": n_val, "tokens": t_train + t_val,
             "train_tokens": int(train.size), "val_tokens": int(val.size), "seq_len": cfg.seq_len}
    return PackedData(torch.from_numpy(train.astype(np.int64)), torch.from_numpy(val.astype(np.int64)), stats)


def build_data(cfg: DataConfig, tokenizer, seed: int = 0) -> PackedData:
    """Packed train (N, seq_len) and val (M, seq_len) sequences for ``cfg``, from the cache when it has them."""
    sources = _sources(cfg.train)
    folder = Path(cfg.cache_dir) / f"data-{cache_key(cfg, tokenizer, sources, seed)}"
    cached = load_cache(folder)
    if cached is not None:
        return cached
    data = _pack_sources(cfg, tokenizer, sources, seed, _token_dtype(tokenizer))
    save_cache(folder, data, _token_dtype(tokenizer))
    data.stats.update(cache=str(folder), cached=False)
    return data


# ---------------------------------------------------------------- batches


def iterate_batches(data: torch.Tensor, batch_size: int, seed: int, epoch: int, start: int = 0,
                    drop_last: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, rows (b, T)) of ``data`` (N, T) in a shuffled order fixed by (seed, epoch).

    Starts at batch ``start``, so a resumed run continues where the stored position says.
    The last batch is shorter unless ``drop_last``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(data), generator=gen)
    for i in range(start, num_batches(len(data), batch_size, drop_last)):
        yield i, data[perm[i * batch_size:(i + 1) * batch_size]]


def num_batches(n_rows: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch of :func:`iterate_batches`."""
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)
