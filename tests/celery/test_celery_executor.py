"""The Celery executor (issue #18): a tick of a two-region site through real ``regionvault
worker`` processes on a private redis-server, two workers per region; a worker SIGKILLed in
the middle of a backup; a region whose workers are all down; the ``[executor]`` table's
errors. Each test has its own redis-server and workers, all stopped by PID at its end."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cluster import EAST, WEST, Cluster, runner_pid
from regionvault.core.cli import cli
from regionvault.core.errors import ConfigError
from regionvault.core.pipeline import Engine, TickReport
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    PLAN_BACKUPS,
    PLAN_KINDS,
    Job,
    JobStatus,
    plan_job,
    tag_job,
)
from regionvault.core.plugins import executor_kinds, make_plugin_manager
from regionvault.core.site import Region, Site
from regionvault.plugins.celery import plugin as celery_plugin
from regionvault.plugins.celery.kind import CELERY
from regionvault.plugins.celery.redis_server import RedisServer
from regionvault.plugins.celery.settings import parse_settings
from repository_support import snapshot
from site_support import open_site, region_root, site_toml

pytest.importorskip(
    "celery", reason="the celery tests need celery[redis]: pip install -e '.[test]'"
)


@pytest.fixture
def own_redis(redis_binary: None, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (its queues hold no other test's jobs)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
    assert not server.running


def _dataset(root: Path, files: int, size: int, seed: int = 18) -> Path:
    rng = random.Random(seed)
    (root / "db").mkdir(parents=True)
    for i in range(files):
        (root / "db" / f"part-{i}.bin").write_bytes(rng.randbytes(size))
    (root / "conf.txt").write_text("apn = internet\n" * 300)
    return root


def _cluster(
    site: Site,
    east: Region,
    west: Region,
    tmp_path: Path,
    server: RedisServer,
    data: Path,
    **settings: str,
) -> Cluster:
    east.compute.register_instance("nf-1", data, tags={"backup": "1-7"})
    east.sealer(), west.sealer()  # each region's keys, made by its own provider
    site.close()
    return Cluster(tmp_path, east, west, server.url, **settings)


def _worked(report: TickReport) -> list[str]:
    return [
        o.kind
        for o in report.jobs
        if o.status is not JobStatus.REPLAYED and o.kind not in PLAN_KINDS
    ]


def test_a_tick_runs_entirely_through_each_regions_workers(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    data = _dataset(tmp_path / "nf-data", 3, 200_000)
    cluster = _cluster(site, east, west, tmp_path, own_redis, data)
    try:
        cluster.start("east-1", "east-2", "west-1", "west-2")
        with cluster.coordinator() as (service, _):
            report = service.tick()
        assert report.ok, (report.problems, [o.error for o in report.failures()])
        assert _worked(report) == [
            "tag",
            "tag",
            BACKUP,
            COPY_OFFER,
            COPY_REQUEST,
            COPY_SEND,
            COPY_COMMIT,
            COPY_RECEIPT,
            "retention",
            "retention",
        ]
        east_pids, west_pids = cluster.pids(EAST), cluster.pids(WEST)
        ran_by: dict[str, set[str]] = {}
        for outcome in report.jobs:
            pid = runner_pid(outcome.runner)
            home = EAST if pid in east_pids else WEST if pid in west_pids else None
            assert home is not None, (outcome.key, outcome.runner)
            ran_by.setdefault(outcome.kind, set()).add(home)
            # every job ran in the region runs_in names: a worker's region
            name = {**east_pids, **west_pids}[pid]
            ran_by.setdefault("workers", set()).add(name)
        for kind in (BACKUP, COPY_OFFER, COPY_SEND, COPY_RECEIPT):
            assert ran_by[kind] == {EAST}, kind
        for kind in (COPY_REQUEST, COPY_COMMIT):
            assert ran_by[kind] == {WEST}, kind
        for kind in PLAN_KINDS:
            assert ran_by[kind] == {EAST, WEST}, kind
        # the east workers' site holds no west key material: west's keys there are its
        # public sealing key alone
        east_site = cluster.files[EAST].read_text()
        assert str(region_root(west) / "keys") not in east_site
        (public,) = tmp_path.glob("public-of-west")
        assert sorted(p.name for p in (public / "keys").iterdir()) == ["sealing.pub"]

        # any machine of the site tells what ran where: the ledger in Redis, through status
        result = CliRunner().invoke(
            cli,
            ["--site", str(cluster.coordinator_file), "status", "--jobs", "100", "--json"],
        )
        assert result.exit_code == 0, result.output
        history = {row["key"]: row for row in json.loads(result.output)}
        for outcome in report.jobs:
            assert history[outcome.key]["runner"] == outcome.runner
        assert not cluster.nowhere.exists()

        # a job that fails for good comes back FAILED with its cause, run once, recorded once
        with cluster.coordinator() as (_, executor):
            # a job sent twice (two tasks, one key) does its work once: one runs it, the
            # other replays its record (or, finding the key held, waits and then replays)
            twice = plan_job(PLAN_BACKUPS, EAST, datetime.now(UTC))
            first, second = executor.run([twice, Job.from_json(twice.to_json())])
            assert sorted([first.status, second.status]) == [JobStatus.DONE, JobStatus.REPLAYED]
            assert first.result == second.result
            # a delivery that finds its key held by another runner comes back when the
            # holder's lock would expire, and runs it once the holder let go
            held = plan_job(PLAN_BACKUPS, WEST, datetime.now(UTC))
            lock = executor.ledger.acquire(held.key)
            assert lock is not None
            future = executor.submit(held)
            time.sleep(1.0)
            assert not future.done()
            lock.release()
            outcome = future.result(timeout=30)
            assert outcome.status is JobStatus.DONE, outcome
            assert runner_pid(outcome.runner) in cluster.pids(WEST)

            broken = Job("custom/local:east/1", "no-such-kind", EAST)
            (failed,) = executor.run([broken])
            ledger = executor.ledger
            assert failed.status is JobStatus.FAILED and failed.attempts == 1, failed
            assert "no-such-kind" in (failed.error or "")
            recorded = ledger.last_failure(broken.key)
            assert recorded is not None and recorded.error == failed.error
            assert ledger.record(broken.key) is None
    finally:
        cluster.stop_all()

    # west's keys alone restore the copy, byte-exact, with east gone
    point_id = next(o.result["point"] for o in report.jobs if o.kind == BACKUP)
    commit = next(o for o in report.jobs if o.kind == COPY_COMMIT)
    shutil.rmtree(region_root(east))
    with open_site(cluster.files[WEST], celery_plugin) as west_site:
        engine = Engine(west_site)
        (copy,) = [p for p in engine.repository(WEST).points() if p.lineage is not None]
        assert copy.id == commit.result["copy"]
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point_id
        engine.restore(copy.id, region=WEST, target=tmp_path / "restored")
    assert snapshot(tmp_path / "restored") == snapshot(data)


@pytest.mark.slow
def test_a_region_whose_workers_are_all_down_delays_only_its_own_jobs(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    data = _dataset(tmp_path / "nf-data", 2, 100_000)
    cluster = _cluster(site, east, west, tmp_path, own_redis, data, queue_timeout="2s")
    try:
        cluster.start("east-1", "east-2")
        started = time.monotonic()
        with cluster.coordinator() as (service, _):
            report = service.tick()
        took = time.monotonic() - started
        # east did all it could: its tag, backup and offer, and its retention
        done = {o.kind for o in report.jobs if o.ok and o.region == EAST}
        assert {"tag", BACKUP, COPY_OFFER, "retention"} <= done, done
        # west's jobs failed, each naming its queue, after the queue timeout, not a hang
        west_failed = [o for o in report.failures() if o.region == WEST]
        assert west_failed and all("region.local:west" in (o.error or "") for o in west_failed)
        assert not [o for o in report.failures() if o.region == EAST]
        # given up once, for lack of workers: west sits out the rest of the tick, so the tick
        # costs one queue_timeout, not one a round (review rcq #5: 7 rounds before)
        assert [o.kind for o in west_failed] == ["tag"], [o.kind for o in west_failed]
        (tag,) = west_failed
        assert tag.result == {"reason": "no-worker", "queue": f"{cluster.namespace}.region.{WEST}"}
        assert took < 60, took

        # west's workers come up: the jobs given up on are not run (the claims), and the next
        # tick moves the copy on
        cluster.start("west-1", "west-2")
        with cluster.coordinator() as (service, _):
            again = service.tick()
        assert again.ok, (again.problems, [o.error for o in again.failures()])
        assert {COPY_REQUEST, COPY_SEND, COPY_COMMIT, COPY_RECEIPT} <= set(_worked(again))
        logs = "".join(w.log.read_text() for w in cluster.workers if w.region == WEST)
        assert "Traceback" not in logs
        # a job given up on was not run when a west worker took its message later: a plan
        # (its key names its tick) has no record; a job the next tick made again (the tag,
        # within the same slot) was run by that tick, not replayed from the stale delivery
        again_by_key = {o.key: o for o in again.jobs}
        with cluster.open_coordinator() as coordinator:
            ledger = CELERY.ledger(coordinator)
            for given_up in west_failed:
                if given_up.key in again_by_key:
                    assert again_by_key[given_up.key].status is JobStatus.DONE, given_up.key
                else:
                    assert ledger.record(given_up.key) is None, given_up.key
            ledger.close()
    finally:
        cluster.stop_all()


#: kill trials (each a backup of its own instance, killed at a seeded moment once it runs)
TRIALS = 2


@pytest.mark.slow
def test_a_worker_killed_mid_backup_leaves_it_to_the_other_worker_of_its_region(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    seed = 1807
    rng = random.Random(seed)
    data = _dataset(tmp_path / "nf-data", 6, 8_000_000, seed=seed)
    for trial in range(1, TRIALS):
        more = _dataset(tmp_path / f"nf-data-{trial}", 6, 8_000_000, seed=seed + trial)
        east.compute.register_instance(f"nf-{trial + 1}", more, tags={"backup": "1-7"})
    cluster = _cluster(site, east, west, tmp_path, own_redis, data)
    done = []
    try:
        cluster.start("east-1", "east-2")
        with cluster.coordinator() as (_, executor):
            (plan,) = executor.run([plan_job(PLAN_BACKUPS, EAST, datetime.now(UTC))])
            assert plan.ok, plan.error
            backups = [Job.from_dict(j) for j in plan.result["jobs"]]
            assert len(backups) == TRIALS
            ledger = executor.ledger
            for trial, backup in enumerate(backups):
                future = executor.submit(backup)
                # the backup is running once its key is locked: then kill its holder
                deadline = time.monotonic() + 30
                holder = None
                while holder is None and time.monotonic() < deadline:
                    holder = ledger.holder(backup.key)
                    time.sleep(0.005)
                assert holder is not None, "the backup never started"
                moment = rng.uniform(0, 0.15)
                time.sleep(moment)
                assert ledger.record(backup.key) is None, "the backup finished before the kill"
                victim = next(w for w in cluster.workers if w.pid == int(holder["pid"]))
                print(
                    f"kill trial #{trial} (seed {seed}): SIGKILL {victim.name} {moment:.3f}s "
                    f"after it locked {backup.key}"
                )
                victim.kill()
                outcome = future.result(timeout=90)
                assert outcome.status is JobStatus.DONE, outcome
                survivors = [w.pid for w in cluster.workers if w.region == EAST and w.alive]
                assert runner_pid(outcome.runner) in survivors
                assert ledger.holder(backup.key) is None  # no lock left
                done.append(outcome)
                cluster.start(f"east-{trial + 3}")  # two east workers again
    finally:
        cluster.stop_all()
    # the vault verifies, and exactly one recovery point exists for each slot
    result = CliRunner().invoke(
        cli, ["--site", str(cluster.files[EAST]), "verify", "--region", EAST, "--read-data"]
    )
    assert result.exit_code == 0, result.output
    with open_site(cluster.files[EAST], celery_plugin) as east_site:
        points = Engine(east_site).points(EAST)
    assert sorted(p.id for p in points) == sorted(o.result["point"] for o in done)


# --------------------------------------------------------------------------- [executor]


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ("", "executor.broker", "missing"),
        ('broker = "http://127.0.0.1:6379/0"\n', "executor.broker", "redis"),
        ('broker = "redis://127.0.0.1/0"\n', "executor.broker", "port"),
        ('broker = "redis://127.0.0.1:6379"\n', "executor.broker", "database"),
        (
            'broker = "redis://127.0.0.1:6379/0"\nresult_backend = "x"\n',
            "executor.result_backend",
            "is not redis or rediss",
        ),
        (
            'broker = "redis://127.0.0.1:6379/0"\nvisibility_timeout = "1m"\nlock_ttl = "5m"\n',
            "executor.visibility_timeout",
            "longer than lock_ttl",
        ),
        (
            'broker = "redis://127.0.0.1:6379/0"\nvisibility_timeout = "soon"\n',
            "executor.visibility_timeout",
            "duration",
        ),
        ('broker = "redis://127.0.0.1:6379/0"\nconcurrency = 0\n', "executor.concurrency", "1"),
        ('broker = "redis://127.0.0.1:6379/0"\nbrokers = 2\n', "executor.brokers", "unknown"),
    ],
)
def test_executor_table_errors_name_their_key(
    tmp_path: Path, table: str, key: str, words: str
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(site_toml(extra='[executor]\nkind = "celery"\n' + table))
    with pytest.raises(ConfigError) as caught:
        open_site(path, celery_plugin).close()
    assert key in str(caught.value) and words in str(caught.value), str(caught.value)


def test_settings_defaults_and_the_plugin_registers_by_entry_point() -> None:
    settings = parse_settings({"broker": "redis://10.0.0.5:6379/0"})
    assert settings.result_backend == settings.broker
    assert settings.visibility_timeout.total_seconds() == 6 * 3600
    assert settings.concurrency == 1 and settings.lock_ttl.total_seconds() == 300
    pm = make_plugin_manager(load_entry_points=True)
    assert "celery" in executor_kinds(pm)


def test_the_worker_command_wants_a_celery_site_and_executor_thread_still_runs(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text(site_toml())
    runner = CliRunner()
    result = runner.invoke(cli, ["--site", str(plain), "worker", "--region", "east"])
    assert result.exit_code == 1 and "not 'celery'" in result.output, result.output
    # a celery site still ticks in this process on threads (no worker runs), its jobs
    # recorded in the site's shared ledger
    celery_site = tmp_path / "celery.toml"
    celery_site.write_text(
        site_toml(extra=f'[executor]\nkind = "celery"\nbroker = "{own_redis.url}"\n')
    )
    result = runner.invoke(
        cli, ["--site", str(celery_site), "tick", "--executor", "thread", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


def test_stop_gives_up_at_once_on_the_jobs_no_worker_took(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            extra=f'[executor]\nkind = "celery"\nbroker = "{own_redis.url}"\n'
            'queue_timeout = "10m"\n'
        )
    )
    stop = threading.Event()
    with open_site(path, celery_plugin) as site, CELERY.executor(Engine(site), stop=stop) as ex:
        future = ex.submit(tag_job(EAST, datetime.now(UTC)))
        time.sleep(0.3)
        assert not future.done()  # no worker: it waits (up to queue_timeout)
        stop.set()
        outcome = future.result(timeout=10)
    assert outcome.status is JobStatus.STOPPED, outcome
    assert "region.local:east" in (outcome.error or "")


def test_the_redis_password_comes_from_the_environment_never_the_site_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from regionvault.core.errors import ConfigError
    from regionvault.plugins.celery.settings import parse_settings

    with pytest.raises(ConfigError, match="holds a login") as refused:
        parse_settings({"broker": "redis://:hunter2@127.0.0.1:6379/0"}, "site.toml")
    assert refused.value.key == "executor.broker" and "hunter2" not in str(refused.value)
    settings = parse_settings(
        {"broker": "redis://127.0.0.1:6379/0", "password_env": "RV_TEST_REDIS", "username": "rv"},
        "site.toml",
    )
    monkeypatch.delenv("RV_TEST_REDIS", raising=False)
    with pytest.raises(ConfigError, match="RV_TEST_REDIS") as unset:
        settings.broker_url()
    assert unset.value.key == "executor.password_env"
    monkeypatch.setenv("RV_TEST_REDIS", "p@ss/word")
    assert settings.broker_url() == "redis://rv:p%40ss%2Fword@127.0.0.1:6379/0"
    assert settings.backend_url() == settings.broker_url()
    assert "p@ss" not in repr(settings)
    with pytest.raises(ConfigError, match="password_env"):
        parse_settings({"broker": "redis://127.0.0.1:6379/0", "username": "rv"}, "site.toml")


def test_a_redis_acl_login_from_the_environment_reaches_the_ledger(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password named by password_env logs an ACL user in to a real Redis; a wrong one
    is refused with an error that names the server but not the password."""
    import redis as redis_py
    from regionvault.core.errors import RegionVaultError
    from regionvault.plugins.celery.ledger import RedisLedger
    from regionvault.plugins.celery.settings import parse_settings

    user = f"rv-{uuid.uuid4().hex[:8]}"
    admin = redis_py.Redis.from_url(redis.url)
    admin.execute_command("ACL", "SETUSER", user, "on", ">s3cret-pw", "~*", "&*", "+@all")
    try:
        settings = parse_settings(
            {"broker": redis.url, "password_env": "RV_TEST_REDIS", "username": user}, "site.toml"
        )
        monkeypatch.setenv("RV_TEST_REDIS", "s3cret-pw")
        ledger = RedisLedger(settings.broker_url(), namespace=f"acl-{user}")
        try:
            lock = ledger.acquire("backup/local:east/i-1/2026-12-07T00:00Z")
            assert lock is not None
            lock.release()
        finally:
            ledger.close()
        monkeypatch.setenv("RV_TEST_REDIS", "wrong-pw")
        wrong = RedisLedger(settings.broker_url(), namespace=f"acl-{user}")
        try:
            with pytest.raises(RegionVaultError) as refused:
                wrong.record("backup/local:east/i-1/2026-12-07T00:00Z")
            assert "wrong-pw" not in str(refused.value)
        finally:
            wrong.close()
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
