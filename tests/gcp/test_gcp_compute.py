"""GceCompute against the Compute contract, with the unmodified google-cloud-compute REST
clients over real 127.0.0.1 connections to the Compute Engine fake (disk bytes as sparse
files, the backup worker's devices as symlinks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="the GCP tests need pip install -e '.[test]'")

from gce_world import GceWorld, SeedingSupport, gce_world
from regionvault.core.conformance import ComputeSuite
from regionvault.core.conformance.fixtures import InstanceFactory, instance_factory
from regionvault.core.site import Region
from regionvault.providers.gcp.compute import GceCompute


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[GceWorld]:
    with gce_world(tmp_path) as world:
        yield world


class TestGceComputeSuite(ComputeSuite):
    """The provider-neutral Compute suite against GceCompute over the Compute Engine fake."""

    @pytest.fixture
    def compute_a(self, gce: GceWorld) -> GceCompute:
        return gce.compute()

    @pytest.fixture
    def make_instance(
        self, gce: GceWorld, compute_a: GceCompute, tmp_path: Path, uid: str
    ) -> Iterator[InstanceFactory]:
        region = cast(Region, SimpleNamespace(name=compute_a.region, compute=compute_a))
        yield from instance_factory(SeedingSupport(gce, compute_a), region, tmp_path, uid)
