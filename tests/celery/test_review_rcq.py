"""Regressions of the review of regions-as-queues (#18, review rcq): namespaced queues (#2),
bounded waits (#4), plan records that expire and a prune that works on a full Redis (#6),
stale deliveries (#8), an IPv6 broker and the worker's ledger errors (#9), a paused holder's
lock (#1, the ledger's side). Each test has its own redis-server and workers, stopped by PID."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from cluster import EAST, Cluster
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.jobs import (
    PLAN_BACKUPS,
    Job,
    JobOutcome,
    JobStatus,
    plan_job,
    tag_job,
)
from regionvault.core.site import Region, Site
from regionvault.plugins.celery import plugin as celery_plugin
from regionvault.plugins.celery.kind import CELERY
from regionvault.plugins.celery.ledger import RedisLedger
from regionvault.plugins.celery.redis_server import RedisServer
from regionvault.plugins.celery.settings import parse_settings, queue_of
from site_support import open_site, site_toml
from test_celery_executor import _cluster, _dataset

pytest.importorskip(
    "celery", reason="the celery tests need celery[redis]: pip install -e '.[test]'"
)


@pytest.fixture
def own_redis(redis_binary: None, tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server
    assert not server.running


def _done(key: str, **result: object) -> JobOutcome:
    now = datetime.now(UTC)
    return JobOutcome(
        key, "plan-backups", EAST, JobStatus.DONE, result=result, started_at=now, finished_at=now
    )


# ---- #2: one site's queues are its own


def test_queues_carry_the_sites_namespace() -> None:
    assert queue_of(EAST, "siteX") == "siteX.region.local:east"
    assert queue_of(EAST, "siteX") != queue_of(EAST, "siteY")


def test_two_sites_sharing_a_redis_never_run_each_others_jobs(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    """Site X and site Y share one Redis, each with its namespace; only Y has a worker. X's
    plan is not answered by Y's worker over Y's site: it is given up for lack of X's
    workers (before the fix, Y's worker ran it and planned Y's instances for X)."""
    data = _dataset(tmp_path / "nf-data", 1, 10_000)
    x = _cluster(site, east, west, tmp_path, own_redis, data, queue_timeout="3s")
    ydir = tmp_path / "Y"
    ydir.mkdir()
    (ydir / "site.toml").write_text(
        site_toml(
            {EAST: ydir / "east", "local:west": ydir / "west"}, settings={"state_dir": ydir / "st"}
        )
    )
    ysite = open_site(ydir / "site.toml")
    ye, yw = ysite.region("east"), ysite.region("west")
    ye.compute.register_instance("site-Y-only-nf", data, tags={"backup": "1-7"})
    ye.sealer(), yw.sealer()
    ysite.close()
    y = Cluster(ydir, ye, yw, own_redis.url)
    try:
        y.start("east-1")
        with x.coordinator() as (_, executor):
            (out,) = executor.run([plan_job(PLAN_BACKUPS, EAST, datetime.now(UTC))])
        assert out.status is JobStatus.FAILED, out
        assert out.result == {"reason": "no-worker", "queue": f"{x.namespace}.region.{EAST}"}
        assert "site-Y-only-nf" not in str(out.result)
    finally:
        y.stop_all()
        x.stop_all()


# ---- #4: the coordinator's waits are bounded


def test_a_redis_that_is_down_does_not_hold_the_wait_past_its_deadline(
    tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            settings={"state_dir": tmp_path / "st"},
            extra=f'[executor]\nkind = "celery"\nbroker = "{own_redis.url}"\n'
            'queue_timeout = "1s"\n',
        )
    )
    caplog.set_level(logging.WARNING, logger="regionvault.plugins.celery.executor")
    with open_site(path, celery_plugin) as site, CELERY.executor(Engine(site), stop=None) as ex:
        future = ex.submit(tag_job(EAST, datetime.now(UTC)))  # no worker anywhere
        time.sleep(0.2)
        own_redis.stop()
        outcome = future.result(timeout=15)
    assert outcome.status is JobStatus.FAILED, outcome
    assert (outcome.result or {}).get("reason") == "no-worker"
    warnings = [r for r in caplog.records if "reading job outcomes" in r.getMessage()]
    assert 1 <= len(warnings) <= 3, len(warnings)  # rate-limited, not one a poll


def test_run_timeout_is_parsed() -> None:
    settings = parse_settings({"broker": "redis://h:1/0", "queue_timeout": "1m"})
    assert settings.job_timeout == timedelta(minutes=1) + 2 * settings.visibility_timeout
    settings = parse_settings({"broker": "redis://h:1/0", "run_timeout": "2h"})
    assert settings.job_timeout == timedelta(hours=2)
    from regionvault.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"executor\.run_timeout"):
        parse_settings({"broker": "redis://h:1/0", "queue_timeout": "1h", "run_timeout": "30m"})


def test_run_timeout_gives_up_a_job_that_started_and_never_ends(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """A job whose worker took it and holds its key's lock, but never answers: given up at
    run_timeout (before, a started job was waited for without end)."""
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            settings={"state_dir": tmp_path / "st"},
            extra=f'[executor]\nkind = "celery"\nbroker = "{own_redis.url}"\n'
            'queue_timeout = "1s"\nrun_timeout = "3s"\nlock_ttl = "1s"\n'
            'visibility_timeout = "1h"\n',
        )
    )
    with open_site(path, celery_plugin) as site, CELERY.executor(Engine(site), stop=None) as ex:
        job = tag_job(EAST, datetime.now(UTC))
        lock = ex.ledger.acquire(job.key)  # a live holder, renewing
        assert lock is not None
        started = time.monotonic()
        future = ex.submit(job)
        for item in list(ex._inflight.values()):
            item.started = True  # as a worker's STARTED would
        outcome = future.result(timeout=20)
        took = time.monotonic() - started
        lock.release()
    assert outcome.status is JobStatus.FAILED, outcome
    assert "run_timeout" in (outcome.error or "")
    assert 2.5 < took < 10, took


def test_a_started_job_lost_with_redis_is_given_up(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    """A worker dies mid-backup and Redis restarts empty (no AOF, or a failover): no queue
    holds the job any more. Before the fix the coordinator waited forever; now it gives the
    job up as lost once its lock has been gone for lock_ttl."""
    data = _dataset(tmp_path / "nf-data", 6, 8_000_000)
    cluster = _cluster(site, east, west, tmp_path, own_redis, data)  # lock_ttl 2s
    try:
        (w1,) = cluster.start("east-1")
        with cluster.coordinator() as (_, executor):
            (plan,) = executor.run([plan_job(PLAN_BACKUPS, EAST, datetime.now(UTC))])
            (backup,) = [Job.from_dict(j) for j in plan.result["jobs"]]
            future = executor.submit(backup)
            deadline = time.monotonic() + 30
            while not any(i.started for i in list(executor._inflight.values())):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            w1.kill()
            own_redis.restart()
            cluster.start("east-2")
            outcome = future.result(timeout=30)
        assert outcome.status is JobStatus.FAILED, outcome
        assert (outcome.error or "").startswith("lost"), outcome.error
    finally:
        cluster.stop_all()


# ---- #6: records that expire; prune on a Redis out of memory


def test_a_record_marked_with_expires_vanishes_with_its_index_entry(
    own_redis: RedisServer,
) -> None:
    with RedisLedger(own_redis.url, namespace="s") as ledger:
        ledger.mark_done(_done("plan-backups/a"), expires=timedelta(milliseconds=300))
        ledger.mark_done(_done("kept"))
        assert ledger.record("plan-backups/a") is not None
        time.sleep(0.5)
        assert ledger.record("plan-backups/a") is None
        ledger.mark_done(_done("plan-backups/b"), expires=timedelta(days=1))  # tidies
        admin = redis_py.Redis.from_url(own_redis.url)
        members = {m.decode() for m in admin.zrange("s:finished", 0, -1)}
        assert members == {"kept", "plan-backups/b"}
        assert 0 < admin.pttl("s:done:plan-backups/b") <= 86_400_000
        assert admin.pttl("s:done:kept") == -1
        admin.close()


def test_prune_frees_a_redis_that_is_out_of_memory(own_redis: RedisServer) -> None:
    admin = redis_py.Redis.from_url(own_redis.url)
    admin.config_set("maxmemory-policy", "noeviction")
    with RedisLedger(own_redis.url, namespace="s") as ledger:
        for i in range(300):
            ledger.mark_done(_done(f"plan-backups/{i}", pad="x" * 2000))
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", str(used - 100_000))
        with pytest.raises(Exception, match=r"OOM|memory"):
            ledger.mark_done(_done("one-more", pad="x" * 2000))
        # before the fix prune's MULTI was refused here
        assert ledger.prune(datetime.now(UTC) + timedelta(days=1), limit=100) == 100
        assert ledger.prune(datetime.now(UTC) + timedelta(days=1)) == 200
        admin.config_set("maxmemory", "0")
        assert admin.zcard("s:finished") == 0
    admin.close()


def test_a_redis_that_may_evict_is_warned_of(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = redis_py.Redis.from_url(own_redis.url)
    with RedisLedger(own_redis.url, namespace="s") as ledger:
        admin.config_set("maxmemory-policy", "volatile-lru")
        assert ledger.warn_if_evicting()
        assert "maxmemory-policy volatile-lru" in caplog.text
        admin.config_set("maxmemory-policy", "noeviction")
        assert not ledger.warn_if_evicting()
    admin.close()


# ---- #1 (the ledger's side): a holder that loses its lock knows it


def test_a_lock_taken_by_another_sets_its_old_holders_lost_event(
    own_redis: RedisServer,
) -> None:
    a = RedisLedger(own_redis.url, namespace="s", lock_ttl=timedelta(milliseconds=600))
    b = RedisLedger(own_redis.url, namespace="s", lock_ttl=timedelta(milliseconds=600))
    try:
        lock = a.acquire("k")
        assert lock is not None and not lock.lost.is_set()
        admin = redis_py.Redis.from_url(own_redis.url)
        admin.delete("s:lock:k")  # evicted, or lost in a restart, while A is paused
        admin.close()
        second = b.acquire("k")
        assert second is not None
        assert lock.lost.wait(3)  # the renewer saw it
        assert lock.renew() is False
        second.release()
        lock.release()
    finally:
        a.close()
        b.close()


# ---- #9


def test_an_ipv6_broker_keeps_its_brackets_with_a_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RV_TEST_PW", "s3cret")
    settings = parse_settings({"broker": "redis://[::1]:6379/0", "password_env": "RV_TEST_PW"})
    url = settings.broker_url()
    assert url == "redis://:s3cret@[::1]:6379/0"
    from urllib.parse import urlsplit

    assert urlsplit(url).port == 6379


# ---- the worker's task on its own (#2, #8, #9): a fake task and worker context


class _Request:
    def __init__(self, retries: int = 0) -> None:
        self.id = "task-1"
        self.retries = retries
        self.hostname = "east-1@test"


class _Retry(Exception):
    pass


class _Task:
    def __init__(self, retries: int = 0) -> None:
        self.request = _Request(retries)
        self.retried: dict[str, object] = {}

    def retry(self, **options: object) -> _Retry:
        self.retried = options
        return _Retry()


class _Ledger:
    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.failed: list[JobOutcome] = []

    def claim(self, name: str, value: str, *, ttl: timedelta) -> str:
        if self.refuse is not None:
            raise self.refuse
        return value

    def mark_failed(self, outcome: JobOutcome) -> None:
        self.failed.append(outcome)

    def holder(self, key: str) -> None:
        return None


class _Engine:
    def __init__(self) -> None:
        self.problems = ["hook quiesce of nf-1 failed"]

    def take_hook_problems(self) -> list[str]:
        taken, self.problems = self.problems, []
        return taken


class _Context:
    def __init__(self, ledger: _Ledger) -> None:
        from types import SimpleNamespace

        self.region = EAST
        self.settings = parse_settings(
            {"broker": "redis://h:1/0", "namespace": "siteX", "queue_timeout": "1m"}
        )
        self._opened = SimpleNamespace(
            ledger=ledger,
            engine=_Engine(),
            handlers={},
            site=SimpleNamespace(plugin_manager=None),
        )

    def opened(self) -> object:
        return self._opened


Run = Callable[..., tuple[JobOutcome, dict[str, Any]]]


@pytest.fixture
def worker_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    from regionvault.plugins.celery import app

    def run(
        ledger: _Ledger, task: _Task | None = None, **kwargs: object
    ) -> tuple[JobOutcome, dict[str, object]]:
        monkeypatch.setattr(app, "_worker", _Context(ledger))
        reply = app._run_job(task or _Task(), tag_job(EAST, datetime.now(UTC)).to_dict(), **kwargs)
        return JobOutcome.from_dict(reply["outcome"]), reply

    yield run


def test_a_worker_refuses_a_job_of_another_site(worker_task: Run) -> None:
    outcome, _ = worker_task(_Ledger(), namespace="siteY", sent_at=time.time())
    assert outcome.status is JobStatus.FAILED
    assert "'siteY'" in (outcome.error or "") and "'siteX'" in (outcome.error or "")
    outcome, _ = worker_task(_Ledger())  # an old coordinator's
    assert outcome.status is JobStatus.FAILED


def test_a_worker_refuses_a_stale_first_delivery(worker_task: Run) -> None:
    outcome, _ = worker_task(_Ledger(), namespace="siteX", sent_at=time.time() - 3600)
    assert outcome.status is JobStatus.STOPPED
    assert "queue_timeout" in (outcome.error or "")


def test_a_ledger_that_refuses_fails_the_job_with_its_cause(worker_task: Run) -> None:
    from regionvault.core.errors import RegionVaultError

    ledger = _Ledger(RegionVaultError("job ledger at redis://h:1/0: OOM command not allowed"))
    outcome, _ = worker_task(ledger, namespace="siteX", sent_at=time.time())
    assert outcome.status is JobStatus.FAILED
    assert "OOM" in (outcome.error or "")
    assert [o.key for o in ledger.failed] == [outcome.key]  # recorded when it can be


def test_hook_problems_taken_by_a_busy_delivery_go_along_with_its_retry(
    worker_task: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.plugins.celery import app

    def busy(job: Job, *args: object, **kwargs: object) -> JobOutcome:
        return JobOutcome(job.key, job.kind, job.region, JobStatus.BUSY, attempts=0)

    monkeypatch.setattr(app, "execute_job", busy)
    task = _Task()
    with pytest.raises(_Retry):
        worker_task(_Ledger(), task, namespace="siteX", sent_at=time.time())
    kwargs: dict[str, Any] = task.retried["kwargs"]  # type: ignore[assignment]
    assert kwargs == {
        "namespace": "siteX",
        "sent_at": kwargs["sent_at"],
        "problems": ["hook quiesce of nf-1 failed"],
    }
    assert task.retried["expires"] is None  # a retry waits for a live holder: not stale

    def done(job: Job, *args: object, **kwargs: object) -> JobOutcome:
        return JobOutcome(job.key, job.kind, job.region, JobStatus.DONE)

    monkeypatch.setattr(app, "execute_job", done)
    _, reply = worker_task(
        _Ledger(),
        _Task(retries=1),
        **{**kwargs, "sent_at": time.time() - 3600},
    )
    assert reply["problems"][:1] == ["hook quiesce of nf-1 failed"]


# ---- #1 and #3 through Redis and real processes (the core's fence and copy check)

_RUNNER = """
import json, os, signal, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from regionvault.core.pipeline import Engine, job_handlers
from regionvault.core.pipeline.executor import execute_job
from regionvault.core.pipeline.jobs import backup_job
from regionvault.plugins.celery.ledger import RedisLedger
from site_support import open_site

site_file, url, namespace, instance, pause = sys.argv[1:6]
site = open_site(Path(site_file))
engine = Engine(site)
compute = engine.region("local:east").compute
real = compute.capture

def capture(*args, **kwargs):
    if pause == "pause":
        print("paused", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # a VM pause: no renewal while it lasts
    return real(*args, **kwargs)

compute.capture = capture
ledger = RedisLedger(url, namespace=namespace, lock_ttl=timedelta(seconds=2))
job = backup_job("local:east", instance, datetime(2026, 12, 7, tzinfo=UTC))
out = execute_job(job, job_handlers(engine), ledger)
print(json.dumps({"status": out.status.value, "result": out.result, "runner": out.runner}))
site.close()
"""


def test_a_paused_holder_records_nothing_and_its_slot_has_one_point(
    site: Site, east: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    """Runner A stops (SIGSTOP) inside the capture for longer than lock_ttl; runner B takes
    the key and backs the slot up; A is continued. Before the fence both committed, two
    points for one slot, and A's record overwrote B's."""
    import json
    import os
    import signal
    import subprocess
    import sys

    data = _dataset(tmp_path / "nf-data", 1, 300_000)
    instance = east.compute.register_instance("nf-1", data, tags={"backup": "1-7"}).id
    east.sealer()
    site_file = Path(str(site.config.source))
    site.close()
    here = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def runner(mode: str) -> subprocess.Popen[str]:
        args = [str(site_file), own_redis.url, "paused", instance, mode]
        return subprocess.Popen(
            [sys.executable, "-c", _RUNNER, *args], stdout=subprocess.PIPE, text=True, env=env
        )

    a = runner("pause")
    try:
        assert a.stdout is not None
        assert a.stdout.readline().strip() == "paused"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{a.pid}/stat").read_text().split()[2] not in ("T", "t"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(3)  # longer than lock_ttl: A's lock expires
        b = runner("run")
        b_out, _ = b.communicate(timeout=120)
        second = json.loads(b_out.strip().splitlines()[-1])
        assert second["status"] == "done", second
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
    a_out, _ = a.communicate(timeout=120)
    first = json.loads(a_out.strip().splitlines()[-1])
    assert first["status"] == "busy", first  # it lost its lock while running
    with RedisLedger(own_redis.url, namespace="paused") as ledger:
        record = ledger.record(backup_job_key(instance))
    assert record is not None and record.runner == second["runner"]
    with open_site(site_file) as again:
        points = Engine(again).points(EAST)
    assert [p.id for p in points] == [second["result"]["point"]]


def backup_job_key(instance: str) -> str:
    from regionvault.core.pipeline.jobs import backup_job

    return backup_job(EAST, instance, datetime(2026, 12, 7, tzinfo=UTC)).key


def test_a_forged_copy_on_the_queues_is_refused_by_the_source_regions_workers(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    """Replication is east -> west only. Anyone who can write to the Redis can put on west's
    queue the jobs that copy a west point to east; west's workers refuse them, naming the
    pair, and east receives nothing (before the check, east restored west's data)."""
    from regionvault.core.pipeline.jobs import backup_job, copy_jobs_for

    west_data = _dataset(tmp_path / "west-data", 1, 50_000, seed=7)
    inst = west.compute.register_instance("west-nf", west_data, tags={"backup": "1-7"})
    data = _dataset(tmp_path / "nf-data", 1, 10_000)
    cluster = _cluster(site, east, west, tmp_path, own_redis, data)
    try:
        cluster.start("east-1", "west-1")
        with cluster.coordinator() as (_, executor):
            (backup,) = executor.run([backup_job("local:west", inst.id, datetime.now(UTC))])
            assert backup.ok, backup.error
            point = backup.result["point"]
            forged = copy_jobs_for("local:west", point, EAST, expires_at=None)
            outcomes = [executor.run([job])[0] for job in forged]
        assert [o.status for o in outcomes] == [JobStatus.FAILED] * 4, outcomes
        offer = outcomes[0]
        assert "refused" in (offer.error or "") and f"local:west to {EAST}" in (offer.error or "")
    finally:
        cluster.stop_all()
    with open_site(cluster.files[EAST], celery_plugin) as east_site:
        copies = [p for p in Engine(east_site).points(EAST) if p.lineage is not None]
    assert copies == []
