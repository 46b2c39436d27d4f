"""EC2 instances with several EBS volumes: one block image holding every volume (root first,
then by device name), incremental captures (``keep``/``ref``/``since`` and
ListChangedBlocks per volume), restores into one snapshot per disk and launches that map
them back, with nothing left behind when a restore fails.

What moto cannot show, and live mode (``REGIONVAULT_AWS_LIVE=1``) does: moto's EBS direct
APIs cannot read snapshots taken of volumes (so reads here come from snapshots written with
the EBS direct APIs and named by tags or ``ex_snapshot_ids``), and its ListChangedBlocks
leaves out blocks that only the second snapshot holds (so the incremental test changes and
clears blocks the first snapshot held; :func:`test_changed_ranges_live` writes new ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aws_world import EAST, WEST, AwsWorld
from botocore.awsrequest import AWSResponse
from regionvault.core.errors import ComputeError, IntegrityError
from regionvault.core.interfaces import BlockCapture
from regionvault.core.pipeline import Engine
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.core.types import CaptureKind, Disk, LaunchSpec, Tags
from regionvault.providers.aws.ec2 import (
    CAPTURE_SNAPSHOT_TAG,
    RESTORE_TAG,
    AwsBlockSink,
    _data_devices,
    _device_order,
)
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, seed_snapshot

GiB = 1024**3
BS = EBS_BLOCK_SIZE


def _block(text: str) -> bytes:
    return text.encode().ljust(BS, b"\0")


def _image(capture: BlockCapture) -> dict[int, bytes]:
    """The capture's written data, as image offset -> bytes."""
    return dict(capture.blocks())


def _snapshot_blocks(aws: AwsWorld, aws_region: str, snapshot_id: str) -> dict[int, bytes]:
    ebs = aws.client("ebs", aws_region)
    out = {}
    for block in ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]:
        answer = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )
        out[int(block["BlockIndex"])] = answer["BlockData"].read()
    return out


def _gone(aws: AwsWorld, aws_region: str, snapshot_id: str) -> bool:
    try:
        found = aws.client("ec2", aws_region).describe_snapshots(SnapshotIds=[snapshot_id])
    except Exception as exc:
        if "InvalidSnapshot.NotFound" in str(exc):
            return True
        raise
    return not found["Snapshots"]


def _attach(aws: AwsWorld, instance_id: str, device: str, size_gib: int) -> str:
    ec2 = aws.client("ec2", EAST)
    zone = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0][
        "Placement"
    ]["AvailabilityZone"]
    volume = str(ec2.create_volume(Size=size_gib, AvailabilityZone=zone)["VolumeId"])
    ec2.attach_volume(VolumeId=volume, InstanceId=instance_id, Device=device)
    return volume


def test_device_order_and_launch_device_names() -> None:
    names = ["/dev/sdba", "/dev/sdg", "/dev/xvda", "/dev/sdz", "/dev/sdf"]
    assert sorted(names, key=lambda d: _device_order(d, "/dev/xvda")) == [
        "/dev/xvda",
        "/dev/sdf",
        "/dev/sdg",
        "/dev/sdz",
        "/dev/sdba",
    ]
    # each EC2 name is kept, in any order; anything else gets the first free of sdf, sdg, ...
    assert _data_devices(["/dev/sdf", "/dev/sdh"], "/dev/xvda") == ["/dev/sdf", "/dev/sdh"]
    assert _data_devices(["lun0", "lun1"], "/dev/xvda") == ["/dev/sdf", "/dev/sdg"]
    assert _data_devices(["/dev/sdh", "/dev/sdf"], "/dev/xvda") == ["/dev/sdh", "/dev/sdf"]
    assert _data_devices(["lun0", "/dev/sdf"], "/dev/xvda") == ["/dev/sdg", "/dev/sdf"]
    assert _data_devices(["/dev/sdf", "/dev/sdf"], "/dev/xvda") == ["/dev/sdf", "/dev/sdg"]
    assert _data_devices(["/dev/sdf"], "/dev/sdf") == ["/dev/sdg"]


def test_capture_snapshots_every_volume_together_and_keeps_them(aws: AwsWorld) -> None:
    """Three volumes attached out of order: one CreateSnapshots call takes all three before
    any read; the image holds them root first, then /dev/sdf, /dev/sdg, each at its offset;
    ``keep`` leaves the snapshots and names them in ``ref``; ``release_capture`` deletes
    them (twice is fine); without ``keep`` they go when the capture closes."""
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    iid = aws.run_instance(EAST, {"backup": "1-7"})
    root = compute.get_instance(iid).extra["root_device_name"]
    sdg = _attach(aws, iid, "/dev/sdg", 3)
    sdf = _attach(aws, iid, "/dev/sdf", 2)
    volumes = compute.get_instance(iid).extra["volumes"]
    root_size = aws.client("ec2", EAST).describe_volumes(VolumeIds=[volumes[root]])["Volumes"][0][
        "Size"
    ]

    before = aws.provider.metrics.snapshot()
    with compute.capture(iid, keep=True) as capture:
        assert isinstance(capture, BlockCapture)
        r = root_size * GiB
        assert capture.disks == (
            Disk(root, 0, r),
            Disk("/dev/sdf", r, 2 * GiB),
            Disk("/dev/sdg", r + 2 * GiB, 3 * GiB),
        )
        assert capture.size == r + 5 * GiB
        ref = capture.ref
    used = aws.provider.metrics.since(before)
    assert used.count(operation="CreateSnapshots") == 1
    assert used.count(operation="CreateSnapshot") == 0
    assert ref is not None
    doc = json.loads(ref)
    assert [(d["device"], d["volume"], d["owned"]) for d in doc["disks"]] == [
        (root, volumes[root], True),
        ("/dev/sdf", sdf, True),
        ("/dev/sdg", sdg, True),
    ]
    kept = [d["snapshot"] for d in doc["disks"]]
    described = aws.client("ec2", EAST).describe_snapshots(SnapshotIds=kept)["Snapshots"]
    assert {s["SnapshotId"]: s["VolumeId"] for s in described} == dict(
        zip(kept, [volumes[root], sdf, sdg], strict=True)
    )
    compute.release_capture(ref)
    assert all(_gone(aws, EAST, s) for s in kept)
    compute.release_capture(ref)  # already gone: no error
    with pytest.raises(ComputeError, match="bad capture ref"):
        compute.release_capture('{"something": "else"}')

    with compute.capture(iid) as capture:
        assert capture.ref is None
        taken = [p.snapshot_id for p in capture.parts]  # type: ignore[attr-defined]
        assert not any(_gone(aws, EAST, s) for s in taken)
    assert all(_gone(aws, EAST, s) for s in taken)


def test_a_named_snapshot_replaces_one_volume_and_is_never_deleted(aws: AwsWorld) -> None:
    """A tag names the snapshot of /dev/sdf: the other volumes are snapshotted (that one is
    left out of CreateSnapshots), and neither close nor release deletes the named one."""
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    seeded = seed_snapshot(aws.client("ebs", EAST), {0: _block("sdf")}, volume_size_gib=2)
    iid = aws.run_instance(EAST, {f"{CAPTURE_SNAPSHOT_TAG}:/dev/sdf": seeded})
    _attach(aws, iid, "/dev/sdf", 2)
    _attach(aws, iid, "/dev/sdg", 1)
    with compute.capture(iid, keep=True) as capture:
        parts = capture.parts  # type: ignore[attr-defined]
        assert [p.device for p in parts][1:] == ["/dev/sdf", "/dev/sdg"]
        assert parts[1].snapshot_id == seeded and not parts[1].owned
        assert parts[0].owned and parts[2].owned
        ref = capture.ref
    assert ref is not None
    # moto ignores ExcludeDataVolumeIds: the snapshot it took of /dev/sdf anyway is deleted
    ec2 = aws.client("ec2", EAST)
    taken = ec2.describe_snapshots(Filters=[{"Name": "tag:regionvault:instance", "Values": [iid]}])
    assert {s["SnapshotId"] for s in taken["Snapshots"]} == {
        parts[0].snapshot_id,
        parts[2].snapshot_id,
    }
    compute.release_capture(ref)
    assert _gone(aws, EAST, parts[0].snapshot_id) and _gone(aws, EAST, parts[2].snapshot_id)
    assert not _gone(aws, EAST, seeded)


def _two_disk_instance(aws: AwsWorld, disks: dict[str, dict[int, bytes]]) -> str:
    """An instance whose disks are seeded snapshots, named by capture tags (root first)."""
    ebs = aws.client("ebs", EAST)
    tags = {"backup": "1-7", "Name": "vdu-1"}
    for number, (device, blocks) in enumerate(disks.items()):
        snapshot = seed_snapshot(ebs, blocks, volume_size_gib=1)
        tags[CAPTURE_SNAPSHOT_TAG if number == 0 else f"{CAPTURE_SNAPSHOT_TAG}:{device}"] = snapshot
    return aws.run_instance(EAST, tags, instance_type="m5.large")


def test_blocks_and_read_ranges_cover_every_disk_at_its_offset(aws: AwsWorld) -> None:
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    root = {0: os.urandom(BS), 2047: _block("root tail")}
    data = {0: _block("data head"), 7: os.urandom(BS), 8: os.urandom(BS)}
    iid = _two_disk_instance(aws, {"/dev/sda1": root, "/dev/sdf": data})
    with compute.capture(iid) as capture:
        assert [(d.name, d.offset, d.size) for d in capture.disks] == [
            ("/dev/sda1", 0, GiB),
            ("/dev/sdf", GiB, GiB),
        ]
        expected = {i * BS: b for i, b in root.items()} | {GiB + i * BS: b for i, b in data.items()}
        assert _image(capture) == expected
        # a span across the boundary, one inside the second disk cut mid-block
        before = aws.provider.metrics.snapshot()
        spans = [(GiB - BS, 2 * BS), (GiB + 7 * BS, BS + BS // 2)]
        got = list(capture.read_ranges(spans))
        used = aws.provider.metrics.since(before)
    assert got == [
        (GiB - BS, root[2047]),
        (GiB, data[0]),
        (GiB + 7 * BS, data[7]),
        (GiB + 8 * BS, data[8][: BS // 2]),
    ]
    assert used.count(operation="GetSnapshotBlock") == 4  # only the blocks in the spans
    assert used.count(operation="ListSnapshotBlocks") == 2


def test_changed_ranges_since_an_earlier_capture(aws: AwsWorld) -> None:
    """Two captures of a two-disk instance, the second with ``since`` the first's ref:
    ``changed_ranges`` names the blocks ListChangedBlocks reports per disk (an overwritten
    block on the root, a cleared one on the data disk), at the disks' offsets, merged; the
    earlier image with those ranges read again equals the later image. It answers None when
    the disks differ or an earlier snapshot is gone, and refuses a malformed ref."""
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    ebs = aws.client("ebs", EAST)
    root1 = {0: os.urandom(BS), 1: os.urandom(BS), 5: _block("config v1")}
    data1 = {0: os.urandom(BS), 3: _block("journal"), 4: os.urandom(BS)}
    root2 = {**root1, 1: os.urandom(BS), 5: _block("config v2")}
    data2 = {i: b for i, b in data1.items() if i != 3}  # block 3 trimmed
    r1, d1 = seed_snapshot(ebs, root1), seed_snapshot(ebs, data1)
    r2, d2 = seed_snapshot(ebs, root2), seed_snapshot(ebs, data2)
    iid = aws.run_instance(EAST, {})
    root = compute.get_instance(iid).extra["root_device_name"]

    with compute.capture(iid, keep=True, ex_snapshot_ids={root: r1, "/dev/sdf": d1}) as first:
        assert first.changed_ranges() is None  # no since
        earlier = _image(first)
        ref = first.ref
    assert ref is not None
    before = aws.provider.metrics.snapshot()
    with compute.capture(iid, since=ref, ex_snapshot_ids={root: r2, "/dev/sdf": d2}) as second:
        changed = second.changed_ranges()
        assert changed == [(BS, BS), (5 * BS, BS), (GiB + 3 * BS, BS)]
        fresh = dict(second.read_ranges(changed))
        later = _image(second)
    assert aws.provider.metrics.since(before).count(operation="ListChangedBlocks") == 2
    merged = {o: b for o, b in earlier.items() if not any(s <= o < s + n for s, n in changed)}
    merged.update(fresh)
    assert merged == later

    # the same snapshot on a disk: nothing changed there, and no call for it
    with compute.capture(iid, since=ref, ex_snapshot_ids={root: r2, "/dev/sdf": d1}) as third:
        assert third.changed_ranges() == [(BS, BS), (5 * BS, BS)]
    # a disk more, or fewer: cannot tell
    with compute.capture(iid, since=ref, ex_snapshot_ids={root: r2}) as fewer:
        assert fewer.changed_ranges() is None
    # the earlier snapshot is gone
    aws.client("ec2", EAST).delete_snapshot(SnapshotId=d1)
    with compute.capture(iid, since=ref, ex_snapshot_ids={root: r2, "/dev/sdf": d2}) as gone:
        assert gone.changed_ranges() is None
    with (
        compute.capture(iid, since="not json", ex_snapshot_ids={root: r2}) as bad,
        pytest.raises(ComputeError, match="bad capture ref"),
    ):
        bad.changed_ranges()


def test_changed_ranges_live(aws: AwsWorld) -> None:
    if not aws.live:
        pytest.skip("moto's ListChangedBlocks leaves out blocks only the second snapshot holds")
    ebs = aws.client("ebs", EAST)
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    first = seed_snapshot(ebs, {0: os.urandom(BS)})
    second = seed_snapshot(ebs, {0: os.urandom(BS), 9: _block("new")})
    iid = aws.run_instance(EAST, {})
    with compute.capture(iid, keep=True, ex_snapshot_id=first) as one:
        ref = one.ref
    assert ref is not None
    with compute.capture(iid, since=ref, ex_snapshot_id=second) as two:
        assert two.changed_ranges() == [(0, BS), (9 * BS, BS)]


def test_restore_of_two_disks_launches_them_mapped_in_order(aws: AwsWorld) -> None:
    """A two-disk image restored in us-east-1 into eu-west-1: one snapshot per disk (a write
    across the boundary is split), an image whose root is disk 0 and whose /dev/sdf is
    disk 1; the launched instance captures back to the same disks and bytes; terminate
    removes the image and both snapshots."""
    cfg = aws.region(WEST, capture_launched_from_snapshot=True)
    west = aws.track(aws.provider.compute(cfg))
    east = aws.track(aws.provider.compute(aws.region(EAST)))
    root = {0: os.urandom(BS), 2047: _block("root tail")}
    data = {0: _block("data head"), 9: os.urandom(BS)}
    iid = _two_disk_instance(aws, {"/dev/sda1": root, "/dev/sdf": data})
    source = east.get_instance(iid)
    boot = source.extra["root_device_name"]
    registered: list[dict[str, Any]] = []
    west.ec2.meta.events.register(
        "provide-client-params.ec2.RegisterImage", lambda params, **_: registered.append(params)
    )
    spec = LaunchSpec(name="vdu-1", tags=source.tags, function=source.function, source=source)
    with east.capture(iid) as capture:
        sink = west.open_restore_sink(
            spec, CaptureKind.BLOCKS, size=capture.size, disks=capture.disks
        )
        assert isinstance(sink, AwsBlockSink) and sink.disks == capture.disks
        image = _image(capture)
        sink.write(GiB - BS, image[GiB - BS] + image[GiB])  # crosses into disk 1
        for offset, block in image.items():
            if offset not in (GiB - BS, GiB):
                sink.write(offset, block)
    sink.commit()
    first, second = sink.snapshot_ids
    assert _snapshot_blocks(aws, WEST, first) == root
    assert _snapshot_blocks(aws, WEST, second) == data

    launched = west.launch(spec, sink)
    mappings = registered[-1]["BlockDeviceMappings"]
    assert [(m["DeviceName"], m["Ebs"]["SnapshotId"]) for m in mappings] == [
        (boot, first),
        ("/dev/sdf", second),
    ]
    assert launched.tags == Tags(source.tags)
    with west.capture(launched.id) as again:
        assert [(d.name, d.offset, d.size) for d in again.disks] == [
            (boot, 0, GiB),
            ("/dev/sdf", GiB, GiB),
        ]
        assert _image(again) == image
    west.terminate(launched.id)
    assert _gone(aws, WEST, first) and _gone(aws, WEST, second)


def test_a_failed_restore_of_several_disks_removes_all_it_made(aws: AwsWorld) -> None:
    """Three disks: a StartSnapshot that fails for the third deletes the two already
    started; a launch EC2 refuses, then discard, removes the image and every snapshot; data
    between two disks (where the image holds none) is refused, not dropped."""
    # a security group EC2 does not know: RunInstances fails after the image is registered
    cfg = aws.region(WEST, instance_type="t3.small", security_group_ids=["sg-0badc0ffee0000000"])
    west = aws.track(aws.provider.compute(cfg))
    disks = [Disk("os", 0, GiB), Disk("lun0", GiB, 4 * BS), Disk("lun1", GiB + 8 * BS, GiB)]
    size = GiB + 8 * BS + GiB
    spec = LaunchSpec(name=f"three-disks-{aws.tag}", tags=Tags({"rv-run": aws.tag}))

    started: list[str] = []
    calls = 0

    def third_fails(params: dict[str, Any], **_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            params["VolumeSize"] = "three"  # the real client refuses it before sending
        else:
            started.append(params["Description"])

    west.ebs.meta.events.register("provide-client-params.ebs.StartSnapshot", third_fails)
    with pytest.raises(ComputeError, match=r"three-disks-\w+ disk 2 \(lun1\)"):
        west.open_restore_sink(spec, CaptureKind.BLOCKS, size=size, disks=disks)
    assert len(started) == 2
    ec2 = aws.client("ec2", WEST)
    mine = ec2.describe_snapshots(Filters=[{"Name": f"tag:{RESTORE_TAG}", "Values": [spec.name]}])
    assert mine["Snapshots"] == []
    west.ebs.meta.events.unregister("provide-client-params.ebs.StartSnapshot", third_fails)

    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=size, disks=disks)
    assert isinstance(sink, AwsBlockSink) and len(sink.snapshot_ids) == 3
    with pytest.raises(ComputeError, match="outside the image's disks"):
        sink.write(GiB, bytes(4 * BS) + b"stray")  # lun0 then the gap before lun1
    before = aws.provider.metrics.snapshot()
    sink.write(GiB, _block("lun0") + bytes(7 * BS))  # zeros in the gap are padding
    sink.write(0, _block("boot"))
    sink.commit()
    # blocks of zeros are not sent: a new snapshot reads zeros there
    assert aws.provider.metrics.since(before).count(operation="PutSnapshotBlock") == 2
    assert _snapshot_blocks(aws, WEST, sink.snapshot_ids[1]) == {0: _block("lun0")}
    with pytest.raises(ComputeError, match="cannot run an instance"):
        west.launch(spec, sink)
    image = sink.image_id
    assert image is not None and len(ec2.describe_images(ImageIds=[image])["Images"]) == 1
    sink.discard()
    assert all(_gone(aws, WEST, s) for s in sink.snapshot_ids)
    assert ec2.describe_images(ImageIds=[image])["Images"] == []
    assert [i.id for i in west.list_instances(tag_filters={"rv-run": aws.tag})] == []


def test_bad_input_is_refused_clearly(aws: AwsWorld) -> None:
    """A snapshot holding a block past its volume's end is an IntegrityError naming it (not
    data left out); a disk layout that does not fit 512 KiB blocks (a point from a compute
    with smaller blocks) is refused before any snapshot is started."""
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    odd = seed_snapshot(aws.client("ebs", EAST), {0: _block("a"), 2048: _block("past the end")})
    iid = aws.run_instance(EAST, {CAPTURE_SNAPSHOT_TAG: odd})
    with (
        compute.capture(iid) as capture,
        pytest.raises(IntegrityError, match=f"{odd}.*block 2048 lies past"),
    ):
        list(capture.blocks())

    before = aws.provider.metrics.snapshot()
    disks = [Disk("boot", 0, 64 * 1024), Disk("data", 64 * 1024, GiB)]
    with pytest.raises(ComputeError, match=r"'unaligned'.*not a multiple of 524288"):
        compute.open_restore_sink(
            LaunchSpec(name="unaligned"), CaptureKind.BLOCKS, size=GiB + 64 * 1024, disks=disks
        )
    assert aws.provider.metrics.since(before).count(operation="StartSnapshot") == 0


class _RecordedBody:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


@pytest.mark.parametrize(
    ("reason", "cannot_tell"), [("UNRELATED_SNAPSHOTS", True), ("INVALID_SNAPSHOT_ID", False)]
)
def test_unrelated_snapshots_mean_cannot_tell(
    aws: AwsWorld, reason: str, cannot_tell: bool
) -> None:
    """AWS answers ListChangedBlocks for snapshots of different lineages with a
    ValidationException whose reason is UNRELATED_SNAPSHOTS (moto never does): a recorded
    answer, parsed by the real client, makes ``changed_ranges`` None (read everything);
    any other validation failure is an error naming the snapshot."""
    if aws.live:
        pytest.skip("replays a recorded answer of the EBS direct APIs")
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    ebs = aws.client("ebs", EAST)
    first, second = seed_snapshot(ebs, {0: _block("a")}), seed_snapshot(ebs, {0: _block("b")})
    iid = aws.run_instance(EAST, {})
    with compute.capture(iid, keep=True, ex_snapshot_id=first) as one:
        ref = one.ref
    assert ref is not None
    body = json.dumps({"Message": "The snapshots are not related.", "Reason": reason}).encode()
    sent: list[str] = []

    def recorded(request: Any, **_: Any) -> AWSResponse:
        sent.append(request.url)
        headers = {"x-amzn-ErrorType": "ValidationException", "Content-Type": "application/json"}
        return AWSResponse(request.url, 400, headers, _RecordedBody(body))

    compute.ebs.meta.events.register("before-send.ebs.ListChangedBlocks", recorded)
    with compute.capture(iid, since=ref, ex_snapshot_id=second) as two:
        if cannot_tell:
            assert two.changed_ranges() is None
        else:
            with pytest.raises(ComputeError, match=f"snapshot {second}"):
                two.changed_ranges()
    assert len(sent) == 1
    assert f"firstSnapshotId={first}" in sent[0] and f"/snapshots/{second}/changedblocks" in sent[0]


def test_engine_backs_up_and_launches_a_two_volume_instance(aws: AwsWorld, tmp_path: Path) -> None:
    """Through the engine, in us-east-1: an instance with a root and a data volume is backed
    up as one point of two disks and restored with a launch: one snapshot per disk, each
    equal block for block to its original; terminating the launched instance removes
    both."""
    root = {0: os.urandom(BS), 3: _block("boot config"), 2047: _block("root tail")}
    data = {0: _block("subscriber db"), 1: os.urandom(BS), 900: os.urandom(BS)}
    iid = _two_disk_instance(aws, {"/dev/sda1": root, "/dev/sdf": data})
    a = f"aws:{EAST}"
    doc = {
        "site": {"name": "two-volumes", "state_dir": str(tmp_path / "state")},
        "regions": {a: aws.settings(EAST)},
    }
    site_path = tmp_path / "site.toml"
    site_path.write_bytes(tomli_w.dumps(doc).encode())
    pm = make_plugin_manager()
    with Site.load(site_path, registry=registry_from(pm), plugin_manager=pm) as site:
        engine = Engine(site, health_timeout=5.0)
        point = engine.backup(iid, region=a)
        manifest = engine.repository(a).load_manifest(point.id)
        assert manifest.disks == (Disk("/dev/sda1", 0, GiB), Disk("/dev/sdf", GiB, GiB))
        result = engine.restore(point.id, region=a, launch=True)
        assert result.instance is not None
        ec2 = aws.client("ec2", EAST)
        raw = ec2.describe_instances(InstanceIds=[result.instance.id])["Reservations"][0]
        image_id = raw["Instances"][0]["ImageId"]
        image_tags = {
            t["Key"]: t["Value"]
            for t in ec2.describe_images(ImageIds=[image_id])["Images"][0].get("Tags", [])
        }
        first = image_tags["regionvault:restore-snapshot"]
        second = image_tags["regionvault:restore-snapshot:1"]
        assert _snapshot_blocks(aws, EAST, first) == root
        assert _snapshot_blocks(aws, EAST, second) == data
        site.region(a).compute.terminate(result.instance.id)
        assert _gone(aws, EAST, first) and _gone(aws, EAST, second)
