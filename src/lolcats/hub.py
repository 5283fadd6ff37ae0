"""The Hugging Face Hub, asked only when it can answer.

A name that is neither a local path nor a built-in goes to the Hub. Offline (``HF_HUB_OFFLINE``
set) or with the Hub unreachable (a connection test of a few seconds, once per process),
a name that is in the local Hub cache loads from there at once (``local_files_only``), and one
that is not fails in a second with a message naming it, instead of after a minute of retries.
Behind a proxy (``HTTPS_PROXY`` ...) the test is skipped: only the libraries can tell there.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
OFFLINE_MODE = "HF_HUB_OFFLINE is set"  # offline_reason() when the libraries read their caches themselves
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnavailableError(OSError):
    """A Hub name was asked for while the Hub cannot be reached and the files are not cached."""


def is_repo_id(name: str) -> bool:
    """``org/name`` or ``name``: could be a Hub repository (a path such as ``/x/y`` or ``a/b/c`` cannot)."""
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int, seconds: float) -> str | None:
    """None if a TCP connection to host:port opens within ``seconds`` (name lookup included), else why not."""
    answer: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answer.append(None)
        except OSError as e:
            answer.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(seconds + 0.5)
    return answer[0] if answer else f"no answer in {seconds:g} s"


@functools.lru_cache(maxsize=None)
def offline_reason() -> str | None:
    """Why the Hub cannot be used now (offline mode, no connection), or None when it may be."""
    try:
        from huggingface_hub import constants

        offline, endpoint = constants.HF_HUB_OFFLINE, constants.ENDPOINT
    except ImportError:
        offline, endpoint = False, "https://huggingface.co"
    if offline or _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return OFFLINE_MODE
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", endpoint))
    why = _probe(url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443), PROBE_SECONDS)
    return None if why is None else f"{url.hostname} cannot be reached: {why}"


def in_cache(repo: str, filename: str, cache_dir: str | None = None, revision: str | None = None,
             repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type)
    return isinstance(found, str)


def hub_access(repo: str, what: str, hint: str, filename: str = "config.json", cache_dir: str | None = None,
               revision: str | None = None) -> dict:
    """Extra ``from_pretrained`` arguments for the Hub model ``repo``: none when the Hub can be
    used, ``local_files_only`` when it cannot but ``filename`` is cached; otherwise a
    :class:`HubUnavailableError` naming ``what`` (e.g. "model") and ``repo``, and ``hint``."""
    why = offline_reason()
    if why is None:
        return {}
    if in_cache(repo, filename, cache_dir, revision):
        return {"local_files_only": True}
    raise HubUnavailableError(f"{what} {repo!r} is not a local path, is not in the Hugging Face cache, and the Hub "
                              f"cannot be used ({why}): {hint}")
