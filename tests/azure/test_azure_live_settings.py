"""Live mode's settings (providers/azure/testing.py), checked offline: the environment a live
run needs is named in one error when incomplete, and a complete one gives a site whose two
regions every Azure service accepts (storage through the regions' identity, no account key),
without touching Azure."""

from __future__ import annotations

from pathlib import Path

import pytest
from regionvault.core.config import load_site
from regionvault.core.errors import ConfigError
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.azure import plugin as azure_plugin
from regionvault.providers.azure.conformance import AzureConformanceSupport, live_site_text
from regionvault.providers.azure.settings import BlobSettings
from regionvault.providers.azure.testing import LIVE_KEY_NAME, LiveSettings

ENVIRONMENT = {
    "REGIONVAULT_AZURE_SUBSCRIPTION": "11111111-2222-3333-4444-555555555555",
    "REGIONVAULT_AZURE_RESOURCE_GROUP": "rv-live",
    "REGIONVAULT_AZURE_STORAGE_A": "rvliveeast",
    "REGIONVAULT_AZURE_STORAGE_B": "rvlivewest",
    "REGIONVAULT_AZURE_KEY_VAULT_A": "https://rv-live-a.vault.azure.net",
    "REGIONVAULT_AZURE_KEY_VAULT_B": "https://rv-live-b.vault.azure.net",
    "REGIONVAULT_AZURE_SUBNET_A": "/subscriptions/s/resourceGroups/n/providers/"
    "Microsoft.Network/virtualNetworks/v/subnets/a",
}


def test_an_incomplete_live_environment_is_one_error_naming_what_is_missing() -> None:
    with pytest.raises(ConfigError) as exc:
        LiveSettings.from_environment({"REGIONVAULT_AZURE_STORAGE_A": "rvliveeast"})
    message = str(exc.value)
    assert "REGIONVAULT_AZURE_LIVE=1 needs these environment variables" in message
    for name in (
        "REGIONVAULT_AZURE_SUBSCRIPTION",
        "REGIONVAULT_AZURE_RESOURCE_GROUP",
        "REGIONVAULT_AZURE_STORAGE_B",
        "REGIONVAULT_AZURE_KEY_VAULT_A",
        "REGIONVAULT_AZURE_KEY_VAULT_B",
    ):
        assert name in message
    assert "REGIONVAULT_AZURE_STORAGE_A" not in message and "\n" not in message


def test_a_live_environment_gives_a_site_every_azure_service_accepts(tmp_path: Path) -> None:
    live = LiveSettings.from_environment(
        {
            **ENVIRONMENT,
            "AZURE_TENANT_ID": "contoso.onmicrosoft.com",
            "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
        }
    )
    assert live.identity == {
        "credential": "client-secret",
        "tenant_id": "contoso.onmicrosoft.com",
        "client_id": "00000000-0000-0000-0000-000000000001",
        "client_secret_env": "AZURE_CLIENT_SECRET",
    }
    path = tmp_path / "site.toml"
    path.write_text(live_site_text(live, tag="run1"), encoding="utf-8")
    pm = make_plugin_manager(load_entry_points=False, plugins=[azure_plugin])
    registry = registry_from(pm)
    config = load_site(path, registry=registry)  # every provider validates its settings
    east, west = config.regions["azure:east"], config.regions["azure:west"]
    blob = BlobSettings.from_region(east)
    # storage through the region's identity: no account key, containers of this run
    assert blob.account_key_env is None and blob.storage_account == "rvliveeast"
    assert (blob.container, blob.inbox_container, blob.create) == ("rv-run1", "rv-run1-inbox", True)
    assert east.settings["key_name"] == LIVE_KEY_NAME and west.settings["location"] == "westeurope"
    assert east.settings["subnet_id"].endswith("/subnets/a") and "subnet_id" not in west.settings

    pytest.importorskip("azure.mgmt.compute", reason="the compute needs azure-mgmt-compute")
    from regionvault.providers.azure.compute import AzureComputeSettings
    from regionvault.providers.azure.identity import CredentialSettings
    from regionvault.providers.azure.keyvault import KeyVaultSettings

    compute = AzureComputeSettings.from_region(east)
    assert (compute.subscription_id, compute.resource_group) == (
        ENVIRONMENT["REGIONVAULT_AZURE_SUBSCRIPTION"],
        "rv-live",
    )
    assert compute.arm_endpoint is None  # the public cloud's
    assert (
        KeyVaultSettings.from_region(west).key_vault_url
        == ENVIRONMENT["REGIONVAULT_AZURE_KEY_VAULT_B"]
    )
    assert CredentialSettings.from_region(east).kind == "client-secret"


def test_without_a_service_principal_the_live_login_is_the_azure_cli() -> None:
    live = LiveSettings.from_environment(ENVIRONMENT)
    assert live.identity == {"credential": "azure-cli"}


def test_worm_tests_are_skipped_live_unless_the_accounts_are_immutable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REGIONVAULT_AZURE_LIVE", "1")
    monkeypatch.delenv("REGIONVAULT_AZURE_SITE", raising=False)
    monkeypatch.delenv("REGIONVAULT_AZURE_IMMUTABILITY", raising=False)
    limits = AzureConformanceSupport().known_limits
    assert set(limits) == {
        "test_governance_retention_refuses_early_delete",
        "test_compliance_retention_refuses_delete_and_shortening",
        "test_legal_hold_refuses_delete_until_lifted",
    }
    assert all("REGIONVAULT_AZURE_IMMUTABILITY" in reason for reason in limits.values())
    monkeypatch.setenv("REGIONVAULT_AZURE_IMMUTABILITY", "1")
    assert AzureConformanceSupport().known_limits == {}
    monkeypatch.delenv("REGIONVAULT_AZURE_LIVE")
    assert all("Azurite" in r for r in AzureConformanceSupport().known_limits.values())
