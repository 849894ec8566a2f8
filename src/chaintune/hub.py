"""Whether the Hugging Face hub can be used, answered in seconds: an offline machine fails with one line instead of
retrying requests for a minute."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from chaintune.errors import ChaintuneError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_SECONDS = 3.0


def offline() -> bool:
    """True when the environment says so (HF_HUB_OFFLINE=1 and its siblings)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def _probe_address() -> tuple[str, int]:
    """The host and port a hub request connects to first: the HTTPS proxy if one is set, else the endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def reachable() -> bool:
    """Whether a TCP connection to the hub (or the proxy) opens within PROBE_SECONDS; asked once per process."""
    try:
        socket.create_connection(_probe_address(), timeout=PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def usable() -> bool:
    return not offline() and reachable()


def require_hub(what: str, fix: str) -> None:
    """A one-line error unless the hub can be used for `what` (e.g. "model 'org/name'")."""
    if offline():
        raise ChaintuneError(f"{what} needs the Hugging Face hub, and the environment says offline "
                             f"({', '.join(v for v in OFFLINE_VARIABLES if os.environ.get(v))})", fix)
    if not reachable():
        host, port = _probe_address()
        raise ChaintuneError(f"{what} needs the Hugging Face hub, which cannot be reached ({host}:{port})", fix)
