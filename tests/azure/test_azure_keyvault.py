"""The Key Vault KeyService, Sealer and credentials, with the unmodified azure-identity and
azure-keyvault-keys clients over HTTPS against the fake Key Vault and token endpoint shipped
in the provider (providers/azure/fakes/keyvault.py): two fakes, two regions, each with its
own tenant, CA, client and keys. The KeyService suite of core/conformance runs against them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "azure.keyvault.keys",
    reason="the Azure tests need azure-keyvault-keys: pip install -e '.[test]'",
)

from regionvault.core.config import SERVICES
from regionvault.core.conformance.fixtures import SealElsewhere
from regionvault.core.conformance.keys import KeyServiceSuite
from regionvault.core.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyServiceError,
    TransientError,
)
from regionvault.core.interfaces import Sealer
from regionvault.core.types import (
    Capabilities,
    RegionConfig,
    RegionId,
    ServiceConfig,
)
from regionvault.providers.azure.fakes.keyvault import FakeKeyVault, fake_key_vaults
from regionvault.providers.azure.identity import (
    CredentialSettings,
    CredentialSource,
)
from regionvault.providers.azure.keyvault import (
    AzureKeyService,
    AzureSealer,
    KeyVaultSettings,
)

CTX = {"vault": "v-1", "kind": "pack", "name": "packs/00/abc"}
CAPS = Capabilities(key_rotation=True)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FakeKeyVault]]:
    """Two fake Key Vaults (regions east and west), 2048-bit keys to keep key making quick,
    from the launcher the provider's conformance support uses."""
    base = tmp_path_factory.mktemp("keyvault")
    with fake_key_vaults(base, ["east", "west"], key_size=2048) as fakes:
        assert fakes["east"].tenant_id != fakes["west"].tenant_id
        assert fakes["east"].ca_file != fakes["west"].ca_file
        yield fakes


def region_config(settings: Mapping[str, Any], name: str, base_dir: Path) -> RegionConfig:
    return RegionConfig(
        id=RegionId("azure", name),
        settings=dict(settings),
        services={svc: ServiceConfig("azure", dict(settings)) for svc in SERVICES},
        base_dir=base_dir,
        source="test-site.toml",
    )


class World:
    """One test's regions on the two fakes, keys named uniquely for the test; every
    KeyService and credential it made is closed after the test."""

    def __init__(self, fakes: dict[str, FakeKeyVault], base_dir: Path) -> None:
        self.fakes = fakes
        self.base_dir = base_dir
        self.key_name = f"rv-{uuid.uuid4().hex[:12]}"
        # no retries of a failed login, so that tests of failures do not wait out backoffs
        self.credentials = CredentialSource(options={"retry_total": 0})
        self._services: list[AzureKeyService] = []

    def settings(self, name: str, **extra: Any) -> dict[str, Any]:
        settings = self.fakes[name].region_settings(key_name=self.key_name)
        settings.update(sdk_retries=0, key_size=2048)
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, name: str, **extra: Any) -> RegionConfig:
        return region_config(self.settings(name, **extra), name, self.base_dir)

    def keys(
        self, name: str, *, credentials: CredentialSource | None = None, **extra: Any
    ) -> AzureKeyService:
        service = AzureKeyService(
            region=self.region(name, **extra),
            credentials=credentials or self.credentials,
            capabilities=CAPS,
        )
        self._services.append(service)
        return service

    def sealer(self, name: str, **extra: Any) -> AzureSealer:
        return AzureSealer.for_region(self.region(name, **extra), self.credentials)

    def close(self) -> None:
        for fake in self.fakes.values():
            fake.clear_failures()
        for service in self._services:
            service.close()
        self.credentials.close()


@pytest.fixture
def world(fakes: dict[str, FakeKeyVault], tmp_path: Path) -> Iterator[World]:
    w = World(fakes, tmp_path)
    try:
        yield w
    finally:
        w.close()


_SEAL_SCRIPT = """
import json, sys
from pathlib import Path
from regionvault.core.types import RegionConfig, RegionId
from regionvault.providers.azure.identity import CredentialSource
from regionvault.providers.azure.keyvault import AzureSealer, KeyVaultSettings
settings, name, secret, context = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
region = RegionConfig(id=RegionId("azure", name), settings=settings, services={},
                      base_dir=Path("."), source="another-process")
sealer = AzureSealer(settings=KeyVaultSettings.from_region(region), credentials=CredentialSource())
print(sealer.seal(bytes.fromhex(secret), json.loads(context)).hex())
"""


def seal_in_another_process(
    settings: Mapping[str, Any], name: str, secret: bytes, context: Mapping[str, str]
) -> bytes:
    """Seal in a separate Python process that has only the region's settings (its own
    login, its own TLS trust), as another region's backup service would."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SEAL_SCRIPT,
            json.dumps(dict(settings)),
            name,
            secret.hex(),
            json.dumps(dict(context)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return bytes.fromhex(result.stdout.strip())


# ---------------------------------------------------------------------- the suite


class TestKeyVaultKeyService(KeyServiceSuite):
    """core/conformance's KeyService suite: region A on one fake vault, B on the other."""

    @pytest.fixture
    def keys_a(self, world: World) -> AzureKeyService:
        return world.keys("east")

    @pytest.fixture
    def keys_b(self, world: World) -> AzureKeyService:
        return world.keys("west")

    @pytest.fixture
    def sealer_a(self, world: World) -> Sealer:
        return world.sealer("east", create=False)

    @pytest.fixture
    def sealer_b(self, world: World) -> Sealer:
        return world.sealer("west", create=False)

    @pytest.fixture
    def seal_elsewhere(self, world: World) -> SealElsewhere:
        regions = {"azure:east": "east", "azure:west": "west"}

        def seal(region: str, secret: bytes, context: Mapping[str, str]) -> bytes:
            name = regions[region]
            world.keys(name).key_id  # noqa: B018 - the key exists before another process seals
            return seal_in_another_process(world.settings(name), name, secret, context)

        return seal

    @pytest.fixture(autouse=True)
    def _keys_exist(self, keys_a: AzureKeyService, keys_b: AzureKeyService) -> None:
        """Sealers are built from configuration with create = false, as in production:
        the regions' keys exist before anyone seals for them."""
        keys_a.key_id  # noqa: B018
        keys_b.key_id  # noqa: B018


#: ``REGIONVAULT_AZURE_LIVE=1`` with two vaults runs the suite against real Key Vault too:
#: ``REGIONVAULT_AZURE_KEY_VAULT_A`` and ``_B`` (vault URLs), logging in as the service
#: principal of AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET when they are set,
#: else as whoever ``az login`` signed in. The key ``regionvault-conformance`` is made in
#: each vault on first use and gains a version per run (the rotation test).
LIVE_ENV = "REGIONVAULT_AZURE_LIVE"


class LiveWorld(World):
    def __init__(self, base_dir: Path) -> None:
        super().__init__({}, base_dir)
        self.credentials = CredentialSource()
        self.key_name = "regionvault-conformance"

    def settings(self, name: str, **extra: Any) -> dict[str, Any]:
        url = os.environ.get(f"REGIONVAULT_AZURE_KEY_VAULT_{'A' if name == 'east' else 'B'}")
        settings: dict[str, Any] = {"key_vault_url": url, "key_name": self.key_name, "create": True}
        if os.environ.get("AZURE_CLIENT_ID") and os.environ.get("AZURE_TENANT_ID"):
            settings.update(
                credential="client-secret",
                tenant_id=os.environ["AZURE_TENANT_ID"],
                client_id=os.environ["AZURE_CLIENT_ID"],
            )
        else:
            settings["credential"] = "azure-cli"
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}


@pytest.mark.skipif(
    os.environ.get(LIVE_ENV) != "1"
    or not os.environ.get("REGIONVAULT_AZURE_KEY_VAULT_A")
    or not os.environ.get("REGIONVAULT_AZURE_KEY_VAULT_B"),
    reason=f"live Key Vault: set {LIVE_ENV}=1, REGIONVAULT_AZURE_KEY_VAULT_A and _B",
)
class TestLiveKeyVaultKeyService(TestKeyVaultKeyService):
    """The same suite against two real vaults."""

    @pytest.fixture
    def world(self, tmp_path: Path) -> Iterator[World]:
        w = LiveWorld(tmp_path)
        try:
            yield w
        finally:
            w.close()


# ---------------------------------------------------------------------- data keys


def test_data_key_round_trip_key_id_and_calls(world: World) -> None:
    keys = world.keys("east")
    fake = world.fakes["east"]
    dk = keys.generate_data_key(CTX)
    assert len(dk.plaintext) == 32 and dk.plaintext not in dk.wrapped
    assert dk.key_id == keys.key_id
    assert keys.key_id.startswith(f"{fake.url}/keys/{world.key_name}/")
    assert fake.key_versions(world.key_name) == [keys.key_id.rsplit("/", 1)[1]]

    # wrapping is local with the public key: more data keys cost no Key Vault call
    before = len(fake.requests)
    more = [keys.generate_data_key(CTX) for _ in range(5)]
    assert fake.requests[before:] == []
    # unwrapping costs one keys/unwrapKey each (and one keys/get per version, once)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    for key in more:
        assert keys.unwrap(key.wrapped, CTX) == key.plaintext
    ops = [r.operation for r in fake.requests[before:] if r.status == 200]
    assert ops == ["keys/get"] + ["keys/unwrapKey"] * 6

    # a second KeyService on the same settings finds the key instead of making another
    again = world.keys("east", create=False)
    assert again.key_id == keys.key_id
    assert again.unwrap(dk.wrapped, CTX) == dk.plaintext
    assert len(fake.key_versions(world.key_name)) == 1


def test_one_key_service_from_many_threads(world: World) -> None:
    """The engine's workers share a region's KeyService: first use, wraps and unwraps from
    eight threads at once make one key and one version's client, and every key opens."""
    from concurrent.futures import ThreadPoolExecutor

    fake = world.fakes["east"]
    keys = world.keys("east")

    def work(n: int) -> bool:
        context = {**CTX, "name": f"packs/{n}"}
        dk = keys.generate_data_key(context)
        return all(keys.unwrap(dk.wrapped, context) == dk.plaintext for _ in range(5))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(40)))
    assert len(fake.key_versions(world.key_name)) == 1
    assert len(keys._crypto) == 1


def test_key_is_made_with_wrap_and_unwrap_only_and_default_size(world: World) -> None:
    keys = world.keys("east", key_size=None)  # the default, 3072 bits
    keys.key_id  # noqa: B018 - makes the key
    key = keys.client.get_key(world.key_name)
    assert sorted(str(op) for op in key.key_operations or []) == ["unwrapKey", "wrapKey"]
    assert key.key is not None and key.key.n is not None
    assert len(key.key.n) * 8 == 3072


def test_a_hardware_protected_key(world: World) -> None:
    keys = world.keys("east", hardware_protected=True)
    dk = keys.generate_data_key(CTX)
    key = keys.client.get_key(world.key_name)
    assert getattr(key.key_type, "value", key.key_type) == "RSA-HSM"
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
    hsm = {"key_vault_url": "https://rv-east.managedhsm.azure.net"}
    assert KeyVaultSettings.from_region(world.region("east", **hsm)).hardware_protected
    assert not KeyVaultSettings.from_region(world.region("east")).hardware_protected


def test_a_missing_key_without_create_is_named(world: World) -> None:
    keys = world.keys("east", create=False)
    with pytest.raises(KeyServiceError, match=f"keys/{world.key_name} does not exist"):
        keys.generate_data_key(CTX)


def test_context_binds_every_wrap_and_seal(world: World) -> None:
    keys = world.keys("east")
    dk = keys.generate_data_key(CTX)
    for other in ({**CTX, "name": "packs/00/abd"}, {}, {**CTX, "extra": "x"}):
        with pytest.raises(KeyAccessDenied, match="context differs"):
            keys.unwrap(dk.wrapped, other)
    sealed = keys.seal(b"s" * 32, CTX)
    with pytest.raises(KeyAccessDenied):
        keys.unseal(sealed, {**CTX, "kind": "index"})
    # a wrapped data key is not a sealed secret, nor the reverse, even under one context
    with pytest.raises(KeyAccessDenied):
        keys.unseal(dk.wrapped, CTX)
    with pytest.raises(KeyAccessDenied):
        keys.unwrap(sealed, CTX)
    # every byte is authenticated: the version, the wrapped key, the nonce, the ciphertext
    for index in (7, 10, len(dk.wrapped) - 40, len(dk.wrapped) - 1):
        forged = bytearray(dk.wrapped)
        forged[index] ^= 1
        with pytest.raises(KeyAccessDenied):
            keys.unwrap(bytes(forged), CTX)
    for junk in (b"", b"RVAZK1", dk.wrapped[:-20], b"not an envelope at all"):
        with pytest.raises(KeyAccessDenied):
            keys.unwrap(junk, CTX)
    with pytest.raises(KeyServiceError, match="reserved"):
        keys.generate_data_key({"regionvault:purpose": "seal"})
    with pytest.raises(KeyServiceError, match="1024-byte"):
        keys.seal(b"x" * 1025, CTX)
    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext


def test_regions_and_keys_cannot_open_each_others_material(world: World) -> None:
    east, west = world.keys("east"), world.keys("west")
    # another key in the same vault is just as foreign as another vault's
    neighbour = world.keys("east", key_name=f"{world.key_name}-other")
    east_key = east.generate_data_key(CTX)
    for other in (west, neighbour):
        with pytest.raises(KeyAccessDenied) as denied:
            other.unwrap(east_key.wrapped, CTX)
        assert other.region in str(denied.value) and other.settings.key_name in str(denied.value)
    # a version named by foreign material is not kept
    assert set(west._crypto) <= {west.key_id.rsplit("/", 1)[1]}
    sealed_for_west = world.sealer("west").seal(b"chunk-id key", CTX)
    assert west.unseal(sealed_for_west, CTX) == b"chunk-id key"
    with pytest.raises(KeyAccessDenied):
        east.unseal(sealed_for_west, CTX)


# ---------------------------------------------------------------------- sealing


def test_a_sealer_needs_only_get_on_the_key(world: World) -> None:
    """Another region's identity, allowed nothing but keys/get on east's key, seals for
    east with the public key: one keys/get, never a wrap, unwrap, encrypt or decrypt."""
    fake = world.fakes["east"]
    owner = world.keys("east")
    owner.key_id  # noqa: B018 - east's key exists
    outsider = fake.add_client()
    fake.deny(
        outsider, ["create", "rotate", "versions", "wrapKey", "unwrapKey", "encrypt", "decrypt"]
    )
    sealer = world.sealer(
        "east", client_id=outsider, client_secret_file=str(fake.secret_file(outsider)), create=False
    )
    sealed = [sealer.seal(b"k" * 32, CTX), sealer.seal(b"k" * 32, CTX)]
    assert [op for op in fake.operations(outsider) if op.startswith("keys/")] == ["keys/get"]
    for blob in sealed:
        assert b"k" * 32 not in blob
        assert owner.unseal(blob, CTX) == b"k" * 32
    # and with no keys/get either, sealing is refused with the key named
    stranger = fake.add_client()
    fake.deny(stranger, ["get"])
    refused = world.sealer(
        "east", client_id=stranger, client_secret_file=str(fake.secret_file(stranger))
    )
    with pytest.raises(KeyAccessDenied, match=rf"keys/{world.key_name}.*Forbidden \(HTTP 403\)"):
        refused.seal(b"k" * 32, CTX)


def test_an_identity_denied_unwrap_is_denied(world: World) -> None:
    fake = world.fakes["east"]
    keys = world.keys("east")
    dk = keys.generate_data_key(CTX)
    reader = fake.add_client()
    fake.deny(reader, ["unwrapKey"])
    other = world.keys(
        "east", client_id=reader, client_secret_file=str(fake.secret_file(reader)), create=False
    )
    with pytest.raises(KeyAccessDenied, match=r"cannot unwrap .*Forbidden \(HTTP 403\)"):
        other.unwrap(dk.wrapped, CTX)


# ---------------------------------------------------------------------- rotation


def test_rotation_makes_a_version_and_old_versions_still_open(world: World) -> None:
    fake = world.fakes["east"]
    keys = world.keys("east")
    before = keys.generate_data_key(CTX)
    sealed = world.sealer("east").seal(b"before rotation", CTX)
    old_id = keys.key_id
    new_id = keys.rotate()
    assert new_id != old_id and keys.key_id == new_id
    assert fake.key_versions(world.key_name) == [old_id.rsplit("/", 1)[1], new_id.rsplit("/", 1)[1]]
    after = keys.generate_data_key(CTX)
    assert after.key_id == new_id
    assert keys.unwrap(before.wrapped, CTX) == before.plaintext
    assert keys.unwrap(after.wrapped, CTX) == after.plaintext
    assert keys.unseal(sealed, CTX) == b"before rotation"
    # a fresh KeyService and a fresh Sealer use the new version
    assert world.keys("east", create=False).key_id == new_id
    resealed = world.sealer("east").seal(b"after", CTX)
    assert new_id.rsplit("/", 1)[1].encode() in resealed[:64]


# ---------------------------------------------------------------------- errors


def test_throttling_and_server_errors_are_transient(world: World) -> None:
    fake = world.fakes["east"]
    keys = world.keys("east")
    dk = keys.generate_data_key(CTX)
    keys.unwrap(dk.wrapped, CTX)
    fake.fail(429, operation="keys/unwrapKey", retry_after=7)
    with pytest.raises(TransientError, match=rf"keys/{world.key_name}/\w+: .*HTTP 429") as err:
        keys.unwrap(dk.wrapped, CTX)
    assert err.value.retry_after == 7.0 and err.value.region == "azure:east"
    fake.fail(503, operation="keys/unwrapKey")
    with pytest.raises(TransientError, match="HTTP 503"):
        keys.unwrap(dk.wrapped, CTX)
    fake.fail(503, operation="keys/rotate")
    with pytest.raises(TransientError, match="cannot rotate"):
        keys.rotate()
    # 501 says something about the request: waiting does not help
    fake.fail(501, operation="keys/unwrapKey")
    with pytest.raises(KeyServiceError) as not_transient:
        keys.unwrap(dk.wrapped, CTX)
    assert not isinstance(not_transient.value, TransientError | KeyAccessDenied)
    # the SDK's own retries (sdk_retries) ride out what passes in time
    patient = world.keys("east", sdk_retries=2, create=False)
    patient.key_id  # noqa: B018
    fake.fail(503, operation="keys/unwrapKey", retry_after=0)
    assert patient.unwrap(dk.wrapped, CTX) == dk.plaintext


def test_no_answer_is_transient_and_tls_failure_is_not(world: World, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = world.keys("east", key_vault_url=f"https://127.0.0.1:{port}", connect_timeout=2)
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}/keys/{world.key_name}"):
        nowhere.generate_data_key(CTX)
    # a vault whose certificate nobody trusts: a configuration problem, not retried
    other_ca = FakeKeyVault(tmp_path / "stranger").start()
    try:
        untrusted = world.keys("east", ca_file=str(other_ca.ca_file))
        with pytest.raises(KeyServiceError, match="TLS failure") as err:
            untrusted.generate_data_key(CTX)
        assert not isinstance(err.value, TransientError | KeyAccessDenied)
    finally:
        other_ca.stop()


def test_a_read_timeout_is_transient(world: World) -> None:
    fake = world.fakes["east"]
    keys = world.keys("east", read_timeout=1)
    dk = keys.generate_data_key(CTX)
    keys.unwrap(dk.wrapped, CTX)
    fake.fail(200, operation="keys/unwrapKey", stall=3)
    with pytest.raises(TransientError, match="no complete answer"):
        keys.unwrap(dk.wrapped, CTX)


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, TransientError), (429, TransientError), (500, TransientError), (400, KeyAccessDenied)],
)
def test_a_failing_login_is_transient_and_a_refused_one_denied(
    world: World, status: int, error: type[Exception]
) -> None:
    """azure-identity raises one error, without a status, for every failed login: the
    provider's WatchedCredential tells the login endpoint's outage from a refusal."""
    fake = world.fakes["east"]
    # a new identity: no token cached, so the next Key Vault call logs in
    client = fake.add_client()
    keys = world.keys("east", client_id=client, client_secret_file=str(fake.secret_file(client)))
    fake.fail(status, operation="token", times=10, retry_after=2)
    # the second time MSAL replays a throttled answer without asking: the same error
    for _attempt in range(2):
        with pytest.raises(
            error, match=rf"keys/{world.key_name}: login failed \(HTTP {status}\)"
        ) as err:
            keys.generate_data_key(CTX)
        if error is TransientError:
            assert err.value.retry_after == 2.0  # type: ignore[attr-defined]


def test_a_login_failing_once_is_ridden_out(world: World) -> None:
    fake = world.fakes["east"]
    client = fake.add_client()
    patient = CredentialSource()  # azure-identity's own retries of a login: 3 by default
    try:
        keys = world.keys(
            "east",
            credentials=patient,
            client_id=client,
            client_secret_file=str(fake.secret_file(client)),
        )
        fake.fail(503, operation="token", retry_after=0)
        keys.generate_data_key(CTX)
        assert fake.operations(client).count("token") == 1  # the one that succeeded
    finally:
        patient.close()


def test_a_login_endpoint_that_does_not_answer_is_transient(world: World) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keys = world.keys("east", authority=f"https://127.0.0.1:{port}")
    with pytest.raises(TransientError, match="no answer from the login endpoint"):
        keys.generate_data_key(CTX)


def test_a_wrong_secret_is_denied_without_showing_it(world: World, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-secret-" + uuid.uuid4().hex, encoding="utf-8")
    keys = world.keys("east", client_secret_file=str(wrong))
    with pytest.raises(KeyAccessDenied) as err:
        keys.generate_data_key(CTX)
    assert "azure:east" in str(err.value) and world.key_name in str(err.value)
    assert wrong.read_text() not in str(err.value)


# ---------------------------------------------------------------------- identity


def test_an_embedders_credential_is_used_whatever_site_toml_says(world: World) -> None:
    from azure.identity import ClientSecretCredential

    fake = world.fakes["east"]
    client = fake.add_client()
    mine = ClientSecretCredential(
        fake.tenant_id,
        client,
        fake.secret_file(client).read_text().strip(),
        authority=fake.url,
        disable_instance_discovery=True,
        connection_verify=str(fake.ca_file),
    )
    try:
        source = CredentialSource(per_region={"azure:east": mine})
        keys = world.keys(
            "east", credentials=source, credential="embedder", client_secret_file=None
        )
        keys.generate_data_key(CTX)
        assert {"token", "keys/get", "keys/create"} <= set(fake.operations(client))
        alone = world.keys(
            "west", credentials=CredentialSource(), credential="embedder", client_secret_file=None
        )
        with pytest.raises(ConfigError, match="gave the azure provider no credential"):
            alone.generate_data_key(CTX)
    finally:
        mine.close()


def test_one_credential_per_identity(world: World) -> None:
    source = CredentialSource()
    try:
        east = CredentialSettings.from_region(world.region("east"))
        again = CredentialSettings.from_region(world.region("east", key_name="other"))
        west = CredentialSettings.from_region(world.region("west"))
        assert source.credential(east) is source.credential(again)
        assert source.credential(east) is not source.credential(west)
    finally:
        source.close()


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"key_vault_url": None}, "key_vault_url", "missing"),
        ({"key_vault_url": "http://127.0.0.1:1"}, "key_vault_url", "not a vault URL"),
        ({"key_name": "bad_name"}, "key_name", "not a key name"),
        ({"key_size": 1024}, "key_size", "between 2048 and 4096"),
        ({"key_size": 2500}, "key_size", "2048, 3072 or 4096"),
        ({"credential": "default"}, "credential", "not one of"),
        ({"tenant_id": None}, "tenant_id", "missing"),
        ({"client_id": "me"}, "client_id", "not an application"),
        ({"authority": "http://login"}, "authority", "https://host"),
        ({"instance_discovery": "no"}, "instance_discovery", "true or false"),
        ({"credential": "azure-cli"}, "client_secret_file", "applies to"),
        ({"client_secret_env": "NOT A NAME"}, "client_secret_env", "environment variable"),
    ],
)
def test_settings_errors_name_the_key(
    world: World, change: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        KeyVaultSettings.from_region(world.region("east", **change))
    assert err.value.key is not None and err.value.key.endswith(key)


def test_secrets_come_from_a_file_or_the_environment_never_site_toml(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = world.fakes["east"]
    secret = fake.secret_file().read_text().strip()
    monkeypatch.setenv("RV_TEST_SECRET", secret)
    keys = world.keys("east", client_secret_file=None, client_secret_env="RV_TEST_SECRET")
    keys.generate_data_key(CTX)
    monkeypatch.delenv("RV_TEST_SECRET")
    unset = world.keys(
        "east",
        credentials=CredentialSource(),  # not the one that read the secret before
        client_secret_file=None,
        client_secret_env="RV_TEST_SECRET",
    )
    with pytest.raises(ConfigError, match=r"RV_TEST_SECRET .* is not set"):
        unset.generate_data_key(CTX)
    missing = world.keys("east", client_secret_file="no-such.secret")
    with pytest.raises(ConfigError, match=r"cannot read .*no-such\.secret"):
        missing.generate_data_key(CTX)


def test_fakes_of_one_process_can_share_a_tenant(tmp_path: Path) -> None:
    """An ARM fake (or a second vault) shares a FakeTenant: one application logs in once and
    its token opens each service only for the resource it was issued for."""
    from regionvault.providers.azure.fakes.entra import FakeAnswer, FakeTenant

    tenant = FakeTenant(tmp_path / "tenant")
    with (
        FakeKeyVault(tmp_path / "a", tenant=tenant, key_size=2048) as a,
        FakeKeyVault(tmp_path / "b", tenant=tenant, key_size=2048) as b,
    ):
        assert a.tenant_id == b.tenant_id and a.client_id == b.client_id == tenant.client_id
        credentials = CredentialSource()
        try:
            for fake, name in ((a, "a"), (b, "b")):
                settings = fake.region_settings(key_name="shared")
                settings.update(authority=a.url, ca_file=str(a.ca_file), key_size=2048)
                if fake is b:  # b's own certificate: trust both CAs
                    bundle = tmp_path / "both.pem"
                    bundle.write_bytes(a.ca_file.read_bytes() + b.ca_file.read_bytes())
                    settings["ca_file"] = str(bundle)
                keys = AzureKeyService(
                    region=region_config(settings, name, tmp_path),
                    credentials=credentials,
                    capabilities=CAPS,
                )
                try:
                    dk = keys.generate_data_key(CTX)
                    assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
                finally:
                    keys.close()
        finally:
            credentials.close()
        assert "token" not in b.operations()  # b never served a login: a's token opened it
        token = tenant.serve(
            "POST",
            [tenant.tenant_id, "oauth2", "v2.0", "token"],
            (
                f"grant_type=client_credentials&client_id={tenant.client_id}&client_secret="
                f"{tenant.secret_file().read_text().strip()}"
                "&scope=https%3A%2F%2Fmanagement.azure.com%2F.default"
            ).encode(),
            a.url,
        )[2]["access_token"]
        with pytest.raises(FakeAnswer, match="Invalid audience"):
            tenant.client_of(f"Bearer {token}", "https://vault.azure.net")
        assert tenant.client_of(f"Bearer {token}", "https://management.azure.com")


def test_the_fake_runs_alone_and_stops_on_interrupt(tmp_path: Path) -> None:
    """``python -m regionvault.providers.azure.fakes.keyvault DIR`` prints a region's
    settings as one JSON line and serves until SIGINT."""
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "regionvault.providers.azure.fakes.keyvault", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        settings = json.loads(process.stdout.readline())
        settings.update(key_size=2048, sdk_retries=0)
        credentials = CredentialSource()
        keys = AzureKeyService(
            region=region_config(settings, "alone", tmp_path),
            credentials=credentials,
            capabilities=CAPS,
        )
        try:
            dk = keys.generate_data_key(CTX)
            assert keys.unwrap(dk.wrapped, CTX) == dk.plaintext
        finally:
            keys.close()
            credentials.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def test_instance_discovery_is_off_with_an_authority_unless_asked() -> None:
    base = {"tenant_id": str(uuid.uuid4()), "client_id": str(uuid.uuid4())}
    plain = region_config(base, "x", Path())
    assert CredentialSettings.from_region(plain).instance_discovery is True
    assert CredentialSettings.from_region(plain).kind == "client-secret"
    pointed = region_config({**base, "authority": "https://127.0.0.1:9"}, "x", Path())
    assert CredentialSettings.from_region(pointed).instance_discovery is False
    asked = region_config(
        {**base, "authority": "https://login.microsoftonline.us", "instance_discovery": True},
        "x",
        Path(),
    )
    assert CredentialSettings.from_region(asked).instance_discovery is True
    assert CredentialSettings.from_region(region_config({}, "x", Path())).kind == (
        "managed-identity"
    )
