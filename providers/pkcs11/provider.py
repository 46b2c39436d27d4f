"""The pkcs11 provider: a region's KeyService in a PKCS#11 token and the Sealer other regions
build from its exported public key. It offers no compute, vault or transit: a site takes
those from another provider (``[regions."pkcs11:edge".vault] provider = "local"``), and
asking this one for them raises :class:`UnsupportedOperation` naming the provider and the
service.

Nothing here imports python-pkcs11: keys.py (which does) is imported when a service is
first built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NoReturn

from regionvault.core.errors import ConfigError, UnsupportedOperation
from regionvault.core.interfaces import Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities
from regionvault.providers.pkcs11.settings import (
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
    Pkcs11Settings,
)

if TYPE_CHECKING:
    from regionvault.core.interfaces import Compute, Transit, Vault
    from regionvault.core.types import RegionConfig
    from regionvault.providers.pkcs11.keys import Pkcs11KeyService
    from regionvault.providers.pkcs11.sealing import Pkcs11Sealer

__all__ = ["NEEDS_SDK", "Pkcs11Provider"]

NEEDS_SDK = "the pkcs11 provider needs python-pkcs11: pip install 'regionvault[edge]'"
_needs_sdk = SdkGuard("pkcs11", NEEDS_SDK, {"pkcs11"})


class Pkcs11Provider(Provider):
    """Keys in an HSM over PKCS#11: one token per region, an AES-256 key per version
    (``<prefix>-<n>``) that wraps data keys in the token, an RSA key pair that other regions
    seal to."""

    name: ClassVar[str] = "pkcs11"
    capabilities: ClassVar[Capabilities] = Capabilities(
        worm_lock=False,
        legal_hold=False,
        server_side_copy=False,
        conditional_put=False,
        ranged_get=False,
        key_rotation=True,
    )
    required_settings: ClassVar[frozenset[str]] = REQUIRED_SETTINGS
    optional_settings: ClassVar[frozenset[str]] = OPTIONAL_SETTINGS

    def validate(self, region: RegionConfig) -> None:
        Pkcs11Settings.from_region(region)

    def _unsupported(self, region: RegionConfig, service: str) -> NoReturn:
        raise UnsupportedOperation(
            f"the {service} service (pkcs11 offers keys only: take {service} from another "
            f'provider, [regions."{region.name}".{service}] provider = "...")',
            provider=self.name,
            region=region.name,
        )

    def key_service(self, region: RegionConfig) -> Pkcs11KeyService:
        settings = Pkcs11Settings.from_region(region)
        with _needs_sdk(region):
            from regionvault.providers.pkcs11.keys import Pkcs11KeyService

            return Pkcs11KeyService(
                region=region.name, settings=settings, capabilities=self.capabilities
            )

    def sealer(self, region: RegionConfig) -> Pkcs11Sealer:
        """Seals with the region's public key alone, read from the PEM file ``public_key``
        (exported from the token: ``Pkcs11KeyService.public_key_pem``); no PIN, no token."""
        settings = Pkcs11Settings.from_region(region)
        if settings.public_key is None:
            raise settings.error(
                "public_key",
                "missing: other regions seal with the PEM of this region's public key",
            )
        try:
            pem = settings.public_key.read_bytes()
        except OSError as exc:
            raise settings.error(
                "public_key", f"cannot read {settings.public_key}: {exc.strerror}"
            ) from None
        from regionvault.providers.pkcs11.sealing import Pkcs11Sealer

        try:
            return Pkcs11Sealer.from_pem(region.name, pem)
        except ValueError as exc:
            raise ConfigError(
                f"{settings.public_key} is not a PEM public key: {exc}",
                key=f'regions."{region.name}".public_key',
                provider=self.name,
                region=region.name,
            ) from None

    def compute(self, region: RegionConfig) -> Compute:
        self._unsupported(region, "compute")

    def vault(self, region: RegionConfig) -> Vault:
        self._unsupported(region, "vault")

    def transit(self, source: RegionConfig, destination: RegionConfig) -> Transit:
        self._unsupported(destination, "transit")
