"""The flatdir provider: the local provider's compute, keys and transit, and a flat vault."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from regionvault.core import Capabilities, Provider, RegionConfig
from regionvault.providers.local import LocalCompute, LocalKeyService, LocalSealer, LocalTransit
from regionvault.providers.local.keys import ensure_keystore, load_sealer
from regionvault.providers.local.provider import LocalProvider

from rv_example_provider.vault import FlatVault


def _root(region: RegionConfig) -> Path:
    return region.path("root").resolve()


class FlatDirProvider(Provider):
    name: ClassVar[str] = "flatdir"
    # What the local provider can do, except WORM locks and legal holds: a flat directory
    # keeps no retention records. The conformance suite skips those tests, saying why.
    capabilities: ClassVar[Capabilities] = replace(
        LocalProvider.capabilities, worm_lock=False, legal_hold=False
    )
    required_settings: ClassVar[frozenset[str]] = frozenset({"root"})

    def compute(self, region: RegionConfig) -> LocalCompute:
        return LocalCompute(
            root=_root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )

    def key_service(self, region: RegionConfig) -> LocalKeyService:
        return LocalKeyService(
            root=_root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )

    def sealer(self, region: RegionConfig) -> LocalSealer:
        keys = _root(region) / "keys"
        ensure_keystore(keys, region.name)
        return load_sealer(keys, region.name)

    def vault(self, region: RegionConfig) -> FlatVault:
        return FlatVault(
            _root(region) / "flat-vault",
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )

    def transit(self, source: RegionConfig, destination: RegionConfig) -> LocalTransit:
        return LocalTransit(
            destination_root=_root(destination),
            provider=self.name,
            source=source.name,
            region=destination.name,
            capabilities=self.capabilities,
        )
