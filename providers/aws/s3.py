"""Vault and Transit on S3: one bucket per region, an inbox bucket or prefix for transit.

Puts are single PUTs up to ``multipart_threshold`` and multipart uploads with parallel parts
above it; both are atomic by S3's semantics (an object appears whole, or not at all).
``if_absent`` is S3's conditional write (``If-None-Match: *``) on PutObject and on
CompleteMultipartUpload.

WORM: with ``object_lock = true`` the bucket is created with Object Lock, which turns on
versioning. In a versioned bucket a plain DELETE only adds a delete marker and leaves every
version in place, so :meth:`AwsVault.delete` removes an object by deleting each of its
versions by id, after checking every version's retention and legal hold, so that "delete
refused while locked" holds whatever S3 itself would have allowed (moto, for one, lets a
COMPLIANCE lock be shortened; the vault does not).

Versions over a lock: S3 lets anyone with ``s3:PutObject`` write a new version over a locked
object (or a delete marker in front of it); the locked version stays, but a plain GET reads
the newest. In an Object Lock vault every read therefore reads *the version the lock
protects*: the oldest version under a retention date in the future or a legal hold, when the
key has one; else the newest (an object nobody locked, which the framework may replace). For
a name the framework writes once (:data:`_WRITE_ONCE`) whose lock has run out, reads keep
to the version that carried it, and a version this process put is the one it reads. The
version is learnt from the key's listing (``ListObjectVersions`` of the key, or of its whole
page for packs and indexes, :data:`_LEARN_BY_PAGE`; then ``HeadObject`` of its versions,
oldest first up to the first locked one, when the key has more than one), once per key and
process, and pinned: a read of a pinned key is a GET of that version id; a lock this
process sets pins the version it locked, and a lock is set on the framework's version only,
never on another writer's newer one (refused as tampering). Nothing is recorded in the
vault, so the format is unchanged and a new process finds the same version.
:meth:`AwsVault.versions_over_locks` names every newer version or delete marker over a
locked one, and any other version of a name written once (``verify`` reports each as
tampering), and :meth:`AwsVault.list` still lists a locked object hidden by a delete marker.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from regionvault.core.errors import (
    ConfigError,
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
    TransitError,
    VaultError,
)
from regionvault.core.interfaces import Transit, Vault, establish_vault_id
from regionvault.core.names import name_problem, prefix_problem
from regionvault.core.retention import Protection
from regionvault.core.types import Capabilities, ObjectInfo, RetentionMode, Temporary
from regionvault.providers.aws.errors import aws_error, error_code, error_message, error_status

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.settings import AwsSettings

__all__ = ["AwsTransit", "AwsVault", "S3Bucket"]

#: keys under this prefix belong to the provider (the vault id), never to vault names
RESERVED_PREFIX = ".regionvault/"
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
_CONFLICT_RETRIES = 3
_MAX_PART = 5 * 1024**3  # S3's largest part
_MAX_PAGES = 10_000_000  # a bound for pagination loops, far above any real listing
#: names the framework writes once and never replaces (docs/format.md section 1): in an
#: Object Lock vault any other version of one (other bytes, or a delete marker) is another
#: writer's
_WRITE_ONCE = ("packs/", "index/", "points/", "events/", "keyring/")
#: prefixes whose versions a fresh process learns a page at a time on its first read of a
#: key there (a pack's shard ``packs/<h2>/``, the whole ``index/``), not key by key
_LEARN_BY_PAGE = ("packs/", "index/")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _etag(value: Any) -> str | None:
    return str(value).strip('"') if value else None


class S3Bucket:
    """The S3 primitives the vault and the transit share, for one bucket through one client.

    ``error`` is the error class raised for failures (VaultError or TransitError).
    """

    def __init__(
        self,
        *,
        client: Any,
        bucket: str,
        settings: AwsSettings,
        region: str,
        error: type[RegionVaultError],
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.settings = settings
        self.region = region
        self.error_class = error
        self._pool = pool
        self._lock = threading.Lock()
        self._versioned: bool | None = None
        self._object_lock: bool | None = None
        self._ensured = False

    # ------------------------------------------------------------------ errors

    def error(self, exc: BaseException, what: str) -> RegionVaultError:
        code = error_code(exc)
        if code in ("NoSuchBucket",):
            message = (
                f"bucket {self.bucket!r} does not exist in {self.settings.aws_region} "
                "(create it, or set create = true)"
            )
        else:
            message = f"{what} in bucket {self.bucket!r}: {error_message(exc)}"
        return aws_error(exc, message, self.error_class, region=self.region)

    # ------------------------------------------------------------------ bucket set-up

    def ensure(self, *, create: bool, object_lock: bool) -> None:
        """With ``create``, make the bucket (private, Object Lock if asked); then learn
        whether it is versioned. Done once."""
        if self._ensured:
            return
        with self._lock:
            if not self._ensured:
                self._ensure(create=create, object_lock=object_lock)

    def _ensure(self, *, create: bool, object_lock: bool) -> None:
        if create:
            self._create(object_lock)
        try:
            status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, "cannot read versioning") from None
        self._versioned = status in ("Enabled", "Suspended")
        if object_lock:
            self._object_lock = self._lock_enabled()
            if not self._object_lock:
                raise ConfigError(
                    f"object_lock = true but bucket {self.bucket!r} has no Object Lock "
                    "(it can only be turned on when a bucket is created)",
                    key=f'regions."{self.region}".object_lock',
                    region=self.region,
                )
        self._ensured = True

    def _create(self, object_lock: bool) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.aws_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.aws_region}
        if object_lock:
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":
                raise self.error(exc, "cannot create the bucket") from None
            return
        except BotoCoreError as exc:
            raise self.error(exc, "cannot create the bucket") from None
        try:
            self.client.put_public_access_block(
                Bucket=self.bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, "cannot block public access") from None

    def _lock_enabled(self) -> bool:
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc) == "ObjectLockConfigurationNotFoundError":
                return False
            raise self.error(exc, "cannot read the Object Lock configuration") from None
        except BotoCoreError as exc:
            raise self.error(exc, "cannot read the Object Lock configuration") from None
        return bool(conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    @property
    def versioned(self) -> bool:
        return bool(self._versioned)

    # ------------------------------------------------------------------ objects

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool) -> dict[str, Any]:
        """Store ``data`` at ``key`` atomically (one PUT, or a multipart upload above the
        threshold); :class:`ObjectExists` when ``if_absent`` finds the key taken."""
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                if size > self.settings.multipart_threshold:
                    return self._put_multipart(key, data, size, if_absent=if_absent)
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": bytes(data)}
                if if_absent:
                    kwargs["IfNoneMatch"] = "*"
                return dict(self.client.put_object(**kwargs))
            except ClientError as exc:
                code = error_code(exc)
                if code == "ConditionalRequestConflict" and attempt < _CONFLICT_RETRIES:
                    # another conditional write on this key is in flight: ask again shortly
                    time.sleep(0.1 * (attempt + 1))
                    continue
                if if_absent and (code == "PreconditionFailed" or error_status(exc) == 412):
                    raise ObjectExists(key, provider="aws", region=self.region) from None
                raise self.error(exc, f"cannot put {key!r}") from None
            except BotoCoreError as exc:
                raise self.error(exc, f"cannot put {key!r}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _put_multipart(
        self, key: str, data: bytes | memoryview, size: int, *, if_absent: bool
    ) -> dict[str, Any]:
        view = memoryview(data).cast("B")
        part = self.settings.multipart_part_size
        starts = list(range(0, size, part))
        if len(starts) > 1 and size - starts[-1] < part // 2 and size - starts[-2] <= _MAX_PART:
            # a short tail rides with the part before it: a pack just over 16 MiB is two
            # parts, not three (parts may be up to 5 GiB; only the last may be under 5 MiB)
            starts.pop()
        ends = [*starts[1:], size]
        ranges = [
            (n + 1, start, end) for n, (start, end) in enumerate(zip(starts, ends, strict=True))
        ]
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
        )["UploadId"]

        def upload(item: tuple[int, int, int]) -> dict[str, Any]:
            number, start, end = item
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=bytes(view[start:end]),
                ChecksumAlgorithm="CRC32",
            )
            done: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
            if answer.get("ChecksumCRC32"):
                done["ChecksumCRC32"] = answer["ChecksumCRC32"]
            return done

        try:
            if self._pool is not None and len(ranges) > 1:
                parts = list(self._pool.map(upload, ranges))
            else:
                parts = [upload(r) for r in ranges]
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if if_absent:
                kwargs["IfNoneMatch"] = "*"
            return dict(self.client.complete_multipart_upload(**kwargs))
        except BaseException:
            # nothing became visible; do not leave the parts behind (they are billed)
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def get(
        self,
        key: str,
        name: str,
        *,
        offset: int = 0,
        length: int | None = None,
        version_id: str | None = None,
    ) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        if length is not None:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            answer = self.client.get_object(**kwargs)
            with answer["Body"] as body:
                return bytes(body.read())
        except ClientError as exc:
            code = error_code(exc)
            if code in _NOT_FOUND:
                raise ObjectNotFound(name, provider="aws", region=self.region) from None
            if code == "InvalidRange":
                return b""  # the range starts at or past the end
            raise self.error(exc, f"cannot get {key!r}") from None
        except BotoCoreError as exc:
            raise self.error(exc, f"cannot get {key!r}") from None

    def head(self, key: str, name: str, *, version_id: str | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        try:
            return dict(self.client.head_object(**kwargs))
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND or error_status(exc) == 404:
                raise ObjectNotFound(name, provider="aws", region=self.region) from None
            raise self.error(exc, f"cannot head {key!r}") from None
        except BotoCoreError as exc:
            raise self.error(exc, f"cannot head {key!r}") from None

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            PaginationConfig={"PageSize": self.settings.list_page_size},
        )
        try:
            for page in pages:
                yield from page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, f"cannot list {prefix!r}") from None

    def stale_uploads(self, prefix: str, older_than: timedelta, cut: int) -> Iterator[Temporary]:
        """Incomplete multipart uploads under ``prefix`` begun more than ``older_than`` ago
        (a killed put's parts: invisible, yet billed). S3 does not say who began one, so age
        alone decides; a live put finishes or aborts its upload well within a lock's expiry.
        ``handle`` is ``<upload id> <key>``; ``name`` the key less its first ``cut``
        characters."""
        cutoff = _now() - older_than
        paginator = self.client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    begun = _utc(upload["Initiated"])
                    if begun >= cutoff:
                        continue
                    key = str(upload["Key"])
                    yield Temporary(
                        handle=f"{upload['UploadId']} {key}",
                        name=key[cut:],
                        size=None,
                        modified=begun,
                        reason=f"a multipart upload begun more than {older_than} ago",
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, f"cannot list the multipart uploads under {prefix!r}") from None

    def abort_upload(self, handle: str, prefix: str) -> None:
        """Abort the multipart upload ``handle`` (from :meth:`stale_uploads`) whose key
        starts with ``prefix``; already gone is fine."""
        upload_id, _, key = handle.partition(" ")
        if not upload_id or not key.startswith(prefix):
            raise self.error_class(
                f"{handle!r} is not an upload of this vault or inbox",
                provider="aws",
                region=self.region,
            )
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise self.error(exc, f"cannot abort the upload of {key!r}") from None
        except BotoCoreError as exc:
            raise self.error(exc, f"cannot abort the upload of {key!r}") from None

    def first_key(self, key: str) -> bool:
        """True when ``key`` exists, asked with a one-key listing (s3:ListBucket), not a read."""
        try:
            answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, f"cannot list {key!r}") from None
        contents = answer.get("Contents", [])
        return bool(contents) and contents[0].get("Key") == key

    def versions(self, key: str) -> builtins.list[dict[str, Any]]:
        """Every version and delete marker of exactly ``key``, newest first."""
        found: builtins.list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        try:
            for _page in range(_MAX_PAGES):
                answer = self.client.list_object_versions(**kwargs)
                for item in answer.get("Versions", []):
                    if item["Key"] == key:
                        found.append({**item, "marker": False})
                for item in answer.get("DeleteMarkers", []):
                    if item["Key"] == key:
                        found.append({**item, "marker": True})
                if not answer.get("IsTruncated"):
                    break
                if answer.get("NextKeyMarker", key) != key:
                    break  # the listing has moved past our key
                kwargs["KeyMarker"] = answer["NextKeyMarker"]
                kwargs["VersionIdMarker"] = answer.get("NextVersionIdMarker", "")
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, f"cannot list versions of {key!r}") from None
        return _newest_first(found)

    def version_groups(self, prefix: str) -> Iterator[builtins.list[dict[str, Any]]]:
        """Every key under ``prefix`` with all its versions and delete markers (``marker``
        True), newest first (the latest, ``IsLatest``, leads), one list per key in key
        order: one ``ListObjectVersions`` per 1,000 versions."""
        paginator = self.client.get_paginator("list_object_versions")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            PaginationConfig={"PageSize": self.settings.list_page_size},
        )
        group: builtins.list[dict[str, Any]] = []
        try:
            for page in pages:
                entries = [{**v, "marker": False} for v in page.get("Versions", [])]
                entries += [{**m, "marker": True} for m in page.get("DeleteMarkers", [])]
                # a key's entries may continue on the next page: hold the last key back
                entries.sort(key=lambda e: str(e["Key"]))
                for entry in entries:
                    if group and group[0]["Key"] != entry["Key"]:
                        yield _newest_first(group)
                        group = []
                    group.append(entry)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, f"cannot list versions under {prefix!r}") from None
        if group:
            yield _newest_first(group)

    def framework_version(
        self, key: str, name: str, group: builtins.list[dict[str, Any]], *, write_once: bool
    ) -> tuple[str, dict[str, Any], bool] | None:
        """``(version id, its HeadObject answer, live)`` of the version of ``key`` the
        framework wrote and locked, from ``group`` (the key's versions, newest first): the
        oldest under a live lock (retention in the future or a legal hold; ``live`` True);
        for a name the framework writes once, else the oldest that ever carried a retention
        date (its lock ran out; ``live`` False). None when there is neither. Every version
        is headed, oldest first, up to the first locked one: junk versions cost requests
        but never hide a lock (only keys with several versions are asked at all)."""
        ever: tuple[str, dict[str, Any]] | None = None
        for entry in reversed(group):
            if entry["marker"]:
                continue
            try:
                facts = self.head(key, name, version_id=str(entry["VersionId"]))
            except ObjectNotFound:
                continue
            info = _info(name, facts)
            if _refusal(info, bypass_governance=False) is not None:
                return str(entry["VersionId"]), facts, True
            if ever is None and write_once and info.retain_until is not None:
                ever = (str(entry["VersionId"]), facts)
        return None if ever is None else (ever[0], ever[1], False)

    def delete(self, key: str, name: str, *, bypass_governance: bool, check_locks: bool) -> None:
        """Remove ``key`` for good: in a versioned bucket every version by id, after checking
        (with ``check_locks``) that none is under retention or legal hold."""
        if not self.versioned:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) in _NOT_FOUND:
                    return
                raise self.error(exc, f"cannot delete {key!r}") from None
            return
        versions = self.versions(key)
        if check_locks:
            for version in versions:
                if not version["marker"]:
                    self._refuse_if_locked(key, name, version["VersionId"], bypass_governance)
        # oldest first: if a delete fails half-way, the newest version still stands whole
        for version in reversed(versions):
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "VersionId": version["VersionId"],
            }
            if bypass_governance:
                kwargs["BypassGovernanceRetention"] = True
            try:
                self.client.delete_object(**kwargs)
            except ClientError as exc:
                if error_code(exc) in _NOT_FOUND:
                    continue
                if error_code(exc) == "AccessDenied" and check_locks and not version["marker"]:
                    # locked since we looked? say so; otherwise it is a permission problem
                    self._refuse_if_locked(key, name, version["VersionId"], bypass_governance)
                raise self.error(
                    exc, f"cannot delete {key!r} version {version['VersionId']}"
                ) from None
            except BotoCoreError as exc:
                raise self.error(exc, f"cannot delete {key!r}") from None

    def _refuse_if_locked(self, key: str, name: str, version_id: str, bypass: bool) -> None:
        try:
            facts = self.head(key, name, version_id=version_id)
        except ObjectNotFound:
            return
        refusal = _refusal(_info(name, facts), bypass_governance=bypass)
        if refusal is not None:
            raise RetentionLocked(
                name, f"{refusal}; it cannot be deleted", provider="aws", region=self.region
            )


def _newest_first(group: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
    """One key's versions and delete markers, the latest first, then newest to oldest (S3
    lists a key's versions newest first; a sort by time keeps that order on equal times)."""
    group.sort(key=lambda e: (bool(e.get("IsLatest")), _utc(e["LastModified"])), reverse=True)
    return group


def _refusal(info: ObjectInfo, *, bypass_governance: bool) -> str | None:
    """Why the object behind ``info`` may not be removed or replaced now, or None."""
    return Protection.of(info).refuses_removal(_now(), bypass_governance=bypass_governance)


def _info(name: str, facts: dict[str, Any], size_key: str = "ContentLength") -> ObjectInfo:
    until = facts.get("ObjectLockRetainUntilDate")
    mode = facts.get("ObjectLockMode")
    return ObjectInfo(
        name=name,
        size=int(facts.get(size_key, 0)),
        modified=_utc(facts["LastModified"]) if facts.get("LastModified") else _now(),
        retain_until=_utc(until) if until is not None else None,
        retention_mode=RetentionMode(str(mode).lower()) if mode else None,
        legal_hold=facts.get("ObjectLockLegalHoldStatus") == "ON",
        etag=_etag(facts.get("ETag")),
    )


def _foreign(
    entries: builtins.list[dict[str, Any]], etag: str | None
) -> builtins.list[dict[str, Any]]:
    """Of a write-once name's ``entries``, those not the framework's: delete markers, and
    versions whose bytes differ from its version's (``etag``; a retried put of the same
    bytes is not foreign). With ``etag`` None: all of them unless every one is a version
    of the same bytes."""
    if etag is None:
        tags = {_etag(e.get("ETag")) for e in entries if not e["marker"]}
        if len(tags) <= 1 and not any(e["marker"] for e in entries):
            return []
        return entries
    return [e for e in entries if e["marker"] or _etag(e.get("ETag")) != etag]


def _count(entries: builtins.list[dict[str, Any]], which: str = "") -> str:
    markers = sum(1 for e in entries if e["marker"])
    parts = []
    if len(entries) - markers:
        parts.append(f"{len(entries) - markers} {which}version(s)")
    if markers:
        parts.append(f"{markers} delete marker(s)")
    return " and ".join(parts)


def _latest(entries: builtins.list[dict[str, Any]]) -> str:
    latest = entries[0]
    return f"the latest, {latest['VersionId']}, written {_utc(latest['LastModified']).isoformat()}"


class AwsVault(Vault):
    """One region's S3 bucket (under an optional key prefix)."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: AwsSettings,
        clients: ClientFactory,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(provider="aws", region=region.name, capabilities=capabilities)
        self.bucket_name = settings.need(region, "bucket", "vault")
        self.prefix = settings.prefix
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.multipart_concurrency, thread_name_prefix="rv-s3-part"
        )
        self._s3 = S3Bucket(
            client=clients.client(settings, "s3"),
            bucket=self.bucket_name,
            settings=settings,
            region=region.name,
            error=VaultError,
            pool=self._pool,
        )
        reserved = [RESERVED_PREFIX]
        if settings.inbox_bucket_name == self.bucket_name:
            reserved.append(settings.inbox_prefix)
        self._reserved = tuple(reserved)
        self._vault_id: str | None = None
        self._id_lock = threading.Lock()
        # Object Lock vaults: the version each key's reads use (module docstring), learnt
        # once per key: pinned (the locked version's id) or plain (the newest)
        self._pins: dict[str, str] = {}
        self._plain: set[str] = set()
        self._pins_lock = threading.Lock()
        self._pages: set[str] = set()  # listing prefixes learnt whole (_LEARN_BY_PAGE)
        self._page_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------ helpers

    def _ready(self) -> S3Bucket:
        self._s3.ensure(create=self._settings.create, object_lock=self._settings.object_lock)
        return self._s3

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise VaultError(
                f"bad object name {name!r}: {problem}", provider="aws", region=self.region
            )
        key = self.prefix + name
        if len(key.encode("utf-8")) > 1024:
            raise VaultError(
                f"object name {name[:60]!r}... is longer than S3's 1024-byte key limit",
                provider="aws",
                region=self.region,
            )
        if key.startswith(self._reserved):
            raise VaultError(
                f"object name {name!r} lies in a key space the aws provider reserves "
                f"({', '.join(self._reserved)})",
                provider="aws",
                region=self.region,
            )
        return key

    # ------------------------------------------------------------------ versions

    def _version(self, s3: S3Bucket, key: str, name: str) -> str | None:
        """The version id reads of ``key`` use: the framework's locked version's in an Object
        Lock vault whose key has one (learnt once per key, then pinned), else None (the
        newest). A key under :data:`_LEARN_BY_PAGE` is learnt with its whole page (a pack's
        shard, the index): one ``ListObjectVersions`` per 1,000 versions there, once."""
        if not self._settings.object_lock:
            return None
        with self._pins_lock:
            if key in self._pins:
                return self._pins[key]
            if key in self._plain:
                return None
        page = self._page(key, name)
        if page is not None and page not in self._pages:
            with self._pins_lock:
                page_lock = self._page_locks.setdefault(page, threading.Lock())
            with page_lock:  # one thread lists a page; others wanting it wait, not the rest
                if page not in self._pages:
                    for group in s3.version_groups(page):
                        gkey = str(group[0]["Key"])
                        with self._pins_lock:  # what this process put or locked stays
                            known = gkey in self._pins or gkey in self._plain
                        if not known and not gkey.startswith(self._reserved):
                            self._learn(s3, gkey, gkey[len(self.prefix) :], group)
                    self._pages.add(page)
            with self._pins_lock:
                if key in self._pins:
                    return self._pins[key]
                if key in self._plain:
                    return None
        # not in its page (written since the page was listed), or no page: the key alone
        return self._learn(s3, key, name, s3.versions(key))

    def _page(self, key: str, name: str) -> str | None:
        """The listing prefix ``key`` is learnt with, or None (learnt alone)."""
        if not name.startswith(_LEARN_BY_PAGE) or "/" not in name:
            return None
        return key[: key.rindex("/") + 1]

    def _learn(
        self, s3: S3Bucket, key: str, name: str, group: builtins.list[dict[str, Any]]
    ) -> str | None:
        """Pin the framework's version among ``group`` (the key's versions, newest first),
        or mark the key plain; returns the pinned version id."""
        found: str | None = None
        # one version (the common case) is the one to read, whether locked or not
        if len(group) > 1 or (group and group[0]["marker"]):
            framework = s3.framework_version(
                key, name, group, write_once=name.startswith(_WRITE_ONCE)
            )
            found = None if framework is None else framework[0]
        self._remember(key, found)
        return found

    def _remember(self, key: str, version_id: str | None) -> None:
        with self._pins_lock:
            if version_id is None:
                self._pins.pop(key, None)
                self._plain.add(key)
            else:
                self._pins[key] = version_id
                self._plain.discard(key)

    def _remember_plain(self, key: str) -> None:
        """Mark ``key`` plain (read as the newest) unless this process knows better already
        (a pin: the version it put or locked)."""
        with self._pins_lock:
            if key not in self._pins:
                self._plain.add(key)

    def _forget(self, key: str) -> None:
        with self._pins_lock:
            self._pins.pop(key, None)
            self._plain.discard(key)

    def _head(self, s3: S3Bucket, key: str, name: str) -> dict[str, Any]:
        """HeadObject of the version reads use; a pinned version gone (deleted once its lock
        ran out) is looked for again, once."""
        version = self._version(s3, key, name)
        try:
            return s3.head(key, name, version_id=version)
        except ObjectNotFound:
            if version is None:
                raise
        self._forget(key)
        return s3.head(key, name, version_id=self._version(s3, key, name))

    def _overwrite_refusal(self, s3: S3Bucket, key: str, name: str) -> str | None:
        """Why a put may not replace ``key`` (a lock on any version reads use), or None. A
        key with no version yet costs one request, as a HeadObject did."""
        with self._pins_lock:
            known = key in self._pins or key in self._plain
        if not known:
            group = s3.versions(key)
            self._learn(s3, key, name, group)
            if not group:
                return None
        try:
            facts = self._head(s3, key, name)
        except ObjectNotFound:
            return None
        return _refusal(_info(name, facts), bypass_governance=False)

    def versions_over_locks(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        """``(name, what)`` for every object under ``prefix`` with versions another writer
        put (S3 allows them whatever the lock): a newer version or a delete marker over the
        framework's locked version (its lock live, or run out, for a name written once);
        for a name written once also any older version, or several versions none of them
        locked. Reads use the framework's version where there is one. One
        ``ListObjectVersions`` per 1,000 versions, and HeadObject only of keys with more
        than one. None in a vault without Object Lock."""
        problem = prefix_problem(prefix)
        if problem is not None:
            raise VaultError(
                f"bad list prefix {prefix!r}: {problem}", provider="aws", region=self.region
            )
        if not self._settings.object_lock:
            return
        s3 = self._ready()
        cut = len(self.prefix)
        for group in s3.version_groups(self.prefix + prefix):
            key = str(group[0]["Key"])
            if len(group) < 2 or key.startswith(self._reserved):
                continue
            name = key[cut:]
            write_once = name.startswith(_WRITE_ONCE)
            found = s3.framework_version(key, name, group, write_once=write_once)
            if found is None:
                foreign = _foreign(group, None) if write_once else []
                if foreign:
                    yield (
                        name,
                        (
                            f"{_count(foreign)} under a name regionvault writes once, none of "
                            f"them locked ({_latest(group)}): not all written by regionvault"
                        ),
                    )
                continue
            version_id, facts, live = found
            self._remember(key, version_id)
            at = next(n for n, e in enumerate(group) if e["VersionId"] == version_id)
            etag = _etag(facts.get("ETag"))
            newer = _foreign(group[:at], etag) if write_once else group[:at]
            older = _foreign(group[at + 1 :], etag) if write_once else []
            if not newer and not older:
                continue
            what = "locked version" if live else "version (its lock has run out)"
            parts = []
            if newer:
                parts.append(
                    f"{_count(newer, 'newer ')} over its {what} {version_id} ({_latest(newer)})"
                )
            if older:
                parts.append(f"{_count(older, 'older ')} under it ({_latest(older)})")
            yield name, (f"{'; '.join(parts)}: not written by regionvault; reads use the {what}")

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
        s3 = self._ready()
        key = f"{RESERVED_PREFIX}{self.prefix}vault-id"
        return establish_vault_id(
            lambda: s3.get(key, key),
            lambda made: s3.put(key, made, if_absent=True),
            provider="aws",
            region=self.region,
        )

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        key = self._key(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise VaultError(
                f"put {name!r}: data must be bytes, got {type(data).__name__}",
                provider="aws",
                region=self.region,
            )
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        s3 = self._ready()
        if self._settings.object_lock and not if_absent:
            # S3 would keep the locked version and put a new one in front of it; the framework
            # promises more: a locked object is not replaced either
            refusal = self._overwrite_refusal(s3, key, name)
            if refusal is not None:
                raise RetentionLocked(
                    name, f"{refusal}; it cannot be overwritten", provider="aws", region=self.region
                )
        try:
            answer = s3.put(key, data, if_absent=if_absent)
        except ObjectExists:
            raise ObjectExists(name, provider="aws", region=self.region) from None
        if self._settings.object_lock:
            # what this process just wrote is what it reads from now on, with no listing: an
            # overwriting put found no live lock on the version read before (a pin of it is
            # over); a name written once keeps to this very version whatever is put over it
            version = answer.get("VersionId")
            self._remember(key, str(version) if version and name.startswith(_WRITE_ONCE) else None)
        return ObjectInfo(name=name, size=size, modified=_now(), etag=_etag(answer.get("ETag")))

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if not isinstance(offset, int) or offset < 0:
            raise VaultError(
                f"get {name!r}: bad offset {offset!r}", provider="aws", region=self.region
            )
        if length is not None and (not isinstance(length, int) or length < 0):
            raise VaultError(
                f"get {name!r}: bad length {length!r}", provider="aws", region=self.region
            )
        if length == 0:
            self.head(name)
            return b""
        s3 = self._ready()
        version = self._version(s3, key, name)
        try:
            return s3.get(key, name, offset=offset, length=length, version_id=version)
        except ObjectNotFound:
            if version is None:
                raise
        # the pinned version is gone (deleted once its lock ran out): look again, once
        self._forget(key)
        version = self._version(s3, key, name)
        return s3.get(key, name, offset=offset, length=length, version_id=version)

    def head(self, name: str) -> ObjectInfo:
        key = self._key(name)
        return _info(name, self._head(self._ready(), key, name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise VaultError(
                f"bad list prefix {prefix!r}: {problem}", provider="aws", region=self.region
            )
        s3 = self._ready()
        cut = len(self.prefix)
        if self._settings.object_lock:
            yield from self._list_versions(s3, prefix, cut)
            return
        for item in s3.list(self.prefix + prefix):
            key = item["Key"]
            if key.startswith(self._reserved):
                continue
            yield _info(key[cut:], item, size_key="Size")

    def _list_versions(self, s3: S3Bucket, prefix: str, cut: int) -> Iterator[ObjectInfo]:
        """An Object Lock vault's listing, from its versions: each object as reads see it
        (the locked version's facts where another version or a delete marker lies over it),
        and a locked object behind a delete marker still listed."""
        for group in s3.version_groups(self.prefix + prefix):
            key = str(group[0]["Key"])
            if key.startswith(self._reserved):
                continue
            name = key[cut:]
            if len(group) == 1:
                if not group[0]["marker"]:
                    self._remember_plain(key)  # its reads need no listing of their own
                    yield _info(name, group[0], size_key="Size")
                continue
            locked = s3.framework_version(key, name, group, write_once=name.startswith(_WRITE_ONCE))
            if locked is not None:
                self._remember(key, locked[0])
                yield _info(name, locked[1])
            elif not group[0]["marker"]:
                self._remember_plain(key)
                yield _info(name, group[0], size_key="Size")

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        key = self._key(name)
        try:
            self._ready().delete(
                key,
                name,
                bypass_governance=bypass_governance,
                check_locks=self._settings.object_lock,
            )
        finally:
            self._forget(key)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """Incomplete multipart uploads of this vault's puts begun more than ``older_than``
        ago (a killed process's pack uploads); not those of an inbox sharing the bucket."""
        for upload in self._ready().stale_uploads(self.prefix, older_than, len(self.prefix)):
            if not (self.prefix + (upload.name or "")).startswith(self._reserved):
                yield upload

    def remove_temporary(self, temporary: Temporary) -> None:
        key = temporary.handle.partition(" ")[2]
        if key.startswith(self._reserved):
            raise VaultError(
                f"{temporary.handle!r} is not an upload of this vault",
                provider="aws",
                region=self.region,
            )
        self._ready().abort_upload(temporary.handle, self.prefix)

    def _lock_target(
        self, s3: S3Bucket, key: str, name: str, *, locking: bool = True
    ) -> dict[str, Any]:
        """HeadObject of the version a retention or legal hold goes on, from the key's
        versions listed now: for a name written once the framework's (the one this process
        wrote or pinned, else the locked one, live or run out, else the oldest), refused as
        tampering when other bytes or a delete marker lie over it; else the version under a
        live lock, or the newest. Never the newest merely because it is the newest."""
        group = s3.versions(key)
        versions = [e for e in group if not e["marker"]]
        if not versions:
            raise ObjectNotFound(name, provider="aws", region=self.region)
        if not name.startswith(_WRITE_ONCE):
            found = s3.framework_version(key, name, group, write_once=False)
            if found is not None:
                return found[1]
            if group[0]["marker"]:
                raise ObjectNotFound(name, provider="aws", region=self.region)
            return s3.head(key, name, version_id=str(versions[0]["VersionId"]))
        with self._pins_lock:
            pinned = self._pins.get(key)
        ids = [str(e["VersionId"]) for e in versions]
        if pinned in ids:
            assert pinned is not None
            facts = s3.head(key, name, version_id=pinned)
        elif len(group) == 1:
            facts = s3.head(key, name, version_id=ids[0])
        else:
            found = s3.framework_version(key, name, group, write_once=True)
            oldest = ids[-1]
            facts = found[1] if found else s3.head(key, name, version_id=oldest)
        version_id = str(facts["VersionId"])
        at = next(n for n, e in enumerate(group) if e["VersionId"] == version_id)
        over = _foreign(group[:at], _etag(facts.get("ETag")))
        if over and locking:  # releasing a lock on the framework's version stays allowed
            raise IntegrityError(
                name,
                f"tampering: {_count(over, 'newer ')} over the version regionvault wrote, "
                f"{version_id} ({_latest(over)}); not locked, as verify reports",
                provider="aws",
                region=self.region,
            )
        return facts

    def _locking(self, operation: str) -> S3Bucket:
        if not self._settings.object_lock:
            raise self.unsupported(f"{operation} (set object_lock = true for this region)")
        return self._ready()

    def set_retention(
        self,
        name: str,
        until: datetime,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        *,
        bypass_governance: bool = False,
    ) -> ObjectInfo:
        s3 = self._locking("set_retention")
        key = self._key(name)
        if not isinstance(until, datetime) or until.tzinfo is None:
            raise VaultError(
                f"set_retention {name!r}: until must be a timezone-aware datetime, got {until!r}",
                provider="aws",
                region=self.region,
            )
        mode = RetentionMode(mode)
        lift = bypass_governance and until <= _now()
        facts = self._lock_target(s3, key, name, locking=not lift)
        current = _info(name, facts)
        why = Protection.of(current).refuses_change(
            until, mode, _now(), bypass_governance=bypass_governance
        )
        if why is not None:
            raise RetentionLocked(name, why, provider="aws", region=self.region)
        # a governance lock lifted (an ``until`` already past, with the bypass): S3 refuses a
        # past RetainUntilDate (400 InvalidArgument); an empty Retention with the bypass
        # header removes the retention, the documented way (``lift`` above)
        kwargs: dict[str, Any] = {
            "Bucket": s3.bucket,
            "Key": key,
            "Retention": {} if lift else {"Mode": mode.value.upper(), "RetainUntilDate": until},
        }
        if facts.get("VersionId"):
            kwargs["VersionId"] = facts["VersionId"]
        if bypass_governance:
            kwargs["BypassGovernanceRetention"] = True
        try:
            s3.client.put_object_retention(**kwargs)
        except ClientError as exc:
            if error_code(exc) == "AccessDenied":
                raise RetentionLocked(
                    name,
                    f"S3 refused the retention change ({error_message(exc)})",
                    provider="aws",
                    region=self.region,
                ) from None
            raise s3.error(exc, f"cannot set retention on {key!r}") from None
        except BotoCoreError as exc:
            raise s3.error(exc, f"cannot set retention on {key!r}") from None
        if facts.get("VersionId"):
            if lift:
                self._forget(key)
            else:
                self._remember(key, str(facts["VersionId"]))  # reads keep to what is locked
        return ObjectInfo(
            name=name,
            size=current.size,
            modified=current.modified,
            retain_until=None if lift else _utc(until),
            retention_mode=None if lift else mode,
            legal_hold=current.legal_hold,
            etag=current.etag,
        )

    def set_legal_hold(self, name: str, on: bool) -> ObjectInfo:
        s3 = self._locking("set_legal_hold")
        key = self._key(name)
        facts = self._lock_target(s3, key, name, locking=on)
        kwargs: dict[str, Any] = {
            "Bucket": s3.bucket,
            "Key": key,
            "LegalHold": {"Status": "ON" if on else "OFF"},
        }
        if facts.get("VersionId"):
            kwargs["VersionId"] = facts["VersionId"]
        try:
            s3.client.put_object_legal_hold(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise s3.error(exc, f"cannot set the legal hold on {key!r}") from None
        if facts.get("VersionId"):
            if on:
                self._remember(key, str(facts["VersionId"]))
            else:
                self._forget(key)  # a retention may still protect it: learnt again
        current = _info(name, facts)
        return ObjectInfo(
            name=name,
            size=current.size,
            modified=current.modified,
            retain_until=current.retain_until,
            retention_mode=current.retention_mode,
            legal_hold=bool(on),
            etag=current.etag,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class AwsTransit(Transit):
    """Payloads from a source region into the destination's S3 inbox.

    The source writes ``<inbox_prefix><source provider>/<source name>/<name>`` in the
    destination's inbox bucket with its own credentials (s3:PutObject there, plus a
    ListBucket limited to its prefix for :meth:`has`); the destination lists, reads and
    deletes with its own.
    """

    def __init__(
        self,
        *,
        source: RegionConfig,
        source_settings: AwsSettings | None,
        destination: RegionConfig,
        settings: AwsSettings,
        clients: ClientFactory,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(
            provider="aws", source=source.name, region=destination.name, capabilities=capabilities
        )
        settings.need(destination, "bucket", "transit inbox")
        bucket = settings.inbox_bucket_name
        assert bucket is not None
        self.bucket_name = bucket
        self.prefix = f"{settings.inbox_prefix}{source.id.provider}/{source.id.name}/"
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.multipart_concurrency, thread_name_prefix="rv-inbox-part"
        )
        # the sending side uses the source's credentials (profile), aimed at the destination
        sender = source_settings or settings
        self._send = S3Bucket(
            client=clients.client(sender, "s3", aws_region=settings.aws_region),
            bucket=bucket,
            settings=settings,
            region=destination.name,
            error=TransitError,
            pool=self._pool,
        )
        self._recv = S3Bucket(
            client=clients.client(settings, "s3"),
            bucket=bucket,
            settings=settings,
            region=destination.name,
            error=TransitError,
        )
        self._same_bucket = bucket == settings.bucket
        self._sent = 0
        self._sent_lock = threading.Lock()

    def _ready_recv(self) -> S3Bucket:
        lock = self._settings.object_lock and self._same_bucket
        self._recv.ensure(create=self._settings.create, object_lock=lock)
        return self._recv

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise TransitError(
                f"bad payload name {name!r}: {problem}", provider="aws", region=self.region
            )
        return self.prefix + name

    def send(self, name: str, payload: bytes | memoryview) -> None:
        key = self._key(name)
        if self._settings.create:
            self._ready_recv()  # test/dev set-ups make the inbox on first use
        self._send.put(key, payload, if_absent=False)
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        with self._sent_lock:
            self._sent += size

    def has(self, name: str) -> bool:
        key = self._key(name)
        if self._settings.create:
            self._ready_recv()  # test/dev set-ups make the inbox on first use
        return self._send.first_key(key)

    def inbox(self, prefix: str = "") -> Iterator[str]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise TransitError(
                f"bad inbox prefix {prefix!r} from {self.source}: {problem}",
                provider="aws",
                region=self.region,
            )
        return self._inbox(prefix)

    def _inbox(self, prefix: str) -> Iterator[str]:
        cut = len(self.prefix)
        for item in self._ready_recv().list(self.prefix + prefix):
            yield str(item["Key"])[cut:]

    def receive(self, name: str) -> bytes:
        key = self._key(name)
        try:
            return self._ready_recv().get(key, name)
        except ObjectNotFound:
            raise TransitError(
                f"payload {name!r} is not in the inbox from {self.source}",
                provider="aws",
                region=self.region,
            ) from None

    def discard(self, name: str) -> None:
        recv = self._ready_recv()
        recv.delete(self._key(name), name, bypass_governance=False, check_locks=False)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """Incomplete multipart uploads of payloads from this source begun more than
        ``older_than`` ago (a killed sender's), listed and aborted with the destination's
        credentials."""
        return self._ready_recv().stale_uploads(self.prefix, older_than, len(self.prefix))

    def remove_temporary(self, temporary: Temporary) -> None:
        self._ready_recv().abort_upload(temporary.handle, self.prefix)

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def close(self) -> None:
        self._pool.shutdown(wait=True)
