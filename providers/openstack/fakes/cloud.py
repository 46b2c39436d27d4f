"""A wire-level fake of an OpenStack cloud: keystone v3, nova, glance v2 and cinder v3, on plain
HTTP at 127.0.0.1.

libcloud's unmodified ``OpenStack_2_NodeDriver`` talks to it with ``api_version="2.0"``,
``ex_force_auth_url=<endpoint>/identity``, ``ex_force_auth_version="3.x_password"``,
``ex_force_service_region=<region>``, ``ex_tenant_name=<project>``,
``ex_domain_name="Default"`` and ``secure=False``. One project, one region, and what the
openstack provider needs:

- keystone: ``POST /identity/v3/auth/tokens`` (password method, project scope): a token in
  ``X-Subject-Token`` and the catalog (``nova`` compute at ``/compute/v2.1``, ``glance`` image
  at ``/image``, ``cinderv3`` volumev3 and ``block-storage`` at ``/volume/v3/<project_id>``,
  ``swift`` object-store at ``/object-store/v1/AUTH_<project_id>``: fakes/swift.py, its
  hooks on :attr:`OpenStackFake.swift`).
  Every other call needs a token it issued in ``X-Auth-Token`` (401 otherwise).
- nova: servers ``list`` and ``detail`` (``limit`` + ``marker`` pages with ``servers_links``
  ``next``, as nova pages; ``name``, a regular expression, as nova filters), ``get``,
  ``create`` (``flavorRef``, ``metadata``, and either a ``block_device_mapping_v2`` row
  ``{"source_type": "image", "uuid": <image>, "destination_type": "volume", "volume_size":
  <GiB>, "boot_index": 0, "delete_on_termination": ...}``: the server boots from a new bootable
  volume made from the image, its ``image`` "" (further rows of the same kind, ``boot_index``
  negative or none, each make a volume from their image, attached ``/dev/vdb``, ``/dev/vdc``,
  ... in their order); or an ``imageRef`` alone: it boots from the
  image on the hypervisor's disk, no volume, and as nova a zero-disk flavor is refused (403
  BootFromVolumeRequiredForZeroDiskFlavor) and so is a flavor disk smaller than the image (400
  FlavorDiskSmallerThanImage)), ``delete`` (in the background: ``task_state`` ``deleting``,
  then gone, its ``delete_on_termination`` volumes with it unless they have snapshots);
  ``volumes_attached`` and ``os-volume_attachments`` in the order nova lists them; metadata
  ``GET``/``PUT`` (replace)/``POST`` (merge), one key ``GET``/``PUT``/``DELETE``; flavors
  ``list``/``detail``/``get`` (devstack's m1.tiny to m1.xlarge, with their ``disk``; other
  flavors or generated uuid ids at construction); nova's proxies that libcloud's
  ``get_image``-era calls use: ``images/<id>`` ``GET`` and ``DELETE`` (``delete_image``),
  ``os-snapshots/<id>`` ``GET`` and ``DELETE`` (``ex_get_snapshot``).
- glance v2: images ``create`` (queued; any extra property, a string, kept and shown as
  glance shows them), ``get``, ``update`` (``PATCH``, JSON patch of properties and the name,
  with glance's content type), ``list`` (filters by ``name``, ``status`` or any property,
  pages of 25 with ``next`` as glance), data ``PUT`` (active) and data ``GET`` with
  ``Range: bytes=a-b`` (206 with ``Content-Range``; 416 past the end), ``delete``.
- cinder v3: volumes ``get``, ``list``/``detail`` (``metadata`` filter), ``create`` (blank,
  from ``snapshot_id`` or ``imageRef``; ``metadata``), ``metadata`` (as for snapshots: ``GET``,
  ``POST`` merge, ``PUT`` replace, one key ``GET``/``DELETE``), ``delete`` (400 while attached
  or while it has snapshots, as cinder answers; then ``deleting`` in the background, then 404),
  action ``os-volume_upload_image`` (an in-use volume needs ``force``, as in cinder; the image
  is ``saving``, then ``active``, with the volume's image metadata as its properties, and an
  encrypted volume's key id); snapshots ``create`` (an in-use volume needs ``force``;
  ``metadata``), ``get``, ``list``/``detail`` (``metadata`` filter), ``delete`` (202, then
  ``deleting`` and gone; while a volume made from it exists it goes back to ``available``, as
  cinder on RBD when the backend says SnapshotIsBusy). Volumes show ``bootable``, ``encrypted``
  and, made from an image (or from a snapshot of such a volume), ``volume_image_metadata``.

Asynchrony: as in a cloud, what a request starts goes on whether or not anyone polls it.
A server is ``BUILD``, a volume or a snapshot ``creating``, an uploaded image ``saving`` (its
volume ``uploading``) in the answer that makes it; every later authenticated request (of any
kind) is one step of time, and from the :attr:`OpenStackFake.settle_polls`-th (default 2)
on it is ``ACTIVE``, ``available`` or ``active`` (the volume back in its status), or gone
(what a DELETE started).
:meth:`OpenStackFake.settle` ends everything at once. Failures that a cloud reports in the
resource rather than in the answer: :meth:`~OpenStackFake.fail_next_boot` (the server ends
in ``ERROR`` with a ``fault``, as a boot nova cannot schedule), and
:meth:`~OpenStackFake.fail_next_upload` (the image ends ``killed``, without data).

Through libcloud (how the provider's calls look; the tests do each): the driver's own
``connection`` (nova), ``image_connection`` (glance) and ``_get_volume_connection()`` (cinder)
send JSON. Image data is not JSON: download with ``image_connection.request(path,
headers={"Range": ...}, raw=True)`` and read ``iter_content``; upload through that
connection's own HTTP connection (``image_connection.connection.request("PUT",
image_connection.request_path + path, body=..., headers=image_connection.add_default_headers(
{"Content-Type": "application/octet-stream"}))``), which the fake insists on (415 for JSON,
as glance). A streamed (chunked) body is accepted.

Bytes: image, volume and snapshot data are files under ``workdir`` (``images/``, ``volumes/``,
``snapshots/``); state is in memory. A volume's data is the length it was made with (a
seeded server's image bytes), where a real raw upload is the volume's whole size in GiB: the
image's ``size`` is the data's length, which is what a reader must go by anyway. A volume's
``size`` (GiB) is that length rounded up, at least 1.

Test hooks, not on the wire: :meth:`OpenStackFake.seed_server`, :meth:`~OpenStackFake.servers`,
:meth:`~OpenStackFake.settle`, :meth:`~OpenStackFake.fail_next_boot`,
:meth:`~OpenStackFake.fail_next_upload`,
:meth:`~OpenStackFake.image_bytes`, :meth:`~OpenStackFake.volume_bytes`,
:meth:`~OpenStackFake.images`, :meth:`~OpenStackFake.volumes`,
:meth:`~OpenStackFake.snapshots`, :meth:`~OpenStackFake.fail_next` (an HTTP error for the
next request matching a method and a path pattern, instead of doing it or, ``after=True``,
after doing it: a lost answer), :attr:`~OpenStackFake.ignore_range` (glance answers a ranged
read 200 with the whole image, as a proxy that drops ``Range``), :attr:`~OpenStackFake.counts`.
:meth:`~OpenStackFake.stop` also closes the connections already open, so a cloud that is
down answers nothing, keep-alive connections included.

``python -m regionvault.providers.openstack.fakes.cloud --workdir D [--port N] [--flavor-ids
uuid] [--settle-polls N]`` runs it as a process: it prints the endpoint and serves until
SIGTERM or SIGINT (what a killed client left is then seen through the API's lists).

Why this module is longer than the others: it is one cloud's four APIs sharing one state
(a server's volume, a volume's snapshots and uploads, an upload's image), kept under one lock.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import hashlib
import json
import re
import shutil
import signal
import socket
import sys
import threading
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from regionvault.providers.openstack.fakes.swift import SwiftFake

GIB = 1 << 30

#: The flavors every fake has (id: name, vcpus, ram MiB, disk GiB), as devstack's defaults.
DEFAULT_FLAVORS: dict[str, tuple[str, int, int, int]] = {
    "1": ("m1.tiny", 1, 512, 1),
    "2": ("m1.small", 1, 2048, 20),
    "3": ("m1.medium", 2, 4096, 40),
    "4": ("m1.large", 4, 8192, 80),
    "5": ("m1.xlarge", 8, 16384, 160),
}

_IMAGE_FIELDS = ("id", "name", "disk_format", "container_format")
# glance's fields that are not properties (what a create may set, or glance owns)
_GLANCE_FIELDS = {
    *_IMAGE_FIELDS,
    "visibility",
    "protected",
    "tags",
    "min_disk",
    "min_ram",
    "os_hidden",
    "status",
    "size",
    "virtual_size",
    "checksum",
    "owner",
    "created_at",
    "updated_at",
    "self",
    "file",
    "schema",
    "locations",
    "direct_url",
}
# glance's list parameters that are not property filters
_GLANCE_LIST_PARAMS = {"limit", "marker", "sort", "sort_key", "sort_dir", "member_status"}
# what cinder keeps of an image on a volume made from it besides its properties
_VOLUME_IMAGE_CORE = ("checksum", "container_format", "disk_format", "min_disk", "min_ram", "size")
_JSON_PATCH = "application/openstack-images-v2.1-json-patch"
_METADATA_LIMIT = 255  # nova: keys and values are at most 255 characters
_METADATA_ITEMS = 128  # nova's default metadata_items quota


class FakeError(Exception):
    """An error answer: the HTTP status and the message the API puts in its body."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or {
            400: "badRequest",
            401: "unauthorized",
            403: "forbidden",
            404: "itemNotFound",
            409: "conflictingRequest",
            415: "unsupportedMediaType",
            413: "overLimit",
            416: "rangeNotSatisfiable",
        }.get(status, "computeFault")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gib(length: int) -> int:
    return max(1, -(-length // GIB))


@dataclass
class _Image:
    id: str
    name: str
    disk_format: str | None
    container_format: str | None
    status: str  # queued, saving, active
    created: str
    updated: str
    size: int | None = None
    checksum: str | None = None
    polls_left: int = 0
    properties: dict[str, str] = field(default_factory=dict)
    # an upload that ends in "killed" (fail_next_upload)
    doomed: bool = False
    min_disk: int = 0
    min_ram: int = 0


@dataclass
class _Volume:
    id: str
    name: str
    status: str  # creating, available, in-use, uploading, deleting
    created: str
    length: int
    server_id: str | None = None
    snapshot_id: str | None = None
    image_id: str | None = None
    polls_left: int = 0
    # what the status goes back to after an upload
    resting: str = "available"
    upload_image: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # the size (GiB) asked for; the volume's size is at least its data's
    gib: int = 1
    bootable: bool = False
    encrypted: bool = False
    # volume_image_metadata: what cinder keeps of the image a volume (or its source) came from
    image_metadata: dict[str, str] = field(default_factory=dict)
    # the attachment's device and whether nova deletes the volume with its server
    device: str | None = None
    delete_on_termination: bool = False


@dataclass
class _Snapshot:
    id: str
    name: str
    volume_id: str
    status: str
    created: str
    length: int
    polls_left: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    gib: int = 1
    bootable: bool = False
    encrypted: bool = False
    image_metadata: dict[str, str] = field(default_factory=dict)
    # a DELETE the backend refuses (a volume made from it exists: SnapshotIsBusy)
    busy: bool = False


@dataclass
class _Server:
    id: str
    name: str
    flavor_id: str
    # the image it was made from, and the volume it boots from (None: it boots from the
    # image, on the hypervisor's local disk; its ``image`` is "" otherwise)
    image_id: str
    root_volume: str | None
    # attached volumes, in the order nova lists them
    volume_ids: list[str]
    metadata: dict[str, str]
    created: str
    updated: str
    status: str = "ACTIVE"
    polls_left: int = 0
    # the status a BUILD ends in (ERROR: fail_next_boot)
    ends: str = "ACTIVE"
    fault: str | None = None
    deleting: bool = False


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    message: str
    # do the request, then answer the error (an answer lost on its way back)
    after: bool = False


class OpenStackFake:
    """The fake cloud: :meth:`start` serves it, :meth:`stop` ends it (or use ``with``)."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        username: str = "regionvault",
        password: str = "fake-password",
        project: str = "edge",
        domain: str = "Default",
        region: str = "RegionOne",
        port: int = 0,
        page_size: int = 1000,
        flavors: Mapping[str, tuple[str, int, int, int]] | None = None,
        flavor_ids: str = "devstack",
    ) -> None:
        self.workdir = Path(workdir)
        self.username = username
        self.password = password
        self.project = project
        self.domain = domain
        self.region = region
        self.port = port
        #: nova's osapi_max_limit: the largest page a server list answers
        self.page_size = page_size
        #: what a request makes (a server, a volume, a snapshot, an uploaded image) is done
        #: from this many later requests on (of any kind): 0 is done in its first answer
        self.settle_polls = 2
        #: glance answers a ranged download 200 with the whole image (a proxy that drops
        #: ``Range``)
        self.ignore_range = False
        self.project_id = uuid.uuid5(uuid.NAMESPACE_DNS, f"{project}.project").hex
        self.user_id = uuid.uuid5(uuid.NAMESPACE_DNS, f"{username}.user").hex
        #: requests per "METHOD /service/route" (ids replaced by ``{id}``)
        self.counts: Counter[str] = Counter()
        #: id: (name, vcpus, ram MiB, disk GiB); ``flavors`` replaces devstack's, and
        #: ``flavor_ids="uuid"`` gives each a generated uuid as its id (as most clouds have),
        #: so that one flavor has different ids in two fakes
        self.flavors: dict[str, tuple[str, int, int, int]] = dict(flavors or DEFAULT_FLAVORS)
        if flavor_ids == "uuid":
            self.flavors = {str(uuid.uuid4()): spec for spec in self.flavors.values()}
        elif flavor_ids != "devstack":
            raise ValueError(f"flavor_ids is 'devstack' or 'uuid', not {flavor_ids!r}")
        #: glance's limit_param_default: the largest image page a list answers unasked
        self.image_page_size = 25
        self._lock = threading.RLock()
        self._tokens: set[str] = set()
        self._images: dict[str, _Image] = {}
        self._volumes: dict[str, _Volume] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._servers: dict[str, _Server] = {}
        self._failures: list[_Failure] = []
        self._boot_failures = 0
        self._boot_fault = ""
        self._upload_failures = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # the sockets of the connections being served (stop closes them)
        self._connections: set[socket.socket] = set()
        self.endpoint = ""
        #: the object-store service (fakes/swift.py), one account: the project's
        self.swift = SwiftFake(self.workdir / "swift", token_ok=self._token_ok)
        for sub in ("images", "volumes", "snapshots"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- life --------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on 127.0.0.1 (``port``, or a free one) and answer the endpoint URL."""
        if self._server is not None:
            return self.endpoint
        fake = self

        class Handler(_Handler):
            cloud = fake

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, name="openstack-fake", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and close the connections already open, keep-alive ones included
        (state and files stay until the workdir goes)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            open_now, self._connections = list(self._connections), set()
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> OpenStackFake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def auth_url(self) -> str:
        """What libcloud's ``ex_force_auth_url`` is."""
        return f"{self.endpoint}/identity"

    def _token_ok(self, token: str) -> bool:
        with self._lock:
            return token in self._tokens

    # -- test hooks --------------------------------------------------------------------------

    def seed_server(
        self,
        name: str,
        image_bytes: bytes,
        flavor: str = "1",
        metadata: dict[str, str] | None = None,
        *,
        data_volumes: Sequence[bytes] = (),
        data_first: bool = False,
        encrypted: bool = False,
        boot_from_volume: bool = True,
        image_properties: dict[str, str] | None = None,
    ) -> str:
        """Make an ACTIVE server from an image made for it that holds ``image_bytes`` (with
        ``image_properties``, e.g. ``hw_*``): booted from a volume made from the image (its
        ``image`` is "", the volume deleted with it), or with ``boot_from_volume=False``
        from the image itself (no volume; the flavor's disk must hold the image). Each of
        ``data_volumes`` is a volume attached after the root (nova lists it first with
        ``data_first``); ``encrypted`` makes every volume of the server a LUKS one.
        ``flavor`` is a flavor id or name. Answers the server's id."""
        with self._lock:
            flavor_id = self._flavor_id(flavor)
            image = self._new_image(f"{name}-image", "raw", "bare")
            image.properties = _metadata(image_properties or {})
            self._image_path(image.id).write_bytes(image_bytes)
            self._finish_image(image, len(image_bytes))
            root = _gib(len(image_bytes)) if boot_from_volume else None
            if root is None:
                self._check_image_boot(flavor_id, image)
            server = self._boot(name, flavor_id, image, dict(metadata or {}), root, True)
            data_ids = []
            for n, data in enumerate(data_volumes):
                volume = self._new_volume("", len(data), server_id=server.id)
                self._volume_path(volume.id).write_bytes(data)
                volume.status = volume.resting = "in-use"
                volume.device = f"/dev/vd{chr(ord('b') + n)}"
                data_ids.append(volume.id)
            if data_first:
                server.volume_ids[:0] = data_ids
            else:
                server.volume_ids.extend(data_ids)
            for volume_id in server.volume_ids:
                self._volumes[volume_id].encrypted = encrypted
            return server.id

    def servers(self) -> list[dict[str, Any]]:
        """Every server: id, name, flavor (id), flavor_name, image (the id of the image it
        was made from), volume (the root volume's id, None if it boots from its image),
        volumes (every attached volume's id, as nova lists them), metadata, status."""
        with self._lock:
            return [
                {
                    "id": s.id,
                    "name": s.name,
                    "flavor": s.flavor_id,
                    "flavor_name": self.flavors[s.flavor_id][0],
                    "image": s.image_id,
                    "volume": s.root_volume,
                    "volumes": list(s.volume_ids),
                    "metadata": dict(s.metadata),
                    "status": s.status,
                }
                for s in self._servers.values()
            ]

    def images(self) -> list[dict[str, Any]]:
        """Every glance image: id, name, status, size, properties."""
        with self._lock:
            return [
                {
                    "id": i.id,
                    "name": i.name,
                    "status": i.status,
                    "size": i.size,
                    "properties": dict(i.properties),
                }
                for i in self._images.values()
            ]

    def volumes(self) -> list[dict[str, Any]]:
        """Every cinder volume: id, name, status, server (id or None), device (where it is
        attached, or None), length (bytes), size (GiB), bootable, encrypted, metadata."""
        with self._lock:
            return [
                {
                    "id": v.id,
                    "name": v.name,
                    "status": v.status,
                    "server": v.server_id,
                    "device": v.device if v.server_id else None,
                    "length": v.length,
                    "size": max(v.gib, _gib(v.length)),
                    "bootable": v.bootable,
                    "encrypted": v.encrypted,
                    "metadata": dict(v.metadata),
                }
                for v in self._volumes.values()
            ]

    def snapshots(self) -> list[dict[str, Any]]:
        """Every cinder snapshot: id, name, status, volume (id), metadata."""
        with self._lock:
            return [
                {
                    "id": s.id,
                    "name": s.name,
                    "status": s.status,
                    "volume": s.volume_id,
                    "metadata": dict(s.metadata),
                }
                for s in self._snapshots.values()
            ]

    def image_bytes(self, image_id: str) -> bytes:
        """An image's data (KeyError if there is no such image or it has none)."""
        with self._lock:
            if image_id not in self._images:
                raise KeyError(image_id)
            path = self._image_path(image_id)
            if not path.exists():
                raise KeyError(image_id)
            return path.read_bytes()

    def volume_bytes(self, server_or_volume_id: str) -> bytes:
        """A volume's data, by the volume's id or by its server's (its root volume)."""
        with self._lock:
            server = self._servers.get(server_or_volume_id)
            volume_id = server.root_volume if server else server_or_volume_id
            if volume_id is None or volume_id not in self._volumes:
                raise KeyError(server_or_volume_id)
            return self._volume_path(volume_id).read_bytes()

    def fail_next(
        self,
        method: str,
        path_pattern: str,
        status: int = 500,
        message: str = "injected",
        *,
        after: bool = False,
    ) -> None:
        """Answer the next ``method`` request whose path (without the query) matches
        ``path_pattern`` (``re.search``) with ``status``: without doing it, or with
        ``after=True`` having done it (what it made or changed stays, as when the answer to a
        POST is lost on its way back)."""
        with self._lock:
            self._failures.append(
                _Failure(method.upper(), re.compile(path_pattern), status, message, after)
            )

    def fail_next_boot(self, message: str = "No valid host was found. ") -> None:
        """The next server made through the API ends its BUILD in ERROR, with ``message`` as
        its fault (as nova's scheduler fails a boot), rather than ACTIVE."""
        with self._lock:
            self._boot_failures += 1
            self._boot_fault = message

    def fail_next_upload(self) -> None:
        """The next ``os-volume_upload_image`` ends with its image ``killed`` (as glance shows
        an upload that failed) and the volume back in its status, rather than ``active``."""
        with self._lock:
            self._upload_failures += 1

    # -- state helpers (under the lock) ------------------------------------------------------

    def _image_path(self, image_id: str) -> Path:
        return self.workdir / "images" / image_id

    def _volume_path(self, volume_id: str) -> Path:
        return self.workdir / "volumes" / volume_id

    def _snapshot_path(self, snapshot_id: str) -> Path:
        return self.workdir / "snapshots" / snapshot_id

    def _flavor_id(self, flavor: str) -> str:
        if flavor in self.flavors:
            return flavor
        for fid, spec in self.flavors.items():
            if spec[0] == flavor:
                return fid
        raise FakeError(400, f"Flavor {flavor} could not be found.")

    def _new_image(
        self, name: str, disk_format: str | None, container_format: str | None
    ) -> _Image:
        now = _now()
        image = _Image(str(uuid.uuid4()), name, disk_format, container_format, "queued", now, now)
        self._images[image.id] = image
        return image

    def _finish_image(self, image: _Image, length: int) -> None:
        data = self._image_path(image.id).read_bytes()
        image.size = length
        image.checksum = hashlib.md5(data, usedforsecurity=False).hexdigest()
        image.status = "active"
        image.updated = _now()

    def _new_volume(self, name: str, length: int, **fields: Any) -> _Volume:
        volume = _Volume(str(uuid.uuid4()), name, "creating", _now(), length, **fields)
        volume.gib = max(volume.gib, _gib(length))
        self._volumes[volume.id] = volume
        return volume

    def _volume_from_image(self, image: _Image, name: str, gib: int, **fields: Any) -> _Volume:
        """A bootable volume holding ``image``'s data (cinder's create from an image)."""
        if gib < _gib(image.size or 0):
            raise FakeError(
                400,
                f"Image virtual size is {_gib(image.size or 0)}GB and doesn't fit in a volume"
                f" of size {gib}GB.",
            )
        volume = self._new_volume(name, image.size or 0, gib=gib, **fields)
        shutil.copyfile(self._image_path(image.id), self._volume_path(volume.id))
        volume.image_id, volume.bootable = image.id, True
        core = {
            "image_id": image.id,
            "image_name": image.name,
            "checksum": image.checksum,
            "container_format": image.container_format,
            "disk_format": image.disk_format,
            "min_disk": image.min_disk,
            "min_ram": image.min_ram,
            "size": image.size,
        }
        volume.image_metadata = {
            **{k: str(v) for k, v in core.items() if v is not None},
            **image.properties,
        }
        return volume

    def _check_image_boot(self, flavor_id: str, image: _Image) -> None:
        """What nova checks of a server booted from an image (on the flavor's disk)."""
        disk = self.flavors[flavor_id][3]
        if disk == 0:
            raise FakeError(
                403,
                "Only volume-backed servers are allowed for flavors with zero disk.",
                "forbidden",
            )
        if (image.size or 0) > disk * GIB:
            raise FakeError(
                400,
                f"Flavor's disk is too small for requested image. Flavor disk is {disk * GIB}"
                f" bytes, image is {image.size} bytes.",
            )

    def _boot(
        self,
        name: str,
        flavor_id: str,
        image: _Image,
        metadata: dict[str, str],
        root_gib: int | None,
        delete_on_termination: bool,
    ) -> _Server:
        """A server from ``image``: on a new root volume of ``root_gib`` GiB, or (None) on
        the hypervisor's disk."""
        now = _now()
        server_id = str(uuid.uuid4())
        volume_ids = []
        if root_gib is not None:
            volume = self._volume_from_image(
                image,
                "",
                root_gib,
                server_id=server_id,
                resting="in-use",
                device="/dev/vda",
                delete_on_termination=delete_on_termination,
            )
            volume.status = "in-use"
            volume_ids.append(volume.id)
        server = _Server(
            server_id,
            name,
            flavor_id,
            image.id,
            volume_ids[0] if volume_ids else None,
            volume_ids,
            metadata,
            now,
            now,
        )
        self._servers[server.id] = server
        return server

    def _pending(self) -> list[_Volume | _Snapshot | _Image | _Server]:
        things: list[_Volume | _Snapshot | _Image | _Server] = [
            *self._servers.values(),
            *self._volumes.values(),
            *self._snapshots.values(),
            *self._images.values(),
        ]
        return [t for t in things if t.polls_left > 0]

    def _step(self) -> None:
        """A request: everything being made is one step nearer done (as time passes)."""
        for thing in self._pending():
            thing.polls_left -= 1
            if thing.polls_left == 0:
                self._settle(thing)

    def settle(self) -> None:
        """Finish everything being made now, as time does."""
        with self._lock:
            for thing in self._pending():
                thing.polls_left = 0
                self._settle(thing)

    def _settle(self, thing: _Volume | _Snapshot | _Image | _Server) -> None:
        if isinstance(thing, _Server) and thing.deleting:
            self._remove_server(thing)
        elif isinstance(thing, _Server):
            thing.status = thing.ends
            thing.updated = _now()
        elif isinstance(thing, _Snapshot) and thing.status == "deleting":
            if thing.busy:  # the backend's SnapshotIsBusy: cinder puts it back
                thing.busy, thing.status = False, "available"
            else:
                del self._snapshots[thing.id]
                self._snapshot_path(thing.id).unlink(missing_ok=True)
        elif isinstance(thing, _Volume) and thing.status == "deleting":
            del self._volumes[thing.id]
            self._volume_path(thing.id).unlink(missing_ok=True)
        elif isinstance(thing, _Image):
            if thing.status == "saving":
                if thing.doomed:
                    thing.status = "killed"
                    self._image_path(thing.id).unlink(missing_ok=True)
                else:
                    self._finish_image(thing, self._image_path(thing.id).stat().st_size)
                for volume in self._volumes.values():
                    if volume.upload_image == thing.id:
                        volume.upload_image = None
                        volume.status = volume.resting
        elif isinstance(thing, _Snapshot) or thing.status == "creating":
            thing.status = "available"

    def _later(self, thing: _Volume | _Snapshot | _Image | _Server) -> None:
        thing.polls_left = self.settle_polls
        if thing.polls_left == 0:
            self._settle(thing)

    # -- JSON views --------------------------------------------------------------------------

    def _server_json(self, s: _Server, base: str) -> dict[str, Any]:
        self_href = f"{base}/compute/v2.1/{self.project_id}/servers/{s.id}"
        return {
            "id": s.id,
            "name": s.name,
            "status": s.status,
            "tenant_id": self.project_id,
            "user_id": self.user_id,
            "metadata": dict(s.metadata),
            "hostId": hashlib.sha224(f"{self.project_id}host".encode()).hexdigest(),
            # nova shows "" for a server booted from a volume
            "image": "" if s.root_volume else {"id": s.image_id, "links": []},
            "flavor": {
                "id": s.flavor_id,
                "links": [{"rel": "bookmark", "href": f"{base}/compute/flavors/{s.flavor_id}"}],
            },
            "created": s.created,
            "updated": s.updated,
            "addresses": {},
            "accessIPv4": "",
            "accessIPv6": "",
            "links": [
                {"rel": "self", "href": self_href},
                {"rel": "bookmark", "href": f"{base}/compute/servers/{s.id}"},
            ],
            "OS-DCF:diskConfig": "AUTO",
            "OS-EXT-AZ:availability_zone": "nova",
            "OS-EXT-STS:power_state": 1 if s.status == "ACTIVE" else 0,
            "OS-EXT-STS:task_state": "deleting" if s.deleting else None,
            "OS-EXT-STS:vm_state": s.status.lower(),
            "os-extended-volumes:volumes_attached": [
                {"id": v, "delete_on_termination": self._volumes[v].delete_on_termination}
                for v in s.volume_ids
            ],
            "progress": 100 if s.status == "ACTIVE" else 0,
            **({"fault": {"code": 500, "message": s.fault}} if s.status == "ERROR" else {}),
            "config_drive": "",
            "key_name": None,
        }

    def _flavor_json(self, fid: str, base: str) -> dict[str, Any]:
        name, vcpus, ram, disk = self.flavors[fid]
        return {
            "id": fid,
            "name": name,
            "vcpus": vcpus,
            "ram": ram,
            "disk": disk,
            "swap": "",
            "OS-FLV-EXT-DATA:ephemeral": 0,
            "OS-FLV-DISABLED:disabled": False,
            "os-flavor-access:is_public": True,
            "rxtx_factor": 1.0,
            "links": [{"rel": "self", "href": f"{base}/compute/v2.1/flavors/{fid}"}],
        }

    def _image_json(self, i: _Image) -> dict[str, Any]:
        return {
            "id": i.id,
            "name": i.name,
            "status": i.status,
            "visibility": "private",
            "protected": False,
            "owner": self.project_id,
            "size": i.size,
            "virtual_size": None,
            "checksum": i.checksum,
            "disk_format": i.disk_format,
            "container_format": i.container_format,
            "min_disk": i.min_disk,
            "min_ram": i.min_ram,
            "tags": [],
            "created_at": i.created,
            "updated_at": i.updated,
            "self": f"/v2/images/{i.id}",
            "file": f"/v2/images/{i.id}/file",
            "schema": "/v2/schemas/image",
            **i.properties,
        }

    def _volume_json(self, v: _Volume) -> dict[str, Any]:
        attachments = []
        if v.server_id is not None:
            attachments.append(
                {
                    "id": v.id,
                    "attachment_id": hashlib.md5(
                        f"{v.id}{v.server_id}".encode(), usedforsecurity=False
                    ).hexdigest(),
                    "volume_id": v.id,
                    "server_id": v.server_id,
                    "device": v.device,
                    "host_name": None,
                    "attached_at": v.created,
                }
            )
        return {
            "id": v.id,
            "name": v.name,
            "description": None,
            "status": v.status,
            "size": max(v.gib, _gib(v.length)),
            "bootable": "true" if v.bootable else "false",
            "attachments": attachments,
            "availability_zone": "nova",
            "created_at": v.created,
            "updated_at": v.created,
            "snapshot_id": v.snapshot_id,
            "source_volid": None,
            "volume_type": "luks" if v.encrypted else "lvmdriver-1",
            "metadata": dict(v.metadata),
            "multiattach": False,
            "encrypted": v.encrypted,
            "os-vol-tenant-attr:tenant_id": self.project_id,
            "user_id": self.user_id,
            "links": [],
            **({"volume_image_metadata": dict(v.image_metadata)} if v.image_metadata else {}),
        }

    def _snapshot_json(self, s: _Snapshot) -> dict[str, Any]:
        return {
            "id": s.id,
            "name": s.name,
            "description": None,
            "status": s.status,
            "volume_id": s.volume_id,
            "size": s.gib,
            "created_at": s.created,
            "updated_at": s.created,
            "metadata": dict(s.metadata),
            "progress": "100%" if s.status == "available" else "0%",
        }

    def _nova_image_json(self, i: _Image) -> dict[str, Any]:
        return {
            "id": i.id,
            "name": i.name,
            "status": {"active": "ACTIVE", "saving": "SAVING", "killed": "ERROR"}.get(
                i.status, "UNKNOWN"
            ),
            "created": i.created,
            "updated": i.updated,
            "minDisk": i.min_disk,
            "minRam": i.min_ram,
            "progress": 100 if i.status == "active" else 25,
            "metadata": dict(i.properties),
            "OS-EXT-IMG-SIZE:size": i.size,
            "links": [],
        }

    def _nova_snapshot_json(self, s: _Snapshot) -> dict[str, Any]:
        return {
            "id": s.id,
            "volumeId": s.volume_id,
            "status": s.status,
            "size": s.gib,
            "createdAt": s.created,
            "displayName": s.name,
            "displayDescription": None,
        }

    def _catalog(self, base: str) -> list[dict[str, Any]]:
        def service(kind: str, name: str, url: str) -> dict[str, Any]:
            return {
                "id": uuid.uuid5(uuid.NAMESPACE_URL, url).hex,
                "type": kind,
                "name": name,
                "endpoints": [
                    {
                        "id": uuid.uuid5(uuid.NAMESPACE_URL, url + iface).hex,
                        "interface": iface,
                        "region": self.region,
                        "region_id": self.region,
                        "url": url,
                    }
                    for iface in ("public", "internal", "admin")
                ],
            }

        volume = f"{base}/volume/v3/{self.project_id}"
        return [
            service("identity", "keystone", f"{base}/identity"),
            service("compute", "nova", f"{base}/compute/v2.1"),
            service("image", "glance", f"{base}/image"),
            service("volumev3", "cinderv3", volume),
            service("block-storage", "cinder", volume),
            service("object-store", "swift", f"{base}/object-store/v1/AUTH_{self.project_id}"),
        ]

    # -- the API ------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes, base: str
    ) -> tuple[int, dict[str, str], bytes]:
        """One request: answers status, headers, body (raises FakeError for an error)."""
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path.rstrip("/") or "/"
        query = urllib.parse.parse_qs(parsed.query)
        route = re.sub(r"/[0-9a-f]{32}(?=/|$)|/[0-9a-f-]{36}(?=/|$)", "/{id}", path)
        with self._lock:
            self.counts[f"{method} {route}"] += 1
            failure = next(
                (f for f in self._failures if f.method == method and f.pattern.search(path)),
                None,
            )
            if failure is not None:
                self._failures.remove(failure)
                if failure.after:  # done (and counted) once, its answer lost
                    self.counts[f"{method} {route}"] -= 1
                    with contextlib.suppress(FakeError):
                        self.handle(method, raw_path, headers, body, base)
                raise FakeError(failure.status, failure.message)
            if path == "/identity/v3/auth/tokens" and method == "POST":
                return self._auth(body, base)
            if path in ("/identity", "/identity/v3"):
                return _json(200, {"version": {"id": "v3.14", "status": "stable"}})
            token = headers.get("x-auth-token", "")
            if token not in self._tokens:
                raise FakeError(401, "The request you have made requires authentication.")
            self._step()
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
            if parts[:2] == ["compute", "v2.1"]:
                rest = parts[2:]
                if rest and rest[0] == self.project_id:
                    rest = rest[1:]
                return self._nova(method, rest, query, body, base)
            if parts[:2] == ["image", "v2"]:
                return self._glance(method, parts[2:], headers, body, query)
            if parts[:3] == ["volume", "v3", self.project_id]:
                return self._cinder(method, parts[3:], body, query)
            raise FakeError(404, f"The resource could not be found: {path}")

    def _auth(self, body: bytes, base: str) -> tuple[int, dict[str, str], bytes]:
        try:
            auth = json.loads(body)["auth"]
            identity = auth["identity"]
            user = identity["password"]["user"]
            project = auth.get("scope", {}).get("project", {})
        except (ValueError, KeyError, TypeError) as e:
            raise FakeError(400, f"Expecting to find auth in request body: {e}") from None
        if "password" not in identity.get("methods", []):
            raise FakeError(401, "The request you have made requires authentication.")
        if (
            user.get("name") != self.username
            or user.get("password") != self.password
            or user.get("domain", {}).get("name", self.domain) != self.domain
        ):
            raise FakeError(401, "The request you have made requires authentication.")
        if project and project.get("name", self.project) != self.project:
            raise FakeError(401, f"Could not find project: {project.get('name')}")
        token = uuid.uuid4().hex
        self._tokens.add(token)
        now = dt.datetime.now(dt.UTC)
        answer = {
            "token": {
                "methods": ["password"],
                "expires_at": (now + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                "user": {
                    "id": self.user_id,
                    "name": self.username,
                    "domain": {"id": "default", "name": self.domain},
                },
                "project": {
                    "id": self.project_id,
                    "name": self.project,
                    "domain": {"id": "default", "name": self.domain},
                },
                "roles": [{"id": "member", "name": "member"}],
                "catalog": self._catalog(base),
            }
        }
        status, hdrs, data = _json(201, answer)
        hdrs["X-Subject-Token"] = token
        return status, hdrs, data

    # nova

    def _nova(
        self, method: str, rest: list[str], query: dict[str, list[str]], body: bytes, base: str
    ) -> tuple[int, dict[str, str], bytes]:
        if rest in (["servers"], ["servers", "detail"]) and method == "GET":
            return self._list_servers(rest, query, base)
        if rest == ["servers"] and method == "POST":
            return self._create_server(_body(body), base)
        if rest in (["flavors"], ["flavors", "detail"]) and method == "GET":
            flavors = [self._flavor_json(f, base) for f in self.flavors]
            if rest == ["flavors"]:
                flavors = [{k: f[k] for k in ("id", "name", "links")} for f in flavors]
            return _json(200, {"flavors": flavors})
        if len(rest) == 2 and rest[0] == "flavors" and method == "GET":
            if rest[1] not in self.flavors:
                raise FakeError(404, f"Flavor {rest[1]} could not be found.")
            return _json(200, {"flavor": self._flavor_json(rest[1], base)})
        if len(rest) == 2 and rest[0] == "images":
            # nova's proxy of glance images (libcloud's delete_image uses it)
            image = self._images.get(rest[1])
            if image is None:
                raise FakeError(404, "Image not found.")
            if method == "GET":
                return _json(200, {"image": self._nova_image_json(image)})
            if method == "DELETE":
                self._delete_image(image)
                return 204, {}, b""
        if len(rest) == 2 and rest[0] == "os-snapshots":
            # nova's deprecated proxy of cinder snapshots (libcloud's ex_get_snapshot uses it)
            snap = self._snapshots.get(rest[1])
            if snap is None:
                raise FakeError(404, f"Snapshot {rest[1]} could not be found.")
            if method == "GET":
                return _json(200, {"snapshot": self._nova_snapshot_json(snap)})
            if method == "DELETE":
                self._delete_snapshot(snap)
                return 202, {}, b""
        if len(rest) >= 2 and rest[0] == "servers":
            server = self._servers.get(rest[1])
            if server is None:
                raise FakeError(404, f"Instance {rest[1]} could not be found.")
            sub = rest[2:]
            if not sub:
                if method == "GET":
                    return _json(200, {"server": self._server_json(server, base)})
                if method == "DELETE":
                    self._delete_server(server)
                    return 204, {}, b""
            elif sub == ["metadata"]:
                return self._server_metadata(server, method, body)
            elif len(sub) == 2 and sub[0] == "metadata":
                return self._server_metadata_key(server, sub[1], method, body)
            elif sub == ["os-volume_attachments"] and method == "GET":
                attachments = [
                    {
                        "id": v,
                        "volumeId": v,
                        "serverId": server.id,
                        "device": self._volumes[v].device,
                    }
                    for v in server.volume_ids
                ]
                return _json(200, {"volumeAttachments": attachments})
        raise FakeError(404, f"The resource could not be found: {'/'.join(rest)}")

    def _list_servers(
        self, rest: list[str], query: dict[str, list[str]], base: str
    ) -> tuple[int, dict[str, str], bytes]:
        servers = sorted(self._servers.values(), key=lambda s: (s.created, s.id))
        if "name" in query:  # nova's name filter is a regular expression
            try:
                pattern = re.compile(query["name"][-1])
            except re.error:
                raise FakeError(400, "Invalid input for field/attribute name.") from None
            servers = [s for s in servers if pattern.search(s.name)]
        marker = query.get("marker", [None])[-1]
        if marker is not None:
            ids = [s.id for s in servers]
            if marker not in ids:
                raise FakeError(400, f"marker [{marker}] not found")
            servers = servers[ids.index(marker) + 1 :]
        limit = self.page_size
        if "limit" in query:
            try:
                limit = min(limit, int(query["limit"][-1]))
            except ValueError:
                raise FakeError(400, "Invalid input for field/attribute limit.") from None
            if limit < 0:
                raise FakeError(400, "Invalid input for field/attribute limit.")
        page, more = servers[:limit], len(servers) > limit
        if rest == ["servers"]:
            items: list[dict[str, Any]] = [
                {"id": s.id, "name": s.name, "links": self._server_json(s, base)["links"]}
                for s in page
            ]
        else:
            items = [self._server_json(s, base) for s in page]
        answer: dict[str, Any] = {"servers": items}
        if more and page:
            kept = {"name": query["name"][-1]} if "name" in query else {}
            q = urllib.parse.urlencode({**kept, "limit": limit, "marker": page[-1].id})
            href = f"{base}/compute/v2.1/{'/'.join(rest)}?{q}"
            answer["servers_links"] = [{"rel": "next", "href": href}]
        return _json(200, answer)

    def _create_server(self, body: dict[str, Any], base: str) -> tuple[int, dict[str, str], bytes]:
        spec = body.get("server")
        if not isinstance(spec, dict):
            raise FakeError(400, "Invalid input: 'server' is a required property")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise FakeError(400, "Invalid input for field/attribute name.")
        metadata = _metadata(spec.get("metadata", {}))
        _metadata_quota(metadata)
        flavor_ref = str(spec.get("flavorRef", ""))
        if flavor_ref not in self.flavors:
            raise FakeError(400, f"Flavor {flavor_ref} could not be found.")
        rows = self._mappings(spec.get("block_device_mapping_v2"))
        image_ref = str(rows[0]["uuid"] if rows else spec.get("imageRef") or "")
        if not image_ref:
            raise FakeError(
                400,
                "Block Device Mapping is Invalid: Boot sequence for the instance and image/block"
                " device mapping combination is not valid.",
            )
        image = self._images.get(image_ref)
        if image is None:
            raise FakeError(400, f"Image {image_ref} could not be found.")
        if image.status != "active":
            raise FakeError(400, f"Image {image_ref} is not active.")
        if not rows:
            self._check_image_boot(flavor_ref, image)
            server = self._boot(name, flavor_ref, image, metadata, None, False)
        else:
            root = rows[0]
            server = self._boot(
                name, flavor_ref, image, metadata, root["volume_size"], root["delete"]
            )
            for n, row in enumerate(rows[1:], start=1):
                volume = self._volume_from_image(
                    row["image"],
                    "",
                    row["volume_size"],
                    server_id=server.id,
                    resting="in-use",
                    device=f"/dev/vd{chr(ord('a') + n)}",
                    delete_on_termination=row["delete"],
                )
                volume.status = "in-use"
                server.volume_ids.append(volume.id)
        server.status = "BUILD"
        if self._boot_failures:
            self._boot_failures -= 1
            server.ends, server.fault = "ERROR", self._boot_fault
        self._later(server)
        answer = {
            "server": {
                "id": server.id,
                "links": self._server_json(server, base)["links"],
                "adminPass": uuid.uuid4().hex[:12],
                "OS-DCF:diskConfig": "AUTO",
                "security_groups": [{"name": "default"}],
            }
        }
        return _json(202, answer)

    def _mappings(self, given: Any) -> list[dict[str, Any]]:
        """The rows of a ``block_device_mapping_v2``, the boot row (``boot_index`` 0) first
        and the others in their order; [] without one. Every row is an image to a new volume
        (the only kind the fake makes); the others are not bootable (``boot_index`` negative
        or none)."""
        if given is None:
            return []
        if not isinstance(given, list) or not all(isinstance(m, dict) for m in given):
            raise FakeError(400, "Invalid input for field/attribute block_device_mapping_v2.")
        boot = [m for m in given if str(m.get("boot_index")) == "0"]
        others = [m for m in given if str(m.get("boot_index")) != "0"]
        if len(boot) != 1:
            raise FakeError(
                400,
                "Block Device Mapping is Invalid: Boot sequence for the instance and image/block"
                " device mapping combination is not valid.",
            )
        for row in others:
            index = row.get("boot_index")
            if index is not None and (not isinstance(index, int) or index >= 0):
                raise FakeError(
                    400,
                    "Block Device Mapping is Invalid: Boot sequence for the instance and"
                    " image/block device mapping combination is not valid.",
                )
        return [self._mapping_row(row) for row in boot + others]

    def _mapping_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("source_type") != "image" or row.get("destination_type") != "volume":
            raise FakeError(
                400,
                "Block Device Mapping is Invalid: the fake makes source_type image to"
                " destination_type volume only.",
            )
        size = row.get("volume_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise FakeError(
                400,
                "Block Device Mapping is Invalid: Images with destination_type 'volume' need to"
                " have a non-zero size specified.",
            )
        if not isinstance(row.get("uuid"), str):
            raise FakeError(400, "Block Device Mapping is Invalid: no image uuid.")
        delete = row.get("delete_on_termination", False)
        if not isinstance(delete, bool):
            raise FakeError(400, "Invalid input for field/attribute delete_on_termination.")
        image = self._images.get(row["uuid"])
        if image is None:
            raise FakeError(400, f"Image {row['uuid']} could not be found.")
        if image.status != "active":
            raise FakeError(400, f"Image {row['uuid']} is not active.")
        if size * GIB < (image.size or 0):
            raise FakeError(
                400,
                "Volume is smaller than the minimum size specified in image metadata."
                f" Volume size is {size * GIB} bytes, minimum size is {image.size} bytes.",
            )
        return {"uuid": row["uuid"], "volume_size": size, "delete": delete, "image": image}

    def _delete_server(self, server: _Server) -> None:
        """Nova deletes a server in the background: it stays (task_state ``deleting``) for
        ``settle_polls`` steps."""
        server.deleting = True
        self._later(server)

    def _remove_server(self, server: _Server) -> None:
        del self._servers[server.id]
        for volume_id in server.volume_ids:
            volume = self._volumes[volume_id]
            held = any(s.volume_id == volume_id for s in self._snapshots.values())
            if volume.delete_on_termination and not held:
                del self._volumes[volume_id]
                self._volume_path(volume_id).unlink(missing_ok=True)
            else:
                # kept (a volume with snapshots cannot go: nova logs it and goes on)
                volume.server_id = volume.device = None
                volume.status = volume.resting = "available"

    def _server_metadata(
        self, server: _Server, method: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET":
            return _json(200, {"metadata": dict(server.metadata)})
        if method in ("PUT", "POST"):
            given = _body(body).get("metadata")
            if not isinstance(given, dict):
                raise FakeError(400, "Invalid input: 'metadata' is a required property")
            metadata = _metadata(given)
            merged = metadata if method == "PUT" else {**server.metadata, **metadata}
            _metadata_quota(merged)
            server.metadata = merged
            server.updated = _now()
            return _json(200, {"metadata": dict(server.metadata)})
        raise FakeError(405, "Method not allowed")

    def _server_metadata_key(
        self, server: _Server, key: str, method: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET":
            if key not in server.metadata:
                raise FakeError(404, "Metadata item was not found")
            return _json(200, {"meta": {key: server.metadata[key]}})
        if method == "PUT":
            meta = _body(body).get("meta")
            if not isinstance(meta, dict) or len(meta) != 1:
                raise FakeError(400, "Request body contains too many items")
            if key not in meta:
                raise FakeError(400, "Request body and URI mismatch")
            merged = {**server.metadata, **_metadata(meta)}
            _metadata_quota(merged)
            server.metadata = merged
            server.updated = _now()
            return _json(200, {"meta": {key: server.metadata[key]}})
        if method == "DELETE":
            if key not in server.metadata:
                raise FakeError(404, "Metadata item was not found")
            del server.metadata[key]
            server.updated = _now()
            return 204, {}, b""
        raise FakeError(405, "Method not allowed")

    # glance

    def _glance(
        self,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        query: dict[str, list[str]],
    ) -> tuple[int, dict[str, str], bytes]:
        if rest == ["images"]:
            if method == "GET":
                return self._list_images(query)
            if method == "POST":
                return self._create_image(_body(body))
        if len(rest) >= 2 and rest[0] == "images":
            found = self._images.get(rest[1])
            if found is None:
                raise FakeError(404, f"No image found with ID {rest[1]}")
            image = found
            if len(rest) == 2:
                if method == "GET":
                    return _json(200, self._image_json(image))
                if method == "PATCH":
                    kind = headers.get("content-type", "").split(";")[0].strip()
                    if kind != _JSON_PATCH:
                        raise FakeError(415, f"Unsupported Content-Type: {kind or 'none'}")
                    self._patch_image(image, body)
                    return _json(200, self._image_json(image))
                if method == "DELETE":
                    self._delete_image(image)
                    return 204, {}, b""
            elif rest[2:] == ["file"]:
                if method == "PUT":
                    kind = headers.get("content-type", "").split(";")[0].strip()
                    if kind != "application/octet-stream":
                        raise FakeError(415, f"Unsupported Content-Type: {kind or 'none'}")
                    if image.status != "queued":
                        raise FakeError(
                            409,
                            f"Image status transition from {image.status} to saving is not allowed",
                        )
                    if not image.disk_format or not image.container_format:
                        raise FakeError(
                            400,
                            "Properties disk_format, container_format must be"
                            " set prior to saving data.",
                        )
                    self._image_path(image.id).write_bytes(body)
                    self._finish_image(image, len(body))
                    return 204, {}, b""
                if method == "GET":
                    return self._download(image, headers.get("range"))
        raise FakeError(404, f"The resource could not be found: {'/'.join(rest)}")

    def _list_images(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        """glance's list: ``name``, ``status`` and any property filter (``?key=value``),
        pages of ``limit`` (``image_page_size`` unasked) after ``marker``, a ``next`` link
        while more are left."""
        wanted = {k: v[-1] for k, v in query.items() if k not in _GLANCE_LIST_PARAMS}
        found = []
        for i in sorted(self._images.values(), key=lambda i: (i.created, i.id), reverse=True):
            fields = {"name": i.name, "status": i.status, "visibility": "private", **i.properties}
            if all(fields.get(k) == v for k, v in wanted.items()):
                found.append(i)
        marker = query.get("marker", [None])[-1]
        if marker is not None:
            ids = [i.id for i in found]
            if marker not in ids:
                raise FakeError(404, f"marker {marker} could not be found.")
            found = found[ids.index(marker) + 1 :]
        try:
            limit = min(int(query.get("limit", [self.image_page_size])[-1]), 1000)
        except ValueError:
            raise FakeError(400, "limit param must be an integer") from None
        if limit < 0:
            raise FakeError(400, "limit param must be positive")
        page = found[:limit]
        answer: dict[str, Any] = {
            "images": [self._image_json(i) for i in page],
            "first": "/v2/images",
            "schema": "/v2/schemas/images",
        }
        if len(found) > limit and page:
            params = {**wanted, "limit": str(limit), "marker": page[-1].id}
            answer["next"] = f"/v2/images?{urllib.parse.urlencode(params)}"
        return _json(200, answer)

    def _create_image(self, spec: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        name = spec.get("name")
        properties: dict[str, str] = {}
        for key, value in spec.items():
            if key in _GLANCE_FIELDS:
                continue
            if not isinstance(value, str):  # glance's schema: extra properties are strings
                raise FakeError(400, f"Provided object does not match schema 'image': {key}")
            if len(key) > _METADATA_LIMIT:
                raise FakeError(400, f"Provided object does not match schema 'image': {key}")
            properties[key] = value
        min_disk, min_ram = spec.get("min_disk", 0), spec.get("min_ram", 0)
        if not all(isinstance(n, int) and n >= 0 for n in (min_disk, min_ram)):
            raise FakeError(400, "Provided object does not match schema 'image': min_disk")
        image = self._new_image(
            name if isinstance(name, str) else "",
            spec.get("disk_format"),
            spec.get("container_format"),
        )
        image.properties, image.min_disk, image.min_ram = properties, min_disk, min_ram
        return _json(201, self._image_json(image))

    def _patch_image(self, image: _Image, body: bytes) -> None:
        """glance's JSON patch of properties (``add``, ``replace``, ``remove``) and ``name``."""
        try:
            ops = json.loads(body or b"[]")
        except ValueError:
            raise FakeError(400, "Malformed JSON in request body.") from None
        if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
            raise FakeError(400, "Request body must be a JSON array of operation objects.")
        properties = dict(image.properties)
        name = image.name
        for op in ops:
            kind, path, value = op.get("op"), op.get("path"), op.get("value")
            if kind not in ("add", "replace", "remove") or not isinstance(path, str):
                raise FakeError(400, f"Invalid operation: {op}")
            key = path.removeprefix("/")
            if key == "name" and kind != "remove" and isinstance(value, str):
                name = value
                continue
            if key in _GLANCE_FIELDS or not key or "/" in key:
                raise FakeError(403, f"Attribute '{key}' is read-only.")
            if kind in ("remove", "replace") and key not in properties:
                raise FakeError(409, f"Property {key} does not exist.")
            if kind == "remove":
                del properties[key]
            elif not isinstance(value, str) or len(key) > _METADATA_LIMIT:
                raise FakeError(400, f"Provided object does not match schema 'image': {key}")
            else:
                properties[key] = value
        image.properties, image.name = properties, name
        image.updated = _now()

    def _delete_image(self, image: _Image) -> None:
        del self._images[image.id]
        self._image_path(image.id).unlink(missing_ok=True)
        for volume in self._volumes.values():
            if volume.upload_image == image.id:
                volume.upload_image = None
                volume.status = volume.resting

    def _download(
        self, image: _Image, range_header: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if image.status != "active":
            return 204, {}, b""
        path = self._image_path(image.id)
        size = path.stat().st_size
        content = {"Content-Type": "application/octet-stream"}
        if image.checksum:
            content["Content-MD5"] = image.checksum
        if not range_header or self.ignore_range:
            return 200, content, path.read_bytes()
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
        if not match or (not match[1] and not match[2]):
            raise FakeError(400, f"Invalid Range header: {range_header}")
        if match[1]:
            start = int(match[1])
            end = int(match[2]) if match[2] else size - 1
        else:
            start, end = max(0, size - int(match[2])), size - 1
        if start >= size or end < start:
            raise FakeError(416, f"Request range not satisfiable: {range_header}")
        end = min(end, size - 1)
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        content["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, content, data

    # cinder

    def _cinder(
        self, method: str, rest: list[str], body: bytes, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, str], bytes]:
        if rest in (["volumes"], ["volumes", "detail"]) and method == "GET":
            wanted = _metadata_filter(query)
            volumes = [
                self._volume_json(v)
                for v in self._volumes.values()
                if wanted.items() <= v.metadata.items()
            ]
            if rest == ["volumes"]:
                volumes = [{k: v[k] for k in ("id", "name", "links")} for v in volumes]
            return _json(200, {"volumes": volumes})
        if rest == ["volumes"] and method == "POST":
            return self._create_volume(_body(body))
        if rest in (["snapshots"], ["snapshots", "detail"]) and method == "GET":
            wanted = _metadata_filter(query)
            snaps = [
                self._snapshot_json(s)
                for s in self._snapshots.values()
                if wanted.items() <= s.metadata.items()
            ]
            return _json(200, {"snapshots": snaps})
        if rest == ["snapshots"] and method == "POST":
            return self._create_snapshot(_body(body))
        if len(rest) >= 2 and rest[0] == "volumes":
            volume = self._volumes.get(rest[1])
            if volume is None:
                raise FakeError(404, f"Volume {rest[1]} could not be found.")
            if len(rest) == 2 and method == "GET":
                return _json(200, {"volume": self._volume_json(volume)})
            if len(rest) == 2 and method == "DELETE":
                return self._delete_volume(volume)
            if rest[2:] == ["action"] and method == "POST":
                return self._volume_action(volume, _body(body))
            if rest[2:3] == ["metadata"]:
                return _cinder_metadata(volume, rest[3:], method, body)
        if len(rest) >= 2 and rest[0] == "snapshots":
            snap = self._snapshots.get(rest[1])
            if snap is None:
                raise FakeError(404, f"Snapshot {rest[1]} could not be found.")
            if rest[2:3] == ["metadata"]:
                return _cinder_metadata(snap, rest[3:], method, body)
            if len(rest) == 2 and method == "GET":
                return _json(200, {"snapshot": self._snapshot_json(snap)})
            if len(rest) == 2 and method == "DELETE":
                self._delete_snapshot(snap)
                return 202, {}, b""
        raise FakeError(404, f"The resource could not be found: {'/'.join(rest)}")

    def _delete_snapshot(self, snap: _Snapshot) -> None:
        """Cinder deletes in the background: ``deleting`` for ``settle_polls`` steps, then
        gone; or, while a volume made from it exists (an RBD clone depends on it), back to
        ``available`` (the backend's SnapshotIsBusy), the answer 202 all the same."""
        if snap.status not in ("available", "error"):
            raise FakeError(400, "Invalid snapshot: Snapshot status must be available or error")
        snap.status = "deleting"
        snap.busy = any(v.snapshot_id == snap.id for v in self._volumes.values())
        self._later(snap)

    def _create_volume(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        spec = body.get("volume")
        if not isinstance(spec, dict):
            raise FakeError(400, "Invalid input: 'volume' is a required property")
        name = str(spec.get("name") or "")
        metadata = _metadata(spec.get("metadata") or {})
        size: int | None = None
        if spec.get("size") is not None:
            try:
                size = int(spec["size"])
            except (TypeError, ValueError):
                raise FakeError(400, "Invalid input for field/attribute size.") from None
            if size < 1:
                raise FakeError(400, "Invalid input for field/attribute size.")
        if spec.get("snapshot_id"):
            snap = self._snapshots.get(str(spec["snapshot_id"]))
            if snap is None:
                raise FakeError(404, f"Snapshot {spec['snapshot_id']} could not be found.")
            if snap.status != "available":
                raise FakeError(400, "Originating snapshot status must be one of 'available'")
            if size is not None and size < snap.gib:
                raise FakeError(
                    400,
                    f"Invalid input received: Volume size '{size}'GB cannot be smaller than"
                    f" the snapshot size {snap.gib}GB. They must be >= original snapshot size.",
                )
            volume = self._new_volume(
                name,
                snap.length,
                gib=size or snap.gib,
                snapshot_id=snap.id,
                bootable=snap.bootable,
                encrypted=snap.encrypted,
                image_metadata=dict(snap.image_metadata),
            )
            shutil.copyfile(self._snapshot_path(snap.id), self._volume_path(volume.id))
        elif spec.get("imageRef"):
            image = self._images.get(str(spec["imageRef"]))
            if image is None or image.status != "active":
                raise FakeError(400, f"Image {spec['imageRef']} could not be found.")
            volume = self._volume_from_image(image, name, size or _gib(image.size or 0))
        elif size is None:
            raise FakeError(400, "Invalid input: 'size' is a required property")
        else:
            volume = self._new_volume(name, 0, gib=size)
            self._volume_path(volume.id).write_bytes(b"")
        volume.metadata = metadata
        self._later(volume)
        answer = self._volume_json(volume)
        if volume.status != "creating":
            answer["status"] = "creating"
        return _json(202, {"volume": answer})

    def _delete_volume(self, volume: _Volume) -> tuple[int, dict[str, str], bytes]:
        if volume.server_id is not None or volume.status not in ("available", "error"):
            raise FakeError(
                400,
                "Invalid volume: Volume status must be available or error or error_restoring"
                " or error_extending or error_managing and must not be migrating, attached,"
                " belong to a group, have snapshots or be disassociated from snapshots after"
                " volume transfer.",
            )
        if any(s.volume_id == volume.id for s in self._snapshots.values()):
            raise FakeError(400, "Invalid volume: Volume still has dependent snapshots.")
        # in the background: ``deleting`` for settle_polls steps, then gone (404)
        volume.status = "deleting"
        self._later(volume)
        return 202, {}, b""

    def _volume_action(
        self, volume: _Volume, body: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes]:
        spec = body.get("os-volume_upload_image")
        if not isinstance(spec, dict):
            raise FakeError(400, f"Unsupported volume action: {sorted(body)}")
        force = str(spec.get("force", False)).lower() in ("true", "1", "yes")
        if volume.status == "in-use" and not force:
            raise FakeError(400, "Invalid volume: Volume status must be available (is in-use)")
        if volume.status not in ("available", "in-use"):
            raise FakeError(400, f"Invalid volume: Volume status is {volume.status}")
        name = spec.get("image_name")
        if not isinstance(name, str) or not name:
            raise FakeError(400, "Invalid input: 'image_name' is a required property")
        image = self._new_image(
            name,
            str(spec.get("disk_format") or "raw"),
            str(spec.get("container_format") or "bare"),
        )
        shutil.copyfile(self._volume_path(volume.id), self._image_path(image.id))
        # cinder carries the volume's image metadata to the image, but for glance's own fields
        image.properties = {
            k: v
            for k, v in volume.image_metadata.items()
            if k not in _VOLUME_IMAGE_CORE and k not in ("image_id", "image_name")
        }
        if volume.encrypted:  # the image holds LUKS ciphertext; its key is cloned for it
            image.properties["cinder_encryption_key_id"] = str(uuid.uuid4())
            image.properties["cinder_encryption_key_deletion_policy"] = "on_image_deletion"
        image.status = "saving"
        if self._upload_failures:
            self._upload_failures -= 1
            image.doomed = True
        volume.resting = volume.status
        volume.status = "uploading"
        volume.upload_image = image.id
        self._later(image)
        answer = {
            "os-volume_upload_image": {
                "id": volume.id,
                "updated_at": _now(),
                "status": "uploading",
                "display_description": None,
                "size": _gib(volume.length),
                "volume_type": {"name": "lvmdriver-1"},
                "image_id": image.id,
                "container_format": image.container_format,
                "disk_format": image.disk_format,
                "image_name": name,
            }
        }
        return _json(202, answer)

    def _create_snapshot(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        spec = body.get("snapshot")
        if not isinstance(spec, dict):
            raise FakeError(400, "Invalid input: 'snapshot' is a required property")
        volume = self._volumes.get(str(spec.get("volume_id")))
        if volume is None:
            raise FakeError(404, f"Volume {spec.get('volume_id')} could not be found.")
        force = str(spec.get("force", False)).lower() in ("true", "1", "yes")
        if volume.status == "in-use" and not force:
            raise FakeError(400, "Invalid volume: Volume status must be available (is in-use)")
        if volume.status not in ("available", "in-use"):
            raise FakeError(400, f"Invalid volume: Volume status is {volume.status}")
        snap = _Snapshot(
            str(uuid.uuid4()),
            str(spec.get("name") or ""),
            volume.id,
            "creating",
            _now(),
            volume.length,
            metadata=_metadata(spec.get("metadata") or {}),
            gib=max(volume.gib, _gib(volume.length)),
            bootable=volume.bootable,
            encrypted=volume.encrypted,
            image_metadata=dict(volume.image_metadata),
        )
        shutil.copyfile(self._volume_path(volume.id), self._snapshot_path(snap.id))
        self._snapshots[snap.id] = snap
        self._later(snap)
        answer = self._snapshot_json(snap)
        answer["status"] = "creating"
        return _json(202, {"snapshot": answer})


def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        raise FakeError(400, "Malformed request body") from None
    if not isinstance(obj, dict):
        raise FakeError(400, "Malformed request body")
    return obj


def _cinder_metadata(
    thing: _Volume | _Snapshot, key: list[str], method: str, body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """cinder's ``.../metadata``: ``GET``, ``POST`` (merge), ``PUT`` (replace), and one key's
    ``GET``/``DELETE``."""
    if not key:
        if method == "GET":
            return _json(200, {"metadata": dict(thing.metadata)})
        if method in ("POST", "PUT"):
            given = _body(body).get("metadata")
            if not isinstance(given, dict):
                raise FakeError(400, "Malformed request body")
            metadata = _metadata(given)
            thing.metadata = metadata if method == "PUT" else {**thing.metadata, **metadata}
            return _json(200, {"metadata": dict(thing.metadata)})
    elif len(key) == 1 and key[0] in thing.metadata:
        if method == "GET":
            return _json(200, {"meta": {key[0]: thing.metadata[key[0]]}})
        if method == "DELETE":
            del thing.metadata[key[0]]
            return 200, {}, b""
    elif len(key) == 1 and method in ("GET", "DELETE"):
        raise FakeError(404, f"Metadata item was not found: {key[0]}")
    raise FakeError(404, f"The resource could not be found: metadata/{'/'.join(key)}")


def _metadata_filter(query: dict[str, list[str]]) -> dict[str, str]:
    """cinder's ``metadata`` list filter: a dict, e.g. ``{"owner": "x"}`` (JSON or Python)."""
    if "metadata" not in query:
        return {}
    text = query["metadata"][-1]
    try:
        wanted = json.loads(text)
    except ValueError:
        try:
            wanted = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise FakeError(400, f"Invalid filter metadata: {text}") from None
    return _metadata(wanted)


def _metadata_quota(metadata: dict[str, str]) -> None:
    if len(metadata) > _METADATA_ITEMS:
        raise FakeError(
            403,
            "Quota exceeded for metadata_items: Requested 1, but already used"
            f" {len(metadata) - 1} of {_METADATA_ITEMS} metadata_items",
        )


def _metadata(given: Any) -> dict[str, str]:
    if not isinstance(given, dict):
        raise FakeError(400, "Invalid input for field/attribute metadata.")
    out: dict[str, str] = {}
    for key, value in given.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FakeError(400, "Invalid input for field/attribute metadata.")
        if not key or len(key) > _METADATA_LIMIT or len(value) > _METADATA_LIMIT:
            raise FakeError(400, "Invalid input for field/attribute metadata.")
        out[key] = value
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    cloud: OpenStackFake

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.cloud._lock:
            self.cloud._connections.add(self.connection)

    def finish(self) -> None:
        with self.cloud._lock:
            self.cloud._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # a streamed upload (requests sends a generator body chunked)
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        account = f"/object-store/v1/AUTH_{self.cloud.project_id}"
        if self.path == account or self.path.startswith((account + "/", account + "?")):
            self.cloud.swift.serve(self, self.path[len(account) :])  # bodies streamed
            return
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        host = self.headers.get("Host") or f"127.0.0.1:{self.cloud.port}"
        base = f"http://{host}"
        try:
            status, hdrs, data = self.cloud.handle(self.command, self.path, headers, body, base)
        except Exception as e:  # an answer for anything: a fault is a 500, as nova answers
            if not isinstance(e, FakeError):
                e = FakeError(500, f"Unexpected API Error: {type(e).__name__}: {e}")
            key = e.kind
            if self.path.startswith("/image"):
                status, hdrs, data = e.status, {"Content-Type": "text/plain"}, e.message.encode()
            elif e.status == 401:
                err = {"error": {"code": 401, "title": "Unauthorized", "message": e.message}}
                status, hdrs, data = _json(401, err)
            else:
                status, hdrs, data = _json(
                    e.status, {key: {"code": e.status, "message": e.message}}
                )
        self.send_response(status)
        for name, value in hdrs.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--username", default="regionvault")
    parser.add_argument("--password", default="fake-password")
    parser.add_argument("--project", default="edge")
    parser.add_argument("--region", default="RegionOne")
    parser.add_argument("--flavor-ids", choices=("devstack", "uuid"), default="devstack")
    parser.add_argument("--settle-polls", type=int, default=2)
    args = parser.parse_args(argv)
    fake = OpenStackFake(
        args.workdir,
        username=args.username,
        password=args.password,
        project=args.project,
        region=args.region,
        port=args.port,
        flavor_ids=args.flavor_ids,
    )
    fake.settle_polls = args.settle_polls
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(fake.start(), flush=True)
    try:
        done.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
