"""The Azure provider's support for the conformance suite: a throwaway two-region site
(azure:east replicating to azure:west) whose vaults and inboxes are two storage accounts of
an Azurite it starts (installing the pinned Azurite with npm on first use), and whose keys
are two fake Key Vaults (providers/azure/fakes/keyvault.py: HTTPS on 127.0.0.1, each its own
tenant and CA, the real KeyClient and ClientSecretCredential against them), all stopped at
the end::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=azure

Each region's compute is an ARM fake (providers/azure/fakes/arm.py: HTTPS on 127.0.0.1) that
keeps its disks and snapshots as page blobs in the region's Azurite account and shares the
region's Key Vault fake's tenant and CA, so the one login of the region's settings serves its
keys and its compute; test instances are VMs seeded through the plain SDK whose OS disk is
the test data as a tar archive (:meth:`AzureConformanceSupport.make_instance`).

Azurite does not implement immutability policies or legal holds, so the tests of their
enforcement are skipped offline with that reason (:attr:`known_limits`).

Live: with ``REGIONVAULT_AZURE_LIVE=1`` the throwaway site is two real regions the
environment describes (providers/azure/testing.py: subscription, resource groups, storage
accounts, Key Vaults, subnets, the login), reached with their identity and no account key;
the run's containers are removed at its end and its VMs after each test. The WORM tests run
there when the accounts give new containers version-level immutability
(``REGIONVAULT_AZURE_IMMUTABILITY=1``), else they are skipped saying so.
``REGIONVAULT_AZURE_SITE`` names a site file of real regions to use as it is instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.conformance.support import ConformanceSupport, tar_image
from regionvault.providers.azure.azurite import AzuriteServer, environment
from regionvault.providers.azure.testing import LIVE_ENV, LiveSettings, live_mode

if TYPE_CHECKING:
    from regionvault.core.site import Region
    from regionvault.core.types import Instance

__all__ = [
    "ACCOUNTS",
    "LIVE_ENV",
    "AzureConformanceSupport",
    "key_variable",
    "live_mode",
    "live_site_text",
]

#: a site file of real regions that a live run uses as it is
SITE_ENV = "REGIONVAULT_AZURE_SITE"
#: the storage accounts of the two test regions, one per region
ACCOUNTS = ("east", "west")
#: the test regions' resource group and location (the ARM fake checks neither)
RESOURCE_GROUP = "rv-conformance"
LOCATION = "eastus"
#: the VM size of launches whose spec and source name none
VM_SIZE = "Standard_B1s"

#: what Azurite cannot show: Azure enforces these, Azurite answers 501 Not Implemented
WORM_OFFLINE = (
    "Azurite does not implement blob immutability policies or legal holds (501 "
    "APINotImplemented); the requests and Azure's documented 409s are tested in "
    "tests/azure/test_azure_blob.py, enforcement only live (REGIONVAULT_AZURE_LIVE=1)"
)
WORM_LIVE_OFF = (
    "the live accounts' containers have no version-level immutability "
    "(REGIONVAULT_AZURE_IMMUTABILITY is not 1): give the accounts account-level "
    "immutability and set it to run the WORM tests"
)


def key_variable(account: str) -> str:
    """The environment variable the test site names for ``account``'s key."""
    return f"REGIONVAULT_AZURITE_KEY_{account.upper()}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def region_lines(
    name: str,
    account_url: str,
    root: Path,
    *,
    keys: Mapping[str, Any] | None = None,
    compute: Mapping[str, Any] | None = None,
) -> list[str]:
    """site.toml lines of test region ``azure:<name>``: its vault and inbox in the account
    at ``account_url``; its keys on Key Vault with ``keys`` (a fake's ``region_settings``),
    else from the local provider under ``root``; its compute on ARM with ``compute`` (the
    Compute's own keys), else from the local provider under ``root``."""
    where = (root / name).as_posix()
    lines = [
        f'[regions."azure:{name}"]',
        f'account_url = "{account_url}"',
        f'account_key_env = "{key_variable(name)}"',
        "create = true",
        "immutability = true",
    ]
    if keys is not None:
        lines.extend(f"{k} = {_toml(v)}" for k, v in keys.items() if k != "create")
    if compute is not None:
        lines.extend(f"{k} = {_toml(v)}" for k, v in compute.items())
    lines.append("")
    if keys is None:
        lines.extend(
            [f'[regions."azure:{name}".keys]', 'provider = "local"', f'root = "{where}"', ""]
        )
    if compute is None:
        lines.extend(
            [f'[regions."azure:{name}".compute]', 'provider = "local"', f'root = "{where}"', ""]
        )
    return lines


def live_site_text(live: LiveSettings, *, tag: str) -> str:
    """The site.toml of a live run: regions ``azure:east`` (A) and ``azure:west`` (B) from
    ``live``, their containers named for the run (``tag``), east replicating to west."""
    lines = ['[site]\nname = "conformance-azure-live"\n']
    for letter, name in zip(("A", "B"), ACCOUNTS, strict=True):
        lines.append(f'[regions."azure:{name}"]')
        lines.extend(f"{k} = {_toml(v)}" for k, v in live.region_settings(letter, tag=tag).items())
        lines.append("")
    lines.append('[[replication]]\nfrom = "azure:east"\nto = "azure:west"\n')
    return "\n".join(lines)


class AzureConformanceSupport(ConformanceSupport):
    def __init__(self) -> None:
        worm = (
            "test_governance_retention_refuses_early_delete",
            "test_compliance_retention_refuses_delete_and_shortening",
            "test_legal_hold_refuses_delete_until_lifted",
        )
        reason: str | None = WORM_OFFLINE
        if live_mode():
            immutable = os.environ.get("REGIONVAULT_AZURE_IMMUTABILITY", "") == "1"
            reason = None if immutable or os.environ.get(SITE_ENV) else WORM_LIVE_OFF
        self.known_limits: Mapping[str, str] = dict.fromkeys(worm, reason) if reason else {}

    @contextlib.contextmanager
    def test_site(self, workdir: Path) -> Iterator[Path]:
        if live_mode():
            given = os.environ.get(SITE_ENV)
            if given:
                yield Path(given)
                return
            with self._live_site(workdir) as path:
                yield path
            return
        from regionvault.providers.azure.fakes.arm import ArmFake
        from regionvault.providers.azure.fakes.keyvault import fake_key_vaults

        server = AzuriteServer(
            dict.fromkeys(ACCOUNTS),
            log=workdir / "azurite.log",
            workdir=workdir / "azurite",
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(server)
            vaults = stack.enter_context(fake_key_vaults(workdir / "keyvault", ACCOUNTS))
            keys = {key_variable(account): server.accounts[account] for account in ACCOUNTS}
            stack.enter_context(environment(keys))
            lines = ['[site]\nname = "conformance-azure"\n']
            for account in ACCOUNTS:
                vault = vaults[account]
                url = server.account_url(account)
                # the region's compute: one login (the Key Vault fake's tenant) and one CA
                arm = ArmFake(
                    blob_endpoint=url,
                    account=account,
                    account_key=server.accounts[account],
                    workdir=workdir / "arm" / account,
                    tenant=vault.tenant,
                    ca=vault.ca,
                )
                stack.enter_context(arm)
                compute = {
                    "subscription_id": arm.subscription,
                    "resource_group": RESOURCE_GROUP,
                    "location": LOCATION,
                    "arm_endpoint": arm.endpoint,
                    "vm_size": VM_SIZE,
                    # the fake answers Retry-After: 0, which the SDK takes as "none given"
                    "poll_interval": 0,
                }
                key_settings = vault.region_settings(key_name="regionvault")
                lines.extend(
                    region_lines(account, url, workdir, keys=key_settings, compute=compute)
                )
            lines.append('[[replication]]\nfrom = "azure:east"\nto = "azure:west"\n')
            path = workdir / "site.toml"
            path.write_text("\n".join(lines), encoding="utf-8")
            yield path

    @contextlib.contextmanager
    def _live_site(self, workdir: Path) -> Iterator[Path]:
        """Two real regions from the environment (testing.py), containers named for this
        run, all removed at the end."""
        path = workdir / "site.toml"
        text = live_site_text(LiveSettings.from_environment(), tag=uuid.uuid4().hex[:10])
        path.write_text(text, encoding="utf-8")
        try:
            yield path
        finally:
            _remove_live_containers(path)

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        """A VM named after ``name`` with ``tags``, whose OS disk holds ``data`` as a tar
        archive (each file's bytes contiguous), made through the plain SDK with the region's
        own ARM client: an upload disk, then a VM attaching it."""
        from regionvault.providers.azure.compute import NAME_TAG, AzureCompute
        from regionvault.providers.azure.fakes.arm import seed_vm

        compute = region.compute
        if not isinstance(compute, AzureCompute):
            return super().make_instance(region, name, data=data, tags=tags, workdir=workdir)
        vm_name = f"{re.sub(r'[^A-Za-z0-9-]', '-', name)[:50].strip('-')}-{uuid.uuid4().hex[:8]}"
        vm_id = seed_vm(
            compute.client,
            compute.settings.resource_group,
            compute.settings.location,
            vm_name,
            tags={**tags, NAME_TAG: name},
            image=tar_image(data),
            vm_size=compute.settings.vm_size or VM_SIZE,
            subnet_id=compute.settings.subnet_id,
        )
        return compute.get_instance(vm_id)


def _remove_live_containers(site_path: Path) -> None:
    """Delete the containers a live run made (its vaults and inboxes), through the regions'
    own identities; a container already gone is fine, any other failure is raised."""
    from azure.core.exceptions import ResourceNotFoundError
    from regionvault.core.site import Site
    from regionvault.providers.azure.provider import AzureProvider

    with Site.load(site_path) as site:
        for region in site.regions:
            provider = site.registry.get(region.config.services["vault"].provider)
            if not isinstance(provider, AzureProvider):
                continue
            view = region.config.for_service("vault")
            settings = provider.settings(view)
            service = provider.clients(view).service(
                settings, provider._storage_login(view, settings)
            )
            with service:
                for container in (settings.container, settings.inbox_container):
                    with contextlib.suppress(ResourceNotFoundError):
                        service.delete_container(container)
