"""A restore-and-launch that fails on AWS leaves nothing behind: the engine discards the
restore sink, which deletes the snapshot it wrote (and deregisters the image a failed launch
registered from it). Against the moto server, one region: an instance whose disk is a seeded
EBS snapshot is backed up, then restored with a launch that EC2 refuses (an unknown subnet).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, AwsWorld
from regionvault.core.errors import ComputeError
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG, RESTORE_TAG
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, live_mode, seed_snapshot

pytestmark = pytest.mark.skipif(
    live_mode(), reason="moto only: it backs up a seeded snapshot (see test_aws_end_to_end.py)"
)

A = f"aws:{EAST}"


def _restore_leftovers(aws: AwsWorld) -> dict[str, list[str]]:
    """The snapshots and images in us-east-1 that a restore made (tagged RESTORE_TAG)."""
    ec2 = aws.client("ec2", EAST)

    def restored(items: list[dict[str, Any]]) -> bool:
        return any(t["Key"] == RESTORE_TAG for t in items)

    snapshots = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    images = ec2.describe_images(Owners=["self"])["Images"]
    return {
        "snapshots": [s["SnapshotId"] for s in snapshots if restored(s.get("Tags") or [])],
        "images": [i["ImageId"] for i in images if restored(i.get("Tags") or [])],
    }


def test_a_failed_launch_deletes_the_restored_snapshot(aws: AwsWorld, tmp_path: Path) -> None:
    disk = {0: os.urandom(EBS_BLOCK_SIZE), 5: b"subscriber state".ljust(EBS_BLOCK_SIZE, b"\0")}
    seeded = seed_snapshot(aws.client("ebs", EAST), disk, volume_size_gib=1)
    tags = {"backup": "1-7", "Name": "vcu-1", CAPTURE_SNAPSHOT_TAG: seeded}
    instance_id = aws.run_instance(EAST, tags, instance_type="m5.large")
    settings = aws.settings(EAST, security_group_ids=["sg-0badc0ffee0000000"])
    doc = {
        "site": {"name": "failed-restore", "state_dir": str(tmp_path / "state")},
        "regions": {A: settings},
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, health_timeout=5.0)
        point = engine.backup(instance_id, region=A)
        assert _restore_leftovers(aws) == {"snapshots": [], "images": []}
        written: list[str] = []
        compute = site.region(A).compute
        open_sink = compute.open_restore_sink

        def recording_open(*args: Any, **kwargs: Any) -> Any:
            sink = open_sink(*args, **kwargs)
            written.append(sink.snapshot_id)
            return sink

        compute.open_restore_sink = recording_open  # type: ignore[method-assign]
        with pytest.raises(ComputeError, match="cannot run an instance"):
            engine.restore(point.id, region=A, launch=True)
        assert len(written) == 1  # a snapshot was written, and then removed
        assert _restore_leftovers(aws) == {"snapshots": [], "images": []}
        assert [i.id for i in compute.list_instances()] == [instance_id]
        assert engine.state.last_drill(A, instance_id) is None
