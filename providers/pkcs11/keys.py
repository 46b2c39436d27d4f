"""KeyService and Sealer on a PKCS#11 token (python-pkcs11; SoftHSMv2 in tests).

- Data keys: 256 random bits from the token's generator, wrapped by ``C_Encrypt`` with
  CKM_AES_GCM under the region's current AES-256 key, an object of the token that is
  sensitive and not extractable, labelled ``<prefix>-<n>`` and given a random 16-byte
  ``CKA_ID`` in the template that generates it (so no process ever sees the key without its
  id). The encryption context (with ``regionvault:purpose``) and the region's name are the
  GCM additional authenticated data. Rotation makes a key ``<prefix>-<n+1>``: the wrapped key
  names its version and its key's id, so older keys, and a duplicate version that two
  processes made at once, still unwrap. Each new wrap is unwrapped once in the token before
  it is returned: a green backup never holds a data key that the token cannot open. The
  view of the token's keys is refreshed when older than ``RESCAN_SECONDS`` before a wrap,
  and on demand (:meth:`Pkcs11KeyService.refresh`): another process's rotation is used.
- Errors: one classifier (:meth:`Pkcs11KeyService._classify`). A lost session or device is
  reopened once, then TransientError; a refused ciphertext is KeyAccessDenied; anything else
  KeyServiceError naming the token and the operation. A forked child initialises the module
  again and logs in on its own session.
- Sealing (another region seals a secret for this one): hybrid with the region's RSA public
  key, exported from the token into a PEM file that other regions configure
  (``public_key``): a fresh 256-bit key ``K`` is RSA-OAEP-encrypted (SHA-1 and MGF1-SHA-1:
  SoftHSM 2.6 does OAEP with SHA-1 only), the secret encrypted under ``K`` with AES-256-GCM,
  the region's name and the context as AAD. Only ``C_Decrypt`` with the private key, which
  never leaves the token, recovers ``K``; the AES-GCM step of an unseal runs in this process.

Envelopes, all lengths big-endian::

    wrapped data key: b"RVPK2" | u8 n | version (n ASCII digits) | u8 k | key id (k, CKA_ID)
                      | u8 12 | IV (12) | GCM(dk) (32 + 16)
        aad = everything before the IV length | u16 r | region (r, UTF-8) | b"\\0"
              | canonical JSON of context + purpose
    sealed secret:    core/envelope.py's, magic b"RVPS3", the key reference the seal key's id;
                      its context bytes are the same ``u16 r | region | b"\\0" | JSON``

The seal key's id in the envelope is the first 16 bytes of SHA-256 of its public key (DER):
the sealer knows only the PEM. The unsealing token finds the private key whose modulus gives
that id, so a seal pair with no or a wrong ``CKA_ID`` still unseals (and is repaired).

What changed from RVPK1/RVPS2 (nothing was deployed; those envelopes no longer open): the
wrapping key is named by its ``CKA_ID`` next to its version (two objects of one version,
made by two processes rotating at once, were indistinguishable), the IV carries its length
(an HSM that makes its own IVs may return 16 bytes), and the region's name is authenticated
in both envelopes (two regions that share a key object still cannot open each other's).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.attributes import AttributeMapper
from pkcs11.mechanisms import GCMParams
from regionvault.core.envelope import NONCE as _NONCE
from regionvault.core.envelope import TAG as _TAG
from regionvault.core.envelope import Envelope
from regionvault.core.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyServiceError,
    RegionVaultError,
    TransientError,
)
from regionvault.core.interfaces import KeyService, context_bytes, purpose_context
from regionvault.core.types import Capabilities, DataKey
from regionvault.providers.pkcs11.sealing import (
    _KEY_ID,
    MAX_SECRET,
    OAEP,
    SEAL_MAGIC,
    Pkcs11Sealer,
    public_key_id,
    region_bytes,
    seal_context,
)

if TYPE_CHECKING:
    from regionvault.providers.pkcs11.settings import Pkcs11Settings

__all__ = [
    "DATA_KEY_MAGIC",
    "MAX_SECRET",
    "RESCAN_SECONDS",
    "SEAL_MAGIC",
    "Pkcs11KeyService",
    "Pkcs11Sealer",
    "load_library",
    "public_key_id",
]

DATA_KEY_MAGIC = b"RVPK2"
#: how old this process's view of the token's wrapping keys may be before a data key is
#: wrapped: a rotation by another process is used within this many seconds
RESCAN_SECONDS = 60.0
_DATA_KEY = "data-key"
_RSA_BITS = 3072
_ID_BYTES = 16
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
_T = TypeVar("_T")

#: the session or the device went away (HSM restart, HA failover, network HSM reconnect):
#: reopen the session once, then TransientError
_LOST: tuple[type[p11.PKCS11Error], ...] = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.UserNotLoggedIn,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceError,
    p11.DeviceMemory,
)
#: the token refused the ciphertext it was given to decrypt
_REFUSED: tuple[type[p11.PKCS11Error], ...] = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)


def _pack_mechanisms(value: Any) -> bytes:
    # CK_MECHANISM_TYPE is a native unsigned long (8 bytes on 64-bit Linux): "@L", not "=L"
    return b"".join(struct.pack("@L", int(m)) for m in value)


def _unpack_mechanisms(value: bytes) -> list[Mechanism]:
    size = struct.calcsize("@L")
    return [Mechanism(m) for (m,) in struct.iter_unpack("@L", value[: len(value) // size * size])]


def _mapper() -> AttributeMapper:
    """python-pkcs11's mapper, plus CKA_ALLOWED_MECHANISMS (an array of CK_MECHANISM_TYPE)."""
    mapper = AttributeMapper()
    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, _pack_mechanisms, _unpack_mechanisms)
    return mapper


def _aad(header: bytes, context: Mapping[str, str], region: str) -> bytes:
    """A wrapped data key's AAD: its header, the region, a zero byte, the canonical context."""
    purposed = purpose_context(context, _DATA_KEY, provider="pkcs11", region=region)
    return header + region_bytes(region) + b"\0" + context_bytes(purposed)


# ------------------------------------------------------------------ the module, once a process

#: one loaded module per path: a process initialises a PKCS#11 module once
_LIBRARIES: dict[str, Any] = {}
#: modules a fork copied into this (child) process: C_Initialize again before any use
_STALE: set[str] = set()
_LIBRARIES_LOCK = threading.Lock()
#: the SOFTHSM2_CONF SoftHSM was loaded with in this process ("" when none was set)
_CONF_IN_EFFECT: list[str] = []


def _conf_key(path: str) -> str:
    return os.path.realpath(path) if path else ""


def load_library(settings: Pkcs11Settings) -> tuple[Any, str]:
    """The PKCS#11 module the settings name (SoftHSM's by default), loaded once a process.
    ``softhsm_conf`` becomes SOFTHSM2_CONF before the first load; SoftHSM reads it once, so
    once the module is loaded (with that file, another or none) a region whose
    ``softhsm_conf`` is another file is refused, naming that key, and the variable is left as
    it is. Returns the module and its resolved path."""
    from regionvault.providers.pkcs11.softhsm import find_module

    module = settings.module or find_module()
    if module is None:
        raise settings.error("module", "no PKCS#11 module given and SoftHSM's is not installed")
    with _LIBRARIES_LOCK:
        wanted = None if settings.softhsm_conf is None else str(settings.softhsm_conf)
        if _CONF_IN_EFFECT:
            if wanted is not None and _conf_key(wanted) != _conf_key(_CONF_IN_EFFECT[0]):
                loaded = _CONF_IN_EFFECT[0] or "no SOFTHSM2_CONF (SoftHSM's default file)"
                raise settings.error(
                    "softhsm_conf",
                    f"this process already loaded its PKCS#11 module with {loaded}, not "
                    f"{wanted}; SoftHSM reads its configuration once a process",
                )
        else:
            if wanted is not None:
                os.environ["SOFTHSM2_CONF"] = wanted
            _CONF_IN_EFFECT.append(os.environ.get("SOFTHSM2_CONF", ""))
        key = str(module)
        lib = _LIBRARIES.get(key)
        try:
            if lib is None:
                lib = pkcs11.lib(key)
                _LIBRARIES[key] = lib
            elif key in _STALE:
                # PKCS#11 v2.40 6.7.7: a child process calls C_Initialize before using the module
                lib.reinitialize()
            _STALE.discard(key)
        except (RuntimeError, OSError, p11.PKCS11Error) as exc:
            raise settings.error("module", f"cannot load {module}: {exc!r}") from None
        return lib, str(module.resolve())


class _SharedSession:
    """The one logged-in session of a process on one token. PKCS#11 logins are per token and
    application, not per session: a second ``C_Login`` fails (USER_ALREADY_LOGGED_IN) and
    closing a session logs every session of the token out; so the KeyServices of a process
    on one token share one session, closed when the last one closes. Calls on it are
    serialised (``lock``). Each KeyService must give the PIN it was logged in with, and two
    regions never share a key label prefix on it. A lost session is reopened (``reopen``):
    ``generation`` counts the reopenings, so that users drop the object handles of the old
    one."""

    _open: ClassVar[dict[tuple[str, str], _SharedSession]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()
    #: PINs are compared as keyed digests, never kept
    _pin_key: ClassVar[bytes] = os.urandom(32)

    def __init__(self, key: tuple[str, str], lib: Any, settings: Pkcs11Settings) -> None:
        self.key = key
        self.lib = lib
        self.settings = settings
        self.session: Any = None
        self.lock = threading.RLock()
        self.users = 0
        self.generation = 0
        self.pin_digest = b""
        #: key label prefix -> (region, how many KeyServices of it)
        self.owners: dict[str, tuple[str, int]] = {}

    @classmethod
    def _digest(cls, pin: str) -> bytes:
        return hmac.new(cls._pin_key, pin.encode("utf-8"), hashlib.sha256).digest()

    def _login(self, token: Any, pin: str, region: str) -> Any:
        label = self.settings.token_label
        try:
            return token.open(user_pin=pin, rw=True, attribute_mapper=_mapper())
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked) as exc:
            raise KeyAccessDenied(
                f"token {label!r} refused the PIN: {type(exc).__name__}",
                provider="pkcs11",
                region=region,
            ) from None
        except p11.UserAlreadyLoggedIn:
            # another session of this process still holds the login (a lost one): use it
            return token.open(rw=True, attribute_mapper=_mapper())

    @classmethod
    def acquire(
        cls, lib: Any, token: Any, module: str, settings: Pkcs11Settings, region: str
    ) -> _SharedSession:
        key = (module, settings.token_label)
        pin = settings.pin()
        digest = cls._digest(pin)
        prefix = settings.key_label_prefix
        with cls._guard:
            shared = cls._open.get(key)
            if shared is None:
                shared = _SharedSession(key, lib, settings)
                try:
                    shared.session = shared._login(token, pin, region)
                except _LOST:
                    raise  # the HSM is away: transient (classified by the caller)
                except p11.PKCS11Error as exc:
                    raise KeyServiceError(
                        f"cannot open token {settings.token_label!r}: {exc!r}",
                        provider="pkcs11",
                        region=region,
                    ) from None
                shared.pin_digest = digest
                cls._open[key] = shared
            elif not hmac.compare_digest(shared.pin_digest, digest):
                raise KeyAccessDenied(
                    f"token {settings.token_label!r} is logged in in this process with another "
                    "PIN than this region's: a token has one user PIN",
                    provider="pkcs11",
                    region=region,
                )
            owner, count = shared.owners.get(prefix, (region, 0))
            if owner != region:
                raise settings.error(
                    "key_label_prefix",
                    f"region {owner} already uses token {settings.token_label!r} with key "
                    f"label prefix {prefix!r} in this process: two regions must not share a "
                    "token and prefix (their keys would be one), give each its own",
                )
            shared.owners[prefix] = (region, count + 1)
            shared.users += 1
            return shared

    def reopen(self, broken: Any, region: str) -> None:
        """A new logged-in session in place of ``broken`` (called with ``lock`` held); a no-op
        when another user of this session already replaced it."""
        if self.session is not broken:
            return
        with contextlib.suppress(p11.PKCS11Error):
            broken.close()
        # after a device removal the token may sit in another slot
        token = self.lib.get_token(token_label=self.settings.token_label)
        self.session = self._login(token, self.settings.pin(), region)
        self.generation += 1

    def release(self, prefix: str) -> None:
        with self._guard:
            owner, count = self.owners.get(prefix, ("", 1))
            if count > 1:
                self.owners[prefix] = (owner, count - 1)
            else:
                self.owners.pop(prefix, None)
            self.users -= 1
            if self.users > 0:
                return
            del self._open[self.key]
        with self.lock, contextlib.suppress(p11.PKCS11Error):
            self.session.close()


#: every KeyService of this process, so that a forked child can forget their parent's state
_SERVICES: weakref.WeakSet[Pkcs11KeyService] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child shares none of its parent's PKCS#11 state: handles are the parent's
    (for a network HSM, the parent's connection), so the child initialises the module again
    and logs in with a session of its own, lazily; the parent's sessions are neither used
    nor closed here. Locks another thread held at the fork are replaced."""
    global _LIBRARIES_LOCK
    _LIBRARIES_LOCK = threading.Lock()
    _STALE.update(_LIBRARIES)
    _SharedSession._open = {}
    _SharedSession._guard = threading.Lock()
    for service in list(_SERVICES):
        service._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ the KeyService


@dataclass(frozen=True)
class _WrapKey:
    """One version of the wrapping key in the token."""

    version: int
    key_id: bytes
    obj: Any


class Pkcs11KeyService(KeyService):
    """One region's keys in one token; one logged-in session, calls serialised."""

    def __init__(
        self, *, region: str, settings: Pkcs11Settings, capabilities: Capabilities
    ) -> None:
        super().__init__(provider="pkcs11", region=region, capabilities=capabilities)
        self.settings = settings
        self._lock = threading.RLock()
        self._shared: _SharedSession | None = None
        self._generation = -1
        self._wrapping: list[_WrapKey] = []
        self._scanned_at = float("-inf")
        #: seal key id (of the public key) -> private key object
        self._seal_keys: dict[bytes, Any] = {}
        self._token: Any = None
        self._pid = os.getpid()
        _SERVICES.add(self)
        try:
            self._run("open the token", self._load)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- the session

    @property
    def _label(self) -> str:
        return self.settings.token_label

    def _denied(self, message: str) -> KeyAccessDenied:
        return KeyAccessDenied(message, provider="pkcs11", region=self.region)

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's session and handles (never close them)."""
        self._lock = threading.RLock()
        self._shared = None
        self._token = None
        self._generation = -1
        self._wrapping = []
        self._seal_keys = {}
        self._scanned_at = float("-inf")
        self._pid = os.getpid()

    def _holder(self) -> _SharedSession:
        if self._pid != os.getpid():  # forked without the at-fork hook having run
            self._forget_parent()
        if self._shared is None:
            lib, module = load_library(self.settings)
            if self._token is None:
                try:
                    self._token = lib.get_token(token_label=self._label)
                except (p11.NoSuchToken, p11.MultipleTokensReturned) as exc:
                    raise self.settings.error(
                        "token_label", f"no single token labelled {self._label!r}: {exc!r}"
                    ) from None
            self._shared = _SharedSession.acquire(
                lib, self._token, module, self.settings, self.region
            )
        return self._shared

    def _classify(self, exc: p11.PKCS11Error, operation: str) -> RegionVaultError:
        """The one mapping of a PKCS#11 error: a lost session or device is transient, a
        refused ciphertext is access denied, anything else names the token and operation."""
        name = type(exc).__name__
        detail = f"{name}: {exc}" if str(exc) else name
        if isinstance(exc, _LOST):
            return TransientError(
                f"token {self._label!r}: {operation}: the token's session or device is gone "
                f"({detail}), and a new session did not help; it may pass once the HSM is back",
                provider="pkcs11",
                region=self.region,
            )
        if isinstance(exc, _REFUSED):
            return self._denied(
                f"token {self._label!r} refused the ciphertext: {operation} ({detail})"
            )
        return KeyServiceError(
            f"token {self._label!r}: {operation} failed ({detail})",
            provider="pkcs11",
            region=self.region,
        )

    def _run(self, operation: str, call: Callable[[Any], _T]) -> _T:
        """``call(session)`` on the shared session: a lost session is reopened and the call
        made once more; errors are classified by :meth:`_classify`."""
        for attempt in (1, 2):
            with self._lock:
                try:
                    shared = self._holder()
                except p11.PKCS11Error as exc:
                    raise self._classify(exc, operation) from None
                with shared.lock:
                    session = shared.session
                    try:
                        if self._generation != shared.generation:
                            # a new session: the old one's object handles are gone
                            self._generation = shared.generation
                            self._scan(session)
                            self._scan_seal(session)
                        return call(session)
                    except _LOST as exc:
                        if attempt == 2:
                            raise self._classify(exc, operation) from None
                        try:
                            shared.reopen(session, self.region)
                        except p11.PKCS11Error as again:
                            raise TransientError(
                                f"token {self._label!r}: {operation}: the session was lost "
                                f"({type(exc).__name__}) and cannot be reopened "
                                f"({type(again).__name__}); it may pass once the HSM is back",
                                provider="pkcs11",
                                region=self.region,
                            ) from None
                    except p11.PKCS11Error as exc:
                        raise self._classify(exc, operation) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------------- what the token holds

    def _prefix_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.settings.key_label_prefix)}-([1-9][0-9]{{0,8}})$")

    def _scan(self, session: Any) -> None:
        """The token's versions of the wrapping key (another process may have rotated)."""
        pattern = self._prefix_re()
        found = []
        for key in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
        ):
            match = pattern.match(key.label or "")
            if match:
                found.append(_WrapKey(int(match.group(1)), bytes(key[Attribute.ID] or b""), key))
        self._wrapping = found
        self._scanned_at = time.monotonic()

    def _current(self, session: Any) -> _WrapKey:
        """The key new data keys are wrapped under: the highest version, and of two objects
        of that version (two processes rotated at once) the one with the lower id, so that
        every process picks the same. Rescans when the view is older than RESCAN_SECONDS."""
        if time.monotonic() - self._scanned_at > RESCAN_SECONDS or not self._wrapping:
            self._scan(session)
        if not self._wrapping:
            raise KeyServiceError(
                f"token {self._label!r} no longer holds a key {self.settings.key_label_prefix}-<n>",
                provider="pkcs11",
                region=self.region,
            )
        return min(self._wrapping, key=lambda k: (-k.version, k.key_id))

    def _load(self, session: Any) -> None:
        self._scan(session)
        if not self._wrapping:
            self._require_create("key", f"{self.settings.key_label_prefix}-<n>")
            self._make_aes(session, 1)
            self._scan(session)  # another process may have made one at once: pick as all do
        self._scan_seal(session)
        if not self._seal_keys:
            self._require_create("seal key", self._seal_label())
            self._make_seal_pair(session)
            self._scan_seal(session)
        self._repair_seal_ids(session)

    def _require_create(self, what: str, label: str) -> None:
        if not self.settings.create:
            raise ConfigError(
                f"token {self._label!r} has no {what} {label}; set create = true to make one",
                key=f'regions."{self.region}".create',
                provider="pkcs11",
                region=self.region,
            )

    @staticmethod
    def _restricted(generate: Callable[[dict[Any, Any]], _T], mechanism: Mechanism) -> _T:
        """``generate(extra)`` with CKA_ALLOWED_MECHANISMS limited to ``mechanism``; a token
        that does not know the attribute (before PKCS#11 v2.40) gets the key without it: the
        capability flags still hold, only the mechanism list is the token's default."""
        try:
            return generate({Attribute.ALLOWED_MECHANISMS: [mechanism]})
        except p11.AttributeTypeInvalid:
            return generate({})

    def _make_aes(self, session: Any, version: int, key_id: bytes | None = None) -> Any:
        """A wrapping key whose id is in the generating template (atomic with the key) and
        that can do AES-GCM encrypt and decrypt and nothing else."""
        new_id = key_id or os.urandom(_ID_BYTES)

        def generate(extra: dict[Any, Any]) -> Any:
            return session.generate_key(
                KeyType.AES,
                256,
                id=new_id,
                label=f"{self.settings.key_label_prefix}-{version}",
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                    **extra,
                },
            )

        return self._restricted(generate, Mechanism.AES_GCM)

    def _seal_label(self) -> str:
        return f"{self.settings.key_label_prefix}-seal"

    def _make_seal_pair(self, session: Any) -> None:
        """The seal pair, one id in both templates: a crash leaves no pair or a whole one."""
        new_id = os.urandom(_ID_BYTES)

        def generate(extra: dict[Any, Any]) -> Any:
            return session.generate_keypair(
                KeyType.RSA,
                _RSA_BITS,
                id=new_id,
                label=self._seal_label(),
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                public_template={
                    Attribute.ENCRYPT: True,
                    Attribute.VERIFY: False,
                    Attribute.VERIFY_RECOVER: False,
                    Attribute.WRAP: False,
                },
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.DECRYPT: True,
                    Attribute.SIGN: False,
                    Attribute.SIGN_RECOVER: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                    **extra,
                },
            )

        self._restricted(generate, Mechanism.RSA_PKCS_OAEP)

    @staticmethod
    def _public_of(obj: Any) -> rsa.RSAPublicKey:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()

    def _seal_objects(self, session: Any, kind: ObjectClass) -> list[Any]:
        return list(
            session.get_objects({Attribute.CLASS: kind, Attribute.LABEL: self._seal_label()})
        )

    def _scan_seal(self, session: Any) -> None:
        """The seal private keys, by the id of their public key (what an envelope names):
        read from the private key's own modulus, so it does not depend on CKA_ID."""
        self._seal_keys = {
            public_key_id(self._public_of(private)): private
            for private in self._seal_objects(session, ObjectClass.PRIVATE_KEY)
        }

    def _repair_seal_ids(self, session: Any) -> None:
        """Give a seal pair made without ids (by an older version, or a crash between its
        generation and setting them) one id on both halves, and a public half whose id is
        missing or differs its private half's. Best effort: unsealing does not need it."""
        publics = {
            public_key_id(self._public_of(p)): p
            for p in self._seal_objects(session, ObjectClass.PUBLIC_KEY)
        }
        for pid, private in self._seal_keys.items():
            try:
                key_id = bytes(private[Attribute.ID] or b"")
                if not key_id:
                    key_id = os.urandom(_ID_BYTES)
                    private[Attribute.ID] = key_id
                public = publics.get(pid)
                if public is not None and bytes(public[Attribute.ID] or b"") != key_id:
                    public[Attribute.ID] = key_id
            except _LOST:
                raise
            except p11.PKCS11Error:
                continue  # a token that cannot set ids: the pair still unseals by its modulus

    def _current_seal(self, session: Any) -> Any:
        """The seal private key other regions seal to: of two (two processes made one at
        once) the one with the lower id, so that every process exports the same."""
        if not self._seal_keys:
            self._scan_seal(session)
        if not self._seal_keys:
            raise KeyServiceError(
                f"token {self._label!r} has no seal key {self._seal_label()}",
                provider="pkcs11",
                region=self.region,
            )
        return min(self._seal_keys.values(), key=lambda k: bytes(k[Attribute.ID] or b""))

    def _still_works(self, key: Any, mechanism: Mechanism) -> bool:
        """Whether ``key`` round-trips a random block right now: after a CKR_GENERAL_ERROR
        from a decrypt, this tells a ciphertext the token refused from a token in trouble.
        A lost session propagates (the caller reopens); any other error means trouble."""
        block = os.urandom(32)
        try:
            if mechanism == Mechanism.AES_GCM:
                params = GCMParams(os.urandom(_NONCE), b"regionvault probe", 128)
                out = key.decrypt(
                    key.encrypt(block, mechanism=mechanism, mechanism_param=params),
                    mechanism=mechanism,
                    mechanism_param=params,
                )
            else:
                out = key.decrypt(
                    self._public_of(key).encrypt(block, OAEP),
                    mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
                )
        except _LOST:
            raise
        except p11.PKCS11Error:
            return False
        return bytes(out) == block

    def _decrypt(self, key: Any, mechanism: Mechanism, param: Any, data: bytes) -> bytes | None:
        """``C_Decrypt``; None when the token refused the ciphertext. SoftHSM answers a GCM tag
        that does not verify with CKR_GENERAL_ERROR, not CKR_ENCRYPTED_DATA_INVALID: a
        GeneralError counts as a refusal only when the same key round-trips a fresh block
        right after it, so a token in real trouble is a KeyServiceError (never retried as
        "altered data" would not be), not a denial."""
        try:
            return bytes(key.decrypt(data, mechanism=mechanism, mechanism_param=param))
        except _REFUSED:
            return None
        except p11.GeneralError:
            if self._still_works(key, mechanism):
                return None
            raise

    # ---------------------------------------------------------------- KeyService

    def _key_id_of(self, key: _WrapKey) -> str:
        label = f"{self.settings.key_label_prefix}-{key.version}"
        return f"{self._label}/{label}#{key.key_id[:8].hex()}"

    @property
    def key_id(self) -> str:
        return self._run("read the current key", lambda s: self._key_id_of(self._current(s)))

    def refresh(self) -> str:
        """Look in the token for wrapping keys now (another process may have rotated); the
        key id new data keys are wrapped under."""

        def scan(session: Any) -> str:
            self._scan(session)
            self._scan_seal(session)
            return self._key_id_of(self._current(session))

        return self._run("rescan the token", scan)

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half of the region's seal key, read from the token."""
        return self._run(
            "read the seal public key", lambda s: self._public_of(self._current_seal(s))
        )

    def public_key_pem(self) -> bytes:
        """The PEM other regions configure as this region's ``public_key``."""
        return self.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        def wrap(session: Any) -> DataKey:
            key = self._current(session)
            digits = str(key.version).encode("ascii")
            header = (
                DATA_KEY_MAGIC
                + struct.pack(">B", len(digits))
                + digits
                + struct.pack(">B", len(key.key_id))
                + key.key_id
            )
            aad = _aad(header, context, self.region)
            plaintext = bytes(session.generate_random(256))
            iv = os.urandom(_NONCE)
            params = GCMParams(iv, aad, 128)
            sealed = bytes(
                key.obj.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )
            # Checked in the token before it is returned: an HSM that makes its own IVs (in
            # FIPS mode) and does not use this one, or returns it with the output, fails here
            # instead of leaving a green backup with a data key that never unwraps.
            opened = None
            if len(sealed) == 32 + _TAG:
                try:
                    check = GCMParams(iv, aad, 128)
                    opened = bytes(
                        key.obj.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=check)
                    )
                except _LOST:
                    raise
                except p11.PKCS11Error:
                    opened = None
            if opened != plaintext:
                raise KeyServiceError(
                    f"token {self._label!r}: the wrap under {self._key_id_of(key)} does not "
                    f"unwrap in the token ({len(sealed)} bytes for a 32-byte key): the token "
                    "may generate its own GCM IVs (FIPS mode), which this provider does not "
                    "support (docs/edge-keys.md)",
                    provider="pkcs11",
                    region=self.region,
                )
            wrapped = header + struct.pack(">B", len(iv)) + iv + sealed
            return DataKey(plaintext=plaintext, wrapped=wrapped, key_id=self._key_id_of(key))

        return self._run("wrap a data key", wrap)

    def _parse(self, blob: bytes) -> tuple[bytes, int, bytes, bytes, bytes] | None:
        """(header, version, key id, IV, GCM output) of a wrapped data key, or None."""
        if not blob.startswith(DATA_KEY_MAGIC):
            return None
        at = len(DATA_KEY_MAGIC)
        try:
            n = blob[at]
            digits = blob[at + 1 : at + 1 + n].decode("ascii")
            at += 1 + n
            k = blob[at]
            key_id = blob[at + 1 : at + 1 + k]
            at += 1 + k
            header = blob[:at]
            ivlen = blob[at]
        except (IndexError, UnicodeDecodeError):
            return None
        iv, sealed = blob[at + 1 : at + 1 + ivlen], blob[at + 1 + ivlen :]
        if (
            not _VERSION.match(digits)
            or len(key_id) != k
            or ivlen != _NONCE
            or len(iv) != ivlen
            or len(sealed) != 32 + _TAG
        ):
            return None
        return header, int(digits), key_id, iv, sealed

    def wrapped_key_id(self, wrapped: bytes) -> str | None:
        """The id (as :attr:`key_id` says it) of the key object a wrapped data key names,
        None for anything else; no token call (verify's old-key warning)."""
        parsed = self._parse(bytes(wrapped))
        if parsed is None:
            return None
        label = f"{self.settings.key_label_prefix}-{parsed[1]}"
        return f"{self._label}/{label}#{parsed[2][:8].hex()}"

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        parsed = self._parse(bytes(wrapped))
        if parsed is None:
            raise self._denied("not a data key wrapped by a pkcs11 KeyService")
        header, version, key_id, iv, sealed = parsed
        aad = _aad(header, context, self.region)
        label = f"{self.settings.key_label_prefix}-{version}"

        def open_(session: Any) -> bytes:
            def matching() -> list[_WrapKey]:
                return [k for k in self._wrapping if (k.version, k.key_id) == (version, key_id)]

            keys = matching()
            if not keys:  # another process may have rotated since this one looked
                self._scan(session)
                keys = matching()
            if not keys:
                raise self._denied(
                    f"token {self._label!r} has no key {label} with id {key_id[:8].hex()}"
                )
            # one key, but two objects of a version made before ids (both id-less): try each
            for key in keys:
                opened = self._decrypt(key.obj, Mechanism.AES_GCM, GCMParams(iv, aad, 128), sealed)
                if opened is not None and len(opened) == 32:
                    return opened
            raise self._denied(
                f"{label} of token {self._label!r} does not open this data key under this "
                "context and region"
            )

        return self._run("unwrap a data key", open_)

    def sealer(self) -> Pkcs11Sealer:
        return Pkcs11Sealer(region=self.region, public_key=self.public_key())

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        envelope = Envelope.parse(SEAL_MAGIC, sealed)
        if envelope is None or len(envelope.key_ref) != _KEY_ID:
            raise self._denied("not a secret sealed by a pkcs11 Sealer")
        bound = seal_context(context, self.region)

        def open_(session: Any) -> bytes:
            private = self._seal_keys.get(envelope.key_ref)
            if private is None:
                self._scan_seal(session)
                private = self._seal_keys.get(envelope.key_ref)
            if private is None:
                raise self._denied(f"token {self._label!r} holds no seal key this was sealed for")
            inner = self._decrypt(
                private,
                Mechanism.RSA_PKCS_OAEP,
                (Mechanism.SHA_1, MGF.SHA1, None),
                envelope.wrapped_key,
            )
            if inner is None:
                raise self._denied("the seal key refused the envelope")
            return inner

        opened = envelope.open(self._run("unseal", open_), bound)
        if opened is None:
            raise self._denied("the sealed secret does not open under this context and region")
        return opened

    def rotate(self) -> str:
        new_id = os.urandom(_ID_BYTES)

        def rotate(session: Any) -> str:
            self._scan(session)
            made = [k for k in self._wrapping if k.key_id == new_id]
            if not made:  # a retry after a lost session finds the key it already made
                version = max((k.version for k in self._wrapping), default=0) + 1
                self._make_aes(session, version, new_id)
                self._scan(session)  # another process may have rotated at once
            return self._key_id_of(self._current(session))

        return self._run("rotate the wrapping key", rotate)

    def close(self) -> None:
        with self._lock:
            shared, self._shared = self._shared, None
        _SERVICES.discard(self)
        if shared is not None:
            shared.release(self.settings.key_label_prefix)
