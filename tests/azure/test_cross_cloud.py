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

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure_regions import RESOURCE_GROUP, AzureRegion, azure_regions
from azure_world import AzureWorld
from cross_cloud import (
    EBS_BLOCK_SIZE,
    ROOT_DEVICE,
    VOLUME,
    aws_endpoint,
    aws_source,
    image,
    launch_across,
    seed_ec2_instance,
    volume_blocks,
    zeros_beyond,
)
from regionvault.providers.aws.testing import MotoServer
from regionvault.providers.azure.compute import INTERNAL_PREFIX

pytest.importorskip(
    "moto", reason="the cross-cloud test needs moto[server]: pip install -e '.[test]'"
)

B = "azure:west"


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(log=tmp_path_factory.mktemp("moto") / "moto-server.log") as server:
        yield server


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with aws_endpoint(moto_server, monkeypatch, tmp_path) as endpoint:
        yield endpoint


@pytest.fixture
def west(azure: AzureWorld, tmp_path: Path) -> Iterator[AzureRegion]:
    with azure_regions(azure.server, tmp_path / "fakes", ["west"]) as made:
        yield made[B]


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


def _launch_across_clouds(
    aws: str, west: AzureRegion, tmp_path: Path, devices: dict[str, dict[int, bytes]]
) -> None:
    """An instance whose volumes (device -> blocks, the root first) are seeded snapshots,
    ticked through a site of aws:us-east-1 replicating to azure:west, then launched in
    azure:west: its OS disk must equal the root volume and its data disks (LUN 0, 1, ...)
    the other volumes in device order, block for block."""
    tags = {"backup": "1-7", "Name": "vcu-7", "function": "vCU", "cell-site": "cs-0042"}
    instance_id, volumes = seed_ec2_instance(aws, devices, tags)
    done = launch_across(
        tmp_path, source=aws_source(aws), destination=(B, west.settings), instance_id=instance_id
    )
    assert done.image_size >= VOLUME * len(devices)
    launched = done.instance
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
        assert image(restored) == volume, disk_id
        # past the data: the VHD footer of a 1 GiB fixed disk, nothing else
        footer = west.arm.footer(disk_id)
        assert footer[:8] == b"conectix" and int.from_bytes(footer[48:56], "big") == VOLUME


def test_ec2_instance_backed_up_on_aws_launches_as_an_azure_vm(
    aws: str, west: AzureRegion, tmp_path: Path
) -> None:
    _launch_across_clouds(aws, west, tmp_path, {ROOT_DEVICE: volume_blocks(20261207)})


def test_ec2_instance_of_two_volumes_launches_as_an_azure_vm_of_two_disks(
    aws: str, west: AzureRegion, tmp_path: Path
) -> None:
    _launch_across_clouds(
        aws,
        west,
        tmp_path,
        {ROOT_DEVICE: volume_blocks(20261207), "/dev/sdf": volume_blocks(31)},
    )


# --------------------------------------------------------------------------- Azure to GCP

MiB = 1024 * 1024
#: the Azure VM's disks: an OS disk and a data disk of other sizes (whole MiB, above Azure's
#: 20 MiB upload minimum), so that a swap or a truncation shows on GCE
OS_DISK, DATA_DISK = 24 * MiB, 21 * MiB


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("google.cloud.storage", reason="the GCP side needs the Google Cloud SDK")
    from regionvault.providers.gcp.emulator import GcsEmulator

    with GcsEmulator(
        log=tmp_path_factory.mktemp("gcs") / "gcs.log", preconditions=True
    ) as emulator:
        yield emulator


def _pieces(seed: int, size: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {0: rng.randbytes(3 * MiB), 9 * MiB: rng.randbytes(MiB), size - MiB: rng.randbytes(MiB)}


def _flat(pieces: dict[int, bytes], size: int) -> bytes:
    out = bytearray(size)
    for offset, data in pieces.items():
        out[offset : offset + len(data)] = data
    return bytes(out)


def test_azure_vm_of_two_disks_backed_up_on_azure_launches_as_a_gce_instance(
    azure: AzureWorld, gcs: Any, tmp_path: Path
) -> None:
    """A VM in azure:east (an OS disk and a data disk at LUN 0) is backed up under east's Key
    Vault key, copied into gcp:west under west's Cloud KMS key and launched there as a GCE
    instance: its boot disk holds the OS disk's bytes and its second disk the data disk's,
    each on a persistent disk of whole GB (the rest zeros), with the VM's tags as labels and
    the region's own machine type (an Azure VM size is none of GCE's)."""
    from regionvault.providers.gcp.conformance import WORKER, offline_region

    tags = {"backup": "1-7", "function": "vdu", "cell-site": "cs-0042"}
    os_pieces, data_pieces = _pieces(1, OS_DISK), _pieces(2, DATA_DISK)
    with (
        azure_regions(azure.server, tmp_path / "fakes", ["east"]) as made,
        offline_region(
            "west", storage=gcs.endpoint, workdir=tmp_path / "gce", tag=os.urandom(5).hex()
        ) as west,
    ):
        east = made["azure:east"]
        vm_id = east.world.seed_vm("vdu-9", tags=tags, image=os_pieces, data_disks=[data_pieces])
        done = launch_across(
            tmp_path,
            source=("azure:east", east.settings),
            destination=("gcp:west", west.settings),
            instance_id=vm_id,
        )
        launched = done.instance
        assert launched.tags == tags
        raw = west.gce.instance(launched.name)
        assert raw["status"] == "RUNNING" and raw["labels"] == tags
        assert raw["machineType"].rsplit("/", 1)[-1] == west.settings["machine_type"]
        disks = sorted(raw["disks"], key=lambda d: (not d.get("boot"), int(d.get("index", 0))))
        assert len(disks) == 2 and disks[0].get("boot")
        for disk, pieces, size in zip(
            disks, (os_pieces, data_pieces), (OS_DISK, DATA_DISK), strict=True
        ):
            path = west.gce.disk_path(str(disk["source"]).rsplit("/", 1)[-1])
            total = path.stat().st_size
            assert total >= size and total % (1 << 30) == 0
            with path.open("rb") as f:
                assert f.read(size) == _flat(pieces, size), disk["source"]
            assert zeros_beyond(path, size), disk["source"]  # past the Azure disk
        assert len(west.gce.instance(WORKER)["disks"]) == 1
