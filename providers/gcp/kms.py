"""KeyService and Sealer on Cloud KMS: one key ring per region (``location``) holding two
keys, through the unmodified ``KeyManagementServiceClient`` (gRPC).

- Data keys: 256 random bits made here, wrapped by ``Encrypt`` on the symmetric key
  ``key_name`` (ENCRYPT_DECRYPT) with the encryption context as
  ``additional_authenticated_data``, unwrapped by ``Decrypt`` with the same; Cloud KMS's
  ciphertext names the key version itself. Rotation makes a new version of the key
  (``CreateCryptoKeyVersion``) and makes it primary (``UpdateCryptoKeyPrimaryVersion``): old
  versions still decrypt.
- Sealing (another region seals a secret for this one): hybrid with the public half of the
  newest ENABLED version of ``seal_key_name`` (ASYMMETRIC_DECRYPT,
  RSA_DECRYPT_OAEP_3072_SHA256): a fresh 256-bit key ``K`` is RSA-OAEP-encrypted locally,
  the secret is encrypted under ``K`` with AES-256-GCM, and only ``AsymmetricDecrypt`` on this
  region's key version recovers ``K``. The sealer needs
  ``cloudkms.cryptoKeyVersions.viewPublicKey`` and nothing else: without the ``list``
  permission it finds the newest version by asking ``GetPublicKey`` for version numbers
  (Cloud KMS numbers a key's versions 1, 2, 3... and never deletes one, so a doubling
  search then a bisection finds the newest in O(log n) calls; a version that is not ENABLED
  answers FAILED_PRECONDITION, one that does not exist NOT_FOUND).
- Every request carries the CRC32C of its data and every answer's CRC32C is checked
  (google-crc32c), as Google asks of KMS clients: an answer that fails the check, a
  request the service says it did not verify, or one it refuses because its checksum did
  not match (INVALID_ARGUMENT "The checksum in field ..."), is retried like a transient
  failure.
- A reserved context entry, ``regionvault:purpose``, keeps wrapped data keys and sealed
  secrets apart; the context is bound as canonical JSON.

The sealed envelope, all lengths big-endian::

    b"RVGS1" | u8 n | version number (n ASCII digits) | u16 m | RSA-OAEP-SHA256(K) (m bytes)
             | nonce (12 bytes) | AES-256-GCM(K, nonce, secret, aad) (secret + 16 bytes)
    aad = everything before the nonce | b"\\0" | canonical JSON of context + purpose

A wrapped data key is ``b"RVGK1" | Cloud KMS ciphertext``.

Isolation between regions: region B's Decrypt on its own key refuses A's ciphertext
(INVALID_ARGUMENT), and its AsymmetricDecrypt on the version number A's envelope names (of
B's own seal key: the envelope names a number, never a key) fails RSA-OAEP.

The client: with ``kms_plaintext`` (a fake on the loopback) through
``KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(kms_endpoint))``, else
TLS with the region's credentials and ``client_options={"api_endpoint": kms_endpoint}``
when one is set. The SDK's own retry is off (its default retries for up to a minute): each
call is tried ``sdk_retries`` more times after a transient failure, with a short backoff,
every attempt counted in the metrics as ``(region, "kms", <RPC name>)``. The one call that is
not idempotent, ``CreateCryptoKeyVersion``, is never retried: a late answer could mean the
version was made, and :meth:`GcpKeyService.rotate` run again promotes it instead of making
another. Credentials that are not valid (no token yet, or expired) are refreshed in Python
before a call, so that a refused login is :class:`KeyAccessDenied` (over gRPC, google-auth
runs in the channel's metadata plugin, whose failure would reach us as UNAVAILABLE).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import google_crc32c
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud.kms_v1 import KeyManagementServiceClient, types
from regionvault.core.envelope import MAX_SECRET, Envelope, checked_secret, seal_envelope
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

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.gcp.metrics import GcpMetrics
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = [
    "DATA_KEY_MAGIC",
    "MAX_SECRET",
    "PURPOSE_KEY",
    "SEAL_ALGORITHM",
    "SEAL_MAGIC",
    "GcpKeyService",
    "GcpSealer",
    "kms_error",
]

DATA_KEY_MAGIC = b"RVGK1"
SEAL_MAGIC = b"RVGS1"
#: reserved encryption-context key; callers' contexts may not use it
_DATA_KEY = "data-key"
_SEAL = "seal"
_RSA_BITS = 3072

_Purpose = types.CryptoKey.CryptoKeyPurpose
_State = types.CryptoKeyVersion.CryptoKeyVersionState
_Algorithm = types.CryptoKeyVersion.CryptoKeyVersionAlgorithm
SEAL_ALGORITHM = _Algorithm.RSA_DECRYPT_OAEP_3072_SHA256
_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)

#: version numbers are decimal; more than 10 digits is no Cloud KMS version
_VERSION = re.compile(r"^[1-9][0-9]{0,9}$")
#: a doubling search past 2**30 versions is no real key
_MAX_DOUBLINGS = 31
#: how many versions below the newest a sealer looks at for an ENABLED one
_MAX_WALK_DOWN = 100
#: a sealer asks again for the newest version after this many seconds
_SEALER_REFRESH = 3600.0
#: backoff between the provider's own retries of one call: base * 2**attempt, capped
_BACKOFF, _BACKOFF_CAP = 0.1, 2.0

#: gRPC status codes that may pass if the call is made again
_TRANSIENT = (
    gexc.ServiceUnavailable,  # UNAVAILABLE: no connection, or the service is overloaded
    gexc.DeadlineExceeded,
    gexc.ResourceExhausted,  # quota: Cloud KMS throttles per project and region
    gexc.Aborted,
    gexc.InternalServerError,
    auth_exc.TransportError,  # the token endpoint did not answer
)
#: the caller's identity may not do this
_DENIED = (gexc.PermissionDenied, gexc.Unauthenticated, auth_exc.RefreshError)

T = TypeVar("T")


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(bytes(data)))


class _Corrupt(Exception):
    """An answer failed its integrity check (or a request was not verified, or the service
    found the request's checksum did not match: it was damaged on the way)."""


#: how Cloud KMS begins the INVALID_ARGUMENT message for a request whose CRC32C field does
#: not match its data
_CHECKSUM_REFUSED = "The checksum in field"


# ---------------------------------------------------------------------- errors


def _describe(exc: BaseException) -> str:
    """One line about ``exc``: the gRPC status and the service's short message."""
    if isinstance(exc, gexc.GoogleAPICallError):
        code = exc.grpc_status_code
        name = code.name if code is not None else type(exc).__name__
        text = " ".join(str(exc.message or "").split())
        if len(text) > 200:
            text = text[:200] + "..."
        return f"{name}: {text}" if text else name
    if isinstance(exc, _Corrupt):
        return str(exc)
    return type(exc).__name__


def kms_error(
    exc: BaseException,
    message: str,
    *,
    region: str,
    denied: tuple[type[BaseException], ...] = (),
) -> RegionVaultError:
    """The error to raise for ``exc`` from the KMS client: :class:`TransientError` for
    UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, a token endpoint
    that did not answer, a login refresh google-auth calls retryable, and answers (or
    requests) that kept failing their CRC32C check; :class:`KeyAccessDenied` for
    PERMISSION_DENIED, UNAUTHENTICATED, a refused login (a RefreshError that is not
    retryable: a revoked key, a deleted service account, invalid_grant) and the
    ``denied`` errors (what "this key cannot open that" looks like for the call);
    :class:`KeyServiceError` for the rest. ``message`` names the operation and the key."""
    full = f"{message}: {_describe(exc)}"
    if isinstance(exc, auth_exc.RefreshError):
        full = f"{message}: login refused: {' '.join(str(exc).split())[:200]}"
        if exc.retryable:
            return TransientError(full, provider="gcp", region=region)
        return KeyAccessDenied(full, provider="gcp", region=region)
    if isinstance(exc, (*_TRANSIENT, _Corrupt)):
        return TransientError(full, provider="gcp", region=region)
    if isinstance(exc, _DENIED + denied):
        return KeyAccessDenied(full, provider="gcp", region=region)
    return KeyServiceError(full, provider="gcp", region=region)


# ---------------------------------------------------------------------- the client


class _Kms:
    """One region's KMS client (made on first use), its calls retried and counted."""

    def __init__(self, region: str, settings: GcpSettings, credentials: Any, metrics: GcpMetrics):
        self.region = region
        self.settings = settings
        self._credentials = credentials
        self._metrics = metrics
        self._lock = threading.Lock()
        self._login = threading.Lock()
        self._client: KeyManagementServiceClient | None = None

    @property
    def client(self) -> KeyManagementServiceClient:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> KeyManagementServiceClient:
        endpoint = self.settings.kms_endpoint
        if self.settings.kms_plaintext:
            # settings.py allows plaintext only to a loopback endpoint (a fake)
            import grpc
            from google.cloud.kms_v1.services.key_management_service.transports import (
                KeyManagementServiceGrpcTransport,
            )

            assert endpoint is not None
            channel = grpc.insecure_channel(endpoint)
            return KeyManagementServiceClient(
                transport=KeyManagementServiceGrpcTransport(channel=channel)
            )
        options = {"api_endpoint": endpoint} if endpoint else None
        return KeyManagementServiceClient(credentials=self._credentials, client_options=options)

    def _refresh(self) -> None:
        """Refresh credentials that are not valid before a call, here rather than in the
        gRPC metadata plugin, which would turn a refused login into UNAVAILABLE. Raises
        google-auth's RefreshError (a refused login) or TransportError (no answer)."""
        client = self.client
        # the transport may hold its own copy (a service account's self-signed JWT twin)
        credentials = getattr(client.transport, "_credentials", None) or self._credentials
        if credentials is None or credentials.valid:
            return
        with self._login:
            if not credentials.valid:
                from google.auth.transport.requests import Request

                credentials.refresh(Request())

    def call(
        self,
        rpc: str,
        method: Callable[..., T],
        request: Any,
        check: Callable[[T], None] | None = None,
        *,
        idempotent: bool = True,
    ) -> T:
        """``method(request=request)``, retried ``sdk_retries`` times after a transient
        failure, an answer failing ``check`` or a request the service found damaged (never
        when not ``idempotent``: a late answer may hide a call that took effect); every
        attempt is recorded."""
        size = type(request).pb(request).ByteSize()
        attempts = self.settings.sdk_retries + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                self._refresh()
                self._metrics.record(self.region, "kms", rpc, size)
                try:
                    answer = method(request=request, retry=None, timeout=self.settings.timeout)
                except gexc.InvalidArgument as exc:
                    if not str(exc.message or "").startswith(_CHECKSUM_REFUSED):
                        raise
                    # the request was damaged on the way: sent again, it may pass
                    raise _Corrupt(f"Cloud KMS refused the request: {_describe(exc)}") from exc
                if check is not None:
                    check(answer)
                return answer
            except (*_TRANSIENT, _Corrupt):
                if attempt + 1 >= attempts:
                    raise
            except auth_exc.RefreshError as exc:
                if not exc.retryable or attempt + 1 >= attempts:
                    raise
            time.sleep(min(_BACKOFF * 2**attempt, _BACKOFF_CAP))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.transport.close()  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------- helpers


def _context(context: Mapping[str, str], purpose: str, region: str) -> bytes:
    return context_bytes(purpose_context(context, purpose, provider="gcp", region=region))


def _seal_with(version: str, public_key: rsa.RSAPublicKey, secret: bytes, context: bytes) -> bytes:
    return seal_envelope(
        SEAL_MAGIC, version.encode("ascii"), lambda k: public_key.encrypt(k, _OAEP), secret, context
    )


def _envelope_version(envelope: Envelope) -> str | None:
    """The version number an envelope names, None when it is none Cloud KMS could have."""
    try:
        version = envelope.key_ref.decode("ascii")
    except UnicodeDecodeError:
        return None
    return version if _VERSION.match(version) else None


def _version_number(name: str) -> int:
    """N of ``.../cryptoKeyVersions/N`` (0 when it is not a number)."""
    number = name.rpartition("/")[2]
    return int(number) if number.isdigit() else 0


def _config_error(settings: GcpSettings, key: str, message: str) -> ConfigError:
    return ConfigError(
        message, key=f'regions."{settings.region}".{key}', provider="gcp", region=settings.region
    )


def _create_key_ring(kms: _Kms) -> None:
    settings = kms.settings
    request = types.CreateKeyRingRequest(
        parent=f"projects/{settings.project}/locations/{settings.location}",
        key_ring_id=settings.key_ring,
        key_ring=types.KeyRing(),
    )
    try:
        kms.call("CreateKeyRing", kms.client.create_key_ring, request)
    except gexc.AlreadyExists:
        pass
    except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
        raise kms_error(
            exc, f"cannot create key ring {settings.key_ring_path}", region=kms.region
        ) from None


def _get_or_create_key(kms: _Kms, name: str, purpose: int) -> types.CryptoKey:
    """The CryptoKey ``name`` of the region's key ring; with ``create = true`` made (and
    its key ring) when missing. Two processes racing make one key: the loser gets it."""
    settings = kms.settings
    path = settings.key_path(name)
    setting = "key_name" if purpose == _Purpose.ENCRYPT_DECRYPT else "seal_key_name"
    get = types.GetCryptoKeyRequest(name=path)
    try:
        key = kms.call("GetCryptoKey", kms.client.get_crypto_key, get)
    except gexc.NotFound:
        if not settings.create:
            raise KeyServiceError(
                f"key {path} does not exist (create it, see docs/gcp.md, or set "
                "create = true for a test region)",
                provider="gcp",
                region=kms.region,
            ) from None
        key = _create_key(kms, name, purpose)
    except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
        raise kms_error(exc, f"cannot get key {path}", region=kms.region) from None
    else:
        if settings.create and purpose == _Purpose.ASYMMETRIC_DECRYPT:
            # another process (or gcloud) may have made it a moment ago, or our own
            # CreateCryptoKey's answer was lost: its first version may still be generating
            _wait_while_generating(kms, f"{path}/cryptoKeyVersions/1")
    if key.purpose != purpose:
        raise _config_error(
            settings,
            setting,
            f"key {path} has purpose {_Purpose(key.purpose).name}, the gcp provider needs "
            f"{_Purpose(purpose).name}",
        )
    if purpose == _Purpose.ASYMMETRIC_DECRYPT and key.version_template.algorithm != SEAL_ALGORITHM:
        raise _config_error(
            settings,
            setting,
            f"key {path} makes {_Algorithm(key.version_template.algorithm).name} versions, "
            f"the gcp provider needs {_Algorithm(SEAL_ALGORITHM).name}",
        )
    return key


def _create_key(kms: _Kms, name: str, purpose: int) -> types.CryptoKey:
    settings = kms.settings
    path = settings.key_path(name)
    algorithm = (
        _Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
        if purpose == _Purpose.ENCRYPT_DECRYPT
        else SEAL_ALGORITHM
    )
    request = types.CreateCryptoKeyRequest(
        parent=settings.key_ring_path,
        crypto_key_id=name,
        crypto_key=types.CryptoKey(
            purpose=purpose,
            version_template=types.CryptoKeyVersionTemplate(
                algorithm=algorithm, protection_level=types.ProtectionLevel.SOFTWARE
            ),
            labels={"regionvault-region": re.sub(r"[^a-z0-9_-]", "-", kms.region.lower())},
        ),
    )
    for _attempt in range(2):
        try:
            key = kms.call("CreateCryptoKey", kms.client.create_crypto_key, request)
        except gexc.NotFound:
            _create_key_ring(kms)  # the key ring is missing: make it, then the key
        except gexc.AlreadyExists:
            # another process won the race (or our own lost answer made it)
            try:
                key = kms.call(
                    "GetCryptoKey",
                    kms.client.get_crypto_key,
                    types.GetCryptoKeyRequest(name=path),
                )
            except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
                raise kms_error(exc, f"cannot get key {path}", region=kms.region) from None
            if purpose == _Purpose.ASYMMETRIC_DECRYPT:
                _wait_while_generating(kms, f"{path}/cryptoKeyVersions/1")
            return key
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise kms_error(exc, f"cannot create key {path}", region=kms.region) from None
        else:
            if purpose == _Purpose.ASYMMETRIC_DECRYPT:
                # Cloud KMS generates an asymmetric version asynchronously: the key is
                # ready for sealers once its first version is ENABLED
                _wait_until_enabled(kms, f"{path}/cryptoKeyVersions/1")
            return key
    raise KeyServiceError(
        f"cannot create key {path}: its key ring {settings.key_ring_path} vanished",
        provider="gcp",
        region=kms.region,
    )


def _check_public_key(name: str) -> Callable[[types.PublicKey], None]:
    def check(answer: types.PublicKey) -> None:
        if answer.pem_crc32c != crc32c(answer.pem.encode("ascii")):
            raise _Corrupt(f"the public key of {name} failed its CRC32C check")
        if answer.name and answer.name != name:
            raise _Corrupt(f"asked for the public key of {name}, got {answer.name}")

    return check


def _load_public_key(settings: GcpSettings, name: str, answer: types.PublicKey) -> rsa.RSAPublicKey:
    if answer.algorithm != SEAL_ALGORITHM:
        raise _config_error(
            settings,
            "seal_key_name",
            f"key version {name} is {_Algorithm(answer.algorithm).name}, the gcp provider "
            f"seals with {_Algorithm(SEAL_ALGORITHM).name}",
        )
    try:
        key = serialization.load_pem_public_key(answer.pem.encode("ascii"))
    except ValueError:
        key = None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != _RSA_BITS:
        raise KeyServiceError(
            f"Cloud KMS answered a public key of {name} that is not RSA-{_RSA_BITS}",
            provider="gcp",
            region=settings.region,
        )
    return key


# ---------------------------------------------------------------------- the sealer


class GcpSealer(Sealer):
    """Seals for one region with the public half of the newest ENABLED version of that
    region's ASYMMETRIC_DECRYPT key: needs ``cloudkms.cryptoKeyVersions.viewPublicKey`` on it
    (``GetPublicKey``), nothing else. With ``create = true`` (tests, first set-up) a seal key
    not made yet is made, as the region's own KeyService would."""

    def __init__(self, *, settings: GcpSettings, kms: _Kms, owns_client: bool = False) -> None:
        super().__init__(region=settings.region)
        self._settings = settings
        self._kms = kms
        self._owns_client = owns_client
        self._lock = threading.Lock()
        self._current: tuple[str, rsa.RSAPublicKey] | None = None
        self._fetched = 0.0

    @classmethod
    def for_region(
        cls,
        region: RegionConfig,
        settings: GcpSettings,
        credentials: Any,
        metrics: GcpMetrics,
    ) -> GcpSealer:
        """The Sealer of ``region`` from its settings alone (``Provider.sealer``)."""
        kms = _Kms(region.name, settings, credentials, metrics)
        return cls(settings=settings, kms=kms, owns_client=True)

    def close(self) -> None:
        """Close the gRPC channel of a sealer made by :meth:`for_region` (one handed out by
        a KeyService shares the KeyService's, which closes it)."""
        if self._owns_client:
            self._kms.close()

    @property
    def key_path(self) -> str:
        return self._settings.key_path(self._settings.seal_key_name)

    def _probe(self, number: int) -> types.PublicKey | bool:
        """The public key of version ``number``; True when the version exists but is not
        ENABLED, False when it does not exist."""
        name = f"{self.key_path}/cryptoKeyVersions/{number}"
        request = types.GetPublicKeyRequest(name=name)
        try:
            return self._kms.call(
                "GetPublicKey", self._kms.client.get_public_key, request, _check_public_key(name)
            )
        except gexc.NotFound:
            return False
        except gexc.FailedPrecondition:
            return True
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise kms_error(
                exc,
                f"cannot get the public key {name} to seal for this region",
                region=self.region,
            ) from None

    def _newest(self) -> tuple[str, types.PublicKey] | None:
        """The newest ENABLED version's number and public key; None when the key has no
        version at all (or does not exist)."""
        seen: dict[int, types.PublicKey | bool] = {}
        low, high = 0, 1  # version ``low`` exists (0: none known), ``high`` is to be asked
        for _doubling in range(_MAX_DOUBLINGS):
            seen[high] = self._probe(high)
            if seen[high] is False:
                break
            low, high = high, high * 2
        else:
            raise KeyServiceError(
                f"key {self.key_path} answers for every version number asked",
                provider="gcp",
                region=self.region,
            )
        while high - low > 1:  # bisect: ``low`` exists, ``high`` does not
            middle = (low + high) // 2
            seen[middle] = self._probe(middle)
            if seen[middle] is False:
                high = middle
            else:
                low = middle
        if low == 0:
            return None
        for number in range(low, max(0, low - _MAX_WALK_DOWN), -1):
            answer = seen[number] if number in seen else self._probe(number)
            if isinstance(answer, types.PublicKey):
                return str(number), answer
        # a sealer cannot tell a version still generating (RSA takes seconds) from a
        # disabled one: both answer FAILED_PRECONDITION; the first passes if asked again
        raise TransientError(
            f"key {self.key_path} has no ENABLED version among its newest {_MAX_WALK_DOWN}: "
            f"the newest, {low}, may still be generating (if every version is disabled, "
            "enable one or rotate)",
            provider="gcp",
            region=self.region,
        )

    def public_key(self) -> tuple[str, rsa.RSAPublicKey]:
        """The version number sealed to and its public key (asked again hourly)."""
        with self._lock:
            if self._current is not None and time.monotonic() - self._fetched < _SEALER_REFRESH:
                return self._current
            found = self._newest()
            if found is None and self._settings.create:
                _get_or_create_key(
                    self._kms, self._settings.seal_key_name, _Purpose.ASYMMETRIC_DECRYPT
                )
                found = self._newest()
            if found is None:
                raise KeyServiceError(
                    f"key {self.key_path} does not exist or has no version to seal to",
                    provider="gcp",
                    region=self.region,
                )
            number, answer = found
            name = f"{self.key_path}/cryptoKeyVersions/{number}"
            self._current = (number, _load_public_key(self._settings, name, answer))
            self._fetched = time.monotonic()
            return self._current

    def forget(self) -> None:
        """Ask for the newest version again on the next seal (after a rotation)."""
        with self._lock:
            self._current = None

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        aad = _context(context, _SEAL, self.region)
        plain = checked_secret(secret, provider="gcp", region=self.region)
        number, public_key = self.public_key()
        return _seal_with(number, public_key, plain, aad)


def _wait_until_enabled(kms: _Kms, name: str) -> None:
    """Poll a new asymmetric version (Cloud KMS generates it asynchronously) until it is
    ENABLED, every ``poll_interval`` up to ``operation_timeout`` seconds."""
    request = types.GetCryptoKeyVersionRequest(name=name)
    polls = max(1, int(kms.settings.operation_timeout / kms.settings.poll_interval))
    state = _State.CRYPTO_KEY_VERSION_STATE_UNSPECIFIED
    for _poll in range(polls + 1):
        try:
            version = kms.call("GetCryptoKeyVersion", kms.client.get_crypto_key_version, request)
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise kms_error(exc, f"cannot get key version {name}", region=kms.region) from None
        state = version.state
        if state == _State.ENABLED:
            return
        if state != _State.PENDING_GENERATION:
            break
        time.sleep(kms.settings.poll_interval)
    raise KeyServiceError(
        f"key version {name} is {_State(state).name}, not ENABLED",
        provider="gcp",
        region=kms.region,
    )


def _wait_while_generating(kms: _Kms, name: str) -> None:
    """Poll the version ``name`` while it is PENDING_GENERATION (a key made a moment ago
    elsewhere), up to ``operation_timeout`` seconds; any other state, or a version that is
    missing or may not be read, ends the wait (the caller's own checks name what is wrong)."""
    request = types.GetCryptoKeyVersionRequest(name=name)
    polls = max(1, int(kms.settings.operation_timeout / kms.settings.poll_interval))
    for _poll in range(polls + 1):
        try:
            version = kms.call("GetCryptoKeyVersion", kms.client.get_crypto_key_version, request)
        except (gexc.NotFound, gexc.PermissionDenied):
            return
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise kms_error(exc, f"cannot get key version {name}", region=kms.region) from None
        if version.state != _State.PENDING_GENERATION:
            return
        time.sleep(kms.settings.poll_interval)
    raise TransientError(
        f"key version {name} is still PENDING_GENERATION after "
        f"{kms.settings.operation_timeout:g} s",
        provider="gcp",
        region=kms.region,
    )


# ---------------------------------------------------------------------- the key service


class GcpKeyService(KeyService):
    """One region's Cloud KMS keys: envelope data keys under the symmetric key, unsealing
    with the asymmetric one, rotation by new primary versions."""

    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: GcpSettings,
        credentials: Any,
        capabilities: Capabilities,
        metrics: GcpMetrics,
    ) -> None:
        super().__init__(provider="gcp", region=region.name, capabilities=capabilities)
        self.settings = settings
        self._kms = _Kms(region.name, settings, credentials, metrics)
        self._lock = threading.Lock()
        self._resolving = threading.Lock()
        self._primary: str | None = None
        self._checked = False
        self._sealer: GcpSealer | None = None

    @property
    def key_path(self) -> str:
        return self.settings.key_path(self.settings.key_name)

    @property
    def seal_key_path(self) -> str:
        return self.settings.key_path(self.settings.seal_key_name)

    @property
    def client(self) -> KeyManagementServiceClient:
        """The KMS client (for tests and tools)."""
        return self._kms.client

    def _error(self, exc: BaseException, what: str, **kwargs: Any) -> RegionVaultError:
        return kms_error(exc, what, region=self.region, **kwargs)

    def _missing(self, path: str) -> KeyServiceError:
        return KeyServiceError(
            f"key {path} does not exist (create it, see docs/gcp.md, or set create = true "
            "for a test region)",
            provider="gcp",
            region=self.region,
        )

    def _exists(self, path: str) -> bool:
        """Whether the CryptoKey ``path`` exists (after a NOT_FOUND that may name a version
        only): True when it cannot be told."""
        request = types.GetCryptoKeyRequest(name=path)
        try:
            self._kms.call("GetCryptoKey", self._kms.client.get_crypto_key, request)
        except gexc.NotFound:
            return False
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt):
            return True
        return True

    def _keys(self) -> types.CryptoKey:
        """Both keys checked (with ``create = true`` made, with their key ring, when
        missing); the symmetric key as Cloud KMS has it now."""
        key = _get_or_create_key(self._kms, self.settings.key_name, _Purpose.ENCRYPT_DECRYPT)
        _get_or_create_key(self._kms, self.settings.seal_key_name, _Purpose.ASYMMETRIC_DECRYPT)
        return key

    def _unpromoted(self, key: types.CryptoKey) -> types.CryptoKeyVersion | None:
        """The newest version of ``key`` newer than its primary that is ENABLED or still
        generating: one a rotation made whose answer was lost, or that stopped before
        promoting it. None when there is none."""
        primary = key.primary.name.rpartition("/")[2]
        number = int(primary) if primary.isdigit() else 0
        found: types.CryptoKeyVersion | None = None
        for newer in range(number + 1, number + 1 + _MAX_WALK_DOWN):
            name = f"{self.key_path}/cryptoKeyVersions/{newer}"
            request = types.GetCryptoKeyVersionRequest(name=name)
            try:
                version = self._kms.call(
                    "GetCryptoKeyVersion", self._kms.client.get_crypto_key_version, request
                )
            except gexc.NotFound:
                break
            if version.state in (_State.ENABLED, _State.PENDING_GENERATION):
                found = version
        return found

    def _made(self) -> None:
        """With ``create = true``, make the keys before their first use here, whatever
        state their primary is in."""
        if not self.settings.create or self._known():
            return
        with self._resolving:
            if self._known():
                return
            self._keys()
            with self._lock:
                self._checked = True

    def _known(self) -> bool:
        """Whether the keys were checked (or made) here already."""
        with self._lock:
            return self._checked or self._primary is not None

    def _resolve(self) -> str:
        """The symmetric key's primary version; on first use both keys are checked (and
        with ``create = true`` made, with their key ring, when missing)."""
        with self._lock:
            primary = self._primary
        if primary is not None:
            return primary
        # one first use at a time: threads racing to a missing key would each try to make it
        with self._resolving:
            with self._lock:
                if self._primary is not None:
                    return self._primary
            key = self._keys()
            if not key.primary.name or key.primary.state != _State.ENABLED:
                state = _State(key.primary.state).name if key.primary.name else "missing"
                raise KeyServiceError(
                    f"key {self.key_path} has no ENABLED primary version ({state})",
                    provider="gcp",
                    region=self.region,
                )
            with self._lock:
                self._primary = key.primary.name
            return key.primary.name

    # ------------------------------------------------------------------ KeyService

    @property
    def key_id(self) -> str:
        """The symmetric key's primary version, ``projects/.../cryptoKeyVersions/N``."""
        return self._resolve()

    def _adopt(self, version: str) -> None:
        """Make ``version`` the cached primary unless it is older than the cached one: an
        Encrypt by key name may use the previous primary while a change propagates
        (cloud.google.com/kms/docs/consistency)."""
        with self._lock:
            if self._primary is None or _version_number(version) > _version_number(self._primary):
                self._primary = version

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        aad = _context(context, _DATA_KEY, self.region)
        primary = self._resolve()
        plaintext = AESGCM.generate_key(bit_length=256)
        answer = self._encrypt(self.key_path, plaintext, aad)
        if _version_number(answer.name) < _version_number(primary):
            # Cloud KMS used a version older than the primary this KeyService knows (a
            # primary change still propagating): encrypt with the known primary by name
            answer = self._encrypt(primary, plaintext, aad)
        # the version Cloud KMS used is the primary now (another process may have rotated)
        self._adopt(answer.name)
        return DataKey(
            plaintext=plaintext, wrapped=DATA_KEY_MAGIC + answer.ciphertext, key_id=answer.name
        )

    def _encrypt(self, name: str, plaintext: bytes, aad: bytes) -> types.EncryptResponse:
        """Encrypt ``plaintext`` with the key (its primary) or one version of it, by name."""
        request = types.EncryptRequest(
            name=name,
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=crc32c(aad),
        )

        def check(answer: types.EncryptResponse) -> None:
            if not answer.verified_plaintext_crc32c:
                raise _Corrupt("Cloud KMS did not verify the plaintext's CRC32C")
            if not answer.verified_additional_authenticated_data_crc32c:
                raise _Corrupt("Cloud KMS did not verify the additional data's CRC32C")
            if answer.ciphertext_crc32c != crc32c(answer.ciphertext):
                raise _Corrupt("the ciphertext failed its CRC32C check")

        try:
            answer = self._kms.call("Encrypt", self._kms.client.encrypt, request, check)
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise self._error(exc, f"cannot wrap a data key with key {name}") from None
        if not answer.name.startswith(self.key_path + "/cryptoKeyVersions/") or (
            name != self.key_path and answer.name != name
        ):
            raise KeyServiceError(
                f"Cloud KMS encrypted with {answer.name!r}, not {name}",
                provider="gcp",
                region=self.region,
            )
        return answer

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        aad = _context(context, _DATA_KEY, self.region)
        if (
            not isinstance(wrapped, bytes | bytearray | memoryview)
            or not bytes(wrapped).startswith(DATA_KEY_MAGIC)
            or len(wrapped) <= len(DATA_KEY_MAGIC)
        ):
            raise KeyAccessDenied(
                f"cannot unwrap with key {self.key_path}: not a data key wrapped by the gcp "
                "provider",
                provider="gcp",
                region=self.region,
            )
        ciphertext = bytes(wrapped)[len(DATA_KEY_MAGIC) :]
        # no _resolve(): Decrypt needs no primary, and one that is not ENABLED (an
        # administrator disabled the newest version) must not stop older versions decrypting
        self._made()
        request = types.DecryptRequest(
            name=self.key_path,
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext),
            additional_authenticated_data=aad,
            additional_authenticated_data_crc32c=crc32c(aad),
        )

        def check(answer: types.DecryptResponse) -> None:
            if answer.plaintext_crc32c != crc32c(answer.plaintext):
                raise _Corrupt("the plaintext failed its CRC32C check")

        try:
            answer = self._kms.call("Decrypt", self._kms.client.decrypt, request, check)
        except gexc.NotFound:
            raise self._missing(self.key_path) from None
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            # INVALID_ARGUMENT: another key's ciphertext, altered bytes or another context;
            # FAILED_PRECONDITION: its version is disabled or destroyed
            raise self._error(
                exc,
                f"cannot unwrap with key {self.key_path}",
                denied=(gexc.InvalidArgument, gexc.FailedPrecondition),
            ) from None
        if len(answer.plaintext) != 32:
            raise KeyAccessDenied(
                f"cannot unwrap with key {self.key_path}: not a 256-bit data key",
                provider="gcp",
                region=self.region,
            )
        return bytes(answer.plaintext)

    def sealer(self) -> GcpSealer:
        return GcpSealer(settings=self.settings, kms=self._kms)

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        with self._lock:
            sealer = self._sealer
        if sealer is None:
            self._resolve()  # with create = true, the keys exist before sealing
            sealer = self.sealer()
            with self._lock:
                self._sealer = sealer = self._sealer or sealer
        return sealer.seal(secret, context)

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        aad = _context(context, _SEAL, self.region)
        envelope = Envelope.parse(SEAL_MAGIC, sealed)
        version = None if envelope is None else _envelope_version(envelope)
        if envelope is None or version is None:
            raise KeyAccessDenied(
                f"cannot unseal with key {self.seal_key_path}: not a secret sealed by the gcp "
                "provider",
                provider="gcp",
                region=self.region,
            )
        # no _resolve(), as for unwrap: AsymmetricDecrypt names its version itself
        self._made()
        name = f"{self.seal_key_path}/cryptoKeyVersions/{version}"
        request = types.AsymmetricDecryptRequest(
            name=name,
            ciphertext=envelope.wrapped_key,
            ciphertext_crc32c=crc32c(envelope.wrapped_key),
        )

        def check(answer: types.AsymmetricDecryptResponse) -> None:
            if not answer.verified_ciphertext_crc32c:
                raise _Corrupt("Cloud KMS did not verify the ciphertext's CRC32C")
            if answer.plaintext_crc32c != crc32c(answer.plaintext):
                raise _Corrupt("the plaintext failed its CRC32C check")

        try:
            answer = self._kms.call(
                "AsymmetricDecrypt", self._kms.client.asymmetric_decrypt, request, check
            )
        except gexc.NotFound as exc:
            if not self._exists(self.seal_key_path):
                raise self._missing(self.seal_key_path) from None
            raise self._error(
                exc, f"cannot unseal with key {name}", denied=(gexc.NotFound,)
            ) from None
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            # NOT_FOUND: this key has no such version (another region's envelope);
            # INVALID_ARGUMENT: RSA-OAEP failed (another key's, or altered);
            # FAILED_PRECONDITION: the version is disabled or destroyed
            raise self._error(
                exc,
                f"cannot unseal with key {name}",
                denied=(gexc.NotFound, gexc.InvalidArgument, gexc.FailedPrecondition),
            ) from None
        opened = envelope.open(bytes(answer.plaintext), aad)
        if opened is None:
            raise KeyAccessDenied(
                f"cannot unseal with key {name}: the encryption context differs or the bytes "
                "were altered",
                provider="gcp",
                region=self.region,
            )
        return opened

    def rotate(self) -> str:
        """A new version of the symmetric key made primary (older versions still decrypt),
        and a new version of the seal key (sealers use it once it is ENABLED; secrets sealed
        to older versions still open). Returns the new primary version.

        Resumable: ``CreateCryptoKeyVersion`` is not idempotent, so it is never retried; a
        version newer than the primary that is ENABLED (or generating), left by a rotation
        whose answer was lost or that stopped before promoting it, is promoted instead of
        making another. A rotation that failed at the seal key, run again, makes one more
        symmetric version."""
        with self._resolving:
            key = self._keys()  # as Cloud KMS has it now: another process may have rotated
        create = types.CreateCryptoKeyVersionRequest(
            parent=self.key_path, crypto_key_version=types.CryptoKeyVersion()
        )
        try:
            version = self._unpromoted(key)
            if version is None:
                version = self._kms.call(
                    "CreateCryptoKeyVersion",
                    self._kms.client.create_crypto_key_version,
                    create,
                    idempotent=False,
                )
            if version.state != _State.ENABLED:  # an HSM key's version may still be made
                _wait_until_enabled(self._kms, version.name)
            number = version.name.rpartition("/")[2]
            promote = types.UpdateCryptoKeyPrimaryVersionRequest(
                name=self.key_path, crypto_key_version_id=number
            )
            key = self._kms.call(
                "UpdateCryptoKeyPrimaryVersion",
                self._kms.client.update_crypto_key_primary_version,
                promote,
            )
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise self._error(exc, f"cannot rotate key {self.key_path}") from None
        if key.primary.name != version.name:
            raise KeyServiceError(
                f"cannot rotate key {self.key_path}: its primary is {key.primary.name}, not "
                f"the new {version.name}",
                provider="gcp",
                region=self.region,
            )
        with self._lock:
            self._primary = version.name
        seal = types.CreateCryptoKeyVersionRequest(
            parent=self.seal_key_path, crypto_key_version=types.CryptoKeyVersion()
        )
        try:
            self._kms.call(
                "CreateCryptoKeyVersion",
                self._kms.client.create_crypto_key_version,
                seal,
                idempotent=False,
            )
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, _Corrupt) as exc:
            raise self._error(
                exc,
                f"rotated key {self.key_path} to {version.name}, but cannot add a version to "
                f"seal key {self.seal_key_path}",
            ) from None
        with self._lock:
            sealer = self._sealer
        if sealer is not None:
            sealer.forget()
        return version.name

    def close(self) -> None:
        self._kms.close()
