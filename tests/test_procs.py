"""Process identity (core/procs.py): a pid is its holder only while that very process runs,
not a zombie, not a later process that reused the pid; and it is defined once: the job
ledger, the repository locks, the local vault and the local compute all ask core/procs.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from regionvault.core.procs import ProcessIdentity, process_alive, start_ticks

ROOT = Path(__file__).resolve().parent.parent


def wait_for_zombie(pid: int) -> None:
    for _ in range(600):  # bounded: a minute at most
        if start_ticks(pid) == -1:
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} never exited")


def test_this_process_is_alive_and_itself() -> None:
    me = ProcessIdentity.current()
    assert me.ticks is not None
    assert me.alive() is True
    assert process_alive(me.pid, me.ticks)


def test_a_reused_pid_is_not_the_same_process() -> None:
    me = ProcessIdentity.current()
    assert me.ticks is not None
    assert not process_alive(me.pid, me.ticks + 1)


def test_an_exited_child_is_dead_before_and_after_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        ticks = start_ticks(child.pid)
        wait_for_zombie(child.pid)
        assert not process_alive(child.pid, ticks)  # a zombie: kill(pid, 0) still succeeds
    finally:
        child.wait(timeout=30)
    assert not process_alive(child.pid, ticks)


def test_another_hosts_process_is_unknown() -> None:
    assert ProcessIdentity("another-host", 1, None).alive() is None


def test_process_identity_is_defined_once() -> None:
    # who reads a process's start time or probes a pid: core/procs.py alone
    probes = re.compile(r"/proc/\{[^}]*\}/stat|os\.kill\([^,]+,\s*0\)")
    found = [
        str(path.relative_to(ROOT))
        for top in ("core", "providers", "plugins")
        for path in sorted((ROOT / top).rglob("*.py"))
        if probes.search(path.read_text())
    ]
    assert found == ["core/procs.py"]
