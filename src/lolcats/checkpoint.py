"""Small checkpoints: stage 1 holds feature maps + window factors, stage 2 the LoRA weights.

A checkpoint directory holds ``weights.safetensors`` and ``meta.json`` (lolcats config, base
model name, a fingerprint of the base weights, library version, stage). Every file is
written atomically (temporary file, then ``os.replace``; a directory: :func:`atomic_dir`), so a
killed run never leaves a broken checkpoint, and a write that fails (a full or read-only disk)
leaves the previous files in place and says which file and why (:class:`WriteError`). Written
files get the mode a new file gets (0o666 less the umask), also where the writer (safetensors)
made a private temporary file. Loading checks the base-model fingerprint and every shape, and
says which one does not fit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import lolcats

WEIGHTS, META = "weights.safetensors", "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this model or does not fit it."""


class WriteError(OSError):
    """A file could not be written (full or read-only disk, no permission); the message names it."""


# errno -> what to tell the user; writers that are not Python (safetensors, torch) only give text
_WRITE_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}
_TEXT_ERRNO = ((re.compile(r"os error (\d+)"), None), (re.compile(r"No space left|unexpected pos"), errno.ENOSPC),
               (re.compile(r"Read-only file system"), errno.EROFS), (re.compile(r"Permission denied"), errno.EACCES))


def _write_errno(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    for pattern, code in _TEXT_ERRNO:
        m = pattern.search(str(e))
        if m:
            return int(m.group(1)) if code is None else code
    return None


def write_error(path: str | Path, e: BaseException) -> WriteError:
    """A one-line :class:`WriteError` for a failed write of ``path``: the file, why, the space left."""
    path = Path(path)
    code = _write_errno(e)
    reason = _WRITE_REASONS.get(code, f"{type(e).__name__}: {' '.join(str(e).split())}")
    try:
        free = f"; {shutil.disk_usage(next(p for p in path.parents if p.is_dir())).free / 2**20:,.0f} MiB free there"
    except (OSError, StopIteration):
        free = ""
    err = WriteError(f"cannot write {path}: {reason}{free}. Any previous {path.name} is kept; free space or "
                     "write elsewhere (run.output_dir, data.cache_dir), then run again")
    err.errno = code
    return err


def atomic_write_files(items: Iterable[tuple[str | Path, Callable[[str], Any]]]) -> None:
    """Call each ``write(tmp_path)``, then move all files into place: if any write fails, none
    is replaced (the temporary files are removed) and a :class:`WriteError` names the file."""
    tmps: list[tuple[str, Path]] = []
    try:
        for path, write in items:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                tmps.append((tmp, path))
                write(tmp)
                set_plain_modes(tmp)
            except (OSError, RuntimeError, SafetensorError) as e:
                raise write_error(path, e) from e
        for tmp, path in tmps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from e
    finally:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def umask() -> int:
    """This process's umask (read from /proc where it can be, without setting it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def set_plain_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes new files and directories get
    under the umask: writers that go through a private temporary file (safetensors, mkstemp) leave 0600."""
    path, mask = Path(path), umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``path`` to write the block's files into, moved into place (replacing an
    earlier ``path``) when the block ends: a write that fails leaves nothing half-written, and a failed write
    (full disk...) is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise write_error(path, e) from e
    try:
        try:
            yield tmp
            set_plain_modes(tmp)
        except WriteError:
            raise
        except (OSError, SafetensorError) as e:
            raise write_error(path, e) from e
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an earlier ``path`` is moved aside first and removed once ``tmp`` is in place."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
    try:
        if old is not None:
            os.rename(path, old)
        os.rename(tmp, path)
    except OSError as e:
        if old is not None and not path.exists():
            os.rename(old, path)
        raise write_error(path, e) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then move the file into place (see :func:`atomic_write_files`)."""
    atomic_write_files([(path, write)])


def _json_writer(obj: Any) -> Callable[[str], Any]:
    return lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, _json_writer(obj))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights and metadata written first, then both moved into place: a failed write leaves the
    previous checkpoint whole."""
    directory = Path(directory)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**meta, "lolcats_version": lolcats.__version__, "num_tensors": len(flat),
            "num_params": sum(t.numel() for t in flat.values())}
    atomic_write_files([(directory / WEIGHTS, lambda p: save_file(flat, p)), (directory / META, _json_writer(meta))])


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"no lolcats checkpoint at {directory} (missing {META})")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); re-create the checkpoint "
                              "(rerun the stage) or point to another one") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a lolcats checkpoint's metadata (a JSON object)")
    return meta


def check_readable(directory: str | Path) -> None:
    """The weights file is a whole safetensors file (its header is read, not the tensors)."""
    path = Path(directory) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path} ({e}): the file is missing, truncated or not a safetensors file; "
                           "re-create the checkpoint (rerun the stage) or point to another one")


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def check_base(meta: dict[str, Any], fingerprint: str, directory: str | Path) -> None:
    want = meta.get("base_fingerprint")
    if want is not None and want != fingerprint:
        raise CheckpointError(
            f"checkpoint {directory} was trained on base model {meta.get('base_model')!r} "
            f"(fingerprint {want}), but the loaded base model has fingerprint {fingerprint}: wrong base model; "
            f"pass --base NAME_OR_PATH with the weights of fingerprint {want}")


def check_fits(shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Every expected name is in ``tensors`` with the expected shape, and nothing else is."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"checkpoint {directory} does not fit this model: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {directory}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model expects {tuple(shape)}")


def load_into(params: dict[str, torch.nn.Parameter] | dict[str, torch.Tensor],
              tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Copy ``tensors`` into ``params`` (same names); every key and shape must match."""
    check_fits({n: tuple(p.shape) for n, p in params.items()}, tensors, directory)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
