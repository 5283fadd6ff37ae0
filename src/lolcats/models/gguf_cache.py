"""A converted copy of a local GGUF base model on disk, so that only the first load parses it.

Loading a GGUF through transformers parses the file once for the config, once more for the
weights (then de-quantizes them and maps ~400 tensor names, rebuilding gguf's name table for
each) and twice for the tokenizer: ~20 s for SmolLM2-135M on a 2-core CPU. The first load keeps
what it built, later loads read plain safetensors and tokenizer files (~1 s)::

    <root>/gguf/<sha256 of the file, 20 hex>-tf<transformers version>/
        model-<dtype>/      config.json, generation_config.json, model.safetensors (that dtype)
        tokenizer/          the tokenizer's save_pretrained files

The key is the file's content (its hash is remembered per path, size and mtime, so a file is
hashed once), the transformers version (another version may convert differently) and the
dtype: the weights are the ones the direct load gives, bit for bit (so the base fingerprint
does not change). Each part is written under a temporary name, completed by a marker file and
renamed into place, so a killed conversion leaves nothing that a later load would use.

``root``: ``$LOLCATS_CACHE_DIR``, default ``~/.cache/lolcats``; ``LOLCATS_GGUF_CACHE=0`` turns
the cache off. Within one load, :func:`shared_gguf_reads` makes transformers' several parses of
the same file share one reader (the first, uncached load parses it once per part).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from lolcats.checkpoint import set_plain_modes

FORMAT = 1
MARKER = "lolcats-converted.json"


def cache_root() -> Path | None:
    """Where converted copies live, or None when the cache is turned off."""
    if os.environ.get("LOLCATS_GGUF_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return Path(os.environ.get("LOLCATS_CACHE_DIR") or Path.home() / ".cache" / "lolcats").expanduser()


def file_sha256(path: Path, root: Path) -> str:
    """The file's content hash, remembered under ``root`` per (path, size, mtime): hashed once per file."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = root / "gguf" / "hashes" / hashlib.sha256(ident.encode()).hexdigest()[:24]
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        _atomic_text(memo, digest)
    return digest


def entry_dir(gguf_path: Path, root: Path) -> Path:
    import transformers

    return root / "gguf" / f"{file_sha256(gguf_path, root)[:20]}-tf{transformers.__version__}-f{FORMAT}"


def complete(part: Path) -> bool:
    return (part / MARKER).is_file()


def write_part(part: Path, write: Callable[[Path], None], info: dict[str, Any] | None = None) -> bool:
    """Build ``part`` with ``write(tmp_dir)`` under a temporary name, then rename it into place.

    True when ``part`` is complete afterwards (also when another process finished it first);
    False (with a note on stderr) when it could not be written: the caller goes on without it.
    """
    if complete(part):
        return True
    tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(part)
        tmp.mkdir()
        write(tmp)
        set_plain_modes(tmp)  # safetensors writes its file 0600
        _atomic_text(tmp / MARKER, json.dumps({"format": FORMAT, "written": time.time(), **(info or {})}))
        if part.exists() and not complete(part):  # left by hand or by another tool: not ours to trust
            shutil.rmtree(part, ignore_errors=True)
        try:
            os.rename(tmp, part)
        except OSError:
            if not complete(part):
                raise
        return True
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written must not stop the load
        print(f"lolcats: could not cache the converted GGUF at {part} ({type(e).__name__}: {e}); "
              "loading it directly", file=sys.stderr)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(part: Path, age_s: float = 86400.0) -> None:
    """Temporary directories of conversions killed more than a day ago."""
    now = time.time()
    for p in part.parent.glob(f".{part.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def enough_disk(root: Path, nbytes: int) -> bool:
    """Room for the copy twice over (and 1 GiB spare); False also when ``root`` cannot be made."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(root).free > 2 * nbytes + (1 << 30)
    except OSError:
        return False


# ---------------------------------------------------------------- writing the parts


def save_model(model, out: Path) -> None:
    """config.json (without the GGUF quantization entry), generation_config.json, model.safetensors."""
    from safetensors.torch import save_model as save_tensors

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantized: a plain checkpoint now
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_tensors(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # drops tied duplicates


def model_nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- one reader per load


@contextlib.contextmanager
def shared_gguf_reads() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader(path)`` and ``gguf.get_tensor_name_map(arch, n)`` are
    built once per argument and shared (transformers imports both inside its functions, so every
    config, tokenizer and weight read of one file in the block uses the same parsed reader)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    if getattr(gguf.GGUFReader, "_lolcats_shared", False):  # already inside a block
        yield
        return
    reader, name_map = gguf.GGUFReader, getattr(gguf, "get_tensor_name_map", None)
    readers: dict = {}
    maps: dict = {}

    def shared_reader(path, *args, **kw):
        key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kw.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kw)
        return readers[key]

    def shared_map(*args):
        if args not in maps:
            maps[args] = name_map(*args)
        return maps[args]

    shared_reader._lolcats_shared = True  # type: ignore[attr-defined]
    gguf.GGUFReader = shared_reader
    if name_map is not None:
        gguf.get_tensor_name_map = shared_map
    try:
        yield
    finally:
        gguf.GGUFReader = reader
        if name_map is not None:
            gguf.get_tensor_name_map = name_map
        readers.clear()
        maps.clear()
