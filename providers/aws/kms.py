"""KeyService and Sealer on AWS KMS: one symmetric KMS key per region.

Data keys come from GenerateDataKey and are unwrapped with Decrypt, both bound to the
encryption context. Another region seals for this one with KMS Encrypt on this region's key
(its role needs kms:Encrypt only); only this region's Decrypt opens it. A reserved context
entry, ``regionvault:purpose``, keeps wrapped data keys and sealed secrets apart, so one can
never be opened as the other, and lets a key policy allow Encrypt for sealing alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from regionvault.core.errors import ConfigError, KeyAccessDenied, KeyServiceError, RegionVaultError
from regionvault.core.interfaces import (
    PURPOSE_KEY,
    KeyService,
    Sealer,
    purpose_context,
)
from regionvault.core.types import Capabilities, DataKey
from regionvault.providers.aws.errors import aws_error, error_code, error_message

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.settings import AwsSettings

__all__ = ["PURPOSE_KEY", "AwsKeyService", "AwsSealer"]

#: reserved encryption-context key; callers' contexts may not use it
_DATA_KEY = "data-key"
#: tag a rotation puts on the new key, naming the key it replaced (the region's earlier keys)
_PREVIOUS_TAG = "regionvault:previous-key"
_SEAL = "seal"
MAX_SECRET = 1024

#: KMS answers meaning "this key cannot open that": another region's or key's ciphertext,
#: another context, forged bytes, or a key this role may not use
_DENIED = frozenset(
    {
        "AccessDeniedException",
        "InvalidCiphertextException",
        "IncorrectKeyException",
        "NotFoundException",
        "InvalidKeyUsageException",
        "KMSInvalidStateException",
        "DisabledException",
    }
)


#: KMS answers to a Decrypt naming another key than the blob's (moto says AccessDenied)
_WRONG_KEY = frozenset({"IncorrectKeyException", "AccessDeniedException"})


def _arn_place(arn: str) -> tuple[str, ...] | None:
    """``(partition, region, account)`` of a KMS key ARN, None for anything else."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "kms":
        return None
    if not parts[5].startswith("key/") or not all(parts[1:5:2]) or not parts[3]:
        return None
    return parts[1], parts[3], parts[4]


def _same_place(arn: str, current: str) -> bool:
    """Whether ``arn`` is a KMS key ARN of the same partition, region and account as
    ``current``."""
    place = _arn_place(arn)
    return place is not None and place == _arn_place(current)


def _unrotatable(meta: Mapping[str, Any]) -> str | None:
    """Why a key cannot be rotated by making a new AWS_KMS key like it, or None."""
    origin = meta.get("Origin", "AWS_KMS")
    if origin != "AWS_KMS":
        return f"its key material's origin is {origin} (imported or external), not AWS_KMS"
    if meta.get("CustomKeyStoreId"):
        return f"it lives in custom key store {meta['CustomKeyStoreId']}"
    if meta.get("MultiRegion"):
        return "it is a multi-Region key"
    return None


def _context(context: Mapping[str, str], purpose: str, region: str) -> dict[str, str]:
    return purpose_context(context, purpose, provider="aws", region=region)


class AwsSealer(Sealer):
    """Seals for one region with KMS Encrypt on that region's key: needs kms:Encrypt only."""

    def __init__(self, *, settings: AwsSettings, clients: ClientFactory) -> None:
        super().__init__(region=settings.region)
        if settings.kms_key is None:  # checked by the provider; kept for direct use
            raise ConfigError("kms_key missing", region=settings.region)
        self._key = settings.kms_key
        self._settings = settings
        self._clients = clients

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        if not isinstance(secret, bytes | bytearray | memoryview):
            raise KeyServiceError("a sealed secret must be bytes", region=self.region)
        if len(secret) > MAX_SECRET:
            raise KeyServiceError(
                f"secret of {len(secret)} bytes is over the {MAX_SECRET}-byte seal limit",
                region=self.region,
            )
        kms = self._clients.client(self._settings, "kms")
        try:
            answer = kms.encrypt(
                KeyId=self._key,
                Plaintext=bytes(secret),
                EncryptionContext=_context(context, _SEAL, self.region),
            )
        except ClientError as exc:
            code = error_code(exc)
            err = KeyAccessDenied if code in _DENIED else KeyServiceError
            raise aws_error(
                exc,
                f"cannot seal for this region with KMS key {self._key}: {error_message(exc)}",
                err,
                region=self.region,
                service="kms",
            ) from None
        except BotoCoreError as exc:
            message = f"KMS Encrypt failed: {error_message(exc)}"
            raise aws_error(
                exc, message, KeyServiceError, region=self.region, service="kms"
            ) from None
        return bytes(answer["CiphertextBlob"])


class AwsKeyService(KeyService):
    """One region's KMS key: envelope data keys, unsealing, rotation."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: AwsSettings,
        clients: ClientFactory,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(provider="aws", region=region.name, capabilities=capabilities)
        self._config = region
        self._settings = settings
        self._key = settings.need(region, "kms_key", "key service")
        self._clients = clients
        self._lock = threading.Lock()
        self._arn: str | None = None
        #: this region's earlier keys, newest first (None: not read yet)
        self._previous: list[str] | None = None
        #: keys this KeyService knows to be older than its current one (it rotated away from
        #: them, or followed the alias past them): never made current again
        self._older: set[str] = set()

    # ------------------------------------------------------------------ helpers

    @property
    def _kms(self) -> Any:
        return self._clients.client(self._settings, "kms")

    def _error(self, exc: BaseException, what: str) -> RegionVaultError:
        code = error_code(exc)
        err = KeyAccessDenied if code in _DENIED else KeyServiceError
        return aws_error(
            exc,
            f"{what} with KMS key {self._arn or self._key}: {error_message(exc)}",
            err,
            region=self.region,
            service="kms",
        )

    def _resolve(self) -> str:
        """The key's ARN; with ``create = true`` the key (and alias) are made if missing."""
        if self._arn is not None:
            return self._arn
        with self._lock:
            if self._arn is None:
                self._arn = self._describe_or_create()
            return self._arn

    def _describe_or_create(self) -> str:
        kms = self._kms
        try:
            return str(kms.describe_key(KeyId=self._key)["KeyMetadata"]["Arn"])
        except ClientError as exc:
            if error_code(exc) != "NotFoundException" or not self._settings.create:
                raise self._error(exc, "cannot find the region's key") from None
        except BotoCoreError as exc:
            raise self._error(exc, "cannot reach KMS") from None
        if not self._key.startswith("alias/"):
            raise self._config.error(
                "kms_key", "create = true makes a key only for an alias/<name>, not an id or ARN"
            )
        try:
            made = kms.create_key(
                Description=f"regionvault master key of {self.region}",
                KeyUsage="ENCRYPT_DECRYPT",
                KeySpec="SYMMETRIC_DEFAULT",
                Tags=[{"TagKey": "regionvault:region", "TagValue": self.region}],
            )["KeyMetadata"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot create the region's key") from None
        try:
            kms.create_alias(AliasName=self._key, TargetKeyId=made["KeyId"])
        except ClientError as exc:
            if error_code(exc) != "AlreadyExistsException":
                raise self._error(exc, f"cannot create alias {self._key}") from None
            # another process made the alias first: use its key, retire ours
            kms.schedule_key_deletion(KeyId=made["KeyId"], PendingWindowInDays=7)
            return str(kms.describe_key(KeyId=self._key)["KeyMetadata"]["Arn"])
        return str(made["Arn"])

    def _previous_keys(self) -> list[str]:
        """This region's earlier keys, newest first: each key a rotation made names the one
        it replaced in its tag ``regionvault:previous-key`` (one ListResourceTags per key,
        once per KeyService)."""
        if self._previous is None:
            chain: list[str] = []
            key = self._resolve()
            for _hop in range(1000):  # one key per rotation; bounded against a tag loop
                try:
                    tags = self._kms.list_resource_tags(KeyId=key).get("Tags", [])
                except (ClientError, BotoCoreError) as exc:
                    raise self._error(exc, "cannot read the key's tags") from None
                found = {t["TagKey"]: t["TagValue"] for t in tags}.get(_PREVIOUS_TAG)
                if not found or found in chain or found == self._resolve():
                    break
                if not _same_place(found, self._resolve()):
                    # the tag is mutable: only a key of this account and region is ever
                    # named as a Decrypt KeyId
                    break
                chain.append(found)
                key = found
            self._previous = chain
        return self._previous

    # ------------------------------------------------------------------ KeyService

    @property
    def key_id(self) -> str:
        """The ARN of the region's current key (the one its alias names)."""
        return self._resolve()

    def _known_older(self, key: str) -> bool:
        with self._lock:
            return key in self._older or (self._previous is not None and key in self._previous)

    def _follow(self, used: str) -> None:
        """The alias named ``used``: make it current unless it is a key known to be older
        (an alias change still propagating answers with the previous key for a while)."""
        with self._lock:
            old = self._arn
            if used == old or used in self._older:
                return
            if self._previous is not None and used in self._previous:
                return
            if old is not None:
                self._older.add(old)
            self._arn, self._previous = used, None

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        arn = self._resolve()
        ctx = _context(context, _DATA_KEY, self.region)
        # by alias when there is one: a rotation in another process moves it, and new data
        # keys must follow it at once (the answer names the key that was used)
        target = self._key if self._key.startswith("alias/") else arn
        try:
            answer = self._kms.generate_data_key(
                KeyId=target, KeySpec="AES_256", EncryptionContext=ctx
            )
            used = str(answer.get("KeyId") or arn)
            if used != arn and self._known_older(used):
                # the alias still resolves to a key this KeyService has moved past (KMS is
                # eventually consistent after UpdateAlias): generate under the current key
                answer = self._kms.generate_data_key(
                    KeyId=arn, KeySpec="AES_256", EncryptionContext=ctx
                )
                used = str(answer.get("KeyId") or arn)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot generate a data key") from None
        if used != arn:
            self._follow(used)
        return DataKey(
            plaintext=bytes(answer["Plaintext"]),
            wrapped=bytes(answer["CiphertextBlob"]),
            key_id=used,
        )

    def _decrypt(self, blob: bytes, context: dict[str, str], what: str) -> bytes:
        """Decrypt naming the current key; a blob of an earlier key of this region (a
        rotation's predecessor, while it is enabled) is decrypted naming that key. KeyId is
        always given, so another region's or account's key is never used."""
        arn = self._resolve()
        if not isinstance(blob, bytes | bytearray | memoryview) or not blob:
            raise KeyAccessDenied(f"{what}: empty or not bytes", provider="aws", region=self.region)
        try:
            return self._decrypt_with(arn, blob, context)
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) not in _WRONG_KEY:
                raise self._error(exc, f"cannot {what}") from None
            first: BaseException = exc
        # another process may have rotated since the alias was resolved here: the blob may
        # be under the newer key the alias names now (one DescribeKey)
        newer = self._describe_alias()
        if newer is not None and newer != arn and not self._known_older(newer):
            self._follow(newer)
            try:
                return self._decrypt_with(newer, blob, context)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) not in _WRONG_KEY:
                    raise self._error(exc, f"cannot {what}") from None
        # read only once the current key has refused: an earlier key of this region?
        for key in self._previous_keys():
            try:
                return self._decrypt_with(key, blob, context)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) not in _WRONG_KEY:
                    raise self._error(exc, f"cannot {what} with earlier key {key}") from None
        raise self._error(first, f"cannot {what}") from None

    def _describe_alias(self) -> str | None:
        """The key the alias names now (None: no alias, or KMS cannot tell)."""
        if not self._key.startswith("alias/"):
            return None
        try:
            return str(self._kms.describe_key(KeyId=self._key)["KeyMetadata"]["Arn"])
        except (ClientError, BotoCoreError, KeyError):
            return None

    def _decrypt_with(self, key: str, blob: bytes, context: dict[str, str]) -> bytes:
        answer = self._kms.decrypt(CiphertextBlob=bytes(blob), EncryptionContext=context, KeyId=key)
        return bytes(answer["Plaintext"])

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self._decrypt(wrapped, _context(context, _DATA_KEY, self.region), "unwrap")

    def sealer(self) -> AwsSealer:
        return AwsSealer(settings=self._settings, clients=self._clients)

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        self._resolve()  # with create = true, the key exists before sealing by alias
        return self.sealer().seal(secret, context)

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        return self._decrypt(sealed, _context(context, _SEAL, self.region), "unseal")

    def rotate(self) -> str:
        """A new KMS key becomes current: made like the current one (description, usage,
        spec, key policy, tags, plus ``regionvault:previous-key`` naming the current key),
        then the region's alias is moved to it (UpdateAlias). The old key stays enabled, so
        what it wrapped still opens until the caller has re-wrapped it (``rotate-keys``) and
        disables it. Needs kms:CreateKey, GetKeyPolicy, ListResourceTags, TagResource and
        UpdateAlias: an administrator's permissions, not the backup role's (docs/aws.md)."""
        if not self._key.startswith("alias/"):
            raise self._config.error(
                "kms_key",
                "rotation moves the region's alias to a new key: name the key by its "
                "alias/<name>, not a key id or ARN",
            )
        old = self._resolve()
        kms = self._kms
        try:
            meta = kms.describe_key(KeyId=old)["KeyMetadata"]
            policy = kms.get_key_policy(KeyId=old, PolicyName="default")["Policy"]
            tags = [
                t
                for t in kms.list_resource_tags(KeyId=old).get("Tags", [])
                if t["TagKey"] != _PREVIOUS_TAG
            ]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot read the current key to rotate it") from None
        refused = _unrotatable(meta)
        if refused is not None:
            raise self._config.error(
                "kms_key",
                f"rotate-keys makes an AWS_KMS key like the current one and cannot copy {old}: "
                f'{refused}; rotate it yourself (docs/aws.md, "Rotating keys")',
            )
        try:
            made = kms.create_key(
                Description=meta.get("Description") or f"regionvault master key of {self.region}",
                KeyUsage=meta.get("KeyUsage", "ENCRYPT_DECRYPT"),
                KeySpec=meta.get("KeySpec", "SYMMETRIC_DEFAULT"),
                Policy=policy,
                Tags=[*tags, {"TagKey": _PREVIOUS_TAG, "TagValue": old}],
            )["KeyMetadata"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot create the new key") from None
        try:
            kms.update_alias(AliasName=self._key, TargetKeyId=made["KeyId"])
        except (ClientError, BotoCoreError) as exc:
            # the new key is unused: retire it, the alias still names the old one
            with contextlib.suppress(ClientError, BotoCoreError):
                kms.schedule_key_deletion(KeyId=made["KeyId"], PendingWindowInDays=7)
            raise self._error(exc, f"cannot move alias {self._key} to the new key") from None
        with self._lock:
            self._older.add(old)
            self._arn = str(made["Arn"])
            self._previous = None
        return self._arn
