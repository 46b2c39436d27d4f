"""A private redis-server for tests and trials: find Debian's ``redis-server``, install it when
missing, and run one on 127.0.0.1 on a free port with persistence off::

    python -m regionvault.plugins.celery.redis_server install

``install`` runs ``apt-get install redis-server`` when the binary is missing and this is root
with apt-get; otherwise it prints one line saying why not, and the tests that need Redis skip
with that line (:func:`missing`). (On a machine run by systemd, Debian's package also starts
its own service on port 6379; :class:`RedisServer` never uses it.)

:class:`RedisServer` is one server process in a directory of its own (its log, and its
working directory, where nothing is saved: ``--save ''``, ``--appendonly no``). It is started
on a free port, ready once it answers ``PING``, and stopped by its PID, never left running:
leaving the ``with`` block, :meth:`RedisServer.stop`, or this interpreter's exit stops it.
It imports no Redis client (the ready check is one inline ``PING`` on a socket), so the
plugin and its launcher load without the ``celery`` extra.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from regionvault.core.debian import apt_install

__all__ = ["RedisServer", "find_server", "install", "missing"]

#: how long a server may take to answer PING after it starts (it takes well under a second)
READY_TIMEOUT = 20.0
#: how long a server is given to exit after SIGTERM before it is killed
STOP_TIMEOUT = 10.0


def find_server() -> Path | None:
    """The ``redis-server`` binary, or None."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).is_file()),
        None,
    )
    return Path(found) if found else None


def missing() -> str | None:
    """None when redis-server is here, else one line saying what is missing and how to get
    it."""
    if find_server() is None:
        return (
            "redis-server is not installed: "
            "python -m regionvault.plugins.celery.redis_server install, "
            "or apt-get install redis-server"
        )
    return None


def install() -> str:
    """Install Debian's redis-server when it is missing; the one line to print."""
    if missing() is None:
        return f"redis-server: {find_server()}"
    failed = apt_install("redis-server", "redis-server")
    if failed is not None:
        return failed
    if missing() is not None:
        return f"redis-server: apt-get install redis-server finished, but {missing()}"
    return f"redis-server installed: {find_server()}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pong(port: int) -> bool:
    """Whether a Redis server on 127.0.0.1:``port`` answers an inline PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_running: set[RedisServer] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    # a server of a process that exits without leaving its ``with`` block is stopped too
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


class RedisServer:
    """One redis-server on 127.0.0.1, run from ``directory``, persistence off.

    ``with RedisServer(tmp) as server: ... server.url ...``. :meth:`start` picks a free
    port (trying another if that one is taken meanwhile); :meth:`restart` stops it and
    starts it again on the same port, empty (nothing is saved), as a Redis that lost its
    data would come back; :meth:`stop` ends it by its PID (SIGTERM, then SIGKILL).
    """

    def __init__(self, directory: Path | str) -> None:
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        binary = find_server()
        assert binary is not None
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / "redis.log"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (database 0)."""
        if self.port is None:
            raise RuntimeError("redis-server is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self.running:
            return self
        last = ""
        for _ in range(5):  # a free port may be taken between the probe and the bind
            port = self.port if self.port is not None else _free_port()
            last = self._launch(port)
            if not last:
                return self
            if self.port is not None:
                break  # restart on a fixed port: no other port will do
        raise RuntimeError(f"redis-server did not start: {last}")

    def _launch(self, port: int) -> str:
        """Start on ``port`` and wait until it answers; "" when it does, else why not."""
        args = [
            str(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
        ]  # fmt: skip
        process = subprocess.Popen(
            args,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the tests is not its to take
        )
        self._process = process
        with _running_lock:
            _running.add(self)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._forget()
                return f"exited with status {process.returncode}: {self._log_tail()}"
            if _pong(port):
                self.port = port
                return ""
            time.sleep(0.02)
        self.stop()
        return f"no answer on 127.0.0.1:{port} within {READY_TIMEOUT:.0f} s: {self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def _forget(self) -> None:
        self._process = None
        with _running_lock:
            _running.discard(self)

    def stop(self) -> None:
        """End the server by its PID: SIGTERM, then SIGKILL if it has not exited in
        :data:`STOP_TIMEOUT` seconds. Stopping a stopped server does nothing."""
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_TIMEOUT)
        finally:
            self._forget()

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port, with nothing kept."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python -m regionvault.plugins.celery.redis_server install", file=sys.stderr)
        return 2
    print(install())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
