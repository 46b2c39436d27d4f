"""The GCP provider: builds a region's Cloud KMS KeyService, the Sealer other regions use,
its Cloud Storage Vault, the inbox Transit between regions and its Compute (Compute Engine
instances and persistent disks of one zone, read and written through the region's backup
worker).

Nothing here imports the Google SDK: the service modules (which do) are imported when a
service is first built, so the provider registers and validates settings without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from regionvault.core.interfaces import ComputeScope, Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities, CaptureKind
from regionvault.providers.gcp.metrics import GcpMetrics
from regionvault.providers.gcp.settings import OPTIONAL_SETTINGS, REQUIRED_SETTINGS, GcpSettings

if TYPE_CHECKING:
    from collections.abc import Mapping

    from regionvault.core.types import RegionConfig
    from regionvault.providers.gcp.compute import GceCompute
    from regionvault.providers.gcp.kms import GcpKeyService, GcpSealer
    from regionvault.providers.gcp.storage import GcsVault
    from regionvault.providers.gcp.transit import GcsTransit

__all__ = ["NEEDS_SDK", "GcpProvider"]

#: the one line every command prints when the gcp extra is not installed
NEEDS_SDK = "the gcp provider needs the Google Cloud SDK: pip install 'regionvault[gcp]'"
_SDK_MODULES = frozenset({"google", "grpc", "proto", "google_crc32c", "requests"})
#: the SDK check around the import of each service module
_needs_sdk = SdkGuard("gcp", NEEDS_SDK, _SDK_MODULES)


class GcpProvider(Provider):
    """Cloud KMS, one key ring per region (location); Cloud Storage, one bucket per region;
    transit through an inbox bucket of the destination; Compute Engine instances and
    persistent disks of one zone per region.

    ``credentials`` are google-auth credentials used for every region instead of the ones
    its settings name (an embedder's)."""

    name: ClassVar[str] = "gcp"
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

    def __init__(self, credentials: Any = None) -> None:
        self._credentials = credentials
        #: every Cloud Storage request and Cloud KMS call the provider's services make
        self.metrics = GcpMetrics()

    def settings(self, region: RegionConfig) -> GcpSettings:
        return GcpSettings.from_region(region)

    def validate(self, region: RegionConfig) -> None:
        GcpSettings.from_region(region)

    def compute_scope(self, region: RegionConfig) -> ComputeScope | None:
        """GCE instances are zonal: a region lists those of its ``zone`` (docs/gcp.md)."""
        settings = self.settings(region)
        if settings.zone is None:
            return None  # no compute (building it would fail naming the key)
        location = settings.zone.rsplit("-", 1)[0]
        return ComputeScope("gcp", settings.account, location, settings.zone)

    def exclusive_spaces(self, region: RegionConfig, service: str) -> Mapping[str, str]:
        settings = self.settings(region)
        return settings.vault_spaces() if service == "vault" else settings.key_spaces()

    def credentials(self, region: RegionConfig, settings: GcpSettings, service: str) -> Any:
        """The login of ``service`` ("storage", "kms", "compute") in ``region`` (auth.py)."""
        with _needs_sdk(region):
            from regionvault.providers.gcp.auth import credentials_for

            return credentials_for(region, settings, service, self._credentials)

    def region_capabilities(self, region: RegionConfig) -> Capabilities:
        return self._vault_capabilities(self.settings(region))

    def _vault_capabilities(self, settings: GcpSettings) -> Capabilities:
        """A bucket without object retention offers no WORM lock or hold."""
        if settings.object_retention:
            return self.capabilities
        return replace(self.capabilities, worm_lock=False, legal_hold=False)

    def _kms_credentials(self, region: RegionConfig, settings: GcpSettings) -> Any:
        """The KMS login; None with ``kms_plaintext`` (a fake on the loopback, reached over
        an insecure channel that carries no credentials): resolving them would look for
        Application Default Credentials, probing the metadata server."""
        if settings.kms_plaintext:
            return None
        return self.credentials(region, settings, "kms")

    def key_service(self, region: RegionConfig) -> GcpKeyService:
        settings = self.settings(region)
        settings.need(region, "keys", "location")
        with _needs_sdk(region):
            from regionvault.providers.gcp.kms import GcpKeyService

            return GcpKeyService(
                region=region,
                settings=settings,
                credentials=self._kms_credentials(region, settings),
                capabilities=self.capabilities,
                metrics=self.metrics,
            )

    def sealer(self, region: RegionConfig) -> GcpSealer:
        """Seals with the public half of ``region``'s ASYMMETRIC_DECRYPT key: the permission
        ``cloudkms.cryptoKeyVersions.viewPublicKey`` on it, nothing else."""
        settings = self.settings(region)
        settings.need(region, "sealer", "location")
        with _needs_sdk(region):
            from regionvault.providers.gcp.kms import GcpSealer

            return GcpSealer.for_region(
                region, settings, self._kms_credentials(region, settings), self.metrics
            )

    def vault(self, region: RegionConfig) -> GcsVault:
        settings = self.settings(region)
        settings.need(region, "vault", "bucket")
        with _needs_sdk(region):
            from regionvault.providers.gcp.storage import GcsVault

            return GcsVault(
                region=region,
                settings=settings,
                credentials=self.credentials(region, settings, "storage"),
                capabilities=self._vault_capabilities(settings),
                metrics=self.metrics,
            )

    def transit(self, source: RegionConfig, destination: RegionConfig) -> GcsTransit:
        settings = self.settings(destination)
        settings.need(destination, "transit inbox", "inbox_bucket")
        with _needs_sdk(destination):
            from regionvault.providers.gcp.transit import GcsTransit

            return GcsTransit(
                source=source,
                destination=destination,
                settings=settings,
                credentials=self.credentials(destination, settings, "storage"),
                capabilities=self.capabilities,
                metrics=self.metrics,
            )

    def compute(self, region: RegionConfig) -> GceCompute:
        settings = self.settings(region)
        settings.need(region, "compute", "zone")
        with _needs_sdk(region):
            from regionvault.providers.gcp.compute import GceCompute

            return GceCompute(
                region=region,
                settings=settings,
                credentials=self.credentials(region, settings, "compute"),
                capabilities=self.capabilities,
            )
