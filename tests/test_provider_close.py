"""Provider.close: a site closing closes the providers its regions used, once no other open
site of the process uses them (providers are shared process-wide by the registry); the
Azure provider closes the login credentials it built, never an embedder's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from regionvault.core.config import load_site
from regionvault.core.plugins import hookimpl, make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.local import plugin as local_plugin
from regionvault.providers.local.provider import LocalProvider


class CountingProvider(LocalProvider):
    """The local provider under another name, counting its closes."""

    name: ClassVar[str] = "counting"
    closed: ClassVar[int] = 0

    def close(self) -> None:
        type(self).closed += 1


class _Plugin:
    @hookimpl
    def regionvault_register_providers(self, registry: Any) -> None:
        registry.add(CountingProvider)


def _site_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[site]\nname = "{name}"\n\n'
        f'[regions."counting:east"]\nroot = "{(tmp_path / name / "east").as_posix()}"\n\n'
        f'[regions."local:west"]\nroot = "{(tmp_path / name / "west").as_posix()}"\n',
        encoding="utf-8",
    )
    return path


def test_the_last_site_to_close_closes_the_provider(tmp_path: Path) -> None:
    CountingProvider.closed = 0
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin, _Plugin()])
    registry = registry_from(pm)

    def open_site(name: str) -> Site:
        path = _site_file(tmp_path, name)
        return Site(load_site(path, registry=registry), registry=registry, plugin_manager=pm)

    first, second = open_site("one"), open_site("two")
    first.region("counting:east").vault.put("a", b"1")
    second.region("counting:east").vault.put("b", b"2")
    shared = registry.get("counting")
    first.close()
    assert CountingProvider.closed == 0, "closed while another open site still uses it"
    # the other site's services still work after the first one closed
    assert second.region("counting:east").vault.get("b") == b"2"
    second.close()
    assert CountingProvider.closed == 1
    second.close()  # a second close closes nothing more
    first.close()
    assert CountingProvider.closed == 1
    # the provider is still usable after its close: a new site makes what it needs anew
    with open_site("three") as third:
        assert registry.get("counting") is shared
        third.region("counting:east").vault.put("c", b"3")
    assert CountingProvider.closed == 2


def test_the_azure_provider_closes_the_credentials_it_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("azure.identity", reason="the azure provider needs the Azure SDK")
    from regionvault.core.types import RegionConfig, RegionId
    from regionvault.providers.azure.identity import CredentialSettings
    from regionvault.providers.azure.provider import AzureProvider

    closed: list[str] = []

    class Login:
        """A credential standing in for the built ClientSecretCredential (no login made)."""

        def __init__(self, who: str) -> None:
            self.who = who

        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise AssertionError("no login in this test")

        def close(self) -> None:
            closed.append(self.who)

    built: list[Login] = []

    def build(settings: CredentialSettings, **options: Any) -> Login:
        built.append(Login(f"{settings.client_id}#{len(built)}"))
        return built[-1]

    monkeypatch.setattr(CredentialSettings, "build", build)
    settings = {
        "tenant_id": "contoso.onmicrosoft.com",
        "client_id": "00000000-0000-0000-0000-000000000001",
    }
    region = RegionConfig(
        id=RegionId("azure", "east"), settings=settings, services={}, base_dir=tmp_path
    )
    provider = AzureProvider()
    login = provider.credentials(region).credential(CredentialSettings.from_region(region))
    assert login is built[0]
    provider.close()
    assert closed == [f"{settings['client_id']}#0"]
    # used again after its close: a new login is built (and the closed one never handed out)
    again = provider.credentials(region).credential(CredentialSettings.from_region(region))
    assert again is built[1]
    provider.close()
    assert closed == [f"{settings['client_id']}#0", f"{settings['client_id']}#1"]

    # an embedder's credential is the embedder's to close
    embedder = Login("embedder")
    given = AzureProvider(credential=embedder)
    assert given.credentials(region).credential(CredentialSettings.from_region(region)) is embedder
    given.close()
    assert "embedder" not in closed
