"""Compute on Compute Engine through the unmodified google-cloud-compute clients: label-filtered
paged listings, labels as tags, block captures of an instance's persistent disks read through
the region's backup worker, restores into new disks written through it, and launches.

Listing: ``instances.list`` of the region's zone with a server-side label filter
(``(labels.KEY = "VALUE") AND (labels.KEY:*)``) and ``maxResults``; the pages are checked
again here and cut to ``page_size`` (the token says which GCE page to go on from and how many
of its instances were already handed out, :meth:`InstancePage.token`).

Labels are the tags (labels.py says which keys and values GCP takes); they are written by
``instances.setLabels`` with the instance's ``labelFingerprint``, read again and written once
more when another writer came between (HTTP 412).

Capture: GCP has no API that reads a snapshot's blocks, so the bytes are read the way that
exists: a snapshot of every disk of the instance (the boot disk, then the others in their
attachment order; all begun before any is waited on), a disk made from each snapshot, each
attached read-only to the region's backup worker (``worker_instance``, in ``zone``) under a
device name of its own and read there as ``<device_dir>/google-<device name>`` (the udev link
GCE's guest environment makes), holes skipped with ``SEEK_DATA``/``SEEK_HOLE`` where the
device reports them. Closing detaches and deletes the temporary disks and, unless the
capture was taken with ``keep``, the snapshots. The image holds the disks one after another,
a :class:`Disk` each.

Cleanup: every create a capture or restore sent is waited for before anything is deleted
(GCE carries out an operation whether or not anyone polls it: a delete sent while the create
runs finds nothing, or is refused as resourceNotReady, and the resource appears afterwards);
one whose answer was lost is sent again with its requestId to learn its operation. Every
snapshot and disk a capture or restore makes is labelled with its owner (the process's
:class:`~regionvault.core.procs.ProcessIdentity` token), the worker and the time
(:data:`OWNER_LABEL`, :data:`WORKER_LABEL`, :data:`CREATED_LABEL`; :data:`KEEP_LABEL` on a kept
capture's snapshots). A process killed midway cannot clean up: :meth:`GceCompute.sweep`, run
at the start of every capture and restore, detaches the ``rv-*`` devices of dead owners from
the worker and deletes their disks and unkept snapshots.

Restore: a blank disk per disk of the image (whole GiB, ``disk_type``), attached read-write
to the worker and written through its device; commit detaches them; launch inserts an
instance of the original machine type with the original labels whose disks they are (the
first boots). Whatever a failed restore or launch made is removed.

Long-running operations are started with the ``*_unary`` methods and polled with
Zone/GlobalOperationsClient built with the same endpoint and login, every
``poll_interval`` for at most ``operation_timeout`` seconds: the SDK's own
``ExtendedOperation.result()`` polls through a client built without the configured endpoint
(the public API), which must never happen against an emulator or a fake.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import compute_v1
from regionvault.core.errors import (
    ComputeError,
    InstanceNotFound,
    RegionVaultError,
    TransientError,
    configuration_failure,
)
from regionvault.core.interfaces import BlockCapture, BlockSink, Capture, Compute, RestoreSink
from regionvault.core.procs import ProcessIdentity, boot_id
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
from regionvault.providers.gcp.labels import (
    MAX_LABELS,
    LabelError,
    check_key,
    check_labels,
    check_value,
    is_label_key,
)

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = [
    "BLOCK_SIZE",
    "CAPTURE_LABEL",
    "CREATED_LABEL",
    "KEEP_LABEL",
    "NAME_PREFIX",
    "OWNER_LABEL",
    "RESTORE_LABEL",
    "WORKER_LABEL",
    "GceBlockCapture",
    "GceBlockSink",
    "GceClients",
    "GceCompute",
    "label_filter",
]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
#: the block size of captures and sinks: reads and writes of the worker's devices go in
#: pieces of this size (persistent disks are whole GiB: every disk starts on a block)
BLOCK_SIZE = 1 * MiB
_ZERO_BLOCK = bytes(BLOCK_SIZE)
#: on the snapshots and temporary disks a capture makes: the instance captured
CAPTURE_LABEL = "regionvault-capture"
#: on the disks a restore makes: the GCE name of the instance their launch makes (the spec's
#: name when GCE takes it as it is, else the name made from it, :data:`NAME_PREFIX`)
RESTORE_LABEL = "regionvault-restore"
#: on everything a capture or a restore makes: the process that made it
#: (:meth:`ProcessIdentity.token`: host, pid, start time, boot), the backup worker it works
#: through, and when (Unix seconds). :meth:`GceCompute.sweep` removes what a dead process left
OWNER_LABEL = "regionvault-owner"
WORKER_LABEL = "regionvault-worker"
CREATED_LABEL = "regionvault-created"
#: on the snapshots of a capture taken with ``keep`` (a ref names them): never swept
KEEP_LABEL = "regionvault-keep"
#: the description of an instance launched under a name GCE does not take as it is
#: (``web 1``): the name follows, and is the Instance's name
NAME_PREFIX = "regionvault name: "
#: the device names of the disks captures and restores attach to the backup worker
READ_DEVICE = "rv-read"
WRITE_DEVICE = "rv-write"
_OURS = (f"{READ_DEVICE}-", f"{WRITE_DEVICE}-")
#: Compute Engine resource names (RFC 1035)
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
#: a GCE machine type (``e2-standard-2``, ``n2d-highmem-4``, ``custom-4-16384``): what a
#: point records as its function when it was captured on GCE (EC2's ``t3.micro`` and Azure's
#: ``Standard_D2s_v5`` do not match)
_MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$")
#: GCE's instance statuses as an Instance's state (a TERMINATED instance is stopped, not gone)
_STATES = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "STOPPED": "stopped",
    "TERMINATED": "stopped",
    "SUSPENDING": "suspending",
    "SUSPENDED": "suspended",
    "REPAIRING": "repairing",
}
#: statuses from which a launched instance will not become RUNNING by itself
_NOT_STARTING = frozenset({"STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED"})
#: HTTP statuses of a throttled call or a failure on Google's side
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: reasons of an HTTP error that passes later: a rate quota exceeded (GCE answers 403
#: rateLimitExceeded, "wait a minute then try again"), a resource still being made or
#: changed (400 resourceNotReady)
TRANSIENT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "resourceNotReady"})
#: reasons GCE gives for a rate quota exceeded
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: seconds to wait after a rate-limit error without Retry-After (GCE: "wait a minute")
RATE_LIMIT_PAUSE = 60.0
#: error codes of a failed operation that may pass if it is started again later
TRANSIENT_OPERATION_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "RESOURCE_NOT_READY",
        "RESOURCE_OPERATION_RATE_EXCEEDED",
        "RATE_LIMIT_EXCEEDED",
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "SERVICE_UNAVAILABLE",
    }
)
#: GCE answers at most 500 items a page
_MAX_RESULTS = 500
_MAX_PAGES = 1_000_000
_LABEL_RETRIES = 5
_RETRY_PAUSE = 0.2
_RETRY_PAUSE_MAX = 10.0
_REF_VERSION = 1

T = TypeVar("T")
log = logging.getLogger(__name__)
#: what the SDK raises: its API errors, the HTTP library's, and google-auth's (the token
#: endpoint did not answer: TransportError; the login was refused: RefreshError)
_SDK_ERRORS = (
    api_exceptions.GoogleAPICallError,
    api_exceptions.RetryError,
    requests.exceptions.RequestException,
    auth_exceptions.GoogleAuthError,
)


# --------------------------------------------------------------------------- clients


@dataclass
class GceClients:
    """The unmodified REST clients one region's compute uses, all built with the same
    endpoint and login (the operation clients above all: see the module's documentation)."""

    instances: compute_v1.InstancesClient
    disks: compute_v1.DisksClient
    snapshots: compute_v1.SnapshotsClient
    zone_operations: compute_v1.ZoneOperationsClient
    global_operations: compute_v1.GlobalOperationsClient

    @classmethod
    def build(cls, settings: GcpSettings, credentials: Any) -> GceClients:
        options: dict[str, Any] = {}
        if settings.compute_endpoint:
            options["api_endpoint"] = settings.compute_endpoint
        kwargs: dict[str, Any] = {
            "credentials": credentials,
            "transport": "rest",
            "client_options": options or None,
        }
        return cls(
            instances=compute_v1.InstancesClient(**kwargs),
            disks=compute_v1.DisksClient(**kwargs),
            snapshots=compute_v1.SnapshotsClient(**kwargs),
            zone_operations=compute_v1.ZoneOperationsClient(**kwargs),
            global_operations=compute_v1.GlobalOperationsClient(**kwargs),
        )

    def close(self) -> None:
        for client in (
            self.instances,
            self.disks,
            self.snapshots,
            self.zone_operations,
            self.global_operations,
        ):
            with contextlib.suppress(Exception):
                client.transport.close()  # type: ignore[no-untyped-call]


@dataclass
class _Create:
    """One create (a snapshot, a disk) a capture or a restore begins: its request, with the
    requestId every try of it carries, and what is known of its operation."""

    what: str
    method: Callable[..., compute_v1.Operation]
    request: dict[str, Any]
    #: sent at least once (it may have reached GCE even when no answer came back)
    sent: bool = False
    operation: compute_v1.Operation | None = None
    #: its operation was seen DONE (with or without an error)
    settled: bool = False
    #: GCE refused the request outright (a permanent HTTP error): nothing was made
    refused: bool = False

    @classmethod
    def of(
        cls, what: str, method: Callable[..., compute_v1.Operation], fields: Mapping[str, Any]
    ) -> _Create:
        return cls(what, method, {**fields, "request_id": str(uuid.uuid4())})


# --------------------------------------------------------------------------- helpers


def label_filter(wanted: Mapping[str, str | None]) -> str:
    """The ``filter`` of ``instances.list`` for tag filters (checked labels): one
    parenthesised expression each, ``labels.KEY = "VALUE"`` or ``labels.KEY:*``, joined by
    AND, as the Compute Engine API documents it."""
    terms = [
        f"(labels.{key}:*)" if value is None else f'(labels.{key} = "{value}")'
        for key, value in sorted(wanted.items())
    ]
    return " AND ".join(terms)


_REQUEST_LINE = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ")


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _reason(exc: BaseException) -> str | None:
    """GCE's reason of an HTTP error (rateLimitExceeded, alreadyExists, ...): the SDK's
    ``reason``, else that of the answer's first error."""
    reason = getattr(exc, "reason", None)
    if not reason and isinstance(exc, api_exceptions.GoogleAPICallError) and exc.errors:
        first = exc.errors[0]
        if isinstance(first, Mapping):
            reason = first.get("reason")
    return str(reason) if reason else None


def is_transient(exc: BaseException) -> bool:
    """Whether a google-cloud-compute error may pass if the call is made again later:
    throttling (429, or 403 rateLimitExceeded), a resource not ready yet (400
    resourceNotReady), a failure on Google's side (5xx), no answer in time, no connection
    (but not a TLS failure or a host name that does not resolve), or no answer from the
    token endpoint."""
    if isinstance(exc, api_exceptions.RetryError | auth_exceptions.TransportError):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return not configuration_failure(exc)
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return _status(exc) in TRANSIENT_STATUSES or _reason(exc) in TRANSIENT_REASONS
    return False


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        seconds = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError, AttributeError):
        return None
    return seconds if seconds >= 0 else None


def describe(exc: BaseException) -> str:
    """One line about a google-cloud-compute error: its HTTP status, reason and message."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        reason = _reason(exc)  # GCE's own (alreadyExists, conditionNotMet, ...)
        message = (str(exc.message or "").strip().splitlines() or [""])[0]
        # the SDK starts with the request ("POST http://.../setLabels?requestId=...: "):
        # the operation is named by the caller's message already
        message = _REQUEST_LINE.sub("", message)
        text = f"HTTP {exc.code}" + (f" {reason}" if reason else "") + f": {message}"
    elif isinstance(exc, auth_exceptions.TransportError):
        text = f"no answer from the token endpoint (login): {exc}"
    elif isinstance(exc, auth_exceptions.RefreshError):
        text = f"login failed: the credentials could not be refreshed: {exc}"
    elif isinstance(exc, requests.exceptions.Timeout):
        text = "no answer in time from the Compute Engine API"
    elif isinstance(exc, requests.exceptions.ConnectionError):
        text = "no connection to the Compute Engine API"
        if configuration_failure(exc):
            text += " (TLS failure or a host name without an address: check compute_endpoint)"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:400]


def _last(url: str) -> str:
    """The last segment of a resource URL (a name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _utc(text: str | None) -> datetime:
    if text:
        with contextlib.suppress(ValueError):
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _unique_name(base: str) -> str:
    """A Compute Engine name from ``base`` (lower-case letters, digits, '-', a letter
    first) with a unique suffix, at most 63 characters."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"rv-{cleaned}".rstrip("-")
    suffix = uuid.uuid4().hex[:8]
    return f"{cleaned[: 63 - len(suffix) - 1].rstrip('-')}-{suffix}"


#: the smallest pd-standard, pd-balanced or pd-ssd disk GCE makes, in GiB (its "GB")
MIN_DISK_GB = 10


def _size_gb(size: int) -> int:
    """Whole GiB holding ``size`` bytes, at least :data:`MIN_DISK_GB`."""
    return max(MIN_DISK_GB, math.ceil(size / GiB))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    for _ in range(1 + len(view)):  # bounded: every pass writes at least one byte
        if not view:
            return
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"wrote nothing at {offset}")
        view, offset = view[written:], offset + written


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` of the device's data within ``[0, size)``, by ``SEEK_DATA`` and
    ``SEEK_HOLE``; the whole device when it cannot tell (a block device reports all of it
    as data, which is right: it has no holes to report)."""
    position = 0
    for _ in range(_MAX_PAGES):
        if position >= size:
            return
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # no data after position
            if position == 0 and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield 0, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            yield start, size
            return
        yield start, end
        position = end
    yield position, size  # bounded: more extents than that are read as data


# --------------------------------------------------------------------------- compute


class GceCompute(Compute):
    """One region's Compute Engine instances: those of its zone (``settings.zone``)."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: GcpSettings,
        credentials: Any,
        capabilities: Capabilities,
        clients: GceClients | None = None,
    ) -> None:
        super().__init__(provider="gcp", region=region.name, capabilities=capabilities)
        settings.need(region, "compute", "zone")
        self.region_config = region
        self.settings = settings
        self.clients = clients or GceClients.build(settings, credentials)
        #: the pause between tries of a read that failed transiently (tests make it 0)
        self.retry_pause = _RETRY_PAUSE
        #: the pause a rate-limit error without Retry-After asks for (tests make it 0)
        self.rate_limit_pause = RATE_LIMIT_PAUSE
        #: this process: the owner of what its captures and restores make (OWNER_LABEL)
        self.owner = _owner_identity()

    def close(self) -> None:
        self.clients.close()

    # ------------------------------------------------------------------ helpers

    @property
    def project(self) -> str:
        return self.settings.project

    @property
    def zone(self) -> str:
        assert self.settings.zone is not None
        return self.settings.zone

    def need_worker(self) -> str:
        """The backup worker's name; ConfigError naming the key when it is not set."""
        self.settings.need(self.region_config, "compute's captures and restores", "worker_instance")
        assert self.settings.worker_instance is not None
        return self.settings.worker_instance

    @property
    def worker(self) -> str:
        return self.need_worker()

    def _fail(self, message: str) -> ComputeError:
        return ComputeError(message, provider="gcp", region=self.region)

    def _error(
        self, exc: BaseException, what: str, instance_id: str | None = None
    ) -> RegionVaultError:
        if instance_id is not None and _status(exc) == 404:
            return InstanceNotFound(instance_id, provider="gcp", region=self.region)
        message = f"{what}: {describe(exc)}"
        if is_transient(exc):
            retry_after = _retry_after(exc)
            if retry_after is None and _reason(exc) in RATE_LIMIT_REASONS:
                retry_after = self.rate_limit_pause
            return TransientError(
                message, provider="gcp", region=self.region, retry_after=retry_after
            )
        return self._fail(message)

    def _call(
        self,
        what: str,
        call: Callable[[], T],
        *,
        instance_id: str | None = None,
        idempotent: bool = False,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """``call()``, its SDK errors mapped; a call that may be made twice (``idempotent``: a
        read, or a change carrying its requestId, :meth:`_start`) that failed transiently is
        made again, ``sdk_retries`` times at most. ``passthrough`` errors are raised as they
        are, for the caller to handle."""
        attempts = 1 + (self.settings.sdk_retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return call()
            except passthrough:
                raise
            except _SDK_ERRORS as exc:
                error = self._error(exc, what, instance_id)
                if not isinstance(error, TransientError) or attempt + 1 >= attempts:
                    raise error from None
                pause = min(_RETRY_PAUSE_MAX, self.retry_pause * 2**attempt)
                if error.retry_after is not None:
                    pause = min(_RETRY_PAUSE_MAX, max(pause, error.retry_after))
                time.sleep(pause)
        raise AssertionError("unreachable")

    @property
    def _options(self) -> dict[str, Any]:
        """Every call: the region's timeout, and no SDK retry (``_call`` retries reads)."""
        return {"retry": None, "timeout": float(self.settings.timeout)}

    def _url(self, kind: str, name: str) -> str:
        if kind == "snapshots":
            return f"projects/{self.project}/global/snapshots/{name}"
        return f"projects/{self.project}/zones/{self.zone}/{kind}/{name}"

    def _wait(
        self,
        operation: compute_v1.Operation,
        what: str,
        *,
        instance_id: str | None = None,
        missing_ok: bool = False,
    ) -> compute_v1.Operation | None:
        """``operation`` once DONE, polled every ``poll_interval`` through the operations
        client of its scope (zonal, else global) for at most ``operation_timeout`` seconds;
        an operation that ended in an error raises it mapped (None instead when its target
        was not found and ``missing_ok``). Not done in time: TransientError naming it."""
        operation = self._until_done(operation, what)
        return self._outcome(operation, what, instance_id=instance_id, missing_ok=missing_ok)

    def _until_done(self, operation: compute_v1.Operation, what: str) -> compute_v1.Operation:
        """``operation`` once DONE (see :meth:`_wait`); TransientError when not in time."""
        settings = self.settings
        deadline = time.monotonic() + settings.operation_timeout
        polls = math.ceil(settings.operation_timeout / settings.poll_interval) + 2
        zonal = bool(operation.zone)
        done = compute_v1.Operation.Status.DONE
        for _ in range(polls):  # bounded by the deadline, and by a count should time stall
            if operation.status == done:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(settings.poll_interval, max(0.0, deadline - time.monotonic())))
            name = operation.name
            if zonal:
                operation = self._call(
                    what,
                    lambda name=name: self.clients.zone_operations.get(  # type: ignore[misc]
                        project=self.project, zone=self.zone, operation=name, **self._options
                    ),
                    idempotent=True,
                )
            else:
                operation = self._call(
                    what,
                    lambda name=name: self.clients.global_operations.get(  # type: ignore[misc]
                        project=self.project, operation=name, **self._options
                    ),
                    idempotent=True,
                )
        if operation.status != done:
            raise TransientError(
                f"{what}: operation {operation.name} is not done after "
                f"{settings.operation_timeout}s (operation_timeout)",
                provider="gcp",
                region=self.region,
            )
        return operation

    def _outcome(
        self,
        operation: compute_v1.Operation,
        what: str,
        *,
        instance_id: str | None = None,
        missing_ok: bool = False,
    ) -> compute_v1.Operation | None:
        """A DONE ``operation``, or the error it ended in, mapped (see :meth:`_wait`)."""
        errors = list(operation.error.errors) if operation.error else []
        if not errors:
            return operation
        status = int(operation.http_error_status_code or 0)
        code = str(errors[0].code or "")
        message = " ".join(str(errors[0].message or "").split())[:300]
        if status == 404 or code == "RESOURCE_NOT_FOUND":
            if missing_ok:
                return None
            if instance_id is not None:
                raise InstanceNotFound(instance_id, provider="gcp", region=self.region)
        text = f"{what}: operation {operation.name} failed: {code or 'error'}"
        text += f" (HTTP {status})" if status else ""
        text += f": {message}" if message else ""
        if status in TRANSIENT_STATUSES or code in TRANSIENT_OPERATION_CODES:
            raise TransientError(text, provider="gcp", region=self.region)
        raise self._fail(text)

    def _start(
        self,
        what: str,
        method: Callable[..., compute_v1.Operation],
        fields: Mapping[str, Any],
        *,
        instance_id: str | None = None,
    ) -> compute_v1.Operation:
        """Begin a change (a ``*_unary`` method with its request's ``fields``). The request
        carries a requestId of its own, so a try that failed transiently is made again
        safely: GCE answers a repeated requestId with the first try's operation instead of
        doing the change twice."""
        request = {**fields, "request_id": str(uuid.uuid4())}
        return self._send(what, method, request, instance_id=instance_id)

    def _send(
        self,
        what: str,
        method: Callable[..., compute_v1.Operation],
        request: Mapping[str, Any],
        *,
        instance_id: str | None = None,
    ) -> compute_v1.Operation:
        return self._call(
            what,
            lambda: method(request=request, **self._options),
            instance_id=instance_id,
            idempotent=True,
        )

    def _start_unless_gone(
        self, what: str, method: Callable[..., compute_v1.Operation], fields: Mapping[str, Any]
    ) -> compute_v1.Operation | None:
        """:meth:`_start`, None when the target is gone already (HTTP 404)."""
        try:
            return self._start(what, method, fields)
        except ComputeError as exc:
            if isinstance(exc.__cause__ or exc.__context__, api_exceptions.NotFound):
                return None
            raise

    def _run(
        self,
        what: str,
        method: Callable[..., compute_v1.Operation],
        fields: Mapping[str, Any],
        *,
        instance_id: str | None = None,
    ) -> None:
        """Begin a change and wait for its operation's end."""
        operation = self._start(what, method, fields, instance_id=instance_id)
        self._wait(operation, what, instance_id=instance_id)

    def _begin_all(self, creates: Sequence[_Create]) -> None:
        """Send every create, then wait for every one that was sent, whatever fails: no
        cleanup may run while a create is in flight (it would find nothing to delete, and
        GCE would make the resource afterwards). A send that failed stops the sends after
        it. The first error is raised once all are waited for."""
        problems: list[RegionVaultError] = []
        for create in creates:
            create.sent = True  # a send that failed may have reached GCE all the same
            try:
                create.operation = self._send(create.what, create.method, create.request)
            except RegionVaultError as exc:
                # a transient failure may have reached GCE (an answer lost): only a
                # permanent refusal says nothing was made
                create.refused = not isinstance(exc, TransientError)
                problems.append(exc)
                break
        for create in creates:
            if create.operation is None:
                continue
            try:
                create.operation = self._until_done(create.operation, create.what)
                create.settled = True
                self._outcome(create.operation, create.what)
            except RegionVaultError as exc:
                problems.append(exc)
        if problems:
            raise problems[0]

    def _settle(self, create: _Create | None) -> None:
        """Before what ``create`` made is deleted: wait for the end of a create that was
        sent and never seen DONE. One whose answer was lost is sent again with the same
        requestId, which GCE answers with the first request's operation (or carries out
        now, when the first never arrived: what it makes is then deleted all the same).
        Failures are only logged: the delete that follows says what is left."""
        if create is None or not create.sent or create.settled or create.refused:
            return
        try:
            if create.operation is None:
                create.operation = self._send(create.what, create.method, create.request)
            create.operation = self._until_done(create.operation, create.what)
            create.settled = True
        except Exception as exc:  # cleanup goes on; the delete reports
            log.warning("%s: its end was not seen before cleanup: %s", create.what, exc)

    def _gone_ok(
        self, what: str, method: Callable[..., compute_v1.Operation], fields: Mapping[str, Any]
    ) -> None:
        """Run a delete or detach; a target already gone is no error."""
        operation = self._start_unless_gone(what, method, fields)
        if operation is not None:
            self._wait(operation, what, missing_ok=True)

    # ------------------------------------------------------------------ instances

    def _name(self, instance_id: str) -> str:
        """The GCE name an instance id is (ids are names: unique in the zone)."""
        if isinstance(instance_id, str) and _NAME.fullmatch(instance_id):
            return instance_id
        raise InstanceNotFound(str(instance_id), provider="gcp", region=self.region)

    def _raw(self, instance_id: str) -> compute_v1.Instance:
        name = self._name(instance_id)
        return self._call(
            f"cannot read instance {name}",
            lambda: self.clients.instances.get(
                project=self.project, zone=self.zone, instance=name, **self._options
            ),
            instance_id=instance_id,
            idempotent=True,
        )

    @staticmethod
    def _attached(raw: compute_v1.Instance) -> list[compute_v1.AttachedDisk]:
        """The instance's disks: the boot disk first, then the others by attachment index."""
        disks = list(raw.disks)
        return sorted(disks, key=lambda d: (not d.boot, int(d.index or 0)))

    def _instance(self, raw: compute_v1.Instance) -> Instance:
        status = str(raw.status or "")
        machine_type = _last(raw.machine_type) if raw.machine_type else None
        description = str(raw.description or "")
        name = str(raw.name)
        shown = description[len(NAME_PREFIX) :] if description.startswith(NAME_PREFIX) else name
        disks = [
            {
                "disk": _last(d.source) if d.source else None,
                "device_name": d.device_name or None,
                "boot": bool(d.boot),
                "index": int(d.index or 0),
                "size_gb": int(d.disk_size_gb or 0) or None,
            }
            for d in self._attached(raw)
        ]
        extra: dict[str, Any] = {
            "gce_name": name,
            "gce_id": str(raw.id) if raw.id else None,
            "machine_type": machine_type,
            "zone": self.zone,
            "project": self.project,
            "status": status,
            "disks": disks,
            "label_fingerprint": raw.label_fingerprint or None,
        }
        return Instance(
            id=name,
            name=shown,
            region=self.region,
            tags=Tags({str(k): str(v) for k, v in raw.labels.items()}),
            state=_STATES.get(status, status.lower() or "unknown"),
            function=machine_type,
            capture_kinds=frozenset({CaptureKind.BLOCKS}) if disks else frozenset(),
            extra=extra,
        )

    # ------------------------------------------------------------------ listing and labels

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        """At most ``page_size`` instances, filtered by their labels on GCE's side; never the
        region's backup worker (``worker_instance``)."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise self._fail(f"page_size must be a positive integer, got {page_size!r}")
        wanted = dict(tag_filters or {})
        for key, value in wanted.items():
            check_key(key, region=self.region)
            if value is not None:
                check_value(key, value, region=self.region)
        try:
            cloud_token, skip = InstancePage.parse_token(page_token)
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        expression = label_filter(wanted)
        found: list[Instance] = []
        for _ in range(_MAX_PAGES):
            items, following = self._page(expression, cloud_token, page_size)
            # GCE filtered already; checked again, so a listing never shows what it should not.
            # The region's backup worker is regionvault's own machinery, not a workload: it is
            # never listed, so the tagger never gives it a policy and nothing backs it up
            matches = [
                i
                for i in map(self._instance, items)
                if i.tags.matches(wanted) and i.id != self.settings.worker_instance
            ][skip:]
            need = page_size - len(found)
            if len(matches) > need:
                found.extend(matches[:need])
                return InstancePage(tuple(found), InstancePage.token(cloud_token, skip + need))
            found.extend(matches)
            skip = 0
            if not following:
                return InstancePage(tuple(found), None)
            cloud_token = following
            if len(found) == page_size:
                return InstancePage(tuple(found), InstancePage.token(cloud_token, 0))
        raise self._fail(
            f"listing the instances of {self.zone} did not end after {_MAX_PAGES} pages"
        )

    def _page(
        self, expression: str, token: str | None, page_size: int
    ) -> tuple[list[compute_v1.Instance], str | None]:
        request = compute_v1.ListInstancesRequest(
            project=self.project, zone=self.zone, max_results=min(page_size, _MAX_RESULTS)
        )
        if expression:
            request.filter = expression
        if token:
            request.page_token = token

        def fetch() -> tuple[list[compute_v1.Instance], str | None]:
            pager = self.clients.instances.list(request=request, **self._options)
            page = next(iter(pager.pages))  # the first answer only: no request for the next
            return list(page.items), page.next_page_token or None

        return self._call(f"cannot list the instances of zone {self.zone}", fetch, idempotent=True)

    def get_instance(self, instance_id: str) -> Instance:
        return self._instance(self._raw(instance_id))

    def _relabel(
        self, instance_id: str, change: Callable[[dict[str, str]], dict[str, str]]
    ) -> Tags:
        """Read the labels and their fingerprint, change them, write them back with that
        fingerprint; once more when another writer came between (HTTP 412), a bounded
        number of times."""
        for _attempt in range(_LABEL_RETRIES):
            raw = self._raw(instance_id)
            current = {str(k): str(v) for k, v in raw.labels.items()}
            wanted = change(dict(current))
            if wanted == current:
                return Tags(current)
            if len(wanted) > MAX_LABELS:
                raise LabelError(
                    f"instance {raw.name} would have {len(wanted)} labels (GCP allows "
                    f"{MAX_LABELS})",
                    provider="gcp",
                    region=self.region,
                )
            body = compute_v1.InstancesSetLabelsRequest(
                labels=wanted, label_fingerprint=raw.label_fingerprint
            )
            what = f"cannot label instance {raw.name}"
            request = {
                "project": self.project,
                "zone": self.zone,
                "instance": raw.name,
                "instances_set_labels_request_resource": body,
                "request_id": str(uuid.uuid4()),
            }
            try:
                # the requestId makes a retry after a transient failure safe
                operation = self._call(
                    what,
                    lambda request=request: self.clients.instances.set_labels_unary(  # type: ignore[misc]
                        request=request, **self._options
                    ),
                    instance_id=instance_id,
                    idempotent=True,
                    passthrough=(api_exceptions.PreconditionFailed,),
                )
            except api_exceptions.PreconditionFailed:
                continue  # the fingerprint is stale: read again
            try:
                self._wait(operation, what, instance_id=instance_id)
            except ComputeError as exc:
                if "HTTP 412" in exc.message or "conditionNotMet" in exc.message:
                    continue
                raise
            return self.get_instance(instance_id).tags
        raise TransientError(
            f"instance {instance_id}: its labels kept changing under {_LABEL_RETRIES} writes",
            provider="gcp",
            region=self.region,
        )

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        labels = check_labels(tags, region=self.region)
        return self._relabel(instance_id, lambda current: {**current, **labels})

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        if not all(isinstance(k, str) and k for k in keys):
            raise self._fail(f"bad tag keys {keys!r}")
        # a key that is no label cannot be there: absent, not an error
        drop = {k for k in keys if is_label_key(k)}
        return self._relabel(
            instance_id, lambda current: {k: v for k, v in current.items() if k not in drop}
        )

    # ------------------------------------------------------------------ disks on the worker

    def _disk_create(self, disk: compute_v1.Disk, what: str) -> _Create:
        """The insert of ``disk`` (begun by :meth:`_begin_all`)."""
        return _Create.of(
            f"{what}: cannot create disk {disk.name}",
            self.clients.disks.insert_unary,
            {"project": self.project, "zone": self.zone, "disk_resource": disk},
        )

    def _disk_type(self) -> str:
        return self._url("diskTypes", self.settings.disk_type)

    def attach_to_worker(self, disk: str, device_name: str, *, read_only: bool) -> str:
        """Attach ``disk`` to the backup worker as ``device_name``; the path of its device
        once the worker shows it (``<device_dir>/google-<device name>``)."""
        body = compute_v1.AttachedDisk(
            source=self._url("disks", disk),
            device_name=device_name,
            mode="READ_ONLY" if read_only else "READ_WRITE",
            auto_delete=False,
            boot=False,
        )
        what = f"cannot attach disk {disk} to the backup worker {self.worker}"
        self._run(
            what,
            self.clients.instances.attach_disk_unary,
            {
                "project": self.project,
                "zone": self.zone,
                "instance": self.worker,
                "attached_disk_resource": body,
            },
        )
        return self._device(device_name, disk)

    def _device(self, device_name: str, disk: str) -> str:
        """The worker's device of an attached disk, waited for (udev makes the link a
        moment after the attach ends) for at most ``timeout`` seconds."""
        path = str(Path(self.settings.device_dir) / f"google-{device_name}")
        deadline = time.monotonic() + self.settings.timeout
        pause = 0.01
        for _ in range(100_000):  # bounded by the deadline, and by a count
            if Path(path).exists():
                return path
            if time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        raise self._fail(
            f"disk {disk} is attached to {self.worker} but {path} did not appear within "
            f"{self.settings.timeout}s (is this process running on the worker, with "
            "device_dir its /dev/disk/by-id?)"
        )

    def worker_device_names(self) -> set[str]:
        """The device names of the disks attached to the backup worker now."""
        return {str(d.device_name) for d in self._raw(self.worker).disks}

    def detach_from_worker(self, device_name: str) -> None:
        """Detach the disk attached to the worker as ``device_name`` (gone already: fine)."""
        self._gone_ok(
            f"cannot detach device {device_name} from the backup worker {self.worker}",
            self.clients.instances.detach_disk_unary,
            {
                "project": self.project,
                "zone": self.zone,
                "instance": self.worker,
                "device_name": device_name,
            },
        )

    def delete_disk(self, disk: str) -> None:
        self._gone_ok(
            f"cannot delete disk {disk}",
            self.clients.disks.delete_unary,
            {"project": self.project, "zone": self.zone, "disk": disk},
        )

    def delete_snapshot(self, snapshot: str) -> None:
        self._gone_ok(
            f"cannot delete snapshot {snapshot}",
            self.clients.snapshots.delete_unary,
            {"project": self.project, "snapshot": snapshot},
        )

    # ------------------------------------------------------------------ sweep

    def _temporary_labels(self, label: str, value: str, *, keep: bool = False) -> dict[str, str]:
        """The labels of a snapshot or disk a capture or restore makes: ``label`` (what it
        is for), its owner (this process), the worker and the time; KEEP_LABEL with
        ``keep``."""
        labels = {
            label: value,
            OWNER_LABEL: self.owner.token(),
            WORKER_LABEL: self.worker,
            CREATED_LABEL: str(int(time.time())),
        }
        if keep:
            labels[KEEP_LABEL] = "true"
        return labels

    def _ours_and_orphaned(self, labels: Mapping[str, str]) -> bool:
        """Whether a resource is a temporary one of a capture or restore through this
        region's worker whose owner is dead: a process of this worker's host that no
        longer runs (a pid of this boot not alive, or its start time another), or one of
        an earlier boot. An owner nobody here can judge (another host, another pid
        namespace) is taken to be alive."""
        if CAPTURE_LABEL not in labels and RESTORE_LABEL not in labels:
            return False
        if labels.get(WORKER_LABEL) != self.worker:
            return False
        owner = ProcessIdentity.from_token(labels.get(OWNER_LABEL, ""))
        if owner is None or owner.host != self.owner.host:
            return False
        here = boot_id()
        if owner.boot is not None and here is not None and owner.boot != here:
            return True  # this worker rebooted since: no process of that boot runs
        return owner.alive() is False

    def _list_labelled(self, kind: str) -> list[Any]:
        """The disks (of the zone) or snapshots labelled with this region's worker."""
        expression = label_filter({WORKER_LABEL: self.worker})
        if kind == "disks":
            request: Any = compute_v1.ListDisksRequest(
                project=self.project, zone=self.zone, filter=expression, max_results=_MAX_RESULTS
            )
            client: Any = self.clients.disks
        else:
            request = compute_v1.ListSnapshotsRequest(
                project=self.project, filter=expression, max_results=_MAX_RESULTS
            )
            client = self.clients.snapshots
        found: list[Any] = []
        for _ in range(_MAX_PAGES):
            page = self._call(
                f"cannot list the {kind} of backup worker {self.worker}",
                lambda request=request: next(  # type: ignore[misc]
                    iter(client.list(request=request, **self._options).pages)
                ),
                idempotent=True,
            )
            found.extend(page.items)
            if not page.next_page_token:
                return found
            request.page_token = page.next_page_token
        return found

    def sweep(self) -> list[str]:
        """Remove what a capture or restore whose process died (kill -9, a crash, a reboot)
        left: detach its ``rv-*`` devices from the backup worker, delete its disks and its
        snapshots (not those of a capture taken with ``keep``: a ref names them). Only
        resources labelled as ours (CAPTURE_LABEL or RESTORE_LABEL, this worker's
        WORKER_LABEL) whose OWNER_LABEL names a dead process are touched, and a disk in use
        by any instance other than the worker never is (a launch's disks are its own).
        Each removal is logged; a failure is logged and the sweep goes on (the next one
        tries again). What was removed, as ``kind name`` lines."""
        removed: list[str] = []
        try:
            disks = [d for d in self._list_labelled("disks") if self._ours_and_orphaned(d.labels)]
            snapshots = [
                s
                for s in self._list_labelled("snapshots")
                if self._ours_and_orphaned(s.labels) and s.labels.get(KEEP_LABEL) != "true"
            ]
            worker_disks = list(self._raw(self.worker).disks) if disks else []
        except RegionVaultError as exc:
            log.warning("sweep of backup worker %s: %s", self.worker, exc.message)
            return removed
        worker_url = f"/instances/{self.worker}"
        orphaned = {str(d.name) for d in disks}
        for attached in worker_disks:
            device = str(attached.device_name)
            if not device.startswith(_OURS) or not attached.source:
                continue
            if _last(attached.source) not in orphaned:
                continue
            try:
                self.detach_from_worker(device)
            except RegionVaultError as exc:
                log.warning("sweep: %s", exc.message)
                continue
            log.info(
                "sweep: detached %s (disk %s of a dead process) from %s",
                device,
                _last(attached.source),
                self.worker,
            )
            removed.append(f"device {device}")
        for disk in disks:
            users = [str(u) for u in disk.users]
            if any(not u.endswith(worker_url) for u in users):
                continue  # another instance's disk now (a launch's): never ours to remove
            try:
                self.delete_disk(str(disk.name))
            except RegionVaultError as exc:
                log.warning("sweep: %s", exc.message)
                continue
            log.info("sweep: deleted disk %s (labels %s)", disk.name, dict(disk.labels))
            removed.append(f"disk {disk.name}")
        for snapshot in snapshots:
            try:
                self.delete_snapshot(str(snapshot.name))
            except RegionVaultError as exc:
                log.warning("sweep: %s", exc.message)
                continue
            log.info("sweep: deleted snapshot %s (labels %s)", snapshot.name, dict(snapshot.labels))
            removed.append(f"snapshot {snapshot.name}")
        return removed

    # ------------------------------------------------------------------ capture

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        """A block capture of every disk of the instance (boot disk first, then by
        attachment index), read on the backup worker from disks made from snapshots.

        ``keep``: closing keeps the snapshots and :attr:`GceBlockCapture.ref` names them
        (the next snapshot of the same disk is then incremental on GCE's side, which makes
        it quicker and cheaper). ``since`` is checked and otherwise ignored: GCP has no API
        that tells which blocks changed between two snapshots, so
        :meth:`GceBlockCapture.changed_ranges` is always None and every backup reads the
        whole image."""
        if kind not in (None, CaptureKind.BLOCKS):
            raise self.unsupported(f"capture(kind={kind})")
        if since is not None:
            _parse_ref(since, self)
        worker = self.worker
        self.sweep()
        raw = self._raw(instance_id)
        instance = self._instance(raw)
        name = str(raw.name)
        attached = self._attached(raw)
        if name == worker:
            # the worker's own disks, not those other captures and restores attach to it
            attached = [d for d in attached if not str(d.device_name).startswith(_OURS)]
        if not attached:
            raise self._fail(f"instance {name} has no disk to capture")
        parts: list[_Part] = []
        for disk in attached:
            if not disk.source:
                raise self._fail(
                    f"instance {name}: the disk at index {disk.index} is not a persistent disk "
                    "(a local SSD cannot be snapshotted)"
                )
            source = _last(disk.source)
            parts.append(
                _Part(
                    label=disk.device_name or source,
                    source_disk=source,
                    snapshot=_unique_name(f"rv-{name}-{len(parts)}"),
                )
            )
        what = f"capture of instance {name}"
        try:
            # every snapshot begun before any is waited on: the disks are taken as close in
            # time as GCE allows (each is crash-consistent; together they are not atomic)
            for part in parts:
                snapshot = compute_v1.Snapshot(
                    name=part.snapshot,
                    labels=self._temporary_labels(CAPTURE_LABEL, name, keep=keep),
                )
                if self.settings.location:
                    # kept in the region's own location, not GCE's default multi-region
                    # (region A's data stays in region A)
                    snapshot.storage_locations = [self.settings.location]
                part.snapshot_create = _Create.of(
                    f"{what}: cannot snapshot disk {part.source_disk}",
                    self.clients.disks.create_snapshot_unary,
                    {
                        "project": self.project,
                        "zone": self.zone,
                        "disk": part.source_disk,
                        "snapshot_resource": snapshot,
                    },
                )
                # set before the request: one whose answer was lost exists all the same
                part.snapshotted = True
            self._begin_all([p.snapshot_create for p in parts if p.snapshot_create])
            taken: list[datetime] = []
            offset = 0
            for part in parts:
                made = self._call(
                    f"{what}: cannot read snapshot {part.snapshot}",
                    lambda part=part: self.clients.snapshots.get(  # type: ignore[misc]
                        project=self.project, snapshot=part.snapshot, **self._options
                    ),
                    idempotent=True,
                )
                part.size = int(made.disk_size_gb or 0) * GiB
                if part.size <= 0:
                    raise self._fail(f"{what}: snapshot {part.snapshot} reports no size")
                part.offset = offset
                offset += part.size  # whole GiB: every disk starts on a block
                taken.append(_utc(made.creation_timestamp or None))
            for index, part in enumerate(parts):
                part.disk = _unique_name(f"rv-read-{name}-{index}")
                part.disk_create = self._disk_create(
                    compute_v1.Disk(
                        name=part.disk,
                        source_snapshot=self._url("snapshots", part.snapshot),
                        type_=self._disk_type(),
                        labels=self._temporary_labels(CAPTURE_LABEL, name),
                    ),
                    what,
                )
            self._begin_all([p.disk_create for p in parts if p.disk_create])
            for part in parts:
                assert part.disk is not None
                part.device_name = _unique_name(READ_DEVICE)
                part.attached = True  # one whose attach failed may be attached all the same
                part.path = self.attach_to_worker(part.disk, part.device_name, read_only=True)
            return GceBlockCapture(instance, min(taken), compute=self, parts=parts, keep=keep)
        except BaseException:
            with contextlib.suppress(RegionVaultError):
                _release_parts(self, parts, keep=False, what=what)
            raise

    def release_capture(self, ref: str) -> None:
        """Delete the snapshots a kept capture names (its ``ref``); one already gone is no
        error. Only a snapshot a capture of the ref's instance made of the ref's disk (its
        :data:`CAPTURE_LABEL` names the instance, its source is the disk) is deleted: any
        other is left alone and named in the error. Every snapshot is tried."""
        kept = _parse_ref(ref, self)
        problems: list[RegionVaultError] = []
        foreign: list[str] = []
        for entry in kept["snapshots"]:
            snapshot = str(entry["name"])
            try:
                made = self._made_by_capture(snapshot, str(kept["instance"]), str(entry["disk"]))
                if made is None:
                    continue
                if not made:
                    foreign.append(snapshot)
                    continue
                self.delete_snapshot(snapshot)
            except RegionVaultError as exc:
                problems.append(exc)
        if foreign:
            raise self._fail(
                f"snapshot {', '.join(foreign)} was not made by a capture of instance "
                f"{kept['instance']} (no {CAPTURE_LABEL} label naming it, or another source "
                "disk): left alone"
            )
        if problems:
            raise problems[0]

    def _made_by_capture(self, snapshot: str, instance: str, disk: str) -> bool | None:
        """Whether ``snapshot`` is one a capture of ``instance`` took of ``disk``; None when
        it is gone."""
        try:
            found = self.clients.snapshots.get(
                project=self.project, snapshot=snapshot, **self._options
            )
        except api_exceptions.NotFound:
            return None
        except _SDK_ERRORS as exc:
            raise self._error(exc, f"cannot read snapshot {snapshot}") from None
        source = _last(found.source_disk) if found.source_disk else ""
        return found.labels.get(CAPTURE_LABEL) == instance and source == disk

    # ------------------------------------------------------------------ restore and launch

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        """Blank disks, one per disk of the image, attached to the backup worker for the
        engine to write. The launch's labels are checked first: a tag GCP cannot hold
        refuses the restore before any disk is made."""
        if kind is not CaptureKind.BLOCKS:
            raise self.unsupported(f"open_restore_sink(kind={kind})")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise self._fail(f"a block restore needs the image size in bytes, got {size!r}")
        self._labels_for(spec)
        self._machine_type_for(spec)
        self.need_worker()  # ConfigError naming the key, before anything is made
        self.sweep()
        return GceBlockSink(self, spec, size, disks)

    def _labels_for(self, spec: LaunchSpec) -> dict[str, str]:
        source = spec.source
        base = dict(spec.tags) if spec.tags else (dict(source.tags) if source else {})
        return check_labels(base, region=self.region)

    def _machine_type_for(self, spec: LaunchSpec) -> str:
        """The machine type to launch: the spec's or its source's, the point's when it
        records a GCE one (its function), else the region's ``machine_type``."""
        source_extra: Mapping[str, Any] = spec.source.extra if spec.source is not None else {}
        function = (
            spec.function if spec.function and _MACHINE_TYPE.fullmatch(spec.function) else None
        )
        chosen = (
            spec.extra.get("machine_type")
            or source_extra.get("machine_type")
            or function
            or self.settings.machine_type
        )
        if not isinstance(chosen, str) or not _NAME.fullmatch(chosen):
            raise self._fail(f"launch {spec.name!r}: {chosen!r} is not a GCE machine type")
        return chosen

    def _launch_name(self, name: str) -> tuple[str, str | None]:
        """The GCE name of a launch named ``name``, and its description: ``name`` itself
        when GCE takes it, else a name made from it and the description keeping it."""
        if _NAME.fullmatch(name):
            return name, None
        return _unique_name(name), f"{NAME_PREFIX}{name}"

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        """An instance whose disks are the sink's (the first boots), of the original machine
        type, with the original labels. A failure deletes the instance it began (the disks
        go with it or stay for the sink's discard)."""
        if not isinstance(sink, GceBlockSink) or sink.compute is not self:
            raise self._fail("launch needs a sink made by this region's open_restore_sink")
        if sink.discarded:
            raise self._fail(f"the restore into {sink.disk_names[0]} was discarded: restore again")
        if not sink.committed:
            raise self._fail(f"the restore into {sink.disk_names[0]} is not committed yet")
        if sink.launched_instance_id is not None:
            raise self._fail(f"disk {sink.disk_names[0]} already boots {sink.launched_instance_id}")
        labels = self._labels_for(spec)
        machine_type = self._machine_type_for(spec)
        if spec.name == sink.spec.name:
            # the name the disks' RESTORE_LABEL gives
            name, description = sink.launch_name, sink.launch_description
        else:
            name, description = self._launch_name(spec.name)
        interface = compute_v1.NetworkInterface(network=self.settings.network)
        if self.settings.subnetwork:
            interface.subnetwork = self.settings.subnetwork
        body = compute_v1.Instance(
            name=name,
            machine_type=self._url("machineTypes", machine_type),
            labels=labels,
            disks=[
                compute_v1.AttachedDisk(
                    source=self._url("disks", target.disk),
                    boot=index == 0,
                    auto_delete=True,
                    mode="READ_WRITE",
                    **({"device_name": target.label} if _NAME.fullmatch(target.label) else {}),
                )
                for index, target in enumerate(sink.targets)
            ],
            network_interfaces=[interface],
        )
        if description is not None:
            body.description = description
        what = f"cannot launch instance {name} from disk {sink.disk_names[0]}"
        sink.instance_name = name  # a failed launch's discard deletes what was begun
        try:
            self._run(
                what,
                self.clients.instances.insert_unary,
                {"project": self.project, "zone": self.zone, "instance_resource": body},
            )
            instance = self._until_running(name)
        except BaseException:
            with contextlib.suppress(RegionVaultError):
                self.delete_launched(sink)
            raise
        sink.launched_instance_id = instance.id
        return instance

    def delete_launched(self, sink: GceBlockSink) -> None:
        """Delete the instance a failed launch from ``sink`` began, if it exists and boots
        from the sink's disks: an instance of that name that is not the launch's (the name
        was taken: GCE refused the insert) is left alone."""
        name = sink.instance_name
        if name is None:
            return
        try:
            raw = self._raw(name)
        except InstanceNotFound:
            sink.instance_name = None
            return
        ours = set(sink.disk_names)
        if any(d.source and _last(d.source) in ours for d in raw.disks):
            self._delete_instance(name)
        sink.instance_name = None

    def _until_running(self, name: str) -> Instance:
        """The launched instance once RUNNING, read every ``poll_interval`` for at most
        ``operation_timeout``; one that stops instead, or is not running by then, fails."""
        deadline = time.monotonic() + self.settings.operation_timeout
        polls = math.ceil(self.settings.operation_timeout / self.settings.poll_interval) + 2
        instance = self.get_instance(name)
        for _ in range(polls):
            status = instance.extra["status"]
            if status == "RUNNING":
                return instance
            if status in _NOT_STARTING:
                raise self._fail(f"instance {name} did not start: it is {status}")
            if time.monotonic() >= deadline:
                break
            time.sleep(self.settings.poll_interval)
            instance = self.get_instance(name)
        raise self._fail(
            f"instance {name} is not running after {self.settings.operation_timeout}s "
            f"(operation_timeout): it is {instance.extra['status']}"
        )

    def _delete_instance(self, name: str) -> None:
        self._gone_ok(
            f"cannot delete instance {name}",
            self.clients.instances.delete_unary,
            {"project": self.project, "zone": self.zone, "instance": name},
        )

    def terminate(self, instance_id: str) -> None:
        """Delete the instance; its auto-delete disks (a launch's) go with it."""
        name = self._name(instance_id)
        self._run(
            f"cannot delete instance {name}",
            self.clients.instances.delete_unary,
            {"project": self.project, "zone": self.zone, "instance": name},
            instance_id=instance_id,
        )


# --------------------------------------------------------------------------- capture


@dataclass
class _Part:
    """One disk of a capture: its snapshot, the disk made from it and attached to the
    worker, and where it lies in the image."""

    label: str
    source_disk: str
    snapshot: str
    size: int = 0
    offset: int = 0
    snapshotted: bool = False
    disk: str | None = None
    device_name: str | None = None
    attached: bool = False
    path: str | None = None
    snapshot_create: _Create | None = None
    disk_create: _Create | None = None

    @property
    def layout(self) -> Disk:
        return Disk(self.label, self.offset, self.size)


def _owner_identity() -> ProcessIdentity:
    """This process, in a form whose token is a GCP label value (at most 63 characters)."""
    owner = ProcessIdentity.current()
    if len(owner.token()) > 63:
        owner = ProcessIdentity(owner.host, owner.pid, owner.ticks, owner.boot)
    return owner


def _problem(exc: BaseException) -> str:
    """One line about a cleanup step that failed (any error: every other step still runs)."""
    if isinstance(exc, RegionVaultError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _release_parts(compute: GceCompute, parts: Sequence[_Part], *, keep: bool, what: str) -> None:
    """Detach and delete a capture's temporary disks, and delete its snapshots unless
    ``keep``: a create still in flight is waited for first (what it makes is deleted),
    everything is tried whatever fails; one ComputeError names what is left behind."""
    problems: list[str] = []
    for part in parts:
        if part.disk_create is not None and not part.disk_create.sent:
            part.disk = None  # never asked for
        if part.snapshot_create is not None and not part.snapshot_create.sent:
            part.snapshotted = False
        if part.disk:
            compute._settle(part.disk_create)
        if part.snapshotted and not keep:
            compute._settle(part.snapshot_create)
    if any(part.attached for part in parts):
        # an attach that failed may or may not have happened: ask the worker
        try:
            present = compute.worker_device_names()
        except Exception as exc:  # every step is tried
            problems.append(_problem(exc))
        else:
            for part in parts:
                part.attached = part.attached and part.device_name in present
    for part in parts:
        if part.attached and part.device_name:
            try:
                compute.detach_from_worker(part.device_name)
                part.attached = False
            except Exception as exc:  # every step is tried
                problems.append(_problem(exc))
    for part in parts:
        if part.disk and not part.attached:
            try:
                compute.delete_disk(part.disk)
                part.disk = None
            except Exception as exc:  # every step is tried
                problems.append(_problem(exc))
        elif part.disk:
            problems.append(f"disk {part.disk} is still attached to {compute.worker}")
    if not keep:
        for part in parts:
            if part.snapshotted:
                try:
                    compute.delete_snapshot(part.snapshot)
                    part.snapshotted = False
                except Exception as exc:  # every step is tried
                    problems.append(_problem(exc))
    if problems:
        raise compute._fail(f"{what}: left behind: {'; '.join(problems)}")


def _make_ref(compute: GceCompute, instance: str, parts: Sequence[_Part]) -> str:
    """What a kept capture names: its project, zone, instance and per disk the snapshot."""
    doc = {
        "v": _REF_VERSION,
        "project": compute.project,
        "zone": compute.zone,
        "instance": instance,
        "snapshots": [{"name": p.snapshot, "disk": p.source_disk, "size": p.size} for p in parts],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _parse_ref(ref: str, compute: GceCompute) -> dict[str, Any]:
    """A ref of :func:`_make_ref` for this region's project and zone; ComputeError names
    what is wrong."""
    try:
        doc = json.loads(ref)
        if not isinstance(doc, dict) or doc.get("v") != _REF_VERSION:
            raise ValueError("not a version-1 GCE capture ref")
        if doc.get("project") != compute.project or doc.get("zone") != compute.zone:
            raise ValueError(
                f"it names project {doc.get('project')} zone {doc.get('zone')}, not "
                f"{compute.project} {compute.zone}"
            )
        if not isinstance(doc.get("instance"), str) or not _NAME.fullmatch(doc["instance"]):
            raise ValueError("no instance")
        snapshots = doc.get("snapshots")
        if not isinstance(snapshots, list) or not snapshots:
            raise ValueError("no snapshots")
        for entry in snapshots:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and _NAME.fullmatch(entry["name"])
                and isinstance(entry.get("disk"), str)
            ):
                raise ValueError(f"bad snapshot entry {str(entry)[:80]}")
    except (ValueError, TypeError) as exc:
        raise compute._fail(f"bad capture ref {str(ref)[:60]!r}: {exc}") from None
    return doc


class GceBlockCapture(BlockCapture):
    """The bytes of an instance's disks, read on the backup worker from disks made from
    their snapshots; the image holds the disks one after another (:attr:`disks`: the boot
    disk first, then the others by attachment index)."""

    def __init__(
        self,
        instance: Instance,
        taken_at: datetime,
        *,
        compute: GceCompute,
        parts: Sequence[_Part],
        keep: bool,
    ) -> None:
        layout = [p.layout for p in parts]
        super().__init__(
            instance, taken_at, size=layout[-1].end, block_size=BLOCK_SIZE, disks=layout
        )
        self.compute = compute
        self.parts = tuple(parts)
        self._keep = keep
        self._closed = False
        if keep:
            self.ref = _make_ref(compute, str(instance.extra["gce_name"]), parts)
        #: bytes read from the devices, and blocks left out as holes or zeros
        self.bytes_read = 0

    @property
    def snapshot_names(self) -> list[str]:
        return [p.snapshot for p in self.parts]

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        for part in self.parts:
            yield from self._read(part, [(0, part.size)])

    def _read(self, part: _Part, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Blocks holding data within the disk's ``[start, end)`` ranges (its own offsets),
        at their image offsets; all-zero blocks are left out (they restore as zeros)."""
        if self._closed:
            raise self.compute._fail("the capture is closed")
        assert part.path is not None
        try:
            fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self.compute._fail(
                f"cannot open {part.path} (disk {part.disk} from snapshot {part.snapshot}): "
                f"{exc.strerror}"
            ) from None
        try:
            end_of_device = os.lseek(fd, 0, os.SEEK_END)
            if end_of_device < part.size:
                raise self.compute._fail(
                    f"{part.path} holds {end_of_device} bytes, snapshot {part.snapshot} {part.size}"
                )
            extents = list(_data_extents(fd, part.size))
            done = 0
            for lo, hi in ranges:
                for start, end in extents:
                    start, end = max(start, lo), min(end, hi)
                    if start >= end:
                        continue
                    position = max(start - start % BLOCK_SIZE, done, lo)
                    for _ in range(1 + (end - position) // BLOCK_SIZE):
                        if position >= end:
                            break
                        length = min(BLOCK_SIZE - position % BLOCK_SIZE, hi - position)
                        data = os.pread(fd, length, position)
                        if len(data) != length:
                            raise self.compute._fail(
                                f"{part.path}: short read of {len(data)} bytes at {position}"
                            )
                        self.bytes_read += length
                        if data != _ZERO_BLOCK[:length]:
                            yield part.offset + position, data
                        position += length
                    done = max(done, position)
        except OSError as exc:
            raise self.compute._fail(
                f"cannot read {part.path} (snapshot {part.snapshot}): {exc.strerror}"
            ) from None
        finally:
            os.close(fd)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        # GCP has no API that lists the blocks changed between two snapshots (EBS direct
        # APIs and Azure's page-range diff have no GCE counterpart): every backup reads all
        return None

    def close(self) -> None:
        """Detach and delete the temporary disks; delete the snapshots unless kept."""
        if self._closed:
            return
        self._closed = True
        _release_parts(
            self.compute,
            self.parts,
            keep=self._keep,
            what=f"capture of instance {self.instance.extra.get('gce_name')}",
        )


# --------------------------------------------------------------------------- restore


@dataclass
class _Target:
    """One disk a restore makes: the image bytes ``[offset, offset + size)`` go to it from 0."""

    label: str
    offset: int
    size: int
    disk: str
    device_name: str
    made: bool = False
    attached: bool = False
    path: str | None = None
    fd: int | None = None
    create: _Create | None = None


class GceBlockSink(BlockSink):
    """Blank persistent disks, one per :class:`Disk` of the image, attached read-write to
    the backup worker and written through its devices; a write is routed by its offset.

    :meth:`commit` flushes and detaches them (ready to launch: the first boots);
    :meth:`discard` deletes an instance a failed launch began, detaches and deletes them."""

    def __init__(
        self,
        compute: GceCompute,
        spec: LaunchSpec,
        size: int,
        disks: Sequence[Disk] | None = None,
    ) -> None:
        try:
            layout = disk_layout(disks, size, BLOCK_SIZE)
        except ValueError as exc:
            raise compute._fail(f"restore of {spec.name!r}: {exc}") from None
        if len(layout) == 1 and layout[0].offset == 0:
            # one disk: the image rounded up to the whole GiB the disk holds
            whole = _size_gb(max(size, layout[0].size)) * GiB
            layout = (Disk(layout[0].name, 0, whole),)
            size = whole
        super().__init__(size=size, block_size=BLOCK_SIZE, disks=layout)
        self.compute = compute
        self.spec = spec
        self.committed = False
        self.discarded = False
        self.launched_instance_id: str | None = None
        #: the GCE name of the instance a launch began (a failed launch's discard removes it)
        self.instance_name: str | None = None
        self.bytes_written = 0
        base = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower())[:40]
        self.targets = [
            _Target(
                label=d.name,
                offset=d.offset,
                size=d.size,
                disk=_unique_name(f"rv-{base}-{i}"),
                device_name=_unique_name(WRITE_DEVICE),
            )
            for i, d in enumerate(self.disks)
        ]
        #: the GCE name and description of the instance the launch makes (named by the
        #: disks' RESTORE_LABEL)
        self.launch_name, self.launch_description = compute._launch_name(spec.name)
        what = f"restore of {spec.name!r}"
        try:
            for target in self.targets:
                target.made = True  # an insert that failed may have made it all the same
                target.create = compute._disk_create(
                    compute_v1.Disk(
                        name=target.disk,
                        size_gb=_size_gb(target.size),
                        type_=compute._disk_type(),
                        labels=compute._temporary_labels(RESTORE_LABEL, self.launch_name),
                    ),
                    what,
                )
            compute._begin_all([t.create for t in self.targets if t.create])
            for target in self.targets:
                target.attached = True
                target.path = compute.attach_to_worker(
                    target.disk, target.device_name, read_only=False
                )
                try:
                    target.fd = os.open(target.path, os.O_WRONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise compute._fail(
                        f"{what}: cannot open {target.path} for writing: {exc.strerror}"
                    ) from None
        except BaseException:
            with contextlib.suppress(RegionVaultError):
                self._remove()
            raise

    @property
    def disk_names(self) -> list[str]:
        """The disks' GCE names, in image order (the boot disk first)."""
        return [t.disk for t in self.targets]

    def _check_live(self) -> None:
        if self.discarded:
            raise self.compute._fail(f"the restore into {self.disk_names[0]} was discarded")

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to the disks it lies in; all-zero blocks are skipped (the disks
        start blank), and so are zeros in the holes between disks (anything else there is
        refused, before anything is written)."""
        self._check_live()
        if self.committed:
            raise self.compute._fail(f"the restore into {self.disk_names[0]} is committed")
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
        try:
            routed = split_by_disk(self.disks, offset, view)
        except ValueError as exc:
            raise self.compute._fail(f"restore of {self.spec.name!r}: {exc}") from None
        for index, at, piece in routed:
            target = self.targets[index]
            assert target.fd is not None
            for start in range(0, len(piece), BLOCK_SIZE):
                chunk = piece[start : start + BLOCK_SIZE]
                if chunk == _ZERO_BLOCK[: len(chunk)]:
                    continue
                try:
                    _pwrite_all(target.fd, chunk, at + start)
                except OSError as exc:
                    raise self.compute._fail(
                        f"cannot write {len(chunk)} bytes at {at + start} of "
                        f"{target.path} (disk {target.disk}): {exc.strerror}"
                    ) from None
                self.bytes_written += len(chunk)

    def commit(self) -> None:
        """Flush every disk to its device and detach it from the worker: ready to launch."""
        self._check_live()
        if self.committed:
            return
        for target in self.targets:
            if target.fd is not None:
                try:
                    os.fsync(target.fd)
                except OSError as exc:
                    raise self.compute._fail(
                        f"cannot flush {target.path} (disk {target.disk}): {exc.strerror}"
                    ) from None
                os.close(target.fd)
                target.fd = None
        for target in self.targets:
            self.compute.detach_from_worker(target.device_name)
            target.attached = False
        self.committed = True

    def _remove(self) -> None:
        """Close, detach and delete every disk (one never made is no error; an insert still
        in flight is waited for first): every disk is tried whatever fails, one ComputeError
        names what is left behind."""
        problems: list[str] = []
        for target in self.targets:
            if target.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(target.fd)
                target.fd = None
            if target.create is not None and not target.create.sent:
                target.made = False  # never asked for
            if target.made:
                self.compute._settle(target.create)
        if any(target.attached for target in self.targets):
            # an attach that failed may or may not have happened: ask the worker
            try:
                present = self.compute.worker_device_names()
            except Exception as exc:  # every step is tried
                problems.append(_problem(exc))
            else:
                for target in self.targets:
                    target.attached = target.attached and target.device_name in present
        for target in self.targets:
            if target.attached:
                try:
                    self.compute.detach_from_worker(target.device_name)
                    target.attached = False
                except Exception as exc:  # every step is tried
                    problems.append(_problem(exc))
        for target in self.targets:
            if target.made and not target.attached:
                try:
                    self.compute.delete_disk(target.disk)
                    target.made = False
                except Exception as exc:  # every step is tried
                    problems.append(_problem(exc))
        if problems:
            raise self.compute._fail(
                f"restore of {self.spec.name!r}: left behind: {'; '.join(problems)}"
            )

    def discard(self) -> None:
        """Give up on this restore: delete the instance a failed launch began, detach and
        delete every disk. Nothing is removed once a launch made an instance from them
        (terminating it does)."""
        if self.launched_instance_id is not None:
            return
        self.discarded = True
        problems: list[str] = []
        try:
            self.compute.delete_launched(self)
        except Exception as exc:  # the disks are removed all the same
            problems.append(_problem(exc))
        try:
            self._remove()
        except RegionVaultError as exc:
            problems.append(exc.message)
        if problems:
            raise self.compute._fail("; ".join(problems))
