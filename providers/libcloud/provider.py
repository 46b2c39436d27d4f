"""The libcloud provider: a region's Vault, and the Transit into it, in an object store
reached through apache-libcloud's storage drivers. It offers no Compute, no KeyService and
no Sealer: a site takes those from other providers (``[regions."edge:a".keys] provider =
...``), and asking this provider for one raises UnsupportedOperation naming it and the
service.

Nothing here imports apache-libcloud: the service modules (which do) are imported when a
service is first built, so the provider registers and validates settings without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, NoReturn

from regionvault.core.errors import UnsupportedOperation
from regionvault.core.interfaces import Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities
from regionvault.providers.libcloud.settings import (
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
    LibcloudSettings,
)

if TYPE_CHECKING:
    from regionvault.core.interfaces import Compute, KeyService, Sealer
    from regionvault.core.types import RegionConfig
    from regionvault.providers.libcloud.transit import LibcloudTransit
    from regionvault.providers.libcloud.vault import LibcloudVault

__all__ = ["NEEDS_SDK", "LibcloudProvider"]

NEEDS_SDK = "the libcloud provider needs apache-libcloud: pip install 'regionvault[edge]'"
_needs_sdk = SdkGuard("libcloud", NEEDS_SDK, {"libcloud", "requests"})


class LibcloudProvider(Provider):
    """Vault and Transit in S3, Azure Blobs, MinIO, Ceph RGW or OpenStack Swift through
    apache-libcloud."""

    name: ClassVar[str] = "libcloud"
    #: what every driver offers through libcloud: no object lock, no legal hold, no
    #: server-side copy between regions; if-absent puts where the store honours
    #: ``If-None-Match: *`` (per region: ``conditional_put``)
    capabilities: ClassVar[Capabilities] = Capabilities(
        worm_lock=False,
        legal_hold=False,
        server_side_copy=False,
        conditional_put=True,
        ranged_get=True,
        capture_kinds=frozenset(),
        launch=False,
        register_instance=False,
        key_rotation=False,
    )
    required_settings: ClassVar[frozenset[str]] = REQUIRED_SETTINGS
    optional_settings: ClassVar[frozenset[str]] = OPTIONAL_SETTINGS

    def settings(self, region: RegionConfig) -> LibcloudSettings:
        return LibcloudSettings.from_region(region)

    def validate(self, region: RegionConfig) -> None:
        LibcloudSettings.from_region(region)

    def region_capabilities(self, region: RegionConfig) -> Capabilities:
        return self._capabilities(self.settings(region))

    def _capabilities(self, settings: LibcloudSettings) -> Capabilities:
        return replace(self.capabilities, conditional_put=settings.conditional_put)

    def _unsupported(self, region: RegionConfig, service: str) -> NoReturn:
        raise UnsupportedOperation(
            f"the {service} (the libcloud provider offers a vault and its transit only; "
            f"take the {service} from another provider)",
            provider="libcloud",
            region=region.name,
        )

    def compute(self, region: RegionConfig) -> Compute:
        self._unsupported(region, "compute")

    def key_service(self, region: RegionConfig) -> KeyService:
        self._unsupported(region, "keys")

    def sealer(self, region: RegionConfig) -> Sealer:
        self._unsupported(region, "sealer")

    def vault(self, region: RegionConfig) -> LibcloudVault:
        settings = self.settings(region)
        settings.need(region, "vault", "container")
        with _needs_sdk(region):
            from regionvault.providers.libcloud.vault import LibcloudVault

            return LibcloudVault(
                region=region, settings=settings, capabilities=self._capabilities(settings)
            )

    def transit(self, source: RegionConfig, destination: RegionConfig) -> LibcloudTransit:
        settings = self.settings(destination)
        settings.need(destination, "transit inbox", "container")
        with _needs_sdk(destination):
            from regionvault.providers.libcloud.transit import LibcloudTransit

            return LibcloudTransit(
                source=source,
                destination=destination,
                settings=settings,
                capabilities=self._capabilities(settings),
            )
