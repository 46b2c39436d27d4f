"""The seal-only half of the pkcs11 provider: what another region needs to seal a secret for
a pkcs11 region, from the PEM of its public key alone (no token, no PIN, no python-pkcs11).
The envelope is described in keys.py."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from regionvault.core.errors import KeyServiceError
from regionvault.core.interfaces import Sealer, context_bytes, purpose_context

__all__ = ["MAX_SECRET", "OAEP", "SEAL_MAGIC", "Pkcs11Sealer", "public_key_id"]

SEAL_MAGIC = b"RVPS1"
MAX_SECRET = 1024
_SEAL = "seal"
_NONCE, _TAG, _KEY_ID = 12, 16, 16
#: SoftHSM 2.6 decrypts RSA-OAEP with SHA-1 (and MGF1-SHA-1) only
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def public_key_id(public_key: rsa.RSAPublicKey) -> bytes:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:_KEY_ID]


def _aad(header: bytes, context: Mapping[str, str], purpose: str, region: str) -> bytes:
    return (
        header
        + b"\0"
        + context_bytes(purpose_context(context, purpose, provider="pkcs11", region=region))
    )


def _seal_header(key_id: bytes, wrapped: bytes) -> bytes:
    return SEAL_MAGIC + key_id + struct.pack(">H", len(wrapped)) + wrapped


class Pkcs11Sealer(Sealer):
    """Seals for one region with its RSA public key alone: it cannot unseal."""

    def __init__(self, *, region: str, public_key: rsa.RSAPublicKey) -> None:
        super().__init__(region=region)
        self._public_key = public_key
        self._key_id = public_key_id(public_key)

    @classmethod
    def from_pem(cls, region: str, pem: bytes) -> Pkcs11Sealer:
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, rsa.RSAPublicKey):
            raise KeyServiceError("the public key is not RSA", provider="pkcs11", region=region)
        return cls(region=region, public_key=key)

    def seal(self, secret: bytes, context: Mapping[str, str]) -> bytes:
        if not isinstance(secret, bytes | bytearray | memoryview):
            raise KeyServiceError(
                "a sealed secret must be bytes", provider="pkcs11", region=self.region
            )
        if len(secret) > MAX_SECRET:
            raise KeyServiceError(
                f"secret of {len(secret)} bytes is over the {MAX_SECRET}-byte seal limit",
                provider="pkcs11",
                region=self.region,
            )
        inner = AESGCM.generate_key(bit_length=256)
        header = _seal_header(self._key_id, self._public_key.encrypt(inner, OAEP))
        nonce = os.urandom(_NONCE)
        aad = _aad(header, context, _SEAL, self.region)
        return header + nonce + AESGCM(inner).encrypt(nonce, bytes(secret), aad)
