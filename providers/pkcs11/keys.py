"""KeyService and Sealer on a PKCS#11 token (python-pkcs11; SoftHSMv2 in tests).

- Data keys: 256 random bits from the token's generator, wrapped by ``C_Encrypt`` with
  CKM_AES_GCM under the region's current AES-256 key, an object of the token that is
  sensitive and not extractable, labelled ``<prefix>-<n>``; the encryption context (with
  ``regionvault:purpose``) is the GCM additional authenticated data. Rotation makes a key
  ``<prefix>-<n+1>``: the wrapped key names its version, so older keys still unwrap.
- Sealing (another region seals a secret for this one): hybrid with the region's RSA public
  key, exported from the token into a PEM file that other regions configure
  (``public_key``): a fresh 256-bit key ``K`` is RSA-OAEP-encrypted (SHA-1 and MGF1-SHA-1:
  SoftHSM 2.6 does OAEP with SHA-1 only), the secret encrypted under ``K`` with AES-256-GCM,
  the context as AAD. Only ``C_Decrypt`` with the private key, which never leaves the token,
  recovers ``K``; the AES-GCM step of an unseal runs in this process.

Envelopes, all lengths big-endian::

    wrapped data key: b"RVPK1" | u8 n | version (n ASCII digits) | nonce (12) | GCM(dk) (48)
        aad = everything before the nonce | b"\\0" | canonical JSON of context + purpose
    sealed secret:    core/envelope.py's, magic b"RVPS2", the key reference the seal key's id

The seal key's CKA_ID is the first 16 bytes of SHA-256 of its public key (DER): the envelope
names it, and the unsealing token finds its private key by it.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from regionvault.core.envelope import NONCE as _NONCE
from regionvault.core.envelope import TAG as _TAG
from regionvault.core.envelope import Envelope
from regionvault.core.errors import ConfigError, KeyAccessDenied, KeyServiceError
from regionvault.core.interfaces import KeyService, context_bytes, purpose_context
from regionvault.core.types import Capabilities, DataKey
from regionvault.providers.pkcs11.sealing import (
    _KEY_ID,
    MAX_SECRET,
    SEAL_MAGIC,
    Pkcs11Sealer,
    public_key_id,
    seal_context,
)

if TYPE_CHECKING:
    from regionvault.providers.pkcs11.settings import Pkcs11Settings

__all__ = [
    "DATA_KEY_MAGIC",
    "MAX_SECRET",
    "SEAL_MAGIC",
    "Pkcs11KeyService",
    "Pkcs11Sealer",
    "load_library",
    "public_key_id",
]

DATA_KEY_MAGIC = b"RVPK1"
_DATA_KEY = "data-key"
_RSA_BITS = 3072
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


def _aad(header: bytes, context: Mapping[str, str], region: str) -> bytes:
    """A wrapped data key's AAD: its header, a zero byte, the canonical context."""
    purposed = purpose_context(context, _DATA_KEY, provider="pkcs11", region=region)
    return header + b"\0" + context_bytes(purposed)


#: one loaded module per path: a process initialises a PKCS#11 module once
_LIBRARIES: dict[str, Any] = {}
_LIBRARIES_LOCK = threading.Lock()
_CONF: list[str] = []


def load_library(settings: Pkcs11Settings) -> tuple[Any, str]:
    """The PKCS#11 module the settings name (SoftHSM's by default), loaded once a process.
    ``softhsm_conf`` becomes SOFTHSM2_CONF before the first load; SoftHSM reads it once, so
    a process cannot use two different ones. Returns the module and its resolved path."""
    from regionvault.providers.pkcs11.softhsm import find_module

    module = settings.module or find_module()
    if module is None:
        raise settings.error("module", "no PKCS#11 module given and SoftHSM's is not installed")
    with _LIBRARIES_LOCK:
        if settings.softhsm_conf is not None:
            conf = str(settings.softhsm_conf)
            if _CONF and _CONF[0] != conf:
                raise settings.error(
                    "softhsm_conf",
                    f"this process already loaded SoftHSM with {_CONF[0]}; SoftHSM reads its "
                    "configuration once a process",
                )
            if not _CONF:
                os.environ["SOFTHSM2_CONF"] = conf
                _CONF.append(conf)
        lib = _LIBRARIES.get(str(module))
        if lib is None:
            try:
                lib = pkcs11.lib(str(module))
            except (RuntimeError, OSError, p11.PKCS11Error) as exc:
                raise settings.error("module", f"cannot load {module}: {exc}") from None
            _LIBRARIES[str(module)] = lib
        return lib, str(module.resolve())


class _SharedSession:
    """The one logged-in session of a process on one token. PKCS#11 logins are per token and
    application, not per session: a second ``C_Login`` fails (USER_ALREADY_LOGGED_IN) and
    closing a session logs every session of the token out; so the KeyServices of a process
    on one token share one session, closed when the last one closes. Calls on it are
    serialised (``lock``)."""

    _open: ClassVar[dict[tuple[str, str], _SharedSession]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: tuple[str, str], session: Any) -> None:
        self.key = key
        self.session = session
        self.lock = threading.RLock()
        self.users = 0

    @classmethod
    def acquire(
        cls, token: Any, module: str, settings: Pkcs11Settings, region: str
    ) -> _SharedSession:
        key = (module, settings.token_label)
        with cls._guard:
            shared = cls._open.get(key)
            if shared is None:
                try:
                    session = token.open(user_pin=settings.pin(), rw=True)
                except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
                    raise KeyAccessDenied(
                        f"token {settings.token_label!r} refused the PIN: {type(exc).__name__}",
                        provider="pkcs11",
                        region=region,
                    ) from None
                except p11.PKCS11Error as exc:
                    raise KeyServiceError(
                        f"cannot open token {settings.token_label!r}: {exc!r}",
                        provider="pkcs11",
                        region=region,
                    ) from None
                shared = cls._open[key] = _SharedSession(key, session)
            shared.users += 1
            return shared

    def release(self) -> None:
        with self._guard:
            self.users -= 1
            if self.users > 0:
                return
            del self._open[self.key]
        with self.lock, contextlib.suppress(p11.PKCS11Error):
            self.session.close()


class Pkcs11KeyService(KeyService):
    """One region's keys in one token; one logged-in session, calls serialised."""

    def __init__(
        self, *, region: str, settings: Pkcs11Settings, capabilities: Capabilities
    ) -> None:
        super().__init__(provider="pkcs11", region=region, capabilities=capabilities)
        self.settings = settings
        self._lock = threading.RLock()
        self._shared: _SharedSession | None = None
        self._keys: dict[int, Any] = {}
        lib, self._module = load_library(settings)
        try:
            self._token = lib.get_token(token_label=settings.token_label)
        except (p11.NoSuchToken, p11.MultipleTokensReturned) as exc:
            raise settings.error(
                "token_label", f"no single token labelled {settings.token_label!r}: {exc!r}"
            ) from None
        with self._open() as session:
            self._load(session)

    # ---------------------------------------------------------------- the session

    def _denied(self, message: str) -> KeyAccessDenied:
        return KeyAccessDenied(message, provider="pkcs11", region=self.region)

    @contextmanager
    def _open(self) -> Iterator[Any]:
        with self._lock:
            if self._shared is None:
                self._shared = _SharedSession.acquire(
                    self._token, self._module, self.settings, self.region
                )
            with self._shared.lock:
                yield self._shared.session

    def _prefix_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.settings.key_label_prefix)}-([1-9][0-9]{{0,8}})$")

    def _scan(self, session: Any) -> None:
        """The token's versions of the wrapping key (another process may have rotated)."""
        pattern = self._prefix_re()
        for key in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
        ):
            match = pattern.match(key.label or "")
            if match:
                self._keys[int(match.group(1))] = key

    def _load(self, session: Any) -> None:
        self._scan(session)
        if not self._keys:
            if not self.settings.create:
                raise ConfigError(
                    f"token {self.settings.token_label!r} has no key "
                    f"{self.settings.key_label_prefix}-<n>; set create = true to make one",
                    key=f'regions."{self.region}".create',
                    provider="pkcs11",
                    region=self.region,
                )
            self._keys[1] = self._make_aes(session, 1)
        if self._seal_private(session, None) is None:
            if not self.settings.create:
                raise ConfigError(
                    f"token {self.settings.token_label!r} has no seal key "
                    f"{self.settings.key_label_prefix}-seal; set create = true to make one",
                    key=f'regions."{self.region}".create',
                    provider="pkcs11",
                    region=self.region,
                )
            self._make_seal_pair(session)

    def _make_aes(self, session: Any, version: int) -> Any:
        return session.generate_key(
            KeyType.AES,
            256,
            label=f"{self.settings.key_label_prefix}-{version}",
            store=True,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
            },
        )

    def _seal_label(self) -> str:
        return f"{self.settings.key_label_prefix}-seal"

    def _make_seal_pair(self, session: Any) -> None:
        public, private = session.generate_keypair(
            KeyType.RSA,
            _RSA_BITS,
            label=self._seal_label(),
            store=True,
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.DECRYPT: True,
            },
        )
        key_id = public_key_id(self._public_of(public))
        public[Attribute.ID] = key_id
        private[Attribute.ID] = key_id

    @staticmethod
    def _public_of(obj: Any) -> rsa.RSAPublicKey:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()

    def _seal_private(self, session: Any, key_id: bytes | None) -> Any:
        template: dict[Any, Any] = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.LABEL: self._seal_label(),
        }
        if key_id is not None:
            template[Attribute.ID] = key_id
        found = list(session.get_objects(template))
        return found[0] if found else None

    # ---------------------------------------------------------------- KeyService

    @property
    def key_id(self) -> str:
        with self._lock:
            version = max(self._keys)
        return f"{self.settings.token_label}/{self.settings.key_label_prefix}-{version}"

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half of the region's seal key, read from the token."""
        with self._open() as session:
            found = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: self._seal_label()}
                )
            )
            if not found:
                raise KeyServiceError(
                    f"token {self.settings.token_label!r} has no public key {self._seal_label()}",
                    provider="pkcs11",
                    region=self.region,
                )
            return self._public_of(found[0])

    def public_key_pem(self) -> bytes:
        """The PEM other regions configure as this region's ``public_key``."""
        return self.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        with self._open() as session:
            version = max(self._keys)
            key = self._keys[version]
            digits = str(version).encode("ascii")
            header = DATA_KEY_MAGIC + struct.pack(">B", len(digits)) + digits
            aad = _aad(header, context, self.region)
            plaintext = bytes(session.generate_random(256))
            nonce = os.urandom(_NONCE)
            try:
                sealed = key.encrypt(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, 128),
                )
            except p11.PKCS11Error as exc:
                raise KeyServiceError(
                    f"the token cannot wrap with {key.label}: {exc!r}",
                    provider="pkcs11",
                    region=self.region,
                ) from None
        return DataKey(
            plaintext=plaintext,
            wrapped=header + nonce + bytes(sealed),
            key_id=f"{self.settings.token_label}/{key.label}",
        )

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        blob = bytes(wrapped)
        version = None
        if blob.startswith(DATA_KEY_MAGIC) and len(blob) > len(DATA_KEY_MAGIC):
            n = blob[len(DATA_KEY_MAGIC)]
            at = len(DATA_KEY_MAGIC) + 1
            digits = blob[at : at + n].decode("ascii", errors="replace")
            if _VERSION.match(digits):
                version = int(digits)
                header, rest = blob[: at + n], blob[at + n :]
        if version is None or len(rest) != _NONCE + 32 + _TAG:
            raise self._denied("not a data key wrapped by a pkcs11 KeyService")
        aad = _aad(header, context, self.region)
        with self._open() as session:
            if version not in self._keys:
                self._scan(session)
            key = self._keys.get(version)
            if key is None:
                raise self._denied(
                    f"token {self.settings.token_label!r} has no key "
                    f"{self.settings.key_label_prefix}-{version}"
                )
            try:
                plaintext = key.decrypt(
                    rest[_NONCE:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(rest[:_NONCE], aad, 128),
                )
            except p11.PKCS11Error as exc:
                raise self._denied(
                    f"{key.label} of token {self.settings.token_label!r} does not open this data "
                    f"key under this context ({type(exc).__name__})"
                ) from None
        return bytes(plaintext)

    def sealer(self) -> Pkcs11Sealer:
        return Pkcs11Sealer(region=self.region, public_key=self.public_key())

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        envelope = Envelope.parse(SEAL_MAGIC, sealed)
        if envelope is None or len(envelope.key_ref) != _KEY_ID:
            raise self._denied("not a secret sealed by a pkcs11 Sealer")
        key_id = envelope.key_ref
        with self._open() as session:
            private = self._seal_private(session, key_id)
            if private is None:
                raise self._denied(
                    f"token {self.settings.token_label!r} holds no seal key this was sealed for"
                )
            try:
                inner = private.decrypt(
                    envelope.wrapped_key,
                    mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
                )
            except p11.PKCS11Error as exc:
                raise self._denied(
                    f"the seal key refused the envelope ({type(exc).__name__})"
                ) from None
        opened = envelope.open(bytes(inner), seal_context(context, self.region))
        if opened is None:
            raise self._denied("the sealed secret does not open under this context")
        return opened

    def rotate(self) -> str:
        with self._open() as session:
            self._scan(session)
            version = max(self._keys) + 1
            self._keys[version] = self._make_aes(session, version)
        return self.key_id

    def close(self) -> None:
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()
