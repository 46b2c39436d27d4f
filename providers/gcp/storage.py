"""Vault on Cloud Storage: one bucket per region (under an optional name prefix).

Puts up to ``single_put_limit`` are one upload (a multipart upload up to the SDK's 8 MiB,
above it a resumable upload sent in one piece); larger ones are resumable uploads sent in
``upload_chunk_size`` chunks. Either is atomic by Cloud Storage's semantics: an object
appears whole when its upload is finalized, or not at all. ``if_absent`` is the
``ifGenerationMatch=0`` precondition, which Cloud Storage checks when the object is made.
Gets are ranged (``Range: bytes=a-b``); listings are paged (``maxResults``).

A killed put leaves no object behind: an unfinished resumable upload is a session, not an
object; no listing shows it, nothing can read it, and Cloud Storage drops it after a week.
There is no API that lists such sessions, so the vault reports no stale temporaries.

WORM (``object_retention = true``: a bucket with object retention enabled):
:meth:`GcsVault.set_retention` sets the object's retention configuration (governance is
``mode: Unlocked``, compliance ``mode: Locked``, with ``retainUntilTime``), and
:meth:`GcsVault.set_legal_hold` its temporary hold; an event-based hold set by anyone else
counts as a legal hold too. The vault asks ``core/retention.py`` before it deletes, replaces
or weakens anything, removes a bypassed Unlocked retention itself
(``overrideUnlockedRetention``) before a delete, and maps Cloud Storage's own refusal (403,
reason ``retentionPolicyNotMet``) onto ``RetentionLocked``. gcp-storage-emulator stores
neither retention nor holds: the offline tests assert the requests, enforcement is tested
live (docs/gcp.md).
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import requests
from google.api_core import exceptions as api_exceptions
from google.cloud.storage import Blob, Bucket
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
    VaultError,
)
from regionvault.core.interfaces import Vault
from regionvault.core.names import name_problem, prefix_problem
from regionvault.core.retention import Protection
from regionvault.core.types import Capabilities, ObjectInfo, RetentionMode
from regionvault.providers.gcp.clients import (
    SDK_ERRORS,
    error_reason,
    error_status,
    error_text,
    sdk_retry,
    storage_client,
    storage_error,
)

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.storage import Client
    from regionvault.core.types import RegionConfig
    from regionvault.providers.gcp.metrics import GcpMetrics
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = ["LOCKED_PHRASE", "LOCKED_REASONS", "RESERVED_PREFIX", "GcsBucket", "GcsVault"]

#: object names under this prefix belong to the provider (the vault id), never to vault names
RESERVED_PREFIX = ".regionvault/"
#: reasons Cloud Storage gives a 403 on an object under retention or a hold; it also answers
#: the plain reason "forbidden" with a message holding :data:`LOCKED_PHRASE` ("Object 'x' is
#: subject to bucket's retention policy and cannot be deleted, overwritten or archived
#: until ...", "... is under active Temporary hold and cannot be deleted, ...")
LOCKED_REASONS = frozenset({"retentionPolicyNotMet", "objectUnderActiveHold"})
LOCKED_PHRASE = "cannot be deleted, overwritten or archived"
_MAX_PAGES = 10_000_000  # a bound for pagination loops, far above any real listing
_CONTENT_TYPE = "application/octet-stream"
#: every chunk of a resumable upload but the last is a multiple of this (Cloud Storage's rule)
_CHUNK_UNIT = 256 * 1024


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _size(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class GcsBucket:
    """The Cloud Storage primitives the vault and the transit share, for one bucket through
    one client. ``error`` is the error class raised for failures (``VaultError`` or
    ``TransitError``)."""

    def __init__(
        self,
        *,
        client: Client,
        bucket: str,
        settings: GcpSettings,
        region: str,
        error: type[RegionVaultError],
    ) -> None:
        self.client = client
        self.name = bucket
        self.bucket: Bucket = client.bucket(bucket)
        self.settings = settings
        self.region = region
        self.error_class = error
        self.retry: Retry | None = sdk_retry(settings)
        self.timeout = float(settings.timeout)
        self.label = f"bucket {bucket!r}"
        self._lock = threading.Lock()
        self._ensured = False

    # ------------------------------------------------------------------ errors

    def error(
        self, exc: BaseException, what: str, *, whole_bucket: bool = False
    ) -> RegionVaultError:
        """``whole_bucket``: a 404 can only mean that the bucket is missing (an upload,
        a listing)."""
        if whole_bucket and isinstance(exc, api_exceptions.NotFound):
            message = f"{self.label} does not exist (create it, or set create = true)"
            return self.error_class(message, provider="gcp", region=self.region)
        error = storage_error(exc, f"{what} in {self.label}", self.error_class, region=self.region)
        #: the HTTP status behind it, for a caller that tells a refusal from a failure
        error.http_status = error_status(exc)  # type: ignore[attr-defined]
        return error

    def locked(self, exc: BaseException, name: str, what: str) -> RetentionLocked | None:
        """Cloud Storage's refusal of ``what`` on a protected object as RetentionLocked."""
        if error_status(exc) != 403:
            return None
        reason = error_reason(exc)
        if reason not in LOCKED_REASONS and LOCKED_PHRASE not in error_text(exc):
            return None
        return RetentionLocked(
            name,
            f"Cloud Storage refused to {what} it: it is under retention or a hold "
            f"({reason or 'HTTP 403'})",
            provider="gcp",
            region=self.region,
        )

    # ------------------------------------------------------------------ set-up

    def ensure(self, *, create: bool, object_retention: bool = False) -> None:
        """With ``create``, make the bucket once (in ``location``, with object retention
        enabled when asked)."""
        if not create:
            return
        with self._lock:
            if self._ensured:
                return
            try:
                self.client.create_bucket(
                    self.name,
                    location=self.settings.location,
                    enable_object_retention=object_retention,
                    timeout=self.timeout,
                    retry=self.retry,
                )
            except api_exceptions.Conflict:
                pass  # made before, or by another process just now
            except SDK_ERRORS as exc:
                raise self.error(exc, "cannot create the bucket") from None
            self._ensured = True

    # ------------------------------------------------------------------ objects

    def blob(self, key: str, *, chunk_size: int | None = None) -> Blob:
        return self.bucket.blob(key, chunk_size=chunk_size)

    def chunk_size(self, size: int) -> int:
        """The chunk size of a resumable upload of ``size`` bytes: ``upload_chunk_size``,
        except that a short tail (under half a chunk) rides with the chunks before it when
        growing them a little (to a multiple of 256 KiB, Cloud Storage's rule; at most by
        half) saves that request: a pack just over 16 MiB is two chunks of 8 MiB and more,
        not two full chunks and a sliver."""
        step = self.settings.upload_chunk_size
        chunks = -(-size // step)
        if chunks < 2 or size - (chunks - 1) * step >= step // 2:
            return step
        even = -(-size // (chunks - 1))
        grown = -(-even // _CHUNK_UNIT) * _CHUNK_UNIT
        if grown <= step + step // 2 and -(-size // grown) == chunks - 1:
            return grown
        return step

    def put(self, key: str, name: str, data: bytes | memoryview, *, if_absent: bool) -> Blob:
        """Store ``data`` at ``key`` atomically; :class:`ObjectExists` when ``if_absent``
        finds it taken. Returns the blob as Cloud Storage reported it."""
        size = _size(data)
        chunked = size > self.settings.single_put_limit
        blob = self.blob(key, chunk_size=self.chunk_size(size) if chunked else None)
        precondition = {"if_generation_match": 0} if if_absent else {}
        stream = io.BytesIO(data)
        try:
            blob.upload_from_file(
                stream,
                # no size: the SDK then always uploads resumably, chunk by chunk
                size=None if chunked else size,
                content_type=_CONTENT_TYPE,
                timeout=self.timeout,
                retry=self.retry,
                **precondition,
            )
        except SDK_ERRORS as exc:
            if if_absent and isinstance(exc, api_exceptions.PreconditionFailed):
                raise ObjectExists(name, provider="gcp", region=self.region) from None
            refusal = self.locked(exc, name, "overwrite")
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot put {key!r}", whole_bucket=True) from None
        return blob

    def get(self, key: str, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        blob = self.blob(key)
        end = None if length is None else offset + length - 1
        try:
            return bytes(
                blob.download_as_bytes(
                    start=offset or None,
                    end=end,
                    timeout=self.timeout,
                    retry=self.retry,
                )
            )
        except api_exceptions.NotFound:
            raise ObjectNotFound(name, provider="gcp", region=self.region) from None
        except api_exceptions.RequestRangeNotSatisfiable:
            self.head(key, name)  # the range starts at or past the end
            return b""
        except SDK_ERRORS as exc:
            raise self.error(exc, f"cannot get {key!r}") from None

    def head(self, key: str, name: str) -> Blob:
        try:
            blob = self.bucket.get_blob(key, timeout=self.timeout, retry=self.retry)
        except SDK_ERRORS as exc:
            raise self.error(exc, f"cannot read the metadata of {key!r}") from None
        if blob is None:
            raise ObjectNotFound(name, provider="gcp", region=self.region)
        return blob

    def list(
        self, prefix: str, *, page_size: int | None = None, max_results: int | None = None
    ) -> Iterator[Blob]:
        """Objects whose names start with ``prefix``, in name order, page by page."""
        try:
            pages = self.client.list_blobs(
                self.bucket,
                prefix=prefix or None,
                page_size=page_size or self.settings.list_page_size,
                max_results=max_results,
                timeout=self.timeout,
                retry=self.retry,
            ).pages
            for _page, items in zip(range(_MAX_PAGES), pages, strict=False):
                yield from items
        except SDK_ERRORS as exc:
            raise self.error(exc, f"cannot list {prefix!r}", whole_bucket=True) from None

    def first(self, key: str) -> bool:
        """True when ``key`` exists, asked with a one-name listing (storage.objects.list),
        not a read."""
        for blob in self.list(key, page_size=1, max_results=1):
            return bool(blob.name == key)
        return False

    def delete(self, key: str, name: str) -> None:
        """Delete the object; absent is fine."""
        try:
            self.bucket.delete_blob(key, timeout=self.timeout, retry=self.retry)
        except api_exceptions.NotFound:
            return
        except SDK_ERRORS as exc:
            refusal = self.locked(exc, name, "delete")
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot delete {key!r}") from None

    def patch(self, blob: Blob, name: str, what: str, *, override_unlocked: bool) -> None:
        """Send the blob's changed properties (a PATCH of the object)."""
        try:
            blob.patch(
                override_unlocked_retention=override_unlocked,
                timeout=self.timeout,
                retry=self.retry,
            )
        except api_exceptions.NotFound:
            raise ObjectNotFound(name, provider="gcp", region=self.region) from None
        except SDK_ERRORS as exc:
            refusal = self.locked(exc, name, what)
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot {what} {blob.name!r}") from None


def _info(name: str, blob: Blob) -> ObjectInfo:
    """ObjectInfo from a blob's metadata (of a head, an upload or a listing)."""
    props: dict[str, Any] = blob._properties
    retention = props.get("retention") or {}
    until_text = retention.get("retainUntilTime")
    mode_text = str(retention.get("mode") or "")
    until = blob.retention.retain_until_time if until_text else None
    mode: RetentionMode | None = None
    if until is not None and mode_text:
        mode = RetentionMode.COMPLIANCE if mode_text == "Locked" else RetentionMode.GOVERNANCE
    modified = blob.updated
    return ObjectInfo(
        name=name,
        size=int(blob.size or 0),
        modified=_utc(modified) if modified is not None else _now(),
        retain_until=_utc(until) if until is not None else None,
        retention_mode=mode,
        legal_hold=bool(blob.temporary_hold) or bool(blob.event_based_hold),
        etag=str(blob.generation) if blob.generation is not None else None,
    )


def refusal(info: ObjectInfo, *, bypass_governance: bool) -> str | None:
    """Why the object behind ``info`` may not be removed or replaced now, or None."""
    return Protection.of(info).refuses_removal(_now(), bypass_governance=bypass_governance)


class GcsVault(Vault):
    """One region's Cloud Storage bucket (under an optional name prefix).

    ``adapter`` (tests): a requests adapter mounted on the client's session."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: GcpSettings,
        credentials: Any,
        capabilities: Capabilities,
        metrics: GcpMetrics | None = None,
        adapter: requests.adapters.HTTPAdapter | None = None,
    ) -> None:
        super().__init__(provider="gcp", region=region.name, capabilities=capabilities)
        settings.need(region, "vault", "bucket")
        assert settings.bucket is not None
        self.bucket_name = settings.bucket
        self.prefix = settings.prefix
        self.settings = settings
        self._client = storage_client(settings, credentials, metrics=metrics, adapter=adapter)
        self._bucket = GcsBucket(
            client=self._client,
            bucket=settings.bucket,
            settings=settings,
            region=region.name,
            error=VaultError,
        )
        self._vault_id: str | None = None
        self._id_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def _ready(self) -> GcsBucket:
        self._bucket.ensure(
            create=self.settings.create, object_retention=self.settings.object_retention
        )
        return self._bucket

    def _error(self, message: str) -> VaultError:
        return VaultError(message, provider="gcp", region=self.region)

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise self._error(f"bad object name {name!r}: {problem}")
        key = self.prefix + name
        if len(key.encode("utf-8")) > 1024:
            raise self._error(
                f"object name {name[:60]!r}... is longer than Cloud Storage's 1024-byte limit"
            )
        if key.startswith(RESERVED_PREFIX):
            raise self._error(
                f"object name {name!r} lies in a name space the gcp provider reserves "
                f"({RESERVED_PREFIX})"
            )
        return key

    def _check(self, name: str, offset: int, length: int | None) -> None:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise self._error(f"get {name!r}: bad offset {offset!r}")
        if length is not None and (
            not isinstance(length, int) or isinstance(length, bool) or length < 0
        ):
            raise self._error(f"get {name!r}: bad length {length!r}")

    # ------------------------------------------------------------------ Vault

    @property
    def vault_id(self) -> str:
        """A random id made once per bucket and prefix and kept in the bucket (if-absent),
        so every process and every later run sees the same one."""
        if self._vault_id is None:
            with self._id_lock:
                if self._vault_id is None:
                    self._vault_id = self._load_vault_id()
        return self._vault_id

    def _load_vault_id(self) -> str:
        bucket = self._ready()
        key = f"{RESERVED_PREFIX}{self.prefix}vault-id"
        for _attempt in range(3):
            try:
                return bucket.get(key, key).decode("ascii").strip()
            except ObjectNotFound:
                pass
            made = f"gcp-{uuid.uuid4().hex}"
            try:
                bucket.put(key, key, made.encode("ascii"), if_absent=True)
                return made
            except ObjectExists:
                continue  # another process made it between our get and put: read theirs
        raise self._error("cannot establish the vault id")

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        key = self._key(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self._error(f"put {name!r}: data must be bytes, got {type(data).__name__}")
        bucket = self._ready()
        if self.settings.object_retention and not if_absent:
            # the framework promises that a locked object is not replaced either
            with contextlib.suppress(ObjectNotFound):
                why = refusal(_info(name, bucket.head(key, name)), bypass_governance=False)
                if why is not None:
                    raise RetentionLocked(
                        name, f"{why}; it cannot be overwritten", provider="gcp", region=self.region
                    )
        blob = bucket.put(key, name, data, if_absent=if_absent)
        info = _info(name, blob)
        return ObjectInfo(name=name, size=_size(data), modified=info.modified, etag=info.etag)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        self._check(name, offset, length)
        if length == 0:
            self.head(name)
            return b""
        return self._ready().get(key, name, offset=offset, length=length)

    def head(self, name: str) -> ObjectInfo:
        return _info(name, self._ready().head(self._key(name), name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise self._error(f"bad list prefix {prefix!r}: {problem}")
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        cut = len(self.prefix)
        for blob in self._ready().list(self.prefix + prefix):
            key = str(blob.name)
            if key.startswith(RESERVED_PREFIX):
                continue
            yield _info(key[cut:], blob)

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        """Remove the object. With ``object_retention``: refuse while its retention or a
        hold protects it (``core/retention.py``); a bypassed Unlocked retention is removed
        first (``overrideUnlockedRetention``), as Cloud Storage deletes nothing under one."""
        key = self._key(name)
        bucket = self._ready()
        if not self.settings.object_retention:
            bucket.delete(key, name)
            return
        try:
            blob = bucket.head(key, name)
        except ObjectNotFound:
            return
        info = _info(name, blob)
        why = refusal(info, bypass_governance=bypass_governance)
        if why is not None:
            raise RetentionLocked(
                name, f"{why}; it cannot be deleted", provider="gcp", region=self.region
            )
        if info.retain_until is not None and info.retain_until > _now():
            # an Unlocked (governance) retention, bypassed: remove it, then the object
            blob.retention.mode = None
            blob.retention.retain_until_time = None
            bucket.patch(blob, name, "remove the retention of", override_unlocked=True)
        bucket.delete(key, name)

    def _locking(self, operation: str) -> GcsBucket:
        if not self.settings.object_retention:
            raise self.unsupported(f"{operation} (set object_retention = true for this region)")
        return self._ready()

    def set_retention(
        self,
        name: str,
        until: datetime,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        *,
        bypass_governance: bool = False,
    ) -> ObjectInfo:
        bucket = self._locking("set_retention")
        key = self._key(name)
        if not isinstance(until, datetime) or until.tzinfo is None:
            raise self._error(
                f"set_retention {name!r}: until must be a timezone-aware datetime, got {until!r}"
            )
        mode = RetentionMode(mode)
        blob = bucket.head(key, name)
        current = _info(name, blob)
        why = Protection.of(current).refuses_change(
            until, mode, _now(), bypass_governance=bypass_governance
        )
        if why is not None:
            raise RetentionLocked(name, why, provider="gcp", region=self.region)
        # Cloud Storage wants overrideUnlockedRetention to shorten an Unlocked retention or
        # to lock it; core/retention.py has already said whether either is allowed
        unlocked = current.retention_mode is RetentionMode.GOVERNANCE and Protection.of(
            current
        ).locked(_now())
        override = unlocked and (
            mode is RetentionMode.COMPLIANCE
            or (current.retain_until is not None and until < current.retain_until)
        )
        blob.retention.mode = "Locked" if mode is RetentionMode.COMPLIANCE else "Unlocked"
        blob.retention.retain_until_time = until.astimezone(UTC)
        bucket.patch(blob, name, "change the retention of", override_unlocked=override)
        return ObjectInfo(
            name=name,
            size=current.size,
            modified=current.modified,
            retain_until=_utc(until),
            retention_mode=mode,
            legal_hold=current.legal_hold,
            etag=current.etag,
        )

    def set_legal_hold(self, name: str, on: bool) -> ObjectInfo:
        """The object's temporary hold (an event-based hold set by others stays, and still
        counts as a hold)."""
        bucket = self._locking("set_legal_hold")
        key = self._key(name)
        blob = bucket.head(key, name)
        current = _info(name, blob)
        blob.temporary_hold = bool(on)
        bucket.patch(blob, name, "set the temporary hold of", override_unlocked=False)
        return ObjectInfo(
            name=name,
            size=current.size,
            modified=current.modified,
            retain_until=current.retain_until,
            retention_mode=current.retention_mode,
            legal_hold=bool(on) or bool(blob.event_based_hold),
            etag=current.etag,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
