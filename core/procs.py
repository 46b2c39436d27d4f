"""Process identity: which process on which host wrote something (a lock, a temporary file),
and whether that process still runs, told apart from a later process that reused its pid.

The one definition of "is this pid still that process": the job ledger's locks
(core/pipeline/ledger.py), the repository locks (core/repository/_locks.py), the local
vault's temporary files and the local compute's launched processes all ask here. It imports
nothing of the engine, so providers may use it too (core SPI).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessIdentity", "process_alive", "start_ticks"]

_TOKEN = re.compile(r"^h([0-9a-f]{8})p([0-9]+)t([0-9]+|x)$")


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid;
    -1 for a zombie (it has exited); None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # field 22; the command name (field 2) may contain spaces, so count from its ')'
    fields = stat.rsplit(b")", 1)[-1].split()
    try:
        if fields[0] == b"Z":
            return -1
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, ticks: int | None) -> bool:
    """Whether process ``pid`` of this host runs and, when ``ticks`` is known, is the one
    that started at ``ticks`` (not a later one that reused the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now_ticks = start_ticks(pid)
    if now_ticks == -1:
        return False  # a zombie: it has exited
    return ticks is None or now_ticks is None or now_ticks == ticks


def _host_tag(host: str) -> str:
    return hashlib.blake2s(host.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: its host, pid and start time (clock ticks since boot, None if unknown)."""

    host: str
    pid: int
    ticks: int | None

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, start_ticks(pid))

    def alive(self) -> bool | None:
        """Whether it still runs; None when it ran on another host (nobody here can tell)."""
        if self.host != socket.gethostname():
            return None
        return process_alive(self.pid, self.ticks)

    def token(self) -> str:
        """A short form for file names (``h<host hash>p<pid>t<ticks>``): letters and digits
        only. The host goes in as a hash: enough to tell this host from another."""
        ticks = "x" if self.ticks is None else str(self.ticks)
        return f"h{_host_tag(self.host)}p{self.pid}t{ticks}"

    @classmethod
    def from_token(cls, token: str) -> ProcessIdentity | None:
        """The identity a :meth:`token` names, with ``host`` set to this host's name when the
        hash is this host's (else to the hash); None when ``token`` is not one."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        host_hash, pid, ticks = match.groups()
        here = socket.gethostname()
        host = here if _host_tag(here) == host_hash else f"#{host_hash}"
        return cls(host, int(pid), None if ticks == "x" else int(ticks))
