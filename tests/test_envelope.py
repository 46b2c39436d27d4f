"""The core's hybrid seal envelope (core/envelope.py): what it binds, and what it refuses to
parse or open."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from regionvault.core.envelope import (
    MAX_SECRET,
    NONCE,
    TAG,
    Envelope,
    checked_secret,
    seal_envelope,
)
from regionvault.core.errors import KeyServiceError

MAGIC = b"RVTEST1"
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture(scope="module")
def pair() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sealed(pair: rsa.RSAPrivateKey, secret: bytes = b"s3cret", context: bytes = b"ctx") -> bytes:
    public = pair.public_key()
    return seal_envelope(MAGIC, b"v7", lambda k: public.encrypt(k, OAEP), secret, context)


def opened(pair: rsa.RSAPrivateKey, blob: bytes, context: bytes = b"ctx") -> bytes | None:
    envelope = Envelope.parse(MAGIC, blob)
    assert envelope is not None
    return envelope.open(pair.decrypt(envelope.wrapped_key, OAEP), context)


def test_round_trip_names_the_key_and_hides_the_secret(pair: rsa.RSAPrivateKey) -> None:
    blob = sealed(pair, b"the config key")
    envelope = Envelope.parse(MAGIC, blob)
    assert envelope is not None and envelope.key_ref == b"v7"
    assert b"the config key" not in blob
    assert opened(pair, blob) == b"the config key"
    # a fresh K and nonce each time
    assert sealed(pair, b"the config key") != blob


def test_another_context_does_not_open(pair: rsa.RSAPrivateKey) -> None:
    assert opened(pair, sealed(pair, context=b"region a"), b"region b") is None


def test_every_flipped_byte_is_refused(pair: rsa.RSAPrivateKey) -> None:
    blob = sealed(pair)
    envelope = Envelope.parse(MAGIC, blob)
    assert envelope is not None
    inner = pair.decrypt(envelope.wrapped_key, OAEP)
    for at in range(len(blob)):
        bad = bytearray(blob)
        bad[at] ^= 0x01
        parsed = Envelope.parse(MAGIC, bytes(bad))
        if parsed is None:
            continue  # the magic or a length no longer adds up
        # the header (key reference, wrapped K) is in the AAD: opening with the right K fails
        assert parsed.open(inner, b"ctx") is None, at


def test_a_swapped_key_reference_is_refused(pair: rsa.RSAPrivateKey) -> None:
    blob = sealed(pair)
    swapped = blob.replace(b"\x02v7", b"\x02v8", 1)
    assert opened(pair, swapped) is None


@pytest.mark.parametrize(
    "blob",
    [b"", MAGIC, MAGIC + b"\x02v7", MAGIC + b"\x00\x00\x00", b"RVOTHER" + b"\x00" * 80, 12345],
)
def test_what_is_not_an_envelope_parses_to_none(blob: object) -> None:
    assert Envelope.parse(MAGIC, blob) is None


def test_cut_short_parses_to_none(pair: rsa.RSAPrivateKey) -> None:
    blob = sealed(pair)
    for length in range(len(blob) - TAG - len(b"s3cret")):
        assert Envelope.parse(MAGIC, blob[:length]) is None, length
    assert NONCE == 12


def test_a_wrong_size_inner_key_does_not_open(pair: rsa.RSAPrivateKey) -> None:
    envelope = Envelope.parse(MAGIC, sealed(pair))
    assert envelope is not None
    assert envelope.open(b"\x00" * 16, b"ctx") is None


def test_secret_limits_name_the_provider() -> None:
    assert checked_secret(bytearray(b"ab"), provider="p", region="r") == b"ab"
    with pytest.raises(KeyServiceError, match=f"over the {MAX_SECRET}-byte seal limit"):
        checked_secret(b"x" * (MAX_SECRET + 1), provider="p", region="r")
    with pytest.raises(KeyServiceError, match="must be bytes"):
        checked_secret("text", provider="p", region="r")


def test_a_key_reference_must_fit_its_length_byte(pair: rsa.RSAPrivateKey) -> None:
    public = pair.public_key()
    for ref in (b"", b"x" * 256):
        with pytest.raises(ValueError, match="key reference"):
            seal_envelope(MAGIC, ref, lambda k: public.encrypt(k, OAEP), b"s", b"c")
