"""KeyService and Sealer on AWS KMS: one symmetric KMS key per region.

Data keys come from GenerateDataKey and are unwrapped with Decrypt, both bound to the
encryption context. Another region seals for this one with KMS Encrypt on this region's key
(its role needs kms:Encrypt only); only this region's Decrypt opens it. A reserved context
entry, ``regionvault:purpose``, keeps wrapped data keys and sealed secrets apart, so one can
never be opened as the other, and lets a key policy allow Encrypt for sealing alone.
"""

from __future__ import annotations

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
        self._rotations: int | None = None

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

    def _rotation_count(self, arn: str) -> int:
        if self._rotations is None:
            count = 0
            token: str | None = None
            try:
                for _page in range(10_000):
                    kwargs: dict[str, Any] = {"KeyId": arn}
                    if token:
                        kwargs["Marker"] = token
                    answer = self._kms.list_key_rotations(**kwargs)
                    # the first key material may be listed too, without a RotationDate
                    count += sum(1 for r in answer.get("Rotations", []) if r.get("RotationDate"))
                    token = answer.get("NextMarker")
                    if not answer.get("Truncated") or not token:
                        break
            except ClientError as exc:
                if error_code(exc) != "UnsupportedOperationException":
                    raise self._error(exc, "cannot list key rotations") from None
            self._rotations = count
        return self._rotations

    # ------------------------------------------------------------------ KeyService

    @property
    def key_id(self) -> str:
        """``<key ARN>#v<n>``: the KMS key and how many times its material was rotated."""
        arn = self._resolve()
        return f"{arn}#v{self._rotation_count(arn)}"

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        arn = self._resolve()
        ctx = _context(context, _DATA_KEY, self.region)
        try:
            answer = self._kms.generate_data_key(
                KeyId=arn, KeySpec="AES_256", EncryptionContext=ctx
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot generate a data key") from None
        return DataKey(
            plaintext=bytes(answer["Plaintext"]),
            wrapped=bytes(answer["CiphertextBlob"]),
            key_id=self.key_id,
        )

    def _decrypt(self, blob: bytes, context: dict[str, str], what: str) -> bytes:
        arn = self._resolve()
        if not isinstance(blob, bytes | bytearray | memoryview) or not blob:
            raise KeyAccessDenied(f"{what}: empty or not bytes", provider="aws", region=self.region)
        try:
            answer = self._kms.decrypt(
                CiphertextBlob=bytes(blob), EncryptionContext=context, KeyId=arn
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"cannot {what}") from None
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
        """Rotate the key's material on demand (KMS keeps the old material for Decrypt)."""
        arn = self._resolve()
        before = self._rotation_count(arn)
        try:
            self._kms.rotate_key_on_demand(KeyId=arn)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "cannot rotate") from None
        # KMS rotates asynchronously; the listing may lag, so count our own rotation
        self._rotations = before + 1
        return self.key_id
