"""Regression tests for review 15b of the Azure provider (F1-F7), each adapted from the
reviewer's experiment that proved the finding, through the unmodified SDK clients over
127.0.0.1 (the ARM fake in front of Azurite).

Azurite implements neither the managed-disk page-range diff nor paged Get Page Ranges
answers: those tests answer the request as Azure does (REST docs, Get Page Ranges, version
2020-10-02 and later: at most 10,000 ranges per answer, then a ``NextMarker``).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("azure.mgmt.compute")

import requests
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse
from azure.mgmt.compute import models
from azure.storage.blob import UserDelegationKey
from azure_compute_world import ArmWorld
from regionvault.core.errors import ComputeError, ConfigError, RegionVaultError
from regionvault.core.types import CaptureKind, Disk, LaunchSpec, RegionConfig, RegionId, Tags
from regionvault.providers.azure.compute import (
    START_POLL_FLOOR,
    AzureBlockCapture,
    AzureBlockSink,
    AzureCompute,
    AzureComputeSettings,
    MiB,
    compute_client,
)
from regionvault.providers.azure.fakes.arm import FAMILY_SAS_LIMIT, Injected
from regionvault.providers.azure.transit import mint_inbox_sas
from test_azure_disks import LUN0, LUN1, OS_DISK, _snapshot_blobs

# --------------------------------------------------------------------------- F1: paged diffs


def _xml(ranges: list[tuple[int, int]], marker: str | None) -> bytes:
    """A Get Page Ranges answer as Azure writes it (inclusive ends); ``marker`` None gives
    the empty ``<NextMarker />`` Azure sends on the last page."""
    body = "".join(
        f"<PageRange><Start>{s}</Start><End>{e - 1}</End></PageRange>" for s, e in ranges
    )
    tail = f"<NextMarker>{marker}</NextMarker>" if marker else "<NextMarker />"
    return f'<?xml version="1.0" encoding="utf-8"?><PageList>{body}{tail}</PageList>'.encode()


class PagedAnswers(RequestsTransport):  # type: ignore[misc]
    """The real requests transport, except that Get Page Ranges of the snapshot blobs in
    :attr:`pages` (a diff, or a plain listing when :attr:`plain`) is answered from them:
    the first page to a request without ``marker=``, the page a marker names otherwise."""

    def __init__(self, *, plain: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.requests: list[str] = []
        #: snapshot blob name -> {marker or "": answer}
        self.pages: dict[str, dict[str, bytes]] = {}

    def close(self) -> None:
        """Shared by every capture's blob clients: closed once, by the test (:meth:`end`)."""

    def end(self) -> None:
        super().close()

    def send(self, request: Any, **kwargs: Any) -> Any:
        url = urllib.parse.urlsplit(request.url)
        query = urllib.parse.parse_qs(url.query)
        blob = url.path.rsplit("/", 1)[-1]
        is_diff = "x-ms-previous-snapshot-url" in request.headers
        wanted = query.get("comp") == ["pagelist"] and is_diff != self.plain
        if wanted and blob in self.pages:
            self.requests.append(request.url)
            answer = requests.Response()
            answer.status_code, answer.reason, answer.url = 200, "OK", request.url
            answer._content = self.pages[blob][query.get("marker", [""])[0]]
            answer.headers.update({"Content-Type": "application/xml"})
            return RequestsTransportResponse(request, answer)
        if is_diff:
            raise AssertionError(f"an unexpected diff request {request.url}")
        return super().send(request, **kwargs)


def _incremental(
    world: ArmWorld, transport: PagedAnswers, name: str, answers: Callable[[str], dict[str, bytes]]
) -> list[tuple[int, int]] | None:
    """The changed ranges of a second capture of a three-disk VM since its first, each
    disk's diff answered by ``answers(disk label)``."""
    compute = world.compute(blob_client_kwargs={"transport": transport})
    vm = world.seed_vm(name, image=OS_DISK, data_disks=[LUN0, LUN1], vm_size="Standard_B2s")
    with compute.capture(vm, keep=True) as first:
        assert first.ref
    try:
        with compute.capture(vm, since=first.ref, keep=True) as second:
            assert isinstance(second, AzureBlockCapture)
            for blob, (snapshot, _disk) in _snapshot_blobs(world).items():
                for part in second.parts:
                    if part.snapshot == snapshot:
                        transport.pages[blob] = answers(part.label)
            changed = second.changed_ranges()
            compute.release_capture(str(second.ref))
    finally:
        compute.release_capture(first.ref)
    return changed


def test_F1_a_diff_past_its_first_page_is_followed_to_the_end(world: ArmWorld) -> None:
    """Azure's answer of page one carries a NextMarker: the capture asks again with
    ``marker=`` until the marker is empty, and the change on page two is a changed range
    (before the fix, one request per disk: the write at 10 MiB was lost)."""
    transport = PagedAnswers()
    try:
        changed = _incremental(
            world,
            transport,
            "v1",
            lambda label: {
                "": _xml([(0, 4096)], "2!MTIzNDU2"),
                "2!MTIzNDU2": _xml([(10 * MiB, 10 * MiB + 4096)], None),
            },
        )
    finally:
        transport.end()
    assert changed is not None
    # three disks, two pages each; the second request of each names the marker
    assert len(transport.requests) == 6
    assert sum("marker=2%21MTIzNDU2" in u for u in transport.requests) == 3
    assert any(o <= 10 * MiB < o + n for o, n in changed), changed
    assert (0, 512 * 1024) in changed


def test_F1_an_empty_marker_ends_the_diff(world: ArmWorld) -> None:
    transport = PagedAnswers()
    try:
        changed = _incremental(
            world, transport, "v1e", lambda label: {"": _xml([(MiB, MiB + 512)], None)}
        )
    finally:
        transport.end()
    assert changed is not None and len(transport.requests) == 3  # one page per disk


@pytest.mark.parametrize(
    "answer",
    [
        # a marker that leads back to itself: never ends
        {"": _xml([(0, 4096)], "2!bG9vcA"), "2!bG9vcA": _xml([(0, 4096)], "2!bG9vcA")},
        # a range whose end lies before its start
        {
            "": b'<?xml version="1.0"?><PageList><PageRange><Start>8192</Start>'
            b"<End>100</End></PageRange><NextMarker /></PageList>"
        },
        # a range with no end
        {"": b'<?xml version="1.0"?><PageList><PageRange><Start>0</Start></PageRange></PageList>'},
        # not a page list at all
        {"": b"<PageList><PageRange><Start>zero</Start><End>1</End></PageRange></PageList>"},
    ],
    ids=["looping-marker", "end-before-start", "no-end", "not-a-number"],
)
def test_F1_a_malformed_diff_answer_means_a_full_read(
    world: ArmWorld, answer: dict[str, bytes]
) -> None:
    """Any doubt about the diff: changed_ranges() is None (the backup reads everything),
    never a partial list."""
    transport = PagedAnswers()
    try:
        changed = _incremental(
            world,
            transport,
            "v1m",
            lambda label: answer if label == "lun0" else {"": _xml([], None)},
        )
    finally:
        transport.end()
    assert changed is None
    assert len(transport.requests) <= 4  # bounded: the OS disk's page, then lun0's (twice)


def test_F1_plain_page_ranges_past_the_first_page_are_read(world: ArmWorld) -> None:
    """The full read (blocks()) lists the page ranges through the SDK's pager, which follows
    NextMarker: a disk with more ranges than one answer holds is read whole."""
    transport = PagedAnswers(plain=True)
    try:
        compute = world.compute(blob_client_kwargs={"transport": transport})
        vm = world.seed_vm("v1p", image=OS_DISK, vm_size="Standard_B2s")
        with compute.capture(vm) as capture:
            assert isinstance(capture, AzureBlockCapture)
            for blob in _snapshot_blobs(world):
                transport.pages[blob] = {
                    "": _xml([(0, 2 * MiB)], "2!bmV4dA"),
                    "2!bmV4dA": _xml([(12 * MiB, 12 * MiB + 4096)], None),
                }
            ranges = capture.data_ranges()
            got = dict(capture.blocks())
    finally:
        transport.end()
    assert ranges == [(0, 2 * MiB), (12 * MiB, 12 * MiB + 512 * 1024)]
    assert sum("marker=" in u for u in transport.requests) == 2  # once per listing
    # the bytes on "page two" of the listing were read
    assert got[12 * MiB][:3000] == OS_DISK[12 * MiB]


# --------------------------------------------------------------------------- F2: forged refs


def _foreign_snapshot(world: ArmWorld, disk_id: str, name: str, tags: dict[str, str]) -> None:
    """A snapshot of the VM's disk that no capture made (an operator's own)."""
    world.client.snapshots.begin_create_or_update(
        world.settings.resource_group,
        name,
        models.Snapshot(
            {
                "location": world.settings.location,
                "tags": tags,
                "properties": {
                    "creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
                    "incremental": True,
                },
            }
        ),
    ).result()


def _forged_ref(world: ArmWorld, vm: str, disk_id: str, snapshot: str, size: int) -> str:
    return json.dumps(
        {
            "v": 1,
            "rg": world.settings.resource_group,
            "vm": vm,
            "disks": [{"name": "os", "disk": disk_id, "size": size, "snapshot": snapshot}],
        }
    )


@pytest.mark.parametrize(
    "tags", [{}, {"regionvault:capture": "another-vm"}], ids=["untagged", "another-vm"]
)
def test_F2_release_of_a_forged_ref_leaves_other_snapshots_alone(
    world: ArmWorld, tags: dict[str, str]
) -> None:
    compute = world.compute()
    vm = world.seed_vm("v2", image=OS_DISK, vm_size="Standard_B2s")
    disk_id = compute.get_instance(vm).extra["os_disk_id"]
    _foreign_snapshot(world, disk_id, "payroll-db-before-upgrade", tags)
    with pytest.raises(
        ComputeError,
        match=r"snapshot payroll-db-before-upgrade was not made by a capture of VM v2.*left alone",
    ):
        compute.release_capture(_forged_ref(world, "v2", disk_id, "payroll-db-before-upgrade", 1))
    assert [s["name"] for s in world.fake.resources("snapshot")] == ["payroll-db-before-upgrade"]


def test_F2_a_capture_snapshot_of_another_disk_is_left_alone(world: ArmWorld) -> None:
    """The tag names the VM but the snapshot is of another disk than the ref says."""
    compute = world.compute()
    vm = world.seed_vm("v2d", image=OS_DISK, data_disks=[LUN0], vm_size="Standard_B2s")
    with compute.capture(vm, keep=True) as kept:
        assert kept.ref
    doc = json.loads(kept.ref)
    doc["disks"][0]["snapshot"], doc["disks"][1]["snapshot"] = (
        doc["disks"][1]["snapshot"],
        doc["disks"][0]["snapshot"],
    )
    with pytest.raises(ComputeError, match="was not made by a capture of VM v2d"):
        compute.release_capture(json.dumps(doc))
    assert len(world.fake.resources("snapshot")) == 2
    compute.release_capture(kept.ref)  # the true ref still releases them
    assert world.fake.resources("snapshot") == []


def test_F2_capture_since_a_forged_ref_reads_everything_and_grants_it_nothing(
    world: ArmWorld,
) -> None:
    compute = world.compute()
    vm = world.seed_vm("v2s", image=OS_DISK, vm_size="Standard_B2s")
    instance = compute.get_instance(vm)
    disk_id = instance.extra["os_disk_id"]
    _foreign_snapshot(world, disk_id, "someone-elses", {})
    with compute.capture(vm, keep=True) as probe:  # the disk's size as a capture sees it
        size = probe.parts[0].size  # type: ignore[attr-defined]
        assert probe.ref
    compute.release_capture(probe.ref)
    forged = _forged_ref(world, "v2s", disk_id, "someone-elses", size)
    with compute.capture(vm, since=forged) as capture:
        assert capture.changed_ranges() is None
        foreign = [s for s in world.fake.resources("snapshot") if s["name"] == "someone-elses"]
        assert foreign[0]["properties"]["diskState"] == "Unattached"  # no SAS on it
    grants = world.fake.count("POST", r"/snapshots/someone-elses/beginGetAccess$")
    assert grants == 0


# --------------------------------------------------------------------------- F3: close


def test_F3_close_deletes_unkept_snapshots_even_when_a_revoke_fails(world: ArmWorld) -> None:
    """A revoke that fails once (409) is tried again and the snapshot deleted: nothing left
    (before the fix, the delete was skipped and the snapshot, named by no ref, stayed)."""
    compute = world.compute()
    vm = world.seed_vm("v4", image=OS_DISK, data_disks=[LUN0], vm_size="Standard_B2s")
    capture = compute.capture(vm)
    world.fake.inject(
        Injected("POST", r"/snapshots/[^/]+/endGetAccess$", status=409, code="Conflict", count=1)
    )
    capture.close()
    assert world.fake.resources("snapshot") == []


def test_F3_a_revoke_that_keeps_failing_is_reported_with_what_is_left(world: ArmWorld) -> None:
    """The delete is still tried (Azure refuses it while the SAS is open) and the one line
    names the snapshot left behind, the failed revoke and the refused delete."""
    compute = world.compute()
    vm = world.seed_vm("v4r", image=OS_DISK, vm_size="Standard_B2s")
    capture = compute.capture(vm)
    world.fake.inject(
        Injected("POST", r"/snapshots/[^/]+/endGetAccess$", status=409, code="Conflict", count=2)
    )
    with pytest.raises(ComputeError) as info:
        capture.close()
    line = str(info.value)
    assert re.search(r"snapshot rv-capture-v4r-os-\S+ could not be deleted and is left", line)
    assert "cannot revoke the SAS" in line and "cannot delete snapshot" in line
    assert world.fake.count("DELETE", r"/snapshots/rv-capture-v4r-os-[^/]+$") == 1


def test_F3_an_unkept_snapshot_that_cannot_be_deleted_is_named(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("v4d", image=OS_DISK, vm_size="Standard_B2s")
    capture = compute.capture(vm)
    world.fake.inject(Injected("DELETE", r"/snapshots/[^/]+$", status=409, code="Conflict"))
    with pytest.raises(
        ComputeError, match=r"snapshot rv-capture-v4d-os-\S+ could not be deleted and is left"
    ):
        capture.close()


# --------------------------------------------------------------------------- F4: launch wait


def _committed_sink(world: ArmWorld, compute: Any, spec: LaunchSpec) -> AzureBlockSink:
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=20 * MiB)
    assert isinstance(sink, AzureBlockSink)
    sink.write(0, bytes(range(256)) * (sink.block_size // 256))
    sink.commit()
    return sink


def test_F4_poll_interval_zero_does_not_hammer_arm(world: ArmWorld) -> None:
    """site.toml allows poll_interval = 0 (ARM's operations poll at once); the launch's
    power-state reads are still paced by START_POLL_FLOOR (before: ~250-450 reads in 1 s)."""
    world.fake.start_states = ["starting"]  # and it stays so
    settings = replace(world.settings, start_timeout=1.0, poll_interval=0.0)
    spec = LaunchSpec(name="hot", tags=Tags({"a": "1"}), function="Standard_B2s")
    compute = world.compute(settings=settings)
    sink = _committed_sink(world, compute, spec)
    with pytest.raises(ComputeError, match="is not running after 1s"):
        compute.launch(spec, sink)
    views = [r for r in world.fake.requests if "%24expand=instanceView" in r[2]]
    sink.discard()
    assert START_POLL_FLOOR >= 1.0
    assert 1 <= len(views) <= 3


def test_F4_a_throttled_power_state_read_waits_instead_of_failing(world: ArmWorld) -> None:
    """429s on the instance view (past the SDK's own retries) within start_timeout are
    waited out; the launch still ends with the VM running."""
    world.fake.start_states = ["starting", "running"]
    settings = replace(world.settings, start_timeout=30.0, poll_interval=0.0)
    spec = LaunchSpec(name="throttled", tags=Tags({"a": "1"}), function="Standard_B2s")
    # the SDK's own retries off: each 429 reaches the wait
    client = compute_client(settings, world.credential, retry_total=0, polling_interval=0)
    compute = AzureCompute(region=world.region, settings=settings, client=client)
    sink = _committed_sink(world, compute, spec)
    world.fake.inject(
        Injected(
            "GET",
            r"/virtualMachines/throttled-[^/]+$",
            query="instanceView",
            status=429,
            code="TooManyRequests",
            count=2,
        )
    )
    try:
        launched = compute.launch(spec, sink)
        assert launched.state == "running"
        compute.terminate(launched.id)
    finally:
        compute.close()


def test_F4_the_setting_names_the_floor(tmp_path: Path) -> None:
    settings = {"subscription_id": "s", "resource_group": "rg", "location": "eastus"}
    region = RegionConfig(
        id=RegionId("azure", "a"),
        settings={**settings, "poll_interval": -1},
        services={},
        base_dir=tmp_path,
        source="site.toml",
    )
    with pytest.raises(ConfigError, match=r"at most once every 1 s"):
        AzureComputeSettings.from_region(region)


# --------------------------------------------------------------------------- F5: SAS limit


def test_F5_the_fake_refuses_a_sixth_sas_in_one_snapshot_family(world: ArmWorld) -> None:
    """Azure (incremental snapshots, restrictions): SAS URIs for at most five snapshots of
    one snapshot family at a time. Killed runs leave kept snapshots with their SAS open;
    the sixth capture is refused with one line saying why, and releasing the crashed runs'
    refs (which revokes their SAS) lets the next capture through."""
    compute = world.compute()
    vm = world.seed_vm("v6", image=OS_DISK, vm_size="Standard_B2s")
    crashed = [compute.capture(vm, keep=True) for _ in range(FAMILY_SAS_LIMIT)]  # never closed
    with pytest.raises(
        ComputeError, match=r"cannot get a read SAS for snapshot .*at most 5 snapshots of one disk"
    ):
        compute.capture(vm, keep=True)
    # the refused capture removed its own snapshot; the crashed runs' remain
    assert len(world.fake.resources("snapshot")) == FAMILY_SAS_LIMIT
    for capture in crashed:
        compute.release_capture(str(capture.ref))
        capture.close()  # the dead runs' clients (their snapshots are gone: no error)
    assert world.fake.resources("snapshot") == []
    with compute.capture(vm) as capture:
        assert capture.size > 0


def test_F5_an_incremental_capture_stays_within_the_limit(world: ArmWorld) -> None:
    """A capture since a kept one holds two SAS per disk (its snapshot and the parent) and
    revokes both on close: captures in a row never pile up open SAS."""
    compute = world.compute()
    vm = world.seed_vm("v6i", image=OS_DISK, data_disks=[LUN0], vm_size="Standard_B2s")
    with compute.capture(vm, keep=True) as previous:
        ref = str(previous.ref)
    for _ in range(FAMILY_SAS_LIMIT + 2):
        with compute.capture(vm, since=ref, keep=True) as capture:
            pass
        compute.release_capture(ref)
        ref = str(capture.ref)
    states = [s["properties"]["diskState"] for s in world.fake.resources("snapshot")]
    assert states == ["Unattached", "Unattached"]
    compute.release_capture(ref)


# --------------------------------------------------------------------------- F6: discard


def _open_two_disk_sink(world: ArmWorld) -> AzureBlockSink:
    compute = world.compute()
    spec = LaunchSpec(name="d3", tags=Tags({"a": "1"}), function="Standard_B2s")
    layout = [Disk("os", 0, 20 * MiB), Disk("lun0", 20 * MiB, 20 * MiB)]
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=40 * MiB, disks=layout)
    assert isinstance(sink, AzureBlockSink)
    sink.commit()
    sink.vm_name = "never-made-but-delete-fails"
    return sink


def test_F6_discard_after_a_failed_vm_delete_still_removes_the_disks(world: ArmWorld) -> None:
    sink = _open_two_disk_sink(world)
    # 409: not retried by the SDK (a retried 500's answers leave sockets for the GC)
    world.fake.inject(Injected("DELETE", r"/virtualMachines/[^/]+$", status=409, code="Conflict"))
    with pytest.raises(RegionVaultError, match="cannot delete VM never-made-but-delete-fails"):
        sink.discard()
    assert world.fake.resources("disk") == []


def test_F6_both_failures_are_reported_in_one_line(world: ArmWorld) -> None:
    sink = _open_two_disk_sink(world)
    # 409: not retried by the SDK (a retried 500's answers leave sockets for the GC)
    world.fake.inject(Injected("DELETE", r"/virtualMachines/[^/]+$", status=409, code="Conflict"))
    world.fake.inject(Injected("DELETE", r"/disks/[^/]+$", status=409, code="Conflict", count=1))
    with pytest.raises(ComputeError) as info:
        sink.discard()
    line = str(info.value)
    assert "\n" not in line
    assert "cannot delete VM never-made-but-delete-fails" in line and "cannot delete disk" in line
    # the disk whose delete was not refused is gone
    assert len(world.fake.resources("disk")) == 1


# --------------------------------------------------------------------------- F7: inbox SAS


def _delegation_key() -> UserDelegationKey:
    key = UserDelegationKey()
    key.signed_oid, key.signed_tid = "o", "t"
    key.signed_start, key.signed_expiry = "2026-12-07T00:00:00Z", "2026-12-08T00:00:00Z"
    key.signed_service, key.signed_version = "b", "2025-01-05"
    key.value = base64.b64encode(b"k" * 32).decode()
    return key


@pytest.mark.parametrize("signed_with", ["delegation", "account-key"])
@pytest.mark.parametrize(
    ("url", "spr"),
    [
        ("https://acct.blob.core.windows.net", "https"),
        ("http://acct.example.net", "https"),  # plain HTTP elsewhere: still HTTPS only
        ("http://127.0.0.1:10000/acct", "https,http"),  # Azurite on this machine
    ],
)
def test_F7_the_inbox_sas_requires_https(signed_with: str, url: str, spr: str) -> None:
    service: Any = SimpleNamespace(get_user_delegation_key=lambda start, expiry: _delegation_key())
    settings: Any = SimpleNamespace(
        account_name="acct", inbox_container="inbox", inbox_sas_lifetime=3600, url=url
    )
    key = base64.b64encode(b"a" * 64).decode() if signed_with == "account-key" else None
    token, _expiry = mint_inbox_sas(
        service, settings, account_key=key, now=datetime(2026, 12, 7, 12, tzinfo=UTC)
    )
    fields = urllib.parse.parse_qs(token)
    assert fields["spr"] == [spr]
    assert fields["sp"] == ["cw"]


# --------------------------------------------------------------------------- refused writes


def test_a_write_refused_for_data_in_a_hole_writes_nothing(world: ArmWorld) -> None:
    """Found while fixing: a write whose tail lies in the hole between two disks queued its
    head before the hole was checked, racing the caller's next write of the same bytes."""
    compute = world.compute()
    layout = [Disk("/dev/xvda", 0, 3 * MiB + 4096), Disk("/dev/xvdb", 4 * MiB, 2 * MiB)]
    spec = LaunchSpec(name="hole", tags=Tags({"a": "1"}), function="Standard_B2s")
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=6 * MiB, disks=layout)
    assert isinstance(sink, AzureBlockSink)
    try:
        with pytest.raises(ComputeError, match="outside the image's disks"):
            sink.write(3 * MiB, b"\1" * sink.block_size * 2)
        sink.commit()
        first, _second = sink.disk_ids
        assert world.disk_bytes(first, 20 * MiB) == bytes(20 * MiB)
    finally:
        sink.discard()
