"""The hybrid envelope of the providers whose region key is an RSA pair (Azure Key Vault, Cloud
KMS's asymmetric seal key, an HSM's seal pair): a fresh AES-256 key K, wrapped by the region's
public key, encrypts the secret with AES-256-GCM.

::

    magic | u8 n | key reference (n bytes) | u16 m | wrapped K (m bytes) | nonce (12) | GCM(secret)

The key reference names which of the region's keys wrapped K (a Key Vault key version, a Cloud
KMS version number, an HSM key's id); the provider checks it when it opens the envelope. The
AAD is the whole header (magic to wrapped K), a zero byte, and the caller's context bytes
(:func:`regionvault.core.interfaces.context_bytes` of a purpose context), so that neither the
key reference nor the wrapped key can be swapped, and an envelope sealed for one purpose,
region or context opens under no other. Each provider has its own magic, so a blob of one
provider is never mistaken for another's.

Only the public half is needed to seal (another region seals for this one); the provider
unwraps K with its private key and calls :meth:`Envelope.open`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import KeyServiceError

__all__ = ["MAX_SECRET", "NONCE", "TAG", "Envelope", "checked_secret", "seal_envelope"]

#: the largest secret a region seals (a repository's config key set is far below it)
MAX_SECRET = 1024
NONCE = 12
TAG = 16


@dataclass(frozen=True)
class Envelope:
    """One parsed envelope; ``ciphertext`` includes the GCM tag."""

    magic: bytes
    key_ref: bytes
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        return (
            self.magic
            + struct.pack(">B", len(self.key_ref))
            + self.key_ref
            + struct.pack(">H", len(self.wrapped_key))
            + self.wrapped_key
        )

    def aad(self, context: bytes) -> bytes:
        return self.header() + b"\0" + context

    @classmethod
    def parse(cls, magic: bytes, blob: object) -> Envelope | None:
        """The envelope in ``blob``, or None when it is not one of ``magic``'s (not bytes,
        another magic, cut short, or a length that does not add up)."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            return None
        data = bytes(blob)
        if not data.startswith(magic):
            return None
        try:
            at = len(magic)
            (n,) = struct.unpack_from(">B", data, at)
            key_ref = data[at + 1 : at + 1 + n]
            at += 1 + n
            (m,) = struct.unpack_from(">H", data, at)
        except struct.error:
            return None
        wrapped = data[at + 2 : at + 2 + m]
        at += 2 + m
        nonce, ciphertext = data[at : at + NONCE], data[at + NONCE :]
        if (
            len(key_ref) != n
            or n == 0
            or len(wrapped) != m
            or m == 0
            or len(nonce) != NONCE
            or len(ciphertext) < TAG
        ):
            return None
        return cls(magic, key_ref, wrapped, nonce, ciphertext)

    def open(self, inner: bytes, context: bytes) -> bytes | None:
        """The secret, with ``inner`` (K as the private key unwrapped it) and the context the
        sealer used; None when it does not open (another context, altered bytes, a wrong K)."""
        if len(inner) != 32:
            return None
        try:
            return AESGCM(bytes(inner)).decrypt(self.nonce, self.ciphertext, self.aad(context))
        except InvalidTag:
            return None


def seal_envelope(
    magic: bytes, key_ref: bytes, wrap: Callable[[bytes], bytes], secret: bytes, context: bytes
) -> bytes:
    """The envelope of ``secret`` under a fresh K that ``wrap`` (the region's public key,
    RSA-OAEP) wraps; ``key_ref`` names that key, ``context`` is bound as above."""
    if not 0 < len(key_ref) < 256:
        raise ValueError(f"a key reference is 1 to 255 bytes, not {len(key_ref)}")
    inner = AESGCM.generate_key(bit_length=256)
    envelope = Envelope(magic, bytes(key_ref), bytes(wrap(inner)), os.urandom(NONCE), b"")
    sealed = AESGCM(inner).encrypt(envelope.nonce, bytes(secret), envelope.aad(context))
    return envelope.header() + envelope.nonce + sealed


def checked_secret(secret: object, *, provider: str, region: str) -> bytes:
    """``secret`` as bytes, or :class:`KeyServiceError` when it is not bytes or is over
    :data:`MAX_SECRET` bytes (what every sealer refuses alike)."""
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise KeyServiceError("a sealed secret must be bytes", provider=provider, region=region)
    if len(secret) > MAX_SECRET:
        raise KeyServiceError(
            f"secret of {len(secret)} bytes is over the {MAX_SECRET}-byte seal limit",
            provider=provider,
            region=region,
        )
    return bytes(secret)
