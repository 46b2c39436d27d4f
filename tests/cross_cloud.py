"""The source half of the cross-cloud tests (tests/azure/test_cross_cloud.py,
tests/gcp/test_gcp_cross_cloud.py): an EC2 instance on the AWS provider (a moto server) whose
volumes are seeded snapshots, and a site of ``aws:us-east-1`` replicating to another cloud's
region that one tick backs the instance up in and copies it out of.

moto does not tie a volume's contents to the snapshots taken of it, so each volume is seeded
as an EBS snapshot through the EBS direct APIs and named by the instance tag
``regionvault:capture-snapshot`` (``...:<device>`` for the others), as
tests/aws/test_aws_end_to_end.py does. Each volume is 1 GiB with data at its start and in its
very last block.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.core.types import Instance, RecoveryPoint
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.testing import (
    DUMMY_CREDENTIALS,
    EBS_BLOCK_SIZE,
    MotoServer,
    mixed_disk_blocks,
    region_settings,
    seed_snapshot,
)

__all__ = [
    "AWS_REGION",
    "EBS_BLOCK_SIZE",
    "LAST_BLOCK",
    "ROOT_DEVICE",
    "VOLUME",
    "Launched",
    "aws_endpoint",
    "image",
    "launch_across",
    "seed_ec2_instance",
    "volume_blocks",
    "zeros_beyond",
]

AWS_REGION = "us-east-1"
SOURCE = f"aws:{AWS_REGION}"
GiB = 1024**3
VOLUME = 1 * GiB
LAST_BLOCK = VOLUME // EBS_BLOCK_SIZE - 1
ZERO_BLOCK = bytes(EBS_BLOCK_SIZE)
ROOT_DEVICE = "/dev/sda1"


@contextlib.contextmanager
def aws_endpoint(
    server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """``server``, reset, with dummy credentials in the environment for the test only."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    server.reset()
    yield server.endpoint


def client(service: str, endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(service, region_name=AWS_REGION, endpoint_url=endpoint)


def snapshot_blocks(endpoint: str, snapshot_id: str) -> dict[int, bytes]:
    """Every block of an EBS snapshot, read with the EBS direct APIs."""
    ebs = client("ebs", endpoint)
    out: dict[int, bytes] = {}
    token: str | None = None
    for _page in range(100):
        kwargs: dict[str, Any] = {"SnapshotId": snapshot_id}
        if token:
            kwargs["NextToken"] = token
        listed = ebs.list_snapshot_blocks(**kwargs)
        for block in listed["Blocks"]:
            answer = ebs.get_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=block["BlockIndex"],
                BlockToken=block["BlockToken"],
            )
            out[int(block["BlockIndex"])] = answer["BlockData"].read()
        token = listed.get("NextToken")
        if not token:
            break
    return out


def image(blocks: Mapping[int, bytes]) -> dict[int, bytes]:
    """Blocks as a disk sees them: zero-padded, all-zero blocks dropped."""
    padded = {i: d.ljust(EBS_BLOCK_SIZE, b"\0") for i, d in blocks.items()}
    return {i: d for i, d in padded.items() if d != ZERO_BLOCK}


def volume_blocks(seed: int) -> dict[int, bytes]:
    """6 MiB of mixed content at the start of a 1 GiB volume, and one block at its very end."""
    blocks = mixed_disk_blocks(6 * 1024 * 1024, seed=seed)
    blocks[LAST_BLOCK] = mixed_disk_blocks(EBS_BLOCK_SIZE, seed=seed + 1)[0]
    return blocks


def seed_ec2_instance(
    endpoint: str, devices: Mapping[str, Mapping[int, bytes]], tags: Mapping[str, str]
) -> tuple[str, list[dict[int, bytes]]]:
    """An m5.large instance tagged ``tags`` whose volumes (device -> blocks, the root first,
    1 GiB each) are seeded snapshots; returns its id and each volume's non-zero blocks as
    the EBS direct APIs read them back. moto names every instance's root device
    ``/dev/sda1``, whatever its image says: so must the first device."""
    names = list(devices)
    assert names[0] == ROOT_DEVICE
    ebs = client("ebs", endpoint)
    volumes: list[dict[int, bytes]] = []
    internal: dict[str, str] = {}
    for n, (device, blocks) in enumerate(devices.items()):
        seeded = seed_snapshot(ebs, dict(blocks), volume_size_gib=1)
        volume = image(snapshot_blocks(endpoint, seeded))
        assert volume == image(blocks) and LAST_BLOCK in volume
        volumes.append(volume)
        internal[CAPTURE_SNAPSHOT_TAG if n == 0 else f"{CAPTURE_SNAPSHOT_TAG}:{device}"] = seeded
    ec2 = client("ec2", endpoint)
    mappings = [{"DeviceName": d, "Ebs": {"VolumeSize": 1}} for d in names]
    ami = ec2.register_image(
        Name="rv-cross-cloud-base",
        RootDeviceName=names[0],
        BlockDeviceMappings=mappings[:1],
        VirtualizationType="hvm",
        Architecture="x86_64",
    )["ImageId"]
    every_tag = {**tags, **internal}
    answer = ec2.run_instances(
        ImageId=ami,
        InstanceType="m5.large",
        MinCount=1,
        MaxCount=1,
        BlockDeviceMappings=mappings,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": k, "Value": v} for k, v in every_tag.items()],
            }
        ],
    )
    return str(answer["Instances"][0]["InstanceId"]), volumes


@dataclass(frozen=True)
class Launched:
    """What :func:`launch_across` made: the source point, its copy at the destination, and
    the instance launched there from the copy."""

    point: RecoveryPoint
    copy: RecoveryPoint
    image_size: int
    instance: Instance


def launch_across(
    tmp_path: Path,
    *,
    source: tuple[str, Mapping[str, Any]],
    destination: tuple[str, Mapping[str, Any]],
    instance_id: str,
) -> Launched:
    """A site of ``source`` (region name, settings) replicating to ``destination``; one tick
    backs ``instance_id`` up at the source and copies it; the copy, which the source's keys
    cannot open, is restored and launched at the destination."""
    a, b = source[0], destination[0]
    doc = {
        "site": {"name": "cross-cloud", "state_dir": str(tmp_path / "state")},
        "regions": {a: dict(source[1]), b: dict(destination[1])},
        "replication": [{"from": a, "to": b}],
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, clock=lambda: now)
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        backup = next(o for o in report.jobs if o.kind == BACKUP)
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        point = engine.find_point(backup.result["point"], a)
        copy = engine.find_point(copy_job.result["copy"], b)
        assert (point.instance_id, point.region, copy.region) == (instance_id, a, b)
        assert point.kind == copy.kind
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id
        manifest = engine.repository(b).load_manifest(copy.id)
        # the copy is the destination's alone: the source's keys cannot open its repository
        with pytest.raises(KeyAccessDenied):
            Repository.open(site.region(b).vault, site.region(a).keys, region=b)
        result = engine.restore(copy.id, region=b, launch=True)
        assert result.healthy and result.instance is not None
        assert result.instance.region == b
        return Launched(point, copy, manifest.image_size, result.instance)


def aws_source(endpoint: str) -> tuple[str, dict[str, Any]]:
    """The source region ``aws:us-east-1`` on the moto server at ``endpoint``."""
    return SOURCE, region_settings(AWS_REGION, endpoint_url=endpoint, tag=uuid.uuid4().hex[:10])


def zeros_beyond(path: Path, start: int) -> bool:
    """True when a (sparse) disk file holds only zeros at and after ``start``: only its data
    ranges are read, so a mostly empty 10 GB disk costs nothing."""
    from regionvault.providers.gcp.fakes.compute import data_extents

    with path.open("rb") as f:
        fd = f.fileno()
        for first, end in data_extents(fd, os.fstat(fd).st_size):
            offset = max(first, start)
            while offset < end:
                chunk = os.pread(fd, min(end - offset, 8 << 20), offset)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return False
                offset += len(chunk)
    return True
