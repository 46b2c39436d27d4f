"""A loaded site: configuration plus the services its regions are built from.

A region is three services (Compute, KeyService, Vault), each from whichever provider its
configuration names; services are made on first use and shared.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from regionvault.core.config import SiteConfig, load_site, validate_providers
from regionvault.core.errors import AmbiguousName, InstanceNotFound
from regionvault.core.plugins import ProviderRegistry, check_executor, get_plugin_manager

if TYPE_CHECKING:
    import pluggy
    from regionvault.core.interfaces import Compute, KeyService, Sealer, Transit, Vault
    from regionvault.core.types import Instance, RegionConfig

__all__ = ["Region", "Site"]


class Region:
    """One region's services, built lazily from its configuration."""

    def __init__(self, config: RegionConfig, registry: ProviderRegistry) -> None:
        self.config = config
        self._registry = registry
        self._lock = threading.Lock()
        self._services: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.config.name

    def _build(self, service: str) -> Any:
        with self._lock:
            found = self._services.get(service)
            if found is None:
                cfg = self.config.services[service]
                provider = self._registry.get(cfg.provider)
                view = self.config.for_service(service)
                if service == "compute":
                    found = provider.compute(view)
                elif service == "keys":
                    found = provider.key_service(view)
                else:
                    found = provider.vault(view)
                self._services[service] = found
            return found

    @property
    def compute(self) -> Compute:
        return self._build("compute")  # type: ignore[no-any-return]

    @property
    def keys(self) -> KeyService:
        return self._build("keys")  # type: ignore[no-any-return]

    @property
    def vault(self) -> Vault:
        return self._build("vault")  # type: ignore[no-any-return]

    def sealer(self) -> Sealer:
        """A seal-only handle for this region, built from configuration alone."""
        cfg = self.config.services["keys"]
        return self._registry.get(cfg.provider).sealer(self.config.for_service("keys"))

    def close(self) -> None:
        with self._lock:
            services, self._services = self._services, {}
        for svc in services.values():
            svc.close()

    def __repr__(self) -> str:
        return f"<Region {self.name}>"


class Site:
    """The running form of a :class:`SiteConfig`."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        registry: ProviderRegistry | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        if registry is None or plugin_manager is None:
            default_pm, default_registry = get_plugin_manager()
            registry = registry or default_registry
            plugin_manager = plugin_manager or default_pm
        validate_providers(config, registry)
        check_executor(
            config.executor.kind, config.executor.settings, config.source, plugin_manager
        )
        self.config = config
        self.registry = registry
        self.plugin_manager = plugin_manager
        self._regions = {name: Region(cfg, registry) for name, cfg in config.regions.items()}
        #: every provider a service of a region names: closed (when no other open site uses
        #: it) when this site closes
        self._providers = sorted(
            {svc.provider for cfg in config.regions.values() for svc in cfg.services.values()}
        )
        registry.acquire(self._providers)
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        registry: ProviderRegistry | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> Site:
        return cls(load_site(path), registry=registry, plugin_manager=plugin_manager)

    def region(self, ref: str) -> Region:
        """A region by full id or unique short name."""
        return self._regions[self.config.region(ref).name]

    @property
    def regions(self) -> list[Region]:
        return [self._regions[name] for name in sorted(self._regions)]

    def find_instance(self, ref: str, *, region: str | None = None) -> Instance:
        """The instance ``ref`` names: an instance id, or a name unique in ``region`` (or across
        all regions when no region is given). An id wins over a name.

        Raises :class:`InstanceNotFound` when nothing matches and :class:`AmbiguousName`, listing
        the candidates, when a name matches several instances.
        """
        regions: list[Region] = [self.region(region)] if region else self.regions
        by_id: list[Instance] = []
        for r in regions:
            try:
                by_id.append(r.compute.get_instance(ref))
            except InstanceNotFound:
                continue
        if len(by_id) == 1:
            return by_id[0]
        candidates = by_id or [
            inst for r in regions for inst in r.compute.list_instances() if inst.name == ref
        ]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            listed = ", ".join(f"{i.id} ({i.region})" for i in candidates)
            hint = "give the id" if region else "give the id or --region"
            raise AmbiguousName(
                f"{ref!r} matches {len(candidates)} instances: {listed}; {hint}",
                region=regions[0].name if region else None,
            )
        raise InstanceNotFound(ref, region=regions[0].name if region else None)

    def transit(self, source: str, destination: str) -> Transit:
        """The link from ``source`` into ``destination``'s inbox (the destination's vault
        provider carries it)."""
        src = self.config.region(source)
        dst = self.config.region(destination)
        provider = self.registry.get(dst.services["vault"].provider)
        return provider.transit(src.for_service("vault"), dst.for_service("vault"))

    def close(self) -> None:
        """Close every region's services, then the providers no other open site uses
        (:meth:`Provider.close`: their SDK clients and credentials). A second close does
        nothing more."""
        for region in self._regions.values():
            region.close()
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.registry.release(self._providers)

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
