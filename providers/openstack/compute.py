"""Compute in OpenStack through apache-libcloud's unmodified ``OpenStack_2_NodeDriver``.

Servers are nova servers; their metadata are the tags. What the driver offers is used as
it is (servers, flavors); what it lacks (cinder's snapshots, volumes and
``os-volume_upload_image`` action, glance's image data, nova's metadata merge and boot
from volume) goes through the connections the driver itself built and authenticated
(``connection``, ``image_connection``, ``volumev3_connection``), never a second HTTP stack.
A libcloud connection keeps the answer in flight on itself, so each thread has a driver of
its own. Every endpoint the keystone catalog hands out must be https (or loopback).

Capture (blocks): every cinder volume attached to the server, the boot volume first and
the others in device order, each a :class:`Disk` of the image; an encrypted volume is
refused (its upload is LUKS ciphertext whose key goes with the image), and so is a server
whose root disk is a local (image-backed) one. For each volume: a snapshot (all snapshots
first), a volume made from it, that volume uploaded to a glance image
(``os-volume_upload_image``), the image's data read in ranges (a store that answers a
ranged read with the whole image is an error naming it). Closing the capture deletes the
images, waits for the volumes to be gone, then deletes the snapshots and waits for them.

Restore: each disk is written to a sparse file in ``scratch_dir``, uploaded to a glance
image on commit (the first one carrying the source's ``hw_*``/``os_*`` properties), and
launch boots a server of the original flavor (resolved by name; by id only in the cloud
the point came from; else the region's ``flavor``) from volumes made of those images
(``block_device_mapping_v2``, deleted with the server). The server boots carrying only
regionvault's markers; the point's tags replace them in one request once it is ACTIVE,
so a half-launched server never carries the backup tag.

Cleanup: everything a capture or restore makes carries its owner (the process's
:class:`~regionvault.core.procs.ProcessIdentity` token) in its name and in its metadata or
properties (:data:`OWNER_KEY`, :data:`PURPOSE_KEY`). A failed step removes what was made,
and also what a create whose answer was lost made (found again by name or marker). Deletes
are waited for; what could not be deleted is logged and tried again by
:meth:`OpenStackCompute.sweep`, which runs at the start of every capture and restore and
removes what dead owners on this host left (a kill -9), their scratch files included.

Waits poll every ``poll_interval`` seconds at first, backing off to ``max_poll_interval``,
for at most ``wait_timeout`` seconds plus ``wait_per_gib`` per GiB of the volume or image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from libcloud.compute.providers import get_driver
from libcloud.compute.types import NodeState
from libcloud.compute.types import Provider as LibcloudProvider
from regionvault.core.errors import (
    ComputeError,
    ConfigError,
    InstanceNotFound,
    RegionVaultError,
    TransientError,
    UnsupportedOperation,
)
from regionvault.core.interfaces import BlockCapture, BlockSink, Compute
from regionvault.core.procs import ProcessIdentity
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    Disk,
    Instance,
    InstancePage,
    LaunchSpec,
    RegionConfig,
    Tags,
    split_by_disk,
)
from regionvault.providers.openstack.errors import CALL_ERRORS, http_status, openstack_error
from regionvault.providers.openstack.settings import OpenStackSettings, is_loopback

__all__ = [
    "CAPTURE_PREFIX",
    "OWNER_KEY",
    "PURPOSE_KEY",
    "RESTORE_PREFIX",
    "SCRATCH_PREFIX",
    "OpenStackBlockCapture",
    "OpenStackBlockSink",
    "OpenStackCompute",
    "format_function",
    "parse_function",
]

log = logging.getLogger(__name__)

GiB = 1 << 30
#: the block size of captures and restores; disks start on a multiple of it
BLOCK_SIZE = 4096
READ_SIZE = 4 * 1024 * 1024
#: the names of the snapshots, volumes and images a capture makes: the prefix, the owner's
#: token, a random part, the disk's index
CAPTURE_PREFIX = "rv-capture-"
#: the names of the images a restore uploads (prefix, owner's token, random part, index)
RESTORE_PREFIX = "rv-restore-"
#: the scratch files of a restore in ``scratch_dir`` (prefix, owner's token, random part)
SCRATCH_PREFIX = "rv-openstack-restore-"
#: metadata (cinder, nova) and image property (glance) of everything regionvault makes for a
#: while: the process that made it (ProcessIdentity token), and what for (capture, restore,
#: launch); a launch's marker tells its server apart from any other
OWNER_KEY = "regionvault-owner"
PURPOSE_KEY = "regionvault-purpose"
MARKER_KEY = "regionvault-marker"
#: the glance properties a capture records and a restore sets again (firmware, buses, OS)
_PROPERTY = re.compile(r"^(?:hw|os)_[a-z0-9_]{1,64}$")
_NAME_OWNER = re.compile(r"^rv-(?:capture|restore)-([A-Za-z0-9]+)-")
_SCRATCH_OWNER = re.compile(rf"^{SCRATCH_PREFIX}([A-Za-z0-9]+)-")
_GONE = {"deleted", "soft_deleted", "terminated"}
#: how many looks in a row at something being made or deleted may fail transiently
POLL_RETRIES = 5
#: cinder statuses from which a volume or snapshot can be deleted
_DELETABLE = {"available", "error", "error_restoring", "error_extending", "error_managing"}


def format_function(flavor: str | None, properties: Mapping[str, str]) -> str | None:
    """A point's function: the flavor's NAME, and the boot volume's ``hw_*``/``os_*`` glance
    properties as a query (``m1.small?hw_firmware_type=uefi``) when it has some."""
    if not flavor:
        return None
    props = {k: v for k, v in sorted(properties.items()) if _PROPERTY.match(k)}
    return f"{flavor}?{urlencode(props)}" if props else flavor


def parse_function(function: str | None) -> tuple[str | None, dict[str, str]]:
    """(flavor name, properties) of a :func:`format_function` string."""
    if not function:
        return None, {}
    name, _, query = function.partition("?")
    props = {k: v for k, v in parse_qsl(query) if _PROPERTY.match(k)}
    return name or None, props


def _gib(size: int) -> int:
    return max(1, math.ceil(size / GiB))


def _device_order(device: str) -> tuple[int, str]:
    return (len(device), device)  # vdb < vdc < ... < vdz < vdaa


class OpenStackCompute(Compute):
    """One region's nova servers."""

    def __init__(
        self, *, region: RegionConfig, settings: OpenStackSettings, capabilities: Capabilities
    ) -> None:
        super().__init__(provider="openstack", region=region.name, capabilities=capabilities)
        self.config = region
        self.settings = settings
        self._password = settings.password(region)
        #: this process: the owner of what its captures and restores make
        self.owner = ProcessIdentity.current()
        self.token = self.owner.token()
        #: which cloud this is: a flavor id means something only here
        self.cloud = f"{settings.auth_url}#{settings.project}#{settings.service_region}"
        self._drivers: weakref.WeakKeyDictionary[threading.Thread, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._all_drivers: list[Any] = []
        self._lock = threading.Lock()
        self._flavors: dict[str, tuple[str, int]] = {}  # id -> (name, disk GiB)
        #: temporaries whose delete failed: tried again by every sweep
        self._leftovers: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ drivers, errors

    @property
    def driver(self) -> Any:
        """This thread's driver (a libcloud connection is not safe to share)."""
        thread = threading.current_thread()
        driver = self._drivers.get(thread)
        if driver is None:
            driver = self._new_driver()
            with self._lock:
                self._drivers[thread] = driver
                self._all_drivers.append(driver)
        return driver

    def _new_driver(self) -> Any:
        cls = get_driver(LibcloudProvider.OPENSTACK)
        settings = self.settings
        driver: Any = cls(
            settings.username,
            self._password,
            secure=settings.secure,
            api_version="2.0",
            ex_force_auth_url=settings.auth_url,
            ex_force_auth_version="3.x_password",
            ex_force_service_region=settings.service_region,
            ex_tenant_name=settings.project,
            ex_domain_name=settings.domain,
            timeout=settings.timeout,
        )
        for service, conn in (
            ("compute (nova)", driver.connection),
            ("image (glance)", driver.image_connection),
            ("volumev3 (cinder)", driver.volumev3_connection),
        ):
            self._call(
                f"authenticating at {settings.auth_url}", conn._populate_hosts_and_request_paths
            )
            if not conn.secure and not is_loopback(conn.host):
                raise ConfigError(
                    f"the keystone catalog's {service} endpoint is plain http on "
                    f"{conn.host}: the token and the disks' bytes would travel in clear "
                    "(give the catalog https endpoints)",
                    file=self.config.source,
                    key=self.config.key("auth_url"),
                    provider="openstack",
                    region=self.region,
                )
        return driver

    def _fail(self, message: str) -> ComputeError:
        return ComputeError(message, provider="openstack", region=self.region)

    def _call(self, what: str, fn: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """``fn()``, its failures mapped (errors.py); None on a 404 with ``missing_ok``."""
        try:
            return fn()
        except RegionVaultError:
            raise
        except _CAUGHT as exc:
            if missing_ok and http_status(exc) == 404:
                return None
            raise openstack_error(exc, what, region=self.region) from exc

    def _nova(
        self, path: str, *, method: str = "GET", data: Any = None, missing_ok: bool = False
    ) -> Any:
        def call() -> Any:
            return self.driver.connection.request(path, method=method, data=data).object

        return self._call(f"nova {method} {path}", call, missing_ok=missing_ok)

    def _cinder(
        self, path: str, *, method: str = "GET", data: Any = None, missing_ok: bool = False
    ) -> Any:
        def call() -> Any:
            return self.driver.volumev3_connection.request(path, method=method, data=data).object

        return self._call(f"cinder {method} {path}", call, missing_ok=missing_ok)

    def _glance(
        self, path: str, *, method: str = "GET", data: Any = None, missing_ok: bool = False
    ) -> Any:
        def call() -> Any:
            return self.driver.image_connection.request(path, method=method, data=data).object

        return self._call(f"glance {method} {path}", call, missing_ok=missing_ok)

    def _pages(
        self, service: str, path: str, key: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Every item of a nova or cinder listing, following its ``<key>_links`` pages."""
        conn = "connection" if service == "nova" else "volumev3_connection"

        def call() -> Any:
            driver = self.driver
            found = driver._paginated_request(path, key, getattr(driver, conn), dict(params or {}))
            return found[key]

        return list(self._call(f"{service} listing {path}", call))

    def _images_list(self) -> list[dict[str, Any]]:
        """Every glance image, following glance's ``next`` links."""
        found: list[dict[str, Any]] = []
        path = "/v2/images?limit=200"
        for _ in range(1000):
            answer = self._glance(path)
            found.extend(answer.get("images") or [])
            nxt = answer.get("next")
            if not nxt:
                break
            parts = urlsplit(str(nxt))
            path = parts.path[parts.path.find("/v2/") :] + (
                f"?{parts.query}" if parts.query else ""
            )
        return found

    def _wait(
        self,
        what: str,
        poll: Callable[[], str],
        ready: str,
        *,
        gib: int = 0,
        failed: Callable[[str], bool] | None = None,
    ) -> str:
        """Poll until ``poll()`` says ``ready`` (or, for a wait for a delete, ``gone``);
        backing off from ``poll_interval`` to ``max_poll_interval``, for at most
        ``wait_timeout`` plus ``wait_per_gib`` for each of ``gib`` GiB. A look that fails
        transiently is made again (up to :data:`POLL_RETRIES` times in a row): one 503
        must not undo a long copy that goes on in the cloud."""
        settings = self.settings
        timeout = settings.wait_timeout + gib * settings.wait_per_gib
        deadline = time.monotonic() + timeout
        delay = settings.poll_interval
        missed = 0
        while True:
            try:
                status = poll().lower()
            except TransientError as exc:
                missed += 1
                if missed > POLL_RETRIES or time.monotonic() > deadline:
                    raise
                log.info("%s: %s: a look failed, looking again: %s", self.region, what, exc.message)
                time.sleep(delay)
                delay = min(delay * 1.5, settings.max_poll_interval)
                continue
            missed = 0
            if status == ready:
                return status
            if (failed or _failed)(status):
                raise self._fail(f"{what} is {status}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(
                    f"{what} still {status} after {timeout:.0f} s (wait_timeout "
                    f"{settings.wait_timeout:.0f} s + wait_per_gib {settings.wait_per_gib:.0f} s "
                    f"x {gib} GiB)"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, settings.max_poll_interval)

    # ------------------------------------------------------------------ flavors

    def _flavor_table(self, *, refresh: bool = False) -> dict[str, tuple[str, int]]:
        with self._lock:
            if self._flavors and not refresh:
                return dict(self._flavors)
        flavors = self._pages("nova", "/flavors/detail", "flavors")
        table = {str(f["id"]): (str(f.get("name") or ""), int(f.get("disk") or 0)) for f in flavors}
        with self._lock:
            self._flavors = table
        return dict(table)

    def _flavor_name(self, flavor_id: str | None) -> str | None:
        if not flavor_id:
            return None
        table = self._flavor_table()
        if flavor_id not in table:
            table = self._flavor_table(refresh=True)
        entry = table.get(flavor_id)
        return entry[0] if entry else None

    def _find_flavor(self, wanted: str, *, by_id: bool) -> str | None:
        """The id of the flavor named ``wanted`` (or, with ``by_id``, whose id it is)."""
        for refresh in (False, True):
            table = self._flavor_table(refresh=refresh)
            named = [fid for fid, (name, _) in table.items() if name == wanted]
            if named:
                return sorted(named)[0]
            if by_id and wanted in table:
                return wanted
        return None

    def _flavor_for(self, spec: LaunchSpec) -> str:
        """The flavor id to boot: the spec's own ``flavor`` (a name or an id here); the
        source's flavor id when the source is a server of this very cloud; the flavor
        named as the point's (its function); else the region's ``flavor``."""
        explicit = spec.extra.get("flavor")
        if isinstance(explicit, str) and explicit:
            found = self._find_flavor(explicit, by_id=True)
            if found is None:
                raise self._fail(f"launch {spec.name!r}: no flavor {explicit!r} in this cloud")
            return found
        source = spec.source.extra if spec.source is not None else {}
        if source.get("cloud") == self.cloud and isinstance(source.get("flavor"), str):
            found = self._find_flavor(source["flavor"], by_id=True)
            if found is not None:
                return found
        name = source.get("flavor_name") if isinstance(source.get("flavor_name"), str) else None
        name = name or parse_function(spec.function)[0]
        if name:
            found = self._find_flavor(name, by_id=False)
            if found is not None:
                return found
        fallback = self.settings.flavor
        if fallback:
            found = self._find_flavor(fallback, by_id=True)
            if found is not None:
                if name:
                    log.info(
                        "%s: launch %s: no flavor named %r here; booting the region's flavor %r",
                        self.region, spec.name, name, fallback,
                    )  # fmt: skip
                return found
        raise self._fail(
            f"launch {spec.name!r}: no flavor fits: "
            + (f"none named {name!r} (the point's)" if name else "the point names none")
            + (
                f", and the region's flavor {fallback!r} does not exist here"
                if fallback
                else ", and the region sets no flavor"
            )
        )

    # ------------------------------------------------------------------ servers

    def _node(self, instance_id: str) -> Any:
        node = self._call(
            f"reading server {instance_id}",
            lambda: self.driver.ex_get_node_details(instance_id),
            missing_ok=True,
        )
        if node is None or str(node.extra.get("vm_state") or "").lower() in _GONE:
            raise InstanceNotFound(instance_id, provider="openstack", region=self.region)
        if node.state == NodeState.TERMINATED:
            raise InstanceNotFound(instance_id, provider="openstack", region=self.region)
        return node

    def _volume(self, volume_id: str) -> dict[str, Any]:
        answer = self._cinder(f"/volumes/{volume_id}")
        return dict(answer["volume"])

    @staticmethod
    def _attached(node: Any) -> list[str]:
        return [str(v["id"]) for v in node.extra.get("volumes_attached") or [] if "id" in v]

    @staticmethod
    def _ordered(server_id: str, volumes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The server's volumes, its boot volume (bootable, the first device) first, then
        the others in device order."""

        def device(volume: Mapping[str, Any]) -> str:
            for attachment in volume.get("attachments") or []:
                if attachment.get("server_id") == server_id:
                    return str(attachment.get("device") or "")
            return ""

        ordered = sorted(volumes, key=lambda v: _device_order(device(v)))
        bootable = [v for v in ordered if str(v.get("bootable")).lower() == "true"]
        if bootable:
            ordered.remove(bootable[0])
            ordered.insert(0, bootable[0])
        return ordered

    def _instance(self, node: Any, volumes: Mapping[str, Mapping[str, Any]] | None) -> Instance:
        extra = node.extra
        metadata = extra.get("metadata") or {}
        attached = self._attached(node)
        flavor_id = extra.get("flavorId")
        flavor_name = self._flavor_name(flavor_id)
        properties: dict[str, str] = {}
        if volumes is not None and not extra.get("imageId"):
            known = [volumes[v] for v in attached if v in volumes]
            ordered = self._ordered(node.id, known)
            if ordered:
                image_meta = ordered[0].get("volume_image_metadata") or {}
                properties = {
                    str(k): str(v) for k, v in image_meta.items() if _PROPERTY.match(str(k))
                }
        return Instance(
            id=node.id,
            name=node.name,
            region=self.region,
            tags=Tags({str(k): str(v) for k, v in metadata.items()}),
            state=str(node.state),
            function=format_function(flavor_name or flavor_id, properties),
            capture_kinds=frozenset({CaptureKind.BLOCKS}),
            extra={
                "flavor": flavor_id,
                "flavor_name": flavor_name,
                "cloud": self.cloud,
                "image": extra.get("imageId"),
                "volumes": attached,
                "properties": properties,
            },
        )

    def _volumes_of(self, attached: Sequence[str]) -> dict[str, dict[str, Any]]:
        found = {}
        for volume_id in attached:
            answer = self._cinder(f"/volumes/{volume_id}", missing_ok=True)
            if answer is not None:
                found[volume_id] = dict(answer["volume"])
        return found

    # ------------------------------------------------------------------ listing, tags

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        # keyset paging: the token is the last id handed out, the servers go in id order, so
        # a server deleted or added between two pages shifts nothing
        after, _ = InstancePage.parse_token(page_token)
        nodes = self._call("listing servers", lambda: self.driver.list_nodes())
        chosen = []
        for node in sorted(nodes, key=lambda n: n.id):
            if after is not None and node.id <= after:
                continue
            if node.state == NodeState.TERMINATED:
                continue
            metadata = node.extra.get("metadata") or {}
            if PURPOSE_KEY in metadata:
                continue  # a launch under way (or a dead one's, for the sweep)
            tags = Tags({str(k): str(v) for k, v in metadata.items()})
            if tag_filters and not tags.matches(tag_filters):
                continue
            chosen.append(node)
            if len(chosen) > page_size:
                break
        more = len(chosen) > page_size
        chosen = chosen[:page_size]
        volumes: dict[str, dict[str, Any]] = {}
        if chosen:
            listed = self._pages("cinder", "/volumes/detail", "volumes")
            volumes = {str(v["id"]): v for v in listed}
        page = tuple(self._instance(n, volumes) for n in chosen)
        token = InstancePage.token(chosen[-1].id, 0) if more else None
        return InstancePage(page, token)

    def get_instance(self, instance_id: str) -> Instance:
        node = self._node(instance_id)
        return self._instance(node, self._volumes_of(self._attached(node)))

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        # nova merges a POST into the metadata: a key another writer set meanwhile stays
        self._node(instance_id)
        answer = self._nova(
            f"/servers/{instance_id}/metadata",
            method="POST",
            data={"metadata": {str(k): str(v) for k, v in tags.items()}},
        )
        return Tags({str(k): str(v) for k, v in (answer.get("metadata") or {}).items()})

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        self._node(instance_id)
        for key in keys:
            self._nova(
                f"/servers/{instance_id}/metadata/{quote(key, safe='')}",
                method="DELETE",
                missing_ok=True,
            )
        answer = self._nova(f"/servers/{instance_id}/metadata")
        return Tags({str(k): str(v) for k, v in (answer.get("metadata") or {}).items()})

    # ------------------------------------------------------------------ temporaries

    def _marks(self, purpose: str) -> dict[str, str]:
        return {OWNER_KEY: self.token, PURPOSE_KEY: purpose}

    def _dead(self, token: str | None) -> bool:
        """Whether ``token`` names a process of this host that no longer runs."""
        if not token:
            return False
        owner = ProcessIdentity.from_token(token)
        return owner is not None and owner.alive() is False

    def _owner_of(self, name: str | None, marks: Mapping[str, Any] | None) -> str | None:
        owner = (marks or {}).get(OWNER_KEY)
        if isinstance(owner, str) and owner:
            return owner
        match = _NAME_OWNER.match(name or "")
        return match.group(1) if match else None

    def _status_of(self, kind: str, ident: str) -> str:
        """A temporary's status, ``gone`` once it answers 404."""
        if kind == "image":
            answer = self._glance(f"/v2/images/{ident}", missing_ok=True)
            return "gone" if answer is None else str(answer.get("status", "unknown"))
        if kind == "server":
            answer = self._nova(f"/servers/{ident}", missing_ok=True)
            return "gone" if answer is None else str(answer["server"].get("status", "unknown"))
        answer = self._cinder(f"/{kind}s/{ident}", missing_ok=True)
        return "gone" if answer is None else str(answer[kind].get("status", "unknown"))

    def _delete(self, kind: str, ident: str, *, gib: int = 0) -> bool:
        """Delete a temporary and wait until it is gone; a failure is logged (and the
        temporary kept for the next sweep): False."""
        try:
            if kind == "image":
                self._glance(f"/v2/images/{ident}", method="DELETE", missing_ok=True)
            elif kind == "server":
                self._nova(f"/servers/{ident}", method="DELETE", missing_ok=True)
                self._wait(f"deleting server {ident}", lambda: self._status_of(kind, ident), "gone")
            else:
                self._wait(
                    f"{kind} {ident} (to delete it)",
                    lambda: (
                        "ready" if (s := self._status_of(kind, ident).lower()) in _DELETABLE else s
                    ),
                    "ready",
                    gib=gib,
                    # attached: not a temporary any more, never waited for
                    failed=lambda s: s in ("gone", "error_deleting", "in-use", "attaching"),
                )
                self._cinder(f"/{kind}s/{ident}", method="DELETE", missing_ok=True)
                self._wait(
                    f"deleting {kind} {ident}",
                    lambda: self._status_of(kind, ident),
                    "gone",
                    failed=lambda s: s in _DELETABLE or s == "error_deleting",
                )
        except ComputeError as exc:
            if exc.message.endswith(" is gone"):  # gone before its delete: done
                self._leftovers.discard((kind, ident))
                return True
            log.warning(
                "%s: could not delete %s %s (the next sweep tries again): %s",
                self.region, kind, ident, exc.message,
            )  # fmt: skip
            self._leftovers.add((kind, ident))
            return False
        except RegionVaultError as exc:
            log.warning(
                "%s: could not delete %s %s (the next sweep tries again): %s",
                self.region, kind, ident, exc.message,
            )  # fmt: skip
            self._leftovers.add((kind, ident))
            return False
        self._leftovers.discard((kind, ident))
        return True

    def _remove(self, made: Sequence[tuple[str, str]]) -> list[str]:
        """Delete temporaries: servers, then images, then volumes (waited for), then the
        snapshots they were made from. What was deleted, as ``kind id``."""
        order = {"server": 0, "image": 1, "volume": 2, "snapshot": 3}
        removed = []
        for kind, ident in sorted(dict.fromkeys(made), key=lambda m: order[m[0]]):
            if self._delete(kind, ident):
                removed.append(f"{kind} {ident}")
        return removed

    def _named(self, prefix: str) -> list[tuple[str, str]]:
        """The snapshots, volumes and images whose name starts with ``prefix`` (a capture's
        or a restore's label: what creates whose answers were lost made)."""
        found: list[tuple[str, str]] = []
        for kind in ("snapshot", "volume"):
            for item in self._pages("cinder", f"/{kind}s/detail", f"{kind}s"):
                if str(item.get("name") or "").startswith(prefix):
                    found.append((kind, str(item["id"])))
        for image in self._images_list():
            if str(image.get("name") or "").startswith(prefix):
                found.append(("image", str(image["id"])))
        return found

    def _remove_all(self, made: Sequence[tuple[str, str]], label: str) -> None:
        """Remove ``made`` and whatever else carries ``label`` (lost answers)."""
        found: list[tuple[str, str]] = []
        try:
            found = self._named(label)
        except RegionVaultError as exc:
            log.warning("%s: cannot list what %s made: %s", self.region, label, exc.message)
        self._remove([*made, *found])

    def sweep(self) -> list[str]:
        """Remove what a capture, restore or launch whose process died (kill -9, a crash, a
        reboot) left: servers still carrying a launch's markers, images, volumes and
        snapshots named or marked with a dead owner of this host, and its scratch files;
        and retry the deletes of this process that failed. Failures are logged, and the
        next sweep tries again. What was removed, as ``kind id`` lines."""
        with self._lock:
            pending = sorted(self._leftovers)
        removed = self._remove(pending)
        doomed: list[tuple[str, str]] = []
        try:
            for server in self._pages("nova", "/servers/detail", "servers"):
                metadata = server.get("metadata") or {}
                if PURPOSE_KEY in metadata and self._dead(metadata.get(OWNER_KEY)):
                    doomed.append(("server", str(server["id"])))
            for image in self._images_list():
                owner = self._owner_of(image.get("name"), image)
                if self._is_ours(image.get("name"), image) and self._dead(owner):
                    doomed.append(("image", str(image["id"])))
            # cinder filters by metadata: only the temporaries of captures are listed
            wanted = {"metadata": json.dumps({PURPOSE_KEY: "capture"})}
            for kind in ("volume", "snapshot"):
                for item in self._pages("cinder", f"/{kind}s/detail", f"{kind}s", wanted):
                    marks = item.get("metadata") or {}
                    owner = self._owner_of(item.get("name"), marks)
                    if self._is_ours(item.get("name"), marks) and self._dead(owner):
                        doomed.append((kind, str(item["id"])))
        except RegionVaultError as exc:
            log.warning("%s: sweep: %s", self.region, exc.message)
        for line in self._remove(doomed):
            log.info("%s: sweep: deleted %s (of a dead process)", self.region, line)
            removed.append(line)
        removed += self._sweep_scratch()
        return removed

    @staticmethod
    def _is_ours(name: Any, marks: Mapping[str, Any]) -> bool:
        return PURPOSE_KEY in marks or bool(_NAME_OWNER.match(str(name or "")))

    def _sweep_scratch(self) -> list[str]:
        removed: list[str] = []
        try:
            entries = list(os.scandir(self.settings.scratch_dir))
        except OSError:
            return removed
        for entry in entries:
            match = _SCRATCH_OWNER.match(entry.name)
            if match and self._dead(match.group(1)):
                with contextlib.suppress(OSError):
                    Path(entry.path).unlink()
                    log.info("%s: sweep: removed scratch file %s", self.region, entry.path)
                    removed.append(f"file {entry.path}")
        return removed

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
        self.sweep()
        node = self._node(instance_id)
        volumes = self._volumes_of(self._attached(node))
        instance = self._instance(node, volumes)
        if node.extra.get("imageId"):
            raise self._fail(
                f"server {instance_id} boots from image {node.extra['imageId']} onto a local "
                "disk that cinder cannot read: its root disk cannot be captured (boot it "
                "from a volume)"
                + (f"; its volumes {sorted(volumes)} are not taken alone" if volumes else "")
            )
        if not volumes:
            raise self._fail(f"server {instance_id} has no volume to capture")
        encrypted = sorted(v for v, d in volumes.items() if d.get("encrypted"))
        if encrypted:
            raise self._fail(
                f"server {instance_id}: volume(s) {', '.join(encrypted)} are encrypted: their "
                "upload is LUKS ciphertext whose key cinder deletes with the image, so a "
                "backup of them could never be restored; not captured"
            )
        ordered = self._ordered(instance_id, list(volumes.values()))
        taken_at = datetime.now(UTC)
        label = f"{CAPTURE_PREFIX}{self.token}-{uuid.uuid4().hex[:8]}-"
        made: list[tuple[str, str]] = []
        parts: list[tuple[str, str, int]] = []  # (device, image id, size)
        try:
            snapshots = []
            for index, volume in enumerate(ordered):  # all first: taken close together
                answer = self._cinder(
                    "/snapshots",
                    method="POST",
                    data={
                        "snapshot": {
                            "volume_id": volume["id"],
                            "name": f"{label}{index}",
                            "force": True,
                            "metadata": self._marks("capture"),
                        }
                    },
                )
                snapshot_id = str(answer["snapshot"]["id"])
                made.append(("snapshot", snapshot_id))
                snapshots.append(snapshot_id)
            for index, (volume, snapshot_id) in enumerate(zip(ordered, snapshots, strict=True)):
                gib = int(volume.get("size") or 1)
                self._wait(
                    f"snapshot {snapshot_id}",
                    lambda s=snapshot_id: self._status_of("snapshot", s),  # type: ignore[misc]
                    "available",
                    gib=gib,
                )
                answer = self._cinder(
                    "/volumes",
                    method="POST",
                    data={
                        "volume": {
                            "size": gib,
                            "name": f"{label}{index}",
                            "snapshot_id": snapshot_id,
                            "metadata": self._marks("capture"),
                        }
                    },
                )
                copy_id = str(answer["volume"]["id"])
                made.append(("volume", copy_id))
                self._wait(
                    f"volume {copy_id}",
                    lambda c=copy_id: self._status_of("volume", c),  # type: ignore[misc]
                    "available",
                    gib=gib,
                )
                answer = self._cinder(
                    f"/volumes/{copy_id}/action",
                    method="POST",
                    data={
                        "os-volume_upload_image": {
                            "image_name": f"{label}{index}",
                            "force": True,
                            "disk_format": "raw",
                            "container_format": "bare",
                        }
                    },
                )
                image_id = str(answer["os-volume_upload_image"]["image_id"])
                made.append(("image", image_id))
                self._wait(
                    f"image {image_id}",
                    lambda i=image_id: self._status_of("image", i),  # type: ignore[misc]
                    "active",
                    gib=gib,
                )
                size = int(self._glance(f"/v2/images/{image_id}")["size"])
                device = ""
                for attachment in volume.get("attachments") or []:
                    if attachment.get("server_id") == instance_id:
                        device = str(attachment.get("device") or "")
                parts.append((device or f"volume {volume['id']}", image_id, size))
        except BaseException:
            self._remove_all(made, label)
            raise
        return OpenStackBlockCapture(self, instance, taken_at, parts, made, label)

    def image_range(self, image_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the image's data from ``offset`` (glance download, Range);
        an answer that is not 206 with exactly those bytes is an error."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        what = f"reading image {image_id} at {offset}"

        def call() -> bytes:
            response = self.driver.image_connection.request(
                f"/v2/images/{image_id}/file", headers=headers, raw=True
            )
            status = int(response.status)
            if status == 200:
                raise self._fail(
                    f"{what}: glance (or a proxy before it) answered a ranged read with the "
                    "whole image (200, not 206): it does not honour Range, which captures "
                    "need; read the image through an endpoint that does"
                )
            if status != 206:
                raise _Refused(status, f"glance answered {status} to a ranged read")
            data = bytearray()
            for piece in response.iter_content(1 << 20):
                data += piece
                if len(data) > length:
                    raise self._fail(f"{what}: more than the {length} bytes asked for")
            return bytes(data)

        data: bytes = self._call(what, call)
        return data

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
        self.sweep()
        return OpenStackBlockSink(self, spec, size, disks)

    def _image_upload(self, image_id: str, path: Path) -> None:
        """PUT the image's data through this thread's image connection, streamed from
        ``path``, its body raw (the connection encodes JSON and says so otherwise)."""

        def call() -> None:
            conn = self.driver.image_connection
            with path.open("rb") as body:
                conn.encode_data = lambda data: data
                conn.default_content_type = "application/octet-stream"
                try:
                    conn.request(f"/v2/images/{image_id}/file", method="PUT", data=body)
                finally:
                    del conn.encode_data
                    del conn.default_content_type

        self._call(f"uploading image {image_id}", call)

    def launch(self, spec: LaunchSpec, sink: Any) -> Instance:
        if not isinstance(sink, OpenStackBlockSink) or not sink.image_ids:
            raise self._fail("launch needs a committed sink of this compute")
        marker = uuid.uuid4().hex
        server_id: str | None = None
        try:
            flavor = self._flavor_for(spec)
            mapping = []
            for index, (image_id, disk) in enumerate(zip(sink.image_ids, sink.disks, strict=True)):
                mapping.append(
                    {
                        "source_type": "image",
                        "uuid": image_id,
                        "destination_type": "volume",
                        "volume_size": _gib(disk.size),
                        "boot_index": 0 if index == 0 else -1,
                        "delete_on_termination": True,
                    }
                )
            answer = self._nova(
                "/servers",
                method="POST",
                data={
                    "server": {
                        "name": spec.name,
                        "flavorRef": flavor,
                        "block_device_mapping_v2": mapping,
                        # the point's tags come once the server is ACTIVE (below): one
                        # killed midway carries only these, and the sweep removes it
                        "metadata": {**self._marks("launch"), MARKER_KEY: marker},
                    }
                },
            )
            server_id = str(answer["server"]["id"])
            total = sum(_gib(d.size) for d in sink.disks)
            self._wait(
                f"server {server_id}", lambda: self._server_status(server_id), "active", gib=total
            )
            # one PUT replaces the markers with the point's tags
            self._nova(
                f"/servers/{server_id}/metadata",
                method="PUT",
                data={"metadata": {str(k): str(v) for k, v in spec.tags.items()}},
            )
            instance = self.get_instance(server_id)
        except BaseException:
            found = [("server", server_id)] if server_id else []
            with contextlib.suppress(RegionVaultError):
                for server in self._pages("nova", "/servers/detail", "servers"):
                    if (server.get("metadata") or {}).get(MARKER_KEY) == marker:
                        found.append(("server", str(server["id"])))
            self._remove(found)
            sink.discard()
            raise
        sink.launched = True
        # the server's volumes are made; the images were only their source
        self._remove([("image", i) for i in sink.image_ids])
        return instance

    def _server_status(self, instance_id: str) -> str:
        server = self._nova(f"/servers/{instance_id}")["server"]
        status = str(server.get("status", "unknown"))
        if status.lower() == "error":
            fault = (server.get("fault") or {}).get("message") or "no fault given"
            raise self._fail(f"server {instance_id} ended in ERROR: {fault}")
        return status

    def terminate(self, instance_id: str) -> None:
        """Delete the server (its volumes booted from a restore go with it) and wait until
        it is gone; an image-booted server's ``rv-restore-`` image (of an earlier version)
        goes once no other server boots from it."""
        node = self._node(instance_id)
        image_id = node.extra.get("imageId")
        self._nova(f"/servers/{instance_id}", method="DELETE", missing_ok=True)
        self._wait(
            f"deleting server {instance_id}",
            lambda: self._status_of("server", instance_id),
            "gone",
        )
        if not image_id:
            return
        try:
            image = self._glance(f"/v2/images/{image_id}", missing_ok=True)
            if image is None or not str(image.get("name", "")).startswith(RESTORE_PREFIX):
                return
            nodes = self._call("listing servers", lambda: self.driver.list_nodes())
        except RegionVaultError:
            return
        if not [n for n in nodes if n.extra.get("imageId") == image_id]:
            self._remove([("image", str(image_id))])

    def close(self) -> None:
        with self._lock:
            drivers, self._all_drivers = self._all_drivers, []
            self._drivers = weakref.WeakKeyDictionary()
        for driver in drivers:
            for conn in (driver.connection, driver.image_connection, driver.volumev3_connection):
                with contextlib.suppress(Exception):
                    if conn.connection is not None:
                        conn.connection.session.close()


class _Refused(Exception):
    """A raw request's answer that is not a success (errors.py reads its ``code``)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


_CAUGHT: tuple[type[BaseException], ...] = (*CALL_ERRORS, _Refused)


def _failed(status: str) -> bool:
    return status in ("error", "killed", "gone") or status.startswith("error")


class OpenStackBlockCapture(BlockCapture):
    """A server's volumes as glance images, one :class:`Disk` each, read in ranges; its
    temporaries go on close."""

    def __init__(
        self,
        compute: OpenStackCompute,
        instance: Instance,
        taken_at: datetime,
        parts: Sequence[tuple[str, str, int]],
        made: list[tuple[str, str]],
        label: str,
    ) -> None:
        disks = []
        offset = 0
        for device, _, size in parts:
            disks.append(Disk(device, offset, max(size, BLOCK_SIZE)))
            offset += math.ceil(max(size, BLOCK_SIZE) / BLOCK_SIZE) * BLOCK_SIZE
        total = disks[-1].end
        super().__init__(instance, taken_at, size=total, block_size=BLOCK_SIZE, disks=disks)
        self.compute = compute
        self.image_ids = [image_id for _, image_id, _ in parts]
        self.image_sizes = [size for _, _, size in parts]
        self.image_id = self.image_ids[0]
        self._made = made
        self._label = label

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        return self.read_ranges([(0, self.size)])

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        for start, length in spans:
            end = min(start + length, self.size)
            for index, disk in enumerate(self.disks):
                lo, hi = max(start, disk.offset), min(end, disk.offset + self.image_sizes[index])
                offset = lo
                while offset < hi:
                    n = min(READ_SIZE, hi - offset)
                    image_id = self.image_ids[index]
                    data = self.compute.image_range(image_id, offset - disk.offset, n)
                    if len(data) != n:
                        raise ComputeError(
                            f"image {image_id}: {len(data)} bytes at {offset - disk.offset}, "
                            f"not {n}",
                            provider="openstack",
                            region=self.compute.region,
                        )
                    if data.count(0) != len(data):
                        yield offset, data
                    offset += n

    def close(self) -> None:
        made, self._made = self._made, []
        if made:
            self.compute._remove_all(made, self._label)


class OpenStackBlockSink(BlockSink):
    """Sparse files in ``scratch_dir``, one per disk, uploaded to glance images on commit;
    launch boots from volumes made of those images."""

    def __init__(
        self,
        compute: OpenStackCompute,
        spec: LaunchSpec,
        size: int,
        disks: Sequence[Disk] | None,
    ) -> None:
        super().__init__(size, BLOCK_SIZE, disks)
        if not self.disks:
            raise ValueError("a block restore needs a non-empty image")
        self.compute = compute
        self.spec = spec
        self.label = f"{compute.token}-{uuid.uuid4().hex[:8]}-"
        scratch = Path(compute.settings.scratch_dir)
        self.paths: list[Path] | None = []
        try:
            for index, disk in enumerate(self.disks):
                path = scratch / f"{SCRATCH_PREFIX}{self.label}{index}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                self.paths.append(path)
                try:
                    os.ftruncate(fd, disk.size)
                finally:
                    os.close(fd)
        except OSError as exc:
            self._unlink()
            raise ComputeError(
                f"cannot make the restore's scratch file in {scratch} (scratch_dir): {exc}",
                provider="openstack",
                region=compute.region,
            ) from exc
        self.image_ids: list[str] = []
        self.launched = False

    def _unlink(self) -> None:
        for path in self.paths or []:
            path.unlink(missing_ok=True)

    def write(self, offset: int, data: bytes) -> None:
        if self.paths is None:
            raise ComputeError("the sink was discarded", provider="openstack")
        for index, at, piece in split_by_disk(self.disks, offset, data):
            with self.paths[index].open("r+b") as f:
                f.seek(at)
                f.write(piece)

    def commit(self) -> None:
        if self.paths is None:
            raise ComputeError("the sink was discarded", provider="openstack")
        compute = self.compute
        source = self.spec.source.extra if self.spec.source is not None else {}
        properties = dict(source.get("properties") or {}) or parse_function(self.spec.function)[1]
        try:
            for index, path in enumerate(self.paths):
                body: dict[str, Any] = {
                    "name": f"{RESTORE_PREFIX}{self.label}{index}",
                    "disk_format": "raw",
                    "container_format": "bare",
                    **compute._marks("restore"),
                }
                if index == 0:
                    body.update(
                        {k: str(v) for k, v in properties.items() if _PROPERTY.match(str(k))}
                    )
                image = compute._glance("/v2/images", method="POST", data=body)
                image_id = str(image["id"])
                self.image_ids.append(image_id)
                compute._image_upload(image_id, path)
                compute._wait(
                    f"image {image_id}",
                    lambda i=image_id: compute._status_of("image", i),  # type: ignore[misc]
                    "active",
                    gib=_gib(self.disks[index].size),
                )
                path.unlink(missing_ok=True)
        except BaseException:
            self.discard()
            raise
        finally:
            self._unlink()

    def discard(self) -> None:
        if self.launched:
            return
        self._unlink()
        self.paths = None
        made = [("image", i) for i in self.image_ids]
        self.image_ids = []
        self.compute._remove_all(made, f"{RESTORE_PREFIX}{self.label}")
