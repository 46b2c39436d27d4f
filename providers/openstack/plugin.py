"""Entry point of the openstack provider (group ``regionvault``); imports nothing from
apache-libcloud."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from regionvault.core.conformance.support import ConformanceSupport
    from regionvault.core.plugins import ProviderRegistry


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    from regionvault.providers.openstack.provider import OpenStackProvider

    registry.add(OpenStackProvider)


# optional: the conformance suite specifies this hook, and adds it only when it runs
@hookimpl(optionalhook=True)
def regionvault_conformance_support(provider: str) -> ConformanceSupport | None:
    if provider != "openstack":
        return None
    from regionvault.providers.openstack.conformance import OpenStackConformanceSupport

    return OpenStackConformanceSupport()
