"""Incremental EBS backups through the engine, against moto: the capture snapshots the
instance's volume (CreateSnapshot), keeps that snapshot for the next backup, lists the
blocks changed since it (ListChangedBlocks) and reads only those (GetSnapshotBlock); the
rest comes from the parent point's block map. The kept snapshot is deleted once the next
capture replaces it, when the instance is gone, and when its point is forgotten.

moto does not tie a volume's contents to the snapshots EC2 takes of it (its EBS direct APIs
know only snapshots written with StartSnapshot). :class:`VolumeContents` stands in for the
volume: the test writes the volume's blocks into a seeded snapshot, and every snapshot
CreateSnapshot takes of the volume is read, through the real client's own parameter hook,
from the seeded snapshot that held the volume's contents when it was taken. The provider's
requests are otherwise untouched: it snapshots, waits, lists, compares, reads and deletes
by the ids EC2 gave it, and the request counts come from the provider's metrics.

moto's ListChangedBlocks leaves out blocks only the second snapshot holds, so the changes
here overwrite blocks both hold (tests/aws/test_aws_disks.py, ``test_changed_ranges_live``,
covers new blocks on real AWS).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, AwsWorld
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.aws.ec2 import KEPT_TAG, AwsCompute
from regionvault.providers.aws.metrics import AwsMetrics
from regionvault.providers.aws.provider import AwsProvider
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, seed_snapshot

BS = EBS_BLOCK_SIZE
REGION = f"aws:{EAST}"
#: the volume's written blocks: 56 of them, 28 MiB, in three runs with holes between
WRITTEN = [*range(0, 20), *range(40, 66), *range(100, 110)]


class VolumeContents:
    """What a moto volume holds, for the EBS direct APIs: each snapshot EC2 takes of the
    volume reads as the seeded snapshot of the volume's blocks at that moment."""

    def __init__(self, aws: AwsWorld, compute: AwsCompute, volume_id: str, size_gib: int):
        self.aws = aws
        self.volume_id = volume_id
        self.size_gib = size_gib
        self.blocks: dict[int, bytes] = {}
        self.current: str | None = None
        #: snapshot EC2 took of the volume -> the seeded snapshot holding its blocks
        self.twins: dict[str, str] = {}
        ec2, ebs = compute.ec2.meta.events, compute.ebs.meta.events
        ec2.register("after-call.ec2.CreateSnapshot", self._taken)
        ec2.register("after-call.ec2.CreateSnapshots", self._taken)
        for operation in ("ListSnapshotBlocks", "GetSnapshotBlock", "ListChangedBlocks"):
            ebs.register(f"provide-client-params.ebs.{operation}", self._redirect)

    def write(self, blocks: dict[int, bytes]) -> None:
        self.blocks.update(blocks)
        self.current = seed_snapshot(
            self.aws.client("ebs", EAST), self.blocks, volume_size_gib=self.size_gib
        )

    def _taken(self, parsed: dict[str, Any], **_: Any) -> None:
        taken = [parsed] if "SnapshotId" in parsed else parsed.get("Snapshots", [])
        for snapshot in taken:
            if snapshot.get("VolumeId") == self.volume_id:
                assert self.current is not None, "the volume was snapshotted before any write"
                self.twins[str(snapshot["SnapshotId"])] = self.current

    def _redirect(self, params: dict[str, Any], **_: Any) -> None:
        for key in ("SnapshotId", "FirstSnapshotId", "SecondSnapshotId"):
            if params.get(key) in self.twins:
                params[key] = self.twins[params[key]]

    def image(self) -> dict[int, bytes]:
        return {i * BS: b.ljust(BS, b"\0") for i, b in sorted(self.blocks.items())}


def _exists(aws: AwsWorld, snapshot_id: str) -> bool:
    try:
        found = aws.client("ec2", EAST).describe_snapshots(SnapshotIds=[snapshot_id])
    except Exception as exc:
        if "InvalidSnapshot.NotFound" in str(exc):
            return False
        raise
    return bool(found["Snapshots"])


def _taken_of(aws: AwsWorld, instance_id: str) -> set[str]:
    """The snapshots the provider took of the instance that still exist."""
    answer = aws.client("ec2", EAST).describe_snapshots(
        Filters=[{"Name": "tag:regionvault:instance", "Values": [instance_id]}]
    )
    return {s["SnapshotId"] for s in answer["Snapshots"]}


def _metrics(site: Site) -> AwsMetrics:
    provider = site.registry.get("aws")
    assert isinstance(provider, AwsProvider)
    return provider.metrics


def _restored(engine: Engine, point_id: str, tmp_path: Path) -> dict[int, bytes]:
    """The point's image, restored to a file, as block offset -> block: the file's data
    regions (restore leaves holes where the image has none; SEEK_DATA finds the rest),
    blocks of zeros left out."""
    target = tmp_path / f"restored-{point_id}.img"
    engine.repository(REGION).restore(point_id, target)
    out: dict[int, bytes] = {}
    size = target.stat().st_size
    with target.open("rb") as f:
        fd, at = f.fileno(), 0
        for _region in range(size // BS + 1):
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after ``at``
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            for offset in range(start - start % BS, stop, BS):
                block = os.pread(fd, BS, offset)
                if block.strip(b"\0"):
                    out[offset] = block
            at = stop
            if at >= size:
                break
    return out


@pytest.fixture
def site(aws: AwsWorld, tmp_path: Path) -> Iterator[Site]:
    if aws.live:
        pytest.skip("stands in for a volume's contents on moto; live mode reads real volumes")
    doc = {
        "site": {"name": "incremental", "state_dir": str(tmp_path / "state")},
        "regions": {REGION: aws.settings(EAST)},
    }
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    with Site.load(path, registry=registry_from(pm), plugin_manager=pm) as loaded:
        yield loaded


def _volume(aws: AwsWorld, site: Site, tags: dict[str, str]) -> tuple[str, VolumeContents]:
    compute = site.region(REGION).compute
    assert isinstance(compute, AwsCompute)
    iid = aws.run_instance(EAST, tags)
    extra = compute.get_instance(iid).extra
    volume = extra["volumes"][extra["root_device_name"]]
    size = aws.client("ec2", EAST).describe_volumes(VolumeIds=[volume])["Volumes"][0]["Size"]
    return iid, VolumeContents(aws, compute, volume, int(size))


def test_an_incremental_backup_reads_only_the_changed_blocks(
    aws: AwsWorld, site: Site, tmp_path: Path
) -> None:
    """56 written blocks, 2 of them changed: the second backup asks ListChangedBlocks once
    and reads exactly 2 blocks (GetSnapshotBlock, from the provider's metrics); both points
    restore to the volume's blocks at their time; the first backup's snapshot is deleted
    once the second is kept in its place, and only the newest stays."""
    iid, volume = _volume(aws, site, {"backup": "1-7"})
    rng = random.Random(22)
    volume.write({i: rng.randbytes(BS) for i in WRITTEN})
    first_image = volume.image()
    engine = Engine(site)
    metrics = _metrics(site)

    before = metrics.snapshot()
    first = engine.backup(iid, region=REGION)
    full = metrics.since(before)
    assert full.count(operation="GetSnapshotBlock") == len(WRITTEN) == 56
    assert full.count(operation="ListChangedBlocks") == 0
    (kept_first,) = _taken_of(aws, iid)  # kept for the next backup, and tagged so
    described = aws.client("ec2", EAST).describe_snapshots(SnapshotIds=[kept_first])
    tags = {t["Key"]: t["Value"] for t in described["Snapshots"][0]["Tags"]}
    assert tags[KEPT_TAG] == "incremental-parent" and tags["regionvault:instance"] == iid

    changed = {WRITTEN[7]: rng.randbytes(BS), WRITTEN[30]: rng.randbytes(BS)}
    volume.write(changed)
    before = metrics.snapshot()
    second = engine.backup(iid, region=REGION)
    used = metrics.since(before)
    assert used.count(operation="ListChangedBlocks") == 1
    assert used.count(operation="GetSnapshotBlock") == 2
    assert used.count(operation="ListSnapshotBlocks") == 0  # ListChangedBlocks gave the tokens
    manifest = engine.repository(REGION).load_manifest(second.id)
    assert manifest.stats["bytes_from_base"] >= (len(WRITTEN) - 2 * 3) * BS

    assert _restored(engine, second.id, tmp_path) == volume.image()
    assert _restored(engine, first.id, tmp_path) == first_image
    assert first_image != volume.image()
    # the first capture's snapshot went once the second point committed; the second's stays
    assert not _exists(aws, kept_first)
    assert len(_taken_of(aws, iid)) == 1


def test_a_gone_parent_snapshot_means_a_full_read_still_correct(
    aws: AwsWorld, site: Site, tmp_path: Path
) -> None:
    """The kept snapshot was deleted behind regionvault's back: the next backup cannot ask
    what changed, reads every written block, and restores to the volume all the same."""
    iid, volume = _volume(aws, site, {"backup": "1-7"})
    rng = random.Random(23)
    written = WRITTEN[18:24]  # the end of one run, the start of the next
    volume.write({i: rng.randbytes(BS) for i in written})
    engine = Engine(site)
    engine.backup(iid, region=REGION)
    (kept,) = _taken_of(aws, iid)
    aws.client("ec2", EAST).delete_snapshot(SnapshotId=kept)

    volume.write({written[0]: rng.randbytes(BS)})
    before = _metrics(site).snapshot()
    point = engine.backup(iid, region=REGION)
    used = _metrics(site).since(before)
    assert used.count(operation="GetSnapshotBlock") == len(written)
    assert _restored(engine, point.id, tmp_path) == volume.image()
    assert len(_taken_of(aws, iid)) == 1  # this capture's, kept for the next


def test_the_kept_snapshot_goes_with_its_point_or_its_instance(aws: AwsWorld, site: Site) -> None:
    """Retention (each tick runs it) deletes a kept snapshot whose point was forgotten,
    and one whose instance was terminated."""
    engine = Engine(site)
    rng = random.Random(24)
    forgotten, volume_a = _volume(aws, site, {"backup": "1-7"})
    volume_a.write({i: rng.randbytes(BS) for i in WRITTEN[:4]})
    gone, volume_b = _volume(aws, site, {"backup": "1-7"})
    volume_b.write({i: rng.randbytes(BS) for i in WRITTEN[:4]})
    point = engine.backup(forgotten, region=REGION)
    engine.backup(gone, region=REGION)
    kept = _taken_of(aws, forgotten) | _taken_of(aws, gone)
    assert len(kept) == 2

    engine.forget(REGION, [point.id])
    aws.client("ec2", EAST).terminate_instances(InstanceIds=[gone])
    assert all(_exists(aws, s) for s in kept)  # until retention settles them
    report = engine.retain(REGION)
    assert report.forgotten == []  # nothing expired: only the kept captures were settled
    assert not any(_exists(aws, s) for s in kept)
    assert engine.release_kept_captures(REGION) == 0  # nothing left to release


class _PagingEbs:
    """EBS direct APIs as AWS pages them (moto answers every listing in one page): at most
    ``MaxResults`` blocks a page, from ``StartingBlockIndex``. The new snapshot holds every
    block but ``cleared``; ListChangedBlocks names ``changed`` (with no SecondBlockToken for
    a cleared one)."""

    def __init__(self, blocks: int, changed: list[int], cleared: set[int]) -> None:
        self.blocks, self.changed, self.cleared = blocks, changed, cleared
        self.calls: dict[str, int] = {}
        self.listed_from: list[int] = []

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def list_snapshot_blocks(self, **kw: Any) -> dict[str, Any]:
        self._count("ListSnapshotBlocks")
        start = (
            int(kw["NextToken"]) if kw.get("NextToken") else int(kw.get("StartingBlockIndex", 0))
        )
        self.listed_from.append(start)
        stop = min(self.blocks, start + min(int(kw["MaxResults"]), 10000))
        page = [i for i in range(start, stop) if i not in self.cleared]
        out: dict[str, Any] = {"Blocks": [{"BlockIndex": i, "BlockToken": f"n{i}"} for i in page]}
        if stop < self.blocks:
            out["NextToken"] = str(stop)
        return out

    def list_changed_blocks(self, **kw: Any) -> dict[str, Any]:
        self._count("ListChangedBlocks")
        out = []
        for i in self.changed:
            block: dict[str, Any] = {"BlockIndex": i, "FirstBlockToken": f"o{i}"}
            if i not in self.cleared:
                block["SecondBlockToken"] = f"n{i}"
            out.append(block)
        return {"ChangedBlocks": out}

    def get_snapshot_block(self, **kw: Any) -> dict[str, Any]:
        import io

        from regionvault.providers.aws.ec2 import _checksum

        self._count("GetSnapshotBlock")
        index = int(kw["BlockIndex"])
        assert kw["BlockToken"] == f"n{index}", "a block read with another block's token"
        data = bytes([index % 251 + 1]) * BS
        return {
            "BlockData": io.BytesIO(data),
            "DataLength": BS,
            "Checksum": _checksum(data),
            "ChecksumAlgorithm": "SHA256",
        }


def _paging_capture(ebs: _PagingEbs, gib: int) -> Any:
    import json
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from regionvault.core.types import Instance
    from regionvault.providers.aws.ec2 import AwsBlockCapture, _DiskSnapshot

    compute = SimpleNamespace(
        ebs=ebs,
        region=REGION,
        settings=SimpleNamespace(ebs_concurrency=4),
        _snapshots_exist=lambda ids: True,
        wait_for_snapshot=lambda snapshot_id: {"State": "completed"},
    )
    old = _DiskSnapshot("/dev/xvda", "vol-1", "snap-old", 0, gib << 30, True)
    new = _DiskSnapshot("/dev/xvda", "vol-1", "snap-new", 0, gib << 30, True)
    since = json.dumps({"aws-ebs": 1, "instance": "i-1", "disks": [old.as_ref()]})
    return AwsBlockCapture(
        Instance(id="i-1", name="n", region=REGION),
        datetime(2026, 1, 1, tzinfo=UTC),
        compute=compute,  # type: ignore[arg-type]
        parts=[new],
        since=since,
        keep=True,  # nothing to delete in this stand-in
    )


def test_changed_blocks_are_read_with_listchangedblocks_tokens_not_a_listing() -> None:
    """Blocks at both ends of a 100 GiB volume changed (one cleared): AWS pages
    ListSnapshotBlocks by 10,000 blocks, so listing up to the last change cost 21 calls;
    the tokens ListChangedBlocks gave cost none."""
    blocks = (100 << 30) // BS
    changed = [0, 7, blocks // 2, blocks - 1]
    ebs = _PagingEbs(blocks, changed, cleared={7})
    capture = _paging_capture(ebs, 100)
    try:
        ranges = capture.changed_ranges()
        assert ranges is not None and sum(n for _, n in ranges) == 4 * BS
        read = dict(capture.read_ranges(ranges))
    finally:
        capture.close()
    assert ebs.calls == {"ListChangedBlocks": 1, "GetSnapshotBlock": 3}
    assert sorted(read) == [0, (blocks // 2) * BS, (blocks - 1) * BS]  # block 7: a hole
    assert read[(blocks - 1) * BS] == bytes([(blocks - 1) % 251 + 1]) * BS


def test_a_span_wider_than_its_changes_lists_only_that_span() -> None:
    """A span reaching past its changed block (an old base's chunk) lists the other blocks
    with one call starting in the span, not from the volume's start."""
    blocks = (100 << 30) // BS
    ebs = _PagingEbs(blocks, [blocks - 3], cleared=set())
    capture = _paging_capture(ebs, 100)
    try:
        assert capture.changed_ranges() == [((blocks - 3) * BS, BS)]
        span = [((blocks - 5) * BS, 4 * BS)]
        read = dict(capture.read_ranges(span))
    finally:
        capture.close()
    assert ebs.calls == {"ListChangedBlocks": 1, "ListSnapshotBlocks": 1, "GetSnapshotBlock": 4}
    assert ebs.listed_from == [blocks - 5]
    assert sorted(read) == [i * BS for i in range(blocks - 5, blocks - 1)]
