"""Runs the Vault suite on the provider under test (``--regionvault-provider``)."""

from __future__ import annotations

import pytest
from regionvault.core.conformance.fixtures import ProviderFixtures
from regionvault.core.conformance.vault import VaultSuite

pytestmark = pytest.mark.regionvault_conformance


class TestVault(ProviderFixtures, VaultSuite):
    """The Vault suite, with regions A and B of the run's site."""
