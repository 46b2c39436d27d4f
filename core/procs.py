"""Process identity: which process on which host wrote something (a lock, a temporary file),
and whether that process still runs, told apart from a later process that reused its pid.

The one definition of "is this pid still that process": the job ledger's locks
(core/pipeline/ledger.py), the repository locks (core/repository/_locks.py), the local
vault's temporary files and the local compute's launched processes all ask here. It imports
nothing of the engine, so providers may use it too (core SPI).

A process is named by its host name, pid and start time, and (where Linux says) the boot it
ran in (``/proc/sys/kernel/random/boot_id``), its pid namespace (the inode of
``/proc/self/ns/pid``) and a hash of its machine's id (``/etc/machine-id``). The pid means
something here only in the same boot and the same pid namespace; see
:meth:`ProcessIdentity.alive` for the rule.

The machine id is taken to be unique to a machine, as systemd means it to be. Machines
cloned from one image without a new id (no ``systemd-firstboot``, sysprep or
``systemd-machine-id-setup``) share it, and usually their host name too: each then reads
the other's boot as an earlier boot of its own. So the rule "another boot of this machine:
dead" is the caller's choice (``alive(trust_machine_id=...)``): the job ledger and the
local compute keep it (their files are this machine's own: a ``state_dir``, a local region's
root), the repository locks and the local vault's temporary files, which live in a vault
that machines may share, do not (their expiry decides).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessIdentity",
    "boot_id",
    "machine_tag",
    "pid_namespace",
    "process_alive",
    "start_ticks",
]

_TOKEN = re.compile(
    r"^h([0-9a-f]{8})p([0-9]+)t([0-9]+|x)(?:b([0-9a-f]{8}|x)n([0-9]+|x)m([0-9a-f]{8}|x))?$"
)


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


@functools.cache
def boot_id() -> str | None:
    """This boot's id (Linux: a new random one at every boot), None when it cannot be read."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace: pids mean the same only within one; None
    when it cannot be read. (Not cached: a forked child may be in another namespace.)"""
    try:
        return Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return None


@functools.cache
def machine_tag() -> str | None:
    """A hash of this machine's id (``/etc/machine-id``, which stays the same across
    reboots), None when there is none. Hashed with a purpose of its own, as systemd advises,
    so what lock files hold does not give away the id itself."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw:
            return hashlib.blake2s(raw.encode(), digest_size=8, person=b"rv-host").hexdigest()
    return None


def process_alive(pid: int, ticks: int | None) -> bool:
    """Whether process ``pid`` of this host (this boot, this pid namespace) runs and, when
    ``ticks`` is known, is the one that started at ``ticks`` (not a later one that reused the
    pid)."""
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


def _tag(value: str) -> str:
    return hashlib.blake2s(value.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


def _differ(a: object, b: object) -> bool:
    """Both known, and not the same."""
    return a is not None and b is not None and a != b


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: its host, pid and start time (clock ticks since boot), and the boot, pid
    namespace and machine it ran in; each of the last four None if unknown (as in what
    earlier versions wrote)."""

    host: str
    pid: int
    ticks: int | None
    boot: str | None = None
    pid_ns: int | None = None
    machine: str | None = None

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(
            socket.gethostname(), pid, start_ticks(pid), boot_id(), pid_namespace(), machine_tag()
        )

    def alive(self, *, trust_machine_id: bool = True) -> bool | None:
        """Whether it still runs; None when nobody here can tell. The rule:

        - another host name: None (judge it by an expiry);
        - another boot (both boot ids known, and not the same): False when both machine ids
          are known and the same and ``trust_machine_id``, taking it for this very machine,
          rebooted since (no process of an earlier boot runs any more); else None, as it may
          be another machine that carries the same host name, or a clone that carries the
          same machine id too (see the module's note);
        - the same boot, another pid namespace (a container sharing the host name): None,
          its pid means another process here, or none;
        - otherwise the pid decides, with the start time telling a reused pid.

        Anything unknown (an older record, no /proc) is no mismatch."""
        if self.host != socket.gethostname():
            return None
        if _differ(self.boot, boot_id()):
            here = machine_tag()
            rebooted = trust_machine_id and here is not None and self.machine == here
            return False if rebooted else None
        if _differ(self.pid_ns, pid_namespace()):
            return None
        return process_alive(self.pid, self.ticks)

    def token(self) -> str:
        """A short form for file names (``h<host>p<pid>t<ticks>b<boot>n<pid ns>m<machine>``,
        ``x`` for unknown): letters and digits only. The host, boot and machine go in as
        short hashes: enough to tell this one from another."""

        def known(value: object, form: str) -> str:
            return "x" if value is None else form

        return (
            f"h{_tag(self.host)}p{self.pid}t{known(self.ticks, str(self.ticks))}"
            f"b{known(self.boot, _tag(self.boot or ''))}"
            f"n{known(self.pid_ns, str(self.pid_ns))}"
            f"m{known(self.machine, _tag(self.machine or ''))}"
        )

    @classmethod
    def from_token(cls, token: str) -> ProcessIdentity | None:
        """The identity a :meth:`token` names (also the shorter one of earlier versions,
        without boot, namespace and machine), with ``host``, ``boot`` and ``machine`` set to
        this host's, boot's and machine's when the hash is theirs (else to ``#<hash>``); None
        when ``token`` is not one."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        host_hash, pid, ticks, boot_hash, ns, machine_hash = match.groups()

        def resolve(hashed: str | None, here: str | None) -> str | None:
            if hashed is None or hashed == "x":
                return None
            return here if here is not None and _tag(here) == hashed else f"#{hashed}"

        return cls(
            resolve(host_hash, socket.gethostname()) or "",
            int(pid),
            None if ticks == "x" else int(ticks),
            resolve(boot_hash, boot_id()),
            None if ns in (None, "x") else int(ns),
            resolve(machine_hash, machine_tag()),
        )
