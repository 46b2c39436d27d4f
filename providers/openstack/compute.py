"""Compute in OpenStack through apache-libcloud's unmodified ``OpenStack_2_NodeDriver``.

Servers are nova servers; their metadata are the tags. What the driver offers is used as
it is (servers, metadata, flavors, volume snapshots, volumes); what it lacks (cinder's
``os-volume_upload_image`` action, glance's image data) goes through the connections the
driver itself built and authenticated (``image_connection``, ``volumev3_connection``),
never a second HTTP stack.

Capture (blocks): snapshot the server's boot volume (cinder), make a volume of the snapshot,
upload that volume to a glance image (``os-volume_upload_image``), then read the image's
data in ranges (glance download with ``Range``); closing the capture deletes the image,
the volume and the snapshot. Restore: the restored image is written to a local sparse file,
uploaded to glance on commit, and launch boots a server from it with the original flavor
(or the region's ``flavor``) and the original metadata; a failed restore or launch removes
the server and the image it made.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import NodeImage
from libcloud.compute.providers import get_driver
from libcloud.compute.types import NodeState
from libcloud.compute.types import Provider as LibcloudProvider
from regionvault.core.errors import ComputeError, InstanceNotFound, UnsupportedOperation
from regionvault.core.interfaces import BlockCapture, BlockSink, Compute
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    Disk,
    Instance,
    InstancePage,
    LaunchSpec,
    RegionConfig,
    Tags,
)
from regionvault.providers.openstack.settings import OpenStackSettings

__all__ = ["OpenStackBlockCapture", "OpenStackBlockSink", "OpenStackCompute"]

#: the block size of captures and restores; a read covers this many bytes at most
BLOCK_SIZE = 4096
READ_SIZE = 4 * 1024 * 1024
#: the names of the images a restore uploads (deleted with the last server booted from one)
RESTORE_PREFIX = "rv-restore-"
_GONE = {"deleted", "soft_deleted", "terminated"}


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


class OpenStackCompute(Compute):
    """One region's nova servers."""

    def __init__(
        self, *, region: RegionConfig, settings: OpenStackSettings, capabilities: Capabilities
    ) -> None:
        super().__init__(provider="openstack", region=region.name, capabilities=capabilities)
        self.config = region
        self.settings = settings
        cls = get_driver(LibcloudProvider.OPENSTACK)
        self.driver: Any = cls(
            settings.username,
            settings.password(region),
            secure=settings.secure,
            api_version="2.0",
            ex_force_auth_url=settings.auth_url,
            ex_force_auth_version="3.x_password",
            ex_force_service_region=settings.service_region,
            ex_tenant_name=settings.project,
            ex_domain_name=settings.domain,
            timeout=settings.timeout,
        )
        # the image connection's body is JSON unless swapped for one raw upload (below)
        self._image_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def _error(self, what: str, exc: BaseException) -> ComputeError:
        error = ComputeError(f"{what}: {exc}", provider="openstack", region=self.region)
        error.__cause__ = exc
        return error

    def _wait(self, what: str, poll: Callable[[], str], ready: str) -> None:
        deadline = time.monotonic() + self.settings.wait_timeout
        while True:
            status = poll().lower()
            if status == ready:
                return
            if status in ("error", "killed") or status.startswith("error"):
                raise ComputeError(f"{what} is {status}", provider="openstack", region=self.region)
            if time.monotonic() > deadline:
                raise ComputeError(
                    f"{what} still {status} after {self.settings.wait_timeout} s",
                    provider="openstack",
                    region=self.region,
                )
            time.sleep(self.settings.poll_interval)

    def _volumes(self, path: str, *, method: str = "GET", data: Any = None) -> Any:
        return self.driver.volumev3_connection.request(path, method=method, data=data).object

    def _images(self, path: str, *, method: str = "GET", data: Any = None) -> Any:
        with self._image_lock:
            return self.driver.image_connection.request(path, method=method, data=data).object

    def _image_upload(self, image_id: str, path: Path) -> None:
        """PUT the image's data through the driver's image connection, streamed from
        ``path``, its body raw (the connection encodes JSON and says so otherwise)."""
        conn = self.driver.image_connection
        with self._image_lock, path.open("rb") as body:
            conn.encode_data = lambda data: data
            conn.default_content_type = "application/octet-stream"
            try:
                conn.request(f"/v2/images/{image_id}/file", method="PUT", data=body)
            finally:
                del conn.encode_data
                del conn.default_content_type

    def image_range(self, image_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the image's data from ``offset`` (glance download, Range)."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            with self._image_lock:
                response = self.driver.image_connection.request(
                    f"/v2/images/{image_id}/file", headers=headers
                )
            data = b"".join(response.iter_content(1 << 20))
        except (BaseHTTPError, LibcloudError) as exc:
            raise self._error(f"reading image {image_id} at {offset}", exc) from exc
        if response.status == 200 and len(data) > length:  # Range ignored: the whole image
            data = data[offset : offset + length]
        return data

    def _image_status(self, image_id: str) -> str:
        return str(self._images(f"/v2/images/{image_id}").get("status", "unknown"))

    def delete_image(self, image_id: str) -> None:
        with contextlib.suppress(BaseHTTPError, LibcloudError):
            self._images(f"/v2/images/{image_id}", method="DELETE")

    def _node(self, instance_id: str) -> Any:
        try:
            node = self.driver.ex_get_node_details(instance_id)
        except (BaseHTTPError, LibcloudError) as exc:
            if _status(exc) == 404:
                node = None
            else:
                raise self._error(f"reading server {instance_id}", exc) from exc
        if node is None or str(node.extra.get("vm_state") or "").lower() in _GONE:
            raise InstanceNotFound(instance_id, provider="openstack", region=self.region)
        if node.state == NodeState.TERMINATED:
            raise InstanceNotFound(instance_id, provider="openstack", region=self.region)
        return node

    def _instance(self, node: Any) -> Instance:
        extra = node.extra
        metadata = extra.get("metadata") or {}
        volumes = [v["id"] for v in extra.get("volumes_attached") or [] if "id" in v]
        return Instance(
            id=node.id,
            name=node.name,
            region=self.region,
            tags=Tags({str(k): str(v) for k, v in metadata.items()}),
            state=str(node.state),
            function=extra.get("flavorId"),
            capture_kinds=frozenset({CaptureKind.BLOCKS}),
            extra={
                "flavor": extra.get("flavorId"),
                "image": extra.get("imageId"),
                "volumes": volumes,
            },
        )

    # ------------------------------------------------------------------ listing, tags

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        _, skip = InstancePage.parse_token(page_token)
        try:
            nodes = self.driver.list_nodes()
        except (BaseHTTPError, LibcloudError) as exc:
            raise self._error("listing servers", exc) from exc
        found = []
        for node in sorted(nodes, key=lambda n: n.id):
            if node.state == NodeState.TERMINATED:
                continue
            instance = self._instance(node)
            if tag_filters and not instance.tags.matches(tag_filters):
                continue
            found.append(instance)
        page = tuple(found[skip : skip + page_size])
        more = skip + page_size < len(found)
        return InstancePage(page, InstancePage.token(None, skip + page_size) if more else None)

    def get_instance(self, instance_id: str) -> Instance:
        return self._instance(self._node(instance_id))

    def _put_metadata(self, instance_id: str, metadata: Mapping[str, str]) -> Tags:
        node = self._node(instance_id)
        try:
            result = self.driver.ex_set_metadata(node, dict(metadata))
        except (BaseHTTPError, LibcloudError) as exc:
            raise self._error(f"setting the metadata of server {instance_id}", exc) from exc
        return Tags({str(k): str(v) for k, v in result.items()})

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        current = dict(self.get_instance(instance_id).tags)
        current.update(tags)
        return self._put_metadata(instance_id, current)

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        current = dict(self.get_instance(instance_id).tags)
        for key in keys:
            current.pop(key, None)
        return self._put_metadata(instance_id, current)

    # ------------------------------------------------------------------ capture

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> OpenStackBlockCapture:
        if kind not in (None, CaptureKind.BLOCKS):
            raise UnsupportedOperation(
                f"capture of kind {kind}", provider="openstack", region=self.region
            )
        instance = self.get_instance(instance_id)
        volumes = instance.extra["volumes"]
        if not volumes:
            raise ComputeError(
                f"server {instance_id} has no volume to capture",
                provider="openstack",
                region=self.region,
            )
        taken_at = datetime.now(UTC)
        label = f"rv-capture-{instance_id[:8]}-{uuid.uuid4().hex[:8]}"
        made: list[tuple[str, str]] = []  # (kind, id), deleted on failure and on close
        try:
            volume = self.driver.ex_get_volume(volumes[0])
            snapshot = self.driver.create_volume_snapshot(volume, name=label, ex_force=True)
            made.append(("snapshot", snapshot.id))
            self._wait(
                f"snapshot {snapshot.id}",
                lambda: str(self._volumes(f"/snapshots/{snapshot.id}")["snapshot"]["status"]),
                "available",
            )
            copy = self.driver.create_volume(volume.size, label, snapshot=snapshot)
            made.append(("volume", copy.id))
            self._wait(
                f"volume {copy.id}",
                lambda: str(self._volumes(f"/volumes/{copy.id}")["volume"]["status"]),
                "available",
            )
            answer = self._volumes(
                f"/volumes/{copy.id}/action",
                method="POST",
                data={
                    "os-volume_upload_image": {
                        "image_name": label,
                        "force": True,
                        "disk_format": "raw",
                        "container_format": "bare",
                    }
                },
            )
            image_id = str(answer["os-volume_upload_image"]["image_id"])
            made.append(("image", image_id))
            self._wait(f"image {image_id}", lambda: self._image_status(image_id), "active")
            size = int(self._images(f"/v2/images/{image_id}")["size"])
        except BaseException as exc:
            self._remove(made)
            if isinstance(exc, (BaseHTTPError, LibcloudError)):
                raise self._error(f"capturing server {instance_id}", exc) from exc
            raise
        return OpenStackBlockCapture(self, instance, taken_at, image_id, size, made)

    def _remove(self, made: Sequence[tuple[str, str]]) -> None:
        for kind, ident in reversed(made):
            with contextlib.suppress(BaseHTTPError, LibcloudError, ComputeError):
                if kind == "image":
                    self.delete_image(ident)
                elif kind == "volume":
                    self._volumes(f"/volumes/{ident}", method="DELETE")
                elif kind == "snapshot":
                    self._volumes(f"/snapshots/{ident}", method="DELETE")
                elif kind == "server":
                    self.driver.destroy_node(self._node(ident))

    # ------------------------------------------------------------------ restore, launch

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> OpenStackBlockSink:
        if kind != CaptureKind.BLOCKS:
            raise UnsupportedOperation(
                f"launching from a {kind} point", provider="openstack", region=self.region
            )
        if size is None:
            raise ValueError("a block restore needs the image's size")
        return OpenStackBlockSink(self, spec, size, disks)

    def _flavor(self, spec: LaunchSpec) -> str:
        for source in (spec.extra, spec.source.extra if spec.source else {}):
            flavor = source.get("flavor")
            if isinstance(flavor, str) and flavor:
                return flavor
        if spec.function:
            return spec.function
        if self.settings.flavor:
            return self.settings.flavor
        raise ComputeError(
            "no flavor to boot: the point names none and the region sets no flavor",
            provider="openstack",
            region=self.region,
        )

    def launch(self, spec: LaunchSpec, sink: Any) -> Instance:
        if not isinstance(sink, OpenStackBlockSink) or sink.image_id is None:
            raise ComputeError(
                "launch needs a committed sink of this compute",
                provider="openstack",
                region=self.region,
            )
        try:
            size = self._size(self._flavor(spec))
            node = self.driver.create_node(
                name=spec.name,
                size=size,
                image=NodeImage(sink.image_id, spec.name, self.driver),
                ex_metadata=dict(spec.tags),
            )
        except (BaseHTTPError, LibcloudError) as exc:
            sink.discard()
            raise self._error(f"booting {spec.name}", exc) from exc
        except BaseException:
            sink.discard()
            raise
        try:
            self._wait(f"server {node.id}", lambda: self._server_status(node.id), "active")
            instance = self.get_instance(node.id)
        except BaseException:
            self._remove([("server", node.id)])
            sink.discard()
            raise
        sink.launched = True
        return instance

    def _size(self, flavor: str) -> Any:
        """The flavor with this id, or else with this name (``m1.large``)."""
        try:
            return self.driver.ex_get_size(flavor)
        except (BaseHTTPError, LibcloudError) as exc:
            if _status(exc) != 404:
                raise
        for size in self.driver.list_sizes():
            if size.name == flavor:
                return size
        raise ComputeError(f"no flavor {flavor!r}", provider="openstack", region=self.region)

    def _server_status(self, instance_id: str) -> str:
        server = self.driver.connection.request(f"/servers/{instance_id}").object["server"]
        status = str(server.get("status", "unknown"))
        if status.lower() == "error":
            fault = (server.get("fault") or {}).get("message") or "no fault given"
            raise ComputeError(
                f"server {instance_id} ended in ERROR: {fault}",
                provider="openstack",
                region=self.region,
            )
        return status

    def terminate(self, instance_id: str) -> None:
        """Delete the server, and the image a restore uploaded for it (named
        ``rv-restore-...``) once no other server boots from it."""
        node = self._node(instance_id)
        image_id = node.extra.get("imageId")
        try:
            self.driver.destroy_node(node)
        except (BaseHTTPError, LibcloudError) as exc:
            if _status(exc) != 404:
                raise self._error(f"deleting server {instance_id}", exc) from exc
        if not image_id:
            return
        try:
            name = str(self._images(f"/v2/images/{image_id}").get("name", ""))
            if not name.startswith(RESTORE_PREFIX):
                return
            users = [
                n
                for n in self.driver.list_nodes()
                if n.id != instance_id and n.extra.get("imageId") == image_id
            ]
        except (BaseHTTPError, LibcloudError):
            return  # the image is gone already, or cannot be told: leave it
        if not users:
            self.delete_image(image_id)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for conn in (self.driver.connection, self.driver.image_connection):
                if conn.connection is not None:
                    conn.connection.session.close()


class OpenStackBlockCapture(BlockCapture):
    """A server's volume as a glance image, read in ranges; its temporaries go on close."""

    def __init__(
        self,
        compute: OpenStackCompute,
        instance: Instance,
        taken_at: datetime,
        image_id: str,
        size: int,
        made: list[tuple[str, str]],
    ) -> None:
        super().__init__(instance, taken_at, size=size, block_size=BLOCK_SIZE)
        self.compute = compute
        self.image_id = image_id
        self._made = made

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        return self.read_ranges([(0, self.size)])

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        for start, length in spans:
            offset, end = start, min(start + length, self.size)
            while offset < end:
                n = min(READ_SIZE, end - offset)
                data = self.compute.image_range(self.image_id, offset, n)
                if len(data) != n:
                    raise ComputeError(
                        f"image {self.image_id}: {len(data)} bytes at {offset}, not {n}",
                        provider="openstack",
                        region=self.compute.region,
                    )
                if data.count(0) != len(data):
                    yield offset, data
                offset += n

    def close(self) -> None:
        made, self._made = self._made, []
        self.compute._remove(made)


class OpenStackBlockSink(BlockSink):
    """A local sparse file, uploaded to glance on commit; the image is what launch boots."""

    def __init__(
        self,
        compute: OpenStackCompute,
        spec: LaunchSpec,
        size: int,
        disks: Sequence[Disk] | None,
    ) -> None:
        super().__init__(size, BLOCK_SIZE, disks)
        self.compute = compute
        self.spec = spec
        fd, name = tempfile.mkstemp(prefix="rv-openstack-restore-")
        os.close(fd)
        self.path: Path | None = Path(name)
        os.truncate(self.path, size)
        self.image_id: str | None = None
        self.launched = False

    def write(self, offset: int, data: bytes) -> None:
        if self.path is None:
            raise ComputeError("the sink was discarded", provider="openstack")
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def commit(self) -> None:
        if self.path is None:
            raise ComputeError("the sink was discarded", provider="openstack")
        compute = self.compute
        try:
            image = compute._images(
                "/v2/images",
                method="POST",
                data={
                    "name": f"{RESTORE_PREFIX}{self.spec.name}",
                    "disk_format": "raw",
                    "container_format": "bare",
                },
            )
            self.image_id = str(image["id"])
            compute._image_upload(self.image_id, self.path)
            image_id = self.image_id
            compute._wait(f"image {image_id}", lambda: compute._image_status(image_id), "active")
        except (BaseHTTPError, LibcloudError) as exc:
            self.discard()
            raise compute._error("uploading the restored image", exc) from exc
        except BaseException:
            self.discard()
            raise
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        if self.launched:
            return
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        if self.image_id is not None:
            self.compute.delete_image(self.image_id)
            self.image_id = None
