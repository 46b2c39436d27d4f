"""Runs the Transit suite on the provider under test (``--regionvault-provider``)."""

from __future__ import annotations

import pytest
from regionvault.core.conformance.fixtures import ProviderFixtures
from regionvault.core.conformance.transit import TransitSuite

pytestmark = pytest.mark.regionvault_conformance


class TestTransit(ProviderFixtures, TransitSuite):
    """The Transit suite, with regions A and B of the run's site."""
