"""Key derivation, key commitment and AES-256-GCM sealing of objects and blobs.

Every encryption key is derived from a 256-bit secret (the repository master key, a KMS data
key) and a fresh random 256-bit salt with BLAKE3 in key-derivation mode; a second derivation
from the same input is the key commitment, stored next to the salt and checked before any
decryption, so a wrong key fails loudly instead of "decrypting" to garbage.
"""

from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass, field

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _format as fmt

__all__ = [
    "KEY_SIZE",
    "SALT_SIZE",
    "PackKey",
    "compress",
    "decompress",
    "derive",
    "open_sealed",
    "seal",
    "zstd_d",
]

KEY_SIZE = 32
SALT_SIZE = 32
_ENC_CONTEXT = "regionvault 2025-01 v1 AES-256-GCM key"
_COMMIT_CONTEXT = "regionvault 2025-01 v1 key commitment"
#: sealed objects use a key that is unique to the object (fresh salt), so one fixed nonce
_ZERO_NONCE = bytes(12)

_local = threading.local()


def _zstd_c(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    found = cache.get(level)
    if found is None:
        found = cache[level] = zstandard.ZstdCompressor(level=level)
    return found


def zstd_d() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if found is None:
        found = _local.zd = zstandard.ZstdDecompressor()
    return found


def compress(data: bytes | memoryview, level: int) -> bytes:
    return _zstd_c(level).compress(data)


def decompress(name: str, data: bytes | memoryview, raw_length: int) -> bytes:
    try:
        out: bytes = zstd_d().decompress(data, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise IntegrityError(name, f"compressed data is damaged ({exc})") from None
    if len(out) != raw_length:
        raise IntegrityError(name, f"decompressed to {len(out)} bytes, expected {raw_length}")
    return out


def derive(secret: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """``(encryption key, commitment)`` for ``secret`` and ``salt``."""
    material = secret + salt
    enc = blake3.blake3(material, derive_key_context=_ENC_CONTEXT).digest()
    commitment = blake3.blake3(material, derive_key_context=_COMMIT_CONTEXT).digest()
    return enc, commitment


def seal(
    *,
    vault_id: str,
    kind: fmt.ObjectKind,
    name: str,
    body: bytes,
    secret: bytes,
    key_source: int = fmt.KEY_SOURCE_MASTER,
    wrapped_key: bytes = b"",
    compress_level: int | None = 3,
) -> bytes:
    """A sealed object (see docs/format.md, "Sealed objects")."""
    flags = 0
    if compress_level is not None and len(body) > 64:
        packed = compress(body, compress_level)
        if len(packed) < len(body):
            body, flags = packed, fmt.ENVELOPE_FLAG_ZSTD
    salt = os.urandom(SALT_SIZE)
    enc, commitment = derive(secret, salt)
    header = fmt.EnvelopeHeader.build(
        kind,
        key_source=key_source,
        flags=flags,
        salt=salt,
        commitment=commitment,
        wrapped_key=wrapped_key,
    )
    aad = fmt.envelope_aad(vault_id, kind, name, header.raw)
    return header.raw + AESGCM(enc).encrypt(_ZERO_NONCE, body, aad)


def open_sealed(
    *, vault_id: str, name: str, data: bytes, header: fmt.EnvelopeHeader, secret: bytes
) -> bytes:
    """The body of a sealed object whose header was parsed, with ``secret`` its key."""
    enc, commitment = derive(secret, header.salt)
    if not hmac.compare_digest(commitment, header.commitment):
        raise IntegrityError(name, "key commitment does not match: wrong key or altered header")
    aad = fmt.envelope_aad(vault_id, header.kind, name, header.raw)
    try:
        body = AESGCM(enc).decrypt(_ZERO_NONCE, memoryview(data)[header.size :], aad)
    except InvalidTag:
        raise IntegrityError(name, "authentication failed: the object was altered") from None
    if header.flags & fmt.ENVELOPE_FLAG_ZSTD:
        try:
            body = zstd_d().decompress(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(name, f"body does not decompress ({exc})") from None
    return body


@dataclass
class PackKey:
    """The cipher of one pack: its derived key, commitment and AAD prefix."""

    name: str
    header: fmt.PackHeader
    aead: AESGCM = field(repr=False)
    aad_prefix: bytes = field(repr=False)

    @classmethod
    def make(cls, *, vault_id: str, name: str, header: fmt.PackHeader, data_key: bytes) -> PackKey:
        enc, commitment = derive(data_key, header.salt)
        if not hmac.compare_digest(commitment, header.commitment):
            raise IntegrityError(name, "key commitment does not match: wrong key or altered header")
        return cls(name, header, AESGCM(enc), fmt.pack_aad_prefix(vault_id, name, header.raw))

    def encrypt_blob_into(
        self,
        out: memoryview,
        offset: int,
        chunk_id: bytes,
        blob_type: int,
        flags: int,
        raw_length: int,
        payload: bytes | memoryview,
    ) -> int:
        aad = fmt.blob_aad(self.aad_prefix, chunk_id, blob_type, flags, raw_length)
        return self.aead.encrypt_into(fmt.nonce_at(offset), payload, aad, out)

    def decrypt_blob(
        self,
        ciphertext: bytes | memoryview,
        offset: int,
        chunk_id: bytes,
        blob_type: int,
        flags: int,
        raw_length: int,
    ) -> bytes:
        aad = fmt.blob_aad(self.aad_prefix, chunk_id, blob_type, flags, raw_length)
        try:
            return self.aead.decrypt(fmt.nonce_at(offset), ciphertext, aad)
        except InvalidTag:
            raise IntegrityError(
                self.name,
                f"blob {chunk_id.hex()[:16]} at offset {offset} failed authentication "
                "(altered, or indexed wrongly)",
            ) from None

    def encrypt_table(self, offset: int, table: bytes) -> bytes:
        return self.aead.encrypt(fmt.nonce_at(offset), table, fmt.table_aad(self.aad_prefix))

    def decrypt_table(self, offset: int, ciphertext: bytes | memoryview) -> bytes:
        try:
            return self.aead.decrypt(
                fmt.nonce_at(offset), ciphertext, fmt.table_aad(self.aad_prefix)
            )
        except InvalidTag:
            raise IntegrityError(self.name, "blob table failed authentication") from None
