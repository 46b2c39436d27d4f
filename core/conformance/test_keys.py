"""Runs the KeyService suite on the provider under test (``--regionvault-provider``)."""

from __future__ import annotations

import pytest
from regionvault.core.conformance.fixtures import ProviderFixtures
from regionvault.core.conformance.keys import KeyServiceSuite

pytestmark = pytest.mark.regionvault_conformance


class TestKeyService(ProviderFixtures, KeyServiceSuite):
    """The KeyService suite, with regions A and B of the run's site."""
