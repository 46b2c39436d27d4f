"""The local provider: every service on one machine, each region under its own ``root``.

A region's layout (see docs/local-provider.md)::

    <root>/keys/      keystore.json (0600), sealing.pub, keystore.lock
    <root>/vault/     VAULT_ID, objects/, meta/, vault.lock
    <root>/compute/   instances/<id>/{instance.json,data/,output.log}, compute.lock
    <root>/inbox/     <source region>/<name>: payloads other regions sent here
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from regionvault.core.interfaces import Provider
from regionvault.core.types import Capabilities, CaptureKind
from regionvault.providers.local.compute import LocalCompute
from regionvault.providers.local.keys import (
    LocalKeyService,
    LocalSealer,
    ensure_keystore,
    load_sealer,
)
from regionvault.providers.local.transit import LocalTransit
from regionvault.providers.local.vault import LocalVault

if TYPE_CHECKING:
    from pathlib import Path

    from regionvault.core.types import RegionConfig

__all__ = ["LocalProvider"]

DEFAULT_TERMINATE_TIMEOUT = 10.0


class LocalProvider(Provider):
    """Regions as directories: a keystore file, files as objects, processes as instances."""

    name: ClassVar[str] = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(
        worm_lock=True,
        legal_hold=True,
        server_side_copy=False,
        conditional_put=True,
        ranged_get=True,
        capture_kinds=frozenset({CaptureKind.FILES}),
        launch=True,
        register_instance=True,
        key_rotation=True,
    )
    required_settings: ClassVar[frozenset[str]] = frozenset({"root"})
    #: seconds terminate() waits after SIGTERM (and again after SIGKILL)
    optional_settings: ClassVar[frozenset[str]] = frozenset({"terminate_timeout"})

    def validate(self, region: RegionConfig) -> None:
        root = self._root(region)
        if root.exists() and not root.is_dir():
            raise region.error("root", f"{root} exists and is not a directory")
        self._terminate_timeout(region)

    @staticmethod
    def _root(region: RegionConfig) -> Path:
        return region.path("root").resolve()

    @staticmethod
    def _terminate_timeout(region: RegionConfig) -> float:
        value = region.settings.get("terminate_timeout", DEFAULT_TERMINATE_TIMEOUT)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise region.error("terminate_timeout", f"must be a positive number, got {value!r}")
        return float(value)

    def compute(self, region: RegionConfig) -> LocalCompute:
        return LocalCompute(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
            terminate_timeout=self._terminate_timeout(region),
        )

    def key_service(self, region: RegionConfig) -> LocalKeyService:
        return LocalKeyService(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )

    def vault(self, region: RegionConfig) -> LocalVault:
        return LocalVault(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )

    def sealer(self, region: RegionConfig) -> LocalSealer:
        """Reads only ``<root>/keys/sealing.pub``. A region whose KeyService never ran has
        no keys yet: they are created first (as its KeyService would on first use), so a
        copy into a fresh region works; the Sealer still gets the public half alone."""
        keys_dir = self._root(region) / "keys"
        if not (keys_dir / "sealing.pub").exists():
            ensure_keystore(keys_dir, region.name)
        return load_sealer(keys_dir, region.name)

    def transit(self, source: RegionConfig, destination: RegionConfig) -> LocalTransit:
        return LocalTransit(
            destination_root=self._root(destination),
            provider=self.name,
            source=source.name,
            region=destination.name,
            capabilities=self.capabilities,
        )
