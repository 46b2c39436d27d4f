"""Vault on Azure Blob Storage: one storage account and container per region.

Puts are one Put Blob up to ``single_put_limit`` and, above it, blocks staged in parallel
(Put Block) then committed in one Put Block List; both are atomic by Blob Storage's
semantics (a blob appears whole, or not at all). ``if_absent`` is ``If-None-Match: *`` on
Put Blob and on Put Block List. Gets are ranged (``x-ms-range``); listings are paged.

WORM (``immutability = true``: a container with version-level immutability support, which
needs blob versioning on the account): :meth:`AzureVault.set_retention` sets the blob's
version-level immutability policy (``PUT ?comp=immutabilityPolicies``; governance is an
``Unlocked`` policy, compliance a ``Locked`` one) and :meth:`AzureVault.set_legal_hold` its
legal hold (``PUT ?comp=legalhold``). The vault checks a blob's policy and hold before it
deletes or replaces it, as the framework promises, and maps Azure's own refusals (409
``BlobImmutableDueToPolicy``, ``BlobImmutableDueToLegalHold``) onto ``RetentionLocked``.
Azure enforces them; Azurite does not implement them, so offline tests assert the requests
and the mapping, and enforcement is tested live only (docs/azure.md).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobBlock, BlobClient, ContainerClient, ImmutabilityPolicy
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
    VaultError,
)
from regionvault.core.interfaces import Vault, establish_vault_id
from regionvault.core.names import name_problem, prefix_problem
from regionvault.core.retention import Protection
from regionvault.core.types import Capabilities, ObjectInfo, RetentionMode
from regionvault.providers.azure.errors import azure_error, error_code, error_message, error_status

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.azure.settings import BlobSettings

__all__ = ["IMMUTABLE_CODES", "RESERVED_PREFIX", "AzureVault", "BlobContainer"]

#: blob names under this prefix belong to the provider (the vault id), never to vault names
RESERVED_PREFIX = ".regionvault/"
#: Azure's documented 409s for a blob an immutability policy or a legal hold protects
IMMUTABLE_CODES = frozenset({"BlobImmutableDueToPolicy", "BlobImmutableDueToLegalHold"})
#: a get re-reads a blob that changed between its ranged requests, at most this often
_READ_ATTEMPTS = 3
#: a staged upload whose blocks another writer's commit discarded is made again this often
_COMMIT_ATTEMPTS = 3
_MAX_PAGES = 10_000_000  # a bound for pagination loops, far above any real listing


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _etag(value: Any) -> str | None:
    return str(value).strip('"') if value else None


def _size(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class BlobContainer:
    """The Blob Storage primitives the vault and the transit share, for one container
    through one ContainerClient. ``error`` is the error class raised for failures
    (``VaultError`` or ``TransitError``); ``label`` names the container in messages."""

    def __init__(
        self,
        *,
        client: ContainerClient,
        settings: BlobSettings,
        region: str,
        error: type[RegionVaultError],
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.region = region
        self.error_class = error
        self.label = f"container {client.container_name!r} of account {settings.account_name!r}"
        self._pool = pool
        self._lock = threading.Lock()
        self._ensured = False

    # ------------------------------------------------------------------ errors

    def error(self, exc: BaseException, what: str) -> RegionVaultError:
        if error_code(exc) == "ContainerNotFound":
            message = f"{self.label} does not exist (create it, or set create = true)"
        else:
            message = f"{what} in {self.label}: {error_message(exc)}"
        return azure_error(exc, message, self.error_class, region=self.region)

    def locked(self, exc: BaseException, name: str, what: str) -> RetentionLocked | None:
        """Azure's refusal of ``what`` on a protected blob as RetentionLocked, else None."""
        code = error_code(exc)
        if code not in IMMUTABLE_CODES:
            return None
        reason = (
            "a legal hold" if code == "BlobImmutableDueToLegalHold" else "its immutability policy"
        )
        return RetentionLocked(
            name,
            f"Azure refused to {what} it because of {reason} ({code})",
            provider="azure",
            region=self.region,
        )

    # ------------------------------------------------------------------ set-up

    def ensure(self, *, create: bool) -> None:
        """With ``create``, make the container (private) once."""
        if self._ensured or not create:
            return
        with self._lock:
            try:
                self.client.create_container()
            except ResourceExistsError:
                pass  # made before, or by another thread or process just now
            except AzureError as exc:
                raise self.error(exc, "cannot create the container") from None
            self._ensured = True

    # ------------------------------------------------------------------ objects

    def blob(self, key: str) -> BlobClient:
        return self.client.get_blob_client(key)

    def put(self, key: str, name: str, data: bytes | memoryview, *, if_absent: bool) -> Any:
        """Store ``data`` at ``key`` atomically; :class:`ObjectExists` when ``if_absent``
        finds it taken. Returns the SDK's answer (etag, last_modified)."""
        size = _size(data)
        blob = self.blob(key)
        try:
            if size <= self.settings.single_put_limit:
                return blob.upload_blob(bytes(data), overwrite=not if_absent, max_concurrency=1)
            for attempt in range(_COMMIT_ATTEMPTS):
                try:
                    return self._put_blocks(blob, data, size, if_absent=if_absent)
                except HttpResponseError as exc:
                    # another writer's commit discarded our uncommitted blocks: stage again
                    if error_code(exc) != "InvalidBlockList" or attempt == _COMMIT_ATTEMPTS - 1:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        except (ResourceExistsError, ResourceModifiedError) as exc:
            if if_absent and error_code(exc) in ("BlobAlreadyExists", "ConditionNotMet", ""):
                raise ObjectExists(name, provider="azure", region=self.region) from None
            refusal = self.locked(exc, name, "overwrite")
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot put {key!r}") from None
        except AzureError as exc:
            refusal = self.locked(exc, name, "overwrite")
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot put {key!r}") from None

    def _put_blocks(
        self, blob: BlobClient, data: bytes | memoryview, size: int, *, if_absent: bool
    ) -> Any:
        """Blocks of ``block_size`` staged in parallel under ids unique to this upload (so
        concurrent writers of one blob never mix blocks), then one Put Block List."""
        view = memoryview(data).cast("B")
        step = self.settings.block_size
        starts = list(range(0, size, step))
        if len(starts) > 1 and size - starts[-1] < step // 2:
            # a short tail rides with the block before it: a pack just over 16 MiB is two
            # blocks, not three (a block may be up to 4000 MiB)
            starts.pop()
        ends = [*starts[1:], size]
        upload = uuid.uuid4().hex
        ids = [
            base64.b64encode(f"{upload}-{n:06d}".encode("ascii")).decode("ascii")
            for n in range(len(starts))
        ]

        def stage(index: int) -> None:
            blob.stage_block(ids[index], bytes(view[starts[index] : ends[index]]))

        if self._pool is not None and len(ids) > 1:
            list(self._pool.map(stage, range(len(ids))))
        else:
            for index in range(len(ids)):
                stage(index)
        kwargs: dict[str, Any] = {}
        if if_absent:
            kwargs = {"match_condition": MatchConditions.IfMissing}  # If-None-Match: *
        return blob.commit_block_list([BlobBlock(block_id=i) for i in ids], **kwargs)

    def get(self, key: str, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        blob = self.blob(key)
        for attempt in range(_READ_ATTEMPTS):
            try:
                if length is None and offset == 0:
                    stream = blob.download_blob(max_concurrency=1)
                else:
                    stream = blob.download_blob(offset=offset, length=length, max_concurrency=1)
                return stream.readall()
            except ResourceNotFoundError:
                raise ObjectNotFound(name, provider="azure", region=self.region) from None
            except ResourceModifiedError as exc:
                # overwritten between two ranged requests of one download: read it again
                if attempt == _READ_ATTEMPTS - 1:
                    raise self.error(exc, f"cannot get {key!r}") from None
            except HttpResponseError as exc:
                if error_status(exc) == 416 or error_code(exc) == "InvalidRange":
                    self.head(key, name)  # the range starts at or past the end
                    return b""
                raise self.error(exc, f"cannot get {key!r}") from None
            except AzureError as exc:
                raise self.error(exc, f"cannot get {key!r}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def head(self, key: str, name: str, *, version_id: str | None = None) -> Any:
        try:
            return self.blob(key).get_blob_properties(version_id=version_id)
        except ResourceNotFoundError:
            raise ObjectNotFound(name, provider="azure", region=self.region) from None
        except AzureError as exc:
            raise self.error(exc, f"cannot read the properties of {key!r}") from None

    def list(self, prefix: str, *, include: list[str] | None = None) -> Iterator[Any]:
        pages = self.client.list_blobs(
            name_starts_with=prefix or None,
            include=include,
            results_per_page=self.settings.list_page_size,
        ).by_page()
        try:
            for _page, items in zip(range(_MAX_PAGES), pages, strict=False):
                yield from items
        except AzureError as exc:
            raise self.error(exc, f"cannot list {prefix!r}") from None

    def delete(self, key: str, name: str) -> None:
        """Delete the blob (and its snapshots); absent is fine."""
        try:
            self.blob(key).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            refusal = self.locked(exc, name, "delete")
            if refusal is not None:
                raise refusal from None
            raise self.error(exc, f"cannot delete {key!r}") from None


def _info(name: str, props: Any) -> ObjectInfo:
    """ObjectInfo from a BlobProperties (of a head or of a listing)."""
    policy = getattr(props, "immutability_policy", None)
    until = getattr(policy, "expiry_time", None) if policy is not None else None
    mode = getattr(policy, "policy_mode", None) if policy is not None else None
    retention: RetentionMode | None = None
    if until is not None and mode:
        retention = (
            RetentionMode.COMPLIANCE if str(mode).lower() == "locked" else RetentionMode.GOVERNANCE
        )
    modified = getattr(props, "last_modified", None)
    return ObjectInfo(
        name=name,
        size=int(getattr(props, "size", 0) or 0),
        modified=_utc(modified) if modified is not None else _now(),
        retain_until=_utc(until) if until is not None else None,
        retention_mode=retention,
        legal_hold=bool(getattr(props, "has_legal_hold", False)),
        etag=_etag(getattr(props, "etag", None)),
    )


def refusal(info: ObjectInfo, *, bypass_governance: bool) -> str | None:
    """Why the blob behind ``info`` may not be removed or replaced now, or None."""
    return Protection.of(info).refuses_removal(_now(), bypass_governance=bypass_governance)


class AzureVault(Vault):
    """One region's blob container (under an optional name prefix)."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: BlobSettings,
        container: Callable[[str], ContainerClient],
        capabilities: Capabilities,
    ) -> None:
        super().__init__(provider="azure", region=region.name, capabilities=capabilities)
        settings.need_account(region, "vault")
        self.container_name = settings.container
        self.prefix = settings.prefix
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.upload_concurrency, thread_name_prefix="rv-blob-block"
        )
        self._blobs = BlobContainer(
            client=container(settings.container),
            settings=settings,
            region=region.name,
            error=VaultError,
            pool=self._pool,
        )
        self._vault_id: str | None = None
        self._id_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def _ready(self) -> BlobContainer:
        self._blobs.ensure(create=self._settings.create)
        return self._blobs

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise VaultError(
                f"bad object name {name!r}: {problem}", provider="azure", region=self.region
            )
        key = self.prefix + name
        if len(key) > 1024:
            raise VaultError(
                f"object name {name[:60]!r}... is longer than Blob Storage's 1024-character limit",
                provider="azure",
                region=self.region,
            )
        if key.startswith(RESERVED_PREFIX):
            raise VaultError(
                f"object name {name!r} lies in a name space the azure provider reserves "
                f"({RESERVED_PREFIX})",
                provider="azure",
                region=self.region,
            )
        return key

    def _check(self, name: str, operation: str, offset: int, length: int | None) -> None:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise VaultError(
                f"{operation} {name!r}: bad offset {offset!r}", provider="azure", region=self.region
            )
        if length is not None and (not isinstance(length, int) or length < 0):
            raise VaultError(
                f"{operation} {name!r}: bad length {length!r}", provider="azure", region=self.region
            )

    # ------------------------------------------------------------------ Vault

    @property
    def vault_id(self) -> str:
        """A random id made once per container and prefix and kept in the container
        (if-absent), so every process and every later run sees the same one."""
        if self._vault_id is None:
            with self._id_lock:
                if self._vault_id is None:
                    self._vault_id = self._load_vault_id()
        return self._vault_id

    def _load_vault_id(self) -> str:
        blobs = self._ready()
        key = f"{RESERVED_PREFIX}{self.prefix}vault-id"
        return establish_vault_id(
            lambda: blobs.get(key, key),
            lambda made: blobs.put(key, key, made, if_absent=True),
            provider="azure",
            region=self.region,
        )

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        key = self._key(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise VaultError(
                f"put {name!r}: data must be bytes, got {type(data).__name__}",
                provider="azure",
                region=self.region,
            )
        blobs = self._ready()
        if self._settings.immutability and not if_absent:
            # the framework promises that a locked object is not replaced either
            with contextlib.suppress(ObjectNotFound):
                why = refusal(_info(name, blobs.head(key, name)), bypass_governance=False)
                if why is not None:
                    raise RetentionLocked(
                        name,
                        f"{why}; it cannot be overwritten",
                        provider="azure",
                        region=self.region,
                    )
        answer = blobs.put(key, name, data, if_absent=if_absent)
        modified = answer.get("last_modified") if isinstance(answer, dict) else None
        return ObjectInfo(
            name=name,
            size=_size(data),
            modified=_utc(modified) if isinstance(modified, datetime) else _now(),
            etag=_etag(answer.get("etag") if isinstance(answer, dict) else None),
        )

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        self._check(name, "get", offset, length)
        if length == 0:
            self.head(name)
            return b""
        return self._ready().get(key, name, offset=offset, length=length)

    def head(self, name: str) -> ObjectInfo:
        return _info(name, self._ready().head(self._key(name), name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise VaultError(
                f"bad list prefix {prefix!r}: {problem}", provider="azure", region=self.region
            )
        include = ["immutabilitypolicy", "legalhold"] if self._settings.immutability else None
        cut = len(self.prefix)
        for item in self._ready().list(self.prefix + prefix, include=include):
            key = str(item.name)
            if key.startswith(RESERVED_PREFIX):
                continue
            yield _info(key[cut:], item)

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        """Remove the blob. With ``immutability`` (a versioned account) remove it for good:
        check the current version and every earlier one for a policy in force or a hold
        (refusing the whole delete if one is protected), lift bypassed governance policies,
        delete the blob, then each earlier version by id."""
        key = self._key(name)
        blobs = self._ready()
        if not self._settings.immutability:
            blobs.delete(key, name)
            return
        versions: builtins.list[tuple[str | None, ObjectInfo]] = []
        with contextlib.suppress(ObjectNotFound):
            versions.append((None, _info(name, blobs.head(key, name))))
        versions.extend((v, _info(name, item)) for v, item in self._earlier_versions(blobs, key))
        for version, info in versions:
            why = refusal(info, bypass_governance=bypass_governance)
            if why is not None:
                which = "" if version is None else f" (its version {version})"
                raise RetentionLocked(
                    name,
                    f"{why}{which}; it cannot be deleted",
                    provider="azure",
                    region=self.region,
                )
        for version, info in versions:
            if info.retain_until is not None and info.retain_until > _now():
                # an Unlocked (governance) policy, bypassed: remove it, then the blob
                self._lift_policy(blobs, key, name, version)
        blobs.delete(key, name)
        # deleting the current version made it an earlier one: list them again
        for version, _item in self._earlier_versions(blobs, key):
            try:
                blobs.blob(key).delete_blob(version_id=version)
            except ResourceNotFoundError:
                continue
            except AzureError as exc:
                locked = blobs.locked(exc, name, "delete a version of")
                if locked is not None:
                    raise locked from None
                raise blobs.error(exc, f"cannot delete version {version} of {key!r}") from None

    def _earlier_versions(self, blobs: BlobContainer, key: str) -> builtins.list[tuple[str, Any]]:
        """``(version id, properties)`` of the versions of exactly ``key`` that are not the
        current one (none where the account keeps no versions, as in Azurite)."""
        include = ["versions", "immutabilitypolicy", "legalhold"]
        return [
            (str(item.version_id), item)
            for item in blobs.list(key, include=include)
            if item.name == key and item.version_id and not item.is_current_version
        ]

    def _lift_policy(self, blobs: BlobContainer, key: str, name: str, version: str | None) -> None:
        client = blobs.client.get_blob_client(key, version_id=version)
        try:
            client.delete_immutability_policy()
        except AzureError as exc:
            locked = blobs.locked(exc, name, "remove the policy of")
            if locked is not None:
                raise locked from None
            raise blobs.error(exc, f"cannot remove the immutability policy of {key!r}") from None

    def _locking(self, operation: str) -> BlobContainer:
        if not self._settings.immutability:
            raise self.unsupported(f"{operation} (set immutability = true for this region)")
        return self._ready()

    def set_retention(
        self,
        name: str,
        until: datetime,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        *,
        bypass_governance: bool = False,
    ) -> ObjectInfo:
        blobs = self._locking("set_retention")
        key = self._key(name)
        if not isinstance(until, datetime) or until.tzinfo is None:
            raise VaultError(
                f"set_retention {name!r}: until must be a timezone-aware datetime, got {until!r}",
                provider="azure",
                region=self.region,
            )
        mode = RetentionMode(mode)
        current = _info(name, blobs.head(key, name))
        why = Protection.of(current).refuses_change(
            until, mode, _now(), bypass_governance=bypass_governance
        )
        if why is not None:
            raise RetentionLocked(name, why, provider="azure", region=self.region)
        policy = ImmutabilityPolicy(
            expiry_time=until.astimezone(UTC),
            policy_mode="Locked" if mode is RetentionMode.COMPLIANCE else "Unlocked",
        )
        try:
            blobs.blob(key).set_immutability_policy(policy)
        except ResourceNotFoundError:
            raise ObjectNotFound(name, provider="azure", region=self.region) from None
        except AzureError as exc:
            locked = blobs.locked(exc, name, "change the retention of")
            if locked is not None:
                raise locked from None
            raise blobs.error(exc, f"cannot set the immutability policy of {key!r}") from None
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
        blobs = self._locking("set_legal_hold")
        key = self._key(name)
        current = _info(name, blobs.head(key, name))
        try:
            blobs.blob(key).set_legal_hold(bool(on))
        except ResourceNotFoundError:
            raise ObjectNotFound(name, provider="azure", region=self.region) from None
        except AzureError as exc:
            raise blobs.error(exc, f"cannot set the legal hold of {key!r}") from None
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
        with contextlib.suppress(AzureError):
            self._blobs.client.close()
