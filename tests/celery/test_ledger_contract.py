"""The ledger contract, run over both ledgers: JobLedger (files in a state directory) and
RedisLedger (a real redis-server). A done key never runs again; a held key is refused to
every other runner until its holder releases it or dies and its lock_ttl runs out; renewal
keeps a live holder's lock; a holder whose lock expired and was taken can neither renew nor
release the new holder's; two processes of several threads racing on 50 keys never hold one
key twice at once. Every wait is bounded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery_world import LedgerKind
from regionvault.core.pipeline.executor import NO_RETRY, ThreadExecutor, execute_job
from regionvault.core.pipeline.jobs import Job, JobHandlers, JobOutcome, JobStatus, backup_job

HERE = Path(__file__).resolve().parent
SLOT = datetime(2026, 11, 25, tzinfo=UTC)
KEY = "backup/local:east/i-abc/2026-11-25T00:00Z"


def job(instance: str = "i-abc") -> Job:
    return backup_job("local:east", instance, SLOT)


class Counter:
    def __init__(self) -> None:
        self.runs: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> dict[str, Any]:
        with self.lock:
            self.runs.append(job.key)
        return {"recovery_point": "rp-1"}


def wait_for(predicate: Any, seconds: float, step: float = 0.02) -> float:
    """Poll ``predicate`` until true (bounded); the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    pytest.fail(f"not true within {seconds} s")


def child(script: str, *args: str) -> subprocess.Popen[str]:
    """A Python child running ``script`` with celery_world importable."""
    prelude = f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], seconds: float = 30) -> str:
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(seconds)
    if not got or not got[0]:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the child said nothing within {seconds} s: {err}")
    return got[0].strip()


# --------------------------------------------------------------------------- records


def test_a_done_key_never_runs_again(ledgers: LedgerKind) -> None:
    handler = Counter()
    handlers = JobHandlers({"backup": handler})
    first = execute_job(job(), handlers, ledgers())
    again = execute_job(job(), handlers, ledgers())  # another runner, the same store
    assert first.status is JobStatus.DONE
    assert again.status is JobStatus.REPLAYED and again.result == first.result
    assert handler.runs == [KEY]
    recorded = ledgers().record(KEY)
    assert recorded is not None and recorded.status is JobStatus.DONE
    assert recorded.runner == first.runner and recorded.finished_at == first.finished_at


def test_a_failure_is_kept_until_the_key_is_done(ledgers: LedgerKind) -> None:
    ledger = ledgers()
    calls: list[int] = []

    def flaky(job: Job) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("vault unreachable")
        return "ok"

    handlers = JobHandlers({"backup": flaky})
    failed = execute_job(job(), handlers, ledger, retry=NO_RETRY)
    assert failed.status is JobStatus.FAILED
    assert ledger.record(KEY) is None
    last = ledgers().last_failure(KEY)
    assert last is not None and last.error == "OSError: vault unreachable"
    assert execute_job(job(), handlers, ledger).status is JobStatus.DONE
    assert ledger.last_failure(KEY) is None


def test_forget_and_prune(ledgers: LedgerKind) -> None:
    ledger = ledgers()
    handler = Counter()
    handlers = JobHandlers({"backup": handler})
    execute_job(job(), handlers, ledger)
    ledger.forget(KEY)
    assert ledger.record(KEY) is None
    execute_job(job(), handlers, ledger)
    assert ledger.prune(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert ledger.record(KEY) is not None
    assert ledger.prune(datetime.now(UTC) + timedelta(days=1)) == 1
    assert ledger.record(KEY) is None
    execute_job(job(), handlers, ledger)
    assert handler.runs == [KEY] * 3


def test_records_keep_what_outcomes_carry(ledgers: LedgerKind) -> None:
    ledger = ledgers()
    outcome = JobOutcome(
        KEY,
        "backup",
        "local:east",
        JobStatus.DONE,
        result={"recovery_point": "rp-1", "sizes": [1, 2.5, None]},
        started_at=datetime(2026, 11, 25, 0, 1, tzinfo=UTC),
        finished_at=datetime(2026, 11, 25, 0, 2, tzinfo=UTC),
        runner="host:1",
        attempts=3,
    )
    ledger.mark_done(outcome)
    assert ledgers().record(KEY) == outcome


# --------------------------------------------------------------------------- locks


def test_a_held_key_is_refused_to_a_second_runner(ledgers: LedgerKind) -> None:
    mine = ledgers().acquire(KEY)
    assert mine is not None
    try:
        other = ledgers()
        assert other.acquire(KEY) is None
        holder = other.holder(KEY)
        assert holder is not None
        assert holder["host"] == os.uname().nodename and holder["pid"] == os.getpid()
        assert holder["process_start"].isdigit() and holder["expires_at"] > time.time()
        handler = Counter()
        busy = execute_job(job(), JobHandlers({"backup": handler}), other)
        assert busy.status is JobStatus.BUSY and handler.runs == []
        assert busy.runner == f"{os.uname().nodename}:{os.getpid()}"
    finally:
        mine.release()


def test_renewal_keeps_a_live_holders_lock(ledgers: LedgerKind) -> None:
    ttl = timedelta(seconds=1)
    mine = ledgers(lock_ttl=ttl)
    lock = mine.acquire(KEY)
    assert lock is not None
    try:
        other = ledgers(lock_ttl=ttl)
        deadline = time.monotonic() + 3 * ttl.total_seconds()
        while time.monotonic() < deadline:  # three lifetimes: renewed, never lost
            assert other.acquire(KEY) is None
            time.sleep(0.05)
        assert lock.renew() is True
    finally:
        lock.release()


def test_release_lets_another_take_it(ledgers: LedgerKind) -> None:
    lock = ledgers().acquire(KEY)
    assert lock is not None
    lock.release()
    lock.release()  # twice: nothing more happens
    other = ledgers()
    assert other.holder(KEY) is None
    again = other.acquire(KEY)
    assert again is not None
    again.release()


HOLDER = """
    import sys, time
    from celery_world import make_ledger

    kind, where, namespace, ttl, key = sys.argv[1:6]
    lock = make_ledger(kind, where, namespace, float(ttl)).acquire(key)
    print("held" if lock is not None else "refused", flush=True)
    sys.stdin.readline()  # wait for the test (which may kill or pause this process first)
    print("renewed" if lock.renew() else "lost", flush=True)
    lock.release()
    print("released", flush=True)
"""


def test_a_sigkilled_holders_lock_is_taken_after_its_ttl(ledgers: LedgerKind) -> None:
    ttl = 2.0
    holder = child(HOLDER, *ledgers.spec, str(ttl), KEY)
    try:
        assert read_line(holder) == "held"
        holder.kill()
        holder.wait(30)
        killed = time.monotonic()
        ledger = ledgers(lock_ttl=timedelta(seconds=ttl))
        taken: list[Any] = []

        def take() -> bool:
            lock = ledger.acquire(KEY)
            if lock is not None:
                taken.append(lock)
            return lock is not None

        if ledgers.frees_dead_holders_at_once:
            # JobLedger: a dead pid of this machine holds nothing, whatever its expiry
            assert take()
        else:
            # Redis: the lock outlives its holder until lock_ttl after its last renewal
            # (renewed every ttl/3), and not a moment longer
            left = ledger.holder(KEY)["expires_at"] - time.time()
            assert 0 < left <= ttl
            assert not take()
            wait_for(take, ttl + 5)
            waited = time.monotonic() - killed
            assert left - 0.1 <= waited <= left + 3, (left, waited)
        taken[0].release()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=30)


def test_an_expired_holder_cannot_renew_or_release_the_new_holders_lock(
    ledgers: LedgerKind,
) -> None:
    # The old holder is paused (SIGSTOP: a stalled machine, a long GC) past its lock_ttl, so
    # its renewals stop and the lock expires; another runner takes it; the old one resumes.
    ttl = 1.0
    holder = child(HOLDER, *ledgers.spec, str(ttl), KEY)
    try:
        assert read_line(holder) == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        ledger = ledgers(lock_ttl=timedelta(seconds=ttl))
        taken: list[Any] = []

        def take() -> bool:
            lock = ledger.acquire(KEY)
            if lock is not None:
                taken.append(lock)
            return lock is not None

        wait_for(take, ttl + 5)
        mine = taken[0]
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_line(holder) == "lost"
        assert read_line(holder) == "released"
        assert holder.wait(30) == 0
        now = ledger.holder(KEY)
        assert now is not None and now["token"] == mine.token
        assert mine.renew() is True
        assert ledgers().acquire(KEY) is None
        mine.release()
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
        holder.communicate(timeout=30)


RACER = """
    import os, random, sys, threading, time
    from celery_world import make_ledger

    kind, where, namespace, log_path, go, keys, threads, rounds = sys.argv[1:9]
    ledger = make_ledger(kind, where, namespace, 30.0)
    keys = [f"race/{n}" for n in range(int(keys))]
    for _ in range(3000):  # start together (bounded: 30 s)
        if os.path.exists(go):
            break
        time.sleep(0.01)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    counts = {"taken": 0, "refused": 0}

    def log(event, key, who):
        os.write(fd, f"{event} {key} {who} {time.monotonic_ns()}\\n".encode())

    def race(n):
        order = list(keys)
        random.Random(n).shuffle(order)
        who = f"{os.getpid()}-{n}"
        for _ in range(int(rounds)):
            for key in order:
                lock = ledger.acquire(key)
                if lock is None:
                    counts["refused"] += 1
                    continue
                log("acq", key, who)
                counts["taken"] += 1
                time.sleep(random.random() / 1000)
                log("rel", key, who)
                lock.release()

    workers = [threading.Thread(target=race, args=(n,)) for n in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(counts["taken"], counts["refused"], flush=True)
"""


def test_processes_and_threads_racing_on_50_keys_hold_each_once_at_a_time(
    ledgers: LedgerKind, tmp_path: Path
) -> None:
    log_path, go = tmp_path / "events", tmp_path / "go"
    racers = [child(RACER, *ledgers.spec, str(log_path), str(go), "50", "4", "3") for _ in range(2)]
    go.touch()
    taken = refused = 0
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        t, r = (int(x) for x in out.split())
        taken, refused = taken + t, refused + r
    events: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for line in log_path.read_text().splitlines():
        event, key, who, when = line.split()
        events[key].append((int(when), event, who))
    assert len(events) == 50
    assert taken + refused == 2 * 4 * 3 * 50
    assert refused > 0  # they did race
    for key, seen in events.items():
        holder = None
        for _, event, who in sorted(seen):
            if event == "acq":
                assert holder is None, f"{key}: {who} took it while {holder} held it"
                holder = who
            else:
                assert holder == who, f"{key}: {who} released what {holder} held"
                holder = None
        assert holder is None
    assert sum(1 for seen in events.values() for e in seen if e[1] == "acq") == taken


def test_two_runners_at_once_run_a_job_once(ledgers: LedgerKind) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow(job: Job) -> str:
        runs.append(job.key)
        started.set()
        assert release.wait(10)
        return "ok"

    a = ThreadExecutor(JobHandlers({"backup": slow}), ledgers())
    b = ThreadExecutor(JobHandlers({"backup": slow}), ledgers())
    with a, b:
        running = a.submit(job())
        assert started.wait(10)
        busy = b.submit(job()).result(timeout=10)
        release.set()
        done = running.result(timeout=10)
        later = b.submit(job()).result(timeout=10)
    assert (busy.status, done.status, later.status) == (
        JobStatus.BUSY,
        JobStatus.DONE,
        JobStatus.REPLAYED,
    )
    assert runs == [KEY]


def test_many_jobs_from_two_executors_each_run_once(ledgers: LedgerKind) -> None:
    handler = Counter()
    jobs = [job(f"i-{n}") for n in range(40)]
    shuffled = list(jobs)
    random.Random(7).shuffle(shuffled)
    a = ThreadExecutor(JobHandlers({"backup": handler}), ledgers(), max_workers=4)
    b = ThreadExecutor(JobHandlers({"backup": handler}), ledgers(), max_workers=4)
    with a, b:
        fa = [a.submit(j) for j in jobs]
        fb = [b.submit(j) for j in shuffled]
        outcomes = [f.result(timeout=60) for f in fa + fb]
        # what was busy the first time is replayed now
        again = a.run(jobs) + b.run(jobs)
    assert sorted(handler.runs) == sorted(j.key for j in jobs)
    assert {o.status for o in outcomes} <= {JobStatus.DONE, JobStatus.BUSY, JobStatus.REPLAYED}
    assert {o.status for o in again} == {JobStatus.REPLAYED}
