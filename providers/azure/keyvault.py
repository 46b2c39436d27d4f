"""KeyService and Sealer on Azure Key Vault: one RSA key (or Managed HSM RSA-HSM key) per
region, through azure-keyvault-keys.

Key Vault's RSA-OAEP-256 has no label or additional data, so the encryption context is bound
the way envelope formats do it (JWE's key wrap + AEAD): every wrap makes a fresh 256-bit key
``K``, wraps ``K`` with RSA-OAEP-256 under the region's key version, and encrypts the payload
(a data key, or a sealed secret) with AES-256-GCM under ``K`` with the envelope's header and
the canonical context as additional data. Opening asks Key Vault to unwrap ``K``
(``keys/unwrapKey``, the only call that needs the private key) and fails with
:class:`KeyAccessDenied` unless the context, the purpose and every byte are the ones that
were wrapped.

The envelope, all lengths big-endian::

    b"RVAZK1" | u8 n | key version (n ASCII bytes) | u16 m | RSA-OAEP-256(K) (m bytes)
              | nonce (12 bytes) | AES-256-GCM(K, nonce, payload, aad) (payload + 16 bytes)
    aad = everything before the nonce | b"\\0" | canonical JSON of context + purpose

Wrapping needs only the public key: the KeyService and every Sealer wrap locally through
``CryptographyClient.from_jwk`` with the key that ``keys/get`` returned, so another region
that seals for this one needs the Key Vault role "get" on this key and nothing else, and no
wrap is ever a Key Vault call. A reserved context entry, ``regionvault:purpose``, keeps data
keys and sealed secrets apart. Rotation makes a new key version (``keys/rotate``); the
envelope names its version, so material wrapped before still opens.

What binds the context is this provider's check after unwrapKey, not Key Vault: an identity
allowed unwrapKey on the key can recover ``K`` itself. Key isolation between regions holds
because each region's envelope can be opened only by its own key (another region's vault has
no such key version and answers 404, or RSA fails and it answers 400).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.envelope import Envelope, checked_secret, seal_envelope
from regionvault.core.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyServiceError,
    RegionVaultError,
    TransientError,
)
from regionvault.core.interfaces import (
    PURPOSE_KEY,
    KeyService,
    Sealer,
    context_bytes,
    purpose_context,
)
from regionvault.core.types import Capabilities, DataKey
from regionvault.providers.azure.identity import CredentialSettings, CredentialSource

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient, KeyVaultKey
    from regionvault.core.types import RegionConfig

__all__ = [
    "KEY_VAULT_SETTINGS",
    "MAGIC",
    "PURPOSE_KEY",
    "AzureKeyService",
    "AzureSealer",
    "KeyVaultSettings",
    "key_vault_error",
]

MAGIC = b"RVAZK1"
#: reserved encryption-context key; callers' contexts may not use it
_DATA_KEY = "data-key"
_SEAL = "seal"
_ALGORITHM = "RSA-OAEP-256"
_KEY_OPS = ["wrapKey", "unwrapKey"]

#: the site.toml keys this module reads, besides identity.py's
KEY_VAULT_SETTINGS = frozenset(
    {
        "key_vault_url",
        "key_name",
        "key_size",
        "hardware_protected",
        "create",
        "verify_challenge_resource",
        "sdk_retries",
        "connect_timeout",
        "read_timeout",
    }
)

# vault.azure.net, vault.azure.cn, managedhsm.azure.net, ...: one host, no path
#: how long a KeyService wraps under the key version it read before reading the current
#: version again (``keys/get``): a rotation made by another process is followed within this
#: bound (docs/azure.md, docs/commands.md "rotate-keys")
CURRENT_SECONDS = 60.0

_VAULT_URL = re.compile(r"^https://[^/\s?#]+/?$")
_KEY_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION = re.compile(r"^[0-9A-Za-z]{1,64}$")


# ---------------------------------------------------------------------- errors


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _code(exc: BaseException) -> str:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    return str(code) if code else ""


def _tls_failure(exc: BaseException) -> bool:
    """Whether a TLS handshake failed somewhere under ``exc`` (azure-core keeps the
    transport's error as ``inner_exception``; a login wraps it as the context)."""
    current: BaseException | None = exc
    for _depth in range(20):
        if current is None:
            return False
        name = type(current).__name__
        if "SSL" in name or "Certificate" in name:
            return True
        inner = getattr(current, "inner_exception", None)
        if isinstance(inner, BaseException):
            current = inner
        else:
            current = current.__cause__ or current.__context__
    return False


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    # a login error carries its endpoint's header itself (identity.WatchedCredential)
    value = getattr(exc, "retry_after", None)
    if value is None and headers is not None:
        value = headers.get("Retry-After")
    try:
        seconds = float(value or "")
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def _no_answer(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a request that got no answer (a
    login wraps its transport's error in ClientAuthenticationError)."""
    current: BaseException | None = exc
    for _depth in range(10):
        if current is None:
            return False
        if isinstance(current, ServiceRequestError | ServiceResponseError):
            return not _tls_failure(current)
        current = current.__cause__ or current.__context__
    return False


def _describe(exc: BaseException) -> str:
    """One line about ``exc`` without the SDK's message, which repeats the request."""
    status, code = _status(exc), _code(exc)
    login = isinstance(exc, ClientAuthenticationError) and getattr(exc, "response", None) is None
    if login:
        if _tls_failure(exc):
            return "login failed: TLS failure (check ca_file)"
        if _no_answer(exc):
            return "login failed: no answer from the login endpoint"
        return "login failed" + (f" (HTTP {status})" if status is not None else "")
    if status is not None:
        return f"{code or 'error'} (HTTP {status})"
    if isinstance(exc, ServiceRequestError):
        return "no connection to Key Vault" + (
            " (TLS failure: check ca_file)" if _tls_failure(exc) else ""
        )
    if isinstance(exc, ServiceResponseError):
        return "no complete answer from Key Vault (timeout or dropped connection)"
    return type(exc).__name__


def key_vault_error(
    exc: BaseException,
    message: str,
    *,
    region: str,
    denied: Callable[..., RegionVaultError] = KeyAccessDenied,
    other: Callable[..., RegionVaultError] = KeyServiceError,
) -> RegionVaultError:
    """The error to raise for an azure-core/azure-identity error ``exc``:

    - :class:`TransientError` for 429 and 5xx answers (but 501, 505) and for no answer
      (connection refused or dropped, connect or read timeout), except a TLS failure;
    - ``denied`` (:class:`KeyAccessDenied`) for 401 and 403 and a refused login (a login's
      status comes from identity.WatchedCredential: a throttled or failing login endpoint
      is transient like any other);
    - ``other`` (:class:`KeyServiceError`) for everything else.

    ``message`` names the operation, the vault and the key; :func:`_describe` of ``exc`` is
    appended, never the SDK's own text.
    """
    full = f"{message}: {_describe(exc)}"
    status = _status(exc)
    transient = False
    if isinstance(exc, ServiceRequestError | ServiceResponseError | ClientAuthenticationError):
        transient = _no_answer(exc)
    if status is not None and not transient:
        transient = status == 429 or (500 <= status <= 599 and status not in (501, 505))
    if transient:
        return TransientError(full, provider="azure", region=region, retry_after=_retry_after(exc))
    if status in (401, 403) or (
        isinstance(exc, ClientAuthenticationError) and not _tls_failure(exc)
    ):
        return denied(full, provider="azure", region=region)
    return other(full, provider="azure", region=region)


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class KeyVaultSettings:
    """One region's Key Vault settings (see docs/azure.md), checked without touching Azure."""

    region: str
    key_vault_url: str
    key_name: str
    identity: CredentialSettings
    key_size: int = 3072
    #: a key made with ``create = true`` is an RSA-HSM key (Key Vault Premium; always on a
    #: Managed HSM, whose URL turns it on by default)
    hardware_protected: bool = False
    create: bool = False
    verify_challenge_resource: bool = True
    sdk_retries: int = 5
    connect_timeout: int = 10
    read_timeout: int = 60

    @property
    def key_path(self) -> str:
        """``<vault URL>/keys/<name>``, naming the key in errors."""
        return f"{self.key_vault_url}/keys/{self.key_name}"

    @classmethod
    def from_region(cls, region: RegionConfig) -> KeyVaultSettings:
        s = region.settings

        def integer(key: str, default: int, low: int, high: int) -> int:
            value = s.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise region.error(key, f"must be an integer, got {value!r}")
            if not low <= value <= high:
                raise region.error(key, f"must be between {low} and {high}, got {value}")
            return value

        def boolean(key: str, default: bool) -> bool:
            value = s.get(key, default)
            if not isinstance(value, bool):
                raise region.error(key, f"must be true or false, got {value!r}")
            return value

        url = s.get("key_vault_url")
        if url is None:
            raise region.error("key_vault_url", "missing (the azure provider needs it for keys)")
        if not isinstance(url, str) or not _VAULT_URL.match(url):
            raise region.error(
                "key_vault_url",
                f"{url!r} is not a vault URL like https://<vault>.vault.azure.net",
            )
        name = s.get("key_name", "regionvault")
        if not isinstance(name, str) or not _KEY_NAME.match(name):
            raise region.error(
                "key_name", f"{name!r} is not a key name (1-127 letters, digits and '-')"
            )
        size = integer("key_size", 3072, 2048, 4096)
        if size not in (2048, 3072, 4096):
            raise region.error("key_size", f"must be 2048, 3072 or 4096, got {size}")
        managed_hsm = urlsplit(url).hostname or ""
        return cls(
            region=region.name,
            key_vault_url=url.rstrip("/"),
            key_name=name,
            identity=CredentialSettings.from_region(region),
            key_size=size,
            hardware_protected=boolean("hardware_protected", ".managedhsm." in f".{managed_hsm}"),
            create=boolean("create", False),
            verify_challenge_resource=boolean("verify_challenge_resource", True),
            sdk_retries=integer("sdk_retries", 5, 0, 20),
            connect_timeout=integer("connect_timeout", 10, 1, 600),
            read_timeout=integer("read_timeout", 60, 1, 3600),
        )

    def key_client(self, credentials: CredentialSource, **options: Any) -> KeyClient:
        """A KeyClient of this vault with the region's credential; ``options`` (a test's
        transport, say) go to azure-core."""
        from azure.keyvault.keys import KeyClient

        return KeyClient(
            self.key_vault_url,
            credentials.credential(self.identity),
            verify_challenge_resource=self.verify_challenge_resource,
            connection_verify=self.identity.connection_verify,
            retry_total=self.sdk_retries,
            connection_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            **options,
        )


# ---------------------------------------------------------------------- the envelope


def _context(context: Mapping[str, str], purpose: str, region: str) -> bytes:
    return context_bytes(purpose_context(context, purpose, provider="azure", region=region))


def _seal_with(key: KeyVaultKey, payload: bytes, context: bytes) -> bytes:
    """The envelope of ``payload`` under ``key``'s public half (no Key Vault call)."""
    public = CryptographyClient.from_jwk(key.key)
    version = str(key.properties.version).encode("ascii")

    def wrap(inner: bytes) -> bytes:
        return bytes(public.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, inner).encrypted_key)

    return seal_envelope(MAGIC, version, wrap, payload, context)


def _secret(secret: bytes, region: str) -> bytes:
    return checked_secret(secret, provider="azure", region=region)


def _envelope_version(envelope: Envelope) -> str | None:
    """The key version an envelope names, None when it is not one Key Vault could have."""
    try:
        version = envelope.key_ref.decode("ascii")
    except UnicodeDecodeError:
        return None
    return version if _VERSION.match(version) else None


def _check_key(key: KeyVaultKey, settings: KeyVaultSettings) -> None:
    """A key this provider can wrap with: RSA, enabled, allowing wrapKey and unwrapKey."""
    kty = str(getattr(key.key_type, "value", key.key_type))
    if kty not in ("RSA", "RSA-HSM"):
        raise ConfigError(
            f"key {settings.key_path} is {kty}, the azure provider needs an RSA key (RSA-OAEP-256)",
            key=f'regions."{settings.region}".key_name',
            region=settings.region,
        )
    ops = {str(getattr(op, "value", op)) for op in (key.key_operations or [])}
    missing = [op for op in _KEY_OPS if op not in ops]
    if missing:
        raise ConfigError(
            f"key {settings.key_path} does not permit {', '.join(missing)}",
            key=f'regions."{settings.region}".key_name',
            region=settings.region,
        )
    if not key.properties.version or not _VERSION.match(key.properties.version):
        raise KeyServiceError(
            f"Key Vault answered key {key.id!r} without a usable version",
            provider="azure",
            region=settings.region,
        )
    if key.properties.enabled is False:
        raise KeyServiceError(f"key {key.id} is disabled", provider="azure", region=settings.region)


def _created(key: KeyVaultKey) -> float:
    """When the key version was made (0 when Key Vault did not say)."""
    created = key.properties.created_on
    return 0.0 if created is None else created.timestamp()


def _get_or_create(client: KeyClient, settings: KeyVaultSettings) -> KeyVaultKey:
    """The key's current version; with ``create = true`` made first when it is missing
    (two processes racing make two versions, both valid: the later one is current)."""
    try:
        return client.get_key(settings.key_name)
    except ResourceNotFoundError:
        if not settings.create:
            raise KeyServiceError(
                f"key {settings.key_path} does not exist (create it, or set create = true "
                "for a test region)",
                provider="azure",
                region=settings.region,
            ) from None
    return client.create_rsa_key(
        settings.key_name,
        size=settings.key_size,
        key_operations=list(_KEY_OPS),
        hardware_protected=settings.hardware_protected,
        tags={"regionvault-region": settings.region},
    )


# ---------------------------------------------------------------------- services


class AzureSealer(Sealer):
    """Seals for one region with the public half of that region's Key Vault key: needs the
    role "get" on the key (``keys/get``, once), nothing else. With ``create = true`` (tests,
    dev) a key not made yet is made, as the region's own KeyService would."""

    def __init__(
        self,
        *,
        settings: KeyVaultSettings,
        credentials: CredentialSource,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(region=settings.region)
        self._settings = settings
        self._credentials = credentials
        self._options = dict(client_options or {})
        self._lock = threading.Lock()
        self._key: KeyVaultKey | None = None

    @classmethod
    def for_region(
        cls,
        region: RegionConfig,
        credentials: CredentialSource,
        client_options: Mapping[str, Any] | None = None,
    ) -> AzureSealer:
        """The Sealer of ``region``, from its settings alone (``Provider.sealer``)."""
        return cls(
            settings=KeyVaultSettings.from_region(region),
            credentials=credentials,
            client_options=client_options,
        )

    def _public_key(self) -> KeyVaultKey:
        with self._lock:
            if self._key is None:
                client = self._settings.key_client(self._credentials, **self._options)
                try:
                    key = _get_or_create(client, self._settings)
                except AzureError as exc:
                    raise key_vault_error(
                        exc,
                        f"cannot get the public key {self._settings.key_path} to seal for "
                        "this region",
                        region=self.region,
                    ) from None
                finally:
                    client.close()
                _check_key(key, self._settings)
                self._key = key
            return self._key

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        aad = _context(context, _SEAL, self.region)
        return _seal_with(self._public_key(), _secret(secret, self.region), aad)


class AzureKeyService(KeyService):
    """One region's Key Vault key: envelope data keys, unsealing, rotation by versions."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        credentials: CredentialSource,
        capabilities: Capabilities,
        settings: KeyVaultSettings | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(provider="azure", region=region.name, capabilities=capabilities)
        self.settings = settings or KeyVaultSettings.from_region(region)
        self._credentials = credentials
        self._options = dict(client_options or {})
        self._lock = threading.Lock()
        self._resolving = threading.Lock()
        self._client: KeyClient | None = None
        self._current: KeyVaultKey | None = None
        #: time.monotonic() when ``_current`` was read
        self._read_at = 0.0
        self._crypto: dict[str, CryptographyClient] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def client(self) -> KeyClient:
        with self._lock:
            if self._client is None:
                self._client = self.settings.key_client(self._credentials, **self._options)
            return self._client

    def _error(self, exc: AzureError, what: str) -> RegionVaultError:
        return key_vault_error(exc, f"{what} {self.settings.key_path}", region=self.region)

    def _current_key(self) -> KeyVaultKey:
        """The key's current version (its public half), read again when the one known is
        older than ``CURRENT_SECONDS`` (another process may have rotated); with ``create =
        true`` the key is made when the vault has none of that name."""
        with self._lock:
            current, read_at = self._current, self._read_at
        if current is not None and time.monotonic() - read_at <= CURRENT_SECONDS:
            return current
        # one read at a time: threads racing to a missing key would each make a version
        with self._resolving:
            with self._lock:
                current, read_at = self._current, self._read_at
            if current is not None and time.monotonic() - read_at <= CURRENT_SECONDS:
                return current
            try:
                key = _get_or_create(self.client, self.settings)
            except AzureError as exc:
                if current is not None:
                    # Key Vault cannot say now: the version known still wraps (it is
                    # current or was a moment ago); asked again on the next wrap
                    return current
                raise self._error(exc, "cannot get or create key") from None
            _check_key(key, self.settings)
            return self._adopt(key)

    def _adopt(self, key: KeyVaultKey) -> KeyVaultKey:
        """Make ``key`` the current version, unless it is older than the one known (a read
        that raced a rotation): the current version never moves back."""
        with self._lock:
            known = self._current
            if known is not None and key.id != known.id and _created(key) < _created(known):
                key = known
            self._current = key
            self._read_at = time.monotonic()
            return key

    def _unwrap_key(self, version: str, wrapped: bytes) -> bytes:
        """``keys/unwrapKey`` on one version of the key. A version's CryptographyClient (its
        first use also gets the version's public half) is kept once it has unwrapped, so
        versions named by foreign or forged envelopes are never kept."""
        with self._lock:
            crypto = self._crypto.get(version)
        fresh = crypto is None
        if crypto is None:
            crypto = self.client.get_cryptography_client(
                self.settings.key_name, key_version=version
            )
        inner = crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key
        if fresh:
            with self._lock:
                self._crypto.setdefault(version, crypto)
        return inner

    def _open(self, blob: bytes, context: bytes, what: str) -> bytes:
        if not isinstance(blob, bytes | bytearray | memoryview) or not blob:
            raise KeyAccessDenied(
                f"cannot {what} with key {self.settings.key_path}: empty or not bytes",
                provider="azure",
                region=self.region,
            )
        envelope = Envelope.parse(MAGIC, blob)
        version = None if envelope is None else _envelope_version(envelope)
        if envelope is None or version is None:
            raise KeyAccessDenied(
                f"cannot {what} with key {self.settings.key_path}: not an envelope of the "
                "azure provider",
                provider="azure",
                region=self.region,
            )
        try:
            inner = self._unwrap_key(version, envelope.wrapped_key)
        except AzureError as exc:
            # 404: no such version of this key (another region's material); 400: RSA-OAEP
            # failed (another key's, or altered): this key cannot open it
            status = _status(exc)
            err = key_vault_error(
                exc,
                f"cannot {what} with key {self.settings.key_path}/{version}",
                region=self.region,
                other=KeyAccessDenied if status in (400, 404) else KeyServiceError,
            )
            raise err from None
        opened = envelope.open(inner, context)
        if opened is None:
            raise KeyAccessDenied(
                f"cannot {what} with key {self.settings.key_path}/{version}: the "
                "encryption context differs or the bytes were altered",
                provider="azure",
                region=self.region,
            )
        return opened

    # ------------------------------------------------------------------ KeyService

    @property
    def key_id(self) -> str:
        """The current key version's id, ``<vault URL>/keys/<name>/<version>``."""
        return str(self._current_key().id)

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        aad = _context(context, _DATA_KEY, self.region)
        key = self._current_key()
        plaintext = AESGCM.generate_key(bit_length=256)
        wrapped = _seal_with(key, plaintext, aad)
        return DataKey(plaintext=plaintext, wrapped=wrapped, key_id=str(key.id))

    def wrapped_key_id(self, wrapped: bytes) -> str | None:
        """The id (as :attr:`key_id` says it) of the key version a wrapped data key names,
        None for anything else (verify's old-key warning)."""
        envelope = Envelope.parse(MAGIC, bytes(wrapped))
        version = None if envelope is None else _envelope_version(envelope)
        if version is None:
            return None
        return f"{str(self._current_key().id).rpartition('/')[0]}/{version}"

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self._open(wrapped, _context(context, _DATA_KEY, self.region), "unwrap")

    def sealer(self) -> AzureSealer:
        return AzureSealer(
            settings=self.settings, credentials=self._credentials, client_options=self._options
        )

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        aad = _context(context, _SEAL, self.region)
        return _seal_with(self._current_key(), _secret(secret, self.region), aad)

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        return self._open(sealed, _context(context, _SEAL, self.region), "unseal")

    def rotate(self) -> str:
        """A new version of the key (``keys/rotate``); older versions still unwrap."""
        self._current_key()
        try:
            key = self.client.rotate_key(self.settings.key_name)
        except AzureError as exc:
            raise self._error(exc, "cannot rotate key") from None
        _check_key(key, self.settings)
        return str(self._adopt(key).id)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._crypto.clear()
        if client is not None:
            client.close()
