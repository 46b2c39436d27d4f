"""EC2 Compute against the Compute contract, over boto3 and HTTP: paged tag-filtered
listings, tags, block captures through the EBS direct APIs, restores into a new snapshot in
another region, launches from it."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest
from aws_world import EAST, WEST, AwsWorld
from regionvault.core.errors import (
    ComputeError,
    InstanceNotFound,
    IntegrityError,
    UnsupportedOperation,
)
from regionvault.core.interfaces import BlockCapture, BlockSink
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.providers.aws.testing import EBS_BLOCK_SIZE, seed_snapshot

CAPTURE_TAG = "regionvault:capture-snapshot"


def _snapshot_blocks(aws: AwsWorld, aws_region: str, snapshot_id: str) -> dict[int, bytes]:
    """Every block of a snapshot, read with a raw EBS client (outside the provider)."""
    ebs = aws.client("ebs", aws_region)
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)
    out = {}
    for block in listed["Blocks"]:
        answer = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )
        out[int(block["BlockIndex"])] = answer["BlockData"].read()
    return out


def test_list_by_tag_filter_in_pages(aws: AwsWorld) -> None:
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    mine = f"rv-{aws.tag}"  # a key only this test's instances have (live accounts have more)
    tagged = {
        aws.run_instance(EAST, {"backup": "1-7", mine: "x", "Name": f"vdu-{i}"}) for i in range(7)
    }
    other = aws.run_instance(EAST, {"backup": "none", mine: "x"})
    untagged = aws.run_instance(EAST, {})
    gone = aws.run_instance(EAST, {"backup": "1-7", mine: "x"})
    aws.client("ec2", EAST).terminate_instances(InstanceIds=[gone])
    wanted = {"backup": "1-7", mine: "x"}

    before = aws.provider.metrics.snapshot()
    found = list(compute.list_instances(tag_filters=wanted, page_size=5))
    assert {i.id for i in found} == tagged
    # two pages, two calls: the API calls grow with pages, not with instances
    assert aws.provider.metrics.since(before).by_operation() == {"ec2.DescribeInstances": 2}
    first = compute.list_instances_page(tag_filters=wanted, page_size=5)
    assert len(first.instances) == 5 and first.next_token
    second = compute.list_instances_page(
        tag_filters=wanted, page_size=5, page_token=first.next_token
    )
    assert len(second.instances) == 2 and second.next_token is None
    # pages smaller than EC2's smallest (5) are cut, and go on where they stopped
    before = aws.provider.metrics.snapshot()
    pages, token = [], None
    for _ in range(10):
        page = compute.list_instances_page(tag_filters=wanted, page_size=2, page_token=token)
        pages.append([i.id for i in page.instances])
        token = page.next_token
        if token is None:
            break
    assert all(1 <= len(p) <= 2 for p in pages)
    listed = [i for p in pages for i in p]
    assert sorted(listed) == sorted(tagged)  # each once
    calls = aws.provider.metrics.since(before).count(operation="DescribeInstances")
    assert calls == len(pages) <= 5
    with pytest.raises(ComputeError, match="page token"):
        compute.list_instances_page(page_token="garbage")

    assert {i.id for i in compute.list_instances(tag_filters={mine: None})} == tagged | {other}
    everything = {i.id for i in compute.list_instances()}
    assert tagged | {other, untagged} <= everything
    assert gone not in everything

    vdu = next(i for i in found if i.name == "vdu-0")
    assert vdu.tags["backup"] == "1-7" and vdu.state in ("pending", "running")
    assert vdu.region == f"aws:{EAST}" and vdu.function == "t3.micro"
    assert vdu.extra["instance_type"] == "t3.micro" and vdu.extra["root_volume_id"]
    assert vdu.capture_kinds == frozenset({CaptureKind.BLOCKS})


def test_tags_round_trip(aws: AwsWorld) -> None:
    compute = aws.track(aws.provider.compute(aws.region(WEST)))
    iid = aws.run_instance(WEST, {"Name": "core-1"})
    assert compute.set_tags(iid, {"backup": "1-7", "function": "core"}) == Tags(
        {"Name": "core-1", "backup": "1-7", "function": "core"}
    )
    assert compute.set_tags(iid, {"backup": "4h-2d"})["backup"] == "4h-2d"
    assert compute.remove_tags(iid, ["function", "absent"]) == Tags(
        {"Name": "core-1", "backup": "4h-2d"}
    )
    assert compute.remove_tags(iid, []) == Tags({"Name": "core-1", "backup": "4h-2d"})
    assert compute.get_instance(iid).tags == Tags({"Name": "core-1", "backup": "4h-2d"})
    with pytest.raises(ComputeError, match="reserved"):
        compute.set_tags(iid, {"aws:backup": "1"})
    with pytest.raises(ComputeError, match="reserved"):
        compute.set_tags(iid, {CAPTURE_TAG: "snap-1"})
    with pytest.raises(InstanceNotFound):
        compute.set_tags("i-0123456789abcdef0", {"a": "b"})
    with pytest.raises(InstanceNotFound):
        compute.get_instance("i-0123456789abcdef0")
    compute.terminate(iid)
    with pytest.raises(InstanceNotFound):
        compute.get_instance(iid)
    assert iid not in {i.id for i in compute.list_instances()}


def _seeded(aws: AwsWorld) -> tuple[str, dict[int, bytes]]:
    blocks = {0: os.urandom(EBS_BLOCK_SIZE), 3: b"boot config" * 100, 9: os.urandom(1000)}
    snapshot = seed_snapshot(aws.client("ebs", EAST), blocks, volume_size_gib=1)
    return snapshot, {i: d.ljust(EBS_BLOCK_SIZE, b"\0") for i, d in blocks.items()}


def test_capture_reads_exactly_the_seeded_blocks(aws: AwsWorld) -> None:
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    snapshot, blocks = _seeded(aws)
    iid = aws.run_instance(EAST, {"backup": "1-7", CAPTURE_TAG: snapshot})
    before = aws.provider.metrics.snapshot()
    with compute.capture(iid) as capture:
        assert isinstance(capture, BlockCapture)
        assert capture.size == 1024**3 and capture.block_size == EBS_BLOCK_SIZE
        assert capture.instance.id == iid
        # the provider's own tag is not among the instance's tags, and cannot be removed
        assert CAPTURE_TAG not in capture.instance.tags
        assert compute.remove_tags(iid, [CAPTURE_TAG]) == Tags({"backup": "1-7"})
        read = list(capture.blocks())
    assert read == [(i * EBS_BLOCK_SIZE, blocks[i]) for i in sorted(blocks)]
    used = aws.provider.metrics.since(before)
    assert used.count(operation="GetSnapshotBlock") == 3
    assert used.count(operation="ListSnapshotBlocks") == 1
    # a snapshot the capture did not take is not deleted on close
    assert aws.client("ec2", EAST).describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    # the ex_ option names a snapshot directly
    with compute.capture(aws.run_instance(EAST, {}), ex_snapshot_id=snapshot) as capture:
        assert [o for o, _ in capture.blocks()] == [0, 3 * EBS_BLOCK_SIZE, 9 * EBS_BLOCK_SIZE]
    with pytest.raises(UnsupportedOperation):
        compute.capture(iid, kind=CaptureKind.FILES)


def test_capture_verifies_block_checksums(aws: AwsWorld) -> None:
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    ebs = aws.client("ebs", EAST)
    snapshot = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    data = b"\x01" * EBS_BLOCK_SIZE
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    ebs.put_snapshot_block(
        SnapshotId=snapshot,
        BlockIndex=2,
        BlockData=data,
        DataLength=len(data),
        Checksum=wrong,
        ChecksumAlgorithm="SHA256",
    )
    ebs.complete_snapshot(SnapshotId=snapshot, ChangedBlocksCount=1)
    iid = aws.run_instance(EAST, {CAPTURE_TAG: snapshot})
    with compute.capture(iid) as capture, pytest.raises(IntegrityError, match="block 2"):
        list(capture.blocks())


def test_capture_without_ebs_direct_data_fails_clearly(aws: AwsWorld) -> None:
    if not aws.live:
        pytest.skip("moto's EBS direct APIs cannot read snapshots taken of volumes")
    compute = aws.track(aws.provider.compute(aws.region(EAST)))
    iid = aws.run_instance(EAST, {})
    with compute.capture(iid) as capture:
        assert capture.size >= 1024**3
        assert all(len(data) == EBS_BLOCK_SIZE for _, data in capture.blocks())


def test_restore_into_another_region_and_launch(aws: AwsWorld) -> None:
    east = aws.track(aws.provider.compute(aws.region(EAST)))
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    snapshot, blocks = _seeded(aws)
    tags = {"backup": "1-7", "Name": "vcu-1", "function": "vcu", CAPTURE_TAG: snapshot}
    iid = aws.run_instance(EAST, tags, instance_type="m5.large")
    source = east.get_instance(iid)

    spec = LaunchSpec(name="vcu-1", tags=source.tags, function=source.function, source=source)
    with east.capture(iid) as capture:
        sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=capture.size)
        assert isinstance(sink, BlockSink) and sink.block_size == EBS_BLOCK_SIZE
        for offset, data in capture.blocks():
            sink.write(offset, data)
    sink.commit()
    restored = sink.snapshot_id  # type: ignore[attr-defined]
    assert _snapshot_blocks(aws, WEST, restored) == blocks
    west_snapshots = aws.client("ec2", WEST).describe_snapshots(SnapshotIds=[restored])
    assert west_snapshots["Snapshots"][0]["State"] == "completed"

    launched = west.launch(spec, sink)
    assert launched.region == f"aws:{WEST}"
    assert launched.extra["instance_type"] == "m5.large"
    assert launched.name == "vcu-1"
    # the original's tags, exactly (the capture tag was the provider's, not the instance's)
    expected = Tags({k: v for k, v in tags.items() if k != CAPTURE_TAG})
    assert source.tags == expected
    assert launched.tags == expected
    assert west.get_instance(launched.id).tags == expected
    image = launched.extra["image_id"]
    described = aws.client("ec2", WEST).describe_images(ImageIds=[image])["Images"][0]
    image_tags = {t["Key"]: t["Value"] for t in described.get("Tags", [])}
    assert image_tags["regionvault:restore-snapshot"] == restored

    west.terminate(launched.id)
    assert launched.id not in {i.id for i in west.list_instances()}
    # the image and snapshot made for the launch go with it (drills leave nothing behind)
    assert aws.client("ec2", WEST).describe_images(ImageIds=[image])["Images"] == []
    with pytest.raises(Exception, match=r"InvalidSnapshot\.NotFound"):
        aws.client("ec2", WEST).describe_snapshots(SnapshotIds=[restored])


def test_restore_sink_rejects_misuse(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST)))
    spec = LaunchSpec(name="x")
    with pytest.raises(ComputeError, match="size"):
        west.open_restore_sink(spec, CaptureKind.BLOCKS)
    with pytest.raises(UnsupportedOperation):
        west.open_restore_sink(spec, CaptureKind.FILES, size=1)
    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=1024**3)
    with pytest.raises(ComputeError, match="multiple"):
        sink.write(100, b"x")
    with pytest.raises(ComputeError, match="not committed"):
        west.launch(spec, sink)
    sink.write(0, b"tail block, zero-padded")
    sink.commit()
    with pytest.raises(ComputeError, match="instance type"):
        west.launch(spec, sink)
    restored = _snapshot_blocks(aws, WEST, sink.snapshot_id)  # type: ignore[attr-defined]
    assert restored == {0: b"tail block, zero-padded".ljust(EBS_BLOCK_SIZE, b"\0")}


def test_launch_keeps_exactly_the_spec_tags_and_name(aws: AwsWorld) -> None:
    """The launched instance's tags equal the spec's (no Name tag added) and its name is the
    spec's; with capture_launched_from_snapshot (test/dev: moto cannot read a volume), its
    capture reads the snapshot it was restored from."""
    cfg = aws.region(WEST, capture_launched_from_snapshot=True, instance_type="t3.small")
    west = aws.track(aws.provider.compute(cfg))
    spec = LaunchSpec(name="restored-core", tags=Tags({"rv-run": aws.tag, "role": "core"}))
    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=2 * EBS_BLOCK_SIZE)
    image = os.urandom(EBS_BLOCK_SIZE) + b"state".ljust(EBS_BLOCK_SIZE, b"\0")
    sink.write(0, image)
    sink.commit()
    launched = west.launch(spec, sink)
    assert launched.tags == spec.tags and launched.name == "restored-core"
    assert launched.extra["instance_type"] == "t3.small"
    again = west.get_instance(launched.id)
    assert again.tags == spec.tags and again.name == "restored-core"
    with west.capture(launched.id) as capture:
        assert b"".join(data for _, data in capture.blocks()) == image


def test_launch_from_a_point_alone_uses_the_recorded_instance_type(aws: AwsWorld) -> None:
    """Engine.restore gives no source instance, only the point's function, which this
    provider records as the instance type: that type is launched, with an image of the
    architecture it runs; a function that is no instance type falls back to the setting."""
    west = aws.track(aws.provider.compute(aws.region(WEST, instance_type="t3.small")))
    registered: list[str] = []

    def seen(params: dict[str, Any], **_: Any) -> None:
        registered.append(params["Architecture"])  # moto does not keep it on the image

    west.ec2.meta.events.register("provide-client-params.ec2.RegisterImage", seen)
    for function, instance_type, architecture in (
        ("t4g.medium", "t4g.medium", "arm64"),
        ("m5.large", "m5.large", "x86_64"),
        ("vcu", "t3.small", "x86_64"),
    ):
        spec = LaunchSpec(name=f"from-point-{function}", function=function)
        sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=EBS_BLOCK_SIZE)
        sink.write(0, b"boot")
        sink.commit()
        launched = west.launch(spec, sink)
        assert launched.extra["instance_type"] == instance_type
        assert registered[-1] == architecture
    assert len(registered) == 3


def _snapshot_gone(aws: AwsWorld, aws_region: str, snapshot_id: str) -> bool:
    try:
        found = aws.client("ec2", aws_region).describe_snapshots(SnapshotIds=[snapshot_id])
    except Exception as exc:
        if "InvalidSnapshot.NotFound" in str(exc):
            return True
        raise
    return not found["Snapshots"]


def test_discarding_an_unfinished_restore_deletes_its_snapshot(aws: AwsWorld) -> None:
    """A restore that fails half-way: the sink is discarded, its snapshot (never completed)
    is deleted, and the sink can be neither written nor launched from any more."""
    west = aws.track(aws.provider.compute(aws.region(WEST, instance_type="t3.small")))
    spec = LaunchSpec(name="half-restored")
    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=4 * EBS_BLOCK_SIZE)
    snapshot = sink.snapshot_id  # type: ignore[attr-defined]
    sink.write(0, b"the first block of a restore that will fail")
    assert not _snapshot_gone(aws, WEST, snapshot)
    sink.discard()
    assert _snapshot_gone(aws, WEST, snapshot)
    with pytest.raises(ComputeError, match="discarded"):
        sink.write(EBS_BLOCK_SIZE, b"more")
    with pytest.raises(ComputeError, match="discarded"):
        west.launch(spec, sink)
    sink.discard()  # twice is harmless


def test_a_failed_launch_is_discarded_with_its_image_and_snapshot(aws: AwsWorld) -> None:
    """run_instances fails after the image was registered: discarding the sink deregisters
    that image and deletes the snapshot; nothing the launch made stays behind."""
    cfg = aws.region(WEST, instance_type="t3.small", security_group_ids=["sg-0badc0ffee0000000"])
    west = aws.track(aws.provider.compute(cfg))
    spec = LaunchSpec(name="never-runs", tags=Tags({"rv-run": aws.tag}))
    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=EBS_BLOCK_SIZE)
    sink.write(0, b"boot")
    sink.commit()
    snapshot = sink.snapshot_id  # type: ignore[attr-defined]
    with pytest.raises(ComputeError, match="cannot run an instance"):
        west.launch(spec, sink)
    image = sink.image_id  # type: ignore[attr-defined]
    assert image is not None
    ec2 = aws.client("ec2", WEST)
    assert len(ec2.describe_images(ImageIds=[image])["Images"]) == 1
    sink.discard()
    assert ec2.describe_images(ImageIds=[image])["Images"] == []
    assert _snapshot_gone(aws, WEST, snapshot)
    assert [i.id for i in west.list_instances(tag_filters={"rv-run": aws.tag})] == []


def test_discarding_a_launched_sink_leaves_the_instance_its_disk(aws: AwsWorld) -> None:
    west = aws.track(aws.provider.compute(aws.region(WEST, instance_type="t3.small")))
    spec = LaunchSpec(name="launched")
    sink = west.open_restore_sink(spec, CaptureKind.BLOCKS, size=EBS_BLOCK_SIZE)
    sink.write(0, b"boot")
    sink.commit()
    launched = west.launch(spec, sink)
    sink.discard()
    snapshot = sink.snapshot_id  # type: ignore[attr-defined]
    assert not _snapshot_gone(aws, WEST, snapshot)
    image = launched.extra["image_id"]
    assert len(aws.client("ec2", WEST).describe_images(ImageIds=[image])["Images"]) == 1
    west.terminate(launched.id)  # terminating is what removes them
    assert _snapshot_gone(aws, WEST, snapshot)
