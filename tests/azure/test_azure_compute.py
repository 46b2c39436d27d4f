"""Azure Compute against the Compute contract, with the unmodified azure-mgmt-compute,
azure-identity and azure-storage-blob clients over real 127.0.0.1 connections: the ARM fake
(HTTPS, long-running operations) in front of Azurite, which holds the disks' bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("azure.mgmt.compute", reason="the Azure tests need pip install -e '.[test]'")

from azure_compute_world import (
    ArmWorld,
    NoAzurite,
    azurite,
)
from regionvault.core.errors import ComputeError, InstanceNotFound, TransientError
from regionvault.core.types import CaptureKind, Tags
from regionvault.providers.azure.fakes.arm import ArmFake, Injected

_VMS = r"/providers/Microsoft\.Compute/virtualMachines$"


@pytest.fixture(scope="module")
def blob_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """Azurite for the module: (account URL, account, key)."""
    workdir = tmp_path_factory.mktemp("azurite")
    try:
        with azurite(workdir) as (server, account, key):
            yield server.account_url(account), account, key
    except NoAzurite as exc:
        pytest.skip(str(exc))


@pytest.fixture
def world(blob_server: tuple[str, str, str], tmp_path: Path) -> Iterator[ArmWorld]:
    url, account, key = blob_server
    fake = ArmFake(
        blob_endpoint=url,
        account=account,
        account_key=key,
        workdir=tmp_path / "arm",
        container=f"disks-{tmp_path.name[-20:].lower().replace('_', '-')}".strip("-"),
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
