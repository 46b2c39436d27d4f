"""The OpenStack fake, through libcloud's unmodified OpenStack_2_NodeDriver over HTTP on
127.0.0.1: keystone, nova, glance and cinder as the openstack provider uses them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError
from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver
from regionvault.providers.openstack.fakes.cloud import OpenStackFake


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[OpenStackFake]:
    with OpenStackFake(tmp_path / "cloud") as fake:
        yield fake


def driver(fake: OpenStackFake, password: str | None = None) -> Any:
    return OpenStack_2_NodeDriver(
        fake.username,
        fake.password if password is None else password,
        api_version="2.0",
        ex_force_auth_url=fake.auth_url,
        ex_force_auth_version="3.x_password",
        ex_force_service_region=fake.region,
        ex_tenant_name=fake.project,
        ex_domain_name="Default",
        secure=False,
    )


def boot_volume(image_id: str, gib: int, delete: bool = True) -> list[dict[str, Any]]:
    """A block_device_mapping_v2 that boots from a new volume made from the image."""
    return [
        {
            "source_type": "image",
            "uuid": image_id,
            "destination_type": "volume",
            "volume_size": gib,
            "boot_index": 0,
            "delete_on_termination": delete,
        }
    ]


def upload_image(drv: Any, volume_id: str, name: str) -> str:
    answer = (
        drv._get_volume_connection()
        .request(
            f"/volumes/{volume_id}/action",
            method="POST",
            data={
                "os-volume_upload_image": {
                    "image_name": name,
                    "force": True,
                    "disk_format": "raw",
                    "container_format": "bare",
                }
            },
        )
        .object
    )
    return str(answer["os-volume_upload_image"]["image_id"])


def test_servers_listed_with_metadata_and_metadata_set(cloud: OpenStackFake) -> None:
    sid = cloud.seed_server("db", b"disk" * 100, "m1.small", {"backup": "1-7"})
    cloud.seed_server("web", b"w", "1", {})
    drv = driver(cloud)
    nodes = {n.name: n for n in drv.list_nodes()}
    assert set(nodes) == {"db", "web"}
    db = nodes["db"]
    assert db.id == sid
    assert db.extra["metadata"] == {"backup": "1-7"}
    assert db.extra["flavorId"] == "2"
    [attached] = db.extra["volumes_attached"]
    assert drv.ex_get_volume(attached["id"]).extra["attachments"][0]["server_id"] == sid

    assert drv.ex_set_metadata(db, {"backup": "1-30", "owner": "core"}) == {
        "backup": "1-30",
        "owner": "core",
    }
    conn = drv.connection
    conn.request(f"/servers/{sid}/metadata/owner", method="DELETE")
    assert drv.ex_get_metadata(db) == {"backup": "1-30"}
    conn.request(f"/servers/{sid}/metadata", method="POST", data={"metadata": {"x": "y"}})
    assert cloud.servers()[0]["metadata"] == {"backup": "1-30", "x": "y"}
    with pytest.raises(BaseHTTPError) as bad:
        drv.ex_set_metadata(db, {"k": "v" * 256})
    assert bad.value.code == 400


def test_server_list_pages(cloud: OpenStackFake) -> None:
    cloud.page_size = 2
    ids = {cloud.seed_server(f"s{i}", b"x") for i in range(5)}
    drv = driver(cloud)
    assert {n.id for n in drv.list_nodes()} == ids
    assert cloud.counts["GET /compute/v2.1/servers/detail"] == 3
    named = drv.connection.request("/servers/detail?name=^s[134]$").object
    assert len(named["servers"]) == 2  # a page of the 3 that match
    assert "name=" in named["servers_links"][0]["href"]  # the next page keeps the filter
    query = named["servers_links"][0]["href"].partition("?")[2]
    rest = drv.connection.request(f"/servers/detail?{query}").object
    assert {s["name"] for s in named["servers"] + rest["servers"]} == {"s1", "s3", "s4"}


def test_wrong_password_and_missing_token(cloud: OpenStackFake) -> None:
    with pytest.raises(InvalidCredsError):
        driver(cloud, password="wrong").list_nodes()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{cloud.endpoint}/compute/v2.1/servers/detail")
    assert e.value.code == 401
    e.value.close()


def test_capture_path_snapshot_upload_ranged_download_cleanup(cloud: OpenStackFake) -> None:
    cloud.settle_polls = 1  # done at the next request
    data = bytes(range(256)) * 40
    sid = cloud.seed_server("db", data, "m1.small", {"backup": "1-7"})
    drv = driver(cloud)
    node = drv.ex_get_node_details(sid)
    volume = drv.ex_get_volume(node.extra["volumes_attached"][0]["id"])
    assert volume.extra["state"] == "in-use"

    with pytest.raises(BaseHTTPError):  # an in-use volume needs force, as in cinder
        drv.create_volume_snapshot(volume, name="cap", ex_force=False)
    snap = drv.create_volume_snapshot(volume, name="cap")
    assert snap.extra["status"] == "creating"
    assert drv.ex_get_snapshot(snap.id).extra["status"] == "available"
    # the snapshot becomes a volume, that volume an image
    temp = drv.create_volume(1, "cap-volume", snapshot=snap)
    assert temp.extra["state"] == "creating"
    assert drv.ex_get_volume(temp.id).extra["state"] == "available"
    image_id = upload_image(drv, temp.id, "cap-image")
    assert [v["status"] for v in cloud.volumes() if v["id"] == temp.id] == ["uploading"]
    assert drv.get_image(image_id).extra["status"] == "active"
    assert drv.ex_get_volume(temp.id).extra["state"] == "available"
    assert drv.image_connection.request(f"/v2/images/{image_id}").object["size"] == len(data)

    glance = drv.image_connection
    got = b""
    for start in range(0, len(data), 4096):
        answer = glance.request(
            f"/v2/images/{image_id}/file",
            headers={"Range": f"bytes={start}-{start + 4095}"},
            raw=True,
        )
        assert answer.status == 206
        body = b"".join(answer.iter_content(65536))
        assert answer.headers["content-range"] == (
            f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        )
        got += body
    assert got == data == cloud.image_bytes(image_id)
    with pytest.raises(BaseHTTPError) as past:
        glance.request(f"/v2/images/{image_id}/file", headers={"Range": "bytes=99999-"})
    assert past.value.code == 416

    # the volume upload also works straight from the in-use volume (force)
    direct = upload_image(drv, volume.id, "direct")
    assert drv.get_image(direct).extra["status"] == "active"
    assert cloud.image_bytes(direct) == data

    with pytest.raises(BaseHTTPError) as attached:  # a server's volume stays
        drv.destroy_volume(volume)
    assert attached.value.code == 400
    assert drv.destroy_volume(temp)
    assert drv.destroy_volume_snapshot(snap)
    glance.request(f"/v2/images/{image_id}", method="DELETE")
    glance.request(f"/v2/images/{direct}", method="DELETE")
    assert cloud.snapshots() == []
    assert [v["server"] for v in cloud.volumes()] == [sid]
    assert [i["name"] for i in cloud.images()] == ["db-image"]
    assert sorted(p.name for p in (cloud.workdir / "images").iterdir()) == [
        i["id"] for i in cloud.images()
    ]


def test_restore_path_upload_then_boot(cloud: OpenStackFake) -> None:
    drv = driver(cloud)
    glance = drv.image_connection
    made = glance.request(
        "/v2/images",
        method="POST",
        data={"name": "restored", "disk_format": "raw", "container_format": "bare"},
    ).object
    assert made["status"] == "queued"
    # libcloud's image connection sends JSON only: the bytes go through its own HTTP
    # connection (the session it authenticated), with its headers
    headers = glance.add_default_headers({"Content-Type": "application/json"})
    glance.connection.request(
        "PUT", f"{glance.request_path}/v2/images/{made['id']}/file", body=b"x", headers=headers
    )
    assert glance.connection.getresponse().status_code == 415
    headers["Content-Type"] = "application/octet-stream"
    glance.connection.request(
        "PUT",
        f"{glance.request_path}/v2/images/{made['id']}/file",
        body=b"restored bytes",
        headers=headers,
    )
    assert glance.connection.getresponse().status_code == 204
    image = drv.get_image(made["id"])
    assert image.extra["status"] == "active"
    size = drv.ex_get_size("3")
    node = drv.create_node(
        name="back",
        size=size,
        ex_blockdevicemappings=boot_volume(image.id, 1),
        ex_metadata={"backup": "1-7"},
    )
    assert node.extra["metadata"] == {"backup": "1-7"}
    assert node.extra["flavorId"] == "3"
    [server] = cloud.servers()
    assert server["flavor_name"] == "m1.medium"
    assert cloud.volume_bytes(node.id) == b"restored bytes"

    with pytest.raises(BaseHTTPError) as bad:
        drv.create_node(
            name="x", size=drv.ex_get_size("1"), image=image, ex_metadata={"k": "v" * 256}
        )
    assert bad.value.code == 400

    cloud.fail_next("POST", r"/servers$", 500)
    with pytest.raises(BaseHTTPError) as failed:
        drv.create_node(name="y", size=size, image=image)
    assert failed.value.code == 500
    assert len(cloud.servers()) == 1

    assert drv.destroy_node(node)
    cloud.settle()  # nova deletes in the background
    assert drv.ex_get_node_details(node.id) is None
    assert cloud.servers() == [] and cloud.volumes() == []
    assert drv.delete_image(image)
    assert cloud.images() == []


def test_runs_as_a_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "regionvault.providers.openstack.fakes.cloud",
            "--workdir",
            str(tmp_path),
            "--flavor-ids",
            "uuid",
            "--settle-polls",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{endpoint}/identity/v3") as answer:
            assert json.load(answer)["version"]["id"].startswith("v3")
        fake = OpenStackFake(tmp_path / "unused")  # the process's credentials and names
        fake.endpoint = endpoint
        drv = driver(fake)
        sizes = {s.name: s.id for s in drv.list_sizes()}
        assert sizes["m1.small"] != "2"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_what_a_request_starts_goes_on_without_polls(cloud: OpenStackFake) -> None:
    sid = cloud.seed_server("db", b"d" * 1000)
    drv = driver(cloud)
    volume_id = drv.ex_get_node_details(sid).extra["volumes_attached"][0]["id"]
    image_id = upload_image(drv, volume_id, "up")
    assert {i["id"]: i["status"] for i in cloud.images()}[image_id] == "saving"
    drv.list_sizes()  # any request is a step of time
    assert [v["status"] for v in cloud.volumes()] == ["uploading"]
    assert drv.ex_get_volume(volume_id).extra["state"] == "in-use"  # the 2nd step: done
    assert cloud.image_bytes(image_id) == b"d" * 1000

    image = drv.get_image(image_id)
    node = drv.create_node(name="n", size=drv.ex_get_size("1"), image=image)
    assert node.extra["vm_state"] == "build"  # libcloud's GET after the POST
    assert drv.ex_get_node_details(node.id).state == "running"

    cloud.fail_next_boot()
    cloud.fail_next_upload()
    failed = drv.create_node(name="f", size=drv.ex_get_size("1"), image=image)
    killed = upload_image(drv, volume_id, "killed")
    cloud.settle()
    node = drv.ex_get_node_details(failed.id)
    assert node.state == "error"
    assert "No valid host" in node.extra["fault"]["message"]
    assert drv.get_image(killed).extra["status"] == "killed"
    with pytest.raises(KeyError):
        cloud.image_bytes(killed)
    assert drv.ex_get_volume(volume_id).extra["state"] == "in-use"
    assert drv.destroy_node(node)
    assert drv.delete_image(drv.get_image(killed))


def test_streamed_upload_and_metadata_quota(cloud: OpenStackFake) -> None:
    drv = driver(cloud)
    glance = drv.image_connection
    made = glance.request(
        "/v2/images",
        method="POST",
        data={"name": "s", "disk_format": "raw", "container_format": "bare"},
    ).object
    headers = glance.add_default_headers({"Content-Type": "application/octet-stream"})
    glance.connection.request(
        "PUT",
        f"{glance.request_path}/v2/images/{made['id']}/file",
        body=(bytes([i]) * 1000 for i in range(50)),  # a generator: sent chunked
        headers=headers,
    )
    assert glance.connection.getresponse().status_code == 204
    assert cloud.image_bytes(made["id"]) == b"".join(bytes([i]) * 1000 for i in range(50))
    glance.connection.request(
        "PUT", f"{glance.request_path}/v2/images/{made['id']}/file", body=b"x", headers=headers
    )
    assert glance.connection.getresponse().status_code == 409  # active: no second upload

    sid = cloud.seed_server("m", b"m", metadata={f"k{i}": "v" for i in range(128)})
    with pytest.raises(BaseHTTPError) as over:
        drv.connection.request(
            f"/servers/{sid}/metadata", method="POST", data={"metadata": {"one": "more"}}
        )
    assert over.value.code == 403


def test_range_forms(cloud: OpenStackFake) -> None:
    data = bytes(range(100))
    sid = cloud.seed_server("r", data)
    image_id = next(s["image"] for s in cloud.servers() if s["id"] == sid)
    glance = driver(cloud).image_connection

    def get(range_header: str | None) -> tuple[int, bytes, str | None]:
        headers = {"Range": range_header} if range_header else {}
        answer = glance.request(f"/v2/images/{image_id}/file", headers=headers, raw=True)
        return (
            answer.status,
            b"".join(answer.iter_content(4096)),
            answer.headers.get("content-range"),
        )

    assert get(None) == (200, data, None)
    assert get("bytes=90-") == (206, data[90:], "bytes 90-99/100")
    assert get("bytes=-5") == (206, data[95:], "bytes 95-99/100")
    assert get("bytes=98-1000") == (206, data[98:], "bytes 98-99/100")
    for bad, code in (("bytes=100-", 416), ("bytes=5-2", 416), ("items=0-1", 400)):
        assert get(bad)[0] == code, bad


def test_stop_closes_the_connections_already_open(tmp_path: Path) -> None:
    fake = OpenStackFake(tmp_path / "cloud")
    fake.start()
    fake.seed_server("s", b"s")
    drv = driver(fake)
    assert [n.name for n in drv.list_nodes()] == ["s"]  # a keep-alive connection is open
    fake.stop()
    with pytest.raises(requests.exceptions.ConnectionError):  # no answer: the cloud is down
        drv.list_nodes()


def test_an_answer_lost_after_the_request_was_done(cloud: OpenStackFake) -> None:
    sid = cloud.seed_server("db", b"d" * 100)
    drv = driver(cloud)
    volume_id = drv.ex_get_node_details(sid).extra["volumes_attached"][0]["id"]
    cloud.fail_next("POST", r"/snapshots$", 503, after=True)
    with pytest.raises(BaseHTTPError) as lost:
        drv._get_volume_connection().request(
            "/snapshots",
            method="POST",
            data={"snapshot": {"volume_id": volume_id, "name": "lost", "force": True}},
        )
    assert lost.value.code == 503
    assert [s["name"] for s in cloud.snapshots()] == ["lost"]  # made all the same
    assert cloud.counts["POST /volume/v3/{id}/snapshots"] == 1
    cloud.fail_next("DELETE", r"/snapshots/", 500)  # before: not done
    snap_id = cloud.snapshots()[0]["id"]
    cloud.settle()
    with pytest.raises(BaseHTTPError):
        drv._get_volume_connection().request(f"/snapshots/{snap_id}", method="DELETE")
    assert [s["id"] for s in cloud.snapshots()] == [snap_id]


def test_a_store_that_ignores_range(cloud: OpenStackFake) -> None:
    data = bytes(range(200))
    sid = cloud.seed_server("r", data)
    image_id = next(s["image"] for s in cloud.servers() if s["id"] == sid)
    glance = driver(cloud).image_connection
    cloud.ignore_range = True
    answer = glance.request(
        f"/v2/images/{image_id}/file", headers={"Range": "bytes=10-19"}, raw=True
    )
    assert answer.status == 200
    assert b"".join(answer.iter_content(4096)) == data
    assert "content-range" not in answer.headers


def make_image(drv: Any, data: bytes, **properties: Any) -> str:
    """A glance image holding ``data``, with ``properties``; its id."""
    glance = drv.image_connection
    made = glance.request(
        "/v2/images",
        method="POST",
        data={"name": "img", "disk_format": "raw", "container_format": "bare", **properties},
    ).object
    headers = glance.add_default_headers({"Content-Type": "application/octet-stream"})
    glance.connection.request(
        "PUT", f"{glance.request_path}/v2/images/{made['id']}/file", body=data, headers=headers
    )
    assert glance.connection.getresponse().status_code == 204
    return str(made["id"])


def cinder(drv: Any, path: str, method: str = "GET", data: Any = None) -> Any:
    return drv._get_volume_connection().request(path, method=method, data=data).object


def test_boots_from_a_volume_or_from_the_image_as_nova(tmp_path: Path) -> None:
    flavors = {"10": ("bfv.small", 1, 2048, 0), "11": ("disk.small", 1, 2048, 1)}
    with OpenStackFake(tmp_path / "cloud", flavors=flavors) as cloud:
        cloud.settle_polls = 0
        drv = driver(cloud)
        image_id = make_image(drv, b"root" * 1000, hw_firmware_type="uefi", os_type="linux")
        image = drv.get_image(image_id)

        # imageRef without a block device mapping: on the hypervisor's disk, no volume
        node = drv.create_node(name="eph", size=drv.ex_get_size("11"), image=image)
        got = drv.connection.request(f"/servers/{node.id}").object["server"]
        assert got["image"]["id"] == image_id
        assert got["os-extended-volumes:volumes_attached"] == []
        assert cloud.volumes() == []
        assert drv.ex_get_node_details(node.id).extra["imageId"] == image_id
        with pytest.raises(KeyError):
            cloud.volume_bytes(node.id)
        # a zero-disk flavor boots from volumes only
        with pytest.raises(BaseHTTPError) as zero:
            drv.create_node(name="z", size=drv.ex_get_size("10"), image=image)
        assert zero.value.code == 403
        assert "zero disk" in str(zero.value)
        # a flavor disk smaller than the image
        cloud._images[image_id].size = 2 << 30  # as if the image were 2 GiB
        with pytest.raises(BaseHTTPError) as small:
            drv.create_node(name="s", size=drv.ex_get_size("11"), image=image)
        assert small.value.code == 400
        assert "Flavor's disk is too small" in str(small.value)
        with pytest.raises(BaseHTTPError) as short:  # nor can a 1 GiB volume hold it
            drv.create_node(
                name="s",
                size=drv.ex_get_size("10"),
                ex_blockdevicemappings=boot_volume(image_id, 1),
            )
        assert short.value.code == 400
        cloud._images[image_id].size = 4000
        with pytest.raises(BaseHTTPError) as neither:  # no image, no mapping
            drv.create_node(name="n", size=drv.ex_get_size("10"))
        assert neither.value.code == 400
        with pytest.raises(BaseHTTPError) as sizeless:
            drv.create_node(
                name="n",
                size=drv.ex_get_size("10"),
                ex_blockdevicemappings=boot_volume(image_id, 0),
            )
        assert sizeless.value.code == 400

        # a block device mapping: a new bootable volume from the image, the server's image ""
        bfv = drv.create_node(
            name="bfv", size=drv.ex_get_size("10"), ex_blockdevicemappings=boot_volume(image_id, 3)
        )
        got = drv.connection.request(f"/servers/{bfv.id}").object["server"]
        assert got["image"] == ""
        [attached] = got["os-extended-volumes:volumes_attached"]
        assert attached["delete_on_termination"] is True
        volume = cinder(drv, f"/volumes/{attached['id']}")["volume"]
        assert (volume["bootable"], volume["size"], volume["status"]) == ("true", 3, "in-use")
        assert volume["attachments"][0]["device"] == "/dev/vda"
        meta = volume["volume_image_metadata"]
        assert meta["image_id"] == image_id
        assert (meta["hw_firmware_type"], meta["os_type"]) == ("uefi", "linux")
        assert cloud.volume_bytes(bfv.id) == b"root" * 1000

        # without delete_on_termination the volume stays, detached
        kept = drv.create_node(
            name="kept",
            size=drv.ex_get_size("10"),
            ex_blockdevicemappings=boot_volume(image_id, 1, delete=False),
        )
        kept_volume = next(s["volume"] for s in cloud.servers() if s["id"] == kept.id)
        for n in (node, bfv, kept):
            assert drv.destroy_node(n)
        assert [(v["id"], v["status"], v["server"]) for v in cloud.volumes()] == [
            (kept_volume, "available", None)
        ]


def test_servers_with_several_volumes_and_encrypted_ones(cloud: OpenStackFake) -> None:
    cloud.settle_polls = 0
    sid = cloud.seed_server(
        "multi", b"root", data_volumes=[b"data-1", b"data-2"], data_first=True, encrypted=True
    )
    drv = driver(cloud)
    server = drv.connection.request(f"/servers/{sid}").object["server"]
    assert server["image"] == ""  # booted from its volume
    order = [a["id"] for a in server["os-extended-volumes:volumes_attached"]]
    [root] = [s["volume"] for s in cloud.servers()]
    assert order[-1] == root and len(order) == 3  # the data volumes listed first
    volumes = {v: cinder(drv, f"/volumes/{v}")["volume"] for v in order}
    assert [volumes[v]["bootable"] for v in order] == ["false", "false", "true"]
    assert [volumes[v]["attachments"][0]["device"] for v in order] == [
        "/dev/vdb",
        "/dev/vdc",
        "/dev/vda",
    ]
    assert all(v["encrypted"] is True for v in volumes.values())
    assert [cloud.volume_bytes(v) for v in order] == [b"data-1", b"data-2", b"root"]
    attachments = drv.connection.request(f"/servers/{sid}/os-volume_attachments").object
    assert [a["volumeId"] for a in attachments["volumeAttachments"]] == order
    # an encrypted volume's image is ciphertext whose key goes with the image
    image_id = upload_image(drv, root, "enc")
    props = (
        cloud.image_bytes(image_id)
        and drv.image_connection.request(f"/v2/images/{image_id}").object
    )
    assert props["cinder_encryption_key_deletion_policy"] == "on_image_deletion"
    assert props["cinder_encryption_key_id"]

    plain = cloud.seed_server("plain", b"p", data_volumes=[b"d"])
    server = drv.connection.request(f"/servers/{plain}").object["server"]
    first, second = (a["id"] for a in server["os-extended-volumes:volumes_attached"])
    assert cinder(drv, f"/volumes/{first}")["volume"]["bootable"] == "true"  # root first
    assert cinder(drv, f"/volumes/{second}")["volume"]["encrypted"] is False

    local = cloud.seed_server("local", b"l", boot_from_volume=False, data_volumes=[b"d"])
    server = drv.connection.request(f"/servers/{local}").object["server"]
    assert server["image"]["id"]
    [data] = server["os-extended-volumes:volumes_attached"]
    assert cinder(drv, f"/volumes/{data['id']}")["volume"]["bootable"] == "false"


def test_metadata_on_volumes_and_snapshots_and_image_properties(cloud: OpenStackFake) -> None:
    cloud.settle_polls = 0
    sid = cloud.seed_server("db", b"d" * 10, image_properties={"hw_disk_bus": "scsi"})
    drv = driver(cloud)
    root = cloud.servers()[0]["volume"]
    owner = {"rv-owner": "host:123:abc"}
    snap = cinder(
        drv,
        "/snapshots",
        "POST",
        {"snapshot": {"volume_id": root, "name": "s", "force": True, "metadata": owner}},
    )["snapshot"]
    assert snap["metadata"] == owner
    assert cinder(drv, f"/snapshots/{snap['id']}")["snapshot"]["metadata"] == owner
    volume = cinder(
        drv,
        "/volumes",
        "POST",
        {"volume": {"snapshot_id": snap["id"], "size": 1, "name": "v", "metadata": owner}},
    )["volume"]
    assert volume["metadata"] == owner
    got = cinder(drv, f"/volumes/{volume['id']}")["volume"]
    assert got["metadata"] == owner and got["bootable"] == "true"
    assert got["volume_image_metadata"]["hw_disk_bus"] == "scsi"  # from the source volume
    merged = cinder(drv, f"/volumes/{root}/metadata", "POST", {"metadata": {"k": "v"}})
    assert merged["metadata"] == {"k": "v"}
    drv._get_volume_connection().request(f"/volumes/{root}/metadata/k", method="DELETE")
    assert cinder(drv, f"/volumes/{root}/metadata")["metadata"] == {}
    done = {"metadata": {"rv-done": "1"}}
    assert cinder(drv, f"/snapshots/{snap['id']}/metadata", "POST", done)["metadata"] == {
        **owner,
        "rv-done": "1",
    }
    cinder(drv, f"/snapshots/{snap['id']}/metadata", "PUT", {"metadata": owner})
    filtered = cinder(drv, '/volumes/detail?metadata={"rv-owner": "host:123:abc"}')
    assert [v["id"] for v in filtered["volumes"]] == [volume["id"]]
    assert [v["id"] for v in cinder(drv, "/volumes/detail")["volumes"]] == [root, volume["id"]]
    filtered = cinder(drv, "/snapshots/detail?metadata={'rv-owner': 'nobody'}")
    assert filtered["snapshots"] == []
    assert cinder(drv, "/snapshots")["snapshots"][0]["metadata"] == owner
    with pytest.raises(BaseHTTPError):
        cinder(drv, "/volumes", "POST", {"volume": {"snapshot_id": snap["id"], "size": 0}})

    # the upload carries the volume's image metadata (not glance's own fields) to the image
    uploaded = upload_image(drv, volume["id"], "up")
    image = drv.image_connection.request(f"/v2/images/{uploaded}").object
    assert image["hw_disk_bus"] == "scsi" and image["name"] == "up"

    glance = drv.image_connection
    made = glance.request(
        "/v2/images",
        method="POST",
        data={"name": "r", "disk_format": "raw", "container_format": "bare", "rv_owner": "me"},
    ).object
    assert made["rv_owner"] == "me"
    assert glance.request(f"/v2/images/{made['id']}").object["rv_owner"] == "me"
    listed = glance.request("/v2/images?rv_owner=me").object["images"]
    assert [i["id"] for i in listed] == [made["id"]]
    patch = [
        {"op": "add", "path": "/rv_done", "value": "yes"},
        {"op": "replace", "path": "/rv_owner", "value": "you"},
    ]
    patched = glance.request(
        f"/v2/images/{made['id']}",
        method="PATCH",
        data=patch,
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    ).object
    assert (patched["rv_done"], patched["rv_owner"]) == ("yes", "you")
    with pytest.raises(BaseHTTPError) as plain_json:  # glance insists on its patch type
        glance.request(f"/v2/images/{made['id']}", method="PATCH", data=patch)
    assert plain_json.value.code == 415
    remove = [{"op": "remove", "path": "/rv_done"}]
    glance.request(
        f"/v2/images/{made['id']}",
        method="PATCH",
        data=remove,
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert "rv_done" not in glance.request(f"/v2/images/{made['id']}").object
    glance.request(
        f"/v2/images/{made['id']}",
        method="PATCH",
        data=[{"op": "replace", "path": "/rv_owner", "value": "me"}],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    with pytest.raises(BaseHTTPError) as bad:  # glance's extra properties are strings
        glance.request("/v2/images", method="POST", data={"name": "x", "rv_owner": 1})
    assert bad.value.code == 400
    # glance pages its lists (25 unasked): what libcloud's list_images follows
    cloud.image_page_size = 2
    first = glance.request("/v2/images").object
    assert len(first["images"]) == 2 and "marker=" in first["next"]
    assert {i.id for i in drv.list_images()} == {i["id"] for i in cloud.images()}
    assert sid


def test_deletes_finish_in_the_background(cloud: OpenStackFake) -> None:
    cloud.settle_polls = 2
    sid = cloud.seed_server("db", b"d" * 10)
    drv = driver(cloud)
    root = cloud.servers()[0]["volume"]
    snap = drv.create_volume_snapshot(drv.ex_get_volume(root), name="s")
    cloud.settle()
    clone = drv.create_volume(1, "clone", snapshot=snap)
    cloud.settle()
    # a volume DELETE: 202, deleting, then gone
    assert drv.destroy_volume(clone)
    assert {v["id"]: v["status"] for v in cloud.volumes()}[clone.id] == "deleting"
    # the snapshot DELETE while its clone still exists: 202, then back to available
    assert drv.destroy_volume_snapshot(snap)
    assert [s["status"] for s in cloud.snapshots()] == ["deleting"]
    drv.list_sizes()
    drv.list_sizes()
    assert [s["status"] for s in cloud.snapshots()] == ["available"]
    with pytest.raises(BaseHTTPError) as gone:
        cinder(drv, f"/volumes/{clone.id}")
    assert gone.value.code == 404
    assert drv.destroy_volume_snapshot(snap)  # no dependant now
    assert cinder(drv, f"/snapshots/{snap.id}")["snapshot"]["status"] == "deleting"
    drv.list_sizes()
    assert cloud.snapshots() == []
    # a server DELETE: still there (task_state deleting), then gone with its volume
    assert drv.destroy_node(drv.ex_get_node_details(sid))
    got = drv.connection.request(f"/servers/{sid}").object["server"]
    assert got["OS-EXT-STS:task_state"] == "deleting"
    assert drv.ex_get_node_details(sid) is None
    assert cloud.servers() == [] and cloud.volumes() == []


def test_flavors_by_other_ids(tmp_path: Path) -> None:
    with (
        OpenStackFake(tmp_path / "a", flavor_ids="uuid") as a,
        OpenStackFake(tmp_path / "b", flavor_ids="uuid") as b,
    ):
        sizes_a = {s.name: s for s in driver(a).list_sizes()}
        sizes_b = {s.name: s for s in driver(b).list_sizes()}
        names = ["m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"]
        assert sorted(sizes_a) == sorted(sizes_b) == sorted(names)
        assert not {s.id for s in sizes_a.values()} & {s.id for s in sizes_b.values()}
        assert sizes_a["m1.small"].disk == 20
        sid = a.seed_server("s", b"s", "m1.small")
        assert driver(a).ex_get_node_details(sid).extra["flavorId"] == sizes_a["m1.small"].id
    with pytest.raises(ValueError, match="flavor_ids"):
        OpenStackFake(tmp_path / "c", flavor_ids="other")
