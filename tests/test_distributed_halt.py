"""The first Ctrl-C during a distributed tick (issue #20, item 3): ``Service.halt`` stops it
between its rounds as it stops the in-process tick between its steps. The jobs running
finish, no plan job nor round starts after, the report's notes name what was not run, and
the next tick does it. Run on the test distributed executor of test_distributed_tick (each
job as JSON to its region's worker)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY_COMMIT,
    PLAN_BACKUPS,
    PLAN_KINDS,
    RETENTION,
    TAG,
    Job,
    JobOutcome,
)
from regionvault.core.site import Region, Site
from test_distributed_tick import Deployment, worked


@pytest.fixture
def deployed(
    site: Site, east: Region, west: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Deployment:
    data = tmp_path / "nf-data"
    data.mkdir()
    (data / "part.bin").write_bytes(random.Random(20).randbytes(300_000))
    east.compute.register_instance("nf-1", data, tags={"backup": "1-7"})
    east.sealer(), west.sealer()
    site.close()
    return Deployment(tmp_path, east, west, monkeypatch)


def test_a_halt_during_the_backups_round_stops_the_distributed_tick_there(
    deployed: Deployment,
) -> None:
    with deployed.coordinator() as (service, routed):
        halt = threading.Event()
        service.halt = halt
        plain_run = routed.run

        def run(jobs: Iterable[Job]) -> list[JobOutcome]:
            jobs = list(jobs)
            outcomes = plain_run(jobs)
            if any(job.kind == BACKUP for job in jobs):
                halt.set()  # Ctrl-C while the backup ran: it finishes, nothing after starts
            return outcomes

        routed.run = run  # type: ignore[method-assign]
        report = service.tick()

    assert worked(report) == [TAG, TAG, BACKUP], worked(report)
    assert report.ok, [o.error for o in report.failures()]
    # no region was asked to plan anything after the backups' round
    assert [kind for kind, _, _ in routed.routed if kind in PLAN_KINDS] == [PLAN_BACKUPS] * 2
    assert "stopped before retention: 2 job(s) not run" in report.notes, report.notes
    (backup,) = (o for o in report.jobs if o.kind == BACKUP)
    assert backup.ok and backup.result["point"]

    # the next tick does what was left: the copy, and retention
    again, _ = deployed.tick()
    assert again.ok, [o.error for o in again.failures()]
    ran = worked(again)
    assert COPY_COMMIT in ran and ran.count(RETENTION) == 2 and BACKUP not in ran, ran
    assert not [n for n in again.notes if n.startswith("stopped")]
