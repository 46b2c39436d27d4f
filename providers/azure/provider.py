"""The Azure provider: builds a region's Key Vault KeyService, the Sealer other regions use,
its Blob Storage Vault, the inbox Transit between regions and its Compute (VMs and managed
disks of one resource group, compute.py).

Nothing here imports the Azure SDK: the service modules (which do) are imported when a
service is first built, so the provider registers and validates settings without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from regionvault.core.interfaces import Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities, CaptureKind
from regionvault.providers.azure.metrics import BlobMetrics
from regionvault.providers.azure.settings import (
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
    BlobSettings,
    availability_zone,
    compute_scope,
    exclusive_spaces,
)

if TYPE_CHECKING:
    from regionvault.core.interfaces import ComputeScope
    from regionvault.core.types import RegionConfig
    from regionvault.providers.azure.blob import AzureVault
    from regionvault.providers.azure.clients import BlobClients
    from regionvault.providers.azure.compute import AzureCompute
    from regionvault.providers.azure.identity import CredentialSource
    from regionvault.providers.azure.keyvault import AzureKeyService, AzureSealer
    from regionvault.providers.azure.transit import AzureTransit

__all__ = ["NEEDS_SDK", "AzureProvider"]

#: the one line every command prints when the azure extra is not installed
NEEDS_SDK = "the azure provider needs the Azure SDK: pip install 'regionvault[azure]'"
_SDK_MODULES = frozenset({"azure", "isodate", "typing_extensions", "cryptography"})
#: the SDK check around the import of each service module
_needs_sdk = SdkGuard("azure", NEEDS_SDK, _SDK_MODULES)


class AzureProvider(Provider):
    """Key Vault, one key per region; Blob Storage, one storage account and container per
    region; transit through an inbox container in the destination's account; VMs and managed
    disks of one resource group per region.

    ``credential`` is a token credential (an azure-core ``TokenCredential``) used for every
    region's Key Vault, Compute and Blob Storage instead of the one its settings name; a
    storage account whose settings name an account key (``account_key_env``) uses that key
    instead. ``client_options`` go to every Blob Storage client (tests pass a capturing
    ``transport``)."""

    name: ClassVar[str] = "azure"
    capabilities: ClassVar[Capabilities] = Capabilities(
        worm_lock=True,
        legal_hold=True,
        server_side_copy=False,
        conditional_put=True,
        ranged_get=True,
        capture_kinds=frozenset({CaptureKind.BLOCKS}),
        launch=True,
        register_instance=False,
        key_rotation=True,
    )
    required_settings: ClassVar[frozenset[str]] = REQUIRED_SETTINGS
    optional_settings: ClassVar[frozenset[str]] = OPTIONAL_SETTINGS

    def __init__(
        self,
        credential: Any = None,
        *,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._credential = credential
        self._client_options = dict(client_options or {})
        self._clients: BlobClients | None = None
        self._credentials: CredentialSource | None = None
        #: every HTTP request the provider's Blob Storage clients send (metrics.py)
        self.metrics = BlobMetrics()

    def clients(self, region: RegionConfig) -> BlobClients:
        if self._clients is None:
            with _needs_sdk(region):
                from regionvault.providers.azure.clients import BlobClients

            self._clients = BlobClients(self._credential, self._client_options, self.metrics)
        return self._clients

    def settings(self, region: RegionConfig) -> BlobSettings:
        return BlobSettings.from_region(region)

    def validate(self, region: RegionConfig) -> None:
        BlobSettings.from_region(region)
        availability_zone(region)

    def compute_scope(self, region: RegionConfig) -> ComputeScope | None:
        """The VMs of the region's resource group, or of its zone (docs/azure.md)."""
        return compute_scope(region)

    def exclusive_spaces(self, region: RegionConfig, service: str) -> Mapping[str, str]:
        return exclusive_spaces(region, service)

    def region_capabilities(self, region: RegionConfig) -> Capabilities:
        return self._vault_capabilities(self.settings(region))

    def _vault_capabilities(self, settings: BlobSettings) -> Capabilities:
        """A container without version-level immutability offers no WORM lock or hold."""
        if settings.immutability:
            return self.capabilities
        return replace(self.capabilities, worm_lock=False, legal_hold=False)

    def compute(self, region: RegionConfig) -> AzureCompute:
        """The region's VMs and managed disks (compute.py), through the region's credential
        (the one :meth:`credentials` gives for its identity settings)."""
        with _needs_sdk(region):
            from regionvault.providers.azure.compute import AzureCompute
            from regionvault.providers.azure.identity import CredentialSettings

        credential = self.credentials(region).credential(CredentialSettings.from_region(region))
        return AzureCompute.from_region(region, credential, capabilities=self.capabilities)

    def credentials(self, region: RegionConfig) -> CredentialSource:
        """Every region's Key Vault credential: the embedder's, or one built from the
        region's settings (identity.py)."""
        if self._credentials is None:
            with _needs_sdk(region):
                from regionvault.providers.azure.identity import CredentialSource

            self._credentials = CredentialSource(self._credential)
        return self._credentials

    def _storage_login(self, region: RegionConfig, settings: BlobSettings) -> Any:
        """The token credential of ``region``'s storage account: None when its settings
        name an account key, else the region's identity (the credential its settings name,
        the one its Key Vault and Compute log in with; or the embedder's)."""
        if settings.account_key_env is not None:
            return None
        with _needs_sdk(region):
            from regionvault.providers.azure.identity import CredentialSettings

        return self.credentials(region).credential(CredentialSettings.from_region(region))

    def key_service(self, region: RegionConfig) -> AzureKeyService:
        with _needs_sdk(region):
            from regionvault.providers.azure.keyvault import AzureKeyService

        return AzureKeyService(
            region=region, credentials=self.credentials(region), capabilities=self.capabilities
        )

    def sealer(self, region: RegionConfig) -> AzureSealer:
        """Seals with the public half of ``region``'s key: the role "get" on it, nothing else."""
        with _needs_sdk(region):
            from regionvault.providers.azure.keyvault import AzureSealer

        return AzureSealer.for_region(region, self.credentials(region))

    def vault(self, region: RegionConfig) -> AzureVault:
        with _needs_sdk(region):
            from regionvault.providers.azure.blob import AzureVault

        settings = self.settings(region)
        settings.need_account(region, "vault")
        clients = self.clients(region)
        return AzureVault(
            region=region,
            settings=settings,
            container=lambda name: clients.container(
                settings, name, self._storage_login(region, settings)
            ),
            capabilities=self._vault_capabilities(settings),
        )

    def close(self) -> None:
        """Close the login credentials the provider built from site.toml (their token
        caches and HTTP sessions go; an embedder's credential is the embedder's to close)
        and forget the Blob Storage client factory; the next service built makes them
        anew. Each service closes its own SDK clients (Key Vault, ARM, Blob) when its site
        closes its regions."""
        credentials, self._credentials = self._credentials, None
        self._clients = None
        if credentials is not None:
            credentials.close()

    def transit(self, source: RegionConfig, destination: RegionConfig) -> AzureTransit:
        with _needs_sdk(destination):
            from regionvault.providers.azure.transit import AzureTransit

        settings = self.settings(destination)
        settings.need_account(destination, "transit inbox")
        clients = self.clients(destination)
        service = None
        account_key = None
        if settings.inbox_sas_env is None:
            # this process holds the destination's credential: it mints the sender's SAS
            # (with the account key, or a user delegation key its identity fetches)
            account_key = settings.account_key()
            service = clients.service(settings, self._storage_login(destination, settings))
        return AzureTransit(
            source=source,
            destination=destination,
            settings=settings,
            receiver=lambda: clients.container(
                settings, settings.inbox_container, self._storage_login(destination, settings)
            ),
            sender=lambda sas: clients.sas_container(settings, settings.inbox_container, sas),
            service=service,
            account_key=account_key,
            capabilities=self._vault_capabilities(settings),
        )
