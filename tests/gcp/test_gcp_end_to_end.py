"""The whole pipeline on GCP, offline: a two-region site (gcp:east replicating to gcp:west),
each region's vault and inbox two buckets of the session's gcp-storage-emulator, its keys a
Cloud KMS fake of its own (gRPC) and its compute a Compute Engine fake of its own (REST) with
the region's backup worker (providers/gcp/conformance.py, ``offline_region``). The
unmodified Google clients run against them.

Shown here, through :class:`Service` ticks on an engine with an injected clock:
- an instance in gcp:east with no policy label is given ``backup=1-7`` by the tagger, found
  due by the scheduler, backed up (a snapshot of its disk, read through a disk made from it
  and attached to east's worker) under east's KMS key and copied to gcp:west under west's
  key, whose data keys east never saw;
- a day later, after 1 MiB of the disk changed, the second copy sends a small part of what
  the first sent: only the chunks west lacks cross;
- a restore in west makes a new disk whose bytes equal the original's and launches an
  instance of the original machine type with the original labels; no temporary disk is left
  and the worker has nothing attached but its own disk;
- east's key opens nothing west holds: every wrapped key in west's vault is refused by
  east's KeyService, and the refusal is east's KMS answering Decrypt; the inbox payloads open
  only at their destination;
- no object of the four buckets, and no inbox payload, holds the disk's marker runs or any
  plaintext key (the same scan finds the markers in the disk files).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import at_rest
import pytest
import tomli_w
from at_rest import (
    DISK,
    Recorded,
    disk_pieces,
    image_of,
    leaks,
    marker_runs,
    open_inbox_object,
    payload_kind,
    wrapped_keys,
)
from cross_cloud import zeros_beyond
from regionvault.core.errors import KeyAccessDenied
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY, RETENTION, TAG
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.repository import Repository
from regionvault.core.site import Site
from regionvault.providers.gcp.conformance import WORKER, OfflineRegion, offline_region
from regionvault.providers.gcp.emulator import GcsEmulator
from regionvault.providers.gcp.kms import GcpKeyService, GcpSealer
from regionvault.providers.gcp.transit import GcsTransit

A, B = "gcp:east", "gcp:west"
MiB = 1024 * 1024
GiB = 1024 * MiB
#: the original disk's data: 24 MiB at the start of a 10 GB persistent disk
DATA = DISK
MACHINE_TYPE = "n2-standard-4"
#: what the worker sees of its own: its boot disk
WORKER_DEVICES = ["google-persistent-disk-0"]


def read_disk(path: Path, length: int) -> bytes:
    with path.open("rb") as f:
        return f.read(length)


def every_object(endpoint: str, buckets: list[str]) -> dict[str, bytes]:
    """``<bucket>/<name>`` -> bytes of every object of ``buckets``, read beside the provider."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="rv-conformance",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
    out: dict[str, bytes] = {}
    for bucket in buckets:
        for blob in client.list_blobs(bucket):
            out[f"{bucket}/{blob.name}"] = blob.download_as_bytes()
    return out


@pytest.fixture
def regions(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[dict[str, OfflineRegion]]:
    tag = random.Random().getrandbits(40).to_bytes(5, "big").hex()
    with (
        offline_region(
            "east", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=tag
        ) as east,
        offline_region(
            "west", storage=gcs_emulator.endpoint, workdir=tmp_path / "gce", tag=tag
        ) as west,
    ):
        yield {A: east, B: west}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    def read_inbox(transit: Any, name: str) -> tuple[str, bytes]:
        return str(transit.bucket_name), transit.receive(name)

    return at_rest.record(
        monkeypatch,
        keys=GcpKeyService,
        sealer=GcpSealer,
        transit=GcsTransit,
        read_inbox=read_inbox,
    )


def _site_file(regions: dict[str, OfflineRegion], tmp_path: Path) -> Path:
    doc = {
        "site": {"name": "e2e-gcp", "state_dir": str(tmp_path / "state")},
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


def _boot_disk(instance: dict[str, Any]) -> str:
    (boot,) = [d for d in instance["disks"] if d.get("boot")]
    return str(boot["source"]).rsplit("/", 1)[-1]


def test_tag_schedule_backup_copy_restore_launch_across_gcp_regions(
    gcs_emulator: GcsEmulator,
    regions: dict[str, OfflineRegion],
    recorded: Recorded,
    tmp_path: Path,
) -> None:
    east, west = regions[A], regions[B]
    pieces = disk_pieces(seed=20261207)
    image = image_of(pieces)
    labels = {"function": "vcu", "cell-site": "cs-0042"}  # no policy label: the tagger adds it
    seeded = east.gce.seed_instance(
        "vcu-1", disks=[pieces], machine_type=MACHINE_TYPE, labels=labels
    )
    opted_out = east.gce.seed_instance("ims-lab", labels={"backup": "none"})
    original_disk = _boot_disk(seeded)
    original_path = east.gce.disk_path(original_disk)
    assert read_disk(original_path, DATA) == image
    east_disks_before = set(east.gce.disk_names())

    clock = Clock()
    pm = make_plugin_manager()
    with Site.load(
        _site_file(regions, tmp_path), registry=registry_from(pm), plugin_manager=pm
    ) as site:
        engine = Engine(site, clock=clock)
        compute_a = site.region(A).compute
        (vm,) = [i for i in compute_a.list_instances() if i.name == "vcu-1"]
        (lab,) = [i for i in compute_a.list_instances() if i.name == "ims-lab"]
        assert lab.id != vm.id and opted_out["name"] == "ims-lab"

        # ---- tag, schedule, back up and copy in one tick
        report = Service(engine).tick()
        assert report.ok, (report.problems, [(o.key, o.error) for o in report.failures()])
        tagged = compute_a.get_instance(vm.id)
        assert tagged.tags == {**labels, "backup": "1-7"}
        labels = dict(tagged.tags)
        assert east.gce.instance("vcu-1")["labels"] == labels  # labels are the tags
        schedule = {s.region: s for s in report.schedule}
        assert [d.instance.id for d in schedule[A].due] == [vm.id]
        assert [n.instance_id for n in schedule[A].opted_out] == [lab.id]
        assert [str(r) for r in schedule[A].due[0].copy_to] == [B]
        kinds = sorted(o.kind for o in report.jobs)
        assert kinds.count(BACKUP) == 1 and kinds.count(COPY) == 1
        assert set(kinds) <= {TAG, BACKUP, COPY, RETENTION}
        first_backup = next(o for o in report.jobs if o.kind == BACKUP)
        first_copy = next(o for o in report.jobs if o.kind == COPY)
        first_moved = first_copy.result["bytes_moved"]
        assert first_moved > 0 and not first_copy.result["existing"]
        point = engine.find_point(first_backup.result["point"], A)
        copy = engine.find_point(first_copy.result["copy"], B)
        assert (point.instance_id, point.region, copy.region) == (vm.id, A, B)
        assert copy.lineage is not None
        assert (copy.lineage.source_region, copy.lineage.source_recovery_point) == (A, point.id)
        # the capture's temporary disk is gone and the worker holds only its own disk
        assert set(east.gce.disk_names()) == east_disks_before
        assert len(east.gce.instance(WORKER)["disks"]) == 1
        assert sorted(p.name for p in east.gce.device_dir.iterdir()) == WORKER_DEVICES

        # ---- a day later, 1 MiB of the disk changed: only the missing chunks cross
        changed_at = 6 * MiB
        new_data = random.Random(99).randbytes(MiB)
        with original_path.open("r+b") as f:
            f.seek(changed_at)
            f.write(new_data)
        image[changed_at : changed_at + MiB] = new_data
        clock.now += timedelta(days=1, minutes=1)
        again = Service(engine).tick()
        assert again.ok, (again.problems, [(o.key, o.error) for o in again.failures()])
        second_backup = next(o for o in again.jobs if o.kind == BACKUP)
        second_copy = next(o for o in again.jobs if o.kind == COPY)
        second_moved = second_copy.result["bytes_moved"]
        assert 0 < second_moved < first_moved / 3, (first_moved, second_moved)
        later = engine.find_point(second_copy.result["copy"], B)
        assert later.lineage is not None
        assert later.lineage.source_recovery_point == second_backup.result["point"]
        assert {p.id for p in engine.points(B, vm.id)} == {copy.id, later.id}

        # ---- restore the later copy in west, launch it
        west_disks_before = set(west.gce.disk_names())
        result = engine.restore(later.id, region=B, launch=True)
        assert result.healthy and result.instance is not None
        launched = result.instance
        assert launched.region == B and launched.tags == labels
        raw = west.gce.instance(launched.name)
        assert raw["status"] == "RUNNING"
        assert raw["machineType"].rsplit("/", 1)[-1] == MACHINE_TYPE
        assert raw["labels"] == labels
        restored_disk = _boot_disk(raw)
        assert set(west.gce.disk_names()) == west_disks_before | {restored_disk}
        assert len(west.gce.instance(WORKER)["disks"]) == 1
        restored_path = west.gce.disk_path(restored_disk)
        assert restored_path.stat().st_size == original_path.stat().st_size
        assert read_disk(restored_path, DATA) == read_disk(original_path, DATA) == image
        assert zeros_beyond(restored_path, DATA)

        # ---- each region's points are under its own KMS key, with its own data keys
        east_keys, west_keys = site.region(A).keys, site.region(B).keys
        assert isinstance(east_keys, GcpKeyService) and isinstance(west_keys, GcpKeyService)
        east_vault, west_vault = site.region(A).vault, site.region(B).vault
        east_wrapped = wrapped_keys(east_vault, repository_id=engine.repository(A).repository_id)
        west_wrapped = wrapped_keys(west_vault, repository_id=engine.repository(B).repository_id)
        for wrapped in (east_wrapped, west_wrapped):
            names = [w.object_name for w in wrapped]
            assert "config" in names and any(n.startswith("packs/") for n in names)
        west_data_keys = {west_keys.unwrap(w.wrapped, w.context) for w in west_wrapped}
        assert all(len(k) == 32 for k in west_data_keys)
        # the copy's data keys are west's own: east's KeyService never handled one of them
        assert west_data_keys.isdisjoint(recorded.keys[A])

        # ---- east's key opens nothing west holds, and the refusal is east's KMS's
        with pytest.raises(KeyAccessDenied):
            Repository.open(west_vault, east_keys, region=B)
        decrypts = east.kms.methods().count("Decrypt")
        for wrapped in west_wrapped:
            with pytest.raises(KeyAccessDenied):
                east_keys.unwrap(wrapped.wrapped, wrapped.context)
        assert east.kms.methods().count("Decrypt") - decrypts == len(west_wrapped)

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
        # the copies left both inboxes empty
        inboxes = [east.buckets[1], west.buckets[1]]
        assert every_object(gcs_emulator.endpoint, inboxes) == {}

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
        scanned = every_object(gcs_emulator.endpoint, [*east.buckets, *west.buckets])
        scanned.update({f"inbox {i.container}/{i.name}": i.data for i in recorded.inbox})
        packs = {
            bucket: sum(len(d) for k, d in scanned.items() if k.startswith(f"{bucket}/packs/"))
            for bucket in (east.buckets[0], west.buckets[0])
        }
        random_bytes = sum(1 for n in range(DATA // MiB) if n % 6 in (0, 1)) * MiB
        assert min(packs.values()) >= random_bytes, packs  # the scan read the packs whole
        assert leaks(scanned, needles) == []
        # the same scan finds the markers where the plaintext is: the disk itself
        assert leaks({"east disk": read_disk(original_path, DATA)}, runs)
