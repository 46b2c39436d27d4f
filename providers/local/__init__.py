"""The local provider: every service on one machine, each region under its own root."""

from __future__ import annotations

from regionvault.providers.local.compute import LocalCompute, LocalFileCapture, LocalFileSink
from regionvault.providers.local.keys import LocalKeyService, LocalSealer
from regionvault.providers.local.provider import LocalProvider
from regionvault.providers.local.transit import LocalTransit
from regionvault.providers.local.vault import LocalVault

__all__ = [
    "LocalCompute",
    "LocalFileCapture",
    "LocalFileSink",
    "LocalKeyService",
    "LocalProvider",
    "LocalSealer",
    "LocalTransit",
    "LocalVault",
]
