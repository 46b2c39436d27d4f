"""Entry point of the pkcs11 provider (group ``regionvault``); imports nothing from
python-pkcs11."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core.plugins import hookimpl

if TYPE_CHECKING:
    from regionvault.core.conformance.support import ConformanceSupport
    from regionvault.core.plugins import ProviderRegistry


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    from regionvault.providers.pkcs11.provider import Pkcs11Provider

    registry.add(Pkcs11Provider)


# optional: the conformance suite specifies this hook, and adds it only when it runs
@hookimpl(optionalhook=True)
def regionvault_conformance_support(provider: str) -> ConformanceSupport | None:
    if provider != "pkcs11":
        return None
    from regionvault.providers.pkcs11.conformance import Pkcs11ConformanceSupport

    return Pkcs11ConformanceSupport()
