"""The seal-only half of the pkcs11 provider: what another region needs to seal a secret for
a pkcs11 region, from the PEM of its public key alone (no token, no PIN, no python-pkcs11).
The envelope is described in keys.py."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from regionvault.core.envelope import MAX_SECRET, checked_secret, seal_envelope
from regionvault.core.errors import KeyServiceError
from regionvault.core.interfaces import Sealer, context_bytes, purpose_context

__all__ = [
    "MAX_SECRET",
    "OAEP",
    "SEAL_MAGIC",
    "Pkcs11Sealer",
    "public_key_id",
    "region_bytes",
    "seal_context",
]

SEAL_MAGIC = b"RVPS3"
_SEAL = "seal"
_KEY_ID = 16
#: SoftHSM 2.6 decrypts RSA-OAEP with SHA-1 (and MGF1-SHA-1) only
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def public_key_id(public_key: rsa.RSAPublicKey) -> bytes:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:_KEY_ID]


def region_bytes(region: str) -> bytes:
    """The region's name as the AAD carries it (``u16 length | UTF-8``): a wrap or a seal of
    one region opens in no other, even where two regions' keys are one object."""
    name = region.encode("utf-8")
    return struct.pack(">H", len(name)) + name


def seal_context(context: Mapping[str, str], region: str) -> bytes:
    """The context bytes a sealed secret of ``region`` is bound to: the region's name, a zero
    byte, the canonical context with ``regionvault:purpose = seal``."""
    purposed = purpose_context(context, _SEAL, provider="pkcs11", region=region)
    return region_bytes(region) + b"\0" + context_bytes(purposed)


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
        plain = checked_secret(secret, provider="pkcs11", region=self.region)
        return seal_envelope(
            SEAL_MAGIC,
            self._key_id,
            lambda k: self._public_key.encrypt(k, OAEP),
            plain,
            seal_context(context, self.region),
        )
