"""The Azure provider registers and checks its settings without the Azure SDK, says what a
service lacks (the SDK, a setting), and ships the pinned Azurite its launcher installs. None
of these tests talks to Blob Storage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.config import parse_site
from regionvault.core.errors import ConfigError
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.azure import azurite
from regionvault.providers.azure import plugin as azure_plugin

BLOCK_SDKS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "azure":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str, tmp_path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SDKS + textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


def test_registers_and_validates_without_the_sdk(tmp_path: Path) -> None:
    found = _run(
        """
        import json
        from regionvault.core.config import parse_site
        from regionvault.core.errors import RegionVaultError
        from regionvault.core.plugins import get_plugin_manager
        import regionvault.providers.azure.azurite

        pm, registry = get_plugin_manager()
        provider = registry.get("azure")
        regions = {"azure:east": {"storage_account": "rveast"}}
        site = parse_site({"regions": regions}, registry=registry)
        region = site.region("east")
        provider.validate(region)
        refused = []
        for build in (provider.vault, provider.compute):
            try:
                build(region)
            except RegionVaultError as exc:
                refused.append(str(exc))
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "azure")
        print(json.dumps({"names": registry.names(), "loaded": loaded, "refused": refused}))
        """,
        tmp_path,
    )
    assert "azure" in found["names"] and found["loaded"] == []
    assert found["refused"] == 2 * [
        "[azure:east] the azure provider needs the Azure SDK: pip install 'regionvault[azure]'"
    ]


def _region(settings: dict[str, Any], region: str = "azure:east") -> Any:
    pm = make_plugin_manager(load_entry_points=False, plugins=[azure_plugin])
    registry = registry_from(pm)
    site = parse_site({"regions": {region: settings}}, registry=registry, source="site.toml")
    return registry.get("azure"), site.region(region.partition(":")[2])


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"storage_account": "Not_An_Account"}, "storage_account", "is not a storage account name"),
        ({"account_url": "ftp://x"}, "account_url", "is not a blob endpoint"),
        ({"container": "Bad_Name"}, "container", "is not a valid blob container name"),
        ({"inbox_container": "regionvault"}, "inbox_container", "must differ from container"),
        (
            {"account_key_env": "not a variable"},
            "account_key_env",
            "is not an environment variable",
        ),
        ({"block_size": 1}, "block_size", "must be between"),
        ({"immutability": "yes"}, "immutability", "must be true or false"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as bad:  # the site checks every region when it loads
        _region(settings)
    assert f'regions."azure:east".{key}' in str(bad.value) and message in str(bad.value)


@pytest.mark.parametrize("key", ["subscription_id", "resource_group", "location"])
def test_compute_without_its_required_settings_names_the_key(key: str) -> None:
    pytest.importorskip("azure.mgmt.compute", reason="the compute needs azure-mgmt-compute")
    settings = {"subscription_id": "sub", "resource_group": "rg", "location": "eastus"}
    del settings[key]
    provider, region = _region(settings)
    with pytest.raises(ConfigError) as missing:
        provider.compute(region)
    assert f'regions."azure:east".{key}' in str(missing.value)


def test_the_compute_settings_named_here_are_the_computes_own() -> None:
    """settings.py names compute.py's keys without importing the SDK; they must be the keys
    AzureComputeSettings.from_region reads (besides identity.py's ca_file), no more, no less."""
    pytest.importorskip("azure.mgmt.compute", reason="the compute needs azure-mgmt-compute")
    from regionvault.providers.azure import compute
    from regionvault.providers.azure.settings import COMPUTE_SETTINGS, OPTIONAL_SETTINGS

    assert COMPUTE_SETTINGS == compute.COMPUTE_SETTINGS
    assert COMPUTE_SETTINGS <= OPTIONAL_SETTINGS

    read: set[str] = set()

    class Recording(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> Any:
            read.add(key)
            return super().__getitem__(key)

    _, region = _region({"subscription_id": "sub", "resource_group": "rg", "location": "x"})
    every: dict[str, Any] = dict.fromkeys(COMPUTE_SETTINGS, "value")
    every |= {"compute_concurrency": 2, "poll_interval": 1, "start_timeout": 60}
    every["availability_zone"] = "1"
    object.__setattr__(region, "settings", Recording(every))
    compute.AzureComputeSettings.from_region(region)
    assert read - {"ca_file"} == COMPUTE_SETTINGS


def test_the_key_settings_named_here_are_the_services_own() -> None:
    """settings.py names the Key Vault and identity keys without importing the SDK; they
    must be the ones keyvault.py and identity.py read."""
    from regionvault.providers.azure.identity import CREDENTIAL_SETTINGS
    from regionvault.providers.azure.keyvault import KEY_VAULT_SETTINGS
    from regionvault.providers.azure.settings import KEY_SETTINGS, OPTIONAL_SETTINGS

    assert KEY_VAULT_SETTINGS | CREDENTIAL_SETTINGS <= OPTIONAL_SETTINGS
    assert KEY_SETTINGS <= KEY_VAULT_SETTINGS | CREDENTIAL_SETTINGS


def test_the_provider_builds_keys_and_a_sealer_on_key_vault(tmp_path: Path) -> None:
    """key_service and sealer of a region whose settings point at a fake Key Vault: a data
    key round trip, and a seal (public key only) that only that KeyService opens."""
    from regionvault.providers.azure.fakes.keyvault import fake_key_vaults
    from regionvault.providers.azure.keyvault import AzureKeyService, AzureSealer

    with fake_key_vaults(tmp_path, ["east"], key_size=2048) as fakes:
        settings = {"storage_account": "rveast", **fakes["east"].region_settings(key_name="rv")}
        provider, region = _region(settings)
        keys = provider.key_service(region)
        try:
            assert isinstance(keys, AzureKeyService)
            context = {"vault": "v", "kind": "pack", "name": "p"}
            data_key = keys.generate_data_key(context)
            assert keys.unwrap(data_key.wrapped, context) == data_key.plaintext
            sealer = provider.sealer(region)
            assert isinstance(sealer, AzureSealer)
            assert keys.unseal(sealer.seal(b"secret", context), context) == b"secret"
        finally:
            keys.close()


def test_the_vault_needs_an_account() -> None:
    provider, region = _region({})
    with pytest.raises(ConfigError, match=r"storage_account: missing .* for the vault"):
        provider.vault(region)


def test_a_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RV_NO_SUCH_KEY", raising=False)
    provider, region = _region({"storage_account": "rveast", "account_key_env": "RV_NO_SUCH_KEY"})
    with pytest.raises(ConfigError, match=r"RV_NO_SUCH_KEY .* is not set"):
        provider.vault(region)


# --------------------------------------------------------------------------- the launcher


def test_the_pinned_azurite_ships_in_the_package() -> None:
    manifest = json.loads((azurite.AZURITE_PACKAGE / "package.json").read_text())
    lock = json.loads((azurite.AZURITE_PACKAGE / "package-lock.json").read_text())
    assert azurite.azurite_version() == manifest["dependencies"]["azurite"] == "3.37.0"
    assert lock["packages"]["node_modules/azurite"]["version"] == "3.37.0"
    assert lock["packages"]["node_modules/azurite"]["integrity"].startswith("sha512-")


def test_without_npm_the_launcher_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(azurite.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(azurite.AzuriteUnavailable) as missing:
        azurite.AzuriteServer({"east": None}).start()
    text = str(missing.value)
    assert "\n" not in text
    assert text.startswith("the Azure tests need npm (Node.js) to install Azurite 3.37.0 into ")
    assert str(tmp_path / "cache") in text


def test_the_install_is_keyed_by_the_lockfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that holds an install for this lockfile is used without npm; the directory
    name changes with the lockfile, so a new pin never runs an old install."""
    monkeypatch.setenv(azurite.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    target = azurite._install_dir()
    assert target.parent == tmp_path and len(target.name) == 12
    binary = target / "node_modules" / ".bin" / "azurite-blob"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    assert azurite.azurite_command() == [str(binary)]
