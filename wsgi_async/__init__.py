"""Turn slow endpoints of any WSGI application into asynchronous request-reply endpoints."""

from .config import Options, Route
from .errors import (
    QueueFull,
    RegistryError,
    RegistryFull,
    RegistryUnavailable,
    TaskCancelled,
    WsgiAsyncError,
)
from .middleware import AsyncMiddleware
from .registry import (
    Capabilities,
    MemoryRegistry,
    Registry,
    StoredResponse,
    TaskRecord,
    TaskStatus,
    open_registry,
)
from .request import TaskHandle
from .service import TaskService

__all__ = [
    "AsyncMiddleware",
    "Capabilities",
    "MemoryRegistry",
    "Options",
    "QueueFull",
    "Registry",
    "RegistryError",
    "RegistryFull",
    "RegistryUnavailable",
    "Route",
    "StoredResponse",
    "TaskCancelled",
    "TaskHandle",
    "TaskRecord",
    "TaskService",
    "TaskStatus",
    "WsgiAsyncError",
    "open_registry",
]
__version__ = "0.1.0"
