"""The whole pipeline on Azure, offline: a two-region site (azure:east replicating to
azure:west), each region a storage account of Azurite (vault and inbox containers), a fake
Key Vault of its own (its tenant, CA and RSA key) and an ARM fake whose managed disks are
Azurite page blobs (tests/azure/azure_regions.py). The real SDK clients run unchanged.

Shown here, through :class:`Service` ticks on an engine with an injected clock:
- a VM in azure:east with no policy tag is given ``backup=1-7`` by the tagger, found due by
  the scheduler, backed up (a block capture of its managed disk) under east's Key Vault key
  and copied to azure:west under west's key, whose data keys east never saw;
- a day later, after a little of the disk changed, the second backup's copy sends a small
  part of what the first sent: only the chunks west lacks cross;
- a restore in west makes a new managed disk whose bytes equal the original disk's (both
  page blobs read) and launches a VM of the original's size with the original's tags;
- east's key opens nothing west holds: every wrapped key in west's vault is refused by
  east's KeyService and by east's Key Vault itself (unwrapKey with east's key, and with the
  version west's envelope names); the inbox payloads open only at their destination;
- no blob of either account's vault or inbox containers, and no inbox payload, holds the
  disk's marker runs or any plaintext key (the same scan finds the markers in the disks).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
from at_rest import DISK, disk_pieces, image_of, marker_runs
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from azure_regions import (
    RESOURCE_GROUP,
    AzureRegion,
    Recorded,
    azure_regions,
    containers_of,
    every_blob,
    key_version,
    leaks,
    open_inbox_object,
    payload_kind,
    record,
    rsa_wrapped,
    wrapped_keys,
)
from azure_world import AzureWorld
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY, RETENTION, TAG
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.providers.azure.compute import INTERNAL_PREFIX, vhd_footer
from regionvault.providers.azure.keyvault import AzureKeyService

A, B = "azure:east", "azure:west"
MiB = 1024 * 1024
VM_SIZE = "Standard_D2s_v5"


# --------------------------------------------------------------------------- the disk


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def regions(azure: AzureWorld, tmp_path: Path) -> Iterator[dict[str, AzureRegion]]:
    with azure_regions(azure.server, tmp_path / "fakes", ["east", "west"]) as made:
        yield made


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    return record(monkeypatch)


def _site_file(regions: dict[str, AzureRegion], tmp_path: Path) -> Path:
    doc = {
        "site": {"name": "e2e-azure", "state_dir": str(tmp_path / "state")},
        "regions": {name: region.settings for name, region in regions.items()},
        "replication": [{"from": A, "to": B}],
    }
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


# --------------------------------------------------------------------------- the test


def test_tag_schedule_backup_copy_restore_launch_across_azure_regions(
    azure: AzureWorld,
    regions: dict[str, AzureRegion],
    recorded: Recorded,
    tmp_path: Path,
) -> None:
    east, west = regions[A], regions[B]
    pieces = disk_pieces(seed=20261207)
    image = image_of(pieces)
    tags = {"function": "vCU", "cell-site": "cs-0042"}  # no policy tag: the tagger gives one
    vm_id = east.world.seed_vm("vcu-1", tags=tags, image=pieces, vm_size=VM_SIZE)
    opted_out = east.world.seed_vm("ims-lab", tags={"backup": "none"})
    east_vm = east.world.client.virtual_machines.get(RESOURCE_GROUP, "vcu-1")
    original_disk = str(east_vm.storage_profile.os_disk.managed_disk.id)
    assert east.world.disk_bytes(original_disk, DISK) == image

    clock = Clock()
    pm = make_plugin_manager()
    with Site.load(
        _site_file(regions, tmp_path), registry=registry_from(pm), plugin_manager=pm
    ) as site:
        engine = Engine(site, clock=clock)

        # ---- tag, schedule, back up and copy in one tick
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        tagged = site.region(A).compute.get_instance(vm_id)
        assert tagged.tags == {**tags, "backup": "1-7"}
        tags = dict(tagged.tags)
        schedule = {s.region: s for s in report.schedule}
        assert [d.instance.id for d in schedule[A].due] == [vm_id]
        assert [n.instance_id for n in schedule[A].opted_out] == [opted_out]
        assert schedule[A].due[0].policy.source == "1-7"
        assert [str(r) for r in schedule[A].due[0].copy_to] == [B]
        assert sorted(o.kind for o in report.jobs) == sorted(
            [TAG, TAG, BACKUP, COPY, RETENTION, RETENTION]
        )
        first_backup = next(o for o in report.jobs if o.kind == BACKUP)
        first_copy = next(o for o in report.jobs if o.kind == COPY)
        first_moved = first_copy.result["bytes_moved"]
        assert first_moved > 0 and not first_copy.result["existing"]
        point = engine.find_point(first_backup.result["point"], A)
        copy = engine.find_point(first_copy.result["copy"], B)
        assert (point.instance_id, point.region, copy.region) == (vm_id, A, B)
        assert copy.lineage is not None
        assert (copy.lineage.source_region, copy.lineage.source_recovery_point) == (A, point.id)
        # a backup keeps one snapshot, which the next (incremental) backup starts from
        kept = [str(s["name"]) for s in east.arm.resources("snapshot")]
        assert len(kept) == 1, kept

        # ---- a day later, 1 MiB of the disk changed: only the missing chunks cross
        changed_at = 6 * MiB
        new_data = random.Random(99).randbytes(MiB)
        east.arm.blob_client(original_disk).upload_page(new_data, offset=changed_at, length=MiB)
        image[changed_at : changed_at + MiB] = new_data
        clock.now += timedelta(days=1, minutes=1)
        again = Service(engine).tick()
        assert again.ok, (again.problems, [(o.key, o.error) for o in again.failures()])
        second_backup = next(o for o in again.jobs if o.kind == BACKUP)
        second_copy = next(o for o in again.jobs if o.kind == COPY)
        second_moved = second_copy.result["bytes_moved"]
        # the earlier capture's snapshot was released for the new one: nothing leaks
        still = [str(s["name"]) for s in east.arm.resources("snapshot")]
        assert len(still) == 1 and not set(still) & set(kept), (kept, still)
        assert 0 < second_moved < first_moved / 3, (first_moved, second_moved)
        assert not second_copy.result["existing"]
        later = engine.find_point(second_copy.result["copy"], B)
        assert later.lineage is not None
        assert later.lineage.source_recovery_point == second_backup.result["point"]
        assert {p.id for p in engine.points(B, vm_id)} == {copy.id, later.id}

        # ---- restore the later copy in west, launch it
        result = engine.restore(later.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        launched = result.instance
        assert launched.region == B
        assert launched.tags == tags
        raw = west.world.client.virtual_machines.get(RESOURCE_GROUP, launched.extra["vm_name"])
        assert raw.hardware_profile.vm_size == VM_SIZE == east_vm.hardware_profile.vm_size
        assert {k: v for k, v in raw.tags.items() if not k.startswith(INTERNAL_PREFIX)} == tags
        restored_disk = str(raw.storage_profile.os_disk.managed_disk.id)
        assert restored_disk.lower().startswith(f"/subscriptions/{west.arm.subscription}/".lower())
        disk = west.world.client.disks.get(RESOURCE_GROUP, restored_disk.rsplit("/", 1)[-1])
        original = east.world.client.disks.get(RESOURCE_GROUP, original_disk.rsplit("/", 1)[-1])
        assert disk.disk_size_bytes == original.disk_size_bytes == DISK
        # both page blobs, byte for byte, and the restored disk's fixed-VHD footer
        restored_bytes = west.world.disk_bytes(restored_disk, DISK)
        assert restored_bytes == east.world.disk_bytes(original_disk, DISK) == image
        # a fixed VHD of the original's geometry (the time stamp, checksum and id differ)
        footer, original_footer = west.arm.footer(restored_disk), east.arm.footer(original_disk)
        assert footer[:8] == b"conectix" and footer[40:64] == original_footer[40:64]
        assert footer[40:64] == vhd_footer(DISK)[40:64]

        # ---- each region's points are under its own Key Vault key, with its own data keys
        east_keys, west_keys = site.region(A).keys, site.region(B).keys
        assert isinstance(east_keys, AzureKeyService)
        assert isinstance(west_keys, AzureKeyService)
        east_version = east_keys.key_id.rsplit("/", 1)[-1]
        west_version = west_keys.key_id.rsplit("/", 1)[-1]
        east_vault, west_vault = site.region(A).vault, site.region(B).vault
        east_wrapped = wrapped_keys(east_vault, repository_id=engine.repository(A).repository_id)
        west_wrapped = wrapped_keys(west_vault, repository_id=engine.repository(B).repository_id)
        for wrapped in (east_wrapped, west_wrapped):
            names = [w.object_name for w in wrapped]
            assert "config" in names
            assert any(n.startswith("packs/") for n in names)
        assert {key_version(w) for w in east_wrapped} == {east_version}
        assert {key_version(w) for w in west_wrapped} == {west_version}
        west_data_keys = {west_keys.unwrap(w.wrapped, w.context) for w in west_wrapped}
        assert all(len(k) == 32 for k in west_data_keys)
        # the copy's data keys are west's own: east's KeyService never handled one of them
        assert west_data_keys.isdisjoint(recorded.keys[A])

        # ---- east's key opens nothing west holds
        with pytest.raises(KeyAccessDenied):
            Repository.open(west_vault, east_keys, region=B)
        unwraps_before = sum(1 for r in east.key_vault.requests if r.operation == "keys/unwrapKey")
        for wrapped in west_wrapped:
            with pytest.raises(KeyAccessDenied):
                east_keys.unwrap(wrapped.wrapped, wrapped.context)
        refusals = [r for r in east.key_vault.requests if r.operation == "keys/unwrapKey"][
            unwraps_before:
        ]
        # each refusal was east's Key Vault's answer, not a check before asking it
        assert len(refusals) == len(west_wrapped)
        assert {r.status for r in refusals} <= {400, 404}
        # east's Key Vault itself, asked with east's current key: RSA-OAEP fails
        crypto = east_keys.client.get_cryptography_client("regionvault", key_version=east_version)
        for wrapped in west_wrapped:
            with pytest.raises(HttpResponseError) as refused:
                crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, rsa_wrapped(wrapped))
            assert refused.value.status_code == 400, wrapped.object_name
        # ... and the same calls through west's own Key Vault open them: the refusal is the key's
        west_crypto = west_keys.client.get_cryptography_client(
            "regionvault", key_version=west_version
        )
        for wrapped in west_wrapped:
            opened = west_crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, rsa_wrapped(wrapped))
            assert len(opened.key) == 32, wrapped.object_name

        # the inbox payloads: what crossed into west opens only there, and the reverse
        into_west = [i for i in recorded.inbox if i.destination == B]
        into_east = [i for i in recorded.inbox if i.destination == A]
        assert {payload_kind(i.name) for i in into_west} == {"offer", "batch"}
        assert {payload_kind(i.name) for i in into_east} == {"request"}
        for item, own, other in [
            *((i, west_keys, east_keys) for i in into_west),
            *((i, east_keys, west_keys) for i in into_east),
        ]:
            with pytest.raises(KeyAccessDenied):
                open_inbox_object(other, item)
            assert open_inbox_object(own, item)
        # the copies left both inboxes empty: the recorded payloads are all there were
        for region in (east, west):
            inbox = region.containers[1]
            assert every_blob(azure.server, region.account, [inbox]) == {}

        # ---- nothing at rest is plaintext
        for name in (A, B):
            config = engine.repository(name)._store.config  # the repository's own secrets
            recorded.add(name, config.chunk_id_key)
            recorded.add(name, config.master_key)
        runs = marker_runs(image)
        runs.update(marker_runs(image_of(pieces)))  # the first backup's disk too
        assert len(runs) >= 30
        needles = {**runs, **recorded.needles()}
        assert len(recorded.every_key()) >= 8
        scanned: dict[str, bytes] = {}
        for region in (east, west):
            ours = containers_of(azure.server, region.account, region.containers[0])
            assert ours == set(region.containers), ours  # every container of the region
            scanned.update(every_blob(azure.server, region.account, sorted(ours)))
        scanned.update({f"inbox {i.container}/{i.name}": i.data for i in recorded.inbox})
        packs = {
            region.account: sum(
                len(d)
                for k, d in scanned.items()
                if k.startswith(f"{region.account}/rv-") and "/packs/" in k
            )
            for region in (east, west)
        }
        random_bytes = sum(1 for n in range(DISK // MiB) if n % 6 in (0, 1)) * MiB
        assert min(packs.values()) >= random_bytes, packs  # the scan read the packs whole
        assert leaks(scanned, needles) == []
        # the same scan finds the markers where the plaintext is: the disks themselves
        disks = every_blob(azure.server, east.account, [east.arm.container])
        assert leaks(disks, runs), "the scan finds nothing even in the disks"


# --------------------------------------------------------------------------- two disks

#: the data disk of the two-disk VM: another size than the OS disk's, so that a swap shows
DATA_DISK = 21 * MiB


def test_a_vm_of_two_managed_disks_comes_back_with_both_in_another_region(
    azure: AzureWorld, regions: dict[str, AzureRegion], tmp_path: Path
) -> None:
    """A VM with an OS disk and a data disk at LUN 0 is backed up as one image of two disks,
    copied, and launched in west with a new OS disk equal to the original's and a new data
    disk at LUN 0 equal to the original's."""
    east, west = regions[A], regions[B]
    os_pieces = disk_pieces(seed=1)
    rng = random.Random(2)
    data_pieces = {
        0: rng.randbytes(3 * MiB),
        10 * MiB: rng.randbytes(MiB),
        DATA_DISK - MiB: rng.randbytes(MiB),
    }
    tags = {"backup": "1-7", "function": "vDU"}
    vm_id = east.world.seed_vm(
        "vdu-2", tags=tags, image=os_pieces, vm_size=VM_SIZE, data_disks=[data_pieces]
    )
    source = east.world.client.virtual_machines.get(RESOURCE_GROUP, "vdu-2")
    original_os = str(source.storage_profile.os_disk.managed_disk.id)
    (original_data,) = [str(d.managed_disk.id) for d in source.storage_profile.data_disks]
    os_image = bytes(image_of(os_pieces))
    data_image = bytearray(DATA_DISK)
    for offset, data in data_pieces.items():
        data_image[offset : offset + len(data)] = data
    assert east.world.disk_bytes(original_data, DATA_DISK) == data_image

    pm = make_plugin_manager()
    with Site.load(
        _site_file(regions, tmp_path), registry=registry_from(pm), plugin_manager=pm
    ) as site:
        engine = Engine(site, clock=Clock())
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        copy_job = next(o for o in report.jobs if o.kind == COPY)
        copy = engine.find_point(copy_job.result["copy"], B)
        assert copy.instance_id == vm_id
        disks = engine.repository(B).load_manifest(copy.id).disks
        assert [(d.name, d.size) for d in disks] == [("os", DISK), ("lun0", DATA_DISK)]

        result = engine.restore(copy.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        raw = west.world.client.virtual_machines.get(
            RESOURCE_GROUP, result.instance.extra["vm_name"]
        )
        assert raw.hardware_profile.vm_size == VM_SIZE
        assert {k: v for k, v in raw.tags.items() if not k.startswith(INTERNAL_PREFIX)} == tags
        new_os = str(raw.storage_profile.os_disk.managed_disk.id)
        (new_data,) = raw.storage_profile.data_disks
        assert new_data.lun == 0
        new_data_id = str(new_data.managed_disk.id)
        assert {new_os.lower(), new_data_id.lower()}.isdisjoint(
            {original_os.lower(), original_data.lower()}
        )
        for restored, original, size, image in (
            (new_os, original_os, DISK, os_image),
            (new_data_id, original_data, DATA_DISK, bytes(data_image)),
        ):
            name = restored.rsplit("/", 1)[-1]
            assert west.world.client.disks.get(RESOURCE_GROUP, name).disk_size_bytes == size
            assert west.world.disk_bytes(restored, size) == image, name
            assert east.world.disk_bytes(original, size) == image
