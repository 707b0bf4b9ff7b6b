"""The SQLite registry's wake-ups: Unix datagrams between the processes of a host.

Every process that waits on a task binds a datagram socket in ``<db>.notify/``,
and whoever settles a task sends a hash of its id to each socket there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["BURST", "MAX_SOCKET_NAME", "MAX_SOCKET_PATH", "SAFETY_NET", "Wakeups",
           "notify_directory", "private_directory", "wake_token"]

log = logging.getLogger("wsgi_async.registry.sqlite")

#: How often a waiter re-reads the database in case a wake-up datagram was lost.
SAFETY_NET = 1.0
#: Datagrams drained in one go that mean the queue may have overflowed (Linux
#: queues 10 by default and refuses more): every waiter then re-reads its task.
BURST = 8
#: Longest socket path that fits ``sockaddr_un.sun_path`` on Linux (107) and macOS (103).
MAX_SOCKET_PATH = 103
#: Longest socket file name: ``/<pid in hex>-<8 hex digits>.sock``.
MAX_SOCKET_NAME = len(f"/{2**32:x}-{0:08x}.sock")


class Wakeups:
    """Wakes this process's waiters when a task settles here or in another process."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        self._socket: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._address = ""
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._broken = False

    @contextlib.contextmanager
    def subscribe(self, task_id: str) -> Iterator[threading.Event]:
        """An event set whenever ``task_id`` settles, for the duration of the block."""
        self._listen()
        event = threading.Event()
        token = wake_token(task_id)
        with self._lock:
            self._waiters.setdefault(token, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(token, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiters.pop(token, None)

    def publish(self, task_ids: Sequence[str]) -> None:
        """Wake the waiters of ``task_ids`` in this and every other process."""
        tokens = [wake_token(task_id) for task_id in task_ids]
        self._wake(tokens)
        sender = self._sender_socket()
        if sender is None:
            return
        message = "\n".join(tokens).encode()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            if not entry.name.endswith(".sock") or entry.path == self._address:
                continue
            try:
                sender.sendto(message, entry.path)
            except ConnectionRefusedError:  # nobody listens: the process is gone
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except OSError:  # full queue, vanished, not a socket: the safety net covers it
                pass

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            listener, self._socket = self._socket, None
            sender, self._sender = self._sender, None
            thread, self._thread = self._thread, None
            events = [event for events in self._waiters.values() for event in events]
        for event in events:
            event.set()
        if listener is not None and thread is not None:
            with contextlib.suppress(OSError):
                # Ends the blocking recv(); if the queue is full, draining it does.
                listener.sendto(b"", socket.MSG_DONTWAIT, self._address)
            thread.join(timeout=2.0)
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self._address)
        if sender is not None:
            sender.close()

    def abandon(self) -> None:
        """Close inherited sockets after a fork, leaving the parent's socket file alone."""
        for sock in (self._socket, self._sender):
            if sock is not None:
                sock.close()

    def _listen(self) -> None:
        with self._lock:
            if self._socket is not None or self._broken or self._stopping:
                return
            name = f"{os.getpid():x}-{secrets.token_hex(4)}.sock"
            address = os.path.join(self.directory, name)
            try:
                private_directory(self.directory)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except (OSError, AttributeError) as exc:
                self._give_up(exc)
                return
            try:
                listener.bind(address)
            except OSError as exc:
                listener.close()
                self._give_up(exc)
                return
            self._socket, self._address = listener, address
            self._thread = threading.Thread(
                target=self._receive, args=(listener,), name="wsgi-async-wakeups", daemon=True
            )
            self._thread.start()

    def _give_up(self, exc: BaseException) -> None:
        self._broken = True
        log.warning(
            "wsgi_async: cannot listen for task completions in %s (%s); waits poll every %ss",
            self.directory,
            exc,
            SAFETY_NET,
        )

    def _receive(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                messages = [listener.recv(65536)]
                while True:
                    messages.append(listener.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            except OSError:
                return
            if len(messages) >= BURST:
                self._wake(None)
            else:
                self._wake(b"\n".join(messages).decode("utf-8", "replace").split("\n"))

    def _wake(self, tokens: Iterable[str] | None) -> None:
        """Wake the waiters of ``tokens``, or every waiter for ``None``."""
        with self._lock:
            if tokens is None:
                tokens = list(self._waiters)
            for token in tokens:
                for event in self._waiters.get(token, ()):
                    event.set()

    def _sender_socket(self) -> socket.socket | None:
        with self._lock:
            if self._sender is None and not self._stopping:
                try:
                    self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                except (OSError, AttributeError):
                    return None
                self._sender.setblocking(False)
            return self._sender


def wake_token(task_id: str) -> str:
    """What a wake-up carries: task ids are bearer secrets, their hashes are not."""
    return hashlib.blake2b(task_id.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def notify_directory(path: str) -> str:
    """``<db>.notify`` beside the database, or a short stand-in when that is too long.

    The stand-in is in ``$XDG_RUNTIME_DIR`` (private to the user) when there is
    one, else in the temporary folder, where :func:`private_directory` refuses
    a folder another user made first.
    """
    real = os.path.realpath(path)
    directory = real + ".notify"
    if len(os.fsencode(directory)) + MAX_SOCKET_NAME <= MAX_SOCKET_PATH:
        return directory
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    name = f"wsgi-async-{digest}.notify"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        candidate = os.path.join(runtime, name)
        if len(os.fsencode(candidate)) + MAX_SOCKET_NAME <= MAX_SOCKET_PATH:
            return candidate
    return os.path.join(tempfile.gettempdir(), name)


def private_directory(path: str) -> None:
    """Make ``path`` a folder only this user can enter (0700), or raise ``OSError``.

    A folder at a predictable path may have been made first by another local
    user, to receive or remove our sockets: a symlink, another owner, or a
    folder that is not one is refused; our own folder is tightened to 0700.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a folder (a symlink, or a file)")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)

