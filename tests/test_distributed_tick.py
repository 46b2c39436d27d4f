"""A distributed tick (issue #18, part 2): ``Service.tick()`` on an executor that runs each
job in the region :func:`runs_in` names. Here that executor is a test one: every job is
serialised to JSON and run by its region's "worker", an Engine over a site file holding that
region's keys alone (the other region's: only its public sealing key), with its own ledger
and thread pool. The coordinator's Engine opens no region at all: its site's regions point
at directories that do not exist, and any service it would build fails the test."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from regionvault.core.cli import cli
from regionvault.core.errors import ConfigError
from regionvault.core.pipeline import Engine, Service, TickReport, job_handlers
from regionvault.core.pipeline.executor import ThreadExecutor
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    PLAN_BACKUPS,
    PLAN_INBOX,
    PLAN_KINDS,
    PLAN_OFFERS,
    RETENTION,
    TAG,
    Job,
    JobOutcome,
    JobStatus,
    copy_jobs_for,
    copy_receipt_job,
    plan_job,
    runs_in,
    tag_job,
)
from regionvault.core.pipeline.kinds import THREAD
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.pipeline.scheduler import ScheduleReport
from regionvault.core.plugins import hookimpl
from regionvault.core.site import Region, Site
from regionvault.providers.local.keys import LocalKeyService
from repository_support import ManifestReads, snapshot
from site_support import open_site, region_root, site_toml, worker_site

EAST, WEST = "local:east", "local:west"
T0 = datetime(2026, 11, 25, 0, 1, tzinfo=UTC)


class RegionWorker:
    """One region's worker: what a worker host builds from its own site file."""

    def __init__(self, site_file: Path, now: list[datetime]) -> None:
        self.site = open_site(site_file)
        self.engine = Engine(self.site, clock=lambda: now[0])
        self.executor = ThreadExecutor(
            job_handlers(self.engine),
            JobLedger(self.site.config.state_dir),
            max_workers=2,
            plugin_manager=self.site.plugin_manager,
        )

    def close(self) -> None:
        self.executor.close()
        self.site.close()


class RoutedExecutor:
    """A distributed executor for tests: each job goes, as JSON, to the worker of the
    region :func:`runs_in` names; its outcome comes back as JSON."""

    distributed = True

    def __init__(self, workers: dict[str, RegionWorker]) -> None:
        self.workers = workers
        #: (kind, region of the worker that ran it, key), in the order submitted
        self.routed: list[tuple[str, str, str]] = []

    def submit(self, job: Job) -> Future[JobOutcome]:
        region = runs_in(job)
        assert region is not None, job
        self.routed.append((job.kind, region, job.key))
        inner = self.workers[region].executor.submit(Job.from_json(job.to_json()))
        outer: Future[JobOutcome] = Future()

        def back(done: Future[JobOutcome]) -> None:
            wire = json.dumps(done.result().to_dict())
            outer.set_result(JobOutcome.from_dict(json.loads(wire)))

        inner.add_done_callback(back)
        return outer

    def run(self, jobs: Iterable[Job]) -> list[JobOutcome]:
        futures = [self.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        pass


class Deployment:
    """A coordinator that holds nothing, and one worker per region."""

    def __init__(self, tmp_path: Path, east: Region, west: Region, monkeypatch: Any) -> None:
        self.now = [T0]
        self.files = {
            EAST: worker_site(tmp_path / "worker-east", east, west, replicate=True),
            WEST: worker_site(tmp_path / "worker-west", west, east, replicate=True),
        }
        self.nowhere = tmp_path / "nowhere"
        self.coordinator_file = tmp_path / "coordinator" / "site.toml"
        self.coordinator_file.parent.mkdir()
        self.coordinator_file.write_text(
            site_toml(
                {EAST: self.nowhere / "east", WEST: self.nowhere / "west"},
                settings={"state_dir": tmp_path / "coordinator" / "state"},
            )
        )
        public = {p.resolve() / "keys" for p in tmp_path.glob("public-of-*")}
        original = LocalKeyService._load

        def guarded(keys: LocalKeyService, *, refresh: bool = False) -> Any:
            if keys.keys_dir.resolve() in public:
                raise AssertionError(f"{keys.region}'s KeyService used by another worker")
            return original(keys, refresh=refresh)

        monkeypatch.setattr(LocalKeyService, "_load", guarded)

    @contextlib.contextmanager
    def coordinator(self) -> Iterator[tuple[Service, RoutedExecutor]]:
        workers = {r: RegionWorker(f, self.now) for r, f in self.files.items()}
        try:
            with open_site(self.coordinator_file) as site:
                for region in site.regions:
                    # the coordinator builds no region's compute, keys or vault
                    region._build = _refuse  # type: ignore[method-assign]
                routed = RoutedExecutor(workers)
                yield Service(Engine(site, clock=lambda: self.now[0]), executor=routed), routed
        finally:
            for worker in workers.values():
                worker.close()
        assert not self.nowhere.exists()

    def tick(self) -> tuple[TickReport, RoutedExecutor]:
        with self.coordinator() as (service, routed):
            return service.tick(), routed

    @contextlib.contextmanager
    def worker(self, region: str) -> Iterator[RegionWorker]:
        worker = RegionWorker(self.files[region], self.now)
        try:
            yield worker
        finally:
            worker.close()


def _refuse(service: str) -> Any:
    raise AssertionError(f"the coordinator built a region's {service}")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = random.Random(18)
    root = tmp_path / "nf-data"
    (root / "db").mkdir(parents=True)
    for i in range(3):
        (root / "db" / f"part-{i}.bin").write_bytes(rng.randbytes(200_000))
    (root / "conf.txt").write_text("apn = internet\n" * 300)
    return root


@pytest.fixture
def deployment(
    site: Site,
    east: Region,
    west: Region,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Deployment:
    east.compute.register_instance("nf-1", dataset, tags={"backup": "1-7"})
    east.sealer(), west.sealer()  # each region's keys, made by its own provider
    site.close()
    return Deployment(tmp_path, east, west, monkeypatch)


def worked(report: TickReport) -> list[str]:
    """The kinds of job that ran (not replayed), plans aside, in the order they ran."""
    return [
        o.kind
        for o in report.jobs
        if o.status is not JobStatus.REPLAYED and o.kind not in PLAN_KINDS
    ]


def test_runs_in_routes_every_kind_to_the_region_whose_keys_it_needs() -> None:
    assert runs_in(tag_job(EAST, T0)) == EAST
    offer, request, send, commit = copy_jobs_for(EAST, "rp-1", WEST, expires_at=None, slot=T0)
    assert [runs_in(j) for j in (offer, request, send, commit)] == [EAST, WEST, EAST, WEST]
    assert runs_in(copy_receipt_job(EAST, "rp-1", WEST, slot=T0)) == EAST
    for kind in PLAN_KINDS:
        assert runs_in(plan_job(kind, WEST, T0, step=1)) == WEST
    assert runs_in(Job("x/-", "custom")) is None
    # a phase whose region is not its side is refused, never routed to the wrong workers
    wrong = Job(request.key, request.kind, EAST, dict(request.payload))
    with pytest.raises(Exception, match="runs in its destination"):
        runs_in(wrong)


def test_one_tick_backs_up_and_copies_through_every_phase_in_the_right_regions(
    deployment: Deployment, dataset: Path, tmp_path: Path
) -> None:
    report, routed = deployment.tick()
    assert report.ok, (report.problems, [o.error for o in report.failures()])
    assert worked(report) == [
        TAG,
        TAG,
        BACKUP,
        COPY_OFFER,
        COPY_REQUEST,
        COPY_SEND,
        COPY_COMMIT,
        COPY_RECEIPT,
        RETENTION,
        RETENTION,
    ]
    where = {(kind, region) for kind, region, _ in routed.routed}
    assert {k: r for k, r in where if k in (BACKUP, COPY_OFFER, COPY_SEND, COPY_RECEIPT)} == {
        BACKUP: EAST,
        COPY_OFFER: EAST,
        COPY_SEND: EAST,
        COPY_RECEIPT: EAST,
    }
    assert {k: r for k, r in where if k in (COPY_REQUEST, COPY_COMMIT)} == {
        COPY_REQUEST: WEST,
        COPY_COMMIT: WEST,
    }
    assert {(k, r) for k, r in where if k in PLAN_KINDS} == {
        (k, r) for k in PLAN_KINDS for r in (EAST, WEST)
    }
    # the schedules came back from the regions, whole
    assert [s.region for s in report.schedule] == [EAST, WEST]
    (due,) = report.schedule[0].due
    assert due.instance.name == "nf-1" and due.copy_to and str(due.copy_to[0]) == WEST
    assert report.to_dict()["schedule"] == [s.summary() for s in report.schedule]

    # a second tick does nothing new: no job but the plans runs
    deployment.now[0] = T0.replace(second=30)
    again, _ = deployment.tick()
    assert again.ok and worked(again) == [], worked(again)

    # west's keys alone restore the copy, byte-exact, with east gone
    point_id = next(o.result["point"] for o in report.jobs if o.kind == BACKUP)
    commit = next(o for o in report.jobs if o.kind == COPY_COMMIT)
    shutil.rmtree(region_root_of(deployment, EAST))
    with deployment.worker(WEST) as west:
        (copy,) = [p for p in west.engine.repository(WEST).points() if p.lineage is not None]
        assert copy.id == commit.result["copy"]
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point_id
        out = tmp_path / "restored"
        west.engine.restore(copy.id, region=WEST, target=out)
    assert snapshot(out) == snapshot(dataset)
    for public in tmp_path.glob("public-of-*"):
        assert sorted(p.name for p in (public / "keys").iterdir()) == ["sealing.pub"]


def region_root_of(deployment: Deployment, region: str) -> Path:
    with open_site(deployment.files[region]) as site:
        return region_root(site.region(region))


def test_a_plan_delivered_twice_gives_the_same_plan(deployment: Deployment) -> None:
    with deployment.worker(EAST) as east:
        plan = plan_job(PLAN_BACKUPS, EAST, T0)
        first, second = (
            east.executor.run([plan]),
            east.executor.run([Job.from_json(plan.to_json())]),
        )
        assert first[0].status is JobStatus.DONE and second[0].status is JobStatus.REPLAYED
        assert first[0].result == second[0].result
        (backup,) = [Job.from_dict(j) for j in first[0].result["jobs"]]
        assert backup.kind == BACKUP and backup.region == EAST
        schedule = ScheduleReport.from_dict(first[0].result["schedule"])
        assert schedule.to_dict() == first[0].result["schedule"]
        # the other plans are plain JSON too, and name no job yet
        for kind in (PLAN_INBOX, PLAN_OFFERS):
            (outcome,) = east.executor.run([plan_job(kind, EAST, T0, step=1)])
            assert outcome.ok and json.loads(json.dumps(outcome.result)) == outcome.result


def test_the_thread_path_is_unchanged_without_a_distributed_executor(
    deployment: Deployment,
) -> None:
    with deployment.worker(EAST) as east:
        report = Service(east.engine).tick(region=EAST)
    assert report.ok
    assert not [o for o in report.jobs if o.kind in PLAN_KINDS]
    assert [o.kind for o in report.jobs if o.status is JobStatus.DONE] == [
        TAG,
        BACKUP,
        COPY_OFFER,
        RETENTION,
    ]


# --------------------------------------------------------------------------- [executor]


def _site_with(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "exec-site.toml"
    path.write_text(site_toml(extra=table))
    return path


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ('[executor]\nkind = "celery-x"\n', "executor.kind", "pip install 'regionvault[celery]'"),
        ("[executor]\nkind = 3\n", "executor.kind", "string"),
        ('[executor]\nkind = "thread"\nbroker = "redis://x"\n', "executor.broker", "thread"),
        ("executor = 1\n", "executor", "table"),
    ],
)
def test_executor_table_errors_name_their_key(
    tmp_path: Path, table: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_site(_site_with(tmp_path, table)).close()
    assert key in str(caught.value) and words in str(caught.value)


class FakeKind:
    """An executor kind from a plugin (as plugins/celery's would be)."""

    name = "fake"

    def __init__(self) -> None:
        self.made: list[str] = []

    def validate(self, settings: Any, source: str) -> None:
        if "broker" not in settings:
            raise ConfigError(
                "missing (the fake executor needs it)", file=source, key="executor.broker"
            )

    @contextlib.contextmanager
    def executor(self, engine: Engine, *, stop: Any) -> Iterator[Any]:
        self.made.append(engine.site.config.executor.settings["broker"])
        with THREAD.executor(engine, stop=stop) as running:
            yield running

    def ledger(self, site: Any) -> JobLedger:
        return JobLedger(site.config.state_dir / "fake-ledger")


class FakePlugin:
    def __init__(self, kind: FakeKind) -> None:
        self.kind = kind

    @hookimpl
    def regionvault_executor_kinds(self) -> list[Any]:
        return [self.kind]


def test_a_plugin_kind_validates_its_settings_and_gives_the_ledger(tmp_path: Path) -> None:
    kind = FakeKind()
    path = _site_with(tmp_path, '[executor]\nkind = "fake"\n')
    with pytest.raises(ConfigError, match=r"executor\.broker"):
        open_site(path, FakePlugin(kind)).close()
    path.write_text(site_toml(extra='[executor]\nkind = "fake"\nbroker = "mem://"\n'))
    with open_site(path, FakePlugin(kind)) as site:
        assert site.config.executor.kind == "fake"
        assert Engine(site).ledger().root == site.config.state_dir / "fake-ledger" / "jobs"
    # with no plugin for it, the kind is unknown, and the error names the installed ones
    with pytest.raises(ConfigError, match=r"executor\.kind.*installed: thread"):
        open_site(path).close()


def test_cli_executor_thread_runs_in_process_whatever_the_site_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = FakeKind()
    path = tmp_path / "site.toml"
    path.write_text(site_toml(extra='[executor]\nkind = "fake"\nbroker = "mem://"\n'))
    from regionvault.core import plugins

    pm = plugins.make_plugin_manager(load_entry_points=True, plugins=[FakePlugin(kind)])
    monkeypatch.setattr(plugins, "_default", (pm, plugins.registry_from(pm)))
    runner = CliRunner()
    result = runner.invoke(cli, ["--site", str(path), "tick", "--executor", "thread", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True and kind.made == []
    # without the option, the site's executor is used
    result = runner.invoke(cli, ["--site", str(path), "tick", "--json"])
    assert result.exit_code == 0, result.output
    assert kind.made == ["mem://"]


def test_a_region_tick_on_a_distributed_executor_runs_that_region_alone(
    deployment: Deployment,
) -> None:
    with deployment.coordinator() as (service, routed):
        report = service.tick(region=EAST)
    assert report.ok and report.region == EAST
    assert worked(report) == [TAG, BACKUP, COPY_OFFER, RETENTION]
    assert {region for _, region, _ in routed.routed} == {EAST}


class NoWestWorkers(RoutedExecutor):
    """West's workers are all down: its jobs come back as the executor gives them up."""

    def submit(self, job: Job) -> Future[JobOutcome]:
        if runs_in(job) != WEST:
            return super().submit(job)
        self.routed.append((job.kind, WEST, job.key))
        given_up: Future[JobOutcome] = Future()
        given_up.set_result(
            JobOutcome(
                job.key,
                job.kind,
                job.region,
                JobStatus.FAILED,
                result={"reason": "no-worker", "queue": "region.local:west"},
                error="no worker took it",
            )
        )
        return given_up


def test_a_region_with_no_workers_sits_out_the_rest_of_the_tick(
    deployment: Deployment,
) -> None:
    """Review rcq #5: west's first job comes back given up for lack of workers; west is
    asked nothing more in that tick (the old code asked it every round, each waiting
    ``queue_timeout``), the report says so once, and east's own jobs all run."""
    with deployment.coordinator() as (service, routed):
        service.executor = executor = NoWestWorkers(routed.workers)
        report = service.tick()
    west = [kind for kind, region, _ in executor.routed if region == WEST]
    assert west == [TAG]
    said = [p for p in report.problems if "sits out" in p]
    assert len(said) == 1 and WEST in said[0] and "region.local:west" in said[0]
    ran_east = {o.kind for o in report.jobs if o.region == EAST and o.ok}
    assert {TAG, BACKUP, COPY_OFFER, RETENTION} <= ran_east


@pytest.mark.parametrize("count", [4, 16])
def test_a_distributed_ticks_plans_decrypt_each_manifest_about_once(
    site: Site,
    east: Region,
    west: Region,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
) -> None:
    """Issues #18, #21: each plan job lists its region once, and a worker decrypts each
    manifest once (the old code: every instance's every plan listed and decrypted them all,
    count² a pass, in each of six passes)."""
    for i in range(count):
        root = tmp_path / "data" / f"nf-{i}"
        root.mkdir(parents=True)
        (root / "db.bin").write_bytes(i.to_bytes(4, "big") * 256)
        east.compute.register_instance(f"nf-{i}", root, tags={"backup": "1-7"})
    east.sealer(), west.sealer()
    site.close()
    deployment = Deployment(tmp_path, east, west, monkeypatch)
    reads = ManifestReads(monkeypatch)
    report, _ = deployment.tick()
    assert report.ok, (report.problems, [o.error for o in report.failures()])
    assert worked(report).count(BACKUP) == worked(report).count(COPY_COMMIT) == count
    assert reads.gets[EAST] <= 3 * count + 8, reads.gets
    assert reads.gets[WEST] <= 3 * count + 8, reads.gets

    # the next tick, on new workers, with nothing due: planning alone
    reads.reset()
    deployment.now[0] = T0.replace(second=30)
    again, _ = deployment.tick()
    assert again.ok and BACKUP not in worked(again) and COPY_COMMIT not in worked(again)
    assert reads.gets[EAST] <= count and reads.gets[WEST] <= count, reads.gets
    # plan-backups and one plan-offers pass (none makes a job), per region
    assert reads.lists[EAST] <= 4 and reads.lists[WEST] <= 4, reads.lists
