"""Entry point of the GCP provider (group ``regionvault``); imports nothing from the SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from regionvault.core.conformance.support import ConformanceSupport
    from regionvault.core.plugins import ProviderRegistry


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    from regionvault.providers.gcp.provider import GcpProvider

    registry.add(GcpProvider)


# optional: the conformance suite specifies this hook, and adds it only when it runs
@hookimpl(optionalhook=True)
def regionvault_conformance_support(provider: str) -> ConformanceSupport | None:
    if provider != "gcp":
        return None
    from regionvault.providers.gcp.conformance import GcpConformanceSupport

    return GcpConformanceSupport()
