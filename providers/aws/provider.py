"""The AWS provider: builds a region's EC2 Compute, KMS KeyService and S3 Vault, the KMS
Sealer other regions use, and the S3-inbox Transit between regions.

Nothing here imports boto3: the service modules (which do) are imported when a service is
first built, so the provider registers and validates settings without the SDK installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from regionvault.core.interfaces import ComputeScope, Provider
from regionvault.core.plugins import SdkGuard
from regionvault.core.types import Capabilities, CaptureKind
from regionvault.providers.aws.metrics import AwsMetrics
from regionvault.providers.aws.settings import OPTIONAL_SETTINGS, REQUIRED_SETTINGS, AwsSettings

if TYPE_CHECKING:
    from collections.abc import Mapping

    from regionvault.core.types import RegionConfig
    from regionvault.providers.aws.clients import ClientFactory
    from regionvault.providers.aws.ec2 import AwsCompute
    from regionvault.providers.aws.kms import AwsKeyService, AwsSealer
    from regionvault.providers.aws.s3 import AwsTransit, AwsVault

__all__ = ["AwsProvider"]


#: the one line every command prints when the aws extra is not installed
NEEDS_SDK = "the aws provider needs boto3: pip install 'regionvault[aws]'"
_SDK_MODULES = frozenset({"boto3", "botocore", "s3transfer", "jmespath"})
#: the SDK check around the import of each service module
_needs_sdk = SdkGuard("aws", NEEDS_SDK, _SDK_MODULES)


class AwsProvider(Provider):
    """EC2 + KMS + S3, one KMS key and one bucket per region.

    ``metrics`` counts every HTTP request the provider's clients send, by region, service and
    operation (see :mod:`regionvault.providers.aws.metrics`).
    """

    name: ClassVar[str] = "aws"
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
        # EC2's instance and system status checks take minutes to pass
        launch_health_timeout=900.0,
        launch_facts_of="aws",
    )
    required_settings: ClassVar[frozenset[str]] = REQUIRED_SETTINGS
    optional_settings: ClassVar[frozenset[str]] = OPTIONAL_SETTINGS

    def __init__(self) -> None:
        self.metrics = AwsMetrics()
        self._factory: ClientFactory | None = None

    @property
    def clients(self) -> ClientFactory:
        if self._factory is None:
            from regionvault.providers.aws.clients import ClientFactory

            self._factory = ClientFactory(self.metrics)
        return self._factory

    def close(self) -> None:
        """Close every boto3 client the provider made (their connection pools) and forget
        them and their sessions; the next service built makes new ones."""
        factory, self._factory = self._factory, None
        if factory is not None:
            factory.close()

    def settings(self, region: RegionConfig) -> AwsSettings:
        return AwsSettings.from_region(region)

    def validate(self, region: RegionConfig) -> None:
        AwsSettings.from_region(region)

    def region_capabilities(self, region: RegionConfig) -> Capabilities:
        return self._vault_capabilities(self.settings(region))

    def compute_scope(self, region: RegionConfig) -> ComputeScope:
        """The region's AWS region, or its availability zone of it (docs/aws.md, "Zones")."""
        settings = self.settings(region)
        return ComputeScope(
            "aws", settings.account, settings.aws_region, settings.availability_zone
        )

    def exclusive_spaces(self, region: RegionConfig, service: str) -> Mapping[str, str]:
        settings = self.settings(region)
        return settings.vault_spaces() if service == "vault" else settings.key_spaces()

    def _vault_capabilities(self, settings: AwsSettings) -> Capabilities:
        """A bucket without Object Lock offers no WORM lock and no legal hold."""
        if settings.object_lock:
            return self.capabilities
        return Capabilities(
            **{
                **{
                    f: getattr(self.capabilities, f) for f in self.capabilities.__dataclass_fields__
                },
                "worm_lock": False,
                "legal_hold": False,
            }
        )

    def compute(self, region: RegionConfig) -> AwsCompute:
        with _needs_sdk(region):
            from regionvault.providers.aws.ec2 import AwsCompute

        return AwsCompute(
            region=region,
            settings=self.settings(region),
            clients=self.clients,
            capabilities=self.capabilities,
        )

    def key_service(self, region: RegionConfig) -> AwsKeyService:
        with _needs_sdk(region):
            from regionvault.providers.aws.kms import AwsKeyService

        return AwsKeyService(
            region=region,
            settings=self.settings(region),
            clients=self.clients,
            capabilities=self.capabilities,
        )

    def vault(self, region: RegionConfig) -> AwsVault:
        with _needs_sdk(region):
            from regionvault.providers.aws.s3 import AwsVault

        settings = self.settings(region)
        return AwsVault(
            region=region,
            settings=settings,
            clients=self.clients,
            capabilities=self._vault_capabilities(settings),
        )

    def sealer(self, region: RegionConfig) -> AwsSealer:
        """KMS Encrypt on ``region``'s key with the caller's credentials: kms:Encrypt only."""
        with _needs_sdk(region):
            from regionvault.providers.aws.kms import AwsSealer

        settings = self.settings(region)
        settings.need(region, "kms_key", "sealer")
        if settings.create:
            # test/dev set-ups: a region whose KeyService never ran has no key yet; make it
            # as that KeyService would on first use (real set-ups never take this path)
            self.key_service(region).key_id  # noqa: B018
        return AwsSealer(settings=settings, clients=self.clients)

    def transit(self, source: RegionConfig, destination: RegionConfig) -> AwsTransit:
        with _needs_sdk(destination):
            from regionvault.providers.aws.s3 import AwsTransit

        settings = self.settings(destination)
        source_settings = None
        if source.provider == self.name or "aws_region" in source.settings:
            source_settings = self.settings(source)
        return AwsTransit(
            source=source,
            source_settings=source_settings,
            destination=destination,
            settings=settings,
            clients=self.clients,
            capabilities=self._vault_capabilities(settings),
        )
