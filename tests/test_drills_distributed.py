"""Scheduled drills on a distributed tick: ``plan-drills`` runs in every region, and the
``drill`` job in the destination region that holds the copy, on that region's worker (its
keys alone), as :func:`runs_in` routes it (what the Celery executor's queues follow). The
deployment (a coordinator that opens no region, one worker per region) is
tests/test_distributed_tick.py's."""

from __future__ import annotations

import shutil
from datetime import timedelta

from regionvault.core.pipeline.drills import DRILL_TAG, plan_drills
from regionvault.core.pipeline.jobs import DRILL, PLAN_DRILLS, JobStatus
from regionvault.core.pipeline.objectives import last_drill
from test_distributed_tick import EAST, WEST, Deployment, dataset, deployment

__all__ = ["dataset", "deployment"]  # the fixtures this module takes from there


def test_a_distributed_tick_drills_in_the_destination_region(deployment: Deployment) -> None:
    with deployment.worker(EAST) as east:
        compute = east.site.region(EAST).compute
        (nf,) = compute.list_instances()
        compute.set_tags(nf.id, {"backup-drill": "1d", "backup-rto": "10m"})

    report, routed = deployment.tick()
    assert report.ok, (report.problems, [o.error for o in report.failures()])
    assert {(kind, region) for kind, region, _ in routed.routed if kind == PLAN_DRILLS} == {
        (PLAN_DRILLS, EAST),
        (PLAN_DRILLS, WEST),
    }
    (drill,) = [o for o in report.jobs if o.kind == DRILL]
    assert drill.status is JobStatus.DONE and drill.key.startswith(f"drill/{WEST}/{nf.id}/")
    assert [(k, r) for k, r, _ in routed.routed if k == DRILL] == [(DRILL, WEST)]

    with deployment.worker(WEST) as west:
        compute = west.site.region(WEST).compute
        assert compute.get_instance(drill.result["launched"]).state == "terminated"
        assert list(compute.list_instances(tag_filters={DRILL_TAG: None})) == []
        # recorded where it ran: on the west worker
        record = west.engine.state.last_drill(WEST, nf.id)
        assert (
            record is not None and record.healthy and record.launched_id == drill.result["launched"]
        )
        # another machine of west (no drill cache of its own) reads the drill from west's
        # event log, with west's keys alone; its planner does not drill the slot again
        shutil.rmtree(west.site.config.state_dir / "drills")
        now = deployment.now[0]
        seen = last_drill(west.engine, WEST, nf.id, since=now - timedelta(days=1), now=now)
        assert seen is not None and seen.healthy and seen.launched_id == record.launched_id
        assert plan_drills(west.engine, WEST, now).jobs == []

    # the next tick within the interval plans no drill; after it, one more
    deployment.now[0] += timedelta(hours=2)
    again, _ = deployment.tick()
    assert [o for o in again.jobs if o.kind == DRILL] == []
    deployment.now[0] += timedelta(days=1)
    third, _ = deployment.tick()
    assert [o.status for o in third.jobs if o.kind == DRILL] == [JobStatus.DONE]
