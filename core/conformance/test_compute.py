"""Runs the Compute suite on the provider under test (``--regionvault-provider``)."""

from __future__ import annotations

import pytest
from regionvault.core.conformance.compute import ComputeSuite
from regionvault.core.conformance.fixtures import ProviderFixtures

pytestmark = pytest.mark.regionvault_conformance


class TestCompute(ProviderFixtures, ComputeSuite):
    """The Compute suite, with regions A and B of the run's site."""
