"""GceCompute against the Compute contract, with the unmodified google-cloud-compute REST
clients over real 127.0.0.1 connections to the Compute Engine fake (disk bytes as sparse
files, the backup worker's devices as symlinks)."""

from __future__ import annotations

import json
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="the GCP tests need pip install -e '.[test]'")

from gce_world import WORKER, GceWorld, LaunchingSupport, SeedingSupport, gce_world
from regionvault.core.conformance import ComputeSuite
from regionvault.core.conformance.fixtures import InstanceFactory, instance_factory
from regionvault.core.errors import (
    ComputeError,
    ConfigError,
    InstanceNotFound,
    TransientError,
    UnsupportedOperation,
)
from regionvault.core.site import Region
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.providers.gcp.compute import (
    GceBlockCapture,
    GceBlockSink,
    GceCompute,
    GiB,
    MiB,
    label_filter,
)
from regionvault.providers.gcp.fakes.compute import parse_label_filter
from regionvault.providers.gcp.labels import KEY_RULE, VALUE_RULE, LabelError, check_labels


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[GceWorld]:
    with gce_world(tmp_path) as world:
        yield world


class TestGceComputeSuite(ComputeSuite):
    """The provider-neutral Compute suite against GceCompute over the Compute Engine fake."""

    @pytest.fixture
    def compute_a(self, gce: GceWorld) -> GceCompute:
        return gce.compute()

    @pytest.fixture
    def make_instance(
        self, gce: GceWorld, compute_a: GceCompute, tmp_path: Path, uid: str
    ) -> Iterator[InstanceFactory]:
        region = cast(Region, SimpleNamespace(name=compute_a.region, compute=compute_a))
        yield from instance_factory(SeedingSupport(gce, compute_a), region, tmp_path, uid)


class TestGceComputeSuiteThroughTheApi(TestGceComputeSuite):
    """The same, every test instance made through the API alone (a restore through the
    worker, then a launch), as a conformance run against a fake in another process must."""

    @pytest.fixture
    def make_instance(
        self, gce: GceWorld, compute_a: GceCompute, tmp_path: Path, uid: str
    ) -> Iterator[InstanceFactory]:
        region = cast(Region, SimpleNamespace(name=compute_a.region, compute=compute_a))
        support = LaunchingSupport(gce, compute_a)
        yield from instance_factory(support, region, tmp_path, uid)
        assert gce.leftovers()["worker disks"] == []


# --------------------------------------------------------------------------- labels


def test_the_label_rule_takes_policy_tags_and_refuses_the_rest_in_one_line() -> None:
    good = {"backup": "1-7", "policy": "gold", "opt": "none", "empty": "", "a_b-9": "x_y-0"}
    assert check_labels(good) == good
    assert check_labels({"k" * 63: "v" * 63}) == {"k" * 63: "v" * 63}
    bad_keys = ["Name", "backup:daily", "9lives", "-x", "", "k" * 64, "web server", "é"]
    for key in bad_keys:
        with pytest.raises(LabelError) as refused:
            check_labels({key: "1"})
        message = str(refused.value)
        assert repr(key) in message and KEY_RULE in message and "\n" not in message
    for value in ["Daily", "1/7", "a b", "v" * 64, "x.y"]:
        with pytest.raises(LabelError) as refused:
            check_labels({"backup": value})
        assert repr(value) in str(refused.value) and VALUE_RULE in str(refused.value)
    with pytest.raises(LabelError, match="at most 64 labels"):
        check_labels({f"k{i}": "v" for i in range(65)})
    # a refusal is a ComputeError (the tagger reports it per instance) and a ValueError
    assert issubclass(LabelError, ComputeError) and issubclass(LabelError, ValueError)


def test_the_label_filter_is_what_the_compute_engine_api_parses() -> None:
    wanted: dict[str, str | None] = {"backup": "1-7", "tier": None, "role": ""}
    text = label_filter(wanted)
    assert text == '(labels.backup = "1-7") AND (labels.role = "") AND (labels.tier:*)'
    assert sorted(parse_label_filter(text), key=str) == sorted(wanted.items(), key=str)
    assert label_filter({}) == ""


# --------------------------------------------------------------------------- list and labels


def test_list_filters_on_gces_side_in_pages(gce: GceWorld) -> None:
    compute = gce.compute()
    tagged = {gce.seed(f"vdu-{i}", labels={"backup": "1-7", "role": "vdu"}) for i in range(7)}
    other = gce.seed("core-0", labels={"backup": "none"})
    bare = gce.seed("ims-0")
    before = gce.fake.counts["instances.list"]
    pages, token = [], None
    for _ in range(10):
        page = compute.list_instances_page(
            tag_filters={"backup": "1-7"}, page_size=3, page_token=token
        )
        pages.append([i.id for i in page.instances])
        token = page.next_token
        if token is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(i for p in pages for i in p) == sorted(tagged)
    # one request a page, each with the filter and maxResults: GCE filtered, not this side
    assert gce.fake.counts["instances.list"] - before == 3
    listed = [q for m, q in gce.fake.requests if m == "instances.list"][-3:]
    assert all("filter=%28labels.backup+%3D+%221-7%22%29" in q for q in listed), listed
    assert all("maxResults=3" in q for q in listed)
    assert {i.id for i in compute.list_instances(tag_filters={"backup": None})} == tagged | {other}
    assert {i.id for i in compute.list_instances(tag_filters={"backup": None, "role": "vdu"})} == (
        tagged
    )
    assert WORKER in {i.id for i in compute.list_instances()} and bare in {
        i.id for i in compute.list_instances()
    }
    vdu = compute.get_instance("vdu-0")
    assert vdu.tags == Tags({"backup": "1-7", "role": "vdu"}) and vdu.name == "vdu-0"
    assert vdu.state == "running" and vdu.region == "gcp:east"
    assert vdu.function == "e2-standard-2" and vdu.extra["machine_type"] == "e2-standard-2"
    assert vdu.capture_kinds == frozenset({CaptureKind.BLOCKS})
    with pytest.raises(ComputeError, match="page token"):
        compute.list_instances_page(page_token="garbage")
    # a filter no label can meet is refused, naming the rule, before any request
    with pytest.raises(LabelError, match="not a GCP label"):
        compute.list_instances_page(tag_filters={"Name": "vdu-0"})


def test_labels_round_trip_with_the_fingerprint(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("core-1", labels={"keep": "1"})
    assert compute.set_tags(vm, {"backup": "1-7", "function": "core"}) == Tags(
        {"keep": "1", "backup": "1-7", "function": "core"}
    )
    (written,) = [q for m, q in gce.fake.requests if m == "instances.setLabels"]
    assert "requestId=" in written
    assert compute.remove_tags(vm, ["function", "absent", "Not-A-Label"]) == Tags(
        {"keep": "1", "backup": "1-7"}
    )
    before = gce.fake.counts["instances.setLabels"]
    assert compute.remove_tags(vm, []) == Tags({"keep": "1", "backup": "1-7"})
    assert compute.set_tags(vm, {"backup": "1-7"}) == Tags({"keep": "1", "backup": "1-7"})
    assert gce.fake.counts["instances.setLabels"] == before  # nothing to change: no write
    for bad in ({"Backup": "1-7"}, {"backup": "Daily"}, {"a/b": "1"}):
        with pytest.raises(LabelError, match="is not a GCP label"):
            compute.set_tags(vm, bad)
    assert gce.fake.counts["instances.setLabels"] == before  # refused before any request
    for unknown in ("no-such-vm", "Bad Name!", "12345"):
        with pytest.raises(InstanceNotFound):
            compute.get_instance(unknown)
    with pytest.raises(InstanceNotFound):
        compute.set_tags("no-such-vm", {"a": "b"})


def test_a_stale_fingerprint_is_read_again_not_overwritten(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("core-2", labels={"keep": "1"})
    # another writer changed the labels between our read and our write: GCE answers 412
    gce.fake.fail_next("instances.setLabels", 412, reason="conditionNotMet")
    assert compute.set_tags(vm, {"backup": "1-7"}) == Tags({"keep": "1", "backup": "1-7"})
    assert gce.fake.counts["instances.setLabels"] == 2
    assert gce.fake.counts["instances.get"] >= 3  # read, read again, read back
    gce.fake.fail_next("instances.setLabels", 412, reason="conditionNotMet", count=10)
    with pytest.raises(TransientError, match="kept changing"):
        compute.set_tags(vm, {"backup": "none"})


def test_throttling_and_server_errors_are_transient_and_reads_are_retried(
    gce: GceWorld,
) -> None:
    compute = gce.compute()
    vm = gce.seed("core-3")
    gce.fake.fail_next("instances.get", 503)
    assert compute.get_instance(vm).id == vm  # retried (sdk_retries = 2)
    for status in (429, 500, 503):
        gce.fake.fail_next("instances.get", status, count=3)
        with pytest.raises(TransientError, match=f"HTTP {status}"):
            compute.get_instance(vm)
    gce.fake.fail_next("instances.get", 403, reason="forbidden", message="Required permission")
    with pytest.raises(ComputeError, match="HTTP 403") as denied:
        compute.get_instance(vm)
    assert not isinstance(denied.value, TransientError) and "\n" not in str(denied.value)


def test_a_change_retried_after_a_transient_failure_happens_once(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("core-4")
    gce.fake.fail_next("instances.setLabels", 503)
    assert compute.set_tags(vm, {"backup": "1-7"})["backup"] == "1-7"
    ids = [q.split("requestId=")[1] for m, q in gce.fake.requests if m == "instances.setLabels"]
    assert len(ids) == 2 and ids[0] == ids[1]  # the same requestId: GCE does it once


def test_no_answer_is_transient(gce: GceWorld, tmp_path: Path) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    compute = gce.compute(compute_endpoint=f"http://127.0.0.1:{port}", sdk_retries=0)
    with pytest.raises(TransientError, match="no connection to the Compute Engine API"):
        compute.get_instance("core-5")


# --------------------------------------------------------------------------- operations


def test_operations_are_polled_through_the_configured_endpoint(tmp_path: Path) -> None:
    with gce_world(tmp_path, operation_polls=3) as world:
        compute = world.compute()
        vm = world.seed("vcu-0", disks=[b"boot" * 1000])
        compute.set_tags(vm, {"backup": "1-7"})
        assert world.fake.counts["zoneOperations.get"] == 3
        with compute.capture(vm) as capture:
            assert b"boot" * 1000 in b"".join(d for _o, d in capture.blocks())
        # the snapshot's delete is a global operation, polled by the global client
        assert world.fake.counts["globalOperations.get"] == 3
        assert world.fake.pending_operations() == []
        assert world.leftovers() == {
            "snapshots": [],
            "disks": [],
            "worker disks": [],
            "devices": [],
        }


def test_an_operation_that_does_not_end_in_time_is_transient(tmp_path: Path) -> None:
    with gce_world(tmp_path, operation_polls=10_000) as world:
        compute = world.compute(operation_timeout=1, poll_interval=0.05)
        vm = world.seed("vcu-1")
        with pytest.raises(TransientError, match="is not done after 1s"):
            compute.set_tags(vm, {"backup": "1-7"})


def test_an_operation_error_is_mapped(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("vcu-2", disks=[b"x" * 4096])
    gce.fake.fail_next_operation("disks.createSnapshot", "QUOTA_EXCEEDED", status=403)
    with pytest.raises(ComputeError, match="QUOTA_EXCEEDED") as refused:
        compute.capture(vm)
    assert not isinstance(refused.value, TransientError)
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}
    gce.fake.fail_next_operation("disks.insert", "INTERNAL_ERROR", status=500)
    with pytest.raises(TransientError, match="INTERNAL_ERROR"):
        compute.capture(vm)
    # the snapshot made before the failure is gone too
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


# --------------------------------------------------------------------------- capture


def _check_blocks(blocks: list[tuple[int, bytes]], pieces: dict[int, bytes]) -> None:
    """``blocks`` (ascending, disjoint) hold exactly ``pieces`` (offset -> bytes) and zeros
    elsewhere, without building the image (disks are 10 GiB)."""
    end = -1
    for offset, data in blocks:
        assert offset >= end, "blocks out of order or overlapping"
        end = offset + len(data)
        expected = bytearray(len(data))
        for start, piece in pieces.items():
            lo, hi = max(start, offset), min(start + len(piece), end)
            if lo < hi:
                expected[lo - offset : hi - offset] = piece[lo - start : hi - start]
        assert data == bytes(expected), f"block at {offset} differs"
    for start, piece in pieces.items():
        covered = sum(
            max(0, min(start + len(piece), o + len(d)) - max(start, o)) for o, d in blocks
        )
        assert covered == len(piece), f"the bytes at {start} are not all in the blocks"


def _pieces(seed: int) -> dict[int, bytes]:
    """A disk with three written regions and holes between them."""
    rng = random.Random(seed)
    return {0: rng.randbytes(MiB), 8 * MiB: rng.randbytes(100 * 1024), 3 * GiB + 512: b"tail"}


def _image(pieces: dict[int, bytes], size: int) -> bytes:
    """The first ``size`` bytes of a disk holding ``pieces`` (small sizes only)."""
    image = bytearray(size)
    for offset, data in pieces.items():
        image[offset : offset + len(data)] = data
    return bytes(image)


def test_capture_reads_every_disk_through_the_worker_skipping_holes(gce: GceWorld) -> None:
    compute = gce.compute()
    boot, data = _pieces(1), {0: b"data-disk" * 100, 2 * MiB: b"more"}
    vm = gce.seed("vcu-3", disks=[boot, data], labels={"backup": "1-7"})
    with pytest.raises(UnsupportedOperation):
        compute.capture(vm, kind=CaptureKind.FILES)
    with compute.capture(vm) as capture:
        assert isinstance(capture, GceBlockCapture) and capture.kind is CaptureKind.BLOCKS
        # two 10 GiB disks one after the other, the boot disk first
        assert [(d.name, d.offset, d.size) for d in capture.disks] == [
            ("persistent-disk-0", 0, 10 * GiB),
            ("persistent-disk-1", 10 * GiB, 10 * GiB),
        ]
        assert capture.size == 20 * GiB and capture.instance.id == vm
        snapshots = gce.fake.snapshot_names()
        assert len(snapshots) == 2 and snapshots == sorted(capture.snapshot_names)
        # each read from a disk made from its snapshot, attached read-only to the worker
        worker_disks = gce.fake.instance(WORKER)["disks"][1:]
        assert [d["mode"] for d in worker_disks] == ["READ_ONLY", "READ_ONLY"]
        assert len(gce.worker_devices()) == 3  # and the worker's boot disk
        blocks = list(capture.blocks())
        assert capture.changed_ranges() is None  # GCP has no changed-block API
    _check_blocks([b for b in blocks if b[0] < 10 * GiB], boot)
    _check_blocks([(o - 10 * GiB, d) for o, d in blocks if o >= 10 * GiB], data)
    # only the blocks holding data were read: holes skipped (SEEK_DATA), 1 MiB blocks
    assert [o for o, _d in blocks] == [0, 8 * MiB, 3 * GiB, 10 * GiB, 10 * GiB + 2 * MiB]
    assert capture.bytes_read <= 5 * MiB
    # closing detached and deleted the temporary disks and deleted the snapshots
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


def test_a_kept_capture_names_its_snapshots_until_released(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("vcu-4", disks=[{0: b"kept" * 1000}])
    with compute.capture(vm, keep=True) as capture:
        assert isinstance(capture, GceBlockCapture) and capture.ref is not None
        (name,) = capture.snapshot_names
        assert name in capture.ref
    assert gce.fake.snapshot_names() == [name]
    assert gce.leftovers()["disks"] == [] and gce.leftovers()["devices"] == []
    # a later capture since the kept one reads everything all the same
    with compute.capture(vm, since=capture.ref) as later:
        assert later.changed_ranges() is None and later.ref is None
    compute.release_capture(capture.ref)
    compute.release_capture(capture.ref)  # gone already: no error
    assert gce.fake.snapshot_names() == []
    with pytest.raises(ComputeError, match="bad capture ref"):
        compute.release_capture('{"v": 1, "project": "other-project"}')


def test_release_leaves_a_snapshot_no_capture_of_the_instance_made(gce: GceWorld) -> None:
    compute = gce.compute()
    vm = gce.seed("vcu-5", disks=[b"x" * 512])
    other = gce.seed("vcu-6", disks=[b"y" * 512])
    with compute.capture(other, keep=True) as theirs:
        assert theirs.ref is not None
    forged = json.loads(theirs.ref)
    forged["instance"] = vm
    with pytest.raises(ComputeError, match="left alone"):
        compute.release_capture(json.dumps(forged))
    assert len(gce.fake.snapshot_names()) == 1
    compute.release_capture(theirs.ref)


def test_capture_needs_the_worker(gce: GceWorld) -> None:
    compute = gce.compute(worker_instance=None)
    vm = gce.seed("vcu-7")
    assert compute.get_instance(vm).id == vm  # listing and labels need no worker
    with pytest.raises(ConfigError, match="worker_instance"):
        compute.capture(vm)
    # the worker itself is captured with its own disks, not those other captures attach
    compute = gce.compute()
    with compute.capture(vm) as capture, compute.capture(WORKER) as worker:
        assert len(gce.fake.instance(WORKER)["disks"]) == 3  # boot, and one per capture
        assert [d.name for d in worker.disks] == ["persistent-disk-0"]
        assert [d.name for d in capture.disks] == ["persistent-disk-0"]
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


# --------------------------------------------------------------------------- restore


def _write_all(sink: GceBlockSink, image: bytes) -> None:
    """As the engine writes a restore: whole blocks, in order, then commit."""
    for offset in range(0, len(image), sink.block_size):
        sink.write(offset, image[offset : offset + sink.block_size])
    sink.commit()


def test_restore_two_disks_and_launch_with_the_original_machine_type_and_labels(
    gce: GceWorld,
) -> None:
    compute = gce.compute()
    boot, data = {0: b"boot" * 5000, 5 * MiB: b"b2"}, {0: b"data" * 3000}
    vm = gce.seed(
        "vdu-9",
        disks=[boot, data],
        labels={"backup": "1-7", "role": "vdu"},
        machine_type="n2-highmem-4",
    )
    source = compute.get_instance(vm)
    with compute.capture(vm) as capture:
        disks, size = capture.disks, capture.size
        blocks = list(capture.blocks())
    spec = LaunchSpec(name="vdu-9-restored", tags=source.tags, function=source.function)
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=size, disks=disks)
    assert isinstance(sink, GceBlockSink) and len(sink.disk_names) == 2
    # blank disks attached read-write to the worker while the engine writes
    assert [d["mode"] for d in gce.fake.instance(WORKER)["disks"][1:]] == ["READ_WRITE"] * 2
    for offset, block in blocks:  # as the engine restores: the point's blocks, in order
        sink.write(offset, block)
    sink.commit()
    assert gce.leftovers()["worker disks"] == [] and gce.leftovers()["devices"] == []
    # only blocks holding data were written (the disks start blank)
    assert sink.bytes_written <= 3 * MiB
    launched = compute.launch(spec, sink)
    assert launched.name == "vdu-9-restored" and launched.id == "vdu-9-restored"
    assert launched.tags == Tags({"backup": "1-7", "role": "vdu"})
    assert launched.function == "n2-highmem-4" and launched.state == "running"
    body = gce.fake.instance(launched.id)
    assert [d["boot"] for d in body["disks"]] == [True, False]
    assert [d["autoDelete"] for d in body["disks"]] == [True, True]
    names = [d["source"].rsplit("/", 1)[-1] for d in body["disks"]]
    assert names == sink.disk_names
    assert gce.disk_bytes(names[0], 6 * MiB) == _image(boot, 6 * MiB)
    assert gce.disk_bytes(names[1], 1 * MiB) == _image(data, 1 * MiB)
    sink.discard()  # launched from: left alone
    assert gce.fake.instance_names().count(launched.id) == 1
    compute.terminate(launched.id)
    with pytest.raises(InstanceNotFound):
        compute.get_instance(launched.id)
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


def test_a_launch_from_another_cloud_uses_the_regions_machine_type_and_keeps_its_name(
    gce: GceWorld,
) -> None:
    compute = gce.compute(machine_type="e2-medium")
    spec = LaunchSpec(name="Web Server 1", tags=Tags({"backup": "1-7"}), function="t3.micro")
    image = b"ec2 root" * 1000
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, GceBlockSink) and sink.size == 10 * GiB  # whole disk
    _write_all(sink, image + bytes(MiB - len(image)))
    launched = compute.launch(spec, sink)
    assert launched.name == "Web Server 1" and launched.function == "e2-medium"
    assert re.fullmatch(r"web-server-1-[0-9a-f]{8}", launched.id)
    assert compute.get_instance(launched.id).name == "Web Server 1"
    compute.terminate(launched.id)


def test_tags_gcp_cannot_hold_refuse_the_restore_before_any_disk_is_made(gce: GceWorld) -> None:
    compute = gce.compute()
    spec = LaunchSpec(name="from-aws", tags=Tags({"Name": "vdu-0", "backup": "1-7"}))
    with pytest.raises(LabelError, match="'Name' is not a GCP label"):
        compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    with pytest.raises(UnsupportedOperation):
        compute.open_restore_sink(spec, CaptureKind.FILES)
    assert gce.fake.counts["disks.insert"] == 0


def test_a_failed_launch_removes_the_instance_and_the_discard_the_disks(gce: GceWorld) -> None:
    compute = gce.compute()
    spec = LaunchSpec(name="vdu-10", tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, GceBlockSink)
    _write_all(sink, b"z" * MiB)
    gce.fake.fail_next_operation("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED", status=503)
    with pytest.raises(TransientError, match="ZONE_RESOURCE_POOL_EXHAUSTED"):
        compute.launch(spec, sink)
    assert "vdu-10" not in gce.fake.instance_names()
    sink.discard()
    sink.discard()
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}
    with pytest.raises(ComputeError, match="discarded"):
        compute.launch(spec, sink)


def test_a_restore_that_fails_while_attaching_removes_its_disks(gce: GceWorld) -> None:
    compute = gce.compute()
    spec = LaunchSpec(name="vdu-11", tags=Tags({}))
    gce.fake.fail_next("instances.attachDisk", 400, reason="invalid", message="no")
    with pytest.raises(ComputeError, match="cannot attach disk"):
        compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


def test_a_launch_under_a_taken_name_leaves_that_instance_alone(gce: GceWorld) -> None:
    compute = gce.compute()
    theirs = gce.seed("vdu-12", labels={"owner": "someone-else"})
    spec = LaunchSpec(name=theirs, tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, GceBlockSink)
    _write_all(sink, b"q" * MiB)
    with pytest.raises(ComputeError, match="HTTP 409 alreadyExists") as refused:
        compute.launch(spec, sink)
    assert "POST http" not in str(refused.value)  # the operation, not the request line
    sink.discard()
    assert compute.get_instance(theirs).tags == Tags({"owner": "someone-else"})
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


def test_a_launch_waits_for_running_and_one_that_stops_is_removed(gce: GceWorld) -> None:
    compute = gce.compute()
    gce.fake.start_statuses = ["PROVISIONING", "STAGING", "STAGING", "RUNNING"]
    gce.fake.device_link_delay = 0.05  # udev's moment after the attach
    spec = LaunchSpec(name="vdu-13", tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, GceBlockSink)
    _write_all(sink, b"r" * MiB)
    gets = gce.fake.counts["instances.get"]
    assert compute.launch(spec, sink).state == "running"
    assert gce.fake.counts["instances.get"] - gets >= 4
    assert gce.fake.read_only_writes == []
    compute.terminate("vdu-13")

    gce.fake.start_statuses = ["STAGING", "TERMINATED"]
    spec = LaunchSpec(name="vdu-14", tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, GceBlockSink)
    _write_all(sink, b"s" * MiB)
    with pytest.raises(ComputeError, match="did not start: it is TERMINATED"):
        compute.launch(spec, sink)
    assert "vdu-14" not in gce.fake.instance_names()
    sink.discard()
    assert gce.leftovers() == {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


def test_the_sdks_own_operation_poller_is_never_used(
    gce: GceWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ExtendedOperation.result()`` polls through a client built without the configured
    endpoint (the public API): every operation must be polled by the provider itself."""
    from google.api_core import extended_operation

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("ExtendedOperation.result() would poll compute.googleapis.com")

    monkeypatch.setattr(extended_operation.ExtendedOperation, "result", refuse)
    monkeypatch.setattr(extended_operation.ExtendedOperation, "done", refuse)
    compute = gce.compute()
    vm = gce.seed("vcu-20", disks=[b"a" * 4096, b"b" * 4096], labels={"backup": "1-7"})
    compute.set_tags(vm, {"role": "vcu"})
    with compute.capture(vm, keep=True) as capture:
        blocks = list(capture.blocks())
    assert capture.ref is not None
    compute.release_capture(capture.ref)
    spec = LaunchSpec(name="vcu-20-copy", tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(
        spec, CaptureKind.BLOCKS, size=capture.size, disks=capture.disks
    )
    for offset, block in blocks:
        sink.write(offset, block)
    sink.commit()
    compute.terminate(compute.launch(spec, sink).id)
    polls = gce.fake.counts["zoneOperations.get"] + gce.fake.counts["globalOperations.get"]
    assert polls > 10 and gce.fake.pending_operations() == []


def test_a_device_that_does_not_appear_fails_naming_it_and_cleans_up(tmp_path: Path) -> None:
    with gce_world(tmp_path) as world:
        world.fake.device_link_delay = 30.0  # never, within the test's timeout
        compute = world.compute(timeout=1)
        vm = world.seed("vcu-21", disks=[b"c" * 4096])
        with pytest.raises(ComputeError, match="did not appear within 1s") as failed:
            compute.capture(vm)
        assert "device_dir" in str(failed.value)
        assert world.leftovers() == {
            "snapshots": [],
            "disks": [],
            "worker disks": [],
            "devices": [],
        }


def test_snapshots_stay_in_the_regions_location(gce: GceWorld) -> None:
    compute = gce.compute()
    sent: list[dict[str, Any]] = []
    real = compute.clients.disks.create_snapshot_unary

    def recording(request: dict[str, Any], **kwargs: Any) -> Any:
        sent.append(request)
        return real(request=request, **kwargs)

    compute.clients.disks.create_snapshot_unary = recording  # type: ignore[method-assign]
    vm = gce.seed("vcu-22", disks=[b"d" * 4096])
    with compute.capture(vm):
        pass
    (request,) = sent
    location = compute.settings.location
    assert location and list(request["snapshot_resource"].storage_locations) == [location]
    assert request["snapshot_resource"].labels["regionvault-capture"] == vm
