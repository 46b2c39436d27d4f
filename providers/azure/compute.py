"""Compute on Azure virtual machines through azure-mgmt-compute: tag-filtered paged listings,
tags, block captures of a VM's managed disks, restores into a new managed disk and launches.

Listing: ``virtualMachines.list`` of the region's resource group, one ARM page per call
(``nextLink``); ARM has no server-side tag filter for VMs, so pages are filtered here and cut to
``page_size``, the token saying which ARM page to go on from and how many of its matches were
already returned.

Capture: every managed disk of the VM (the OS disk, then the data disks by LUN) into one
block image, a :class:`Disk` each at a block-aligned offset: an incremental snapshot per disk
(all begun before any is waited on, all made before any byte is read), a read SAS per
snapshot (``beginGetAccess``), the bytes read with azure-storage-blob as page blobs, only the
page ranges that hold data (``Get Page Ranges``). Closing revokes every SAS and deletes the
snapshots, unless the capture was taken with ``keep``: then they stay and
:attr:`AzureBlockCapture.ref` names them, and a later capture ``since`` that ref gives
:meth:`AzureBlockCapture.changed_ranges` from the managed-disk diff of each disk against its
earlier snapshot (``x-ms-previous-snapshot-url``); :meth:`AzureCompute.release_capture`
deletes them.

Restore: one empty managed disk created for upload per disk of the image (``createOption:
Upload``, a whole number of MiB plus the 512-byte VHD footer), a write SAS each, the blocks
routed by offset and written as pages (all-zero pieces skipped: the disks start zeroed), each
disk's fixed-VHD footer written, the SAS revoked; then a VM of the original size with the
original tags attaches the first disk as its OS disk and the others as data disks LUN 0, 1,
.... A failed restore or launch removes the VM it began and every disk
(:meth:`AzureBlockSink.discard`).

Power state: VMs are read with their instance view (``$expand=instanceView``, with each
listing page too), and an Instance's ``state`` is the VM's power state (``running``,
``starting``, ``stopped``, ``deallocated``, ...) once it is provisioned. A stopped or
deallocated VM is backed up like a running one (its disks are snapshotted either way). A
launch returns once its VM is ``running``, and fails naming the VM and its state when the VM
stops or does not run within ``start_timeout``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    DecodeError,
    DeserializationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.mgmt.compute import models
from azure.storage.blob import BlobClient
from regionvault.core.errors import (
    ComputeError,
    InstanceNotFound,
    RegionVaultError,
    TransientError,
)
from regionvault.core.interfaces import BlockCapture, BlockSink, Capture, Compute, RestoreSink
from regionvault.core.types import (
    Capabilities,
    CaptureKind,
    Disk,
    Instance,
    InstancePage,
    LaunchSpec,
    Tags,
    disk_layout,
    split_by_disk,
)
from regionvault.providers.azure.settings import availability_zone, location_name

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.mgmt.compute import ComputeManagementClient
    from regionvault.core.types import RegionConfig

__all__ = [
    "BLOCK_SIZE",
    "CAPABILITIES",
    "COMPUTE_SETTINGS",
    "INTERNAL_PREFIX",
    "NAME_TAG",
    "RESTORE_TAG",
    "AzureBlockCapture",
    "AzureBlockSink",
    "AzureCompute",
    "AzureComputeSettings",
    "compute_client",
    "vhd_footer",
]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
#: the block size of captures and sinks (page blobs work in 512-byte pages; reads and writes
#: go in pieces of up to 4 MiB, the most one Put Page takes)
BLOCK_SIZE = 512 * KiB
PIECE = 4 * MiB
PAGE = 512
#: Azure's smallest upload disk holds 20 MiB of data (plus the footer)
MIN_UPLOAD_DATA = 20 * MiB
#: VM tags under this prefix belong to the provider: kept out of Instance.tags, refused by
#: set_tags, never copied to a launched VM
INTERNAL_PREFIX = "regionvault:"
NAME_TAG = "regionvault:name"
#: on disks and snapshots the provider made (a restore, a capture): the name they serve
RESTORE_TAG = "regionvault:restore"
CAPTURE_TAG = "regionvault:capture"
#: Azure refuses tag names with these characters, and names starting with these prefixes
_BAD_TAG_CHARS = re.compile(r"[<>%&\\?/]")
_RESERVED_TAG_PREFIXES = ("microsoft", "azure", "windows")
_MAX_TAGS = 50
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_VM_SIZE = re.compile(r"^(Standard|Basic)_[A-Za-z0-9_]+$")
_GONE_STATES = frozenset({"deleting", "deleted"})
_MAX_PAGES = 1_000_000
_TAG_RETRIES = 5
_SAS_SIG = re.compile(r"(sig|se|sp|sv|sr|st|spr|skoid|sktid|skt|ske|sks|skv)=[^&\s\"']+", re.I)

CAPABILITIES = Capabilities(capture_kinds=frozenset({CaptureKind.BLOCKS}), launch=True)
#: the site.toml keys :meth:`AzureComputeSettings.from_region` reads besides identity.py's
#: ``ca_file`` (settings.py names them without importing this module; a test checks they agree)
COMPUTE_SETTINGS = frozenset(
    {
        "subscription_id",
        "resource_group",
        "location",
        "availability_zone",
        "arm_endpoint",
        "vm_size",
        "subnet_id",
        "disk_sku",
        "compute_concurrency",
        "poll_interval",
        "start_timeout",
    }
)
#: a VM's power states (``PowerState/<state>`` in its instance view) that will not become
#: ``running`` by themselves: a launch that sees one has failed
_STOPPED_POWER_STATES = frozenset({"stopped", "stopping", "deallocated", "deallocating"})
#: seconds between reads of a launched VM's instance view when the region sets no
#: ``poll_interval``
_START_POLL = 5.0
#: the least seconds between two reads of a launched VM's instance view, whatever
#: ``poll_interval`` says
START_POLL_FLOOR = 1.0
#: the most seconds a throttled (429) power-state read backs off when ARM names no Retry-After
_START_BACKOFF_MAX = 30.0
#: seconds before a failed revoke of a snapshot's SAS is tried once more
_REVOKE_PAUSE = 0.5
#: at most this many pages of a page-range diff (10,000 ranges each) are followed
_DIFF_PAGES_MAX = 100_000

T = TypeVar("T")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AzureComputeSettings:
    """What a region's Compute needs from site.toml (the compute part of its settings)."""

    subscription_id: str
    resource_group: str
    location: str
    #: the one zone (``"1"``-``"3"``) whose VMs of ``location`` the region lists, captures and
    #: launches into; None: every VM of the resource group
    availability_zone: str | None = None
    #: the ARM endpoint (``base_url``); None for the public cloud's
    arm_endpoint: str | None = None
    #: a CA bundle for the ARM endpoint (``connection_verify``; site.toml's ``ca_file``)
    ca_bundle: str | None = None
    #: the VM size a launch uses when neither the spec nor its source names one
    vm_size: str | None = None
    #: the subnet a launched VM's network interface joins (real Azure needs one)
    subnet_id: str | None = None
    disk_sku: str = "StandardSSD_LRS"
    sas_seconds: int = 3600
    concurrency: int = 4
    #: seconds between polls of a long-running ARM operation that names no ``Retry-After``
    #: (None: the SDK's own, 30)
    poll_interval: float | None = None
    #: seconds a launch waits for its VM's power state to become ``running``
    start_timeout: float = 600.0

    @classmethod
    def from_region(cls, region: RegionConfig) -> AzureComputeSettings:
        settings = region.settings
        for key in ("subscription_id", "resource_group", "location"):
            if not isinstance(settings.get(key), str) or not settings.get(key):
                raise region.error(key, "missing or not a string")

        def optional(key: str) -> str | None:
            value = settings.get(key)
            if value is not None and not isinstance(value, str):
                raise region.error(key, f"must be a string, got {type(value).__name__}")
            return value

        concurrency = settings.get("compute_concurrency", 4)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise region.error("compute_concurrency", "must be a positive integer")
        poll = settings.get("poll_interval")
        if poll is not None and (
            isinstance(poll, bool) or not isinstance(poll, int | float) or not 0 <= poll <= 300
        ):
            raise region.error(
                "poll_interval",
                "must be a number of seconds from 0 to 300 (a launch reads its VM's power "
                f"state at most once every {START_POLL_FLOOR:g} s whatever this says)",
            )
        start = settings.get("start_timeout", 600)
        if isinstance(start, bool) or not isinstance(start, int | float) or not 1 <= start <= 7200:
            raise region.error("start_timeout", "must be a number of seconds from 1 to 7200")
        # the same PEM bundle the login uses (identity.py's ``ca_file``)
        ca = optional("ca_file")
        return cls(
            subscription_id=str(settings["subscription_id"]),
            resource_group=str(settings["resource_group"]),
            location=str(settings["location"]),
            availability_zone=availability_zone(region),
            arm_endpoint=optional("arm_endpoint"),
            ca_bundle=str(region.path("ca_file")) if ca else None,
            vm_size=optional("vm_size"),
            subnet_id=optional("subnet_id"),
            disk_sku=optional("disk_sku") or "StandardSSD_LRS",
            concurrency=concurrency,
            poll_interval=None if poll is None else float(poll),
            start_timeout=float(start),
        )


def compute_client(
    settings: AzureComputeSettings, credential: TokenCredential, **client_kwargs: Any
) -> ComputeManagementClient:
    """The unmodified SDK client for a region: its endpoint and CA bundle where given;
    ``client_kwargs`` go to the client (``retry_total``, ``polling_interval``, ...)."""
    from azure.mgmt.compute import ComputeManagementClient

    kwargs: dict[str, Any] = dict(client_kwargs)
    if settings.poll_interval is not None:
        kwargs.setdefault("polling_interval", settings.poll_interval)
    if settings.ca_bundle:
        kwargs["connection_verify"] = settings.ca_bundle
    return ComputeManagementClient(
        credential, settings.subscription_id, base_url=settings.arm_endpoint, **kwargs
    )


# --------------------------------------------------------------------------- helpers


def _redact(text: str) -> str:
    """``text`` with SAS signatures and their fields removed (they are secrets)."""
    return _SAS_SIG.sub(lambda m: f"{m.group(1)}=REDACTED", text)


def _describe(exc: BaseException) -> str:
    """One line about an Azure SDK error: its ARM code and message where it has them."""
    if isinstance(exc, HttpResponseError):
        error = getattr(exc, "error", None)
        code = getattr(error, "code", None) or getattr(exc, "error_code", None)
        message = getattr(error, "message", None) or exc.message or exc.reason or ""
        first = (str(message).strip().splitlines() or [""])[0]  # not the RequestId/Time lines
        status = exc.status_code
        text = f"{code}: {first}" if code else f"HTTP {status}: {first}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _redact(" ".join(str(text).split()))[:400]


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        seconds = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def is_transient(exc: BaseException) -> bool:
    """Whether an Azure SDK error may pass if the call is made again later: throttling
    (429), a failure on Azure's side (5xx), or no answer (no connection, a timeout, a
    response cut off); never a TLS failure."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return "ssl" not in f"{type(exc.inner_exception).__name__} {exc}".lower()
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        return status is not None and (status == 429 or 500 <= status <= 599)
    return False


def _get(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...`` over the SDK's models (mappings of wire names), None if absent."""
    for key in keys:
        if doc is None or not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def power_state(vm: Any) -> str | None:
    """The VM's power state from its instance view (``PowerState/running`` gives
    ``running``), None when the document carries no instance view."""
    statuses = _get(vm, "properties", "instanceView", "statuses")
    if not isinstance(statuses, list):
        return None
    for status in statuses:
        code = str(_get(status, "code") or "")
        if code.startswith("PowerState/"):
            return code.partition("/")[2].lower() or None
    return None


def _instance_state(provisioning: str, power: str | None) -> str:
    """An Instance's state: the power state (running, starting, stopped, deallocated, ...)
    while the VM is provisioned, else what its provisioning says (pending while it is
    created, failed, deleting)."""
    provisioning = provisioning.lower()
    if provisioning in ("creating", "failed") or provisioning in _GONE_STATES:
        return {"creating": "pending"}.get(provisioning, provisioning)
    if power is not None:
        return power
    return {"succeeded": "running", "updating": "running"}.get(provisioning, provisioning)


def _utc(text: Any) -> datetime:
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    if isinstance(text, str) and text:
        with contextlib.suppress(ValueError):
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _resource_name(base: str, limit: int) -> str:
    """A resource name from ``base``: letters, digits, '-' (Azure's safe subset), a unique
    suffix, at most ``limit`` characters."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", base).strip("-") or "rv"
    suffix = uuid.uuid4().hex[:8]
    return f"{cleaned[: limit - len(suffix) - 1].rstrip('-')}-{suffix}"


def vhd_footer(size: int) -> bytes:
    """The 512-byte footer of a fixed VHD whose data is ``size`` bytes (VHD specification
    1.0: cookie ``conectix``, fixed disk type 2, CHS geometry, one's-complement checksum)."""
    sectors = size // PAGE
    if sectors > 65535 * 16 * 255:
        sectors = 65535 * 16 * 255
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_x_heads = sectors // spt
    else:
        spt = 17
        cyl_x_heads = sectors // spt
        heads = max((cyl_x_heads + 1023) // 1024, 4)
        if cyl_x_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_x_heads = sectors // spt
        if cyl_x_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_x_heads = sectors // spt
    cylinders = cyl_x_heads // heads
    created = int(time.time()) - 946684800  # seconds since 2000-01-01 UTC
    footer = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB",
            b"conectix",
            2,  # features: reserved bit always set
            0x00010000,  # format version 1.0
            0xFFFFFFFFFFFFFFFF,  # data offset: none for a fixed disk
            created & 0xFFFFFFFF,
            b"rvlt",  # creator application
            0x00010000,
            b"Wi2k",  # creator host OS (as Azure's own tools write)
            size,  # original size
            size,  # current size
            cylinders,
            heads,
            spt,
            2,  # disk type: fixed
            0,  # checksum, filled below
            uuid.uuid4().bytes,
            0,  # saved state
        )
    )
    footer += bytes(PAGE - len(footer))
    checksum = (~sum(footer)) & 0xFFFFFFFF
    footer[64:68] = struct.pack(">I", checksum)
    return bytes(footer)


# --------------------------------------------------------------------------- compute


class AzureCompute(Compute):
    """One region's Azure VMs: those of its resource group."""

    def __init__(
        self,
        *,
        region: str,
        settings: AzureComputeSettings,
        client: ComputeManagementClient,
        capabilities: Capabilities = CAPABILITIES,
        blob_client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(provider="azure", region=region, capabilities=capabilities)
        self.settings = settings
        self.client = client
        #: keyword arguments for the BlobClients that read and write disks through SAS URLs
        self.blob_client_kwargs = dict(blob_client_kwargs or {})

    @classmethod
    def from_region(
        cls,
        region: RegionConfig,
        credential: TokenCredential,
        *,
        capabilities: Capabilities = CAPABILITIES,
        **client_kwargs: Any,
    ) -> AzureCompute:
        """The Compute of a region from its settings (:meth:`AzureComputeSettings.from_region`)
        and a credential (the provider builds it from the region's identity settings)."""
        settings = AzureComputeSettings.from_region(region)
        return cls(
            region=region.name,
            settings=settings,
            client=compute_client(settings, credential, **client_kwargs),
            capabilities=capabilities,
        )

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ helpers

    @property
    def _rg(self) -> str:
        return self.settings.resource_group

    def _fail(self, message: str) -> ComputeError:
        return ComputeError(message, provider="azure", region=self.region)

    def _error(
        self, exc: BaseException, what: str, instance_id: str | None = None
    ) -> RegionVaultError:
        if instance_id is not None and isinstance(exc, ResourceNotFoundError):
            return InstanceNotFound(instance_id, provider="azure", region=self.region)
        message = f"{what}: {_describe(exc)}"
        if is_transient(exc):
            return TransientError(
                message, provider="azure", region=self.region, retry_after=_retry_after(exc)
            )
        return self._fail(message)

    def _call(self, what: str, call: Callable[[], T], instance_id: str | None = None) -> T:
        try:
            return call()
        except AzureError as exc:
            raise self._error(exc, what, instance_id) from None

    def _vm_name(self, instance_id: str) -> str:
        if not isinstance(instance_id, str) or not instance_id:
            raise InstanceNotFound(repr(instance_id), provider="azure", region=self.region)
        match = _VM_ID.match(instance_id)
        if match:
            if (
                match["sub"].lower() != self.settings.subscription_id.lower()
                or match["rg"].lower() != self._rg.lower()
            ):
                raise InstanceNotFound(instance_id, provider="azure", region=self.region)
            return match["name"]
        if _VM_NAME.match(instance_id):
            return instance_id
        raise InstanceNotFound(instance_id, provider="azure", region=self.region)

    def _raw_vm(self, instance_id: str) -> Any:
        name = self._vm_name(instance_id)
        vm = self._call(
            f"cannot read VM {name}",
            lambda: self.client.virtual_machines.get(self._rg, name, expand="instanceView"),
            instance_id,
        )
        if str(_get(vm, "properties", "provisioningState") or "").lower() in _GONE_STATES:
            raise InstanceNotFound(instance_id, provider="azure", region=self.region)
        if not self._in_zone(vm):  # another zone's VM is another region's
            raise InstanceNotFound(instance_id, provider="azure", region=self.region)
        return vm

    def _in_zone(self, vm: Any) -> bool:
        """The VM is one this region lists: any, or one of its zone of its location."""
        zone = self.settings.availability_zone
        if zone is None:
            return True
        here = location_name(str(_get(vm, "location") or "")) == location_name(
            self.settings.location
        )
        return here and zone in [str(z) for z in _get(vm, "zones") or []]

    def _instance(self, vm: Any) -> Instance:
        every = {str(k): str(v) for k, v in (_get(vm, "tags") or {}).items()}
        internal = {k: v for k, v in every.items() if k.startswith(INTERNAL_PREFIX)}
        tags = Tags({k: v for k, v in every.items() if not k.startswith(INTERNAL_PREFIX)})
        os_disk = _get(vm, "properties", "storageProfile", "osDisk") or {}
        data_disks = _get(vm, "properties", "storageProfile", "dataDisks") or []
        disks = {
            int(d["lun"]): str(_get(d, "managedDisk", "id"))
            for d in data_disks
            if _get(d, "managedDisk", "id")
        }
        os_disk_id = _get(os_disk, "managedDisk", "id")
        state = str(_get(vm, "properties", "provisioningState") or "unknown")
        power = power_state(vm)
        extra: dict[str, Any] = {
            "vm_name": _get(vm, "name"),
            "vm_size": _get(vm, "properties", "hardwareProfile", "vmSize"),
            "os_disk_id": os_disk_id,
            "os_type": _get(os_disk, "osType"),
            "data_disks": disks,
            "location": _get(vm, "location"),
            "zones": [str(z) for z in _get(vm, "zones") or []],
            "resource_group": self._rg,
            "provisioning_state": state,
            "power_state": power,
            "internal_tags": internal,
        }
        return Instance(
            id=str(_get(vm, "id")),
            name=internal.get(NAME_TAG) or str(_get(vm, "name")),
            region=self.region,
            tags=tags,
            state=_instance_state(state, power),
            function=extra["vm_size"],
            capture_kinds=frozenset({CaptureKind.BLOCKS}) if os_disk_id else frozenset(),
            extra=extra,
        )

    def _check_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise self._fail(f"tag {key!r}={value!r}: keys and values must be strings")
            if not key or len(key) > 512 or len(value) > 256:
                raise self._fail(f"tag {key!r}: names are 1-512 characters, values at most 256")
            if _BAD_TAG_CHARS.search(key):
                raise self._fail(f"tag {key!r}: Azure tag names cannot contain < > % & \\ ? /")
            if key.lower().startswith(_RESERVED_TAG_PREFIXES) or key.startswith(INTERNAL_PREFIX):
                raise self._fail(
                    f"tag {key!r}: the prefixes microsoft, azure, windows and "
                    f"{INTERNAL_PREFIX} are reserved"
                )

    # ------------------------------------------------------------------ listing and tags

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        """At most ``page_size`` VMs, from as few ARM pages as give that many matches."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise self._fail(f"page_size must be a positive integer, got {page_size!r}")
        wanted = dict(tag_filters or {})
        for key, value in wanted.items():
            if (
                not isinstance(key, str)
                or not key
                or (value is not None and not isinstance(value, str))
            ):
                raise self._fail(f"bad tag filter {key!r}={value!r}")
        arm_token, skip = self._parse_page_token(page_token)
        found: list[Instance] = []
        for _ in range(_MAX_PAGES):
            items, following = self._arm_page(arm_token)
            matches = [
                instance
                for instance in map(self._instance, filter(self._in_zone, items))
                if instance.state not in _GONE_STATES and instance.tags.matches(wanted)
            ][skip:]
            need = page_size - len(found)
            if len(matches) > need:
                found.extend(matches[:need])
                return InstancePage(tuple(found), InstancePage.token(arm_token, skip + need))
            found.extend(matches)
            skip = 0
            if not following:
                return InstancePage(tuple(found), None)
            arm_token = following
            if len(found) == page_size:
                return InstancePage(tuple(found), InstancePage.token(arm_token, 0))
        raise self._fail(f"listing VMs did not end after {_MAX_PAGES} pages")

    def _arm_page(self, token: str | None) -> tuple[list[Any], str | None]:
        def fetch() -> tuple[list[Any], str | None]:
            # the instance view (power state) comes with each page: no call per VM
            pager = self.client.virtual_machines.list(self._rg, expand="instanceView").by_page(
                continuation_token=token
            )
            items = list(next(pager, iter(())))
            return items, getattr(pager, "continuation_token", None) or None

        return self._call(f"cannot list the VMs of resource group {self._rg}", fetch)

    def _parse_page_token(self, token: str | None) -> tuple[str | None, int]:
        try:
            return InstancePage.parse_token(token)
        except ValueError as exc:
            raise self._fail(str(exc)) from None

    def get_instance(self, instance_id: str) -> Instance:
        return self._instance(self._raw_vm(instance_id))

    def _retag(self, instance_id: str, change: Callable[[dict[str, str]], dict[str, str]]) -> Tags:
        """Read the VM's tags, change them, write them back under its etag (If-Match), again
        when another writer came between (HTTP 412), a bounded number of times."""
        for _attempt in range(_TAG_RETRIES):
            vm = self._raw_vm(instance_id)
            name = str(_get(vm, "name"))
            current = {str(k): str(v) for k, v in (_get(vm, "tags") or {}).items()}
            wanted = change(dict(current))
            if wanted == current:
                return self._instance(vm).tags
            etag = _get(vm, "etag")
            kwargs: dict[str, Any] = (
                {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
            )
            try:
                updated = self.client.virtual_machines.begin_update(
                    self._rg, name, models.VirtualMachineUpdate({"tags": wanted}), **kwargs
                ).result()
            except HttpResponseError as exc:
                if exc.status_code == 412:
                    continue
                raise self._error(exc, f"cannot tag VM {name}", instance_id) from None
            except AzureError as exc:
                raise self._error(exc, f"cannot tag VM {name}", instance_id) from None
            return self._instance(updated).tags
        raise TransientError(
            f"VM {instance_id}: its tags kept changing under {_TAG_RETRIES} updates",
            provider="azure",
            region=self.region,
        )

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        self._check_tags(tags)
        if len(tags) > _MAX_TAGS:
            raise self._fail(f"at most {_MAX_TAGS} tags on an Azure resource")

        def change(current: dict[str, str]) -> dict[str, str]:
            # Azure tag names are case-insensitive: a new spelling replaces the old one
            new = {k.lower() for k in tags}
            merged = {k: v for k, v in current.items() if k.lower() not in new}
            merged.update(tags)
            if len(merged) > _MAX_TAGS:
                raise self._fail(
                    f"VM {instance_id} would have {len(merged)} tags (Azure allows {_MAX_TAGS})"
                )
            return merged

        return self._retag(instance_id, change)

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        if not all(isinstance(k, str) and k for k in keys):
            raise self._fail(f"bad tag keys {keys!r}")
        # Azure tag names are case-insensitive: removing "backup" removes "Backup" too
        drop = {k.lower() for k in keys if not k.startswith(INTERNAL_PREFIX)}
        return self._retag(
            instance_id,
            lambda current: {k: v for k, v in current.items() if k.lower() not in drop},
        )

    # ------------------------------------------------------------------ capture

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        """A block capture of every managed disk of the VM (the OS disk, then the data disks
        by LUN) into one image, a :class:`Disk` each, through incremental snapshots and a
        read SAS per snapshot.

        Every snapshot is begun before any is waited on, and all are made before any byte is
        read. ``keep``: closing the capture keeps the snapshots (their SAS revoked) and
        :attr:`AzureBlockCapture.ref` names them. ``since``: such a ref of an earlier capture
        of this VM; when its disks are this capture's (same disks, same sizes) and its
        snapshots are still there, :meth:`AzureBlockCapture.changed_ranges` diffs each disk
        against its earlier snapshot; otherwise it gives None (read everything).
        """
        if kind not in (None, CaptureKind.BLOCKS):
            raise self.unsupported(f"capture(kind={kind})")
        earlier = _parse_ref(since, self) if since is not None else None
        vm = self._raw_vm(instance_id)
        instance = self._instance(vm)
        vm_name = str(instance.extra.get("vm_name"))
        sources = self._managed_disks(vm, vm_name)
        parts: list[_DiskSnapshot] = []
        pollers: list[Any] = []
        try:
            # begin every snapshot before waiting on any: the disks are taken as close in
            # time as ARM allows (each is crash-consistent; together they are not atomic)
            for label, disk_id in sources:
                part = _DiskSnapshot(
                    label=label,
                    disk_id=disk_id,
                    snapshot=_resource_name(f"rv-capture-{vm_name}-{label}", 80),
                )
                body = {
                    "location": self.settings.location,
                    "tags": {CAPTURE_TAG: vm_name},
                    "properties": {
                        "creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
                        "incremental": True,
                    },
                }
                parts.append(part)
                try:
                    pollers.append(
                        self.client.snapshots.begin_create_or_update(
                            self._rg, part.snapshot, models.Snapshot(body)
                        )
                    )
                except AzureError as exc:
                    raise self._error(
                        exc, f"cannot snapshot the {_which(label)} of VM {vm_name}"
                    ) from None
            made = [
                self._call(
                    f"cannot snapshot the {_which(part.label)} of VM {vm_name}", poller.result
                )
                for part, poller in zip(parts, pollers, strict=True)
            ]
            offset = 0
            for part, snapshot in zip(parts, made, strict=True):
                part.size = _snapshot_size(snapshot)
                if part.size <= 0:
                    raise self._fail(f"snapshot {part.snapshot} reports no size")
                part.offset = offset
                offset += part.size + (-part.size % BLOCK_SIZE)
            usable = earlier is not None and _same_disks(earlier, parts, self._rg)
            if usable and earlier is not None:
                for part, before in zip(parts, earlier["disks"], strict=True):
                    if not self._made_by_capture(str(before["snapshot"]), vm_name, part.disk_id):
                        usable = False  # gone, or not a capture's snapshot of this disk
                        break
                    part.parent = str(before["snapshot"])
                    part.parent_sas_url = self._grant_read(part.parent, missing_ok=True)
                    if part.parent_sas_url is None:
                        usable = False  # an earlier snapshot is gone: read everything
                        break
            for part in parts:
                part.sas_url = self._grant_read(part.snapshot)
            taken = min(_utc(_get(s, "properties", "timeCreated")) for s in made)
            return AzureBlockCapture(
                instance,
                taken,
                compute=self,
                parts=parts,
                keep=keep,
                incremental=usable,
            )
        except BaseException:
            # a grant that failed may still have left a SAS open: revoke every snapshot's
            # (revoking none is harmless), then delete the ones this capture made
            for poller in pollers:
                with contextlib.suppress(Exception):
                    poller.result()
            for part in parts:
                for name in [part.snapshot, *([part.parent] if part.parent else [])]:
                    with contextlib.suppress(RegionVaultError):
                        self._revoke_snapshot(name)
            for part in parts:  # one whose begin failed may exist all the same
                with contextlib.suppress(RegionVaultError):
                    self._delete_snapshot(part.snapshot)
            raise

    def _managed_disks(self, vm: Any, vm_name: str) -> list[tuple[str, str]]:
        """``(label, disk id)`` of the VM's disks: its OS disk ("os"), then its data disks by
        LUN ("lun0", ...). A disk that is not a managed disk cannot be snapshotted: refused,
        never left out."""
        profile = _get(vm, "properties", "storageProfile") or {}
        os_disk = _get(profile, "osDisk", "managedDisk", "id")
        if not os_disk:
            raise self._fail(f"VM {vm_name} has no managed OS disk to capture")
        found = [("os", str(os_disk))]
        data = sorted(profile.get("dataDisks") or [], key=lambda d: int(_get(d, "lun") or 0))
        for disk in data:
            disk_id = _get(disk, "managedDisk", "id")
            if not disk_id:
                raise self._fail(
                    f"VM {vm_name}: the data disk at LUN {_get(disk, 'lun')} is not a managed "
                    "disk (unmanaged VHDs cannot be captured)"
                )
            found.append((f"lun{int(_get(disk, 'lun') or 0)}", str(disk_id)))
        return found

    def release_capture(self, ref: str) -> None:
        """Revoke and delete the snapshots a capture kept (its ``ref``); one already gone is
        no error. Only a snapshot a capture of the ref's VM made of the ref's disk (its
        :data:`CAPTURE_TAG` names the VM, its source is the disk) is touched: any other is
        left alone and named in the error. Every snapshot is tried; the first failure is
        raised after."""
        kept = _parse_ref(ref, self)
        if str(kept["rg"]).lower() != self._rg.lower():
            raise self._fail(
                f"capture ref of VM {kept['vm']} names resource group {kept['rg']}, not {self._rg}"
            )
        problems: list[RegionVaultError] = []
        foreign: list[str] = []
        for disk in kept["disks"]:
            name = str(disk["snapshot"])
            try:
                made = self._made_by_capture(name, str(kept["vm"]), str(disk["disk"]))
                if made is False:
                    foreign.append(name)
                    continue
                if made is None:
                    continue  # gone already
                self._revoke_snapshot(name)
                self._delete_snapshot(name)
            except RegionVaultError as exc:
                problems.append(exc)
        if foreign:
            raise self._fail(
                f"snapshot {', '.join(foreign)} was not made by a capture of VM {kept['vm']} "
                "(no capture tag naming it, or another source disk): left alone"
            )
        if problems:
            raise problems[0]

    def _made_by_capture(self, snapshot: str, vm_name: str, disk_id: str) -> bool | None:
        """Whether ``snapshot`` is one a capture of VM ``vm_name`` took of ``disk_id`` (its
        :data:`CAPTURE_TAG` and its source disk say so); None when it is gone. A ref names
        snapshots by name only: this keeps a damaged or foreign ref from touching a snapshot
        someone else made."""
        try:
            found = self.client.snapshots.get(self._rg, snapshot)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise self._error(exc, f"cannot read snapshot {snapshot}") from None
        tags = _get(found, "tags") or {}
        source = _get(found, "properties", "creationData", "sourceResourceId")
        return tags.get(CAPTURE_TAG) == vm_name and str(source or "").lower() == disk_id.lower()

    def _grant_read(self, snapshot: str, *, missing_ok: bool = False) -> str | None:
        """A read SAS URL for ``snapshot``; None when it is gone and ``missing_ok``."""
        try:
            answer = self.client.snapshots.begin_grant_access(
                self._rg,
                snapshot,
                {"access": "Read", "durationInSeconds": self.settings.sas_seconds},
            ).result()
        except ResourceNotFoundError as exc:
            if missing_ok:
                return None
            raise self._error(exc, f"cannot get a read SAS for snapshot {snapshot}") from None
        except AzureError as exc:
            what = f"cannot get a read SAS for snapshot {snapshot}"
            if isinstance(exc, HttpResponseError) and exc.status_code == 409:
                # Azure opens read SAS on at most 5 snapshots of one disk at a time
                what += (
                    " (at most 5 snapshots of one disk may have a read SAS at a time: "
                    "release the captures that crashed runs kept)"
                )
            raise self._error(exc, what) from None
        sas = _get(answer, "accessSAS")
        if not sas:
            raise self._fail(f"snapshot {snapshot}: beginGetAccess gave no SAS")
        return str(sas)

    def _until_done_or_gone(self, start: Callable[[], Any], what: str) -> None:
        """Start a long-running ARM operation on a resource and wait for its end; a resource
        that is gone already is no error (these only revoke or delete)."""
        try:
            start().result()
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise self._error(exc, what) from None

    def _revoke_snapshot(self, snapshot: str) -> None:
        self._until_done_or_gone(
            lambda: self.client.snapshots.begin_revoke_access(self._rg, snapshot),
            f"cannot revoke the SAS of snapshot {snapshot}",
        )

    def _delete_snapshot(self, snapshot: str) -> None:
        self._until_done_or_gone(
            lambda: self.client.snapshots.begin_delete(self._rg, snapshot),
            f"cannot delete snapshot {snapshot}",
        )

    def blob(self, sas_url: str) -> BlobClient:
        """A BlobClient for a disk or snapshot through its SAS URL."""
        return BlobClient.from_blob_url(sas_url, **self.blob_client_kwargs)

    # ------------------------------------------------------------------ restore and launch

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        if kind is not CaptureKind.BLOCKS:
            raise self.unsupported(f"open_restore_sink(kind={kind})")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise self._fail(f"a block restore needs the image size in bytes, got {size!r}")
        return AzureBlockSink(self, spec, size, disks)

    def _vm_size_for(self, spec: LaunchSpec) -> str:
        source_extra: Mapping[str, Any] = spec.source.extra if spec.source is not None else {}
        function_size = (
            spec.function if spec.function is not None and _VM_SIZE.match(spec.function) else None
        )
        size = (
            spec.extra.get("vm_size")
            or source_extra.get("vm_size")
            or function_size
            or self.settings.vm_size
        )
        if not size:
            raise self._fail(
                f"launch {spec.name!r}: no VM size (give spec.extra['vm_size'], a source VM, a "
                "function naming an Azure VM size, or the region's vm_size setting)"
            )
        return str(size)

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        if not isinstance(sink, AzureBlockSink) or sink.compute is not self:
            raise self._fail("launch needs a sink made by this region's open_restore_sink")
        if sink.discarded:
            raise self._fail(f"disk {sink.disk_name} was discarded: restore again to launch")
        if not sink.committed:
            raise self._fail(f"disk {sink.disk_name} is not committed yet")
        if sink.launched_instance_id is not None:
            raise self._fail(f"disk {sink.disk_name} already boots {sink.launched_instance_id}")
        vm_size = self._vm_size_for(spec)
        source = spec.source
        base = dict(spec.tags) if spec.tags else (dict(source.tags) if source is not None else {})
        tags = {k: v for k, v in base.items() if not k.startswith(INTERNAL_PREFIX)}
        self._check_tags(tags)
        vm_name = _resource_name(spec.name, 64)
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": vm_size},
            "storageProfile": {
                "osDisk": {
                    "osType": sink.os_type,
                    "createOption": "Attach",
                    "managedDisk": {"id": sink.disk_id},
                    "deleteOption": "Delete",
                },
                # the image's other disks in order, as LUN 0, 1, ...
                "dataDisks": [
                    {
                        "lun": lun,
                        "createOption": "Attach",
                        "managedDisk": {"id": upload.disk_id},
                        "deleteOption": "Delete",
                    }
                    for lun, upload in enumerate(sink.uploads[1:])
                ],
            },
        }
        subnet = spec.extra.get("subnet_id") or self.settings.subnet_id
        if subnet:
            properties["networkProfile"] = {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [
                    {
                        "name": f"{vm_name}-nic",
                        "properties": {
                            "primary": True,
                            "deleteOption": "Delete",
                            "ipConfigurations": [
                                {"name": "ipconfig1", "properties": {"subnet": {"id": subnet}}}
                            ],
                        },
                    }
                ],
            }
        body: dict[str, Any] = {
            "location": self.settings.location,
            "tags": {**tags, NAME_TAG: spec.name},
            "properties": properties,
        }
        if self.settings.availability_zone:  # its disks were made in the zone (_disk_body)
            body["zones"] = [self.settings.availability_zone]
        sink.vm_name = vm_name  # a failed launch's discard deletes what was begun
        vm = self._call(
            f"cannot create VM {vm_name} from disk {sink.disk_name}"
            + (f" and {len(sink.uploads) - 1} data disks" if len(sink.uploads) > 1 else ""),
            lambda: self.client.virtual_machines.begin_create_or_update(
                self._rg, vm_name, models.VirtualMachine(body)
            ).result(),
        )
        instance = self._until_running(self._instance(vm), sink.disk_name)
        sink.launched_instance_id = instance.id
        return instance

    def _until_running(self, instance: Instance, disk_name: str) -> Instance:
        """``instance`` once its power state is ``running``, read from its instance view
        every ``poll_interval`` seconds (at least :data:`START_POLL_FLOOR`; a throttled read
        waits its ``Retry-After`` or backs off) for at most ``start_timeout``; a VM that stops,
        deallocates or fails instead, or is still not running then, is a ComputeError
        naming it and its state (the caller's discard then removes the VM and its disk)."""
        deadline = time.monotonic() + self.settings.start_timeout
        pause = self.settings.poll_interval
        if pause is None:
            pause = _START_POLL
        # a floor whatever poll_interval says (it may be 0 to make ARM's operations quick to
        # poll): hundreds of reads a second would be throttled well before start_timeout
        pause = max(pause, START_POLL_FLOOR)
        backoff = pause
        # a PUT's answer carries no instance view (ARM's neither): read it
        read = instance.extra.get("power_state") is None
        # bounded by the deadline; and by a count, should the clock not move
        for _ in range(1_000_000):
            wait = pause
            try:
                if read:
                    instance = self.get_instance(instance.id)
            except TransientError as exc:
                # throttled (429) or Azure failing: wait as told (Retry-After), or back off,
                # and read again while the deadline allows
                if time.monotonic() >= deadline:
                    raise
                backoff = min(backoff * 2, _START_BACKOFF_MAX)
                wait = max(exc.retry_after or 0.0, backoff)
            else:
                state = instance.state
                if state == "running":
                    return instance
                if state in _STOPPED_POWER_STATES or state == "failed":
                    raise self._fail(
                        f"VM {instance.extra.get('vm_name')} from disk {disk_name} did not "
                        f"start: it is {state} (provisioning "
                        f"{instance.extra.get('provisioning_state')})"
                    )
                backoff = pause
            if time.monotonic() >= deadline:
                break
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            read = True
        raise self._fail(
            f"VM {instance.extra.get('vm_name')} from disk {disk_name} is not running after "
            f"{self.settings.start_timeout:g}s (start_timeout): it is {instance.state}"
        )

    def terminate(self, instance_id: str) -> None:
        """Delete the VM; the disks a launch attached go with it (``deleteOption``), and any
        of its disks tagged as a restore disk is deleted too if it is still there."""
        vm = self._raw_vm(instance_id)
        name = str(_get(vm, "name"))
        self._call(
            f"cannot delete VM {name}",
            lambda: self.client.virtual_machines.begin_delete(self._rg, name).result(),
            instance_id,
        )
        profile = _get(vm, "properties", "storageProfile") or {}
        disk_ids = [
            _get(d, "managedDisk", "id")
            for d in [profile.get("osDisk") or {}, *(profile.get("dataDisks") or [])]
        ]
        for disk_id in filter(None, disk_ids):
            disk_name = str(disk_id).rsplit("/", 1)[-1]
            try:
                disk = self.client.disks.get(self._rg, disk_name)
            except ResourceNotFoundError:
                continue
            except AzureError as exc:
                raise self._error(exc, f"cannot read disk {disk_name}") from None
            if RESTORE_TAG in (_get(disk, "tags") or {}):
                self._delete_disk(disk_name)

    def _delete_disk(self, disk_name: str) -> None:
        self._until_done_or_gone(
            lambda: self.client.disks.begin_delete(self._rg, disk_name),
            f"cannot delete disk {disk_name}",
        )

    def _delete_vm(self, vm_name: str) -> None:
        self._until_done_or_gone(
            lambda: self.client.virtual_machines.begin_delete(self._rg, vm_name),
            f"cannot delete VM {vm_name}",
        )


# --------------------------------------------------------------------------- capture

_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_REF_VERSION = 1


def _which(label: str) -> str:
    return "OS disk" if label == "os" else f"data disk at LUN {label.removeprefix('lun')}"


def _snapshot_size(snapshot: Any) -> int:
    size = int(_get(snapshot, "properties", "diskSizeBytes") or 0)
    if size <= 0:
        size = int(_get(snapshot, "properties", "diskSizeGB") or 0) * GiB
    return size


@dataclass
class _DiskSnapshot:
    """One managed disk of a capture: its snapshot, where it lies in the image, its read SAS
    and, for a capture ``since`` an earlier one, that capture's snapshot of the same disk."""

    label: str
    disk_id: str
    snapshot: str
    size: int = 0
    offset: int = 0
    sas_url: str | None = None
    parent: str | None = None
    parent_sas_url: str | None = None

    @property
    def disk(self) -> Disk:
        return Disk(self.label, self.offset, self.size)


def _make_ref(compute: AzureCompute, vm_name: str, parts: Sequence[_DiskSnapshot]) -> str:
    """What a kept capture names (:attr:`AzureBlockCapture.ref`): its resource group, VM and
    per disk the disk, its size and its snapshot. Names only: no SAS, nothing secret."""
    doc = {
        "v": _REF_VERSION,
        "rg": compute.settings.resource_group,
        "vm": vm_name,
        "disks": [
            {"name": p.label, "disk": p.disk_id, "size": p.size, "snapshot": p.snapshot}
            for p in parts
        ],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _parse_ref(ref: str, compute: AzureCompute) -> dict[str, Any]:
    """A ref made by :func:`_make_ref`, checked; ComputeError names what is wrong."""
    try:
        doc = json.loads(ref)
        if not isinstance(doc, dict) or doc.get("v") != _REF_VERSION:
            raise ValueError("not a version-1 Azure capture ref")
        if not isinstance(doc.get("rg"), str) or not isinstance(doc.get("vm"), str):
            raise ValueError("no resource group or VM")
        disks = doc.get("disks")
        if not isinstance(disks, list) or not disks:
            raise ValueError("no disks")
        for disk in disks:
            if not (
                isinstance(disk, dict)
                and isinstance(disk.get("name"), str)
                and isinstance(disk.get("disk"), str)
                and isinstance(disk.get("size"), int)
                and isinstance(disk.get("snapshot"), str)
                and _SNAPSHOT_NAME.match(disk["snapshot"])
            ):
                raise ValueError(f"bad disk entry {str(disk)[:80]}")
    except (ValueError, TypeError) as exc:
        raise compute._fail(f"bad capture ref {str(ref)[:60]!r}: {exc}") from None
    return doc


def _same_disks(earlier: Mapping[str, Any], parts: Sequence[_DiskSnapshot], rg: str) -> bool:
    """Whether an earlier capture's disks are these, in this order and of these sizes (else
    a diff against its snapshots would not describe this image)."""
    disks = earlier["disks"]
    return (
        str(earlier["rg"]).lower() == rg.lower()
        and len(disks) == len(parts)
        and all(
            d["name"] == p.label and d["disk"].lower() == p.disk_id.lower() and d["size"] == p.size
            for d, p in zip(disks, parts, strict=True)
        )
    )


def _merge(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Sorted, merged ``[start, end)`` ranges widened to whole blocks (:data:`BLOCK_SIZE`:
    captures yield block-aligned offsets) and clipped to ``[0, limit)``."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        start = max(0, start - start % BLOCK_SIZE)
        end = min(end + (-end % BLOCK_SIZE), limit)
        if start >= end:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(
    ranges: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``[start, end)`` pieces of the sorted, disjoint ``ranges`` outside the sorted, disjoint
    ``holes``."""
    out: list[tuple[int, int]] = []
    j = 0
    for start, end in ranges:
        while j < len(holes) and holes[j][1] <= start:
            j += 1
        k = j
        while start < end and k < len(holes) and holes[k][0] < end:
            if holes[k][0] > start:
                out.append((start, holes[k][0]))
            start = max(start, holes[k][1])
            k += 1
        if start < end:
            out.append((start, end))
    return out


def _intersect(
    ranges: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``[start, end)`` pieces lying in both sorted, disjoint lists."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(ranges) and j < len(spans):
        lo, hi = max(ranges[i][0], spans[j][0]), min(ranges[i][1], spans[j][1])
        if lo < hi:
            out.append((lo, hi))
        if ranges[i][1] <= spans[j][1]:
            i += 1
        else:
            j += 1
    return out


class AzureBlockCapture(BlockCapture):
    """The bytes of a VM's disks, one incremental snapshot each, read as page blobs through
    their read SAS; the image holds the disks one after another (:attr:`disks`, each at a
    block-aligned offset: the OS disk first, then the data disks by LUN)."""

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        compute: AzureCompute,
        parts: Sequence[_DiskSnapshot],
        keep: bool,
        incremental: bool,
    ) -> None:
        layout = [p.disk for p in parts]
        super().__init__(
            instance, taken_at, size=layout[-1].end, block_size=BLOCK_SIZE, disks=layout
        )
        self.compute = compute
        self.parts = tuple(parts)
        self._keep = keep
        self._incremental = incremental
        self._blobs = [compute.blob(str(p.sas_url)) for p in parts]
        self._closed = False
        self._changed: list[tuple[int, int]] | None = None
        if keep:
            self.ref = _make_ref(compute, str(instance.extra.get("vm_name")), parts)
        #: bytes read through the SAS and read requests made, for the request-count figures
        self.bytes_read = 0
        self.reads = 0
        self._count_lock = threading.Lock()

    @property
    def snapshot_names(self) -> list[str]:
        """The snapshots this capture took, one per disk, in image order."""
        return [p.snapshot for p in self.parts]

    def _error(self, exc: BaseException, what: str, part: _DiskSnapshot) -> RegionVaultError:
        return self.compute._error(exc, f"{what} of snapshot {part.snapshot}")

    def _data_ranges(self, index: int) -> list[tuple[int, int]]:
        """``[start, end)`` of the disk's page ranges that hold data, in the disk's own
        offsets (Get Page Ranges, paged), widened to whole blocks."""
        part = self.parts[index]
        try:
            found = [
                (int(r.start or 0), int(r.end or 0) + 1)
                for r in self._blobs[index].list_page_ranges()
                if not r.cleared
            ]
        except AzureError as exc:
            raise self._error(exc, "cannot list the page ranges", part) from None
        return _merge(found, part.size)

    def _parent_data_ranges(self, index: int) -> list[tuple[int, int]]:
        """The page ranges that held data in the ``since`` capture's snapshot of the disk at
        ``index`` (its own offsets), widened to whole blocks."""
        part = self.parts[index]
        assert part.parent_sas_url is not None
        try:
            with self.compute.blob(part.parent_sas_url) as parent:
                found = [
                    (int(r.start or 0), int(r.end or 0) + 1)
                    for r in parent.list_page_ranges()
                    if not r.cleared
                ]
        except AzureError as exc:
            raise self._error(exc, "cannot list the earlier snapshot's page ranges", part) from None
        return _merge(found, part.size)

    def data_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` in the image of every page range that holds data."""
        return [
            (part.offset + start, part.offset + end)
            for index, part in enumerate(self.parts)
            for start, end in self._data_ranges(index)
        ]

    def page_range_diff(
        self, index: int = 0
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(filled, cleared)`` of the disk at ``index`` (the disk's own offsets): the ranges
        written and the ranges cleared since the earlier capture's snapshot of it (Get Page
        Ranges with ``x-ms-previous-snapshot-url``, the managed-disk diff)."""
        diff = self._diff(index)
        if diff is None:
            part = self.parts[index]
            raise self.compute._fail(
                f"snapshot {part.snapshot}: no diff against the earlier snapshot {part.parent} "
                "(it is gone, or Azure's answer made no sense)"
            )
        return diff

    def _diff(self, index: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        part = self.parts[index]
        if not part.parent_sas_url:
            raise self.compute._fail(
                f"snapshot {part.snapshot}: changed ranges need a capture taken with since= "
                "a kept capture of the same disks"
            )
        # Get Page Ranges answers at most 10,000 ranges a call and a NextMarker when there
        # are more (REST api 2020-10-02+); the SDK's get_page_range_diff_for_managed_disk
        # reads one answer only, so the pages are followed here through the generated
        # operation. Any doubt about an answer (a range that makes no sense, a marker seen
        # before, too many pages) gives None: the caller reads everything.
        operations = self._blobs[index]._client.page_blob
        filled: list[tuple[int, int]] = []
        cleared: list[tuple[int, int]] = []
        marker: str | None = None
        seen: set[str] = set()
        for _ in range(_DIFF_PAGES_MAX):
            try:
                page = operations.get_page_ranges_diff(
                    prev_snapshot_url=part.parent_sas_url, marker=marker
                )
            except ResourceNotFoundError:
                return None
            except (DecodeError, DeserializationError):
                return None  # an answer that is not a page list
            except AzureError as exc:
                raise self._error(
                    exc, "cannot diff the page ranges against the parent", part
                ) from None
            for into, found in ((filled, page.page_range), (cleared, page.clear_range)):
                for r in found or []:
                    start, end = r.start, r.end
                    if (
                        not isinstance(start, int)
                        or not isinstance(end, int)
                        or not (0 <= start <= end)
                    ):
                        return None
                    into.append((start, end + 1))
            marker = page.next_marker
            if not marker:
                break
            if not isinstance(marker, str) or marker in seen:
                return None
            seen.add(marker)
        else:
            return None
        return _merge(filled, part.size), _merge(cleared, part.size)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """Where this image may differ from the ``since`` capture's: per disk the ranges
        written or cleared since that capture's snapshot of it, shifted to the disk's offset,
        widened to whole blocks and merged (``(offset, length)``). None without ``since``, or
        when that capture's disks are not these or one of its snapshots is gone."""
        if not self._incremental:
            return None
        if self._changed is None:
            ranges: list[tuple[int, int]] = []
            for index, part in enumerate(self.parts):
                diff = self._diff(index)
                if diff is None:
                    return None  # the earlier snapshot went after the capture began
                filled, cleared = diff
                # what held data in the earlier snapshot and holds none now was cleared, even
                # when a diff answer leaves it out (Azurite answers the current page list):
                # taking the base's bytes there would bring back what was trimmed
                vanished = _subtract(self._parent_data_ranges(index), self._data_ranges(index))
                ranges.extend(
                    (part.offset + s, part.offset + e) for s, e in filled + cleared + vanished
                )
            self._changed = [(s, e - s) for s, e in _merge(ranges, self.size)]
        return list(self._changed)

    def _read(self, index: int, offset: int, length: int) -> bytes:
        part = self.parts[index]
        try:
            data = self._blobs[index].download_blob(offset=offset, length=length).readall()
        except AzureError as exc:
            raise self._error(exc, f"cannot read {length} bytes at {offset}", part) from None
        if len(data) != length:
            raise self.compute._fail(
                f"snapshot {part.snapshot}: read {len(data)} bytes at {offset}, expected {length}"
            )
        with self._count_lock:
            self.bytes_read += length
            self.reads += 1
        return bytes(data)

    @staticmethod
    def _pieces(index: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
        """``(disk index, offset in the disk, length)`` pieces of a disk's ranges, ending on
        :data:`PIECE` boundaries so neighbouring ranges read alike."""
        for start, end in ranges:
            offset = start
            while offset < end:
                stop = min(end, (offset // PIECE + 1) * PIECE)
                yield index, offset, stop - offset
                offset = stop

    def _ordered(self, pieces: Iterator[tuple[int, int, int]]) -> Iterator[tuple[int, bytes]]:
        """Read pieces with a bounded number in flight, yielding ``(image offset, data)`` in
        order."""
        workers = max(1, self.compute.settings.concurrency)
        window = workers * 2
        pending: deque[tuple[int, Future[bytes]]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rv-az-read") as pool:
            try:
                for index, offset, length in pieces:
                    future = pool.submit(self._read, index, offset, length)
                    pending.append((self.parts[index].offset + offset, future))
                    if len(pending) >= window:
                        done_offset, done = pending.popleft()
                        yield done_offset, done.result()
                while pending:
                    done_offset, done = pending.popleft()
                    yield done_offset, done.result()
            finally:
                for _offset, future in pending:
                    future.cancel()

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """The bytes of every page range that holds data, disk after disk; ranges never
        written (and the holes between disks) are left out (zeros)."""

        def pieces() -> Iterator[tuple[int, int, int]]:
            for index in range(len(self.parts)):
                yield from self._pieces(index, self._data_ranges(index))

        return self._ordered(pieces())

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """The written data within ``spans`` (image offsets): only the page ranges holding
        data that lie in a span are read, nothing else."""
        wanted = [(o, o + n) for o, n in spans if n > 0]

        def pieces() -> Iterator[tuple[int, int, int]]:
            for index, part in enumerate(self.parts):
                local = _intersect(
                    [(s - part.offset, e - part.offset) for s, e in wanted],
                    [(0, part.size)],
                )
                if local:
                    yield from self._pieces(index, _intersect(self._data_ranges(index), local))

        return self._ordered(pieces())

    def close(self) -> None:
        """Revoke every SAS (this capture's and the earlier snapshots'); delete this
        capture's snapshots unless kept. Every snapshot is tried; the first failure is raised
        after."""
        if self._closed:
            return
        self._closed = True
        for blob in self._blobs:
            with contextlib.suppress(Exception):
                blob.close()
        problems: list[RegionVaultError] = []
        left: list[str] = []
        why: list[str] = []
        for part in self.parts:
            revoked: RegionVaultError | None = None
            try:
                self.compute._revoke_snapshot(part.snapshot)
            except RegionVaultError as exc:
                revoked = exc
                if not self._keep:
                    # Azure refuses to delete a snapshot whose SAS is open: once more
                    time.sleep(_REVOKE_PAUSE)
                    with contextlib.suppress(RegionVaultError):
                        self.compute._revoke_snapshot(part.snapshot)
                        revoked = None
            if revoked is not None:
                problems.append(revoked)
            if not self._keep:
                # the delete is tried even when the revoke failed: an unkept snapshot is
                # named by no ref, so one left here would never be released
                try:
                    self.compute._delete_snapshot(part.snapshot)
                except RegionVaultError as exc:
                    problems.append(exc)
                    left.append(part.snapshot)
                    why.extend(p.message for p in (revoked, exc) if p is not None)
            if part.parent_sas_url and part.parent:
                try:
                    self.compute._revoke_snapshot(part.parent)
                except RegionVaultError as exc:
                    problems.append(exc)
        if left:
            raise self.compute._fail(
                f"capture of VM {self.instance.extra.get('vm_name')}: snapshot "
                f"{', '.join(left)} could not be deleted and is left behind ({'; '.join(why)})"
            )
        if problems:
            raise problems[0]


# --------------------------------------------------------------------------- restore


def _upload_data_size(size: int) -> int:
    """The data bytes of an upload disk holding ``size`` bytes: a whole number of MiB, at
    least Azure's smallest upload disk."""
    return max(MIN_UPLOAD_DATA, math.ceil(size / MiB) * MiB)


@dataclass
class _UploadDisk:
    """One managed disk a restore makes: the image bytes ``[offset, offset + size)`` go to
    its pages from 0; its data is ``data_size`` bytes (then the VHD footer)."""

    label: str
    offset: int
    size: int
    data_size: int
    disk_name: str
    disk_id: str = ""
    blob: BlobClient | None = None
    sas_open: bool = False


class AzureBlockSink(BlockSink):
    """New managed disks created for upload, one per :class:`Disk` of the image, each
    written as a page blob through its write SAS; a write is routed by its offset (split
    where it crosses from one disk into the next).

    :meth:`commit` writes each disk's fixed-VHD footer after its data and revokes the SAS
    (the disks are then ready to attach: the first as the OS disk, the others as data disks
    LUN 0, 1, ...). :meth:`discard` deletes a VM a failed launch began, revokes the SAS and
    deletes every disk.
    """

    def __init__(
        self,
        compute: AzureCompute,
        spec: LaunchSpec,
        size: int,
        disks: Sequence[Disk] | None = None,
    ) -> None:
        try:
            layout = disk_layout(disks, size, BLOCK_SIZE)
        except ValueError as exc:
            raise compute._fail(f"restore of {spec.name!r}: {exc}") from None
        if len(layout) == 1 and layout[0].offset == 0:
            # one disk: the image rounded up to the disk Azure makes, as before disks existed
            data_size = _upload_data_size(max(size, layout[0].size))
            layout = (Disk(layout[0].name, 0, data_size),)
            size = data_size
        super().__init__(size=size, block_size=BLOCK_SIZE, disks=layout)
        self.compute = compute
        self.spec = spec
        self.committed = False
        self.discarded = False
        self.launched_instance_id: str | None = None
        self.vm_name: str | None = None
        self.bytes_written = 0
        self.writes = 0
        source_extra: Mapping[str, Any] = spec.source.extra if spec.source is not None else {}
        self.os_type = str(spec.extra.get("os_type") or source_extra.get("os_type") or "Linux")
        self.uploads = [
            _UploadDisk(
                label=d.name,
                offset=d.offset,
                size=d.size,
                data_size=_upload_data_size(d.size),
                disk_name=_resource_name(
                    f"{spec.name}-osdisk" if i == 0 else f"{spec.name}-data{i - 1}", 80
                ),
            )
            for i, d in enumerate(self.disks)
        ]
        self._lock = threading.Lock()
        self._in_flight: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        settings = compute.settings
        pollers: list[Any] = []
        try:
            # begin every disk before waiting on any
            for index, upload in enumerate(self.uploads):
                body = self._disk_body(upload, index)
                try:
                    pollers.append(
                        compute.client.disks.begin_create_or_update(
                            settings.resource_group, upload.disk_name, models.Disk(body)
                        )
                    )
                except AzureError as exc:
                    raise compute._error(
                        exc, f"cannot create an upload disk for restoring {spec.name!r}"
                    ) from None
            for upload, poller in zip(self.uploads, pollers, strict=True):
                disk = compute._call(
                    f"cannot create an upload disk for restoring {spec.name!r}", poller.result
                )
                upload.disk_id = str(_get(disk, "id"))
            for upload in self.uploads:
                self._grant_write(upload)
        except BaseException:
            for poller in pollers:
                with contextlib.suppress(Exception):
                    poller.result()
            self._remove_disks(quiet=True)
            raise
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.concurrency), thread_name_prefix="rv-az-write"
        )
        self._window = max(1, settings.concurrency) * 2

    def _grant_write(self, upload: _UploadDisk) -> None:
        upload.sas_open = True  # a grant that failed may have opened it: revoke it all the same
        try:
            answer = self.compute.client.disks.begin_grant_access(
                self.compute.settings.resource_group,
                upload.disk_name,
                {"access": "Write", "durationInSeconds": self.compute.settings.sas_seconds},
            ).result()
        except AzureError as exc:
            raise self.compute._error(
                exc, f"cannot get a write SAS for disk {upload.disk_name}"
            ) from None
        sas = _get(answer, "accessSAS")
        if not sas:
            raise self.compute._fail(f"disk {upload.disk_name}: beginGetAccess gave no SAS")
        upload.blob = self.compute.blob(str(sas))

    def _disk_body(self, upload: _UploadDisk, index: int) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "creationData": {
                "createOption": "Upload",
                "uploadSizeBytes": upload.data_size + PAGE,
            },
        }
        if index == 0:
            properties["osType"] = self.os_type
            # the VM model does not carry it (the source's disk does): a Gen2 image needs
            # spec.extra["hyper_v_generation"] = "V2"
            generation = self.spec.extra.get("hyper_v_generation")
            if generation:
                properties["hyperVGeneration"] = generation
        body: dict[str, Any] = {
            "location": self.compute.settings.location,
            "sku": {"name": self.compute.settings.disk_sku},
            "tags": {RESTORE_TAG: self.spec.name[:256]},
            "properties": properties,
        }
        zone = self.compute.settings.availability_zone
        if zone:  # a zonal VM attaches only disks of its zone
            body["zones"] = [zone]
        return body

    @property
    def disk_id(self) -> str:
        """The OS disk's resource id (the first disk)."""
        return self.uploads[0].disk_id

    @property
    def disk_name(self) -> str:
        return self.uploads[0].disk_name

    @property
    def disk_ids(self) -> list[str]:
        """Every disk's resource id, in image order (OS disk first)."""
        return [u.disk_id for u in self.uploads]

    def _put(self, upload: _UploadDisk, offset: int, data: bytes) -> None:
        assert upload.blob is not None
        try:
            upload.blob.upload_page(data, offset=offset, length=len(data))
        except AzureError as exc:
            raise self.compute._error(
                exc, f"cannot write {len(data)} bytes at {offset} of disk {upload.disk_name}"
            ) from None
        with self._lock:
            self.bytes_written += len(data)
            self.writes += 1

    def write(self, offset: int, data: bytes) -> None:
        """Route ``data`` to the disks it lies in and queue it in pieces of up to 4 MiB;
        all-zero pieces are skipped (the disks start zeroed), and so are zeros in the holes
        between disks (anything else there is refused). A failed earlier write is raised
        here or by commit."""
        self._check_live()
        if self.committed:
            raise self.compute._fail(f"disk {self.disk_name} is already committed")
        if offset < 0 or offset % self.block_size:
            raise self.compute._fail(
                f"write offset {offset} is not a multiple of {self.block_size}"
            )
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if end > self.size:
            raise self.compute._fail(
                f"write of {len(view)} bytes at {offset} runs past the {self.size}-byte image"
            )
        # every hole is checked before anything is queued: a refused write writes nothing
        # (a part queued first would race a later write of the same bytes)
        try:
            routed = split_by_disk(self.disks, offset, view)
        except ValueError as exc:
            raise self.compute._fail(f"restore of {self.spec.name!r}: {exc}") from None
        for index, at, piece in routed:
            self._queue(self.uploads[index], at, piece)

    def _queue(self, upload: _UploadDisk, local: int, view: memoryview) -> None:
        assert self._pool is not None
        for start in range(0, len(view), PIECE):
            piece = bytes(view[start : start + PIECE])
            if len(piece) % PAGE:
                piece += bytes(PAGE - len(piece) % PAGE)
            if not piece.strip(b"\0"):
                continue
            for _wait in range(_MAX_PAGES):
                with self._lock:
                    if len(self._in_flight) < self._window:
                        self._in_flight.append(
                            self._pool.submit(self._put, upload, local + start, piece)
                        )
                        break
                    head = self._in_flight.popleft()
                head.result()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._in_flight:
                    return
                head = self._in_flight.popleft()
            head.result()

    def commit(self) -> None:
        """Wait for every write, write each disk's VHD footer, revoke each SAS: the disks
        are ready."""
        self._check_live()
        if self.committed:
            return
        self._drain()
        for upload in self.uploads:
            self._put(upload, upload.data_size, vhd_footer(upload.data_size))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for upload in self.uploads:
            self._end_upload(upload)
        self.committed = True

    def _end_upload(self, upload: _UploadDisk) -> None:
        self.compute._until_done_or_gone(
            lambda: self.compute.client.disks.begin_revoke_access(
                self.compute.settings.resource_group, upload.disk_name
            ),
            f"cannot end the upload of disk {upload.disk_name}",
        )
        upload.sas_open = False
        if upload.blob is not None:
            with contextlib.suppress(Exception):
                upload.blob.close()

    def _check_live(self) -> None:
        if self.discarded:
            raise self.compute._fail(f"disk {self.disk_name} was discarded")

    def _remove_disks(self, *, quiet: bool) -> None:
        """Revoke each open SAS and delete every disk (one never made is no error); every
        disk is tried, the first failure raised after unless ``quiet``."""
        problems: list[RegionVaultError] = []
        for upload in self.uploads:
            if upload.sas_open:
                with contextlib.suppress(RegionVaultError):
                    self._end_upload(upload)
            try:
                self.compute._delete_disk(upload.disk_name)
            except RegionVaultError as exc:
                problems.append(exc)
        if problems and not quiet:
            raise problems[0]

    def discard(self) -> None:
        """Give up on this restore: stop writing, delete the VM a failed launch began,
        revoke the SAS, delete every disk. Nothing is removed once a launch made a VM from
        them (terminating that VM does)."""
        if self.launched_instance_id is not None:
            return
        self.discarded = True
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._in_flight.clear()
        vm_failure: RegionVaultError | None = None
        if self.vm_name is not None:
            try:
                self.compute._delete_vm(self.vm_name)
                self.vm_name = None
            except RegionVaultError as exc:
                vm_failure = exc
        if vm_failure is None:
            self._remove_disks(quiet=False)
            return
        # the disks are still tried: a VM never made, or one whose delete took effect
        # before the failure came back, holds none of them (one attached to a VM that is
        # still there is refused by Azure, and named here)
        try:
            self._remove_disks(quiet=False)
        except RegionVaultError as disk_failure:
            raise self.compute._fail(f"{vm_failure.message}; and {disk_failure.message}") from None
        raise vm_failure
