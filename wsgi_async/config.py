"""Options and the route table, validated once when the middleware is built.

Every mistake is reported at construction as a :class:`ValueError` or
:class:`TypeError` that names the option and the offending value, never on
the first request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .types import WSGIEnvironment

RoutePattern = str | re.Pattern[str]
RouteOptions = Iterable[str] | Mapping[str, Any] | None
RouteSpec = Iterable[RoutePattern] | Mapping[RoutePattern, RouteOptions]
OwnerFunc = Callable[[WSGIEnvironment], str | None]

MiB = 1024 * 1024
ROUTE_OPTIONS = frozenset({"methods", "timeout", "result_ttl", "replay", "executor", "mode"})
# Where a task runs: this process's pool, separate worker processes, or the request itself.
Executor = Literal["threads", "workers", "inline"]
EXECUTORS: tuple[Executor, ...] = ("threads", "workers", "inline")
# Which requests of a route become tasks: all, or only those asking (Prefer: respond-async).
Mode = Literal["always", "prefer"]
MODES: tuple[Mode, ...] = ("always", "prefer")
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class Route:
    """One asynchronous route: a pattern matched on ``PATH_INFO`` and its options."""

    pattern: re.Pattern[str]
    methods: frozenset[str] | None = None
    timeout: float | None = None
    result_ttl: float | None = None
    replay: bool = False
    executor: Executor | None = None
    mode: Mode | None = None
    # Every path the pattern matches starts with it: a cheap test before the regex,
    # since routes are tried on every request.
    prefix: str = field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", literal_prefix(self.pattern))

    def matches(self, path: str, method: str) -> bool:
        if not path.startswith(self.prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.match(path) is not None


@dataclass(frozen=True, slots=True)
class Options:
    """The middleware's validated settings; see the README's options table."""

    routes: tuple[Route, ...]
    status_path: str = "/_async/tasks"
    max_workers: int = 8
    max_queued: int = 1000
    max_body_size: int = 10 * MiB
    max_result_size: int = 100 * MiB
    max_pending_bytes: int = 256 * MiB
    max_stored_bytes: int = 1024 * MiB
    max_tasks: int = 10_000
    result_ttl: float = 300.0
    task_timeout: float | None = None
    retry_after: int = 1
    max_wait: float = 30.0
    max_waiters: int = 64
    lease_time: float = 15.0
    drain_timeout: float = 25.0
    owner: OwnerFunc | None = None
    executor: Executor = "threads"
    metrics: bool | str = False
    tombstone_ttl: float = 86_400.0
    absolute_location: bool = True
    mode: Mode = "always"

    def route_for(self, path: str, method: str) -> Route | None:
        for route in self.routes:
            if route.matches(path, method):
                return route
        return None

    def timeout_of(self, route: Route) -> float | None:
        return self.task_timeout if route.timeout is None else route.timeout

    def result_ttl_of(self, route: Route) -> float:
        return self.result_ttl if route.result_ttl is None else route.result_ttl

    def mode_of(self, route: Route) -> Mode:
        return self.mode if route.mode is None else route.mode

    def executor_of(self, route: Route) -> Executor:
        return self.executor if route.executor is None else route.executor

    @property
    def executors(self) -> frozenset[Executor]:
        """Every executor some route uses."""
        return frozenset(self.executor_of(route) for route in self.routes)


# The defaults, for the middleware's typed keyword parameters.
DEFAULTS = Options(routes=())

_META = frozenset(".^$*+?{}[]\\|()")


def literal_prefix(pattern: re.Pattern[str]) -> str:
    """A string every path that ``pattern.match`` accepts starts with ("" if unknown).

    A cheap ``str.startswith`` on it spares most unmatched requests the regex.
    Conservative: any alternation, escape, case folding or verbose mode gives
    ``""``, and a literal followed by a quantifier that may repeat it zero
    times is left out.
    """
    source = pattern.pattern
    if pattern.flags & (re.IGNORECASE | re.VERBOSE) or "|" in source:
        return ""
    chars: list[str] = []
    for char in source[1:] if source.startswith("^") else source:
        if char in _META:
            if char in "*?{" and chars:
                chars.pop()
            break
        chars.append(char)
    return "".join(chars)


def _compile(pattern: object) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise TypeError(f"routes: pattern {pattern.pattern!r} must be a str pattern, not bytes")
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"routes: pattern {pattern!r} must be a str or a compiled regex")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"routes: invalid regex {pattern!r}: {exc}") from None


def _methods(pattern: str, value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"routes: methods of {pattern!r} must be a list of strings, got {value!r}")
    methods = set()
    for method in value:
        if not isinstance(method, str) or not _METHOD.fullmatch(method):
            raise ValueError(f"routes: invalid method {method!r} for {pattern!r}")
        methods.add(method.upper())
    if not methods:
        raise ValueError(f"routes: methods of {pattern!r} is empty; omit it to match every method")
    return frozenset(methods)


def _route(pattern: object, spec: object) -> Route:
    regex = _compile(pattern)
    name = regex.pattern
    if spec is None or (not isinstance(spec, Mapping)):
        return Route(regex, _methods(name, spec))
    unknown = set(spec) - ROUTE_OPTIONS
    if unknown:
        raise ValueError(
            f"routes: unknown option(s) {sorted(unknown)} for {name!r}; "
            f"expected some of {sorted(ROUTE_OPTIONS)}"
        )
    replay = spec.get("replay", False)
    if not isinstance(replay, bool):
        raise TypeError(f"routes: replay of {name!r} must be True or False, got {replay!r}")
    return Route(
        regex,
        _methods(name, spec.get("methods")),
        timeout=_positive(f"routes[{name!r}].timeout", spec.get("timeout"), optional=True),
        result_ttl=_positive(f"routes[{name!r}].result_ttl", spec.get("result_ttl"), optional=True),
        replay=replay,
        executor=None if spec.get("executor") is None
        else _executor(f"routes[{name!r}].executor", spec["executor"]),
        mode=None if spec.get("mode") is None else _mode(f"routes[{name!r}].mode", spec["mode"]),
    )


def parse_routes(routes: object) -> tuple[Route, ...]:
    """Normalise the ``routes`` option into a tuple of :class:`Route`."""
    if isinstance(routes, (str, bytes, re.Pattern)):
        raise TypeError(f"routes must be a list or a mapping of regexes, got {routes!r}")
    if isinstance(routes, Mapping):
        parsed = tuple(_route(pattern, spec) for pattern, spec in routes.items())
    elif isinstance(routes, Iterable):
        parsed = tuple(_route(pattern, None) for pattern in routes)
    else:
        raise TypeError(f"routes must be a list or a mapping of regexes, got {routes!r}")
    if not parsed:
        raise ValueError("routes is empty: give at least one regex")
    return parsed


def _positive(name: str, value: object, *, optional: bool = False, integer: bool = False) -> Any:
    if value is None and optional:
        return None
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
    return value


def _mode(name: str, value: object) -> Mode:
    for mode in MODES:
        if value == mode:
            return mode
    raise ValueError(f"{name} must be one of {', '.join(map(repr, MODES))}, got {value!r}")


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _executor(name: str, value: object) -> Executor:
    for executor in EXECUTORS:
        if value == executor:
            return executor
    raise ValueError(f"{name} must be one of {', '.join(map(repr, EXECUTORS))}, got {value!r}")


def _status_path(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"status_path must be a str, got {value!r}")
    path = value.rstrip("/")
    # "//host/..." would be a URL of another host.
    if not path.startswith("/") or path.startswith("//") or not re.fullmatch(
        r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]+", path
    ):
        raise ValueError(
            f"status_path must be an absolute URL path like '/_async/tasks', got {value!r}"
        )
    return path


def _metrics(value: object, status_path: str | None) -> bool | str:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"metrics must be True, False or a path like '/metrics', got {value!r}")
    path = value.rstrip("/")
    if not path.startswith("/") or not re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]+", path):
        raise ValueError(f"metrics must be an absolute URL path like '/metrics', got {value!r}")
    under = status_path or DEFAULTS.status_path
    if path == under or path.startswith(under + "/"):
        raise ValueError(f"metrics path {value!r} is under status_path {under!r}")
    return path


def build_options(routes: object, **options: Any) -> Options:
    """Validate ``routes`` and keyword options into :class:`Options`."""
    known = set(Options.__dataclass_fields__) - {"routes"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s): {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name in ("max_workers", "max_queued", "max_body_size", "max_result_size",
                 "max_pending_bytes", "max_stored_bytes", "max_tasks", "max_waiters",
                 "retry_after"):
        if name in options:
            checked[name] = _positive(name, options[name], integer=True)
    for name in ("result_ttl", "max_wait", "lease_time", "drain_timeout", "tombstone_ttl"):
        if name in options:
            checked[name] = _positive(name, options[name])
    if "task_timeout" in options:
        checked["task_timeout"] = _positive("task_timeout", options["task_timeout"], optional=True)
    if "executor" in options:
        checked["executor"] = _executor("executor", options["executor"])
    if "status_path" in options:
        checked["status_path"] = _status_path(options["status_path"])
    if "metrics" in options:
        checked["metrics"] = _metrics(options["metrics"], checked.get("status_path"))
    if "mode" in options:
        checked["mode"] = _mode("mode", options["mode"])
    if "absolute_location" in options:
        checked["absolute_location"] = _flag("absolute_location", options["absolute_location"])
    owner = options.get("owner")
    if owner is not None and not callable(owner):
        raise TypeError(f"owner must be a callable taking the environ, got {owner!r}")
    checked["owner"] = owner
    built = Options(routes=parse_routes(routes), **checked)
    if built.max_pending_bytes < built.max_body_size:
        raise ValueError(
            f"max_pending_bytes ({built.max_pending_bytes}) must be at least "
            f"max_body_size ({built.max_body_size}), or no large body could ever be accepted"
        )
    return built
