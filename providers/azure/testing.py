"""Live mode of the Azure tests and conformance suite: ``REGIONVAULT_AZURE_LIVE=1`` runs them
against real Azure, in two regions (A and B) the environment describes; offline (Azurite and
the provider's fakes) stays the default.

=======================================  ===================================================
variable                                 meaning
=======================================  ===================================================
``REGIONVAULT_AZURE_LIVE``               ``1``: live mode
``REGIONVAULT_AZURE_SUBSCRIPTION``       the subscription of the test resource group(s)
``REGIONVAULT_AZURE_RESOURCE_GROUP``     the resource group test VMs, disks and snapshots go
                                         in (``_A``/``_B`` suffixed: one per region)
``REGIONVAULT_AZURE_LOCATION_A``, ``_B`` the regions' Azure locations (``eastus``,
                                         ``westeurope`` by default)
``REGIONVAULT_AZURE_STORAGE_A``, ``_B``  the regions' storage account names
``REGIONVAULT_AZURE_KEY_VAULT_A``, ``_B`` the regions' Key Vault URLs
``REGIONVAULT_AZURE_SUBNET_A``, ``_B``   a subnet id per region for test and launched VMs'
                                         NICs (Azure needs one to make a VM)
``REGIONVAULT_AZURE_VM_SIZE``            the test VMs' size (``Standard_B1s``)
``REGIONVAULT_AZURE_IMMUTABILITY``       ``1`` when the accounts' new containers get
                                         version-level immutability (account-level
                                         immutability): the WORM tests then run
``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID``,  a service principal's login (client secret from
``AZURE_CLIENT_SECRET``                  the environment); without them, whoever ``az
                                         login`` signed in (``azure-cli``)
=======================================  ===================================================

Blob Storage is reached with the regions' identity (Azure RBAC), never an account key; every
run makes containers and a Key Vault key version of its own names and removes its
containers, VMs, disks and snapshots at the end (the key, ``regionvault-conformance``, stays
and gains versions). Nothing here imports the Azure SDK.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from regionvault.core.errors import ConfigError

__all__ = ["LIVE_ENV", "LIVE_KEY_NAME", "LiveSettings", "live_mode"]

#: set to ``1`` to run the Azure tests against real Azure
LIVE_ENV = "REGIONVAULT_AZURE_LIVE"
#: the Key Vault key the live runs use in each vault (made on first use)
LIVE_KEY_NAME = "regionvault-conformance"
_PREFIX = "REGIONVAULT_AZURE_"
_DEFAULT_LOCATIONS = {"A": "eastus", "B": "westeurope"}


def live_mode() -> bool:
    """True when the Azure tests should talk to real Azure (``REGIONVAULT_AZURE_LIVE=1``)."""
    return os.environ.get(LIVE_ENV, "") == "1"


@dataclass(frozen=True)
class LiveRegion:
    """One live test region (A or B) as the environment describes it."""

    letter: str
    storage_account: str
    key_vault_url: str
    resource_group: str
    location: str
    subnet_id: str | None


@dataclass(frozen=True)
class LiveSettings:
    subscription_id: str
    regions: tuple[LiveRegion, LiveRegion]
    vm_size: str
    immutability: bool
    #: the login: client-secret settings, or ``{"credential": "azure-cli"}``
    identity: Mapping[str, Any]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> LiveSettings:
        """The live settings; :class:`ConfigError` naming every variable that is missing."""
        env = os.environ if environ is None else environ
        missing: list[str] = []

        def need(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                missing.append(name)
            return value

        subscription = need(f"{_PREFIX}SUBSCRIPTION")
        regions = []
        for letter in ("A", "B"):
            group = env.get(f"{_PREFIX}RESOURCE_GROUP_{letter}", "").strip()
            regions.append(
                LiveRegion(
                    letter=letter,
                    storage_account=need(f"{_PREFIX}STORAGE_{letter}"),
                    key_vault_url=need(f"{_PREFIX}KEY_VAULT_{letter}"),
                    resource_group=group or need(f"{_PREFIX}RESOURCE_GROUP"),
                    location=env.get(f"{_PREFIX}LOCATION_{letter}", "").strip()
                    or _DEFAULT_LOCATIONS[letter],
                    subnet_id=env.get(f"{_PREFIX}SUBNET_{letter}", "").strip() or None,
                )
            )
        if missing:
            unique = sorted(set(missing))
            raise ConfigError(
                f"{LIVE_ENV}=1 needs these environment variables (docs/azure.md, "
                f"'Live mode'): {', '.join(unique)}",
                provider="azure",
            )
        identity: dict[str, Any]
        if env.get("AZURE_CLIENT_ID") and env.get("AZURE_TENANT_ID"):
            identity = {
                "credential": "client-secret",
                "tenant_id": env["AZURE_TENANT_ID"],
                "client_id": env["AZURE_CLIENT_ID"],
                "client_secret_env": "AZURE_CLIENT_SECRET",
            }
        else:
            identity = {"credential": "azure-cli"}
            if env.get("AZURE_TENANT_ID"):
                identity["tenant_id"] = env["AZURE_TENANT_ID"]
        return cls(
            subscription_id=subscription,
            regions=(regions[0], regions[1]),
            vm_size=env.get(f"{_PREFIX}VM_SIZE", "").strip() or "Standard_B1s",
            immutability=env.get(f"{_PREFIX}IMMUTABILITY", "") == "1",
            identity=identity,
        )

    def region_settings(self, letter: str, *, tag: str) -> dict[str, Any]:
        """site.toml settings of live test region ``letter`` (A or B): its account through
        its identity (no account key), containers named for the run (``tag``), made on
        first use; its Key Vault key; its compute in its resource group."""
        region = self.regions[0] if letter == "A" else self.regions[1]
        settings: dict[str, Any] = {
            "storage_account": region.storage_account,
            "container": f"rv-{tag}",
            "inbox_container": f"rv-{tag}-inbox",
            "create": True,
            "immutability": self.immutability,
            "key_vault_url": region.key_vault_url,
            "key_name": LIVE_KEY_NAME,
            **self.identity,
            "subscription_id": self.subscription_id,
            "resource_group": region.resource_group,
            "location": region.location,
            "vm_size": self.vm_size,
        }
        if region.subnet_id:
            settings["subnet_id"] = region.subnet_id
        return settings
