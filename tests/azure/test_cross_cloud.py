"""Across clouds: an EC2 instance on the AWS provider (a moto server) backed up in
``aws:us-east-1``, copied into the Azure region ``azure:west`` (Azurite, a fake Key Vault and
an ARM fake: tests/azure/azure_regions.py) and launched there as a VM whose managed disk holds
the EC2 volume's bytes.

moto does not tie a volume's contents to the snapshots taken of it, so the instance's root
volume is seeded as an EBS snapshot through the EBS direct APIs and named by the instance tag
``regionvault:capture-snapshot``, as tests/aws/test_aws_end_to_end.py does. The volume is
1 GiB with data at its start and in its very last block: the managed disk is 1 GiB too, and
is compared block for block with the snapshot (read with the EBS direct APIs) through the
page ranges Azurite holds, so the 1 GiB of mostly zeros is never downloaded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from azure_regions import RESOURCE_GROUP, AzureRegion, azure_regions
from azure_world import AzureWorld
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import CAPTURE_SNAPSHOT_TAG
from regionvault.providers.aws.testing import (
    DUMMY_CREDENTIALS,
    EBS_BLOCK_SIZE,
    MotoServer,
    mixed_disk_blocks,
    region_settings,
    seed_snapshot,
)
from regionvault.providers.azure.compute import INTERNAL_PREFIX

pytest.importorskip(
    "moto", reason="the cross-cloud test needs moto[server]: pip install -e '.[test]'"
)

AWS_REGION = "us-east-1"
A, B = f"aws:{AWS_REGION}", "azure:west"
GiB = 1024**3
VOLUME = 1 * GiB
LAST_BLOCK = VOLUME // EBS_BLOCK_SIZE - 1
ZERO_BLOCK = bytes(EBS_BLOCK_SIZE)
ROOT_DEVICE = "/dev/sda1"


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(log=tmp_path_factory.mktemp("moto") / "moto-server.log") as server:
        yield server


@pytest.fixture
def aws_endpoint(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """The moto server, reset, with dummy credentials in the environment for the test only."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    moto_server.reset()
    yield moto_server.endpoint


@pytest.fixture
def west(azure: AzureWorld, tmp_path: Path) -> Iterator[AzureRegion]:
    with azure_regions(azure.server, tmp_path / "fakes", ["west"]) as made:
        yield made[B]


def _client(service: str, endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(service, region_name=AWS_REGION, endpoint_url=endpoint)


def _run_instance(endpoint: str, tags: dict[str, str], devices: list[str]) -> str:
    """An m5.large instance whose block devices are ``devices`` (the root first), 1 GiB each.
    moto names every instance's root device ``/dev/sda1``, whatever its image says: so must
    ``devices[0]``, or the root's seeded snapshot would name no volume of the instance."""
    assert devices[0] == ROOT_DEVICE
    ec2 = _client("ec2", endpoint)
    mappings = [{"DeviceName": d, "Ebs": {"VolumeSize": 1}} for d in devices]
    image = ec2.register_image(
        Name="rv-cross-cloud-base",
        RootDeviceName=devices[0],
        BlockDeviceMappings=mappings[:1],
        VirtualizationType="hvm",
        Architecture="x86_64",
    )["ImageId"]
    answer = ec2.run_instances(
        ImageId=image,
        InstanceType="m5.large",
        MinCount=1,
        MaxCount=1,
        BlockDeviceMappings=mappings,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    )
    return str(answer["Instances"][0]["InstanceId"])


def _snapshot_blocks(endpoint: str, snapshot_id: str) -> dict[int, bytes]:
    """Every block of an EBS snapshot, read with the EBS direct APIs."""
    ebs = _client("ebs", endpoint)
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


def _page_blob_blocks(blob: Any, size: int) -> dict[int, bytes]:
    """The 512 KiB blocks of a page blob's first ``size`` bytes that hold written pages (a
    page never written reads as zeros), read range by range."""
    out: dict[int, bytes] = {}
    for page in blob.list_page_ranges():
        if page.cleared:
            continue
        start, end = int(page.start), min(int(page.end) + 1, size)
        first, last = start // EBS_BLOCK_SIZE, (end - 1) // EBS_BLOCK_SIZE
        for index in range(first, last + 1):
            if index not in out and index * EBS_BLOCK_SIZE < size:
                offset = index * EBS_BLOCK_SIZE
                length = min(EBS_BLOCK_SIZE, size - offset)
                out[index] = bytes(blob.download_blob(offset=offset, length=length).readall())
    return out


def _image(blocks: dict[int, bytes]) -> dict[int, bytes]:
    """Blocks as a disk sees them: zero-padded, all-zero blocks dropped."""
    padded = {i: d.ljust(EBS_BLOCK_SIZE, b"\0") for i, d in blocks.items()}
    return {i: d for i, d in padded.items() if d != ZERO_BLOCK}


def _volume(seed: int) -> dict[int, bytes]:
    """6 MiB of mixed content at the start of a 1 GiB volume, and one block at its very end."""
    blocks = mixed_disk_blocks(6 * 1024 * 1024, seed=seed)
    blocks[LAST_BLOCK] = mixed_disk_blocks(EBS_BLOCK_SIZE, seed=seed + 1)[0]
    return blocks


def _launch_across_clouds(
    aws_endpoint: str, west: AzureRegion, tmp_path: Path, devices: dict[str, dict[int, bytes]]
) -> None:
    """An instance whose volumes (device -> blocks, the root first) are seeded snapshots,
    ticked through a site of aws:us-east-1 replicating to azure:west, then launched in
    azure:west: its OS disk must equal the root volume and its data disks (LUN 0, 1, ...)
    the other volumes in device order, block for block."""
    tags = {"backup": "1-7", "Name": "vcu-7", "function": "vCU", "cell-site": "cs-0042"}
    ebs = _client("ebs", aws_endpoint)
    volumes: list[dict[int, bytes]] = []
    internal: dict[str, str] = {}
    for n, (device, blocks) in enumerate(devices.items()):
        seeded = seed_snapshot(ebs, blocks, volume_size_gib=1)
        volume = _image(_snapshot_blocks(aws_endpoint, seeded))
        assert volume == _image(blocks) and LAST_BLOCK in volume
        volumes.append(volume)
        internal[CAPTURE_SNAPSHOT_TAG if n == 0 else f"{CAPTURE_SNAPSHOT_TAG}:{device}"] = seeded
    instance_id = _run_instance(aws_endpoint, {**tags, **internal}, list(devices))

    doc = {
        "site": {"name": "cross-cloud", "state_dir": str(tmp_path / "state")},
        "regions": {
            A: region_settings(AWS_REGION, endpoint_url=aws_endpoint, tag=uuid.uuid4().hex[:10]),
            B: west.settings,
        },
        "replication": [{"from": A, "to": B}],
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    now = datetime.now(UTC).replace(microsecond=0)
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, clock=lambda: now)

        # ---- one tick backs the instance up on AWS and copies it into Azure
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        backup = next(o for o in report.jobs if o.kind == BACKUP)
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        point = engine.find_point(backup.result["point"], A)
        copy = engine.find_point(copy_job.result["copy"], B)
        assert (point.instance_id, point.region, copy.region) == (instance_id, A, B)
        assert point.kind == copy.kind
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id
        manifest = engine.repository(B).load_manifest(copy.id)
        assert manifest.image_size >= VOLUME * len(devices)
        # the copy is Azure's alone: AWS's KMS key cannot open west's repository
        with pytest.raises(KeyAccessDenied):
            Repository.open(site.region(B).vault, site.region(A).keys, region=B)

        # ---- launched in Azure as a VM whose managed disks are the EC2 volumes
        result = engine.restore(copy.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        launched = result.instance
        assert launched.region == B
        assert launched.tags == tags
        raw = west.world.client.virtual_machines.get(RESOURCE_GROUP, launched.extra["vm_name"])
        assert {k: v for k, v in raw.tags.items() if not k.startswith(INTERNAL_PREFIX)} == tags
        # an EC2 instance type is no Azure VM size: the region's own is taken
        assert raw.hardware_profile.vm_size == west.settings["vm_size"]
        data_disks = sorted(raw.storage_profile.data_disks or [], key=lambda d: d.lun)
        assert [d.lun for d in data_disks] == list(range(len(devices) - 1))
        disk_ids = [str(raw.storage_profile.os_disk.managed_disk.id)]
        disk_ids += [str(d.managed_disk.id) for d in data_disks]
        for disk_id, volume in zip(disk_ids, volumes, strict=True):
            managed = west.world.client.disks.get(RESOURCE_GROUP, disk_id.rsplit("/", 1)[-1])
            assert managed.disk_size_bytes == VOLUME
            restored = _page_blob_blocks(west.arm.blob_client(disk_id), VOLUME)
            assert _image(restored) == volume, disk_id
            # past the data: the VHD footer of a 1 GiB fixed disk, nothing else
            footer = west.arm.footer(disk_id)
            assert footer[:8] == b"conectix" and int.from_bytes(footer[48:56], "big") == VOLUME


def test_ec2_instance_backed_up_on_aws_launches_as_an_azure_vm(
    aws_endpoint: str, west: AzureRegion, tmp_path: Path
) -> None:
    _launch_across_clouds(aws_endpoint, west, tmp_path, {ROOT_DEVICE: _volume(20261207)})


def test_ec2_instance_of_two_volumes_launches_as_an_azure_vm_of_two_disks(
    aws_endpoint: str, west: AzureRegion, tmp_path: Path
) -> None:
    _launch_across_clouds(
        aws_endpoint,
        west,
        tmp_path,
        {ROOT_DEVICE: _volume(20261207), "/dev/sdf": _volume(31)},
    )
