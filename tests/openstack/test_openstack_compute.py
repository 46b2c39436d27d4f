"""The openstack provider's Compute through libcloud's unmodified OpenStack_2_NodeDriver,
against the provider's own wire-level fake over HTTP on 127.0.0.1: settings, servers listed
by metadata, metadata set and removed, a block capture through a volume snapshot uploaded to
a glance image and read in ranges (its temporaries gone on close), a restore booting the
original flavor with the original metadata, and a failed restore leaving nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from openstack_world import FLAVOR, PASSWORD_ENV, build_region, region_settings
from regionvault.core.errors import (
    ComputeError,
    ConfigError,
    InstanceNotFound,
    RegionVaultError,
    UnsupportedOperation,
)
from regionvault.core.types import CaptureKind, LaunchSpec, Tags

MiB = 1 << 20


def _image(seed: int, size: int = 2 * MiB) -> bytes:
    block = bytes((seed + i) % 251 for i in range(4096))
    data = bytearray(block * (size // 4096))
    data[MiB : MiB + 4096] = bytes(4096)  # a hole
    return bytes(data)


def test_settings_are_checked_and_the_password_is_never_in_the_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "http://127.0.0.1:1"
    with pytest.raises(ConfigError, match="auth_url"):
        build_region(region_settings("http://keystone.example.com:5000"))
    with pytest.raises(ConfigError, match="password"):
        build_region(region_settings(url, password="x"))
    settings = region_settings(url)
    del settings["password_env"]
    with pytest.raises(ConfigError, match="password_env"):
        build_region(settings)
    provider, region = build_region(region_settings(url))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        provider.compute(region.for_service("compute"))
    https = provider.settings(build_region(region_settings("https://ks.example.com"))[1])
    assert https.secure and not provider.settings(region).secure


def test_other_services_are_unsupported() -> None:
    provider, region = build_region(region_settings("http://127.0.0.1:1"))
    for build in (provider.key_service, provider.vault, provider.sealer):
        with pytest.raises(UnsupportedOperation, match="compute only"):
            build(region)
    with pytest.raises(UnsupportedOperation, match="transit"):
        provider.transit(region, region)


def test_servers_are_listed_by_metadata_and_tagged(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    a = fake.seed_server("vcu-1", _image(1), FLAVOR, {"backup": "1-7", "role": "vcu"})
    b = fake.seed_server("vdu-1", _image(2), FLAVOR, {"role": "vdu"})
    compute = make_compute()
    assert {i.id for i in compute.list_instances()} >= {a, b}
    assert [i.id for i in compute.list_instances(tag_filters={"backup": None})] == [a]
    assert [i.id for i in compute.list_instances(tag_filters={"role": "vdu"})] == [b]
    pages = [i.id for i in compute.list_instances(page_size=1)]
    assert sorted(pages) == sorted({a, b}) and len(pages) == 2
    assert compute.set_tags(b, {"backup": "1-3"}) == Tags({"backup": "1-3", "role": "vdu"})
    assert compute.remove_tags(a, ["role", "absent"]) == Tags({"backup": "1-7"})
    instance = compute.get_instance(a)
    assert instance.tags == Tags({"backup": "1-7"}) and instance.name == "vcu-1"
    assert instance.capture_kinds == frozenset({CaptureKind.BLOCKS})
    with pytest.raises(InstanceNotFound):
        compute.get_instance("no-such-server")


def test_capture_reads_the_volume_through_a_snapshot_image_and_cleans_up(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    data = _image(7)
    server = fake.seed_server("core-1", data, FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    with compute.capture(server) as capture:
        assert capture.size == len(data)
        image_id = capture.image_id
        assert fake.image_bytes(image_id) == data
        read = bytearray(capture.size)
        for offset, chunk in capture.blocks():
            read[offset : offset + len(chunk)] = chunk
        assert bytes(read) == data
        assert dict(capture.read_ranges([(4096, 8192)])) == {4096: data[4096:12288]}
    with pytest.raises(KeyError):
        fake.image_bytes(image_id)
    assert [s for s in fake.servers() if s["id"] == server]
    assert fake.snapshots() == [] and len(fake.volumes()) == 1
    assert len(fake.images()) == 1  # the seeded server's own


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", r"/snapshots$"),
        ("POST", r"/volumes$"),
        ("POST", r"/volumes/[^/]+/action$"),
        ("GET", r"/v2/images/[^/]+/file$"),
    ],
)
def test_a_failed_capture_leaves_no_temporaries(
    cloud: tuple[Any, str], make_compute: Callable[..., Any], method: str, path: str
) -> None:
    fake, _ = cloud
    server = fake.seed_server("core-2", _image(3), FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    fake.fail_next(method, path, 500)
    with pytest.raises(RegionVaultError), compute.capture(server) as capture:
        dict(capture.blocks())
    assert fake.snapshots() == [] and len(fake.volumes()) == 1 and len(fake.images()) == 1
    with compute.capture(server) as capture:  # the next one works
        assert capture.size == len(_image(3))


def test_restore_boots_the_original_flavor_with_the_original_metadata(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    data = _image(9)
    source_id = fake.seed_server("ims-1", data, FLAVOR, {"backup": "1-7", "role": "ims"})
    compute = make_compute()
    source = compute.get_instance(source_id)
    spec = LaunchSpec(name="ims-1-restored", tags=source.tags, source=source)
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=len(data))
    for offset in range(0, len(data), MiB):
        sink.write(offset, data[offset : offset + MiB])
    sink.commit()
    launched = compute.launch(spec, sink)
    assert launched.tags == source.tags and launched.extra["flavor"] == source.extra["flavor"]
    # booted from a volume made of the restored image (the image goes once it runs)
    assert launched.extra["image"] is None
    assert fake.volume_bytes(launched.id)[: len(data)] == data
    assert sink.image_ids[0] not in {i["id"] for i in fake.images()}
    with compute.capture(launched.id) as capture:
        assert dict(capture.read_ranges([(0, 4096)])) == {0: data[:4096]}
    compute.terminate(launched.id)
    with pytest.raises(InstanceNotFound):
        compute.get_instance(launched.id)
    assert source_id in {i.id for i in compute.list_instances()}
    assert datetime.now(UTC) > capture.taken_at


def test_a_failed_restore_removes_what_it_made(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute()
    before = {s["id"] for s in fake.servers()}
    spec = LaunchSpec(name="doomed", tags=Tags({"backup": "1-7"}), extra={"flavor": "no-such"})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    sink.write(0, b"x" * 4096)
    sink.commit()
    (image_id,) = sink.image_ids
    assert fake.image_bytes(image_id)[:4096] == b"x" * 4096
    with pytest.raises(RegionVaultError):
        compute.launch(spec, sink)
    with pytest.raises(KeyError):
        fake.image_bytes(image_id)
    assert {s["id"] for s in fake.servers()} == before and fake.volumes() == []
    with pytest.raises(ComputeError):
        compute.launch(spec, sink)


def test_an_upload_that_glance_kills_fails_the_capture_cleanly(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    server = fake.seed_server("core-3", _image(4), FLAVOR, {"backup": "1-7"})
    compute = make_compute()
    fake.fail_next_upload()
    with pytest.raises(ComputeError, match="killed"):
        compute.capture(server)
    assert fake.snapshots() == [] and len(fake.volumes()) == 1 and len(fake.images()) == 1


def test_a_boot_ending_in_error_removes_the_server_and_the_image(
    cloud: tuple[Any, str], make_compute: Callable[..., Any]
) -> None:
    fake, _ = cloud
    compute = make_compute()
    spec = LaunchSpec(name="unlucky", tags=Tags({"backup": "1-7"}), extra={"flavor": FLAVOR})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=MiB)
    sink.write(0, b"y" * 4096)
    sink.commit()
    (image_id,) = sink.image_ids
    fake.fail_next_boot("No valid host was found.")
    with pytest.raises(ComputeError, match="ERROR: No valid host was found"):
        compute.launch(spec, sink)
    assert fake.servers() == [] and fake.volumes() == []
    with pytest.raises(KeyError):
        fake.image_bytes(image_id)
