"""Compute on Azure virtual machines through azure-mgmt-compute: tag-filtered paged listings,
tags, block captures of a VM's managed disks, restores into a new managed disk and launches.

Listing: ``virtualMachines.list`` of the region's resource group, one ARM page per call
(``nextLink``); ARM has no server-side tag filter for VMs, so pages are filtered here and cut to
``page_size``, the token saying which ARM page to go on from and how many of its matches were
already returned.

Capture: an incremental snapshot of the disk (the OS disk, or the data disk at ``ex_lun``),
then a read SAS for it (``beginGetAccess``); its bytes are read with azure-storage-blob as a
page blob, only the page ranges that hold data (``Get Page Ranges``); against a parent
snapshot, only the ranges that changed (``x-ms-previous-snapshot-url``, see
:meth:`AzureBlockCapture.changed_blocks`). Closing revokes the SAS and deletes the snapshot.

Restore: an empty managed disk created for upload (``createOption: Upload``, a whole number of
MiB plus the 512-byte VHD footer), a write SAS, the blocks written as pages (all-zero pieces
skipped: the disk starts zeroed), the fixed-VHD footer written, the SAS revoked; then a VM of
the original size with the original tags attaches the disk as its OS disk. A failed restore
or launch removes the VM it began and the disk (:meth:`AzureBlockSink.discard`).

Power state: VMs are read with their instance view (``$expand=instanceView``, with each
listing page too), and an Instance's ``state`` is the VM's power state (``running``,
``starting``, ``stopped``, ``deallocated``, ...) once it is provisioned. A stopped or
deallocated VM is backed up like a running one (its disks are snapshotted either way). A
launch returns once its VM is ``running``, and fails naming the VM and its state when the VM
stops or does not run within ``start_timeout``.
"""

from __future__ import annotations

import base64
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
)

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
_TOKEN_PREFIX = "rv1."
_SAS_SIG = re.compile(r"(sig|se|sp|sv|sr|st|spr|skoid|sktid|skt|ske|sks|skv)=[^&\s\"']+", re.I)

CAPABILITIES = Capabilities(capture_kinds=frozenset({CaptureKind.BLOCKS}), launch=True)
#: the site.toml keys :meth:`AzureComputeSettings.from_region` reads besides identity.py's
#: ``ca_file`` (settings.py names them without importing this module; a test checks they agree)
COMPUTE_SETTINGS = frozenset(
    {
        "subscription_id",
        "resource_group",
        "location",
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

T = TypeVar("T")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AzureComputeSettings:
    """What a region's Compute needs from site.toml (the compute part of its settings)."""

    subscription_id: str
    resource_group: str
    location: str
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
            raise region.error("poll_interval", "must be a number of seconds from 0 to 300")
        start = settings.get("start_timeout", 600)
        if isinstance(start, bool) or not isinstance(start, int | float) or not 1 <= start <= 7200:
            raise region.error("start_timeout", "must be a number of seconds from 1 to 7200")
        # the same PEM bundle the login uses (identity.py's ``ca_file``)
        ca = optional("ca_file")
        return cls(
            subscription_id=str(settings["subscription_id"]),
            resource_group=str(settings["resource_group"]),
            location=str(settings["location"]),
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
        return vm

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
                for instance in map(self._instance, items)
                if instance.state not in _GONE_STATES and instance.tags.matches(wanted)
            ][skip:]
            need = page_size - len(found)
            if len(matches) > need:
                found.extend(matches[:need])
                return InstancePage(tuple(found), _page_token(arm_token, skip + need))
            found.extend(matches)
            skip = 0
            if not following:
                return InstancePage(tuple(found), None)
            arm_token = following
            if len(found) == page_size:
                return InstancePage(tuple(found), _page_token(arm_token, 0))
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
        if not token:
            return None, 0
        try:
            if not token.startswith(_TOKEN_PREFIX):
                raise ValueError("no prefix")
            doc = json.loads(base64.urlsafe_b64decode(token[len(_TOKEN_PREFIX) :].encode()))
            arm, skip = doc["t"], int(doc["s"])
            if (arm is not None and not isinstance(arm, str)) or skip < 0:
                raise ValueError("bad fields")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._fail(f"bad page token {token[:40]!r}") from None
        return arm, skip

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
        ex_lun: int | None = None,
        ex_parent_snapshot: str | None = None,
        ex_keep_snapshot: bool = False,
    ) -> Capture:
        """A block capture of the VM's OS disk (or its data disk at ``ex_lun``) through an
        incremental snapshot and a read SAS.

        ``ex_parent_snapshot`` names an earlier incremental snapshot of the same disk (in
        this resource group), for :meth:`AzureBlockCapture.changed_blocks`. The snapshot this
        capture takes is deleted on close unless ``ex_keep_snapshot`` (keep it to be the next
        capture's parent); its name is :attr:`AzureBlockCapture.snapshot_name`.
        """
        if kind not in (None, CaptureKind.BLOCKS):
            raise self.unsupported(f"capture(kind={kind})")
        instance = self._instance(self._raw_vm(instance_id))
        if ex_lun is None:
            disk_id = instance.extra.get("os_disk_id")
            which = "OS disk"
        else:
            disk_id = instance.extra["data_disks"].get(ex_lun)
            which = f"data disk at LUN {ex_lun}"
        if not disk_id:
            raise self._fail(f"VM {instance_id} has no managed {which} to capture")
        snapshot = _resource_name(f"rv-capture-{instance.extra.get('vm_name')}", 80)
        body = {
            "location": self.settings.location,
            "tags": {CAPTURE_TAG: str(instance.extra.get("vm_name"))},
            "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
                "incremental": True,
            },
        }
        made = self._call(
            f"cannot snapshot the {which} of VM {instance.extra.get('vm_name')}",
            lambda: self.client.snapshots.begin_create_or_update(
                self._rg, snapshot, models.Snapshot(body)
            ).result(),
        )
        granted: list[str] = []
        try:
            sas = self._grant_read(snapshot)
            granted.append(snapshot)
            parent_sas = None
            if ex_parent_snapshot:
                parent_sas = self._grant_read(ex_parent_snapshot)
                granted.append(ex_parent_snapshot)
            size = int(_get(made, "properties", "diskSizeBytes") or 0)
            if size <= 0:
                gib = int(_get(made, "properties", "diskSizeGB") or 0)
                size = gib * GiB
            if size <= 0:
                raise self._fail(f"snapshot {snapshot} reports no size")
            return AzureBlockCapture(
                instance,
                _utc(_get(made, "properties", "timeCreated")),
                size=size,
                compute=self,
                snapshot_name=snapshot,
                sas_url=sas,
                parent_snapshot=ex_parent_snapshot,
                parent_sas_url=parent_sas,
                revoke=granted,
                delete_on_close=not ex_keep_snapshot,
            )
        except BaseException:
            # a grant that failed may still have left a SAS open: revoke this snapshot's
            # always (revoking none is harmless), the parent's if it was granted
            for name in {snapshot, *granted}:
                with contextlib.suppress(RegionVaultError):
                    self._revoke_snapshot(name)
            with contextlib.suppress(RegionVaultError):
                self._delete_snapshot(snapshot)
            raise

    def _grant_read(self, snapshot: str) -> str:
        answer = self._call(
            f"cannot get a read SAS for snapshot {snapshot}",
            lambda: self.client.snapshots.begin_grant_access(
                self._rg,
                snapshot,
                {"access": "Read", "durationInSeconds": self.settings.sas_seconds},
            ).result(),
        )
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
        if disks is not None and len(disks) > 1:
            raise self.unsupported(f"a restore of {len(disks)} disks")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise self._fail(f"a block restore needs the disk size in bytes, got {size!r}")
        return AzureBlockSink(self, spec, size)

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
                }
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
        body = {
            "location": self.settings.location,
            "tags": {**tags, NAME_TAG: spec.name},
            "properties": properties,
        }
        sink.vm_name = vm_name  # a failed launch's discard deletes what was begun
        vm = self._call(
            f"cannot create VM {vm_name} from disk {sink.disk_name}",
            lambda: self.client.virtual_machines.begin_create_or_update(
                self._rg, vm_name, models.VirtualMachine(body)
            ).result(),
        )
        instance = self._until_running(self._instance(vm), sink.disk_name)
        sink.launched_instance_id = instance.id
        return instance

    def _until_running(self, instance: Instance, disk_name: str) -> Instance:
        """``instance`` once its power state is ``running``, read from its instance view
        every ``poll_interval`` seconds for at most ``start_timeout``; a VM that stops,
        deallocates or fails instead, or is still not running then, is a ComputeError
        naming it and its state (the caller's discard then removes the VM and its disk)."""
        deadline = time.monotonic() + self.settings.start_timeout
        pause = self.settings.poll_interval
        if pause is None:
            pause = _START_POLL
        # bounded by the deadline; and by a count, should the clock not move
        for _ in range(1_000_000):
            if instance.extra.get("power_state") is None:
                # a PUT's answer carries no instance view (ARM's neither): read it
                instance = self.get_instance(instance.id)
            state = instance.state
            if state == "running":
                return instance
            if state in _STOPPED_POWER_STATES or state == "failed":
                raise self._fail(
                    f"VM {instance.extra.get('vm_name')} from disk {disk_name} did not start: "
                    f"it is {state} (provisioning {instance.extra.get('provisioning_state')})"
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            instance = self.get_instance(instance.id)
        raise self._fail(
            f"VM {instance.extra.get('vm_name')} from disk {disk_name} is not running after "
            f"{self.settings.start_timeout:g}s (start_timeout): it is {instance.state}"
        )

    def terminate(self, instance_id: str) -> None:
        """Delete the VM; the OS disk a launch attached goes with it (``deleteOption``), and
        one tagged as a restore disk is deleted too if it is still there."""
        vm = self._raw_vm(instance_id)
        name = str(_get(vm, "name"))
        self._call(
            f"cannot delete VM {name}",
            lambda: self.client.virtual_machines.begin_delete(self._rg, name).result(),
            instance_id,
        )
        disk_id = _get(vm, "properties", "storageProfile", "osDisk", "managedDisk", "id")
        if disk_id:
            disk_name = str(disk_id).rsplit("/", 1)[-1]
            try:
                disk = self.client.disks.get(self._rg, disk_name)
            except ResourceNotFoundError:
                return
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


def _page_token(arm_token: str | None, skip: int) -> str:
    doc = json.dumps({"t": arm_token, "s": skip}, separators=(",", ":"))
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(doc.encode()).decode("ascii")


# --------------------------------------------------------------------------- capture


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


class AzureBlockCapture(BlockCapture):
    """The bytes of one incremental snapshot, read as a page blob through its read SAS."""

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        size: int,
        compute: AzureCompute,
        snapshot_name: str,
        sas_url: str,
        parent_snapshot: str | None,
        parent_sas_url: str | None,
        revoke: list[str],
        delete_on_close: bool,
    ) -> None:
        super().__init__(instance, taken_at, size=size, block_size=BLOCK_SIZE)
        self.compute = compute
        self.snapshot_name = snapshot_name
        self.parent_snapshot = parent_snapshot
        self._sas_url = sas_url
        self._parent_sas_url = parent_sas_url
        self._revoke = list(revoke)
        self._delete_on_close = delete_on_close
        self._blob = compute.blob(sas_url)
        self._closed = False
        #: bytes read through the SAS and read requests made, for the request-count figures
        self.bytes_read = 0
        self.reads = 0
        self._count_lock = threading.Lock()

    def _error(self, exc: BaseException, what: str) -> RegionVaultError:
        return self.compute._error(exc, f"{what} of snapshot {self.snapshot_name}")

    def data_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every page range that holds data (Get Page Ranges, paged)."""
        try:
            found = [
                (int(r.start or 0), int(r.end or 0) + 1)
                for r in self._blob.list_page_ranges()
                if not r.cleared
            ]
        except AzureError as exc:
            raise self._error(exc, "cannot list the page ranges") from None
        return _merge(found, self.size)

    def page_range_diff(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(filled, cleared)``: the ranges written and the ranges cleared since the parent
        snapshot (Get Page Ranges with ``x-ms-previous-snapshot-url``, the managed-disk diff)."""
        if not self._parent_sas_url:
            raise self.compute._fail(
                "changed ranges need a parent snapshot (capture(..., ex_parent_snapshot=...))"
            )
        try:
            filled, cleared = self._blob.get_page_range_diff_for_managed_disk(self._parent_sas_url)
        except AzureError as exc:
            raise self._error(exc, "cannot diff the page ranges against the parent") from None
        return (
            _merge([(int(r["start"]), int(r["end"]) + 1) for r in filled], self.size),
            _merge([(int(r["start"]), int(r["end"]) + 1) for r in cleared], self.size),
        )

    def _read(self, offset: int, length: int) -> bytes:
        try:
            data = self._blob.download_blob(offset=offset, length=length).readall()
        except AzureError as exc:
            raise self._error(exc, f"cannot read {length} bytes at {offset}") from None
        if len(data) != length:
            raise self.compute._fail(
                f"snapshot {self.snapshot_name}: read {len(data)} bytes at {offset}, "
                f"expected {length}"
            )
        with self._count_lock:
            self.bytes_read += length
            self.reads += 1
        return bytes(data)

    def _pieces(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        for start, end in ranges:
            offset = start
            while offset < end:
                # pieces end on PIECE boundaries so neighbouring ranges read alike
                stop = min(end, (offset // PIECE + 1) * PIECE)
                yield offset, stop - offset
                offset = stop

    def _ordered(self, pieces: Iterator[tuple[int, int, bool]]) -> Iterator[tuple[int, bytes]]:
        """Read pieces with a bounded number in flight, yielding in order; a piece marked
        ``False`` is yielded as zeros without a read."""
        workers = max(1, self.compute.settings.concurrency)
        window = workers * 2
        pending: deque[tuple[int, int, Future[bytes] | None]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rv-az-read") as pool:
            try:
                for offset, length, read in pieces:
                    future = pool.submit(self._read, offset, length) if read else None
                    pending.append((offset, length, future))
                    if len(pending) >= window:
                        done_offset, done_length, done = pending.popleft()
                        yield done_offset, done.result() if done else bytes(done_length)
                while pending:
                    done_offset, done_length, done = pending.popleft()
                    yield done_offset, done.result() if done else bytes(done_length)
            finally:
                for _offset, _length, future in pending:
                    if future is not None:
                        future.cancel()

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """The bytes of every page range that holds data; ranges never written are left out
        (zeros)."""
        ranges = self.data_ranges()
        return self._ordered((o, n, True) for o, n in self._pieces(ranges))

    def changed_blocks(self) -> Iterator[tuple[int, bytes]]:
        """Only the blocks that differ from the parent snapshot: every block a written or a
        cleared range touches, read from this snapshot (a cleared range reads as zeros). A
        block left out is *unchanged from the parent*, not zeros: only a caller holding the
        parent's blocks can use this."""
        filled, cleared = self.page_range_diff()
        touched = _merge(filled + cleared, self.size)
        return self._ordered((o, n, True) for o, n in self._pieces(touched))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._blob.close()
        problems: list[RegionVaultError] = []
        for name in self._revoke:
            try:
                self.compute._revoke_snapshot(name)
            except RegionVaultError as exc:
                problems.append(exc)
        if self._delete_on_close and not problems:
            self.compute._delete_snapshot(self.snapshot_name)
        if problems:
            raise problems[0]


# --------------------------------------------------------------------------- restore


class AzureBlockSink(BlockSink):
    """A new managed disk created for upload, written as a page blob through its write SAS.

    :meth:`commit` writes the fixed-VHD footer after the data and revokes the SAS (the disk is
    then ready to attach). :meth:`discard` deletes a VM a failed launch began, revokes the SAS
    and deletes the disk.
    """

    def __init__(self, compute: AzureCompute, spec: LaunchSpec, size: int) -> None:
        data_size = max(MIN_UPLOAD_DATA, math.ceil(size / MiB) * MiB)
        super().__init__(size=data_size, block_size=BLOCK_SIZE)
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
        self.disk_name = _resource_name(f"{spec.name}-osdisk", 80)
        settings = compute.settings
        properties: dict[str, Any] = {
            "creationData": {"createOption": "Upload", "uploadSizeBytes": data_size + PAGE},
            "osType": self.os_type,
        }
        # the VM model does not carry it (the source's disk does): a Gen2 image needs
        # spec.extra["hyper_v_generation"] = "V2"
        generation = spec.extra.get("hyper_v_generation")
        if generation:
            properties["hyperVGeneration"] = generation
        body = {
            "location": settings.location,
            "sku": {"name": settings.disk_sku},
            "tags": {RESTORE_TAG: spec.name[:256]},
            "properties": properties,
        }
        disk = compute._call(
            f"cannot create an upload disk for restoring {spec.name!r}",
            lambda: compute.client.disks.begin_create_or_update(
                compute.settings.resource_group, self.disk_name, models.Disk(body)
            ).result(),
        )
        self.disk_id = str(_get(disk, "id"))
        self._lock = threading.Lock()
        self._in_flight: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._sas_open = False
        try:
            answer = compute._call(
                f"cannot get a write SAS for disk {self.disk_name}",
                lambda: compute.client.disks.begin_grant_access(
                    compute.settings.resource_group,
                    self.disk_name,
                    {"access": "Write", "durationInSeconds": settings.sas_seconds},
                ).result(),
            )
            sas = _get(answer, "accessSAS")
            if not sas:
                raise compute._fail(f"disk {self.disk_name}: beginGetAccess gave no SAS")
        except BaseException:
            with contextlib.suppress(RegionVaultError):
                compute._delete_disk(self.disk_name)
            raise
        self._sas_open = True
        self._blob = compute.blob(str(sas))
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.concurrency), thread_name_prefix="rv-az-write"
        )
        self._window = max(1, settings.concurrency) * 2

    def _put(self, offset: int, data: bytes) -> None:
        try:
            self._blob.upload_page(data, offset=offset, length=len(data))
        except AzureError as exc:
            raise self.compute._error(
                exc, f"cannot write {len(data)} bytes at {offset} of disk {self.disk_name}"
            ) from None
        with self._lock:
            self.bytes_written += len(data)
            self.writes += 1

    def write(self, offset: int, data: bytes) -> None:
        """Queue ``data`` for writing in pieces of up to 4 MiB; all-zero pieces are skipped
        (the disk starts zeroed). A failed earlier write is raised here or by commit."""
        self._check_live()
        if self.committed:
            raise self.compute._fail(f"disk {self.disk_name} is already committed")
        if offset < 0 or offset % self.block_size:
            raise self.compute._fail(
                f"write offset {offset} is not a multiple of {self.block_size}"
            )
        view = memoryview(data).cast("B")
        if offset + len(view) > self.size:
            raise self.compute._fail(
                f"write of {len(view)} bytes at {offset} runs past the {self.size}-byte disk"
            )
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
                        self._in_flight.append(self._pool.submit(self._put, offset + start, piece))
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
        """Wait for every write, write the VHD footer, revoke the SAS: the disk is ready."""
        self._check_live()
        if self.committed:
            return
        self._drain()
        self._put(self.size, vhd_footer(self.size))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.compute._call(
            f"cannot end the upload of disk {self.disk_name}",
            lambda: self.compute.client.disks.begin_revoke_access(
                self.compute.settings.resource_group, self.disk_name
            ).result(),
        )
        self._sas_open = False
        with contextlib.suppress(Exception):
            self._blob.close()
        self.committed = True

    def _check_live(self) -> None:
        if self.discarded:
            raise self.compute._fail(f"disk {self.disk_name} was discarded")

    def discard(self) -> None:
        """Give up on this restore: stop writing, delete the VM a failed launch began,
        revoke the SAS, delete the disk. Nothing is removed once a launch made a VM from it
        (terminating that VM does)."""
        if self.launched_instance_id is not None:
            return
        self.discarded = True
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._in_flight.clear()
        if self.vm_name is not None:
            self.compute._delete_vm(self.vm_name)
            self.vm_name = None
        if self._sas_open:
            with contextlib.suppress(RegionVaultError):
                self.compute._call(
                    f"cannot end the upload of disk {self.disk_name}",
                    lambda: self.compute.client.disks.begin_revoke_access(
                        self.compute.settings.resource_group, self.disk_name
                    ).result(),
                )
            self._sas_open = False
        self.compute._delete_disk(self.disk_name)
