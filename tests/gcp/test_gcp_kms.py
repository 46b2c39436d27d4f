"""The Cloud KMS KeyService and Sealer, with the unmodified KeyManagementServiceClient over
gRPC against the KMS fake shipped in the provider (providers/gcp/fakes/kms.py): two fakes,
two regions, each test its own key ring. The KeyService suite of core/conformance runs
against them; the other tests check what the client sends (CRC32C fields, the context as
additional authenticated data), what each operation costs in calls, the sealer's single
permission, rotation, and the mapping of Cloud KMS's status codes.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "google.cloud.kms_v1", reason="the GCP tests need google-cloud-kms: pip install -e '.[test]'"
)

import grpc
from google.api_core import exceptions as gexc
from google.cloud.kms_v1 import types
from kms_world import (
    EAST,
    WEST,
    KmsWorld,
    LiveKmsWorld,
    seal_in_another_process,
    two_fakes,
    world_on,
)
from regionvault.core.conformance.fixtures import SealElsewhere
from regionvault.core.conformance.keys import KeyServiceSuite
from regionvault.core.errors import ConfigError, KeyAccessDenied, KeyServiceError, TransientError
from regionvault.core.interfaces import KeyService, Sealer
from regionvault.providers.gcp.fakes.kms import KmsFake, crc32c
from regionvault.providers.gcp.kms import DATA_KEY_MAGIC, SEAL_MAGIC, GcpKeyService, GcpSealer

CTX = {"vault": "v-1", "kind": "pack", "name": "packs/00/abc"}
_State = types.CryptoKeyVersion.CryptoKeyVersionState
_Purpose = types.CryptoKey.CryptoKeyPurpose


def sealed_version(blob: bytes) -> str:
    """The version number a sealed envelope names."""
    assert blob.startswith(SEAL_MAGIC)
    n = blob[len(SEAL_MAGIC)]
    return blob[len(SEAL_MAGIC) + 1 : len(SEAL_MAGIC) + 1 + n].decode("ascii")


@pytest.fixture(scope="module")
def kms_fakes() -> Iterator[dict[str, KmsFake]]:
    yield from two_fakes()


@pytest.fixture
def kms_world(kms_fakes: dict[str, KmsFake], tmp_path: Path) -> Iterator[KmsWorld]:
    yield from world_on(kms_fakes, tmp_path)


# ---------------------------------------------------------------------- the suite


class TestCloudKmsKeyService(KeyServiceSuite):
    """core/conformance's KeyService suite: region A on one KMS fake, B on the other."""

    @pytest.fixture
    def keys_a(self, kms_world: KmsWorld) -> KeyService:
        return kms_world.keys(EAST)

    @pytest.fixture
    def keys_b(self, kms_world: KmsWorld) -> KeyService:
        return kms_world.keys(WEST)

    @pytest.fixture
    def sealer_a(self, kms_world: KmsWorld) -> Sealer:
        return kms_world.sealer(EAST, create=False)

    @pytest.fixture
    def sealer_b(self, kms_world: KmsWorld) -> Sealer:
        return kms_world.sealer(WEST, create=False)

    @pytest.fixture
    def seal_elsewhere(self, kms_world: KmsWorld) -> SealElsewhere:
        regions = {"gcp:east": EAST, "gcp:west": WEST}

        def seal(region: str, secret: bytes, context: Mapping[str, str]) -> bytes:
            name = regions[region]
            settings = kms_world.settings(name, create=False)
            return seal_in_another_process(settings, name, secret, context)

        return seal

    @pytest.fixture(autouse=True)
    def _keys_exist(self, keys_a: KeyService, keys_b: KeyService) -> None:
        """Sealers are built from configuration with create = false, as in production: the
        regions' keys exist before anyone seals for them."""
        keys_a.key_id  # noqa: B018
        keys_b.key_id  # noqa: B018


def _live_settings() -> Any:
    """The live settings when ``REGIONVAULT_GCP_LIVE=1`` (None otherwise, or when
    providers/gcp/testing.py is not there yet)."""
    try:
        testing = importlib.import_module("regionvault.providers.gcp.testing")
    except ImportError:
        return None
    return testing.LiveSettings.from_environment() if testing.live_mode() else None


@pytest.mark.skipif(
    os.environ.get("REGIONVAULT_GCP_LIVE") != "1",
    reason="live Cloud KMS: set REGIONVAULT_GCP_LIVE=1 and the variables of docs/gcp.md",
)
class TestLiveCloudKmsKeyService(TestCloudKmsKeyService):
    """The same suite against real Cloud KMS in the live regions' locations."""

    @pytest.fixture
    def kms_world(self, tmp_path: Path) -> Iterator[KmsWorld]:
        live = _live_settings()
        if live is None:
            pytest.skip("providers/gcp/testing.py (live settings) is not installed")
        world = LiveKmsWorld(live, tmp_path)
        try:
            yield world
        finally:
            world.close()


# ---------------------------------------------------------------------- data keys


def test_data_keys_are_wrapped_by_encrypt_with_the_context_and_crc32c(
    kms_world: KmsWorld,
) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    key_path = kms_world.key_path(EAST)
    assert keys.key_id == f"{key_path}/cryptoKeyVersions/1"
    before = len(fake.requests)
    dk = keys.generate_data_key(CTX)
    assert len(dk.plaintext) == 32 and dk.plaintext not in dk.wrapped
    assert dk.key_id == keys.key_id and dk.wrapped.startswith(DATA_KEY_MAGIC)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    (encrypt, decrypt) = fake.requests[before:]
    assert (encrypt.method, decrypt.method) == ("Encrypt", "Decrypt")
    # the key, not a version: Cloud KMS picks the primary and its ciphertext names it
    assert encrypt.request.name == key_path and decrypt.request.name == key_path
    aad = json.loads(encrypt.request.additional_authenticated_data)
    assert aad == {**CTX, "regionvault:purpose": "data-key"}
    assert decrypt.request.additional_authenticated_data == (
        encrypt.request.additional_authenticated_data
    )
    # every data field goes with its CRC32C, and the fake checked them
    assert encrypt.request.plaintext_crc32c == crc32c(encrypt.request.plaintext)
    assert encrypt.request.additional_authenticated_data_crc32c == crc32c(
        encrypt.request.additional_authenticated_data
    )
    assert decrypt.request.ciphertext_crc32c == crc32c(decrypt.request.ciphertext)
    assert decrypt.request.ciphertext == dk.wrapped[len(DATA_KEY_MAGIC) :]
    assert encrypt.code == decrypt.code == grpc.StatusCode.OK

    # one Encrypt per data key, one Decrypt per unwrap: nothing else once resolved
    before = len(fake.requests)
    more = [keys.generate_data_key({**CTX, "name": f"n{i}"}) for i in range(5)]
    for i, key in enumerate(more):
        assert keys.unwrap(key.wrapped, {**CTX, "name": f"n{i}"}) == key.plaintext
    assert fake.methods()[before:] == ["Encrypt"] * 5 + ["Decrypt"] * 5


def test_create_makes_the_key_ring_and_both_keys_once(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    before = len(fake.requests)
    keys.key_id  # noqa: B018
    assert [(r.method, r.code.name) for r in fake.requests[before:]] == [
        ("GetCryptoKey", "NOT_FOUND"),
        ("CreateCryptoKey", "NOT_FOUND"),  # no key ring yet
        ("CreateKeyRing", "OK"),
        ("CreateCryptoKey", "OK"),
        ("GetCryptoKey", "NOT_FOUND"),
        ("CreateCryptoKey", "OK"),
        ("GetCryptoKeyVersion", "OK"),  # the seal key's first version is ENABLED
    ]
    symmetric = keys.client.get_crypto_key(name=kms_world.key_path(EAST))
    seal = keys.client.get_crypto_key(name=kms_world.key_path(EAST, "regionvault-seal"))
    assert symmetric.purpose == _Purpose.ENCRYPT_DECRYPT
    assert symmetric.primary.state == _State.ENABLED
    assert seal.purpose == _Purpose.ASYMMETRIC_DECRYPT
    assert (
        seal.version_template.algorithm
        == types.CryptoKeyVersion.CryptoKeyVersionAlgorithm.RSA_DECRYPT_OAEP_3072_SHA256
    )
    assert symmetric.labels["regionvault-region"] == "gcp-east"
    # another KeyService on the same settings finds them, makes nothing
    before = len(fake.requests)
    again = kms_world.keys(EAST, create=False)
    assert again.key_id == keys.key_id
    assert fake.methods()[before:] == ["GetCryptoKey", "GetCryptoKey"]
    assert [state for _name, state in fake.versions(kms_world.key_path(EAST))] == ["ENABLED"]


def test_a_missing_key_without_create_is_named(kms_world: KmsWorld) -> None:
    keys = kms_world.keys(EAST, create=False)
    with pytest.raises(KeyServiceError, match=f"{kms_world.key_path(EAST)} does not exist"):
        keys.generate_data_key(CTX)
    sealer = kms_world.sealer(EAST, create=False)
    with pytest.raises(KeyServiceError, match="regionvault-seal does not exist"):
        sealer.seal(b"s", CTX)


def test_a_key_of_the_wrong_purpose_is_a_config_error(kms_world: KmsWorld) -> None:
    # the seal key named as the data key: an ASYMMETRIC_DECRYPT key cannot Encrypt
    kms_world.keys(EAST).key_id  # noqa: B018 - the key ring and the keys exist
    wrong = kms_world.keys(EAST, key_name="regionvault-seal", seal_key_name="other-seal")
    with pytest.raises(ConfigError, match="purpose ASYMMETRIC_DECRYPT") as err:
        wrong.generate_data_key(CTX)
    assert err.value.key is not None and err.value.key.endswith("key_name")
    swapped = kms_world.keys(EAST, key_name="other", seal_key_name="regionvault", create=True)
    with pytest.raises(ConfigError, match="purpose ENCRYPT_DECRYPT") as err:
        swapped.key_id  # noqa: B018
    assert err.value.key is not None and err.value.key.endswith("seal_key_name")


def test_context_binds_every_wrap_and_seal(kms_world: KmsWorld) -> None:
    keys = kms_world.keys(EAST)
    fake = kms_world.fakes[EAST]
    dk = keys.generate_data_key(CTX)
    for other in ({**CTX, "name": "packs/00/abd"}, {}, {**CTX, "extra": "x"}):
        with pytest.raises(KeyAccessDenied, match="INVALID_ARGUMENT: Decryption failed"):
            keys.unwrap(dk.wrapped, other)
    sealed = keys.seal(b"s" * 32, CTX)
    with pytest.raises(KeyAccessDenied, match="context differs"):
        keys.unseal(sealed, {**CTX, "kind": "index"})
    # a wrapped data key is not a sealed secret, nor the reverse, even under one context
    before = len(fake.requests)
    with pytest.raises(KeyAccessDenied, match="not a secret sealed"):
        keys.unseal(dk.wrapped, CTX)
    with pytest.raises(KeyAccessDenied, match="not a data key"):
        keys.unwrap(sealed, CTX)
    for junk in (b"", DATA_KEY_MAGIC, SEAL_MAGIC, b"not an envelope at all"):
        with pytest.raises(KeyAccessDenied):
            keys.unwrap(junk, CTX)
        with pytest.raises(KeyAccessDenied):
            keys.unseal(junk, CTX)
    assert fake.methods()[before:] == []  # junk is refused without asking Cloud KMS
    # every byte of a sealed envelope is authenticated: version, wrapped key, nonce, text
    for index in (len(SEAL_MAGIC) + 1, 20, len(sealed) - 40, len(sealed) - 1):
        forged = bytearray(sealed)
        forged[index] ^= 1
        with pytest.raises(KeyAccessDenied):
            keys.unseal(bytes(forged), CTX)
    with pytest.raises(KeyServiceError, match="reserved"):
        keys.generate_data_key({"regionvault:purpose": "seal"})
    with pytest.raises(KeyServiceError, match="1024-byte"):
        keys.seal(b"x" * 1025, CTX)
    assert keys.unseal(keys.seal(b"x" * 1024, CTX), CTX) == b"x" * 1024
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext


def test_regions_and_keys_cannot_open_each_others_material(kms_world: KmsWorld) -> None:
    east, west = kms_world.keys(EAST), kms_world.keys(WEST)
    # another key ring in the same fake and location is just as foreign as another region
    neighbour = kms_world.keys(EAST, key_ring=f"{kms_world.key_ring}-n")
    east_key = east.generate_data_key(CTX)
    east_sealed = east.seal(b"chunk-id key", CTX)
    for other in (west, neighbour):
        with pytest.raises(KeyAccessDenied) as denied:
            other.unwrap(east_key.wrapped, CTX)
        assert other.region in str(denied.value) and other.key_path in str(denied.value)
        # the envelope names version 1, which other seal keys have too: RSA-OAEP fails
        assert sealed_version(east_sealed) == "1"
        with pytest.raises(KeyAccessDenied, match="INVALID_ARGUMENT"):
            other.unseal(east_sealed, CTX)
    assert east.unseal(east_sealed, CTX) == b"chunk-id key"


def test_one_key_service_from_many_threads(kms_world: KmsWorld) -> None:
    """The engine's workers share a region's KeyService: first use, wraps, seals and
    unwraps from eight threads at once make each key once, and everything opens."""
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    before = len(fake.requests)

    def work(n: int) -> bool:
        context = {**CTX, "name": f"packs/{n}"}
        dk = keys.generate_data_key(context)
        sealed = keys.seal(b"%d" % n, context)
        return (
            keys.unwrap(dk.wrapped, context) == dk.plaintext
            and keys.unseal(sealed, context) == b"%d" % n
        )

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(40)))
    made = [r.method for r in fake.requests[before:] if r.code == grpc.StatusCode.OK]
    assert made.count("CreateCryptoKey") == 2 and made.count("CreateKeyRing") == 1
    assert len(fake.versions(kms_world.key_path(EAST))) == 1


# ---------------------------------------------------------------------- sealing


def test_a_sealer_needs_only_get_public_key(kms_world: KmsWorld) -> None:
    """Another region's identity, allowed nothing but GetPublicKey (the permission
    cloudkms.cryptoKeyVersions.viewPublicKey), seals for east: two GetPublicKey calls
    (version 1 exists, version 2 does not), then none."""
    fake = kms_world.fakes[EAST]
    owner = kms_world.keys(EAST)
    owner.key_id  # noqa: B018
    fake.restrict({"GetPublicKey"})
    before = len(fake.requests)
    sealer = kms_world.sealer(EAST, create=False)
    sealed = [sealer.seal(b"k" * 32, CTX) for _ in range(3)]
    assert fake.methods()[before:] == ["GetPublicKey", "GetPublicKey"]
    assert [r.request.name.rpartition("/")[2] for r in fake.requests[before:]] == ["1", "2"]
    fake.restrict(None)
    for blob in sealed:
        assert b"k" * 32 not in blob and sealed_version(blob) == "1"
        assert owner.unseal(blob, CTX) == b"k" * 32
    # and without even that, sealing is refused with the key named
    fake.restrict(set())
    refused = kms_world.sealer(EAST, create=False)
    with pytest.raises(KeyAccessDenied, match=r"regionvault-seal/cryptoKeyVersions/1.*DENIED"):
        refused.seal(b"k" * 32, CTX)
    assert not callable(getattr(sealer, "unseal", None))


def test_the_sealer_finds_the_newest_enabled_version(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    seal_key = kms_world.key_path(EAST, "regionvault-seal")
    old = kms_world.sealer(EAST).seal(b"v1", CTX)
    for _ in range(4):
        keys.rotate()
    assert [s for _n, s in fake.versions(seal_key)] == ["ENABLED"] * 5
    before = len(fake.requests)
    newest = kms_world.sealer(EAST).seal(b"v5", CTX)
    assert sealed_version(newest) == "5"
    # doubling then bisection: 1, 2, 4, 8 (missing), 6 (missing), 5: O(log n) calls
    asked = [r.request.name.rpartition("/")[2] for r in fake.requests[before:]]
    assert asked == ["1", "2", "4", "8", "6", "5"]
    # a disabled newest version is skipped, a destroyed one too
    keys.client.update_crypto_key_version(
        crypto_key_version=types.CryptoKeyVersion(
            name=f"{seal_key}/cryptoKeyVersions/5", state=_State.DISABLED
        ),
        update_mask={"paths": ["state"]},
    )
    keys.client.destroy_crypto_key_version(name=f"{seal_key}/cryptoKeyVersions/4")
    skipped = kms_world.sealer(EAST).seal(b"v3", CTX)
    assert sealed_version(skipped) == "3"
    # secrets sealed to older versions still open; to a disabled or destroyed one, never
    assert keys.unseal(old, CTX) == b"v1"
    assert keys.unseal(skipped, CTX) == b"v3"
    for blob in (newest,):
        with pytest.raises(KeyAccessDenied, match=r"FAILED_PRECONDITION.*DISABLED"):
            keys.unseal(blob, CTX)
    # the KeyService's own seal follows its rotations
    assert sealed_version(keys.seal(b"x", CTX)) == "3"
    keys.rotate()
    assert sealed_version(keys.seal(b"x", CTX)) == "6"


def test_a_new_seal_key_is_waited_for_until_enabled(tmp_path: Path) -> None:
    """Cloud KMS generates asymmetric versions asynchronously: a seal key made with
    create = true is polled (GetCryptoKeyVersion) until ENABLED; after a rotation, sealers
    keep sealing to the older version until the new one is."""
    with KmsFake(pending_polls=3) as fake:
        world = KmsWorld({EAST: fake}, tmp_path)
        try:
            sealer = world.sealer(EAST)
            sealed = sealer.seal(b"s", CTX)
            assert sealed_version(sealed) == "1"
            polls = [m for m in fake.methods() if m == "GetCryptoKeyVersion"]
            assert len(polls) == 3  # pending for three looks, ENABLED at the third
            keys = world.keys(EAST)
            keys.rotate()
            assert sealed_version(world.sealer(EAST).seal(b"s", CTX)) == "1"
            assert keys.unseal(sealed, CTX) == b"s"
        finally:
            world.close()
        # a KeyService that makes the keys waits too: sealers without create find version 1
        other = KmsWorld({EAST: fake}, tmp_path)
        try:
            other.keys(EAST).key_id  # noqa: B018
            assert sealed_version(other.sealer(EAST, create=False).seal(b"s", CTX)) == "1"
        finally:
            other.close()


# ---------------------------------------------------------------------- rotation


def test_rotation_makes_new_primary_versions_and_old_ones_still_open(
    kms_world: KmsWorld,
) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    key_path = kms_world.key_path(EAST)
    before = keys.generate_data_key(CTX)
    sealed = keys.seal(b"before rotation", CTX)
    old_id = keys.key_id
    start = len(fake.requests)
    new_id = keys.rotate()
    assert fake.methods()[start:] == [
        "CreateCryptoKeyVersion",
        "UpdateCryptoKeyPrimaryVersion",
        "CreateCryptoKeyVersion",
    ]
    assert new_id == f"{key_path}/cryptoKeyVersions/2" != old_id and keys.key_id == new_id
    assert keys.client.get_crypto_key(name=key_path).primary.name == new_id
    after = keys.generate_data_key(CTX)
    assert after.key_id == new_id
    assert keys.unwrap(before.wrapped, CTX) == before.plaintext
    assert keys.unwrap(after.wrapped, CTX) == after.plaintext
    assert keys.unseal(sealed, CTX) == b"before rotation"
    # a KeyService rotated by another process learns the new primary from Encrypt
    other = kms_world.keys(EAST, create=False)
    third = other.rotate()
    assert keys.key_id == new_id  # cached until the next wrap says otherwise
    assert keys.generate_data_key(CTX).key_id == third == keys.key_id
    # a destroyed version no longer opens what it wrapped; the others do
    keys.client.destroy_crypto_key_version(name=old_id)
    with pytest.raises(KeyAccessDenied, match="DESTROY_SCHEDULED"):
        keys.unwrap(before.wrapped, CTX)
    assert keys.unwrap(after.wrapped, CTX) == after.plaintext


# ---------------------------------------------------------------------- integrity and errors


@pytest.mark.parametrize("method", ["Encrypt", "Decrypt", "GetPublicKey", "AsymmetricDecrypt"])
def test_an_answer_failing_its_crc32c_is_retried_then_transient(
    kms_world: KmsWorld, method: str
) -> None:
    fake = kms_world.fakes[EAST]
    patient = kms_world.keys(EAST, sdk_retries=1)
    dk = patient.generate_data_key(CTX)
    sealed = patient.seal(b"secret", CTX)

    def run(keys: GcpKeyService) -> Any:
        if method == "Encrypt":
            return keys.generate_data_key(CTX).plaintext
        if method == "Decrypt":
            return keys.unwrap(dk.wrapped, CTX)
        if method == "GetPublicKey":
            return keys.sealer().seal(b"s", CTX)
        return keys.unseal(sealed, CTX)

    usage = kms_world.provider.metrics.snapshot()
    fake.corrupt(method)
    assert run(patient)
    # the second attempt's answer passed (a sealer also asks for version 2, which is missing)
    attempts = 3 if method == "GetPublicKey" else 2
    assert kms_world.provider.metrics.since(usage).count(operation=method) == attempts
    impatient = kms_world.keys(EAST, create=False)
    impatient.key_id  # noqa: B018
    fake.corrupt(method)
    with pytest.raises(TransientError, match="CRC32C") as err:
        run(impatient)
    assert err.value.region == "gcp:east"


def test_the_fake_checks_the_crc32c_the_client_sends(kms_world: KmsWorld) -> None:
    """What the fake answers a request whose data does not match its CRC32C (and other
    requests Cloud KMS refuses), through the unmodified client."""
    keys = kms_world.keys(EAST)
    keys.key_id  # noqa: B018 - the keys exist
    key_path = kms_world.key_path(EAST)
    client = keys.client
    with pytest.raises(gexc.InvalidArgument, match="plaintext_crc32c"):
        client.encrypt(
            request={"name": key_path, "plaintext": b"x", "plaintext_crc32c": crc32c(b"y")},
            retry=None,
        )
    ciphertext = client.encrypt(request={"name": key_path, "plaintext": b"x"}).ciphertext
    with pytest.raises(gexc.InvalidArgument, match="ciphertext_crc32c"):
        client.decrypt(
            request={"name": key_path, "ciphertext": ciphertext, "ciphertext_crc32c": 1},
            retry=None,
        )
    with pytest.raises(gexc.InvalidArgument, match="not the version"):
        client.decrypt(name=f"{key_path}/cryptoKeyVersions/1", ciphertext=ciphertext, retry=None)
    with pytest.raises(gexc.NotFound):
        client.decrypt(name=f"{key_path}-nope", ciphertext=ciphertext, retry=None)
    with pytest.raises(gexc.FailedPrecondition, match="purpose ASYMMETRIC_DECRYPT"):
        client.encrypt(name=kms_world.key_path(EAST, "regionvault-seal"), plaintext=b"x")
    with pytest.raises(gexc.AlreadyExists):
        client.create_crypto_key(
            parent=key_path.rpartition("/cryptoKeys/")[0],
            crypto_key_id="regionvault",
            crypto_key=types.CryptoKey(purpose=_Purpose.ENCRYPT_DECRYPT),
        )


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, TransientError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TransientError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, TransientError),
        (grpc.StatusCode.INTERNAL, TransientError),
        (grpc.StatusCode.PERMISSION_DENIED, KeyAccessDenied),
        (grpc.StatusCode.UNAUTHENTICATED, KeyAccessDenied),
        (grpc.StatusCode.UNIMPLEMENTED, KeyServiceError),
    ],
)
def test_status_codes_map_to_the_frameworks_errors(
    kms_world: KmsWorld, code: grpc.StatusCode, error: type[Exception]
) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST)
    dk = keys.generate_data_key(CTX)
    fake.fail("Decrypt", code)
    with pytest.raises(error, match=rf"{keys.key_path}: {code.name}: injected") as err:
        keys.unwrap(dk.wrapped, CTX)
    if error is KeyServiceError:
        assert not isinstance(err.value, TransientError | KeyAccessDenied)
    fake.fail("Encrypt", code)
    with pytest.raises(error, match="cannot wrap a data key"):
        keys.generate_data_key(CTX)
    fake.fail("CreateCryptoKeyVersion", code)
    with pytest.raises(error, match="cannot rotate"):
        keys.rotate()


def test_transient_failures_are_retried_sdk_retries_times(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST, sdk_retries=2)
    dk = keys.generate_data_key(CTX)
    usage = kms_world.provider.metrics.snapshot()
    fake.fail("Decrypt", grpc.StatusCode.UNAVAILABLE, times=2)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    fake.fail("Decrypt", grpc.StatusCode.UNAVAILABLE, times=3)
    with pytest.raises(TransientError, match="UNAVAILABLE"):
        keys.unwrap(dk.wrapped, CTX)
    assert kms_world.provider.metrics.since(usage).count(operation="Decrypt") == 6
    # what says something about the request is never retried
    fake.fail("Decrypt", grpc.StatusCode.PERMISSION_DENIED, times=3)
    with pytest.raises(KeyAccessDenied):
        keys.unwrap(dk.wrapped, CTX)
    assert kms_world.provider.metrics.since(usage).count(operation="Decrypt") == 7


def test_no_answer_and_a_slow_answer_are_transient(kms_world: KmsWorld) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = kms_world.keys(EAST, kms_endpoint=f"127.0.0.1:{port}")
    with pytest.raises(TransientError, match=f"{kms_world.key_path(EAST)}: UNAVAILABLE"):
        nowhere.generate_data_key(CTX)
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST, timeout=1)
    dk = keys.generate_data_key(CTX)
    fake.stall("Decrypt", 3)
    with pytest.raises(TransientError, match="DEADLINE_EXCEEDED"):
        keys.unwrap(dk.wrapped, CTX)


def test_every_call_is_counted_once_per_attempt(kms_world: KmsWorld) -> None:
    """The provider's metrics count exactly the calls the fakes received, per RPC."""
    usage = kms_world.provider.metrics.snapshot()
    before = {name: len(fake.requests) for name, fake in kms_world.fakes.items()}
    for name in (EAST, WEST):
        keys = kms_world.keys(name, sdk_retries=1)
        dk = keys.generate_data_key(CTX)
        keys.unwrap(dk.wrapped, CTX)
        sealed = kms_world.sealer(name).seal(b"s", CTX)
        keys.unseal(sealed, CTX)
        kms_world.fakes[name].fail("Encrypt", grpc.StatusCode.UNAVAILABLE)
        keys.generate_data_key(CTX)
        keys.rotate()
    spent = kms_world.provider.metrics.since(usage)
    for name, fake in kms_world.fakes.items():
        received = Counter(fake.methods()[before[name] :])
        counted = {
            op: n for (region, _svc, op), n in spent.requests.items() if region == f"gcp:{name}"
        }
        assert counted == dict(received)
        assert counted["Encrypt"] == 3 and counted["AsymmetricDecrypt"] == 1
    assert spent.count(service="kms") == sum(spent.requests.values())
    assert spent.bytes_sent(region="gcp:east", service="kms") > 0


def test_the_client_options_without_plaintext(kms_world: KmsWorld) -> None:
    """Without kms_plaintext the real client is built with TLS, the region's credentials and
    client_options' api_endpoint (nothing is sent here)."""
    keys = kms_world.keys(EAST, kms_plaintext=False, kms_endpoint="127.0.0.1:1")
    assert keys.client.api_endpoint == "127.0.0.1:1"
    plain = kms_world.keys(EAST)
    assert plain.client.api_endpoint != "127.0.0.1:1"


# ---------------------------------------------------------------------- the fake as a process


def test_the_fake_runs_as_a_process_until_sigterm(kms_world: KmsWorld) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen(
        [sys.executable, "-m", "regionvault.providers.gcp.fakes.kms", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        keys = kms_world.keys(EAST, kms_endpoint=address)
        dk = keys.generate_data_key(CTX)
        assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
        assert keys.unseal(keys.seal(b"s", CTX), CTX) == b"s"
        keys.close()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
        if child.stderr is not None:
            child.stderr.close()


def test_two_fakes_on_one_port_are_refused() -> None:
    with KmsFake() as first:
        port = int(first.address.rpartition(":")[2])
        with pytest.raises(RuntimeError):
            KmsFake(port=port).start()


def test_login_failures_map_like_the_calls_they_stop() -> None:
    """google-auth's errors (a real login, which the offline tests cannot make): a token
    endpoint that did not answer is transient, a refused login is denied."""
    from google.auth import exceptions as auth_exc
    from regionvault.providers.gcp.kms import kms_error

    transport_error = auth_exc.TransportError("no answer")  # type: ignore[no-untyped-call]
    transient = kms_error(transport_error, "cannot wrap", region="gcp:x")
    assert isinstance(transient, TransientError) and transient.region == "gcp:x"
    refused = auth_exc.RefreshError("invalid_grant")  # type: ignore[no-untyped-call]
    denied = kms_error(refused, "cannot wrap", region="gcp:x")
    assert isinstance(denied, KeyAccessDenied)
    assert str(denied).endswith("cannot wrap: RefreshError")
    invalid = gexc.InvalidArgument("bad")  # type: ignore[no-untyped-call]
    other = kms_error(invalid, "cannot wrap", region="gcp:x")
    assert type(other) is KeyServiceError and "INVALID_ARGUMENT: bad" in str(other)
    assert isinstance(
        kms_error(invalid, "x", region="r", denied=(gexc.InvalidArgument,)), KeyAccessDenied
    )


def test_a_primary_version_that_is_not_enabled_is_named(kms_world: KmsWorld) -> None:
    keys = kms_world.keys(EAST)
    primary = keys.key_id
    keys.client.update_crypto_key_version(
        crypto_key_version=types.CryptoKeyVersion(name=primary, state=_State.DISABLED),
        update_mask={"paths": ["state"]},
    )
    with pytest.raises(KeyServiceError, match=r"no ENABLED primary version \(DISABLED\)"):
        kms_world.keys(EAST, create=False).key_id  # noqa: B018
    # a KeyService that had resolved it hears it from Encrypt
    with pytest.raises(KeyServiceError, match=r"FAILED_PRECONDITION: .* DISABLED") as err:
        keys.generate_data_key(CTX)
    assert not isinstance(err.value, TransientError | KeyAccessDenied)


def test_the_fake_lists_versions_by_state_in_pages(kms_world: KmsWorld) -> None:
    keys = kms_world.keys(EAST)
    keys.rotate()
    keys.rotate()
    keys.client.destroy_crypto_key_version(name=f"{kms_world.key_path(EAST)}/cryptoKeyVersions/1")
    pages = keys.client.list_crypto_key_versions(
        request={"parent": kms_world.key_path(EAST), "page_size": 1, "filter": "state=ENABLED"}
    )
    names = [v.name.rpartition("/")[2] for v in pages]
    assert names == ["2", "3"]
    everything = keys.client.list_crypto_key_versions(parent=kms_world.key_path(EAST))
    assert [_State(v.state).name for v in everything] == [
        "DESTROY_SCHEDULED",
        "ENABLED",
        "ENABLED",
    ]
    with pytest.raises(gexc.InvalidArgument, match="state=<STATE> only"):
        list(
            keys.client.list_crypto_key_versions(
                request={"parent": kms_world.key_path(EAST), "filter": "algorithm=X"}
            )
        )


@pytest.mark.parametrize("newest", [0, 1, 2, 3, 5, 8, 9, 31, 64, 100, 1000])
@pytest.mark.parametrize("unusable", [(), ("newest",), ("newest", "below"), ("1",)])
def test_the_sealers_search_over_version_numbers(
    kms_world: KmsWorld, newest: int, unusable: tuple[str, ...]
) -> None:
    """The search alone, over keys of 0 to 1000 versions some of which are not ENABLED:
    it names the newest ENABLED version in at most 2 log2(n) + 3 questions (plus one per
    unusable version walked past), without asking about any version twice."""
    disabled = set()
    if "newest" in unusable:
        disabled.add(newest)
    if "below" in unusable:
        disabled.add(newest - 1)
    if "1" in unusable:
        disabled.add(1)
    asked: list[int] = []
    answer = types.PublicKey(pem="-", algorithm=types.CryptoKeyVersion.CryptoKeyVersionAlgorithm(0))

    class Probed(GcpSealer):
        def _probe(self, number: int) -> types.PublicKey | bool:
            asked.append(number)
            if number > newest:
                return False
            return True if number in disabled else answer

    sealer = kms_world.sealer(EAST)
    probed = Probed(settings=sealer._settings, kms=sealer._kms)
    expected = max((n for n in range(1, newest + 1) if n not in disabled), default=None)
    if newest == 0:
        assert probed._newest() is None
    elif expected is None:
        with pytest.raises(KeyServiceError, match="no ENABLED version"):
            probed._newest()
    else:
        found = probed._newest()
        assert found is not None and found[0] == str(expected)
    assert len(asked) == len(set(asked)), asked
    bound = 2 * max(1, newest).bit_length() + 3 + len(disabled)
    assert len(asked) <= bound, (asked, bound)
