"""Process identity (core/procs.py): a pid is its holder only while that very process runs,
not a zombie, not a later process that reused the pid; and it is defined once: the job
ledger, the repository locks, the local vault and the local compute all ask core/procs.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from regionvault.core import procs
from regionvault.core.procs import (
    ProcessIdentity,
    boot_id,
    machine_tag,
    pid_namespace,
    process_alive,
    start_ticks,
)

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


needs_linux_ids = pytest.mark.skipif(
    boot_id() is None or pid_namespace() is None, reason="needs Linux's boot id and pid namespace"
)


@needs_linux_ids
def test_the_identity_names_the_boot_and_the_pid_namespace() -> None:
    me = ProcessIdentity.current()
    assert me.boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert me.pid_ns == Path("/proc/self/ns/pid").stat().st_ino
    assert me.machine == machine_tag()


@needs_linux_ids
def test_another_pid_namespace_cannot_tell() -> None:
    # a container sharing this host name (docker --uts=host): its pid is not a pid here
    me = ProcessIdentity.current()
    assert me.ticks is not None
    elsewhere = replace(me, pid_ns=(me.pid_ns or 0) + 1)
    assert elsewhere.alive() is None  # not True, though this pid and start time run here
    assert replace(elsewhere, pid=dead_pid()).alive() is None  # and never dead


@needs_linux_ids
def test_another_boot_of_this_machine_is_dead_of_another_machine_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a machine id of our own, so the rule is checked where there is no /etc/machine-id too
    monkeypatch.setattr(procs, "machine_tag", lambda: "5eed" * 4)
    me = ProcessIdentity.current()
    assert me.machine == "5eed" * 4
    earlier_boot = replace(me, boot="00000000-0000-4000-8000-000000000000")
    # this very machine, rebooted since: nothing of that boot runs, even at the same pid and
    # start time (a deterministic boot starts the same units the same way)
    assert earlier_boot.alive() is False
    # unless the caller does not trust machine ids to be unique (a vault that clones share)
    assert earlier_boot.alive(trust_machine_id=False) is None
    # the same host name on another machine (or one whose id is not known): cannot tell
    assert replace(earlier_boot, machine="0" * 16).alive() is None
    assert replace(earlier_boot, machine=None).alive() is None
    # and a machine with no id of its own cannot tell either
    monkeypatch.setattr(procs, "machine_tag", lambda: None)
    assert replace(earlier_boot, machine=None).alive() is None


def test_what_earlier_versions_recorded_is_judged_as_before() -> None:
    # no boot, namespace or machine: the pid and start time decide
    me = ProcessIdentity.current()
    assert ProcessIdentity(me.host, me.pid, me.ticks).alive() is True
    assert ProcessIdentity(me.host, dead_pid(), None).alive() is False


def test_tokens_round_trip_and_old_tokens_still_read() -> None:
    me = ProcessIdentity.current()
    assert ProcessIdentity.from_token(me.token()) == me
    assert me.token().isalnum()
    old = f"h{me.token()[1:9]}p{me.pid}t{me.ticks}"  # the form of earlier versions
    assert ProcessIdentity.from_token(old) == ProcessIdentity(me.host, me.pid, me.ticks)
    other = ProcessIdentity("other-host", 7, None, "another-boot", 9, "0" * 16)
    back = ProcessIdentity.from_token(other.token())
    assert back is not None and back.host.startswith("#") and back.boot != me.boot
    assert back.alive() is None


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


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
