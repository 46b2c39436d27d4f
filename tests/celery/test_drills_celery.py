"""A scheduled drill through the Celery executor: real ``regionvault worker`` processes on a
private redis-server, one per region. The ``drill`` job goes to the destination region's
queue (``runs_in``) and runs on a west worker, which holds west's keys alone; the launched
instance is terminated there."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import EAST, WEST, Cluster, runner_pid
from regionvault.core.pipeline.drills import DRILL_TAG
from regionvault.core.pipeline.jobs import DRILL, PLAN_DRILLS, JobStatus
from regionvault.core.site import Region, Site
from regionvault.plugins.celery import plugin as celery_plugin
from regionvault.plugins.celery.redis_server import RedisServer
from site_support import open_site

pytest.importorskip(
    "celery", reason="the celery tests need celery[redis]: pip install -e '.[test]'"
)


@pytest.fixture
def own_redis(redis_binary: None, tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server
    assert not server.running


def test_a_drill_runs_on_the_destination_regions_worker(
    site: Site, east: Region, west: Region, tmp_path: Path, own_redis: RedisServer
) -> None:
    data = tmp_path / "nf-data"
    data.mkdir()
    (data / "db.bin").write_bytes(random.Random(19).randbytes(100_000))
    tags = {"backup": "1-7", "backup-drill": "1d", "backup-rto": "10m"}
    nf = east.compute.register_instance("nf-1", data, tags=tags)
    east.sealer(), west.sealer()
    site.close()
    cluster = Cluster(tmp_path, east, west, own_redis.url)
    try:
        cluster.start("east-1", "west-1")
        with cluster.coordinator() as (service, _):
            report = service.tick()
        assert report.ok, (report.problems, [o.error for o in report.failures()])
        (drill,) = [o for o in report.jobs if o.kind == DRILL]
        assert drill.status is JobStatus.DONE and drill.region == WEST
        assert drill.key.startswith(f"drill/{WEST}/{nf.id}/")
        assert runner_pid(drill.runner) in cluster.pids(WEST)
        plans = {o.region for o in report.jobs if o.kind == PLAN_DRILLS}
        assert plans == {EAST, WEST}
        assert drill.result["healthy"] is True and drill.result["terminated"] is True
    finally:
        cluster.stop_all()
    with open_site(cluster.files[WEST], celery_plugin) as worker_site:
        compute = worker_site.region(WEST).compute
        assert compute.get_instance(drill.result["launched"]).state == "terminated"
        assert list(compute.list_instances(tag_filters={DRILL_TAG: None})) == []
