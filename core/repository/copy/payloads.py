"""Transit payloads: how every payload of the copy protocol is sealed for the region that
receives it (docs/copy.md, "Payloads").

A payload carries its session's 256-bit transfer key sealed with the receiver's Sealer (the
sender may seal, never unseal; a send run's batches share one session, so one seal and one
unseal), is AES-256-GCM encrypted under a key derived from it and the payload's name, bound
to its kind and direction, and ends with a BLAKE3 checksum, so damage anywhere is an
:class:`IntegrityError` naming the payload before any KeyService is asked. Nothing in an
inbox is plaintext.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import TYPE_CHECKING

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import IntegrityError

if TYPE_CHECKING:
    from regionvault.core.interfaces import KeyService, Sealer

__all__ = ["TransitSession", "UnsealedKeys", "open_payload", "seal_payload"]

#: a payload sealed under a transfer key of its own, its name in the sealing context
_MAGIC_V1 = b"RVT1"
#: a payload of a session: one transfer key sealed once per session (a send run), each
#: payload under a key derived from it and the payload's name
_MAGIC = b"RVT2"
_LEN = struct.Struct(">H")
_SESSION_ID = 16
#: the trailing BLAKE3 checksum of everything before it
_SUM = 32


def _context(name: str, kind: str, source: str, destination: str) -> dict[str, str]:
    return {
        "purpose": "regionvault-transit",
        "kind": kind,
        "name": name,
        "source": source,
        "destination": destination,
    }


def _session_context(session: bytes, kind: str, source: str, destination: str) -> dict[str, str]:
    return {
        "purpose": "regionvault-transit",
        "kind": kind,
        "session": session.hex(),
        "source": source,
        "destination": destination,
    }


def _payload_key(transfer_key: bytes, name: str) -> bytes:
    """The AES key of payload ``name`` in a session: BLAKE3 keyed by the transfer key."""
    return blake3.blake3(_MAGIC + name.encode(), key=transfer_key).digest()


class TransitSession:
    """Payloads of one kind, from one region to another, under one transfer key: it is
    sealed for the receiver (one :meth:`Sealer.seal` call, at the first payload) and each
    payload is encrypted under a key derived from it and the payload's name (docs/copy.md,
    "Payloads"). A send run uses one session for all its batches."""

    def __init__(self, sealer: Sealer, *, kind: str, source: str, destination: str) -> None:
        self.sealer = sealer
        self.kind = kind
        self.source = source
        self.destination = destination
        self.id = os.urandom(_SESSION_ID)
        self._key: bytes | None = None
        self._sealed_key = b""
        self._lock = threading.Lock()

    def _transfer_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                key = AESGCM.generate_key(bit_length=256)
                context = _session_context(self.id, self.kind, self.source, self.destination)
                self._sealed_key = self.sealer.seal(key, context)
                self._key = key
            return self._key

    def seal(self, name: str, body: bytes) -> bytes:
        """``body`` encrypted for the receiver, bound to ``name``."""
        key = self._transfer_key()
        nonce = os.urandom(12)
        head = b"".join(
            (_MAGIC, _LEN.pack(len(self._sealed_key)), self._sealed_key, self.id, nonce)
        )
        sealed_body = AESGCM(_payload_key(key, name)).encrypt(nonce, body, _MAGIC + name.encode())
        checksum = blake3.blake3(head)
        checksum.update(sealed_body)
        return b"".join((head, sealed_body, checksum.digest()))


#: transfer keys a receiver has unsealed, by (sealed key, session, kind, source, destination)
UnsealedKeys = dict[tuple[bytes, bytes, str, str, str], bytes]


def seal_payload(
    sealer: Sealer, name: str, body: bytes, *, kind: str, source: str, destination: str
) -> bytes:
    """Encrypt ``body`` for ``sealer``'s region in a session of its own (one seal)."""
    session = TransitSession(sealer, kind=kind, source=source, destination=destination)
    return session.seal(name, body)


def open_payload(
    keys: KeyService,
    name: str,
    data: bytes,
    *,
    kind: str,
    source: str,
    destination: str,
    unsealed: UnsealedKeys | None = None,
) -> bytes:
    """Open a payload sealed for ``keys``' region; :class:`KeyAccessDenied` if it was sealed
    for another region, :class:`IntegrityError` naming it if it was damaged or altered.

    ``unsealed``, kept by a receiver across the payloads of one run, saves unsealing a
    session's transfer key again for each of its payloads (the key is cached under the
    sealed key and the exact context it was unsealed with)."""
    magic = data[:4]
    if magic not in (_MAGIC, _MAGIC_V1):
        raise IntegrityError(name, "not a sealed transit payload")
    session_len = _SESSION_ID if magic == _MAGIC else 0
    view = memoryview(data)
    least = 6 + session_len + 12 + 16 + _SUM
    if len(data) < least or blake3.blake3(view[:-_SUM]).digest() != data[-_SUM:]:
        raise IntegrityError(name, "transit payload is damaged (checksum mismatch)")
    (n,) = _LEN.unpack_from(data, 4)
    if len(data) < least + n:
        raise IntegrityError(name, "transit payload is truncated")
    sealed_key = data[6 : 6 + n]
    at = 6 + n
    if magic == _MAGIC_V1:
        key = keys.unseal(sealed_key, _context(name, kind, source, destination))
    else:
        session = data[at : at + _SESSION_ID]
        at += _SESSION_ID
        cache_key = (sealed_key, session, kind, source, destination)
        transfer = unsealed.get(cache_key) if unsealed is not None else None
        if transfer is None:
            context = _session_context(session, kind, source, destination)
            transfer = keys.unseal(sealed_key, context)
            if unsealed is not None:
                unsealed[cache_key] = transfer
        key = _payload_key(transfer, name)
    nonce = data[at : at + 12]
    try:
        return AESGCM(key).decrypt(nonce, view[at + 12 : -_SUM], magic + name.encode())
    except InvalidTag:
        raise IntegrityError(name, "transit payload failed authentication (altered)") from None
