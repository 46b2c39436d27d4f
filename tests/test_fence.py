"""Review rcq of issue #18, the core side: a runner that lost its key's lock while it ran
(paused past ``lock_ttl``, cut off from the ledger) records nothing and commits no second
point for the slot (finding 1); copy jobs are refused unless the worker's own site copies
that way (3); plan records expire and the retention job prunes the ledger (6). Each test
fails on the code the review read (015a774)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine, job_handlers
from regionvault.core.pipeline.copyflow import CopyFlow
from regionvault.core.pipeline.engine import SLOT_TAG
from regionvault.core.pipeline.executor import execute_job
from regionvault.core.pipeline.jobs import (
    PLAN_BACKUPS,
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
    backup_job,
    copy_jobs_for,
    plan_job,
    retention_job,
)
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance
from site_support import open_site, worker_site

SLOT = datetime(2026, 12, 7, tzinfo=UTC)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "nf-data"
    root.mkdir()
    (root / "f.bin").write_bytes(random.Random(1).randbytes(200_000))
    return root


@pytest.fixture
def instance(east: Region, dataset: Path) -> Instance:
    return east.compute.register_instance("nf-1", dataset, tags={"backup": "1-7"})


# ---- finding 1: the fence


def test_a_runner_that_lost_its_lock_while_running_records_nothing(tmp_path: Path) -> None:
    """Runner A's lock expires while its handler runs and runner B takes the key and
    finishes it: A's outcome is BUSY, and B's record stands (the old code recorded A's over
    it, DONE)."""
    ledger = JobLedger(tmp_path / "state", lock_ttl=timedelta(seconds=30))
    job = Job("backup/local:east/i-1/2026-12-07T00:00Z", "backup", "local:east", {})
    lock_path = ledger._path("locks", job.key, ".lock")

    def by_b(job: Job) -> Any:
        return {"point": "b"}

    def by_a(job: Job) -> Any:
        lock_path.unlink()  # A paused past lock_ttl: its lock expired and was broken
        b = execute_job(job, JobHandlers({"backup": by_b}), ledger)
        assert b.status is JobStatus.DONE
        return {"point": "a"}

    a = execute_job(job, JobHandlers({"backup": by_a}), ledger)
    assert a.status is JobStatus.BUSY
    assert a.error is not None and "lost its lock while running" in a.error
    recorded = ledger.record(job.key)
    assert recorded is not None and recorded.result == {"point": "b"}


def test_two_runs_of_one_slot_that_both_reach_the_commit_make_one_point(
    site: Site, east: Region, instance: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    """Run A is paused inside its capture (after its slot check); run B backs the slot up
    meanwhile; A goes on and reaches its commit. The vault admits one point for the slot and
    A returns it (the old code committed a second point with a random id)."""
    engine = Engine(site)
    real = east.compute.capture
    inner: list[str] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        if not inner:
            inner.append("b")
            inner[0] = engine.backup(instance.id, slot=SLOT).id  # run B, while A "sleeps"
        return real(*args, **kwargs)

    east.compute.capture = capture  # type: ignore[method-assign]
    a = engine.backup(instance.id, slot=SLOT)
    points = engine.points("local:east", instance.id)
    assert [p.id for p in points] == inner == [a.id]
    assert points[0].tags[SLOT_TAG] == "2026-12-07T00:00Z"
    assert "committed by another run" in caplog.text


def test_a_scheduled_points_id_is_its_slots_and_says_nothing_of_the_instance(
    site: Site, east: Region, instance: Instance, dataset: Path
) -> None:
    engine = Engine(site)
    repo = engine.repository("local:east")
    point = engine.backup(instance.id, slot=SLOT)
    assert point.id == repo.slot_point_id(instance.id, "2026-12-07T00:00Z")
    assert instance.id not in point.id
    other = east.compute.register_instance("nf-2", dataset, tags={"backup": "1-7"})
    ids = {
        point.id,
        repo.slot_point_id(other.id, "2026-12-07T00:00Z"),
        repo.slot_point_id(instance.id, "2026-12-08T00:00Z"),
    }
    assert len(ids) == 3
    # a backup without a slot keeps a fresh random id
    assert len({engine.backup(instance.id).id, engine.backup(instance.id).id} - ids) == 2
    # the id is keyed per vault: west's repository gives another id for the same slot
    assert engine.repository("local:west").slot_point_id(instance.id, "x") != repo.slot_point_id(
        instance.id, "x"
    )


def test_the_backup_job_run_again_after_a_lost_lock_returns_the_first_point(
    site: Site, east: Region, instance: Instance, tmp_path: Path
) -> None:
    """The whole path: A's backup job loses its lock mid-capture, B's job takes the key and
    commits; A ends BUSY and the ledger holds B's point, the vault one point."""
    engine = Engine(site)
    ledger = JobLedger(tmp_path / "ledger")
    job = backup_job("local:east", instance.id, SLOT)
    handlers = job_handlers(engine)
    real = east.compute.capture
    b_outcome: list[JobOutcome] = []
    paused: list[bool] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        if not paused:
            paused.append(True)
            ledger._path("locks", job.key, ".lock").unlink()
            b_outcome.append(execute_job(job, handlers, ledger))
        return real(*args, **kwargs)

    east.compute.capture = capture  # type: ignore[method-assign]
    a = execute_job(job, handlers, ledger)
    assert a.status is JobStatus.BUSY
    (b,) = b_outcome
    assert b.status is JobStatus.DONE
    recorded = ledger.record(job.key)
    assert recorded is not None and recorded.result == b.result
    assert [p.id for p in engine.points("local:east", instance.id)] == [b.result["point"]]


# ---- finding 3: a copy only where the worker's own site copies


def _run(engine_of: dict[str, Engine], jobs: list[Job], ledger: JobLedger) -> list[JobOutcome]:
    return [execute_job(j, job_handlers(engine_of[j.region or ""]), ledger) for j in jobs]


def test_copy_jobs_against_the_sites_replication_are_refused(
    site: Site, east: Region, west: Region, tmp_path: Path
) -> None:
    """Replication is east -> west only. Jobs copying a west point to east (what anyone able
    to enqueue could send) are refused by west's worker: nothing leaves west (the old code
    ran all four phases, and east restored west's data)."""
    data = tmp_path / "west-data"
    data.mkdir()
    (data / "secret.db").write_bytes(random.Random(7).randbytes(50_000))
    inst = west.compute.register_instance("west-nf", data, tags={"backup": "1-7"})
    east.sealer(), west.sealer()
    files = {
        "local:east": worker_site(tmp_path / "w-east", east, west, replicate=True),
        "local:west": worker_site(tmp_path / "w-west", west, east, replicate=True),
    }
    with open_site(files["local:west"]) as ws, open_site(files["local:east"]) as es:
        engines = {"local:west": Engine(ws), "local:east": Engine(es)}
        point = engines["local:west"].backup(inst.id)
        jobs = copy_jobs_for("local:west", point.id, "local:east", expires_at=None)
        outcomes = _run(engines, jobs, JobLedger(tmp_path / "ledger"))
        assert [o.status for o in outcomes] == [JobStatus.FAILED] * 4
        offer, _, send, _ = outcomes
        for refused in (offer, send):
            assert refused.error is not None
            assert "refused" in refused.error and "local:west to local:east" in refused.error
        assert not [p for p in engines["local:east"].points("local:east") if p.lineage]
        # the in-process copy job too
        copy = Job(
            f"copy/local:west/{point.id}/local:east",
            "copy",
            "local:west",
            {
                "recovery_point": point.id,
                "destination": "local:east",
            },
        )
        (whole,) = _run(engines, [copy], JobLedger(tmp_path / "ledger"))
        assert whole.status is JobStatus.FAILED and "refused" in (whole.error or "")


def test_a_copy_to_tag_allows_a_copy_no_pair_names(
    site: Site, east: Region, west: Region, tmp_path: Path
) -> None:
    """No replication pair at all; the instance's copy-to tag names west: every phase runs."""
    data = tmp_path / "east-data"
    data.mkdir()
    (data / "f").write_bytes(random.Random(3).randbytes(40_000))
    inst = east.compute.register_instance(
        "nf-t", data, tags={"backup": "1-7", "backup-copy-to": "local:west"}
    )
    east.sealer(), west.sealer()
    files = {
        "local:east": worker_site(tmp_path / "w-east", east, west),
        "local:west": worker_site(tmp_path / "w-west", west, east),
    }
    with open_site(files["local:east"]) as es, open_site(files["local:west"]) as ws:
        engines = {"local:east": Engine(es), "local:west": Engine(ws)}
        point = engines["local:east"].backup(inst.id)
        jobs = copy_jobs_for("local:east", point.id, "local:west", expires_at=None)
        outcomes = _run(engines, jobs, JobLedger(tmp_path / "ledger"))
        assert [o.status for o in outcomes] == [JobStatus.DONE] * 4, [o.error for o in outcomes]
        # without a pair, what allowed it was the point's tag alone
        flow = CopyFlow(engines["local:west"])
        assert flow.allowed("local:east", "local:west") is None


# ---- finding 6: records that expire, a ledger pruned


def test_plan_records_expire_and_prune_drops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = JobLedger(tmp_path / "state")
    plan = plan_job(PLAN_BACKUPS, "local:east", SLOT)
    handlers = JobHandlers({PLAN_BACKUPS: lambda job: {"jobs": []}, "retention": lambda j: {}})
    assert execute_job(plan, handlers, ledger).status is JobStatus.DONE
    other = retention_job("local:east", SLOT)
    assert execute_job(other, handlers, ledger).status is JobStatus.DONE
    assert ledger.record(plan.key) is not None
    import time as time_module

    later = time_module.time() + timedelta(days=1).total_seconds() + 1
    monkeypatch.setattr("regionvault.core.pipeline.ledger.time.time", lambda: later)
    assert ledger.record(plan.key) is None  # expired: as if absent
    assert ledger.record(other.key) is not None  # kept: it has no expiry
    assert ledger.prune(older_than=datetime(2000, 1, 1, tzinfo=UTC)) == 1
    assert ledger.record(other.key) is not None


def test_a_ledger_without_expires_is_called_without_it() -> None:
    seen: list[JobOutcome] = []

    class OldLedger:
        def record(self, key: str) -> None:
            return None

        def acquire(self, key: str) -> Any:
            class Lock:
                def release(self) -> None:
                    pass

            return Lock()

        def holder(self, key: str) -> None:
            return None

        def mark_done(self, outcome: JobOutcome) -> None:
            seen.append(outcome)

        def mark_failed(self, outcome: JobOutcome) -> None:
            raise AssertionError(outcome.error)

    plan = plan_job(PLAN_BACKUPS, "local:east", SLOT)
    handlers = JobHandlers({PLAN_BACKUPS: lambda job: {"jobs": []}})
    assert execute_job(plan, handlers, OldLedger()).status is JobStatus.DONE
    assert len(seen) == 1


def test_the_retention_job_prunes_the_ledger(site: Site) -> None:
    engine = Engine(site)
    ledger = engine.ledger()
    assert isinstance(ledger, JobLedger)
    old = JobOutcome(
        "backup/local:east/i-old/2026-01-01T00:00Z",
        "backup",
        "local:east",
        JobStatus.DONE,
        result={"point": "x"},
        finished_at=datetime.now(UTC) - timedelta(days=31),
    )
    ledger.mark_done(old)
    outcome = execute_job(retention_job("local:east", SLOT), job_handlers(engine), ledger)
    assert outcome.status is JobStatus.DONE, outcome.error
    assert outcome.result["ledger_pruned"] >= 1
    assert ledger.record(old.key) is None


def test_a_failing_prune_does_not_fail_retention(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(site)

    def broken(self: JobLedger, older_than: datetime, **_: Any) -> int:
        raise RegionVaultError("ledger full")

    monkeypatch.setattr(JobLedger, "prune", broken)
    outcome = execute_job(
        retention_job("local:east", SLOT),
        job_handlers(engine),
        JobLedger(engine.site.config.state_dir / "x"),
    )
    assert outcome.status is JobStatus.DONE
    assert "ledger full" in str(outcome.result["ledger_pruned"])
