"""A VM's several managed disks as one block image, with the unmodified azure-mgmt-compute,
azure-identity and azure-storage-blob clients over real 127.0.0.1 connections (the ARM fake in
front of Azurite): capture of every disk, kept snapshots and the changed ranges against them,
restore of several disks and a launch that attaches them in order, and clean-up on failure.

Azurite does not implement the managed-disk page-range diff (``x-ms-previous-snapshot-url``):
those tests check the request the client sends and answer it from a recording of the answer
Azure gives for the same writes (:class:`DiffTransport`).
"""

from __future__ import annotations

import json
import random
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.mgmt.compute", reason="the Azure tests need pip install -e '.[test]'")

import requests
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse
from azure.mgmt.compute import models
from azure_compute_world import LOCATION, RESOURCE_GROUP, ArmWorld
from regionvault.core.errors import ComputeError
from regionvault.core.types import CaptureKind, Disk, LaunchSpec, Tags
from regionvault.providers.azure.compute import (
    BLOCK_SIZE,
    AzureBlockCapture,
    AzureBlockSink,
    AzureCompute,
    MiB,
)
from regionvault.providers.azure.fakes.arm import Injected

KiB = 1024


def _bytes(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


#: the OS disk (20 MiB), the data disk at LUN 0 (25 MiB: written up to its last MiB) and the
#: one at LUN 1 (20 MiB), each with holes never written
OS_DISK = {0: _bytes(2 * MiB, 1), 12 * MiB: _bytes(3000, 2)}
LUN0 = {0: _bytes(2 * MiB, 3), 24 * MiB + 512: _bytes(700, 4)}
LUN1 = {3 * MiB: _bytes(100 * KiB, 5)}
SIZES = (20 * MiB, 25 * MiB, 20 * MiB)


def _image(disks: list[dict[int, bytes]], sizes: tuple[int, ...]) -> bytes:
    """The disks one after another (all these sizes are whole blocks: no holes)."""
    image = bytearray(sum(sizes))
    offset = 0
    for written, size in zip(disks, sizes, strict=True):
        for start, data in written.items():
            image[offset + start : offset + start + len(data)] = data
        offset += size
    return bytes(image)


def _assemble(blocks: Iterator[tuple[int, bytes]], size: int) -> bytes:
    image = bytearray(size)
    end = -1
    for offset, data in blocks:
        assert offset >= end and offset % BLOCK_SIZE == 0, "blocks out of order"
        image[offset : offset + len(data)] = data
        end = offset + len(data)
    return bytes(image)


def _three_disk_vm(world: ArmWorld, name: str) -> str:
    return world.seed_vm(
        name,
        tags={"backup": "1-7"},
        image=OS_DISK,
        data_disks=[LUN0, LUN1],
        vm_size="Standard_D4s_v5",
    )


def _snapshot_blobs(world: ArmWorld) -> dict[str, tuple[str, str]]:
    """Snapshot blob name -> (snapshot name, source disk id)."""
    return {
        world.fake.blob_client(s["id"]).blob_name: (
            s["name"],
            s["properties"]["creationData"]["sourceResourceId"],
        )
        for s in world.fake.resources("snapshot")
    }


# --------------------------------------------------------------------------- capture


def test_a_capture_takes_every_managed_disk_into_one_image(world: ArmWorld) -> None:
    compute = world.compute()
    vm = _three_disk_vm(world, "vdu-1")
    source = compute.get_instance(vm)
    assert sorted(source.extra["data_disks"]) == [0, 1]
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        # the OS disk first, then the data disks by LUN, each at a block-aligned offset
        assert capture.disks == (
            Disk("os", 0, 20 * MiB),
            Disk("lun0", 20 * MiB, 25 * MiB),
            Disk("lun1", 45 * MiB, 20 * MiB),
        )
        assert capture.size == 65 * MiB and capture.ref is None
        assert capture.changed_ranges() is None  # no since: read everything
        # one incremental snapshot per disk, each of its own disk, readable while captured
        snapshots = {s["name"]: s for s in world.fake.resources("snapshot")}
        assert sorted(snapshots) == sorted(capture.snapshot_names)
        sources = [
            snapshots[n]["properties"]["creationData"]["sourceResourceId"]
            for n in capture.snapshot_names
        ]
        assert sources == [
            source.extra["os_disk_id"],
            source.extra["data_disks"][0],
            source.extra["data_disks"][1],
        ]
        assert all(s["properties"]["incremental"] for s in snapshots.values())
        assert {s["properties"]["diskState"] for s in snapshots.values()} == {"ActiveSAS"}
        # every snapshot was made before any SAS was asked for (so before any byte is read)
        calls = [(m, p) for m, p, _q in world.fake.requests if "/snapshots/" in p]
        puts = [i for i, (m, p) in enumerate(calls) if m == "PUT"]
        grants = [i for i, (m, p) in enumerate(calls) if p.endswith("/beginGetAccess")]
        assert len(puts) == 3 and len(grants) == 3 and max(puts) < min(grants)
        blocks = list(capture.blocks())
    assert _assemble(iter(blocks), capture.size) == _image([OS_DISK, LUN0, LUN1], SIZES)
    # only blocks holding written pages were read: 2 MiB twice, one block per small write
    assert capture.bytes_read == 4 * MiB + 3 * BLOCK_SIZE
    # closing revoked every SAS and deleted every snapshot
    assert world.fake.count("POST", r"/snapshots/[^/]+/endGetAccess$") == 3
    assert world.fake.resources("snapshot") == []


def test_a_failed_capture_removes_every_snapshot(world: ArmWorld) -> None:
    compute = world.compute()
    vm = _three_disk_vm(world, "vdu-2")
    world.fake.inject(
        Injected(
            "POST",
            r"/snapshots/rv-capture-vdu-2-lun1-[^/]+/beginGetAccess$",
            code="OperationNotAllowed",
            in_operation=True,
        )
    )
    with pytest.raises(ComputeError, match="read SAS for snapshot rv-capture-vdu-2-lun1"):
        compute.capture(vm)
    assert world.fake.resources("snapshot") == []


def test_an_unmanaged_data_disk_is_refused_not_left_out(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("vdu-3", image={0: b"boot"})
    raw = compute._raw_vm(vm)
    raw["properties"]["storageProfile"]["dataDisks"] = [
        {"lun": 0, "vhd": {"uri": "https://x.blob.core.windows.net/vhds/d.vhd"}}
    ]
    with pytest.raises(ComputeError, match="LUN 0 is not a managed disk"):
        compute._managed_disks(raw, "vdu-3")


def test_release_removes_kept_snapshots_a_crash_left_readable(world: ArmWorld) -> None:
    """A process killed between capture and close leaves its snapshots with their SAS
    open; releasing its ref (as the next backup does) revokes and deletes them all."""
    compute = world.compute()
    vm = _three_disk_vm(world, "vdu-4")
    capture = compute.capture(vm, keep=True)  # never closed: the process died
    assert capture.ref is not None
    states = {s["properties"]["diskState"] for s in world.fake.resources("snapshot")}
    assert states == {"ActiveSAS"} and len(world.fake.resources("snapshot")) == 3
    compute.release_capture(capture.ref)
    assert world.fake.resources("snapshot") == []
    capture.close()  # what is gone is no error


# --------------------------------------------------------------------------- incremental


class DiffTransport(RequestsTransport):  # type: ignore[misc]
    """The real requests transport, except that a managed-disk page-range diff (a request
    with ``x-ms-previous-snapshot-url``, which Azurite does not implement) is recorded and
    answered with the recorded Azure answer for that snapshot blob (:attr:`answers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.diffs: list[Any] = []
        #: snapshot blob name -> the PageList XML Azure answered
        self.answers: dict[str, bytes] = {}

    def close(self) -> None:
        """Shared by every capture's blob clients: closed once, by the test (:meth:`end`)."""

    def end(self) -> None:
        super().close()

    def send(self, request: Any, **kwargs: Any) -> Any:
        if "x-ms-previous-snapshot-url" in request.headers:
            self.diffs.append(request)
            blob = _blob_name(request.url)
            answer = requests.Response()
            answer.status_code, answer.reason, answer.url = 200, "OK", request.url
            answer._content = self.answers[blob]
            answer.headers.update({"Content-Type": "application/xml"})
            return RequestsTransportResponse(request, answer)
        return super().send(request, **kwargs)


def _blob_name(url: str) -> str:
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]


def _page_list(filled: list[tuple[int, int]], cleared: list[tuple[int, int]]) -> bytes:
    """A Get Page Ranges answer as Azure writes it (inclusive ends)."""
    ranges = [("PageRange", s, e) for s, e in filled] + [("ClearRange", s, e) for s, e in cleared]
    body = "".join(
        f"<{tag}><Start>{s}</Start><End>{e - 1}</End></{tag}>"
        for tag, s, e in sorted(ranges, key=lambda r: r[1])
    )
    return f'<?xml version="1.0" encoding="utf-8"?><PageList>{body}</PageList>'.encode()


def test_kept_snapshots_give_the_changed_ranges_of_every_disk(world: ArmWorld) -> None:
    transport = DiffTransport()
    try:
        _changed_ranges_of_every_disk(world, transport)
    finally:
        transport.end()


def _changed_ranges_of_every_disk(world: ArmWorld, transport: DiffTransport) -> None:
    compute = world.compute(blob_client_kwargs={"transport": transport})
    vm = _three_disk_vm(world, "vcu-1")
    source = compute.get_instance(vm)
    disk_ids = [source.extra["os_disk_id"], *source.extra["data_disks"].values()]

    with compute.capture(vm, keep=True) as first:
        assert isinstance(first, AzureBlockCapture)
        assert first.ref is not None
        before = _assemble(first.blocks(), first.size)
    ref = json.loads(first.ref)
    # the ref names each disk's snapshot, and nothing secret
    assert [d["snapshot"] for d in ref["disks"]] == first.snapshot_names
    assert [d["disk"] for d in ref["disks"]] == disk_ids
    assert "sig=" not in first.ref and world.fake.account_key not in first.ref
    kept = world.fake.resources("snapshot")
    assert len(kept) == 3 and {s["properties"]["diskState"] for s in kept} == {"Unattached"}

    # the VM writes on; Azure's diff answers with what changed on each disk
    os_blob, lun0_blob, lun1_blob = (world.fake.blob_client(i) for i in disk_ids)
    os_write = _bytes(4096, 6)
    os_blob.upload_page(os_write, offset=MiB + 512, length=4096)
    lun0_blob.clear_page(offset=512 * KiB, length=512 * KiB)
    lun1_write = _bytes(1024, 7)
    lun1_blob.upload_page(lun1_write, offset=19 * MiB + 1024, length=1024)
    recorded = {
        disk_ids[0]: _page_list([(MiB + 512, MiB + 4608)], []),
        disk_ids[1]: _page_list([], [(512 * KiB, MiB)]),
        disk_ids[2]: _page_list([(19 * MiB + 1024, 19 * MiB + 2048)], []),
    }

    with compute.capture(vm, since=first.ref, keep=True) as second:
        assert isinstance(second, AzureBlockCapture)
        blobs = _snapshot_blobs(world)
        for blob, (name, disk) in blobs.items():
            if name in second.snapshot_names:
                transport.answers[blob] = recorded[disk]
        changed = second.changed_ranges()
        assert second.changed_ranges() == changed  # asked once, remembered
        # filled ∪ cleared per disk, shifted by the disk's offset, widened to whole blocks
        assert changed == [
            (MiB, BLOCK_SIZE),
            (20 * MiB + 512 * KiB, BLOCK_SIZE),
            (64 * MiB, BLOCK_SIZE),
        ]
        after = _assemble(second.blocks(), second.size)
        reads_before = second.bytes_read
        patch = list(second.read_ranges(changed))
        # only the data within the spans was read: the cleared block holds none
        assert [(o, len(d)) for o, d in patch] == [(MiB, BLOCK_SIZE), (64 * MiB, BLOCK_SIZE)]
        assert second.bytes_read - reads_before == 2 * BLOCK_SIZE
    # the request the client sends: one diff per disk, against that disk's earlier snapshot
    assert len(transport.diffs) == 3
    blobs = _snapshot_blobs(world)
    for diff in transport.diffs:
        assert diff.method == "GET" and "comp=pagelist" in diff.url
        earlier = _blob_name(diff.headers["x-ms-previous-snapshot-url"])
        now_name, now_disk = blobs[_blob_name(diff.url)]
        then_name, then_disk = blobs[earlier]
        assert now_name in second.snapshot_names and then_name in first.snapshot_names
        assert now_disk == then_disk
        assert "sig=" in diff.headers["x-ms-previous-snapshot-url"]
    # outside the changed ranges the image is the earlier one; patched, it is the new one
    rebuilt = bytearray(before)
    for offset, length in changed:
        rebuilt[offset : offset + length] = bytes(length)
    for offset, data in patch:
        rebuilt[offset : offset + len(data)] = data
    assert bytes(rebuilt) == after and after != before
    assert after[MiB + 512 : MiB + 4608] == os_write
    assert after[20 * MiB + 512 * KiB : 21 * MiB] == bytes(512 * KiB)
    assert len(world.fake.resources("snapshot")) == 6

    # a disk resized since (the ref's size is not the disk's): no diff, read everything
    resized = {
        **ref,
        "disks": [ref["disks"][0], {**ref["disks"][1], "size": 30 * MiB}, ref["disks"][2]],
    }
    with compute.capture(vm, since=json.dumps(resized)) as grown:
        assert isinstance(grown, AzureBlockCapture)
        assert grown.changed_ranges() is None
    assert len(transport.diffs) == 3
    # released: the first capture's snapshots go (again: no error); a capture since it
    # then reads everything, without asking for a diff
    compute.release_capture(first.ref)
    compute.release_capture(first.ref)
    assert {s["name"] for s in world.fake.resources("snapshot")} == set(second.snapshot_names)
    with compute.capture(vm, since=first.ref) as third:
        assert isinstance(third, AzureBlockCapture)
        assert third.changed_ranges() is None and third.ref is None
    assert len(transport.diffs) == 3
    # another VM's disks are not these: no diff either
    other = world.seed_vm("vcu-other", image={0: b"other"})
    assert second.ref is not None
    with compute.capture(other, since=second.ref) as foreign:
        assert isinstance(foreign, AzureBlockCapture)
        assert foreign.changed_ranges() is None
    for bad in ("garbage", json.dumps({"v": 9}), json.dumps({**ref, "disks": [{"x": 1}]})):
        with pytest.raises(ComputeError, match="bad capture ref"):
            compute.release_capture(bad)
        with pytest.raises(ComputeError, match="bad capture ref"):
            compute.capture(vm, since=bad)
    compute.release_capture(second.ref)
    assert world.fake.resources("snapshot") == []


# --------------------------------------------------------------------------- restore


def test_a_restore_of_several_disks_launches_a_vm_attaching_them_in_order(
    world: ArmWorld,
) -> None:
    compute = world.compute()
    vm = _three_disk_vm(world, "core-1")
    source = compute.get_instance(vm)
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        image = _assemble(capture.blocks(), capture.size)
        layout = capture.disks
    spec = LaunchSpec(
        name="core-1 restored", tags=source.tags, function=source.function, source=source
    )
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(image), disks=layout)
    assert isinstance(sink, AzureBlockSink) and sink.disks == layout
    made = {d["id"]: d for d in world.fake.resources("disk")}
    # one empty disk for upload per disk of the image, each its size plus the VHD footer
    assert [made[i]["properties"]["creationData"]["uploadSizeBytes"] for i in sink.disk_ids] == [
        s + 512 for s in SIZES
    ]
    assert [made[i]["properties"].get("osType") for i in sink.disk_ids] == ["Linux", None, None]
    # pieces of 3 MiB: the one at 18 MiB runs from the OS disk into the first data disk
    for offset in range(0, len(image), 3 * MiB):
        sink.write(offset, image[offset : offset + 3 * MiB])
    sink.commit()
    for upload in sink.uploads:
        footer = world.fake.footer(upload.disk_id)
        assert footer[:8] == b"conectix" and int.from_bytes(footer[48:56]) == upload.data_size
    launched = compute.launch(spec, sink)
    assert launched.function == "Standard_D4s_v5" and launched.tags == source.tags
    # the first disk boots, the others attach as LUN 0, 1
    assert launched.extra["os_disk_id"] == sink.disk_ids[0]
    assert launched.extra["data_disks"] == {0: sink.disk_ids[1], 1: sink.disk_ids[2]}
    raw = compute._raw_vm(launched.id)
    shown = raw["properties"]["storageProfile"]["dataDisks"]
    assert [(d["lun"], d["createOption"], d["deleteOption"]) for d in shown] == [
        (0, "Attach", "Delete"),
        (1, "Attach", "Delete"),
    ]
    for disk_id, (offset, size) in zip(sink.disk_ids, [(0, 20), (20, 25), (45, 20)], strict=True):
        assert world.disk_bytes(disk_id, size * MiB) == image[offset * MiB : (offset + size) * MiB]
    with compute.capture(launched.id) as again:
        assert isinstance(again, AzureBlockCapture)
        assert again.disks == layout
        assert _assemble(again.blocks(), again.size) == image
    compute.terminate(launched.id)
    assert world.fake.resources("vm") == [
        v for v in world.fake.resources("vm") if v["id"].lower() == vm.lower()
    ]
    assert not set(sink.disk_ids) & {d["id"] for d in world.fake.resources("disk")}


def test_writes_are_routed_by_offset_and_holes_between_disks_stay_empty(world: ArmWorld) -> None:
    """An image from elsewhere whose first disk ends inside a block: the rest of that block,
    up to the next disk, is a hole."""
    compute = world.compute()
    layout = [Disk("/dev/xvda", 0, 3 * MiB + 4096), Disk("/dev/xvdb", 4 * MiB, 2 * MiB)]
    spec = LaunchSpec(name="routed", tags=Tags({"a": "1"}), function="Standard_B2s")
    with pytest.raises(ComputeError, match="overlaps"):
        compute.open_restore_sink(
            spec, CaptureKind.BLOCKS, size=6 * MiB, disks=[layout[0], Disk("x", 3 * MiB, MiB)]
        )
    assert world.fake.resources("disk") == []
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=6 * MiB, disks=layout)
    assert isinstance(sink, AzureBlockSink) and sink.size == 6 * MiB
    image = bytearray(_bytes(6 * MiB, 8))
    image[3 * MiB + 4096 : 4 * MiB] = bytes(MiB - 4096)  # the hole
    try:
        with pytest.raises(ComputeError, match="outside the image's disks"):
            sink.write(3 * MiB, b"\1" * BLOCK_SIZE * 2)
        with pytest.raises(ComputeError, match="runs past"):
            sink.write(6 * MiB, bytes(BLOCK_SIZE))
        sink.write(0, bytes(image))  # one write over both disks and the hole
        sink.commit()
        first, second = sink.disk_ids
        assert world.disk_bytes(first, 20 * MiB) == bytes(image[: 3 * MiB + 4096]) + bytes(
            17 * MiB - 4096
        )
        assert world.disk_bytes(second, 2 * MiB) == bytes(image[4 * MiB :])
    finally:
        sink.discard()
    assert world.fake.resources("disk") == []


def test_a_restore_that_fails_on_its_second_disk_removes_every_disk(world: ArmWorld) -> None:
    compute = world.compute()
    world.fake.inject(
        Injected(
            "POST",
            r"/disks/[^/]*-data0-[^/]+/beginGetAccess$",
            status=409,
            code="OperationNotAllowed",
        )
    )
    spec = LaunchSpec(name="half", tags=Tags({"a": "1"}), function="Standard_B2s")
    layout = [
        Disk("os", 0, 20 * MiB),
        Disk("lun0", 20 * MiB, 20 * MiB),
        Disk("lun1", 40 * MiB, MiB),
    ]
    with pytest.raises(ComputeError, match="write SAS for disk half-data0"):
        compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=41 * MiB, disks=layout)
    assert world.fake.resources("disk") == []


def test_a_failed_launch_of_several_disks_removes_the_vm_and_every_disk(world: ArmWorld) -> None:
    compute = world.compute()
    spec = LaunchSpec(name="doomed", tags=Tags({"backup": "1-7"}), function="Standard_B2s")
    layout = [
        Disk("os", 0, 20 * MiB),
        Disk("lun0", 20 * MiB, 20 * MiB),
        Disk("lun1", 40 * MiB, MiB),
    ]
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=41 * MiB, disks=layout)
    assert isinstance(sink, AzureBlockSink)
    sink.write(0, _bytes(MiB, 9))
    sink.write(40 * MiB, _bytes(MiB, 10))
    sink.commit()
    world.fake.inject(
        Injected("PUT", r"/virtualMachines/[^/]+$", code="AllocationFailed", in_operation=True)
    )
    with pytest.raises(ComputeError, match="AllocationFailed"):
        compute.launch(spec, sink)
    assert len(world.fake.resources("disk")) == 3
    sink.discard()  # what the engine does after a failed launch
    sink.discard()
    assert world.fake.resources("vm") == [] and world.fake.resources("disk") == []


# --------------------------------------------------------------------------- the ARM fake


def test_the_fake_attaches_data_disks_as_arm_does(world: ArmWorld) -> None:
    client = world.client
    os_disk = world.seed_disk("shape-os", {0: b"boot"})
    data = [world.seed_disk(f"shape-d{i}", {0: b"data"}, size=(20 + i) * MiB) for i in range(2)]

    def vm_body(data_disks: list[dict[str, Any]]) -> models.VirtualMachine:
        return models.VirtualMachine(
            {
                "location": LOCATION,
                "properties": {
                    "hardwareProfile": {"vmSize": "Standard_B2s"},
                    "storageProfile": {
                        "osDisk": {"createOption": "Attach", "managedDisk": {"id": os_disk}},
                        "dataDisks": data_disks,
                    },
                },
            }
        )

    attach = [
        {"lun": 3, "createOption": "Attach", "managedDisk": {"id": data[1]}},
        {"lun": 1, "createOption": "Attach", "managedDisk": {"id": data[0]}},
    ]
    twice = [dict(attach[0]), {**attach[1], "lun": 3}]
    with pytest.raises(HttpResponseError, match="duplicate LUNs"):
        client.virtual_machines.begin_create_or_update(RESOURCE_GROUP, "shape", vm_body(twice))
    vm = client.virtual_machines.begin_create_or_update(
        RESOURCE_GROUP, "shape", vm_body(attach)
    ).result()
    shown = vm["properties"]["storageProfile"]["dataDisks"]
    assert [(d["lun"], d["name"], d["managedDisk"]["id"]) for d in shown] == [
        (1, "shape-d0", data[0]),
        (3, "shape-d1", data[1]),
    ]
    assert all(d["diskSizeGB"] == 1 and d["managedDisk"]["storageAccountType"] for d in shown)
    # attached disks are attached: not deletable, not attachable twice
    disk = client.disks.get(RESOURCE_GROUP, "shape-d1")
    assert disk["properties"]["diskState"] == "Attached" and disk["managedBy"] == vm["id"]
    with pytest.raises(HttpResponseError, match="attached"):
        client.disks.begin_delete(RESOURCE_GROUP, "shape-d1").result()
    # the SDK's own model reads the same shape
    model = AzureCompute._instance(world.compute(), vm)
    assert model.extra["data_disks"] == {1: data[0], 3: data[1]}
    # without deleteOption the data disks outlive the VM, detached
    client.virtual_machines.begin_delete(RESOURCE_GROUP, "shape").result()
    states = {d["name"]: d["properties"]["diskState"] for d in world.fake.resources("disk")}
    assert states == {"shape-os": "Unattached", "shape-d0": "Unattached", "shape-d1": "Unattached"}
    assert not re.search("managedBy", json.dumps(world.fake.resources("disk")))


# --------------------------------------------------------------------------- rounds


def _ranges_xml(written: list[tuple[int, int]], cleared: list[tuple[int, int]]) -> bytes:
    return _page_list(sorted(written), sorted(cleared))


def test_random_writes_and_clears_over_rounds_rebuild_byte_exact(world: ArmWorld) -> None:
    """Bounded rounds of random page writes and clears on two disks; each round's capture
    ``since`` the last gives changed ranges from the (recorded) diff; the last image with
    only those ranges read from the new one is the new image."""
    transport = DiffTransport()
    try:
        _random_rounds(world, transport, rounds=3, seed=15)
    finally:
        transport.end()


def _random_rounds(world: ArmWorld, transport: DiffTransport, *, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    compute = world.compute(blob_client_kwargs={"transport": transport})
    vm = world.seed_vm("rounds", image={0: _bytes(MiB, 20)}, data_disks=[{5 * MiB: b"d" * 512}])
    source = compute.get_instance(vm)
    disk_ids = [source.extra["os_disk_id"], source.extra["data_disks"][0]]
    blobs = [world.fake.blob_client(i) for i in disk_ids]
    with compute.capture(vm, keep=True) as capture:
        assert isinstance(capture, AzureBlockCapture)
        image = _assemble(capture.blocks(), capture.size)
        ref = capture.ref
    for _round in range(rounds):
        changes: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        for disk_id, blob in zip(disk_ids, blobs, strict=True):
            written: list[tuple[int, int]] = []
            cleared: list[tuple[int, int]] = []
            for _ in range(rng.randint(0, 4)):
                start = rng.randrange(0, 20 * MiB // 512) * 512
                length = min(rng.randint(1, 2048) * 512, 20 * MiB - start)
                if rng.random() < 0.3:
                    blob.clear_page(offset=start, length=length)
                    cleared.append((start, start + length))
                else:
                    blob.upload_page(rng.randbytes(length), offset=start, length=length)
                    written.append((start, start + length))
            changes[disk_id] = (written, cleared)
        with compute.capture(vm, since=ref, keep=True) as capture:
            assert isinstance(capture, AzureBlockCapture)
            for blob_name, (name, disk) in _snapshot_blobs(world).items():
                if name in capture.snapshot_names:
                    transport.answers[blob_name] = _ranges_xml(*changes[disk])
            changed = capture.changed_ranges()
            assert changed is not None
            rebuilt = bytearray(image)
            for offset, length in changed:
                assert offset % BLOCK_SIZE == 0
                rebuilt[offset : offset + length] = bytes(length)
            for offset, data in capture.read_ranges(changed):
                rebuilt[offset : offset + len(data)] = data
            full = _assemble(capture.blocks(), capture.size)
            assert bytes(rebuilt) == full
            new_ref = capture.ref
        assert ref is not None and new_ref is not None
        compute.release_capture(ref)
        image, ref = full, new_ref
    assert ref is not None
    compute.release_capture(ref)
    assert world.fake.resources("snapshot") == []


# --------------------------------------------------------------------------- with the data plane


def test_a_three_disk_vm_backed_up_and_restored_through_the_repository(
    world: ArmWorld, tmp_path: Path
) -> None:
    """The data plane over this Compute (keys and vault local): back up the three-disk
    image, restore it into a sink of the same disks, launch; every disk equals its source."""
    from regionvault.core.repository import Repository
    from regionvault.providers.local import LocalKeyService, LocalProvider, LocalVault

    compute = world.compute()
    vm = _three_disk_vm(world, "ims-1")
    caps = LocalProvider.capabilities
    vault = LocalVault(
        root=tmp_path / "vault", provider="local", region="local:east", capabilities=caps
    )
    keys = LocalKeyService(
        root=tmp_path / "keys", provider="local", region="local:east", capabilities=caps
    )
    repo = Repository.init_or_open(vault, keys, region="local:east")
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        layout = capture.disks
        point = repo.backup(capture, policy="1-7")
    assert point.size == 65 * MiB
    source = compute.get_instance(vm)
    spec = LaunchSpec(
        name="ims-1 restored", tags=source.tags, function=point.function, source=source
    )
    # the manifest records the capture's disks; the sink makes one managed disk each
    manifest = repo.load_manifest(point.id)
    assert manifest.disks == layout
    sink = compute.open_restore_sink(
        spec, CaptureKind.BLOCKS, size=point.size, disks=manifest.disks
    )
    assert isinstance(sink, AzureBlockSink)
    try:
        repo.restore(point.id, sink)
        sink.commit()
        launched = compute.launch(spec, sink)
    except BaseException:
        sink.discard()
        raise
    assert launched.extra["data_disks"] == {0: sink.disk_ids[1], 1: sink.disk_ids[2]}
    originals = [source.extra["os_disk_id"], *source.extra["data_disks"].values()]
    for original, restored, size in zip(originals, sink.disk_ids, SIZES, strict=True):
        assert world.disk_bytes(restored, size) == world.disk_bytes(original, size)


def test_a_range_cleared_since_the_kept_capture_is_changed_whatever_the_diff_says(
    world: ArmWorld,
) -> None:
    """Azurite answers the managed-disk diff with the current snapshot's page list, leaving out
    what was cleared since; a provider that trusted it would let a backup take the base's old
    bytes there. A range with data in the earlier snapshot and none now counts as changed."""
    compute = world.compute()  # no recorded answers: Azurite's own diff
    vm = world.seed_vm(
        "trimmed", image={0: _bytes(MiB, 30), 4 * MiB: _bytes(MiB, 31)}, data_disks=[]
    )
    blob = world.fake.blob_client(compute.get_instance(vm).extra["os_disk_id"])
    with compute.capture(vm, keep=True) as first:
        ref = first.ref
    assert ref is not None
    blob.clear_page(offset=4 * MiB, length=MiB)  # the guest trims what it deleted
    blob.upload_page(b"w" * 4096, offset=8 * MiB, length=4096)
    with compute.capture(vm, since=ref, keep=True) as second:
        assert isinstance(second, AzureBlockCapture)
        changed = second.changed_ranges()
        assert changed is not None
        assert any(o <= 4 * MiB and 5 * MiB <= o + n for o, n in changed), changed
        old = _assemble(iter([(0, _bytes(MiB, 30)), (4 * MiB, _bytes(MiB, 31))]), second.size)
        rebuilt = bytearray(old)
        for offset, length in changed:
            rebuilt[offset : offset + length] = bytes(length)
        for offset, data in second.read_ranges(changed):
            rebuilt[offset : offset + len(data)] = data
        assert bytes(rebuilt) == _assemble(second.blocks(), second.size)
        new_ref = second.ref
    assert new_ref is not None
    compute.release_capture(ref)
    compute.release_capture(new_ref)
