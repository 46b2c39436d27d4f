"""The entry point (group ``regionvault``): registers the provider and its test support."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core import hookimpl

if TYPE_CHECKING:
    from regionvault.core import ProviderRegistry
    from regionvault.core.conformance import ConformanceSupport


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    from rv_example_provider.provider import FlatDirProvider

    registry.add(FlatDirProvider)


# optional: the conformance suite specifies this hook, and adds it only when it runs
@hookimpl(optionalhook=True)
def regionvault_conformance_support(provider: str) -> ConformanceSupport | None:
    if provider != "flatdir":
        return None
    from rv_example_provider.testing import FlatDirSupport

    return FlatDirSupport()
