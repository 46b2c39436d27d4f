"""Cloud KMS in the cases review rkms found (issue #16): a primary version an administrator
disabled, a request damaged on the way, a refused login, a seal key made elsewhere a moment
ago, a rotation whose answer came late, and a fake on the loopback with no credentials set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "google.cloud.kms_v1", reason="the GCP tests need google-cloud-kms: pip install -e '.[test]'"
)

import grpc
from google.auth import credentials as ga_credentials
from google.auth import exceptions as auth_exc
from google.cloud.kms_v1 import KeyManagementServiceClient, types
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)
from kms_world import EAST, KmsWorld, region_config, two_fakes, world_on
from regionvault.core.errors import KeyAccessDenied, KeyServiceError, TransientError
from regionvault.providers.gcp.fakes.kms import KmsFake
from regionvault.providers.gcp.kms import GcpKeyService, _create_key

_State = types.CryptoKeyVersion.CryptoKeyVersionState
_Purpose = types.CryptoKey.CryptoKeyPurpose
_RSA_3072 = types.CryptoKeyVersion.CryptoKeyVersionAlgorithm.RSA_DECRYPT_OAEP_3072_SHA256
CTX = {"vault": "v1", "kind": "pack", "name": "p"}
CHECKSUM = "The checksum in field ciphertext_crc32c did not match the data in field ciphertext."


@pytest.fixture(scope="module")
def kms_fakes() -> Iterator[dict[str, KmsFake]]:
    yield from two_fakes()


@pytest.fixture
def kms_world(kms_fakes: dict[str, KmsFake], tmp_path: Path) -> Iterator[KmsWorld]:
    yield from world_on(kms_fakes, tmp_path)


def _disable(keys: GcpKeyService, version: str) -> None:
    keys.client.update_crypto_key_version(
        crypto_key_version=types.CryptoKeyVersion(name=version, state=_State.DISABLED),
        update_mask={"paths": ["state"]},
    )


# ---------------------------------------------------------------------- finding 1


def test_a_disabled_primary_stops_neither_unwrap_nor_unseal_in_a_new_process(
    kms_world: KmsWorld,
) -> None:
    """The incident case: an administrator disables the newest version after a suspected
    leak. Older versions still decrypt (Decrypt needs no primary), so a restore worker that
    starts now opens the vault; wrapping is refused by name; a rotation recovers."""
    keys = kms_world.keys(EAST)
    old = keys.generate_data_key(CTX)
    sealed = keys.seal(b"chunk-id key", CTX)
    _disable(keys, keys.rotate())
    for create in (False, True):
        fresh = kms_world.keys(EAST, create=create)
        assert fresh.unwrap(old.wrapped, CTX) == old.plaintext
        assert fresh.unseal(sealed, CTX) == b"chunk-id key"
    fresh = kms_world.keys(EAST, create=False)
    with pytest.raises(KeyServiceError, match=r"no ENABLED primary version \(DISABLED\)"):
        fresh.generate_data_key(CTX)
    # rotating away from the disabled primary works, and wrapping with it
    third = fresh.rotate()
    assert third == f"{kms_world.key_path(EAST)}/cryptoKeyVersions/3"
    assert fresh.generate_data_key(CTX).key_id == third


def test_unwrap_and_unseal_on_a_missing_key_name_it(kms_world: KmsWorld) -> None:
    keys = kms_world.keys(EAST)
    wrapped = keys.generate_data_key(CTX).wrapped
    sealed = keys.seal(b"s", CTX)
    missing = kms_world.keys(EAST, create=False, key_name="gone", seal_key_name="gone-seal")
    with pytest.raises(KeyServiceError, match="cryptoKeys/gone does not exist") as err:
        missing.unwrap(wrapped, CTX)
    assert not isinstance(err.value, KeyAccessDenied)
    with pytest.raises(KeyServiceError, match="cryptoKeys/gone-seal does not exist") as err:
        missing.unseal(sealed, CTX)
    assert not isinstance(err.value, KeyAccessDenied)


# ---------------------------------------------------------------------- finding 2


@pytest.mark.parametrize("method", ["Encrypt", "Decrypt", "AsymmetricDecrypt"])
def test_a_request_checksum_the_service_refuses_is_retried_then_transient(
    kms_world: KmsWorld, method: str
) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST, sdk_retries=1)
    dk = keys.generate_data_key(CTX)
    sealed = keys.seal(b"secret", CTX)

    def run(service: GcpKeyService) -> Any:
        if method == "Encrypt":
            return service.generate_data_key(CTX).plaintext
        if method == "Decrypt":
            return service.unwrap(dk.wrapped, CTX)
        return service.unseal(sealed, CTX)

    start = len(fake.requests)
    fake.fail(method, grpc.StatusCode.INVALID_ARGUMENT, message=CHECKSUM)
    assert run(keys)
    assert [r.method for r in fake.requests[start:]] == [method, method]
    impatient = kms_world.keys(EAST, create=False)
    fake.fail(method, grpc.StatusCode.INVALID_ARGUMENT, message=CHECKSUM)
    with pytest.raises(TransientError, match="The checksum in field"):
        run(impatient)
    # any other INVALID_ARGUMENT is the call's own answer, not retried
    start = len(fake.requests)
    fake.fail(method, grpc.StatusCode.INVALID_ARGUMENT, message="Decryption failed.")
    with pytest.raises(KeyServiceError) as err:
        run(keys)
    assert not isinstance(err.value, TransientError)
    assert [r.method for r in fake.requests[start:]] == [method]


# ---------------------------------------------------------------------- finding 3


class _Login(ga_credentials.Credentials):
    """Credentials whose refresh raises ``error`` (None: gets a token), counting refreshes."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.error = error
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        if self.error is not None:
            raise self.error
        self.token = "a-token"


def _logged_in(
    kms_world: KmsWorld, credentials: _Login, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> GcpKeyService:
    """A KeyService whose client sends ``credentials`` to the fake as call credentials
    (local channel credentials allow them without TLS), as the TLS client would."""
    fake = kms_world.fakes[EAST]
    settings = kms_world.settings(EAST, kms_plaintext=None, create=False, **extra)
    region = region_config(settings, EAST, kms_world.base_dir)
    provider = kms_world.provider
    keys = GcpKeyService(
        region=region,
        settings=provider.settings(region),
        credentials=credentials,
        capabilities=provider.capabilities,
        metrics=provider.metrics,
    )
    kms_world._services.append(keys)

    def make_client() -> KeyManagementServiceClient:
        local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        transport = KeyManagementServiceGrpcTransport(
            host=fake.address, credentials=credentials, ssl_channel_credentials=local
        )
        return KeyManagementServiceClient(transport=transport)

    monkeypatch.setattr(keys._kms, "_make_client", make_client)
    return keys


def test_a_refused_login_is_denied_and_sends_nothing(
    kms_world: KmsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = kms_world.fakes[EAST]
    made = kms_world.keys(EAST)
    wrapped = made.generate_data_key(CTX).wrapped
    revoked = _Login(auth_exc.RefreshError("invalid_grant: Invalid JWT Signature."))  # type: ignore[no-untyped-call]
    keys = _logged_in(kms_world, revoked, monkeypatch, sdk_retries=2)
    start = len(fake.requests)
    with pytest.raises(KeyAccessDenied, match="login refused: invalid_grant") as err:
        keys.unwrap(wrapped, CTX)
    assert err.value.region == "gcp:east"
    with pytest.raises(KeyAccessDenied, match="login refused"):
        keys.generate_data_key(CTX)
    assert fake.requests[start:] == []
    assert revoked.refreshes == 2  # a refused login is not retried


def test_a_login_that_may_pass_later_is_retried_then_transient(
    kms_world: KmsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = kms_world.keys(EAST)
    wrapped = made.generate_data_key(CTX).wrapped
    busy = _Login(auth_exc.RefreshError("503 from the token endpoint", retryable=True))  # type: ignore[no-untyped-call]
    keys = _logged_in(kms_world, busy, monkeypatch, sdk_retries=1)
    with pytest.raises(TransientError, match="login refused"):
        keys.unwrap(wrapped, CTX)
    assert busy.refreshes == 2


def test_a_login_that_passes_is_refreshed_once_and_calls_go_through(
    kms_world: KmsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = kms_world.keys(EAST)
    dk = made.generate_data_key(CTX)
    good = _Login(None)
    keys = _logged_in(kms_world, good, monkeypatch)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert good.refreshes == 1


# ---------------------------------------------------------------------- finding 4


def _seal_key_made_elsewhere(kms_world: KmsWorld, keys: GcpKeyService) -> None:
    """The seal key made through the client, as another process or gcloud would."""
    ring = keys.seal_key_path.rpartition("/cryptoKeys/")[0]
    keys.client.create_key_ring(
        parent=ring.rpartition("/keyRings/")[0],
        key_ring_id=kms_world.key_ring,
        key_ring=types.KeyRing(),
    )
    keys.client.create_crypto_key(
        parent=ring,
        crypto_key_id="regionvault-seal",
        crypto_key=types.CryptoKey(
            purpose=_Purpose.ASYMMETRIC_DECRYPT,
            version_template=types.CryptoKeyVersionTemplate(algorithm=_RSA_3072),
        ),
    )


def test_a_seal_key_made_elsewhere_a_moment_ago_is_waited_for(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    fake.pending_polls = 4
    try:
        keys = kms_world.keys(EAST)
        _seal_key_made_elsewhere(kms_world, keys)
        sealed = keys.seal(b"secret", CTX)
        assert fake.versions(keys.seal_key_path) == [
            (f"{keys.seal_key_path}/cryptoKeyVersions/1", "ENABLED")
        ]
        assert keys.unseal(sealed, CTX) == b"secret"
    finally:
        fake.pending_polls = 0


def test_the_loser_of_a_race_to_make_the_seal_key_waits_for_it(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    fake.pending_polls = 4
    try:
        keys = kms_world.keys(EAST)
        _seal_key_made_elsewhere(kms_world, keys)
        start = len(fake.requests)
        key = _create_key(keys._kms, "regionvault-seal", _Purpose.ASYMMETRIC_DECRYPT)
        assert key.name == keys.seal_key_path
        assert fake.methods()[start : start + 2] == ["CreateCryptoKey", "GetCryptoKey"]
        assert fake.versions(keys.seal_key_path)[0][1] == "ENABLED"
    finally:
        fake.pending_polls = 0


def test_a_sealer_finding_only_a_generating_version_is_transient(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    fake.pending_polls = 3
    try:
        keys = kms_world.keys(EAST)
        _seal_key_made_elsewhere(kms_world, keys)
        sealer = kms_world.sealer(EAST, create=False)
        with pytest.raises(TransientError, match="the newest, 1, may still be generating"):
            sealer.seal(b"s", CTX)
        for _attempt in range(3):
            try:
                sealed = sealer.seal(b"s", CTX)
                break
            except TransientError:
                continue
        else:
            pytest.fail("the seal key's version 1 never became usable")
        assert keys.unseal(sealed, CTX) == b"s"
    finally:
        fake.pending_polls = 0


# ---------------------------------------------------------------------- finding 5


def test_a_rotation_whose_answer_was_late_makes_one_version(kms_world: KmsWorld) -> None:
    fake = kms_world.fakes[EAST]
    keys = kms_world.keys(EAST, sdk_retries=1, timeout=1)
    first = keys.key_id
    fake.stall("CreateCryptoKeyVersion", 1.5)  # the version is made; its answer comes late
    start = len(fake.requests)
    with pytest.raises(TransientError, match="DEADLINE_EXCEEDED"):
        keys.rotate()
    assert fake.methods()[start:].count("CreateCryptoKeyVersion") == 1  # not retried
    time.sleep(1.0)  # the fake made the version meanwhile
    symmetric = kms_world.key_path(EAST)
    assert [state for _name, state in fake.versions(symmetric)] == ["ENABLED", "ENABLED"]
    assert keys.client.get_crypto_key(name=symmetric).primary.name == first
    # run again, the rotation promotes the version it made instead of making another
    second = keys.rotate()
    assert second == f"{symmetric}/cryptoKeyVersions/2" == keys.key_id
    assert [state for _name, state in fake.versions(symmetric)] == ["ENABLED", "ENABLED"]
    assert keys.client.get_crypto_key(name=symmetric).primary.name == second
    assert len(fake.versions(keys.seal_key_path)) == 2
    # a version newer than the primary that is disabled is not promoted
    _disable(keys, keys.client.create_crypto_key_version(parent=symmetric).name)
    assert keys.rotate() == f"{symmetric}/cryptoKeyVersions/4"


# ---------------------------------------------------------------------- finding 6


def test_a_plaintext_fake_needs_no_credentials(
    kms_world: KmsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``credentials`` set and ``kms_plaintext``: nothing looks for Application Default
    Credentials (which would probe the metadata server, 169.254.169.254)."""
    import google.auth

    def no_default(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("google.auth.default() was called")

    monkeypatch.setattr(google.auth, "default", no_default)
    keys = kms_world.keys(EAST, credentials=None)
    sealer = kms_world.sealer(EAST, credentials=None)
    dk = keys.generate_data_key(CTX)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert keys.unseal(sealer.seal(b"s", CTX), CTX) == b"s"
