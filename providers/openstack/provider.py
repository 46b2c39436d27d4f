"""The openstack provider: a region's Compute in an OpenStack cloud through apache-libcloud's
``OpenStack_2_NodeDriver``. It offers no KeyService, Vault, Transit or Sealer: a site takes
those from other providers (``[regions."edge:a".keys] provider = ...``), and asking this
provider for one raises UnsupportedOperation naming it and the service.

Nothing here imports apache-libcloud: the compute module (which does) is imported when the
compute is first built, so the provider registers and validates settings without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NoReturn

from regionvault.core.errors import UnsupportedOperation
from regionvault.core.interfaces import Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities, CaptureKind
from regionvault.providers.openstack.settings import (
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
    OpenStackSettings,
)

if TYPE_CHECKING:
    from regionvault.core.interfaces import KeyService, Sealer, Transit, Vault
    from regionvault.core.types import RegionConfig
    from regionvault.providers.openstack.compute import OpenStackCompute

__all__ = ["NEEDS_SDK", "OpenStackProvider"]

NEEDS_SDK = "the openstack provider needs apache-libcloud: pip install 'regionvault[edge]'"
_needs_sdk = SdkGuard("openstack", NEEDS_SDK, {"libcloud", "requests"})


class OpenStackProvider(Provider):
    """Compute in OpenStack (nova, cinder, glance) through apache-libcloud."""

    name: ClassVar[str] = "openstack"
    capabilities: ClassVar[Capabilities] = Capabilities(
        worm_lock=False,
        legal_hold=False,
        server_side_copy=False,
        conditional_put=False,
        ranged_get=True,
        capture_kinds=frozenset({CaptureKind.BLOCKS}),
        launch=True,
        register_instance=False,
        key_rotation=False,
    )
    required_settings: ClassVar[frozenset[str]] = REQUIRED_SETTINGS
    optional_settings: ClassVar[frozenset[str]] = OPTIONAL_SETTINGS

    def settings(self, region: RegionConfig) -> OpenStackSettings:
        return OpenStackSettings.from_region(region)

    def validate(self, region: RegionConfig) -> None:
        OpenStackSettings.from_region(region)

    def _unsupported(self, region: RegionConfig, service: str) -> NoReturn:
        raise UnsupportedOperation(
            f"the {service} (the openstack provider offers compute only; "
            f"take the {service} from another provider)",
            provider="openstack",
            region=region.name,
        )

    def compute(self, region: RegionConfig) -> OpenStackCompute:
        settings = self.settings(region)
        with _needs_sdk(region):
            from regionvault.providers.openstack.compute import OpenStackCompute

            return OpenStackCompute(
                region=region, settings=settings, capabilities=self.capabilities
            )

    def key_service(self, region: RegionConfig) -> KeyService:
        self._unsupported(region, "keys")

    def sealer(self, region: RegionConfig) -> Sealer:
        self._unsupported(region, "sealer")

    def vault(self, region: RegionConfig) -> Vault:
        self._unsupported(region, "vault")

    def transit(self, source: RegionConfig, destination: RegionConfig) -> Transit:
        self._unsupported(destination, "transit")
