"""The local KeyService: a per-region keystore file, envelope data keys, X25519 sealing.

On disk, under ``<root>/keys/``:

``keystore.json`` (mode 0600)
    this region's master keys (AES-256, each with an id) and X25519 sealing private keys,
    the current one of each named. Written atomically; created on first use with an
    if-absent link, so concurrent first users agree on one keystore.
``sealing.pub`` (mode 0644)
    the current sealing public key and its id: all another region needs to seal for this
    one (:class:`LocalSealer` reads only this file).
``keystore.lock``
    serialises rotations between processes.

Wire formats (all integers big-endian, ``ctx`` = canonical context, see
:func:`canonical_context`)::

    wrapped data key = 0x01 | len(kid):u8 | kid | nonce:12 | AES-256-GCM(master, dk, aad)
                       aad = b"regionvault-local-wrap-v1" | 0x00 | kid | 0x00 | ctx
    sealed secret    = 0x01 | len(kid):u8 | kid | epk:32 | nonce:12 | AES-256-GCM(k, s, aad)
                       k   = HKDF-SHA256(X25519(eph, recipient), salt = epk | recipient_pub,
                                         info = b"regionvault-local-seal-v1")
                       aad = header (everything before the nonce) | 0x00 | ctx
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from regionvault.core.errors import KeyAccessDenied, KeyServiceError
from regionvault.core.interfaces import KeyService, Sealer
from regionvault.core.types import Capabilities, DataKey
from regionvault.providers.local import _fs

__all__ = [
    "MAX_SEALED_SECRET",
    "LocalKeyService",
    "LocalSealer",
    "canonical_context",
    "ensure_keystore",
    "load_sealer",
]

FORMAT = 0x01
NONCE = 12
X25519_BYTES = 32
#: the interface promises sealing of small secrets only
MAX_SEALED_SECRET = 1024
_WRAP_LABEL = b"regionvault-local-wrap-v1"
_SEAL_INFO = b"regionvault-local-seal-v1"
KEYSTORE = "keystore.json"
SEALING_PUB = "sealing.pub"
_LOCK = "keystore.lock"


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The context as UTF-8 JSON with sorted keys and no spaces: one encoding per mapping."""
    if not isinstance(context, Mapping):
        raise KeyServiceError(f"encryption context must be a mapping, not {type(context).__name__}")
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise KeyServiceError(
                f"encryption context entry {key!r}={value!r}: keys and values must be strings"
            )
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode("utf-8")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _kid_header(kid: str) -> bytes:
    raw = kid.encode("ascii")
    return bytes([FORMAT, len(raw)]) + raw


def _split_header(blob: bytes, what: str) -> tuple[str, int]:
    """(key id, offset after it) of a wrapped or sealed blob; ValueError naming the fault."""
    if len(blob) < 2:
        raise ValueError(f"{what} is too short ({len(blob)} bytes)")
    if blob[0] != FORMAT:
        raise ValueError(f"{what} has unknown format byte 0x{blob[0]:02x}")
    end = 2 + blob[1]
    if len(blob) < end:
        raise ValueError(f"{what} is truncated inside its key id")
    try:
        kid = blob[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what} has a malformed key id") from None
    return kid, end


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _seal_key(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient, info=_SEAL_INFO).derive(
        shared
    )


# --------------------------------------------------------------------------- keystore file


def _with_new_keys(store: Mapping[str, Any]) -> dict[str, Any]:
    """``store`` plus a fresh master key and sealing key, both made current."""
    now = datetime.now(UTC).isoformat()
    master_id, sealing_id = _new_id("mk"), _new_id("sk")
    master = {"key": _b64(AESGCM.generate_key(256)), "created": now}
    sealing = {"private": _b64(X25519PrivateKey.generate().private_bytes_raw()), "created": now}
    return {
        **store,
        "current_master": master_id,
        "master_keys": {**store.get("master_keys", {}), master_id: master},
        "current_sealing": sealing_id,
        "sealing_keys": {**store.get("sealing_keys", {}), sealing_id: sealing},
    }


def _encode_keystore(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")


def _public_record(region: str, store: Mapping[str, Any]) -> dict[str, Any]:
    kid = store["current_sealing"]
    private = X25519PrivateKey.from_private_bytes(_unb64(store["sealing_keys"][kid]["private"]))
    return {
        "format": 1,
        "region": region,
        "key_id": kid,
        "public": _b64(_raw_public(private.public_key())),
    }


class _Keystore:
    """The parsed keystore: key bytes by id, and which ids are current."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        try:
            self.current_master: str = data["current_master"]
            self.current_sealing: str = data["current_sealing"]
            self.master: dict[str, bytes] = {
                kid: _unb64(entry["key"]) for kid, entry in data["master_keys"].items()
            }
            self.sealing: dict[str, X25519PrivateKey] = {
                kid: X25519PrivateKey.from_private_bytes(_unb64(entry["private"]))
                for kid, entry in data["sealing_keys"].items()
            }
        except KeyError as exc:
            raise KeyServiceError(
                f"keystore {path} is malformed: it has no {exc.args[0]!r} entry"
            ) from None
        except (TypeError, AttributeError):
            raise KeyServiceError(
                f"keystore {path} is malformed: an entry is not of the expected shape"
            ) from None
        except ValueError:
            raise KeyServiceError(
                f"keystore {path} is malformed: a key is not valid base64 of the right length"
            ) from None
        if self.current_master not in self.master or self.current_sealing not in self.sealing:
            raise KeyServiceError(f"keystore {path} names a current key it does not hold")
        if any(len(key) != 32 for key in self.master.values()):
            raise KeyServiceError(f"keystore {path} holds a master key that is not 256 bits")
        self.raw = data


def _read_keystore(path: Path) -> _Keystore:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyServiceError(f"cannot read keystore {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyServiceError(f"keystore {path} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != 1:
        raise KeyServiceError(f"keystore {path} has an unknown format")
    return _Keystore(path, data)


def _write_public(keys_dir: Path, region: str, store: Mapping[str, Any]) -> None:
    record = json.dumps(_public_record(region, store), indent=1, sort_keys=True).encode("utf-8")
    path = keys_dir / SEALING_PUB
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == record:
            return
    _fs.atomic_write(path, record, mode=0o644)


def ensure_keystore(keys_dir: Path, region: str) -> Path:
    """Create this region's keystore and public key file if absent; return the keystore path.

    Safe when several processes do it at once: the keystore appears with an if-absent link,
    so exactly one candidate wins and everyone then uses the winner's keys.
    """
    path = keys_dir / KEYSTORE
    if not path.exists():
        _fs.ensure_dir(keys_dir.parent)
        _fs.ensure_dir(keys_dir, mode=0o700)
        _fs.atomic_write(
            path,
            _encode_keystore(_with_new_keys({"format": 1, "region": region})),
            if_absent=True,
            mode=0o600,
        )
    if not (keys_dir / SEALING_PUB).exists():
        _write_public(keys_dir, region, _read_keystore(path).raw)
    return path


# --------------------------------------------------------------------------- sealing


class LocalSealer(Sealer):
    """Seals for one region with its X25519 public key alone (ECIES: ephemeral X25519,
    HKDF-SHA256, AES-256-GCM)."""

    def __init__(self, *, region: str, key_id: str, public_key: bytes) -> None:
        super().__init__(region=region)
        if len(public_key) != X25519_BYTES:
            raise KeyServiceError(f"sealing public key for {region} is not 32 bytes")
        self.key_id = key_id
        self._public = X25519PublicKey.from_public_bytes(public_key)
        self._public_raw = public_key

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        if len(secret) > MAX_SEALED_SECRET:
            raise KeyServiceError(
                f"cannot seal {len(secret)} bytes for {self.region}: at most "
                f"{MAX_SEALED_SECRET} (seal a data key, not data)"
            )
        ctx = canonical_context(context)
        ephemeral = X25519PrivateKey.generate()
        epk = _raw_public(ephemeral.public_key())
        key = _seal_key(ephemeral.exchange(self._public), epk, self._public_raw)
        header = _kid_header(self.key_id) + epk
        nonce = os.urandom(NONCE)
        return header + nonce + AESGCM(key).encrypt(nonce, bytes(secret), header + b"\0" + ctx)

    def __repr__(self) -> str:
        return f"<LocalSealer {self.region} {self.key_id}>"


def load_sealer(keys_dir: Path, region: str) -> LocalSealer:
    """A Sealer from ``<keys_dir>/sealing.pub`` alone."""
    path = keys_dir / SEALING_PUB
    try:
        record = json.loads(path.read_bytes())
        kid, public = record["key_id"], _unb64(record["public"])
        if not isinstance(kid, str):
            raise TypeError
    except FileNotFoundError:
        raise KeyServiceError(f"{path} not found: region {region} has no sealing key yet") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise KeyServiceError(
            f"sealing public key file {path} is unreadable or malformed"
        ) from None
    return LocalSealer(region=region, key_id=kid, public_key=public)


# --------------------------------------------------------------------------- the service


class LocalKeyService(KeyService):
    """One region's keys, kept in ``<root>/keys/keystore.json``."""

    def __init__(
        self, *, root: Path, provider: str, region: str, capabilities: Capabilities
    ) -> None:
        super().__init__(provider=provider, region=region, capabilities=capabilities)
        self.keys_dir = root / "keys"
        self._path = self.keys_dir / KEYSTORE
        self._rotation_lock = _fs.FileLock(self.keys_dir / _LOCK)
        self._lock = threading.Lock()
        self._store: _Keystore | None = None
        #: (inode, mtime, size) of the keystore when last looked at
        self._seen: tuple[int, int, int] | None = None

    # keystore access ---------------------------------------------------------------

    def _load(self, *, refresh: bool = False) -> _Keystore:
        with self._lock:
            if self._store is None or refresh:
                ensure_keystore(self.keys_dir, self.region)
                self._seen = self._stat()  # before the read: a replacement after it shows
                self._store = _read_keystore(self._path)
            return self._store

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _keystore_replaced(self) -> bool:
        """Whether the keystore file is another than the one last read (it is replaced
        whole, atomically, by every rotation)."""
        with self._lock:
            seen = self._seen
        return seen is not None and self._stat() != seen

    def _denied(self, reason: str) -> KeyAccessDenied:
        return KeyAccessDenied(reason, provider=self.provider, region=self.region)

    def _master(self, kid: str) -> bytes | None:
        key = self._load().master.get(kid)
        if key is None:
            # another process may have rotated since this one read the keystore
            key = self._load(refresh=True).master.get(kid)
        return key

    def _sealing_private(self, kid: str) -> X25519PrivateKey | None:
        key = self._load().sealing.get(kid)
        if key is None:
            key = self._load(refresh=True).sealing.get(kid)
        return key

    # KeyService --------------------------------------------------------------------

    @property
    def key_id(self) -> str:
        return self._load().current_master

    def wrapped_key_id(self, wrapped: bytes) -> str | None:
        """The master key id a wrapped data key names (``0x01 | len | kid | ...``), None
        for anything else (verify's old-key warning: core/repository/_verify.py)."""
        blob = bytes(wrapped)
        if len(blob) < 2 or blob[0] != 0x01 or len(blob) < 2 + blob[1]:
            return None
        try:
            return blob[2 : 2 + blob[1]].decode("ascii")
        except UnicodeDecodeError:
            return None

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        ctx = canonical_context(context)
        # another process may have rotated (rotate-keys): new data keys must be wrapped under
        # the key now current, or the old one could not be removed (one stat per data key)
        store = self._load(refresh=self._keystore_replaced())
        kid = store.current_master
        plaintext = os.urandom(32)
        header = _kid_header(kid)
        nonce = os.urandom(NONCE)
        sealed = AESGCM(store.master[kid]).encrypt(nonce, plaintext, self._wrap_aad(kid, ctx))
        return DataKey(plaintext=plaintext, wrapped=header + nonce + sealed, key_id=kid)

    @staticmethod
    def _wrap_aad(kid: str, ctx: bytes) -> bytes:
        return _WRAP_LABEL + b"\0" + kid.encode("ascii") + b"\0" + ctx

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        ctx = canonical_context(context)
        blob = bytes(wrapped)
        try:
            kid, at = _split_header(blob, "wrapped data key")
        except ValueError as exc:
            raise self._denied(f"{exc}: not a data key wrapped by a local KeyService") from None
        if len(blob) != at + NONCE + 32 + 16:
            raise self._denied(f"wrapped data key has the wrong length ({len(blob)} bytes)")
        master = self._master(kid)
        if master is None:
            raise self._denied(
                f"data key is wrapped under master key {kid!r}, which {self.region} does not "
                "hold (another region's key?)"
            )
        nonce = blob[at : at + NONCE]
        try:
            return AESGCM(master).decrypt(nonce, blob[at + NONCE :], self._wrap_aad(kid, ctx))
        except InvalidTag:
            raise self._denied(
                f"wrapped data key (master key {kid!r}) failed authentication: wrong "
                "encryption context or altered bytes"
            ) from None

    def sealer(self) -> LocalSealer:
        ensure_keystore(self.keys_dir, self.region)
        return load_sealer(self.keys_dir, self.region)

    def unseal(self, sealed: bytes, context: Mapping[str, str]) -> bytes:
        ctx = canonical_context(context)
        blob = bytes(sealed)
        try:
            kid, at = _split_header(blob, "sealed secret")
        except ValueError as exc:
            raise self._denied(f"{exc}: not sealed by a local Sealer") from None
        if len(blob) < at + X25519_BYTES + NONCE + 16:
            raise self._denied(f"sealed secret is truncated ({len(blob)} bytes)")
        private = self._sealing_private(kid)
        if private is None:
            raise self._denied(
                f"secret is sealed for key {kid!r}, which {self.region} does not hold "
                "(sealed for another region?)"
            )
        epk = blob[at : at + X25519_BYTES]
        header = blob[: at + X25519_BYTES]
        nonce = blob[at + X25519_BYTES : at + X25519_BYTES + NONCE]
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
        except ValueError:
            raise self._denied("sealed secret carries an invalid ephemeral key") from None
        key = _seal_key(shared, epk, _raw_public(private.public_key()))
        try:
            return AESGCM(key).decrypt(
                nonce, blob[at + X25519_BYTES + NONCE :], header + b"\0" + ctx
            )
        except InvalidTag:
            raise self._denied(
                f"sealed secret (key {kid!r}) failed authentication: wrong encryption "
                "context or altered bytes"
            ) from None

    def rotate(self) -> str:
        """A new master key and a new sealing key become current; old ones stay to unwrap
        and unseal what they protect."""
        ensure_keystore(self.keys_dir, self.region)
        with self._rotation_lock.hold():
            data = _with_new_keys(_read_keystore(self._path).raw)
            _fs.atomic_write(self._path, _encode_keystore(data), mode=0o600)
            _write_public(self.keys_dir, self.region, data)
        self._load(refresh=True)
        return str(data["current_master"])
