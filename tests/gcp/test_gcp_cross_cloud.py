"""Across clouds into GCP: an EC2 instance on the AWS provider (a moto server) backed up in
``aws:us-east-1``, copied into ``gcp:west`` (a bucket pair of the session's
gcp-storage-emulator, a Cloud KMS fake and a Compute Engine fake with its backup worker) and
launched there as a GCE instance whose persistent disks hold the EC2 volumes' bytes, the root
volume as the boot disk and the others attached in device order (tests/cross_cloud.py seeds
the volumes). The Azure VM launched on GCE is in tests/azure/test_cross_cloud.py, beside the
Azure fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cross_cloud import (
    EBS_BLOCK_SIZE,
    LAST_BLOCK,
    ROOT_DEVICE,
    VOLUME,
    aws_endpoint,
    aws_source,
    image,
    launch_across,
    seed_ec2_instance,
    volume_blocks,
)
from regionvault.providers.aws.testing import MotoServer
from regionvault.providers.gcp.conformance import WORKER, OfflineRegion, offline_region
from regionvault.providers.gcp.emulator import GcsEmulator

pytest.importorskip(
    "moto", reason="the cross-cloud test needs moto[server]: pip install -e '.[test]'"
)

B = "gcp:west"
#: what the worker sees of its own: its boot disk
WORKER_DEVICES = ["google-persistent-disk-0"]


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(log=tmp_path_factory.mktemp("moto") / "moto-server.log") as server:
        yield server


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with aws_endpoint(moto_server, monkeypatch, tmp_path) as endpoint:
        yield endpoint


@pytest.fixture
def west(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[OfflineRegion]:
    tag = os.urandom(5).hex()
    with offline_region(
        "west", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=tag
    ) as made:
        yield made


def disk_blocks(path: Path, size: int) -> dict[int, bytes]:
    """The non-zero EBS-sized blocks of a disk file's first ``size`` bytes, holes skipped."""
    out: dict[int, bytes] = {}
    with path.open("rb") as f:
        fd = f.fileno()
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
            first = offset // EBS_BLOCK_SIZE
            for index in range(first, -(-end // EBS_BLOCK_SIZE)):
                out[index] = os.pread(fd, EBS_BLOCK_SIZE, index * EBS_BLOCK_SIZE)
            offset = max(end, offset + 1)
    return image(out)


def launched_disks(west: OfflineRegion, name: str) -> list[dict[str, Any]]:
    """The launched instance's disks as GCE lists them: boot first, then by index."""
    disks = west.gce.instance(name)["disks"]
    return sorted(disks, key=lambda d: (not d.get("boot"), int(d.get("index", 0))))


def _launch_on_gce(
    aws: str, west: OfflineRegion, tmp_path: Path, devices: dict[str, dict[int, bytes]]
) -> None:
    tags = {"backup": "1-7", "function": "vcu", "cell-site": "cs-0042"}
    instance_id, volumes = seed_ec2_instance(aws, devices, tags)
    done = launch_across(
        tmp_path, source=aws_source(aws), destination=(B, west.settings), instance_id=instance_id
    )
    assert done.image_size >= VOLUME * len(devices)
    launched = done.instance
    assert launched.tags == tags
    raw = west.gce.instance(launched.name)
    assert raw["status"] == "RUNNING" and raw["labels"] == tags
    # an EC2 instance type is no GCE machine type: the region's own is taken
    assert raw["machineType"].rsplit("/", 1)[-1] == west.settings["machine_type"]
    disks = launched_disks(west, launched.name)
    assert len(disks) == len(devices) and disks[0].get("boot")
    for disk, volume in zip(disks, volumes, strict=True):
        path = west.gce.disk_path(str(disk["source"]).rsplit("/", 1)[-1])
        assert path.stat().st_size >= VOLUME
        restored = disk_blocks(path, path.stat().st_size)
        assert restored == volume and LAST_BLOCK in restored, disk["source"]
    # the worker let go of every disk it wrote
    assert len(west.gce.instance(WORKER)["disks"]) == 1
    assert sorted(p.name for p in west.gce.device_dir.iterdir()) == WORKER_DEVICES


def test_ec2_instance_backed_up_on_aws_launches_as_a_gce_instance(
    aws: str, west: OfflineRegion, tmp_path: Path
) -> None:
    _launch_on_gce(aws, west, tmp_path, {ROOT_DEVICE: volume_blocks(20261207)})


def test_ec2_instance_of_two_volumes_launches_on_gce_with_two_disks(
    aws: str, west: OfflineRegion, tmp_path: Path
) -> None:
    _launch_on_gce(
        aws, west, tmp_path, {ROOT_DEVICE: volume_blocks(20261207), "/dev/sdf": volume_blocks(31)}
    )
