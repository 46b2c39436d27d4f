"""Entry point of the local provider (group ``regionvault``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from regionvault.core.plugins import ProviderRegistry


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    from regionvault.providers.local.provider import LocalProvider

    registry.add(LocalProvider)
