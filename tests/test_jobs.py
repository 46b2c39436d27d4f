"""Jobs: plain data with stable keys; a finished key never runs again; two runners at once
(threads or processes) never both run one key; stale locks are broken; failures reach the
``regionvault_on_job_failure`` hook and are retried by the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.pipeline.executor import (
    NO_RETRY,
    Executor,
    RetryPolicy,
    ThreadExecutor,
    execute_job,
)
from regionvault.core.pipeline.jobs import (
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
    backup_job,
    copy_job,
    job_key,
    parse_slot,
    retention_job,
    split_key,
    tag_job,
)
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.plugins import hookimpl, make_plugin_manager
from regionvault.core.procs import machine_tag

SLOT = datetime(2026, 11, 25, tzinfo=UTC)
KEY = "backup/local:east/i-abc/2026-11-25T00:00Z"


class Counter:
    """A handler that counts its runs (thread-safe) and returns a result."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> dict[str, Any]:
        with self.lock:
            self.runs.append(job.key)
        return {"recovery_point": "rp-1", "instance": job.payload.get("instance_id")}


def job() -> Job:
    return backup_job("local:east", "i-abc", SLOT)


# --------------------------------------------------------------------------- jobs as data


def test_keys_are_stable_and_readable() -> None:
    assert job().key == KEY
    assert job() == backup_job("local:east", "i-abc", SLOT + timedelta(0))
    assert tag_job("local:east", SLOT).key == "tag/local:east/2026-11-25T00:00Z"
    assert retention_job("local:west", SLOT).key == "retention/local:west/2026-11-25T00:00Z"
    copy = copy_job("local:east", "rp-1", "local:west")
    assert copy.key == "copy/local:east/rp-1/local:west"
    assert copy.region == "local:east"
    assert parse_slot("2026-11-25T00:00Z") == SLOT


def test_key_parts_are_escaped() -> None:
    azure_id = "/subscriptions/s/vm/x y"
    key = job_key("backup", "azure:westeurope", azure_id, "2026-11-25T00:00Z")
    assert key.count("/") == 3
    assert split_key(key) == ["backup", "azure:westeurope", azure_id, "2026-11-25T00:00Z"]


def test_jobs_are_plain_json_data() -> None:
    original = backup_job("local:east", "i-abc", SLOT, {"copies": [{"region": "local:west"}]})
    again = Job.from_json(original.to_json())
    assert again == original
    assert again.payload["copies"] == [{"region": "local:west"}]
    with pytest.raises(TypeError):
        original.payload["x"] = 1  # type: ignore[index]
    with pytest.raises(RegionVaultError, match="not plain JSON"):
        Job(KEY, "backup", "local:east", {"when": datetime.now(UTC)})
    with pytest.raises(RegionVaultError, match="printable ASCII"):
        Job("backup job", "backup")
    with pytest.raises(RegionVaultError, match="kind"):
        Job(KEY, "Backup!")
    with pytest.raises(RegionVaultError, match="no time zone"):
        backup_job("local:east", "i-abc", datetime(2026, 11, 25))


def test_thread_executor_is_an_executor(tmp_path: Path) -> None:
    with ThreadExecutor(JobHandlers(), JobLedger(tmp_path)) as executor:
        assert isinstance(executor, Executor)


# --------------------------------------------------------------------------- idempotence


def test_running_a_key_twice_runs_it_once(tmp_path: Path) -> None:
    handler = Counter()
    with ThreadExecutor(JobHandlers({"backup": handler}), JobLedger(tmp_path)) as executor:
        first = executor.run([job()])[0]
        second = executor.run([job()])[0]
    assert first.status is JobStatus.DONE
    assert second.status is JobStatus.REPLAYED
    assert second.result == first.result == {"recovery_point": "rp-1", "instance": "i-abc"}
    assert handler.runs == [KEY]


def test_the_record_survives_the_runner(tmp_path: Path) -> None:
    handler = Counter()
    for _ in range(2):  # a new process would see the same files
        ledger = JobLedger(tmp_path)
        with ThreadExecutor(JobHandlers({"backup": handler}), ledger) as executor:
            executor.run([job()])
    assert handler.runs == [KEY]
    recorded = JobLedger(tmp_path).record(KEY)
    assert recorded is not None and recorded.status is JobStatus.DONE
    # nothing but JSON under the state dir, one record, no lock left behind
    assert [p.name for p in (tmp_path / "jobs" / "locks").iterdir() if p.suffix == ".lock"] == []
    (record,) = (tmp_path / "jobs" / "done").iterdir()
    assert json.loads(record.read_text())["key"] == KEY


def test_same_key_in_flight_shares_one_run(tmp_path: Path) -> None:
    release = threading.Event()
    runs: list[str] = []

    def slow(job: Job) -> str:
        runs.append(job.key)
        assert release.wait(10)
        return "ok"

    with ThreadExecutor(JobHandlers({"backup": slow}), JobLedger(tmp_path)) as executor:
        futures = [executor.submit(job()) for _ in range(5)]
        release.set()
        outcomes = [f.result(timeout=10) for f in futures]
    assert len({id(f) for f in futures}) == 1
    assert runs == [KEY]
    assert {o.status for o in outcomes} == {JobStatus.DONE}


def test_distinct_keys_run_in_parallel_up_to_the_bound(tmp_path: Path) -> None:
    handler = Counter()
    jobs = [backup_job("local:east", f"i-{n}", SLOT) for n in range(10)]
    with ThreadExecutor(
        JobHandlers({"backup": handler}), JobLedger(tmp_path), max_workers=3
    ) as executor:
        outcomes = executor.run(jobs)
    assert [o.key for o in outcomes] == [j.key for j in jobs]
    assert sorted(handler.runs) == sorted(j.key for j in jobs)


def test_two_executors_at_once_run_a_key_once(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow(job: Job) -> str:
        runs.append(job.key)
        started.set()
        assert release.wait(10)
        return "ok"

    a = ThreadExecutor(JobHandlers({"backup": slow}), JobLedger(tmp_path))
    b = ThreadExecutor(JobHandlers({"backup": slow}), JobLedger(tmp_path))
    with a, b:
        running = a.submit(job())
        assert started.wait(10)
        busy = b.submit(job()).result(timeout=10)
        release.set()
        done = running.result(timeout=10)
        later = b.submit(job()).result(timeout=10)
    assert busy.status is JobStatus.BUSY
    assert busy.runner == f"{os.uname().nodename}:{os.getpid()}"
    assert done.status is JobStatus.DONE
    assert later.status is JobStatus.REPLAYED
    assert runs == [KEY]


RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from regionvault.core.pipeline.jobs import Job, JobHandlers
    from regionvault.core.pipeline.ledger import JobLedger
    from regionvault.core.pipeline.executor import ThreadExecutor

    state, count, go = (Path(a) for a in sys.argv[1:4])

    def handler(job):
        with count.open("a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(0.3)
        return os.getpid()

    for _ in range(1000):
        if go.exists():
            break
        time.sleep(0.01)
    job = Job("backup/local:east/i-abc/2026-11-25T00:00Z", "backup", "local:east")
    with ThreadExecutor(JobHandlers({"backup": handler}), JobLedger(state)) as executor:
        print(executor.run([job])[0].status)
    """
)


def test_processes_racing_on_one_key_run_it_once(tmp_path: Path) -> None:
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    count, go = tmp_path / "count", tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "state"), str(count), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    go.touch()
    statuses = []
    for racer in racers:
        out, err = racer.communicate(timeout=60)
        assert racer.returncode == 0, err
        statuses.append(out.strip())
    assert len(count.read_text().splitlines()) == 1
    assert statuses.count("done") == 1
    assert set(statuses) <= {"done", "busy", "replayed"}


# --------------------------------------------------------------------------- stale locks


def write_lock(ledger: JobLedger, key: str, **fields: Any) -> Path:
    body = {
        "key": key,
        "token": "theirs",
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "process_start": None,
        "expires_at": time.time() + 3600,
    }
    body.update(fields)
    path = ledger._path("locks", key, ".lock")
    path.write_text(json.dumps(body))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_a_live_holder_makes_the_key_busy(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path)
    write_lock(ledger, KEY)  # this very process, alive, not expired
    handler = Counter()
    outcome = execute_job(job(), JobHandlers({"backup": handler}), ledger)
    assert outcome.status is JobStatus.BUSY
    assert handler.runs == []


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"pid": "a process that has exited"}, id="dead-pid"),
        pytest.param({"expires_at": time.time() - 1, "host": "elsewhere"}, id="expired"),
        pytest.param({"process_start": "1"}, id="reused-pid"),
        pytest.param({"pid": "a process that has exited, not yet reaped"}, id="zombie"),
    ],
)
def test_stale_locks_are_broken(tmp_path: Path, fields: dict[str, Any]) -> None:
    ledger = JobLedger(tmp_path)
    zombie = None
    if "not yet reaped" in str(fields.get("pid")):
        # exited, but its parent (this process) has not waited for it: the pid still answers
        # kill(pid, 0), yet its holder is gone (core/procs.py tells)
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        for _ in range(600):  # bounded: at most a minute for it to exit
            if Path(f"/proc/{zombie.pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()[0] == b"Z":
                break
            time.sleep(0.1)
        fields = {"pid": zombie.pid}
    elif isinstance(fields.get("pid"), str):
        fields = {"pid": dead_pid()}
    try:
        write_lock(ledger, KEY, **fields)
        handler = Counter()
        outcome = execute_job(job(), JobHandlers({"backup": handler}), ledger)
    finally:
        if zombie is not None:
            zombie.wait(timeout=30)
    assert outcome.status is JobStatus.DONE
    assert handler.runs == [KEY]


def test_the_lock_body_keeps_the_form_every_version_reads(tmp_path: Path) -> None:
    # Runners of different versions share state_dir during an upgrade: each field keeps the
    # name and type earlier versions read, and new fields are ones they ignore.
    ledger = JobLedger(tmp_path)
    lock = ledger.acquire(KEY)
    assert lock is not None
    try:
        body = json.loads(ledger._path("locks", KEY, ".lock").read_bytes())
    finally:
        lock.release()
    types = {name: type(value).__name__ for name, value in body.items()}
    assert types == {
        "key": "str",
        "token": "str",
        "host": "str",
        "pid": "int",
        "process_start": "str",  # earlier versions compare it with a string from /proc
        "expires_at": "float",
        "boot_id": "str",
        "pid_ns": "str",
        "machine": "str" if machine_tag() is not None else "NoneType",
    }
    assert body["process_start"].isdigit()

    # the check of a runner before 257f77e..288bf75, as it was: stale when the holder's
    # start time, read from /proc as a string, is not the one the lock holds
    def old_is_stale(holder: dict[str, Any]) -> bool:
        stat = Path(f"/proc/{holder['pid']}/stat").read_bytes()
        start = stat.rsplit(b")", 1)[-1].split()[19].decode()
        return holder.get("process_start") is not None and start not in (
            None,
            holder["process_start"],
        )

    assert not old_is_stale(body)  # our live lock is live to an older runner too


@pytest.mark.parametrize("form", [str, int], ids=["string", "number"])
def test_a_live_holders_start_time_reads_in_either_form(tmp_path: Path, form: Any) -> None:
    ledger = JobLedger(tmp_path)
    ticks = int(Path(f"/proc/{os.getpid()}/stat").read_bytes().rsplit(b")", 1)[-1].split()[19])
    write_lock(ledger, KEY, process_start=form(ticks))
    assert execute_job(job(), JobHandlers({"backup": Counter()}), ledger).status is JobStatus.BUSY


def test_a_holder_in_another_pid_namespace_is_judged_by_expiry_alone(tmp_path: Path) -> None:
    # a runner in a container sharing this host name: its pid means nothing here, so its
    # lock is never broken for a pid that is dead here; only its expiry counts
    ledger = JobLedger(tmp_path)
    me = json.loads(_own_lock_body(ledger))
    write_lock(ledger, KEY, pid=dead_pid(), boot_id=me["boot_id"], pid_ns="1")
    assert execute_job(job(), JobHandlers({"backup": Counter()}), ledger).status is JobStatus.BUSY


def test_a_holder_of_an_earlier_boot_of_this_machine_is_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.core import procs

    # a machine id of our own, so the rule is checked where there is no /etc/machine-id too
    monkeypatch.setattr(procs, "machine_tag", lambda: "5eed" * 4)
    ledger = JobLedger(tmp_path)
    me = json.loads(_own_lock_body(ledger))
    assert me["machine"] == "5eed" * 4
    earlier = "00000000-0000-4000-8000-000000000000"
    # the same pid and start time as this process: only the boot tells them apart
    write_lock(ledger, KEY, process_start=me["process_start"], boot_id=earlier,
               pid_ns=me["pid_ns"], machine=me["machine"])  # fmt: skip
    assert execute_job(job(), JobHandlers({"backup": Counter()}), ledger).status is JobStatus.DONE
    # another machine that has this host name: cannot tell, so the expiry decides
    other = JobLedger(tmp_path / "other")
    write_lock(other, KEY, boot_id=earlier, machine="0" * 16)
    assert execute_job(job(), JobHandlers({"backup": Counter()}), other).status is JobStatus.BUSY


def _own_lock_body(ledger: JobLedger) -> bytes:
    return ledger._lock_body(KEY, "mine")


def test_another_hosts_unexpired_lock_is_respected(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path)
    write_lock(ledger, KEY, host="elsewhere", pid=1)
    assert execute_job(job(), JobHandlers({"backup": Counter()}), ledger).status is JobStatus.BUSY


def test_an_unreadable_lock_is_broken_only_once_old(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path, lock_ttl=timedelta(minutes=5))
    path = ledger._path("locks", KEY, ".lock")
    path.write_bytes(b"")  # its creator is between O_EXCL and write, or died there
    assert ledger.acquire(KEY) is None
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = ledger.acquire(KEY)
    assert lock is not None
    lock.release()


def test_a_runner_killed_while_holding_a_key(tmp_path: Path) -> None:
    holder = textwrap.dedent(
        f"""
        import os
        from regionvault.core.pipeline.ledger import JobLedger
        assert JobLedger({str(tmp_path)!r}).acquire({KEY!r}) is not None
        os._exit(0)  # dies without releasing
        """
    )
    subprocess.run([sys.executable, "-c", holder], check=True, timeout=60)
    ledger = JobLedger(tmp_path)
    assert ledger.holder(KEY) is not None
    handler = Counter()
    assert execute_job(job(), JobHandlers({"backup": handler}), ledger).status is JobStatus.DONE
    assert handler.runs == [KEY]


def test_locks_are_renewed_while_held_and_lost_locks_say_so(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path, lock_ttl=timedelta(seconds=0.3))
    lock = ledger.acquire(KEY)
    assert lock is not None
    first = ledger.holder(KEY)
    assert first is not None
    for _ in range(500):  # bounded: the renewer rewrites the expiry every 0.1 s
        now = ledger.holder(KEY)
        if now is not None and now["expires_at"] > first["expires_at"]:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the lock was never renewed")
    assert JobLedger(tmp_path).acquire(KEY) is None
    # someone breaks it (as if it had expired): renewing then reports the loss
    ledger._path("locks", KEY, ".lock").unlink()
    assert lock.renew() is False
    lock.release()
    assert ledger.holder(KEY) is None


def test_release_never_removes_someone_elses_lock(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path)
    mine = ledger.acquire(KEY)
    assert mine is not None
    write_lock(ledger, KEY, token="someone-else")
    mine.release()
    holder = ledger.holder(KEY)
    assert holder is not None and holder["token"] == "someone-else"


# --------------------------------------------------------------------------- failures


class FailureSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, BaseException]] = []

    @hookimpl
    def regionvault_on_job_failure(
        self, job: str, region: str | None, error: BaseException
    ) -> None:
        self.calls.append((job, region, error))


def test_failure_calls_the_hook_and_is_retried(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    attempts: list[int] = []

    def flaky(job: Job) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("vault unreachable")
        return "ok"

    ledger = JobLedger(tmp_path)
    with ThreadExecutor(JobHandlers({"backup": flaky}), ledger, plugin_manager=pm) as executor:
        failed = executor.run([job()])[0]
        assert failed.status is JobStatus.FAILED and not failed.ok
        assert failed.error == "OSError: vault unreachable"
        assert ledger.record(KEY) is None
        last = ledger.last_failure(KEY)
        assert last is not None and last.error == failed.error
        (call,) = spy.calls
        assert call[0] == KEY and call[1] == "local:east"
        assert isinstance(call[2], OSError)

        retried = executor.run([job()])[0]
    assert retried.status is JobStatus.DONE
    assert len(attempts) == 2
    assert ledger.last_failure(KEY) is None
    assert len(spy.calls) == 1


def test_unknown_kind_and_bad_results_are_failures(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    handlers = JobHandlers({"backup": lambda job: {"when": datetime.now(UTC)}})
    with ThreadExecutor(handlers, JobLedger(tmp_path), plugin_manager=pm) as executor:
        unknown, bad = executor.run([Job("drill/local:west/x", "drill", "local:west"), job()])
    assert unknown.status is JobStatus.FAILED
    assert unknown.error is not None and "no handler for job kind 'drill'" in unknown.error
    assert bad.status is JobStatus.FAILED
    assert bad.error is not None and "not plain JSON" in bad.error
    assert sorted(c[0] for c in spy.calls) == sorted(["drill/local:west/x", KEY])


def test_a_broken_hook_does_not_hide_the_failure(tmp_path: Path) -> None:
    class Broken:
        @hookimpl
        def regionvault_on_job_failure(
            self, job: str, region: str | None, error: BaseException
        ) -> None:
            raise RuntimeError("notifier down")

    def boom(job: Job) -> None:
        raise ValueError("disk full")

    pm = make_plugin_manager(load_entry_points=False, plugins=[Broken()])
    outcome = execute_job(
        job(), JobHandlers({"backup": boom}), JobLedger(tmp_path), plugin_manager=pm
    )
    assert outcome.status is JobStatus.FAILED
    assert outcome.error == "ValueError: disk full"


def test_handlers_are_looked_up_by_kind() -> None:
    handlers = JobHandlers()
    handlers.register("backup", Counter())
    assert handlers.kinds() == ["backup"] and "backup" in handlers
    with pytest.raises(RegionVaultError, match="already registered"):
        handlers.register("backup", Counter())
    with pytest.raises(RegionVaultError, match="known: backup"):
        handlers.get("copy")


def test_prune_drops_old_records(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path)
    handler = Counter()
    execute_job(job(), JobHandlers({"backup": handler}), ledger)
    assert ledger.prune(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert ledger.prune(datetime.now(UTC) + timedelta(days=1)) == 1
    execute_job(job(), JobHandlers({"backup": handler}), ledger)
    assert len(handler.runs) == 2


def test_outcomes_round_trip() -> None:
    outcome = JobOutcome(
        KEY, "backup", "local:east", JobStatus.DONE, result=[1], runner="h:1", attempts=3
    )
    data = json.loads(json.dumps(outcome.to_dict()))
    assert data["attempts"] == 3
    assert JobOutcome.from_dict(data) == outcome
    del data["attempts"]  # a record written before attempts were counted
    assert JobOutcome.from_dict(data).attempts == 1


# --------------------------------------------------------------------------- retries


class Throttled:
    """A handler that raises :class:`TransientError` ``times`` times, then succeeds;
    ``other`` makes it raise that (not transient) instead."""

    def __init__(self, times: int, *, other: Exception | None = None) -> None:
        self.times = times
        self.other = other
        self.runs = 0

    def __call__(self, job: Job) -> str:
        self.runs += 1
        if self.other is not None:
            raise self.other
        if self.runs <= self.times:
            raise TransientError("SlowDown: reduce your request rate", region="aws:us-east-1")
        return "done"


def test_a_transient_failure_is_retried_with_growing_waits(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    handler = Throttled(3)
    waits: list[float] = []
    retry = RetryPolicy(attempts=5, first_delay=1.0, sleep=waits.append, jitter=lambda: 1.0)
    ledger = JobLedger(tmp_path)
    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), ledger, plugin_manager=pm, retry=retry
    )
    assert outcome.status is JobStatus.DONE and outcome.result == "done"
    assert outcome.attempts == 4 and handler.runs == 4
    assert waits == [1.0, 2.0, 4.0]
    recorded = ledger.record(KEY)
    assert recorded is not None and recorded.attempts == 4
    assert spy.calls == []  # it succeeded: no failure to report


def test_retries_stop_after_the_last_attempt(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    handler = Throttled(100)
    waits: list[float] = []
    ledger = JobLedger(tmp_path)
    outcome = execute_job(
        job(),
        JobHandlers({"backup": handler}),
        ledger,
        plugin_manager=pm,
        retry=RetryPolicy(attempts=3, sleep=waits.append),
    )
    assert outcome.status is JobStatus.FAILED
    assert outcome.attempts == 3 and handler.runs == 3 and len(waits) == 2
    assert outcome.error == "TransientError: [aws:us-east-1] SlowDown: reduce your request rate"
    assert ledger.record(KEY) is None
    failure = ledger.last_failure(KEY)
    assert failure is not None and failure.attempts == 3
    assert len(spy.calls) == 1 and isinstance(spy.calls[0][2], TransientError)
    assert ledger.holder(KEY) is None  # released


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RegionVaultError("access denied"), id="RegionVaultError"),
        pytest.param(OSError("disk full"), id="OSError"),
    ],
)
def test_other_errors_are_never_retried(tmp_path: Path, error: Exception) -> None:
    handler = Throttled(0, other=error)
    waits: list[float] = []
    outcome = execute_job(
        job(),
        JobHandlers({"backup": handler}),
        JobLedger(tmp_path),
        retry=RetryPolicy(sleep=waits.append),
    )
    assert outcome.status is JobStatus.FAILED and outcome.attempts == 1
    assert handler.runs == 1 and waits == []


def test_no_retry_runs_once(tmp_path: Path) -> None:
    handler = Throttled(1)
    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), JobLedger(tmp_path), retry=NO_RETRY
    )
    assert outcome.status is JobStatus.FAILED and outcome.attempts == 1 and handler.runs == 1


def test_the_key_stays_locked_while_a_retry_waits(tmp_path: Path) -> None:
    handler = Throttled(1)
    seen: list[JobOutcome] = []

    def sleep(seconds: float) -> None:
        # another runner, sharing the state directory, comes for the key during the wait
        seen.append(execute_job(job(), JobHandlers({"backup": handler}), JobLedger(tmp_path)))

    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), JobLedger(tmp_path), retry=RetryPolicy(sleep=sleep)
    )
    assert [o.status for o in seen] == [JobStatus.BUSY] and seen[0].attempts == 0
    assert outcome.status is JobStatus.DONE and outcome.attempts == 2
    assert handler.runs == 2  # both runs were the first runner's


def test_a_lock_lost_during_the_wait_makes_the_key_busy(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    handler = Throttled(5)
    ledger = JobLedger(tmp_path)

    def sleep(seconds: float) -> None:
        # the lock expired and another runner broke it and took the key
        ledger._path("locks", KEY, ".lock").unlink()
        write_lock(ledger, KEY, token="another-runner", host="elsewhere", pid=4242)

    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), ledger, plugin_manager=pm,
        retry=RetryPolicy(sleep=sleep),
    )  # fmt: skip
    # the key is another runner's now, which may well finish it: nothing failed here
    assert outcome.status is JobStatus.BUSY and outcome.attempts == 1
    assert outcome.runner == "elsewhere:4242" and outcome.error is None
    assert handler.runs == 1
    assert ledger.last_failure(KEY) is None and spy.calls == []
    holder = ledger.holder(KEY)
    assert holder is not None and holder["token"] == "another-runner"  # not released by us


class PlainLock:
    """A lock of the Ledger protocol as it was before renew(): release only."""

    def __init__(self, released: list[str]) -> None:
        self.released = released

    def release(self) -> None:
        self.released.append("released")


class PlainLedger:
    """A minimal in-memory Ledger whose locks are :class:`PlainLock` (or ``lock_factory``'s)."""

    def __init__(self, lock_factory: Any = None) -> None:
        self.done: dict[str, JobOutcome] = {}
        self.failed: dict[str, JobOutcome] = {}
        self.released: list[str] = []
        self.lock_factory = lock_factory or (lambda: PlainLock(self.released))

    def record(self, key: str) -> JobOutcome | None:
        return self.done.get(key)

    def acquire(self, key: str) -> Any:
        return self.lock_factory()

    def holder(self, key: str) -> None:
        return None

    def mark_done(self, outcome: JobOutcome) -> None:
        self.done[outcome.key] = outcome

    def mark_failed(self, outcome: JobOutcome) -> None:
        self.failed[outcome.key] = outcome


def test_a_lock_without_renew_counts_as_held(tmp_path: Path) -> None:
    ledger = PlainLedger()
    handler = Throttled(2)
    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), ledger, retry=RetryPolicy(sleep=lambda s: None)
    )
    assert outcome.status is JobStatus.DONE and outcome.attempts == 3
    assert KEY in ledger.done and ledger.released == ["released"]


def test_a_renew_that_raises_ends_the_job_and_never_escapes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenLock(PlainLock):
        def renew(self) -> bool:
            raise RuntimeError("lock service down")

    ledger = PlainLedger()
    ledger.lock_factory = lambda: BrokenLock(ledger.released)
    handler = Throttled(2)
    outcome = execute_job(
        job(), JobHandlers({"backup": handler}), ledger, retry=RetryPolicy(sleep=lambda s: None)
    )
    # whether the lock is still held cannot be told: not run again here
    assert outcome.status is JobStatus.FAILED and outcome.attempts == 1 and handler.runs == 1
    assert outcome.error is not None and "could not renew its lock" in outcome.error
    assert KEY in ledger.failed and ledger.released == ["released"]
    assert "lock service down" in caplog.text  # logged, with its traceback


def test_a_stop_ends_a_retry_wait_at_once(tmp_path: Path) -> None:
    spy = FailureSpy()
    pm = make_plugin_manager(load_entry_points=False, plugins=[spy])
    stop = threading.Event()

    class StopsDuringTheWait(Throttled):
        def __call__(self, job: Job) -> str:
            # SIGTERM arrives a moment after the failure, while the job waits to retry
            threading.Timer(0.05, stop.set).start()
            return super().__call__(job)

    handler = StopsDuringTheWait(5)
    ledger = JobLedger(tmp_path)
    # an hour's wait (time.sleep, the default), which only the stop can cut short
    retry = RetryPolicy(first_delay=3600.0, max_delay=3600.0)
    outcomes: list[JobOutcome] = []
    with ThreadExecutor(
        JobHandlers({"backup": handler}), ledger, plugin_manager=pm, retry=retry, stop=stop
    ) as executor:
        runner = threading.Thread(target=lambda: outcomes.extend(executor.run([job()])))
        runner.daemon = True
        runner.start()
        runner.join(timeout=60)  # bounded; without the stop it would wait for an hour
        assert not runner.is_alive(), "the retry wait did not end when stop was set"
    (outcome,) = outcomes
    assert outcome.status is JobStatus.STOPPED and outcome.attempts == 1 and handler.runs == 1
    assert outcome.error is not None and outcome.error.startswith("stopped while waiting")
    assert "SlowDown" in outcome.error  # the failure it was waiting to retry
    # the runner stopped; the job did not fail: no failure record, no alert
    assert ledger.last_failure(KEY) is None and spy.calls == []
    assert ledger.record(KEY) is None and ledger.holder(KEY) is None


def test_the_thread_executor_retries_as_told(tmp_path: Path) -> None:
    handler = Throttled(2)
    waits: list[float] = []
    retry = RetryPolicy(sleep=waits.append)
    with ThreadExecutor(JobHandlers({"backup": handler}), JobLedger(tmp_path), retry=retry) as ex:
        (outcome,) = ex.run([job()])
    assert outcome.status is JobStatus.DONE and outcome.attempts == 3 and len(waits) == 2


def test_waits_are_jittered_and_bounded() -> None:
    error = TransientError("throttled")
    low = RetryPolicy(first_delay=2.0, max_delay=10.0, jitter=lambda: 0.0)
    high = RetryPolicy(first_delay=2.0, max_delay=10.0, jitter=lambda: 0.999)
    for retry, delay in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (19, 10.0)]:
        assert low.wait(retry, error) == delay / 2  # never less than half the delay
        assert delay / 2 < high.wait(retry, error) < delay  # never more than all of it
    asked = TransientError("throttled", retry_after=7.0)
    assert low.wait(1, asked) == 7.0  # the service's Retry-After, when longer
    assert low.wait(1, TransientError("throttled", retry_after=3600)) == 10.0  # but bounded
    assert RetryPolicy().wait(1, error) <= 2.0  # the defaults: about 2, 4, 8, 16 seconds


@pytest.mark.parametrize(
    "bad",
    [
        {"attempts": 0},
        {"attempts": 1000},
        {"first_delay": -1.0},
        {"first_delay": 5.0, "max_delay": 1.0},
        {"multiplier": 0.5},
    ],
)
def test_bad_retry_policies_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(RegionVaultError, match="retry"):
        RetryPolicy(**bad)
