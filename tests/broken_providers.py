"""Deliberately broken providers for tests/test_conformance.py: each is the local provider
with one promise broken, registered under its own name. The conformance suite must fail on
each with a message that says what is wrong.

Loaded into a suite run with ``--regionvault-plugin=broken_providers`` (this directory on
PYTHONPATH); the regions come from a site file (``<name>:east``, ``<name>:west``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import ClassVar

from regionvault.core import (
    Capture,
    CaptureKind,
    InstancePage,
    KeyAccessDenied,
    ObjectInfo,
    ProviderRegistry,
    RegionConfig,
    hookimpl,
)
from regionvault.providers.local import LocalCompute, LocalKeyService, LocalProvider, LocalVault
from regionvault.providers.local.compute import LocalFileCapture

#: a torn put writes this many bytes at a time
PIECE = 64 * 1024


class LeakyKeyService(LocalKeyService):
    """Unwraps with every keystore it finds next to its own: another region's keys too."""

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        try:
            return super().unwrap(wrapped, context)
        except KeyAccessDenied:
            regions_dir = self.keys_dir.parent.parent
            for keys_dir in sorted(regions_dir.glob("*/keys")):
                if keys_dir == self.keys_dir:
                    continue
                neighbour = LocalKeyService(
                    root=keys_dir.parent,
                    provider=self.provider,
                    region=f"{self.region}-neighbour",
                    capabilities=self.capabilities,
                )
                with contextlib.suppress(KeyAccessDenied):
                    return neighbour.unwrap(wrapped, context)
            raise


class TornVault(LocalVault):
    """Overwrites objects in place, piece by piece: readers can see half a put."""

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        if if_absent:
            return super().put(name, data, if_absent=True)
        path = self._path(name)  # a valid name; only the write is torn
        path.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(data)
        with path.open("wb") as f:
            for at in range(0, len(view), PIECE):
                f.write(view[at : at + PIECE])
                f.flush()
                time.sleep(0.0005)
        return self.head(name)


class FilterBlindCompute(LocalCompute):
    """Lists every instance whatever tag filters it is given."""

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        return super().list_instances_page(page_token=page_token, page_size=page_size)


class MiscountingCapture(LocalFileCapture):
    """Counts one file too many for progress reports."""

    def totals(self) -> tuple[int, int]:
        files, size = super().totals()
        return files + 1, size


class MiscountingCompute(LocalCompute):
    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        capture = super().capture(instance_id, kind=kind, since=since, keep=keep)
        assert isinstance(capture, LocalFileCapture)
        return MiscountingCapture(capture.instance, capture.taken_at, capture.root)


class LeakyKeysProvider(LocalProvider):
    name: ClassVar[str] = "leakykeys"

    def key_service(self, region: RegionConfig) -> LocalKeyService:
        return LeakyKeyService(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )


class TornVaultProvider(LocalProvider):
    name: ClassVar[str] = "tornvault"

    def vault(self, region: RegionConfig) -> LocalVault:
        return TornVault(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )


class FilterBlindProvider(LocalProvider):
    name: ClassVar[str] = "filterblind"

    def compute(self, region: RegionConfig) -> LocalCompute:
        return FilterBlindCompute(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )


class MiscountProvider(LocalProvider):
    name: ClassVar[str] = "miscount"

    def compute(self, region: RegionConfig) -> LocalCompute:
        return MiscountingCompute(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    for provider in (LeakyKeysProvider, TornVaultProvider, FilterBlindProvider, MiscountProvider):
        registry.add(provider)
