"""VM power state on the Azure Compute: the instance view (``PowerState/<state>``) read into
each Instance, a launch that waits until its VM runs (or fails naming it and removes what it
made), and stopped or deallocated VMs backed up like running ones; the unmodified
azure-mgmt-compute against the ARM fake over Azurite."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("azure.mgmt.compute", reason="the Azure tests need pip install -e '.[test]'")

from azure_compute_world import RESOURCE_GROUP, ArmWorld
from regionvault.core.errors import ComputeError
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.providers.azure.azurite import AzuriteServer
from regionvault.providers.azure.compute import (
    AzureBlockCapture,
    AzureBlockSink,
    AzureComputeSettings,
    MiB,
)
from regionvault.providers.azure.fakes.arm import ArmFake


def _written() -> dict[int, bytes]:
    rng = random.Random(7)
    return {0: rng.randbytes(MiB), 9 * MiB + 4096: b"session-store " * 3000}


def _image(written: dict[int, bytes], size: int) -> bytes:
    image = bytearray(size)
    for offset, data in written.items():
        image[offset : offset + len(data)] = data
    return bytes(image)


def _restored_sink(world: ArmWorld, spec: LaunchSpec) -> AzureBlockSink:
    compute = world.compute()
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=20 * MiB)
    assert isinstance(sink, AzureBlockSink)
    image = _image(_written(), 20 * MiB)
    for offset in range(0, len(image), sink.block_size):
        sink.write(offset, image[offset : offset + sink.block_size])
    sink.commit()
    return sink


def _vm_requests(fake: ArmFake, suffix: str) -> list[tuple[str, str, str]]:
    return [r for r in fake.requests if r[0] == "GET" and r[1].endswith(suffix)]


def test_instances_carry_the_power_state_of_their_instance_view(world: ArmWorld) -> None:
    compute = world.compute()
    vm = world.seed_vm("ims-1", tags={"backup": "1-7"}, image=_written())
    running = compute.get_instance(vm)
    assert running.state == "running" and running.extra["power_state"] == "running"
    assert running.extra["provisioning_state"] == "Succeeded"

    # deallocated through the plain SDK, as an operator does: the Instance says so
    world.client.virtual_machines.begin_deallocate(RESOURCE_GROUP, "ims-1").result()
    assert world.fake.power_state(vm) == "deallocated"
    assert compute.get_instance(vm).state == "deallocated"
    before = len(world.fake.requests)
    (listed,) = compute.list_instances(tag_filters={"backup": "1-7"})
    assert listed.id == vm and listed.state == "deallocated"
    # the power state came with the listing page: one request, no GET per VM
    pages = world.fake.requests[before:]
    assert [(m, q) for m, _p, q in pages] == [("GET", pages[0][2])]
    assert "%24expand=instanceView" in pages[0][2] and pages[0][1].endswith("/virtualMachines")

    world.client.virtual_machines.begin_start(RESOURCE_GROUP, "ims-1").result()
    world.client.virtual_machines.begin_power_off(RESOURCE_GROUP, "ims-1").result()
    assert compute.get_instance(vm).state == "stopped"


@pytest.mark.parametrize("action", ["begin_deallocate", "begin_power_off"])
def test_a_stopped_or_deallocated_vm_is_still_backed_up(world: ArmWorld, action: str) -> None:
    """Its disks are snapshotted and read as a running VM's are: the capture holds them."""
    compute = world.compute()
    written = _written()
    vm = world.seed_vm("core-2", tags={"backup": "1-7"}, image=written)
    getattr(world.client.virtual_machines, action)(RESOURCE_GROUP, "core-2").result()
    instance = compute.get_instance(vm)
    assert instance.state in ("deallocated", "stopped")
    assert CaptureKind.BLOCKS in instance.capture_kinds
    with compute.capture(vm) as capture:
        assert isinstance(capture, AzureBlockCapture)
        image = bytearray(capture.size)
        for offset, data in capture.blocks():
            image[offset : offset + len(data)] = data
    assert bytes(image) == _image(written, 20 * MiB)
    # the capture left the VM as it was: no start, no power action
    assert not any(r[1].endswith(("/start", "/powerOff")) for r in world.fake.requests[-20:])
    assert compute.get_instance(vm).state == instance.state


def test_launch_waits_until_the_vm_runs(world: ArmWorld) -> None:
    world.fake.start_states = ["starting", "starting", "starting", "running"]
    spec = LaunchSpec(name="vdu restored", tags=Tags({"backup": "1-7"}), function="Standard_B2s")
    sink = _restored_sink(world, spec)
    launched = sink.compute.launch(spec, sink)
    assert launched.state == "running" and launched.extra["power_state"] == "running"
    # the launch read the VM's instance view until it ran: three "starting", one "running"
    name = launched.extra["vm_name"]
    reads = _vm_requests(world.fake, f"/virtualMachines/{name}")
    views = [r for r in reads if "%24expand=instanceView" in r[2]]
    assert len(views) == 4
    assert world.fake.power_state(launched.id) == "running"


def test_a_vm_that_stops_instead_of_running_fails_the_launch_and_is_removed(
    world: ArmWorld,
) -> None:
    world.fake.start_states = ["starting", "stopped"]
    spec = LaunchSpec(name="doomed", tags=Tags({"backup": "1-7"}), function="Standard_B2s")
    sink = _restored_sink(world, spec)
    with pytest.raises(
        ComputeError, match=r"VM doomed-\w+ from disk .* did not start: it is stopped"
    ):
        sink.compute.launch(spec, sink)
    assert sink.launched_instance_id is None
    sink.discard()  # what the engine does after a failed launch
    assert world.fake.resources("vm") == [] and world.fake.resources("disk") == []


def test_a_vm_not_running_within_start_timeout_fails_the_launch_clearly(
    world: ArmWorld,
) -> None:
    world.fake.start_states = ["starting"]  # and it stays so
    settings = replace(world.settings, start_timeout=0.3, poll_interval=0.05)
    spec = LaunchSpec(name="slow", tags=Tags({"backup": "1-7"}), function="Standard_B2s")
    compute = world.compute(settings=settings)
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=20 * MiB)
    assert isinstance(sink, AzureBlockSink)
    sink.write(0, bytes(range(256)) * (sink.block_size // 256))
    sink.commit()
    with pytest.raises(
        ComputeError, match=r"VM slow-\w+ from disk .* is not running after 0.3s \(start_timeout\)"
    ):
        compute.launch(spec, sink)
    sink.discard()
    assert world.fake.resources("vm") == [] and world.fake.resources("disk") == []


def test_start_timeout_setting_is_checked(tmp_path: Path) -> None:
    from regionvault.core.errors import ConfigError
    from regionvault.core.types import RegionConfig, RegionId

    def region(**extra: object) -> RegionConfig:
        settings = {"subscription_id": "s", "resource_group": "rg", "location": "eastus"}
        return RegionConfig(
            id=RegionId("azure", "east"),
            settings={**settings, **extra},
            services={},
            base_dir=tmp_path,
            source="site.toml",
        )

    assert AzureComputeSettings.from_region(region()).start_timeout == 600
    assert AzureComputeSettings.from_region(region(start_timeout=90)).start_timeout == 90
    for bad in (0, 0.5, True, "60", 7201):
        with pytest.raises(ConfigError, match="start_timeout"):
            AzureComputeSettings.from_region(region(start_timeout=bad))


def test_the_engine_backs_up_a_deallocated_vm_and_launches_a_running_copy(
    azurite: AzuriteServer, tmp_path: Path
) -> None:
    """Through the provider's own conformance site (ARM fakes over Azurite, fake Key Vaults):
    a deallocated VM is due, backed up, and its point launches as a new VM that runs, whose
    disk holds the original's bytes; the original stays deallocated."""
    from datetime import UTC, datetime

    from regionvault.core.conformance.support import tar_image
    from regionvault.core.pipeline import Engine
    from regionvault.core.pipeline.scheduler import due_instances
    from regionvault.providers.azure.compute import AzureCompute
    from regionvault.providers.azure.conformance import AzureConformanceSupport
    from test_azure_blob_identity import _open

    support = AzureConformanceSupport()
    (tmp_path / "site").mkdir()
    data = {"etc/ims.conf": b"deallocated but kept " * 500}
    with support.test_site(tmp_path / "site") as path, _open(path) as site:
        east = site.region("azure:east")
        compute = east.compute
        assert isinstance(compute, AzureCompute)
        vm = support.make_instance(
            east, "ims-3", data=data, tags={"backup": "1-7"}, workdir=tmp_path / "w"
        )
        compute.client.virtual_machines.begin_deallocate(
            compute.settings.resource_group, vm.extra["vm_name"]
        ).result()
        assert compute.get_instance(vm.id).state == "deallocated"

        schedule = due_instances(compute, lambda _i: None, site.config, datetime.now(UTC))
        assert [d.instance.id for d in schedule.due] == [vm.id]
        engine = Engine(site)
        point = engine.backup(vm.id)
        assert point.instance_id == vm.id
        launched = engine.restore(point.id, region="azure:east", launch=True)
        assert launched.instance is not None and launched.healthy
        assert launched.instance.state == "running"
        assert compute.get_instance(vm.id).state == "deallocated"
        with compute.capture(launched.instance.id) as capture:
            assert isinstance(capture, AzureBlockCapture)
            image = bytearray(capture.size)
            for offset, block in capture.blocks():
                image[offset : offset + len(block)] = block
        expected = tar_image(data)
        assert bytes(image[: len(expected)]) == expected
        compute.terminate(launched.instance.id)
        compute.terminate(vm.id)
