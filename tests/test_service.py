"""The service (core/pipeline/service.py): every job of a tick goes through the executor it is
given, whatever that executor is; after each job and each tick it calls the plugin hooks
``regionvault_after_job`` and ``regionvault_after_tick``, and a copy's
``regionvault_after_copy`` receives what the copy did."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from clock_support import stopped_clock
from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.pipeline import Engine, Service, TickReport, job_handlers
from regionvault.core.pipeline.executor import NO_RETRY, Executor, RetryPolicy, execute_job
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY,
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    RETENTION,
    TAG,
    Job,
    JobOutcome,
    JobStatus,
)
from regionvault.core.plugins import hookimpl
from regionvault.core.repository import CommitReport, CopyResult, RepositorySettings
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance, RecoveryPoint
from repository_support import snapshot

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)
# Every engine here ticks on a stopped clock (tests/clock_support.py): a test's second tick
# expects the first one's work found done, which a slot boundary between them would undo.


class SerialExecutor:
    """An executor that is not the thread executor: it runs each job inline, in the order
    given, and remembers every job it was handed."""

    def __init__(self, engine: Engine) -> None:
        self.handlers = job_handlers(engine)
        self.ledger = engine.ledger()
        self.plugin_manager = engine.site.plugin_manager
        self.ran: list[str] = []
        self.closed = False

    def submit(self, job: Job) -> Future[JobOutcome]:
        self.ran.append(job.key)
        future: Future[JobOutcome] = Future()
        future.set_result(
            execute_job(job, self.handlers, self.ledger, plugin_manager=self.plugin_manager)
        )
        return future

    def run(self, jobs: Iterable[Job]) -> list[JobOutcome]:
        return [self.submit(job).result() for job in jobs]

    def close(self) -> None:
        self.closed = True


class Recorder:
    """A plugin that records the service's and the copies' hooks, in the order called."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def regionvault_after_job(self, outcome: JobOutcome) -> None:
        self.events.append(("job", outcome))

    @hookimpl
    def regionvault_after_tick(self, report: TickReport) -> None:
        self.events.append(("tick", report))

    @hookimpl
    def regionvault_after_copy(
        self,
        source_region: str,
        region: str,
        source: RecoveryPoint,
        copy: RecoveryPoint,
        result: CopyResult | CommitReport,
    ) -> None:
        self.events.append(("copy", (source_region, region, source, copy, result)))

    @hookimpl
    def regionvault_on_job_failure(self, job: str, region: str | None, error: Exception) -> None:
        self.events.append(("failure", job))

    def of(self, kind: str) -> list[Any]:
        return [value for what, value in self.events if what == kind]


@pytest.fixture
def recorder(site: Site) -> Recorder:
    recorder = Recorder()
    site.plugin_manager.register(recorder)
    return recorder


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "vcu-1"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"db-{i}.bin").write_bytes(bytes([i]) * (96 << 10) + i.to_bytes(4, "big"))
    (root / "conf.txt").write_text("cell = 17\n")
    return root


@pytest.fixture
def instance(east: Region, dataset: Path) -> Instance:
    # east replicates to west (tests/conftest.py): its points are copied there
    return east.compute.register_instance("vcu-1", dataset, tags={"backup": "1-7"})


def copies_in(engine: Engine, region: str) -> list[RecoveryPoint]:
    return [p for p in engine.points(region) if p.lineage is not None]


# --------------------------------------------------------------------------- any executor


@pytest.mark.parametrize("split_copies", [False, True], ids=["copy-job", "phase-jobs"])
def test_every_job_of_a_tick_goes_through_the_executor_given(
    site: Site, instance: Instance, split_copies: bool
) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS, split_copies=split_copies)
    executor = SerialExecutor(engine)
    assert isinstance(executor, Executor)
    report = Service(engine, executor=executor).tick()
    assert report.ok, [o.error for o in report.failures()] + report.problems
    # every job the tick reports was handed to this executor, and nothing else was
    assert [o.key for o in report.jobs] == executor.ran
    copying = [COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT] if split_copies else [COPY]
    assert [o.kind for o in report.jobs] == [TAG, TAG, BACKUP, *copying, RETENTION, RETENTION]
    assert all(o.status is JobStatus.DONE for o in report.jobs)
    # the jobs really ran there: the point is backed up and copied
    (copy,) = copies_in(engine, "west")
    assert copy.instance_id == instance.id
    # the service never closes an executor it was given; a second tick uses it again
    assert not executor.closed
    again = Service(engine, executor=executor).tick()
    assert [o.key for o in again.jobs] == executor.ran[len(report.jobs) :]
    assert [o.kind for o in again.jobs] == [TAG, TAG, RETENTION, RETENTION]


def test_a_regions_own_ticks_run_every_phase_through_the_executor_given(
    site: Site, instance: Instance, west: Region, dataset: Path, tmp_path: Path
) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    executor = SerialExecutor(engine)
    service = Service(engine, executor=executor)
    reports = [service.tick(region) for region in ("east", "west", "east", "west", "east")]
    assert all(r.ok for r in reports), [
        r.problems + [o.error for o in r.failures()] for r in reports
    ]
    ran = [o for r in reports for o in r.jobs]
    assert [o.key for o in ran] == executor.ran
    done = [o.kind for o in ran if o.kind.startswith("copy")]
    assert done == [COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT, COPY_RECEIPT]
    (copy,) = copies_in(engine, "west")
    engine.restore(copy.id, region="west", target=tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(dataset)


# --------------------------------------------------------------------------- hooks


def test_after_job_sees_each_outcome_then_after_tick_the_report(
    site: Site, instance: Instance, recorder: Recorder
) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    report = Service(engine).tick()
    assert report.ok
    # one after_job per job of the tick, with the very outcome the report holds, in order;
    # then after_tick, once, with the report itself
    calls = [what for what, _ in recorder.events if what != "copy"]
    assert calls == ["job"] * len(report.jobs) + ["tick"]
    assert all(a is b for a, b in zip(recorder.of("job"), report.jobs, strict=True))
    assert recorder.of("tick") == [report] and recorder.of("tick")[0] is report
    # replayed jobs and a region's own tick are reported the same way
    recorder.events.clear()
    again = Service(engine).tick("east")
    assert again.region == "local:east"
    assert [o.key for o in recorder.of("job")] == [o.key for o in again.jobs]
    assert JobStatus.REPLAYED in {o.status for o in recorder.of("job")}
    assert recorder.of("tick") == [again]


def test_after_copy_receives_the_copy_result(
    site: Site, instance: Instance, recorder: Recorder
) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    Service(engine).tick()
    ((source_region, region, source, copy, result),) = recorder.of("copy")
    assert (source_region, region) == ("local:east", "local:west")
    assert isinstance(result, CopyResult)
    assert result.point == copy and copy.lineage is not None
    assert copy.lineage.source_recovery_point == source.id
    assert result.chunks_sent == result.chunks_total > 0 and result.bytes_forward > 0
    assert not result.existing
    # a copy the destination holds already is not reported again
    assert engine.copy(source.id, to="west").existing
    assert len(recorder.of("copy")) == 1


def test_after_copy_of_a_phased_copy_receives_the_commit_report(
    site: Site, instance: Instance, recorder: Recorder
) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS, split_copies=True)
    report = Service(engine).tick()
    assert report.ok
    ((_, region, source, copy, result),) = recorder.of("copy")
    assert region == "local:west" and isinstance(result, CommitReport)
    assert result.point == copy and result.source == source and result.batches_ingested >= 1
    (commit,) = [o for o in report.jobs if o.kind == COPY_COMMIT]
    assert commit.result["copy"] == copy.id


class Broken:
    """after_job raises for backups; after_tick always."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    @hookimpl
    def regionvault_after_job(self, outcome: JobOutcome) -> None:
        self.jobs.append(outcome.kind)
        if outcome.kind == BACKUP:
            raise RuntimeError("metrics gateway unreachable")

    @hookimpl
    def regionvault_after_tick(self, report: TickReport) -> None:
        raise RuntimeError("audit log full")


def test_a_failing_hook_is_a_problem_of_the_tick_and_the_tick_goes_on(
    site: Site, instance: Instance
) -> None:
    broken = Broken()
    site.plugin_manager.register(broken)
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    report = Service(engine).tick()
    # every job ran and did its work, the hook saw every one ...
    assert not report.failures()
    assert [o.kind for o in report.jobs] == [TAG, TAG, BACKUP, COPY, RETENTION, RETENTION]
    assert broken.jobs == [o.kind for o in report.jobs]
    assert len(copies_in(engine, "west")) == 1
    # ... and the two failures are the tick's problems, each naming the hook and what for
    (backup,) = [o for o in report.jobs if o.kind == BACKUP]
    assert report.problems == [
        f"regionvault_after_job hook failed for job {backup.key}: "
        "RuntimeError: metrics gateway unreachable",
        "regionvault_after_tick hook failed for the tick: RuntimeError: audit log full",
    ]
    assert not report.ok and report.outcome == "failed"


class BrokenAfterWork:
    """The notifications of done work raise: after_backup, after_copy; after_job always."""

    @hookimpl
    def regionvault_after_backup(self, region: str, recovery_point: RecoveryPoint) -> None:
        raise RuntimeError("backup counter down")

    @hookimpl
    def regionvault_after_copy(
        self, source_region: str, region: str, source: RecoveryPoint, copy: RecoveryPoint
    ) -> None:
        raise RuntimeError("copy counter down")

    @hookimpl
    def regionvault_after_job(self, outcome: JobOutcome) -> None:
        raise RuntimeError("job counter down")


def test_a_raising_notification_never_fails_the_work_it_reports(
    site: Site, instance: Instance
) -> None:
    # the point and the copy are committed: failing their jobs would fail them for good
    # (nothing runs them again); the tick names each hook once, and is not ok
    site.plugin_manager.register(BrokenAfterWork())
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    report = Service(engine).tick()
    assert not report.failures(), [o.error for o in report.failures()]
    assert len(copies_in(engine, "west")) == 1
    (backup,) = [o for o in report.jobs if o.kind == BACKUP]
    (copy_job,) = [o for o in report.jobs if o.kind == COPY]
    (point,) = engine.points("local:east")
    (tag, *_) = [o for o in report.jobs if o.kind == TAG]
    assert report.problems == [
        f"regionvault_after_job hook failed for job {tag.key} and 1 more job(s): "
        "RuntimeError: job counter down",
        f"regionvault_after_job hook failed for job {backup.key}: RuntimeError: job counter down",
        f"regionvault_after_backup hook failed for recovery point {point.id} of {instance.id} "
        "in local:east: RuntimeError: backup counter down",
        f"regionvault_after_job hook failed for job {copy_job.key}: RuntimeError: job counter down",
        f"regionvault_after_copy hook failed for the copy of {point.id} from local:east to "
        "local:west: RuntimeError: copy counter down",
        f"regionvault_after_job hook failed for job {report.jobs[-2].key} and 1 more job(s): "
        "RuntimeError: job counter down",
    ]
    assert report.outcome == "failed"
    # the next tick has nothing left to do for them: no job fails, none is redone
    again = Service(engine).tick()
    assert not again.failures()
    assert [o.status for o in again.jobs if o.kind in (BACKUP, COPY)] == []


def test_a_raising_after_copy_in_a_regions_own_tick_keeps_the_commit_and_its_receipt(
    site: Site, instance: Instance
) -> None:
    site.plugin_manager.register(BrokenAfterWork())
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    service = Service(engine)
    reports = [service.tick(region) for region in ("east", "west", "east", "west", "east")]
    ran = [o for r in reports for o in r.jobs]
    assert not [o for o in ran if o.status is JobStatus.FAILED]
    done = [o.kind for o in ran if o.kind.startswith("copy")]
    assert done == [COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT, COPY_RECEIPT]
    assert len(copies_in(engine, "west")) == 1
    (west_commit,) = [r for r in reports if any(o.kind == COPY_COMMIT for o in r.jobs)]
    assert any("regionvault_after_copy hook failed" in p for p in west_commit.problems)


# --------------------------------------------------------------------------- retries


class Throttled:
    """Wraps ``Engine.tag``: its first ``times`` calls for local:east fail as a throttled
    cloud would (the tick tags both regions at once, in two threads)."""

    def __init__(self, engine: Engine, times: int) -> None:
        self.tag = engine.tag
        self.left = times

    def __call__(self, region: str) -> Any:
        if region == "local:east" and self.left > 0:
            self.left -= 1
            raise TransientError("throttled (test)", region=region, retry_after=0.5)
        return self.tag(region)


def test_the_default_executor_retries_with_the_policy_given(site: Site) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    waits: list[float] = []
    engine.tag = Throttled(engine, times=2)  # type: ignore[method-assign]
    policy = RetryPolicy(attempts=3, first_delay=0.1, max_delay=1.0, sleep=waits.append)
    report = Service(engine, retry=policy).tick()
    tags = [o for o in report.jobs if o.kind == TAG]
    assert [o.status for o in tags] == [JobStatus.DONE, JobStatus.DONE]
    # east's tag job was throttled twice and done on its third run, the service's own
    # Retry-After honoured; west's ran once
    assert {o.region: o.attempts for o in tags} == {"local:east": 3, "local:west": 1}
    assert waits == [0.5, 0.5]


def test_without_retries_a_throttled_job_fails_once_and_names_the_error(site: Site) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    engine.tag = Throttled(engine, times=1)  # type: ignore[method-assign]
    report = Service(engine, retry=NO_RETRY).tick()
    (failed,) = report.failures()
    assert failed.kind == TAG and failed.attempts == 1
    assert "throttled (test)" in (failed.error or "")


def test_a_stop_ends_the_default_executors_retry_waits(site: Site, recorder: Recorder) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    stop = threading.Event()
    throttled = Throttled(engine, times=100)

    def tag(region: str) -> Any:
        if region == "local:east":
            stop.set()  # SIGTERM arrives while east's tag job is throttled
        return throttled(region)

    engine.tag = tag  # type: ignore[method-assign]
    # waits of an hour (time.sleep, the default), which only the stop can cut short
    policy = RetryPolicy(first_delay=3600.0, max_delay=3600.0)
    reports: list[TickReport] = []
    service = Service(engine, retry=policy)
    runner = threading.Thread(
        target=service.run, args=(stop,), kwargs={"on_tick": reports.append}, daemon=True
    )
    runner.start()
    runner.join(timeout=60)  # bounded; without the stop reaching the job: an hour
    assert not runner.is_alive(), "the service's stop did not reach the retry wait"
    (report,) = reports
    (east,) = [o for o in report.jobs if o.kind == TAG and o.region == "local:east"]
    assert east.status is JobStatus.STOPPED and east.attempts == 1
    assert east.outcome == "stopped" and not east.ok
    assert (east.error or "").startswith("stopped while waiting to retry")
    # the runner stopped; the job did not fail: no failure record, no alert, and the tick is
    # not failed (`regionvault run` exits 0), while after_job sees it stopped
    assert engine.ledger().last_failure(east.key) is None
    assert east.key not in recorder.of("failure")
    assert report.failures() == [] and report.ok and report.outcome == "ok"
    assert [o.outcome for o in recorder.of("job") if o.key == east.key] == ["stopped"]
    # not done: the next run of the key runs it again
    assert engine.ledger().record(east.key) is None
    assert JobOutcome.from_dict(east.to_dict()) == east


def test_an_executor_and_a_retry_policy_together_are_refused(site: Site) -> None:
    engine = Engine(site, clock=stopped_clock(), settings=SETTINGS)
    with pytest.raises(RegionVaultError, match="an executor or a retry policy, not both"):
        Service(engine, executor=SerialExecutor(engine), retry=NO_RETRY)
