"""Registry backends and :func:`open_registry`, which picks one from a URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import (
    TOMBSTONE_TTL,
    Capabilities,
    Registry,
    RegistryError,
    RegistryFull,
    RegistryUnavailable,
    RequestSnapshot,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    Tombstone,
)
from .memory import MemoryRegistry

__all__ = [
    "Capabilities",
    "MemoryRegistry",
    "Registry",
    "RegistryError",
    "RegistryFull",
    "RegistryUnavailable",
    "RequestSnapshot",
    "StoredResponse",
    "TaskRecord",
    "TaskStatus",
    "Tombstone",
    "open_registry",
]

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")


def open_registry(
    url: str,
    *,
    max_tasks: int = 10_000,
    max_stored_bytes: int = 1024 * 1024 * 1024,
    tombstone_ttl: float = TOMBSTONE_TTL,
) -> Registry:
    """Open the registry that ``url`` names.

    ``memory://`` keeps tasks in this process; ``sqlite:///path/to/tasks.db``
    shares them between the processes of one host; ``redis://host:port/db``
    (optionally ``?prefix=myapp:`` for the key prefix) between hosts.
    ``max_stored_bytes`` bounds the memory registry's result bodies; the
    others keep results on disk or under Redis's own ``maxmemory``.
    ``tombstone_ttl`` is how long a forgotten task's id answers ``410 Gone``.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryRegistry(max_tasks=max_tasks, max_bytes=max_stored_bytes,
                              tombstone_ttl=tombstone_ttl)
    if scheme == "sqlite":
        from .sqlite import SQLiteRegistry

        return SQLiteRegistry.from_url(url, max_tasks=max_tasks, tombstone_ttl=tombstone_ttl)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisRegistry

        # ``?prefix=`` is ours; every other query parameter is redis-py's.
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for key, value in query if key == "prefix"]
        rest = urlencode([(key, value) for key, value in query if key != "prefix"])
        url = urlunsplit(parts._replace(query=rest))
        if prefixes:
            return RedisRegistry.from_url(url, max_tasks=max_tasks, prefix=prefixes[-1],
                                          tombstone_ttl=tombstone_ttl)
        return RedisRegistry.from_url(url, max_tasks=max_tasks, tombstone_ttl=tombstone_ttl)
    raise ValueError(
        f"registry: unsupported URL {url!r}; use one of "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )
