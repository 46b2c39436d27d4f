"""``python -m regionvault.plugins.osmohlr``: run osmo-hlr as an instance's function.

The launcher is the instance's process; osmo-hlr runs as its child, in the same process group
(so the local provider's terminate stops both) and with a parent-death signal (so a launcher
killed alone does not leave it behind). At each start it:

1. reads the IMSI of the first subscriber in ``hlr.db`` (read-only, before osmo-hlr opens
   it): the known subscriber the health check asks for;
2. picks a loopback address whose GSUP, VTY and CTRL ports are free (``--address``, else
   127.0.0.1, 127.0.0.2, ... 127.0.0.254): osmo-hlr's GSUP and CTRL ports are fixed, so two
   instances on one machine (an original in east and its restored copy in west) differ by
   address;
3. writes ``osmo-hlr.cfg`` in the data directory (that address, the VTY hostname
   ``hlr-<instance id>``, logging to standard error, which is the instance's log) and starts
   ``osmo-hlr -c osmo-hlr.cfg -l hlr.db``;
4. once osmo-hlr answers on its VTY under that hostname, writes ``run/osmohlr.json`` (the
   address, ports, hostname, probe IMSI and both pids) for the health check.

If osmo-hlr exits before it answers (another process took the address meanwhile), the next
address is tried, a bounded number of times. SIGTERM and SIGINT are passed to osmo-hlr, and
the launcher exits with it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from regionvault.core.procs import start_ticks
from regionvault.plugins.osmohlr.layout import (
    CONFIG_FILE,
    CTRL_PORT,
    DATABASE,
    ENDPOINT_FILE,
    GSUP_PORT,
    VTY_PORT,
    hostname_for,
)
from regionvault.plugins.osmohlr.package import find_binary, missing
from regionvault.plugins.osmohlr.vty import Vty, VtyError

__all__ = ["first_subscriber", "loopback_addresses", "main", "ports_free", "render_config"]

#: how many times osmo-hlr is started (each on another free address) before giving up
MAX_STARTS = 8
_PR_SET_PDEATHSIG = 1

CONFIG = """\
! written by regionvault.plugins.osmohlr at every start: edits are lost
hostname {hostname}
log stderr
 logging filter all 1
 logging color 0
 logging print category 1
 logging print extended-timestamp 1
 logging level main notice
 logging level db notice
 logging level auc notice
 logging level ss notice
 logging level linp error
line vty
 bind {address} {vty_port}
ctrl
 bind {address}
hlr
 gsup
  bind ip {address}
"""


def render_config(address: str, hostname: str) -> str:
    """osmo-hlr's configuration serving on ``address`` under the VTY hostname ``hostname``."""
    socket.inet_aton(address)  # an IPv4 address, nothing the config could be tricked by
    if not hostname or any(c.isspace() for c in hostname):
        raise ValueError(f"hostname {hostname!r} must be one word")
    return CONFIG.format(address=address, vty_port=VTY_PORT, hostname=hostname)


def loopback_addresses() -> Iterator[str]:
    """127.0.0.1 to 127.0.0.254, in order."""
    for last in range(1, 255):
        yield f"127.0.0.{last}"


def ports_free(address: str, ports: tuple[int, ...] = (GSUP_PORT, VTY_PORT, CTRL_PORT)) -> bool:
    """Whether every one of ``ports`` can be bound on ``address`` now (as osmo-hlr binds:
    SO_REUSEADDR, so a port left in TIME_WAIT counts as free)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def first_subscriber(database: Path) -> str | None:
    """The IMSI of the subscriber with the lowest id in ``database``, or None (no database,
    no subscriber, or one SQLite cannot read: osmo-hlr then says why in the log)."""
    if not database.is_file():
        return None
    try:
        uri = f"{database.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
            row = db.execute("SELECT imsi FROM subscriber ORDER BY id LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        print(f"osmohlr: no probe subscriber read from {database}: {exc}", file=sys.stderr)
        return None
    return str(row[0]) if row else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


#: ``<pid>:<start ticks>`` of a process whose end ends this launcher (the demo, a test): set
#: only by what owns the instance; an ordinary instance outlives the command that launched it
OWNER_ENV = "REGIONVAULT_OSMOHLR_OWNER"
#: how long, in seconds, osmo-hlr may take to listen on CTRL once its VTY answers
CTRL_WAIT = 2.0
_TCP_LISTEN = "0A"
#: how often, in seconds, the launcher looks whether its owner is still there
OWNER_POLL = 1.0


def owner_value(pid: int | None = None) -> str:
    """The value of :data:`OWNER_ENV` naming ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    ticks = start_ticks(pid)
    return f"{pid}:{ticks if ticks is not None and ticks >= 0 else ''}"


def _owner_from_env() -> tuple[int, str] | None:
    value = os.environ.get(OWNER_ENV, "")
    pid, _, ticks = value.partition(":")
    return (int(pid), ticks) if pid.isdigit() and ticks else None


def _alive(owner: tuple[int, str]) -> bool:
    """The owner still runs: its pid has the start time it had (a zombie has exited)."""
    return str(start_ticks(owner[0])) == owner[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux prctl; elsewhere the
    process group still carries the local provider's terminate)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _listening(pid: int, address: str, port: int) -> bool | None:
    """Whether process ``pid`` listens on ``address``:``port`` (TCP), from /proc: one of its
    sockets is the listening one in its network namespace's table; None when /proc cannot
    tell (not Linux)."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text(encoding="ascii").splitlines()[1:]
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    except OSError:
        return None
    local = f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}:{port:04X}"
    for line in table:
        fields = line.split()
        if len(fields) > 9 and fields[1] == local and fields[3] == _TCP_LISTEN:
            return fields[9] in inodes
    return False


def _answers(address: str, hostname: str) -> bool:
    try:
        with Vty(address, timeout=1.0) as vty:
            vty.enable()
            return vty.hostname() == hostname
    except (OSError, VtyError):
        return False


def _start(
    binary: Path,
    data: Path,
    address: str,
    hostname: str,
    ready_timeout: float,
    spawned: Callable[[subprocess.Popen[bytes]], None] = lambda child: None,
) -> subprocess.Popen[bytes] | None:
    """osmo-hlr serving on ``address``, or None when it exited before it answered;
    ``spawned`` is told of the child as soon as it runs (so a signal can reach it)."""
    _write_atomic(data / CONFIG_FILE, render_config(address, hostname))
    child = subprocess.Popen(
        [str(binary), "-c", str(CONFIG_FILE), "-l", str(DATABASE)],
        cwd=data,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # the launcher runs no threads: preexec_fn is safe
    )
    spawned(child)
    deadline = time.monotonic() + ready_timeout
    while True:
        if child.poll() is not None:
            print(f"osmohlr: osmo-hlr on {address} exited with {child.returncode}", flush=True)
            return None
        if _answers(address, hostname):
            break
        if time.monotonic() >= deadline:
            child.kill()
            child.wait()
            raise TimeoutError(f"osmo-hlr on {address} did not answer within {ready_timeout:g}s")
        time.sleep(0.02)
    # osmo-hlr keeps running when its CTRL port is taken (by a process that bound it after
    # ports_free looked): then another address is tried
    ctrl_by = time.monotonic() + CTRL_WAIT
    while _listening(child.pid, address, CTRL_PORT) is False:
        if child.poll() is not None or time.monotonic() >= ctrl_by:
            print(
                f"osmohlr: CTRL {address}:{CTRL_PORT} is not osmo-hlr's (taken): stopping it",
                flush=True,
            )
            child.terminate()
            child.wait()
            return None
        time.sleep(0.02)
    return child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osmohlr", description="Run osmo-hlr for an instance.")
    parser.add_argument("--data", type=Path, default=None, help="data directory")
    parser.add_argument(
        "--address", default="auto", help="loopback address to serve on (default: a free one)"
    )
    parser.add_argument("--binary", type=Path, default=None, help="osmo-hlr binary")
    parser.add_argument("--ready-timeout", type=float, default=20.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    data: Path = args.data or Path(os.environ.get("REGIONVAULT_DATA_DIR") or Path.cwd())
    data.mkdir(parents=True, exist_ok=True)
    binary = args.binary or find_binary()
    if binary is None:
        print(f"osmohlr: {missing()}", file=sys.stderr)
        return 1
    if args.address != "auto":
        try:
            socket.inet_aton(args.address)
        except OSError:
            parser.error(f"--address {args.address!r} is not an IPv4 address")
    instance_id = os.environ.get("REGIONVAULT_INSTANCE_ID") or f"x{secrets.token_hex(6)}"
    hostname = hostname_for(instance_id)
    probe = first_subscriber(data / DATABASE)

    child: subprocess.Popen[bytes] | None = None
    stopping = False
    owner = _owner_from_env()

    def is_stopping() -> bool:  # set by the handler, whatever mypy narrowed it to
        return stopping

    def spawned(started: subprocess.Popen[bytes]) -> None:
        nonlocal child
        child = started

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous: dict[int, Any] = {
        sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        candidates = [args.address] if args.address != "auto" else list(loopback_addresses())
        starts = 0
        for address in candidates:
            if stopping or starts >= MAX_STARTS:
                break
            if not ports_free(address):
                continue
            starts += 1
            try:
                child = _start(binary, data, address, hostname, args.ready_timeout, spawned)
            except TimeoutError as exc:
                print(f"osmohlr: {exc}", file=sys.stderr)
                return 1
            if child is not None and child.poll() is None:
                break
            child = None
        if child is None or stopping:
            if child is not None:
                child.send_signal(signal.SIGTERM)
                child.wait()
            if not stopping:
                where = f"address {args.address}" if args.address != "auto" else "loopback address"
                print(
                    f"osmohlr: no {where} with ports {GSUP_PORT}, {VTY_PORT} and {CTRL_PORT} "
                    f"free for osmo-hlr ({starts} started, none answered)",
                    file=sys.stderr,
                )
            return 0 if stopping else 1
        endpoint = {
            "address": address,
            "gsup_port": GSUP_PORT,
            "vty_port": VTY_PORT,
            "ctrl_port": CTRL_PORT,
            "hostname": hostname,
            "probe_imsi": probe,
            "pid": os.getpid(),
            "hlr_pid": child.pid,
        }
        _write_atomic(data / ENDPOINT_FILE, json.dumps(endpoint, sort_keys=True))
        print(
            f"osmohlr: osmo-hlr {hostname} serving on {address} "
            f"(GSUP {GSUP_PORT}, VTY {VTY_PORT}, CTRL {CTRL_PORT}); probe subscriber "
            f"{probe or 'none'}",
            flush=True,
        )
        if is_stopping():  # a signal between the start and here
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                code = child.wait(timeout=OWNER_POLL if owner else None)
                break
            except subprocess.TimeoutExpired:
                if owner and not is_stopping() and not _alive(owner):
                    print(f"osmohlr: owner {owner[0]} is gone: stopping osmo-hlr", flush=True)
                    stopping = True
                    child.send_signal(signal.SIGTERM)
        return 0 if is_stopping() else (code if code >= 0 else 128 - code)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        with contextlib.suppress(OSError):
            (data / ENDPOINT_FILE).unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
