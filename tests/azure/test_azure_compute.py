"""Azure Compute against the Compute contract, with the unmodified azure-mgmt-compute,
azure-identity and azure-storage-blob clients over real 127.0.0.1 connections: the ARM fake
(HTTPS, long-running operations) in front of Azurite, which holds the disks' bytes."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

pytest.importorskip("azure.mgmt.compute", reason="the Azure tests need pip install -e '.[test]'")

from azure.core.exceptions import HttpResponseError
from azure.identity import ClientSecretCredential
from azure_compute_world import ArmWorld
from regionvault.core.conformance import ComputeSuite
from regionvault.core.conformance.fixtures import InstanceFactory, instance_factory
from regionvault.core.conformance.support import ConformanceSupport, tar_image
from regionvault.core.errors import (
    ComputeError,
    ConfigError,
    InstanceNotFound,
    TransientError,
    UnsupportedOperation,
)
from regionvault.core.site import Region
from regionvault.core.types import (
    CaptureKind,
    Instance,
    LaunchSpec,
    RegionConfig,
    RegionId,
    Tags,
)
from regionvault.providers.azure.azurite import AzuriteServer
from regionvault.providers.azure.compute import (
    AzureBlockCapture,
    AzureBlockSink,
    AzureCompute,
    AzureComputeSettings,
    MiB,
    _describe,
    compute_client,
)
from regionvault.providers.azure.fakes.arm import ArmFake, Injected
from regionvault.providers.azure.identity import CredentialSettings

_VMS = r"/providers/Microsoft\.Compute/virtualMachines$"


@pytest.fixture
def blob_server(azurite: AzuriteServer) -> tuple[str, str, str]:
    """The session's Azurite (tests/azure/conftest.py): (account URL, account, key)."""
    account = sorted(azurite.accounts)[0]
    return azurite.account_url(account), account, azurite.accounts[account]


@pytest.fixture
def world(blob_server: tuple[str, str, str], tmp_path: Path) -> Iterator[ArmWorld]:
    url, account, key = blob_server
    fake = ArmFake(
        blob_endpoint=url,
        account=account,
        account_key=key,
        workdir=tmp_path / "arm",
        container=f"disks-{uuid.uuid4().hex[:12]}",
    )
    with fake:
        world = ArmWorld(fake, url)
        try:
            yield world
        finally:
            world.close()


# --------------------------------------------------------------------------- list and tags


def test_list_by_tag_filter_in_pages(world: ArmWorld) -> None:
    compute = world.compute()
    tagged = {
        world.seed_vm(f"vdu-{i}", tags={"backup": "1-7", "Name": f"vdu-{i}"}) for i in range(7)
    }
    other = world.seed_vm("core-0", tags={"backup": "none"})
    bare = world.seed_vm("ims-0")
    assert world.fake.page_size == 3  # 9 VMs: 3 ARM pages

    before = world.fake.count("GET", _VMS)
    found = list(compute.list_instances(tag_filters={"backup": "1-7"}, page_size=5))
    assert sorted(i.id for i in found) == sorted(tagged)
    # pages, not one call per VM: the 3 ARM pages are read for 2 pages of ours, one again
    assert world.fake.count("GET", _VMS) - before <= 4

    pages, token = [], None
    for _ in range(10):
        page = compute.list_instances_page(
            tag_filters={"backup": "1-7"}, page_size=2, page_token=token
        )
        pages.append([i.id for i in page.instances])
        token = page.next_token
        if token is None:
            break
    assert all(1 <= len(p) <= 2 for p in pages), pages
    listed = [i for p in pages for i in p]
    assert sorted(listed) == sorted(tagged)  # each once
    with pytest.raises(ComputeError, match="page token"):
        compute.list_instances_page(page_token="garbage")

    assert {i.id for i in compute.list_instances(tag_filters={"backup": None})} == tagged | {other}
    assert {i.id for i in compute.list_instances()} == tagged | {other, bare}

    vdu = next(i for i in found if i.name == "vdu-0")
    assert vdu.tags == Tags({"backup": "1-7", "Name": "vdu-0"})
    assert vdu.state == "running" and vdu.region == "azure:east"
    assert vdu.function == "Standard_D2s_v5" and vdu.extra["vm_size"] == "Standard_D2s_v5"
    assert vdu.extra["os_disk_id"] and vdu.capture_kinds == frozenset({CaptureKind.BLOCKS})
    # the bare VM name and the full resource id name the same instance
    assert compute.get_instance("vdu-0") == compute.get_instance(vdu.id)


def test_tags_round_trip(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("core-1", tags={"Name": "core-1"})
    assert compute.set_tags(vm, {"backup": "1-7", "function": "core"}) == Tags(
        {"Name": "core-1", "backup": "1-7", "function": "core"}
    )
    # tags are written with the VM's etag, so a concurrent writer is not overwritten
    patches = [q for m, p, q in world.fake.requests if m == "PATCH"]
    assert len(patches) == 1
    assert compute.set_tags(vm, {"backup": "4h-2d"})["backup"] == "4h-2d"
    assert compute.remove_tags(vm, ["function", "absent"]) == Tags(
        {"Name": "core-1", "backup": "4h-2d"}
    )
    before = world.fake.count("PATCH", ".")
    assert compute.remove_tags(vm, []) == Tags({"Name": "core-1", "backup": "4h-2d"})
    assert world.fake.count("PATCH", ".") == before  # nothing to change: no write
    assert compute.get_instance(vm).tags == Tags({"Name": "core-1", "backup": "4h-2d"})
    # tag names are case-insensitive in Azure: another spelling replaces, and removes
    assert compute.set_tags(vm, {"Backup": "1-7"}) == Tags({"Name": "core-1", "Backup": "1-7"})
    assert compute.remove_tags(vm, ["BACKUP"]) == Tags({"Name": "core-1"})
    assert compute.set_tags(vm, {"backup": "4h-2d"}) == Tags({"Name": "core-1", "backup": "4h-2d"})
    for bad in ("azure-backup", "Microsoft.x", "regionvault:name", "a/b", ""):
        with pytest.raises(ComputeError, match="tag"):
            compute.set_tags(vm, {bad: "1"})
    for unknown in ("no-such-vm", "i-0123456789abcdef0", "/subscriptions/x/y", "bad name!"):
        with pytest.raises(InstanceNotFound):
            compute.get_instance(unknown)
    with pytest.raises(InstanceNotFound):
        compute.set_tags("no-such-vm", {"a": "b"})
    compute.terminate(vm)
    with pytest.raises(InstanceNotFound):
        compute.get_instance(vm)
    assert vm not in {i.id for i in compute.list_instances()}


def test_a_concurrent_tag_write_is_retried_not_lost(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("core-2", tags={"keep": "1"})
    # another writer's PATCH lands between our read and our write: ours gets 412 once
    world.fake.inject(
        Injected("PATCH", r"/virtualMachines/core-2$", status=412, code="PreconditionFailed")
    )
    assert compute.set_tags(vm, {"backup": "1-7"}) == Tags({"keep": "1", "backup": "1-7"})
    assert world.fake.count("PATCH", r"/virtualMachines/core-2$") == 2


def test_throttling_and_server_errors_are_transient(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("core-3")
    for status, code in ((429, "TooManyRequests"), (503, "ServiceUnavailable")):
        world.fake.inject(
            Injected("GET", r"/virtualMachines/core-3$", status=status, code=code, count=10)
        )
        with pytest.raises(TransientError, match=code):
            compute.get_instance(vm)
        world.fake._injected.clear()
    world.fake.inject(
        Injected("GET", r"/virtualMachines/core-3$", status=403, code="AuthorizationFailed")
    )
    with pytest.raises(ComputeError, match="AuthorizationFailed") as denied:
        compute.get_instance(vm)
    assert not isinstance(denied.value, TransientError)


# --------------------------------------------------------------------------- capture


def _pages(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _sparse_image() -> dict[int, bytes]:
    """A 20 MiB disk with three written regions and holes between them."""
    return {
        0: _pages(MiB, 1),
        8 * MiB: _pages(100 * 1024, 2),
        15 * MiB + 512: _pages(3000, 3),
    }


def _assemble(blocks: list[tuple[int, bytes]], size: int) -> bytes:
    image = bytearray(size)
    end = -1
    for offset, data in blocks:
        assert offset >= end, "blocks out of order or overlapping"
        image[offset : offset + len(data)] = data
        end = offset + len(data)
    return bytes(image)


def test_capture_reads_only_the_page_ranges_with_data(world: ArmWorld) -> None:
    compute = world.compute()
    written = _sparse_image()
    vm = world.seed_vm("vcu-1", tags={"backup": "1-7"}, image=written)
    with pytest.raises(UnsupportedOperation):
        compute.capture(vm, kind=CaptureKind.FILES)
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture) and capture.kind is CaptureKind.BLOCKS
        assert capture.size == 20 * MiB and capture.instance.id == vm
        snapshots = world.fake.resources("snapshot")
        assert len(snapshots) == 1
        props = snapshots[0]["properties"]
        # an incremental snapshot of the VM's OS disk, readable through a SAS while captured
        assert props["incremental"] is True and props["creationData"]["createOption"] == "Copy"
        assert (
            props["creationData"]["sourceResourceId"]
            == compute.get_instance(vm).extra["os_disk_id"]
        )
        assert props["diskState"] == "ActiveSAS"
        blocks = list(capture.blocks())
        image = _assemble(blocks, capture.size)
    expected = bytearray(20 * MiB)
    for offset, data in written.items():
        expected[offset : offset + len(data)] = data
    assert image == bytes(expected)
    # only the blocks holding written pages crossed the wire: 1 MiB at 0, and the one 512 KiB
    # block around each of the two small writes; offsets are block-aligned
    assert [(o, len(d)) for o, d in blocks] == [
        (0, MiB),
        (8 * MiB, 512 * 1024),
        (15 * MiB, 512 * 1024),
    ]
    assert capture.bytes_read == 2 * MiB and capture.reads == 3
    # closing revoked the SAS and deleted the snapshot
    assert world.fake.count("POST", r"/snapshots/[^/]+/endGetAccess$") == 1
    assert world.fake.resources("snapshot") == []


def test_a_kept_snapshot_outlives_the_capture_with_its_sas_revoked(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("vcu-2", image={0: b"kept" * 1000})
    with compute.capture(vm, keep=True) as capture:
        assert isinstance(capture, AzureBlockCapture)
        (name,) = capture.snapshot_names
        assert capture.ref is not None and name in capture.ref
        assert b"kept" * 1000 in b"".join(d for _o, d in capture.blocks())
    (snapshot,) = world.fake.resources("snapshot")
    assert snapshot["name"] == name and snapshot["properties"]["diskState"] == "Unattached"
    compute.release_capture(capture.ref)
    assert world.fake.resources("snapshot") == []


def test_a_failed_capture_removes_its_snapshot(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("vcu-3", image={0: b"x" * 512})
    world.fake.inject(
        Injected(
            "POST",
            r"/snapshots/[^/]+/beginGetAccess$",
            code="OperationNotAllowed",
            in_operation=True,
        )
    )
    with pytest.raises(ComputeError, match="read SAS"):
        compute.capture(vm)
    assert world.fake.resources("snapshot") == []


# --------------------------------------------------------------------------- restore


def _image(written: dict[int, bytes], size: int) -> bytes:
    image = bytearray(size)
    for offset, data in written.items():
        image[offset : offset + len(data)] = data
    return bytes(image)


def _write_all(sink: AzureBlockSink, image: bytes) -> None:
    """As the engine writes a restore: whole blocks, in order, then commit."""
    for offset in range(0, len(image), sink.block_size):
        sink.write(offset, image[offset : offset + sink.block_size])
    sink.commit()


def test_restore_to_a_new_disk_and_launch_with_the_original_size_and_tags(
    world: ArmWorld,
) -> None:
    compute = world.compute()
    written = _sparse_image()
    vm = world.seed_vm(
        "vdu-9", tags={"backup": "1-7", "Name": "vdu-9"}, image=written, vm_size="Standard_D4s_v5"
    )
    source = compute.get_instance(vm)
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        image = _assemble(list(capture.blocks()), capture.size)
    assert image == _image(written, 20 * MiB)

    spec = LaunchSpec(
        name="vdu-9 restored", tags=source.tags, function=source.function, source=source
    )
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(image))
    assert isinstance(sink, AzureBlockSink) and sink.size == 20 * MiB
    (disk,) = [d for d in world.fake.resources("disk") if d["id"] == sink.disk_id]
    # an empty disk created for upload: 20 MiB of data and the VHD footer
    assert disk["properties"]["creationData"] == {
        "createOption": "Upload",
        "uploadSizeBytes": 20 * MiB + 512,
    }
    assert disk["properties"]["diskState"] == "ActiveUpload"
    _write_all(sink, image)
    # only blocks holding data were written (all-zero ones skipped), then the footer
    assert sink.writes == 5 and sink.bytes_written == 4 * 512 * 1024 + 512
    footer = world.fake.footer(sink.disk_id)
    assert footer == vhd_footer_fields_ok(footer, 20 * MiB)
    launched = compute.launch(spec, sink)
    assert launched.name == "vdu-9 restored" and launched.id != vm
    assert launched.tags == source.tags and launched.function == "Standard_D4s_v5"
    assert launched.extra["os_disk_id"] == sink.disk_id
    assert world.disk_bytes(sink.disk_id, 20 * MiB) == image
    with compute.capture(launched.id) as again:
        assert isinstance(again, AzureBlockCapture)
        assert _assemble(list(again.blocks()), again.size) == image
    listed = {i.id for i in compute.list_instances(tag_filters={"Name": "vdu-9"})}
    assert listed == {vm, launched.id}

    compute.terminate(launched.id)
    assert launched.id.lower() not in {v["id"].lower() for v in world.fake.resources("vm")}
    assert sink.disk_id not in {d["id"] for d in world.fake.resources("disk")}
    sink.discard()  # a launched sink belongs to its VM: discard leaves it (and is harmless)


def vhd_footer_fields_ok(footer: bytes, size: int) -> bytes:
    """``footer`` when it is a valid fixed-VHD footer for ``size`` bytes (else fails)."""
    import struct

    assert len(footer) == 512 and footer[:8] == b"conectix"
    assert struct.unpack(">Q", footer[48:56])[0] == size  # current size
    assert struct.unpack(">I", footer[60:64])[0] == 2  # fixed disk
    checksum = struct.unpack(">I", footer[64:68])[0]
    assert checksum == (~sum(footer[:64] + bytes(4) + footer[68:])) & 0xFFFFFFFF
    return footer


def test_a_failed_launch_removes_the_vm_and_the_disk(world: ArmWorld) -> None:
    compute = world.compute()
    spec = LaunchSpec(name="doomed", tags=Tags({"backup": "1-7"}), function="Standard_B2s")
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=3 * MiB)
    assert isinstance(sink, AzureBlockSink)
    _write_all(sink, _pages(3 * MiB, 7) + bytes(17 * MiB))
    world.fake.inject(
        Injected("PUT", r"/virtualMachines/[^/]+$", code="AllocationFailed", in_operation=True)
    )
    with pytest.raises(ComputeError, match="AllocationFailed"):
        compute.launch(spec, sink)
    assert [v["properties"]["provisioningState"] for v in world.fake.resources("vm")] == ["Failed"]
    sink.discard()  # what the engine does after a failed launch
    sink.discard()
    assert world.fake.resources("vm") == [] and world.fake.resources("disk") == []
    with pytest.raises(ComputeError, match="discarded"):
        compute.launch(spec, sink)
    with pytest.raises(ComputeError, match="discarded"):
        sink.write(0, bytes(sink.block_size))


def test_a_restore_that_cannot_get_its_write_sas_removes_the_disk(world: ArmWorld) -> None:
    compute = world.compute()
    world.fake.inject(
        Injected("POST", r"/disks/[^/]+/beginGetAccess$", status=409, code="OperationNotAllowed")
    )
    spec = LaunchSpec(name="nosas", tags=Tags({"a": "1"}), function="Standard_B2s")
    with pytest.raises(ComputeError, match="write SAS"):
        compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert world.fake.resources("disk") == []


def test_launch_needs_a_vm_size_and_a_committed_sink(world: ArmWorld) -> None:
    settings = replace(world.settings, vm_size=None)
    compute = world.compute(settings=settings)
    spec = LaunchSpec(name="sizeless", tags=Tags({"a": "1"}), function="/usr/bin/vnf")
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert isinstance(sink, AzureBlockSink)
    try:
        with pytest.raises(ComputeError, match="not committed"):
            compute.launch(spec, sink)
        _write_all(sink, _pages(MiB, 8))
        with pytest.raises(ComputeError, match="no VM size"):
            compute.launch(spec, sink)
    finally:
        sink.discard()
    assert world.fake.resources("disk") == []
    with pytest.raises(UnsupportedOperation):
        compute.open_restore_sink(spec, CaptureKind.FILES)


# --------------------------------------------------------------------------- the suite


class _SeedingSupport(ConformanceSupport):
    """Test instances for the Compute suite: VMs whose OS disk holds a tar image of the
    test data, seeded with the plain SDK (upload disk, write SAS, VM attaching it)."""

    def __init__(self, world: ArmWorld, compute: AzureCompute) -> None:
        self.world = world
        self.compute = compute

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        vm = self.world.seed_vm(name, tags=tags, image=tar_image(data))
        return self.compute.get_instance(vm)

    def remove_instance(self, region: Region, instance: Instance) -> None:
        self.compute.terminate(instance.id)


class TestAzureComputeSuite(ComputeSuite):
    """The provider-neutral Compute suite against AzureCompute over the ARM fake."""

    @pytest.fixture
    def compute_a(self, world: ArmWorld) -> AzureCompute:
        return world.compute()

    @pytest.fixture
    def make_instance(
        self, world: ArmWorld, compute_a: AzureCompute, tmp_path: Path, uid: str
    ) -> Iterator[InstanceFactory]:
        region = cast(Region, SimpleNamespace(name=compute_a.region, compute=compute_a))
        yield from instance_factory(_SeedingSupport(world, compute_a), region, tmp_path, uid)


# --------------------------------------------------------------------------- errors


def test_a_wrong_client_secret_is_one_clear_error(world: ArmWorld) -> None:
    credential = ClientSecretCredential(
        world.fake.tenant,
        world.fake.client_id,
        "not-the-secret",
        authority=world.fake.endpoint,
        disable_instance_discovery=True,
        connection_verify=str(world.fake.ca_path),
    )
    client = compute_client(world.settings, credential, retry_total=0, polling_interval=0)
    compute = AzureCompute(region="azure:east", settings=world.settings, client=client)
    try:
        with pytest.raises(
            ComputeError, match="cannot list the VMs of resource group rv-test"
        ) as exc:
            list(compute.list_instances())
        assert not isinstance(exc.value, TransientError)
        assert "not-the-secret" not in str(exc.value) and "\n" not in str(exc.value)
    finally:
        compute.close()
        credential.close()


def test_sas_signatures_never_reach_an_error_message(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("vcu-5", image={0: b"y" * 4096})
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        # the SAS expires (or is revoked) under a reader: Azurite refuses the read
        world.fake.blob_client(
            next(s["id"] for s in world.fake.resources("snapshot"))
        ).delete_blob()
        with pytest.raises(ComputeError) as exc:
            list(capture.blocks())
    message = str(exc.value)
    assert capture.snapshot_names[0] in message and "\n" not in message
    assert "sig=" not in message or "sig=REDACTED" in message
    assert world.fake.account_key not in message


def test_error_text_drops_sas_fields() -> None:
    leaked = HttpResponseError(
        message="Server failed to authenticate http://h/c/b.vhd?sv=2025-01-05&sp=r&sig=SECRET%3D"
    )
    text = _describe(leaked)
    assert "SECRET" not in text and "sig=REDACTED" in text and "sp=REDACTED" in text


# --------------------------------------------------------------------------- with the engine


def test_the_engine_backs_up_an_azure_disk_and_restores_it_to_a_new_vm(
    world: ArmWorld, tmp_path: Path
) -> None:
    """The data plane over this Compute (keys and vault local): back up the OS disk of a
    tagged VM, restore the point into a new managed disk, launch; the blocks are equal, and
    nothing plaintext lies in the vault."""
    from regionvault.core.repository import Repository
    from regionvault.providers.local import LocalKeyService, LocalProvider, LocalVault

    compute = world.compute()
    written = {
        0: _pages(2 * MiB, 11),
        5 * MiB + 4096: b"subscriber-db " * 5000,
        20 * MiB - 512: b"last page of the disk".ljust(512, b"!"),
    }
    vm = world.seed_vm("core-9", tags={"backup": "1-7"}, image=written, vm_size="Standard_E2s_v5")
    caps = LocalProvider.capabilities
    vault = LocalVault(
        root=tmp_path / "vault", provider="local", region="local:east", capabilities=caps
    )
    keys = LocalKeyService(
        root=tmp_path / "keys", provider="local", region="local:east", capabilities=caps
    )
    repo = Repository.init_or_open(vault, keys, region="local:east")
    with compute.capture(vm) as capture:
        point = repo.backup(capture, policy="1-7")
    assert point.kind is CaptureKind.BLOCKS and point.size == 20 * MiB
    for path in (tmp_path / "vault").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"subscriber-db " not in content and written[0][:64] not in content

    source = compute.get_instance(vm)
    spec = LaunchSpec(
        name="core-9 restored", tags=source.tags, function=point.function, source=source
    )
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=point.size)
    assert isinstance(sink, AzureBlockSink)
    try:
        repo.restore(point.id, sink)
        sink.commit()
        launched = compute.launch(spec, sink)
    except BaseException:
        sink.discard()
        raise
    assert launched.function == "Standard_E2s_v5" and launched.tags == Tags({"backup": "1-7"})
    assert world.disk_bytes(sink.disk_id, 20 * MiB) == _image(written, 20 * MiB)


def test_compute_from_site_settings(world: ArmWorld, tmp_path: Path) -> None:
    settings = world.fake.compute_settings(resource_group="rv-test", location="eastus")
    region = RegionConfig(
        id=RegionId("azure", "east"),
        settings=settings,
        services={},
        base_dir=tmp_path,
        source="site.toml",
    )
    # the login identity.py builds from the same settings (keys' module)
    credential = CredentialSettings.from_region(region).build()
    compute = AzureCompute.from_region(region, credential, polling_interval=0)
    try:
        vm = world.seed_vm("from-site", tags={"backup": "1-7"})
        assert [i.id for i in compute.list_instances(tag_filters={"backup": "1-7"})] == [vm]
        assert compute.region == "azure:east" and compute.settings.ca_bundle == str(
            world.fake.ca_path
        )
    finally:
        compute.close()
        credential.close()  # type: ignore[attr-defined]
    for key, value, says in (
        ("resource_group", None, "missing"),
        ("location", 3, "missing or not a string"),
        ("vm_size", 3, "must be a string"),
        ("compute_concurrency", 0, "positive integer"),
    ):
        broken = (
            {**settings, key: value}
            if value is not None
            else {k: v for k, v in settings.items() if k != key}
        )
        with pytest.raises(ConfigError, match=says) as exc:
            AzureComputeSettings.from_region(replace(region, settings=broken))
        assert f'regions."azure:east".{key}' in str(exc.value)


def test_long_running_operations_answer_with_the_specs_status_codes(world: ArmWorld) -> None:
    """What the unmodified client saw: the spec's initial status per operation, then real
    polling (``InProgress`` first) of Azure-AsyncOperation and Location URLs."""
    compute = world.compute()
    vm = world.seed_vm("lro-1", image={0: b"z" * 512})
    with compute.capture(vm):
        pass
    compute.terminate(vm)

    def first(method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return next(st for m, p, st in world.fake.answers if m == method and rx.search(p))

    assert first("POST", r"/oauth2/v2.0/token$") == 200  # the real login path
    assert first("PUT", r"/disks/[^/]+$") == 202
    assert first("PUT", r"/virtualMachines/[^/]+$") == 201
    assert first("PUT", r"/snapshots/[^/]+$") == 202
    assert first("POST", r"/beginGetAccess$") == 202
    assert first("POST", r"/endGetAccess$") == 202
    assert first("DELETE", r"/virtualMachines/[^/]+$") == 202
    polls = [st for m, p, st in world.fake.answers if m == "GET" and "/operations/" in p]
    results = [st for m, p, st in world.fake.answers if m == "GET" and "/operationResults/" in p]
    assert polls and set(polls) == {200}
    assert world.fake.count("GET", "/operations/") >= 2 * len(
        [a for a in world.fake.answers if a[0] in ("PUT", "DELETE") and a[2] in (201, 202)]
    )
    assert 200 in results  # the final result of a POST action read at its Location
