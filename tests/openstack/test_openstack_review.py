"""Regression tests of what the review of the openstack provider found (issue #17 review
"ros", /work/wt/review-ros.md): each fails on the provider as it was reviewed. Against the
provider's own fake over HTTP on 127.0.0.1, through libcloud's unmodified driver."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from openstack_world import FLAVOR
from regionvault.core.errors import ComputeError, ConfigError, TransientError
from regionvault.core.procs import ProcessIdentity
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.providers.openstack import compute as compute_module
from regionvault.providers.openstack.compute import (
    OWNER_KEY,
    PURPOSE_KEY,
    SCRATCH_PREFIX,
    format_function,
    parse_function,
)
from regionvault.providers.openstack.errors import is_transient

MiB = 1 << 20


def _image(seed: int, size: int = 2 * MiB) -> bytes:
    block = bytes((seed + i) % 251 for i in range(4096))
    return block * (size // 4096)


def dead_token() -> str:
    """The token of a process of this host that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    me = ProcessIdentity.current()
    return replace(me, pid=int(child.stdout), ticks=1).token()


# ---------------------------------------------------------------- 4: one driver per thread


def test_each_thread_has_a_driver_of_its_own(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    fake.settle_polls = 0
    ids = [fake.seed_server(f"s{i}", b"x" * 4096, FLAVOR, {"n": str(i)}) for i in range(4)]
    compute = make_compute()
    drivers: dict[str, Any] = {}
    wrong: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(server: str) -> None:
        drivers[server] = compute.driver
        try:
            for _ in range(40):
                got = compute.get_instance(server)
                if got.id != server:
                    wrong.append((server, got.id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in ids]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not wrong
    assert len({id(d) for d in drivers.values()}) == len(ids)
    assert len({id(d.connection) for d in drivers.values()}) == len(ids)


# ---------------------------------------------------------------- 8: transient failures


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_throttling_and_server_errors_are_transient(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], status: int
) -> None:
    fake, _ = cloud
    server = fake.seed_server("t-1", b"x" * 4096, FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    compute.get_instance(server)
    fake.fail_next("GET", r"/servers/detail$", status)
    with pytest.raises(TransientError):
        list(compute.list_instances())
    fake.fail_next("GET", rf"/servers/{server}$", status)
    with pytest.raises(TransientError):
        compute.get_instance(server)


@pytest.mark.parametrize("status", [400, 403, 404, 409])
def test_refusals_are_not_transient(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], status: int
) -> None:
    fake, _ = cloud
    compute = make_compute()
    list(compute.list_instances())
    fake.fail_next("GET", r"/servers/detail$", status)
    with pytest.raises(ComputeError) as caught:
        list(compute.list_instances())
    assert not isinstance(caught.value, TransientError)


def test_a_cloud_that_is_down_is_transient(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute(timeout=5)
    list(compute.list_instances())
    fake.stop()
    with pytest.raises(TransientError):
        list(compute.list_instances())
    fresh = make_compute(timeout=5)
    with pytest.raises(TransientError):  # refused before keystone even answered
        list(fresh.list_instances())


def test_tls_and_name_failures_are_configuration() -> None:
    assert not is_transient(ssl.SSLError("certificate verify failed"))
    assert not is_transient(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(TimeoutError("timed out"))


# ---------------------------------------------------------------- 9: metadata merge


def test_set_and_remove_tags_keep_what_another_writer_set(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, _ = cloud
    server = fake.seed_server("m-1", b"x" * 4096, FLAVOR, {"role": "vcu"})
    tagger, operator = make_compute(), make_compute()
    real = type(tagger)._node
    raced: list[str] = []

    def node_then_race(self: Any, instance_id: str) -> Any:
        found = real(self, instance_id)
        if self is tagger and not raced:  # the operator writes between the read and the write
            raced.append(instance_id)
            operator.set_tags(instance_id, {"backup": "none"})
        return found

    monkeypatch.setattr(type(tagger), "_node", node_then_race)
    tags = tagger.set_tags(server, {"owner": "nfv"})
    assert tags == Tags({"role": "vcu", "owner": "nfv", "backup": "none"})
    raced.clear()
    operator_keys = tagger.remove_tags(server, ["owner", "absent"])
    assert operator_keys == Tags({"role": "vcu", "backup": "none"})
    assert fake.counts["PUT /compute/v2.1/servers/{id}/metadata"] == 0


# ---------------------------------------------------------------- 11: keyset paging


def test_a_server_deleted_between_pages_does_not_hide_another(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    fake.settle_polls = 0
    ids = sorted(fake.seed_server(f"p{i}", b"x" * 4096, FLAVOR, {}) for i in range(3))
    compute = make_compute()
    first = compute.list_instances_page(page_size=1)
    assert [i.id for i in first.instances] == [ids[0]]
    compute.terminate(ids[0])
    second = compute.list_instances_page(page_size=1, page_token=first.next_token)
    assert [i.id for i in second.instances] == [ids[1]]
    third = compute.list_instances_page(page_size=1, page_token=second.next_token)
    assert [i.id for i in third.instances] == [ids[2]] and third.next_token is None


# ---------------------------------------------------------------- 12: waits


def test_polls_back_off_and_the_timeout_grows_with_the_size(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = make_compute(
        poll_interval=1.0, max_poll_interval=10.0, wait_timeout=60, wait_per_gib=30
    )
    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(compute_module.time, "sleep", sleep)
    monkeypatch.setattr(compute_module.time, "monotonic", lambda: clock[0])
    with pytest.raises(ComputeError, match=r"after 360 s"):
        compute._wait("volume v", lambda: "creating", "available", gib=10)
    assert slept[0] == 1.0 and slept[1] == 1.5 and max(slept) == 10.0
    assert 359 <= sum(slept) <= 360
    assert len(slept) < 60  # not ~3000 GETs


# ---------------------------------------------------------------- 15: catalog endpoints


def test_a_plain_http_catalog_endpoint_is_refused(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = make_compute()
    # the fake's catalog is on 127.0.0.1: taken here for a remote host
    monkeypatch.setattr(compute_module, "is_loopback", lambda host: False)
    with pytest.raises(ConfigError, match="plain http"):
        list(compute.list_instances())


# ---------------------------------------------------------------- 5: flavors by name


def test_the_function_carries_the_flavor_name_and_the_boot_properties() -> None:
    assert format_function("m1.small", {}) == "m1.small"
    text = format_function("m1.small", {"hw_firmware_type": "uefi", "other": "x"})
    assert text == "m1.small?hw_firmware_type=uefi"
    assert parse_function(text) == ("m1.small", {"hw_firmware_type": "uefi"})
    assert parse_function("2") == ("2", {})


def test_a_copy_resolves_its_flavor_by_name_in_another_cloud(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    # another cloud: other ids, and "2" is a big flavor here
    fake.flavors = {
        "2": ("m1.xlarge", 8, 16384, 160),
        "a7": ("m1.small", 1, 2048, 20),
        "b9": ("m1.medium", 2, 4096, 40),
    }
    compute = make_compute(flavor="m1.medium")
    by_name = LaunchSpec(name="x", function="m1.small?hw_disk_bus=scsi")
    assert compute._flavor_for(by_name) == "a7"
    # an id of another cloud is never taken for one here: the region's flavor
    assert compute._flavor_for(LaunchSpec(name="x", function="2")) == "b9"
    assert compute._flavor_for(LaunchSpec(name="x", function="t3.micro")) == "b9"
    lonely = make_compute(flavor="m8.none")
    with pytest.raises(ComputeError, match=r"'m9\.huge'.*'m8\.none'"):
        lonely._flavor_for(LaunchSpec(name="x", function="m9.huge"))
    with pytest.raises(ComputeError, match="sets no flavor"):
        make_compute()._flavor_for(LaunchSpec(name="x", function="m9.huge"))


# ---------------------------------------------------------------- 14: scratch files


def test_restore_writes_in_scratch_dir_and_sweeps_dead_owners_files(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    left = scratch / f"{SCRATCH_PREFIX}{dead_token()}-0123abcd-0"
    left.write_bytes(b"PLAINTEXT-RESTORED-DATA")
    mine = scratch / f"{SCRATCH_PREFIX}{ProcessIdentity.current().token()}-0123abcd-0"
    mine.write_bytes(b"a live process's")
    compute = make_compute(scratch_dir=str(scratch))
    spec = LaunchSpec(name="r", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    assert not left.exists() and mine.exists()
    (path,) = [p for p in scratch.iterdir() if p != mine]
    assert path.name.startswith(SCRATCH_PREFIX + compute.token)
    assert path.stat().st_mode & 0o077 == 0
    sink.discard()
    assert list(scratch.iterdir()) == [mine]


def test_scratch_dir_must_be_absolute(make_compute: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="scratch_dir"):
        make_compute(scratch_dir="relative/dir")


# ---------------------------------------------------------------- 2: the sweep


def test_the_sweep_removes_a_dead_owners_temporaries_only(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute()
    dead = dead_token()
    # what a killed restore left: an image marked with its dead owner
    for owner in (dead, compute.token):
        body = {
            "name": f"rv-restore-{owner}-0123abcd-0",
            "disk_format": "raw",
            "container_format": "bare",
            OWNER_KEY: owner,
            PURPOSE_KEY: "restore",
        }
        compute._glance("/v2/images", method="POST", data=body)
    removed = compute.sweep()
    assert len([r for r in removed if r.startswith("image ")]) == 1
    assert [i["name"] for i in fake.images()] == [f"rv-restore-{compute.token}-0123abcd-0"]


def test_the_sweep_removes_a_dead_owners_half_launched_server(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute()
    data = _image(5)
    spec = LaunchSpec(name="half", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(data))
    sink.write(0, data)
    sink.commit()
    (image_id,) = sink.image_ids
    mapping = [
        {
            "source_type": "image",
            "uuid": image_id,
            "destination_type": "volume",
            "volume_size": 1,
            "boot_index": 0,
            "delete_on_termination": True,
        }
    ]
    for owner in (dead_token(), compute.token):
        compute._nova(
            "/servers",
            method="POST",
            data={
                "server": {
                    "name": f"half-{owner[:12]}",
                    "flavorRef": "2",
                    "block_device_mapping_v2": mapping,
                    "metadata": {OWNER_KEY: owner, PURPOSE_KEY: "launch"},
                }
            },
        )
    assert {i.name for i in compute.list_instances()} == set()  # never listed, never tagged
    removed = compute.sweep()
    assert len([r for r in removed if r.startswith("server ")]) == 1
    fake.settle()
    assert [s["name"] for s in fake.servers()] == [f"half-{compute.token[:12]}"]


# ---------------------------------------------------------------- 1: encrypted volumes


def test_an_encrypted_volume_is_refused_naming_it(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    server = fake.seed_server("enc-1", _image(1), FLAVOR, {"backup": "1-7"}, encrypted=True)
    (volume,) = [s["volume"] for s in fake.servers() if s["id"] == server]
    compute = make_compute()
    with pytest.raises(ComputeError, match=rf"{volume}.*encrypted") as caught:
        compute.capture(server)
    assert not isinstance(caught.value, TransientError)
    assert fake.snapshots() == [] and len(fake.volumes()) == 1


# ---------------------------------------------------------------- 7: every volume


@pytest.mark.parametrize("data_first", [False, True])
def test_every_volume_is_a_disk_the_boot_volume_first(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], data_first: bool
) -> None:
    fake, _ = cloud
    root, data = _image(1), _image(2, MiB) + b"tail"
    server = fake.seed_server(
        "multi", root, FLAVOR, {"backup": "1-7"}, data_volumes=[data], data_first=data_first
    )
    compute = make_compute()
    with compute.capture(server) as capture:
        assert len(capture.disks) == 2
        boot, extra = capture.disks
        assert boot.offset == 0 and boot.size == len(root) and boot.name == "/dev/vda"
        assert extra.offset % 4096 == 0 and extra.size == len(data)
        image = bytearray(capture.size)
        for offset, chunk in capture.blocks():
            image[offset : offset + len(chunk)] = chunk
    assert bytes(image[: len(root)]) == root
    assert bytes(image[extra.offset : extra.end]) == data
    fake.settle()
    assert fake.snapshots() == [] and len(fake.volumes()) == 2


def test_an_image_booted_server_is_refused_not_half_captured(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    server = fake.seed_server("ephemeral", _image(3), FLAVOR, {}, boot_from_volume=False)
    compute = make_compute()
    with pytest.raises(ComputeError, match="local disk"):
        compute.capture(server)
    assert fake.snapshots() == []


# ---------------------------------------------------------------- 6: boot from volume


def test_a_restore_boots_from_a_volume_even_on_a_zero_disk_flavor(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    fake.flavors["z1"] = ("bfv.small", 1, 2048, 0)
    compute = make_compute()
    data = _image(6)
    spec = LaunchSpec(name="bfv", tags=Tags({"backup": "1-7"}), function="bfv.small")
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(data))
    sink.write(0, data)
    sink.commit()
    launched = compute.launch(spec, sink)
    (server,) = [s for s in fake.servers() if s["id"] == launched.id]
    assert launched.extra["image"] is None and server["volume"] is not None
    assert fake.volume_bytes(launched.id)[: len(data)] == data
    with compute.capture(launched.id) as capture:  # and it can be backed up in turn
        assert dict(capture.read_ranges([(0, 4096)])) == {0: data[:4096]}


# ---------------------------------------------------------------- 3: lost answers


@pytest.mark.parametrize("path", [r"/snapshots$", r"/volumes$", r"/volumes/[^/]+/action$"])
def test_a_create_whose_answer_was_lost_is_found_and_removed(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], path: str
) -> None:
    fake, _ = cloud
    server = fake.seed_server("lost-1", _image(3), FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    fake.fail_next("POST", path, 503, after=True)
    with pytest.raises(TransientError):
        compute.capture(server)
    fake.settle()
    assert fake.snapshots() == [] and len(fake.volumes()) == 1
    assert [i["name"] for i in fake.images() if i["name"].startswith("rv-")] == []


@pytest.mark.parametrize("after", [True, False])
def test_a_boot_whose_answer_was_lost_leaves_no_server(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], after: bool
) -> None:
    fake, _ = cloud
    compute = make_compute()
    data = _image(8)
    spec = LaunchSpec(name="vcu-restored", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(data))
    sink.write(0, data)
    sink.commit()
    fake.fail_next("POST", r"/servers$", 503, after=after)
    with pytest.raises(TransientError):
        compute.launch(spec, sink)
    fake.settle()
    assert fake.servers() == [] and fake.volumes() == []
    assert [i["name"] for i in fake.images() if i["name"].startswith("rv-")] == []


# ---------------------------------------------------------------- 13: Range ignored


def test_a_store_that_ignores_range_fails_the_read_naming_it(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    server = fake.seed_server("range-1", _image(4), FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    fake.ignore_range = True
    with pytest.raises(ComputeError, match="Range"), compute.capture(server) as capture:
        dict(capture.blocks())
    fake.settle()
    assert fake.snapshots() == [] and len(fake.volumes()) == 1


# ---------------------------------------------------------------- 16: image properties


def test_the_boot_volumes_hw_properties_reach_the_restore_image(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    properties = {"hw_firmware_type": "uefi", "hw_disk_bus": "scsi", "os_type": "linux"}
    server = fake.seed_server(
        "uefi-1", _image(2), FLAVOR, {}, image_properties={**properties, "owner_note": "x"}
    )
    compute = make_compute()
    instance = compute.get_instance(server)
    assert instance.function == "m1.small?hw_disk_bus=scsi&hw_firmware_type=uefi&os_type=linux"
    listed = [i for i in compute.list_instances() if i.id == server]
    assert listed[0].function == instance.function
    # the point records only the function: a spec without a source
    spec = LaunchSpec(name="uefi-restored", tags=Tags({}), function=instance.function)
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    sink.write(0, b"u" * 4096)
    sink.commit()
    (image,) = [i for i in fake.images() if i["id"] == sink.image_ids[0]]
    assert {k: image["properties"].get(k) for k in properties} == properties
    sink.discard()


# ---------------------------------------------------------------- 10: deletes waited for


def test_a_delete_that_fails_is_logged_and_retried_by_the_next_sweep(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    fake, _ = cloud
    server = fake.seed_server("del-1", _image(5), FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    fake.fail_next("DELETE", r"/snapshots/[^/]+$", 500)
    with caplog.at_level("WARNING"), compute.capture(server) as capture:
        dict(capture.read_ranges([(0, 4096)]))
    (left,) = fake.snapshots()
    assert left["id"] in caplog.text and "next sweep" in caplog.text
    # the volume made from it was gone first: the snapshot is not busy, only refused once
    assert len(fake.volumes()) == 1
    assert f"snapshot {left['id']}" in compute.sweep()
    assert fake.snapshots() == []


def test_a_restore_of_several_disks_launches_a_server_with_each_disk(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], tmp_path: Path
) -> None:
    """Each disk becomes an image of its own and one block_device_mapping_v2 row each (the
    boot disk first): the server boots with every disk, each holding its bytes, and the
    restore images are gone once it runs."""
    from regionvault.core.types import Disk

    fake, _ = cloud
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    compute = make_compute(scratch_dir=str(scratch))
    disks = [Disk("/dev/vda", 0, MiB), Disk("/dev/vdb", MiB, MiB)]
    spec = LaunchSpec(name="two", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=2 * MiB, disks=disks)
    sink.write(0, b"a" * 4096)
    sink.write(MiB, b"b" * 4096)
    sink.commit()
    assert len(sink.image_ids) == 2
    assert [fake.image_bytes(i)[:4096] for i in sink.image_ids] == [b"a" * 4096, b"b" * 4096]
    assert list(scratch.iterdir()) == []
    launched = compute.launch(spec, sink)
    (server,) = [s for s in fake.servers() if s["id"] == launched.id]
    assert server["status"] == "ACTIVE" and server["metadata"] == {"backup": "1-7"}
    attached = sorted((v["device"], v["id"]) for v in fake.volumes() if v["server"] == launched.id)
    assert [d for d, _ in attached] == ["/dev/vda", "/dev/vdb"]
    assert [fake.volume_bytes(v)[:4096] for _, v in attached] == [b"a" * 4096, b"b" * 4096]
    # the launched server is itself a server the provider can back up, disk by disk
    with compute.capture(launched.id) as capture:
        assert [d.name for d in capture.disks] == ["/dev/vda", "/dev/vdb"]
    fake.settle()
    assert [i for i in fake.images() if i["name"].startswith("rv-")] == []


def test_a_refused_boot_of_several_disks_leaves_nothing(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], tmp_path: Path
) -> None:
    from regionvault.core.types import Disk

    fake, _ = cloud
    compute = make_compute(scratch_dir=str(tmp_path))
    disks = [Disk("/dev/vda", 0, MiB), Disk("/dev/vdb", MiB, MiB)]
    spec = LaunchSpec(name="two", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=2 * MiB, disks=disks)
    sink.write(0, b"a" * 4096)
    sink.write(MiB, b"b" * 4096)
    sink.commit()
    fake.fail_next_boot()
    with pytest.raises(ComputeError):
        compute.launch(spec, sink)
    fake.settle()
    assert fake.servers() == [] and fake.volumes() == []
    assert [i for i in fake.images() if i["name"].startswith("rv-")] == []


def test_a_look_that_fails_once_does_not_undo_a_boot(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute()
    data = _image(8)
    spec = LaunchSpec(name="vcu-restored", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(data))
    sink.write(0, data)
    sink.commit()
    # the first look at the booting server is answered 503 (p6: a lost GET after the POST)
    fake.fail_next("GET", r"/servers/[0-9a-f-]{36}$", 503, after=True)
    launched = compute.launch(spec, sink)
    (server,) = fake.servers()
    assert server["id"] == launched.id and server["metadata"] == {"backup": "1-7"}


def test_looks_that_keep_failing_end_the_wait(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = make_compute()
    monkeypatch.setattr(compute_module.time, "sleep", lambda s: None)
    looks: list[int] = []

    def down() -> str:
        looks.append(1)
        raise TransientError("503", provider="openstack")

    with pytest.raises(TransientError):
        compute._wait("volume v", down, "available")
    assert len(looks) == compute_module.POLL_RETRIES + 1
