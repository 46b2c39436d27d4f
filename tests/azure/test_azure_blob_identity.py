"""Blob Storage through each region's Microsoft Entra identity, with no account key: the
credential site.toml names for the region (here a client secret, logging in at the region's
fake Key Vault tenant, the same login as its keys) gets a storage token, and the unmodified
azure-storage-blob sends it as ``Authorization: Bearer`` to an Azurite that takes bearer
tokens (``--oauth basic``, HTTPS with a certificate from the fake's CA). The copy's inbox SAS
is then a user-delegation SAS that the destination's identity asks for.

What Azurite checks of a token: that it is a JWT with an Entra issuer, a storage audience and
a lifetime that covers now. What it cannot show, and Azure does: the token's signature, and
the role assignments (Storage Blob Data Contributor on the region's own account, and nothing
on another's); those are checked live only (docs/azure.md, "Identity for Blob Storage").
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.storage.blob", reason="the Azure tests need pip install -e '.[test]'")

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity import ClientSecretCredential
from azure.storage.blob import ContainerClient
from regionvault.core.conformance.support import ConformanceSupport
from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline import Engine
from regionvault.core.site import Site
from regionvault.providers.azure.azurite import AzuriteServer, AzuriteUnavailable
from regionvault.providers.azure.fakes.keyvault import FakeKeyVault, fake_key_vaults

REGIONS = ("east", "west")
MARKER = b"plaintext-marker-of-the-blob-identity-test "


@dataclass
class IdentityWorld:
    azurite: AzuriteServer
    vaults: dict[str, FakeKeyVault]
    bundle: Path
    site_path: Path
    requests: list[tuple[str, str, str]]


def _site(tmp_path: Path, azurite: AzuriteServer, vaults: dict[str, FakeKeyVault]) -> Path:
    bundle = tmp_path / "trusted.pem"
    lines = ['[site]\nname = "blob-identity"\n']
    for name in REGIONS:
        keys = vaults[name].region_settings(key_name="regionvault")
        # the login, Key Vault and Blob Storage all trust one bundle: both fakes' CAs
        keys["ca_file"] = str(bundle)
        lines.append(f'[regions."azure:{name}"]')
        lines.append(f'account_url = "{azurite.account_url(name)}"')
        lines.append(f'container = "vault-{uuid.uuid4().hex[:8]}"')
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in keys.items())
        root = (tmp_path / name).as_posix()
        lines.append(f'\n[regions."azure:{name}".compute]\nprovider = "local"\nroot = "{root}"\n')
    lines.append('[[replication]]\nfrom = "azure:east"\nto = "azure:west"\n')
    path = tmp_path / "site.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[IdentityWorld]:
    with fake_key_vaults(tmp_path / "keyvault", REGIONS) as vaults:
        bundle = tmp_path / "trusted.pem"
        bundle.write_bytes(b"".join(vaults[name].ca_file.read_bytes() for name in REGIONS))
        east = vaults["east"].ca
        assert east is not None  # a started fake has its CA
        azurite = AzuriteServer(
            dict.fromkeys(REGIONS),
            log=tmp_path / "azurite.log",
            workdir=tmp_path / "azurite",
            tls=(east.cert_file, east.key_file, east.ca_file),
            oauth=True,
        )
        try:
            azurite.start()
        except AzuriteUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield IdentityWorld(azurite, vaults, bundle, _site(tmp_path, azurite, vaults), [])
        finally:
            azurite.stop()


def _open(path: Path) -> Site:
    """The site with a provider registry of its own (a fresh AzureProvider)."""
    from regionvault.core.config import load_site
    from regionvault.core.plugins import make_plugin_manager, registry_from
    from regionvault.providers.azure import plugin as azure_plugin
    from regionvault.providers.local import plugin as local_plugin

    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin, azure_plugin])
    registry = registry_from(pm)
    return Site(load_site(path, registry=registry), registry=registry, plugin_manager=pm)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _recorder(seen: list[tuple[str, str, str]]) -> Any:
    # on the answer: the request then holds every header the pipeline's policies added
    def hook(response: Any) -> None:
        http = response.http_request
        auth = http.headers.get("Authorization", "")
        seen.append((http.method, http.url, auth.split(" ", 1)[0]))

    return hook


def test_backup_and_copy_through_the_regions_identities_with_no_account_key(
    world: IdentityWorld, tmp_path: Path
) -> None:
    from regionvault.providers.azure.provider import AzureProvider

    site = _open(world.site_path)
    provider = site.registry.get("azure")
    assert isinstance(provider, AzureProvider)
    seen: list[tuple[str, str, str]] = []
    provider.clients(site.region("azure:east").config).options["raw_response_hook"] = _recorder(
        seen
    )
    with site:
        engine = Engine(site)
        east = site.region("azure:east")
        instance = ConformanceSupport().make_instance(
            east,
            "vcu-1",
            data={"etc/config": MARKER * 100, "var/db": MARKER + bytes(range(256)) * 64},
            tags={"backup": "1-7"},
            workdir=tmp_path / "instances",
        )
        point = engine.backup(instance)
        result = engine.copy(point.id, to="azure:west")
        assert result.point.region == "azure:west" and result.chunks_sent > 0
        engine.restore(result.point.id, region="azure:west", target=tmp_path / "out")
        assert (tmp_path / "out" / "etc" / "config").read_bytes() == MARKER * 100

    # every request to Blob Storage carried a bearer token, none a shared key signature; the
    # sender wrote the inbox with a SAS (no Authorization header)
    to_blob = [s for s in seen if s[1].startswith(world.azurite.endpoint)]
    assert to_blob, "no Blob Storage request was seen"
    assert {s[2] for s in to_blob} <= {"Bearer", ""}
    assert not any(s[2] == "SharedKey" for s in to_blob)
    assert any(s[2] == "Bearer" for s in to_blob)
    # the inbox SAS is a user-delegation SAS the destination's identity asked for
    assert any("comp=userdelegationkey" in s[1] and s[2] == "Bearer" for s in to_blob)
    sent = [s for s in to_blob if s[2] == "" and "/west/" in s[1]]
    assert sent and all("skoid=" in s[1] for s in sent), "the inbox was not written by SAS"
    # nothing plaintext in either account
    for name in REGIONS:
        for container in _containers(world, name):
            for blob in container.list_blobs():
                data = container.download_blob(blob.name).readall()
                assert MARKER not in data, f"plaintext in {name}/{blob.name}"


def _containers(world: IdentityWorld, account: str) -> list[ContainerClient]:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(
        world.azurite.account_url(account),
        credential={"account_name": account, "account_key": world.azurite.accounts[account]},
        connection_verify=str(world.bundle),
    )
    return [service.get_container_client(c.name) for c in service.list_containers()]


def test_the_storage_token_is_an_entra_token_for_storage(world: IdentityWorld) -> None:
    """What Azurite is shown: the token the region's credential gets for Blob Storage."""
    vault = world.vaults["east"]
    credential = ClientSecretCredential(
        vault.tenant_id,
        vault.client_id,
        vault.secret_file(vault.client_id).read_text(encoding="utf-8").strip(),
        authority=vault.url,
        disable_instance_discovery=True,
        connection_verify=str(world.bundle),
    )
    with credential:
        token = credential.get_token("https://storage.azure.com/.default").token
    claims = _claims(token)
    assert claims["aud"] == "https://storage.azure.com"
    assert claims["iss"] == f"https://sts.windows.net/{vault.tenant_id}/"
    assert claims["nbf"] <= claims["iat"] < claims["exp"]


def test_azurite_refuses_a_token_for_another_audience(world: IdentityWorld) -> None:
    """A Key Vault token is no storage token: Azurite checks the audience, as Azure does."""
    vault = world.vaults["east"]
    credential = ClientSecretCredential(
        vault.tenant_id,
        vault.client_id,
        vault.secret_file(vault.client_id).read_text(encoding="utf-8").strip(),
        authority=vault.url,
        disable_instance_discovery=True,
        connection_verify=str(world.bundle),
    )

    class KeyVaultToken:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            return credential.get_token("https://vault.azure.net/.default")

    with credential:
        container = ContainerClient(
            world.azurite.account_url("east"),
            "wrong-audience",
            credential=KeyVaultToken(),
            connection_verify=str(world.bundle),
        )
        with pytest.raises((ClientAuthenticationError, HttpResponseError)) as exc:
            container.create_container()
        assert exc.value.status_code in (401, 403)
        assert re.search(r"audience", str(exc.value), re.I)


def test_a_region_with_no_identity_and_no_key_is_one_clear_error(
    world: IdentityWorld, tmp_path: Path
) -> None:
    text = world.site_path.read_text(encoding="utf-8")
    east, rest = text.split('[regions."azure:west"]', 1)
    # east logs in as the "embedder" now, and no embedder gave the provider a credential
    east = east.replace('credential = "client-secret"', 'credential = "embedder"')
    east = re.sub(r"(?m)^client_secret_file = .*\n", "", east)
    broken = tmp_path / "broken.toml"
    broken.write_text(east + '[regions."azure:west"]' + rest, encoding="utf-8")
    with _open(broken) as site, pytest.raises(RegionVaultError) as exc:
        site.region("azure:east").vault.put("probe", b"x")
    message = str(exc.value)
    assert "is 'embedder', but the embedding code gave the azure provider no credential" in message
    assert 'regions."azure:east".credential' in message
