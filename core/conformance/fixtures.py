"""Fixtures: the ones every suite defines for itself (``uid``), the test-instance factory,
and :class:`ProviderFixtures`, which binds the suites to the provider named by
``--regionvault-provider``.

An author who runs a suite with fixtures of their own subclasses it without
:class:`ProviderFixtures` and defines the fixtures its docstring lists::

    class TestMyVault(VaultSuite):
        @pytest.fixture
        def vault_a(self): ...
        @pytest.fixture
        def vault_b(self): ...
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from regionvault.core.conformance.checks import payload
from regionvault.core.conformance.support import (
    ConformanceSupport,
    ConformanceTarget,
    seal_in_subprocess,
    tags_with_run,
)
from regionvault.core.errors import InstanceNotFound, RegionVaultError, UnsupportedOperation
from regionvault.core.interfaces import Compute, KeyService, Sealer, Transit, Vault
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance

__all__ = ["InstanceFactory", "ProviderFixtures", "SealElsewhere", "SuiteBase"]

#: ``seal_elsewhere(region, secret, context)``: seal for ``region`` in another process
SealElsewhere = Callable[[str, bytes, Mapping[str, str]], bytes]


class SuiteBase:
    """What every suite defines itself: a unique id for the test's names."""

    @pytest.fixture
    def uid(self) -> str:
        """A short id, unique to this test, used in its object, payload and instance names
        (lower-case letters and digits, valid anywhere a name is)."""
        return f"rvc{secrets.token_hex(4)}"


class InstanceFactory:
    """Makes test instances through a provider's :class:`ConformanceSupport`, and removes
    them (and the instances a test launched, once :meth:`adopt`-ed) after the test.

    ``make_instance("db", data={...}, tags={...})`` returns a running instance named
    ``<uid>-db`` in region A (or ``region``), tagged ``rv-conformance=<uid>`` besides
    ``tags``, whose captured data holds ``data`` (by default :func:`checks.payload`).
    """

    def __init__(
        self, support: ConformanceSupport, region: Region, workdir: Path, uid: str
    ) -> None:
        self.support = support
        self.region = region
        self.workdir = workdir
        self.uid = uid
        self._made: list[tuple[Region, Instance]] = []

    def __call__(
        self,
        name: str,
        *,
        data: Mapping[str, bytes] | None = None,
        tags: Mapping[str, str] | None = None,
        region: Region | None = None,
    ) -> Instance:
        where = region or self.region
        full = f"{self.uid}-{name}"
        try:
            instance = self.support.make_instance(
                where,
                full,
                data=payload(full) if data is None else data,
                tags=tags_with_run(self.uid, tags),
                workdir=self.workdir,
            )
        except UnsupportedOperation as exc:
            pytest.skip(f"no test instances in {where.name}: {exc.message}")
        self._made.append((where, instance))
        return instance

    def adopt(self, instance: Instance, region: Region | None = None) -> Instance:
        """Remove ``instance`` (one the test launched) after the test too."""
        self._made.append((region or self.region, instance))
        return instance

    def cleanup(self) -> list[str]:
        """Remove every instance made or adopted; return what could not be removed."""
        problems: list[str] = []
        while self._made:
            region, instance = self._made.pop()
            try:
                self.support.remove_instance(region, instance)
            except InstanceNotFound:
                continue
            except RegionVaultError as exc:
                problems.append(f"{instance.id} ({instance.name}) in {region.name}: {exc}")
        return problems


def instance_factory(
    support: ConformanceSupport, region: Region, workdir: Path, uid: str
) -> Iterator[InstanceFactory]:
    """Yield a factory and clean up after it; a fixture body for suites and authors."""
    factory = InstanceFactory(support, region, workdir, uid)
    yield factory
    problems = factory.cleanup()
    if problems:
        pytest.fail("could not remove test instances: " + "; ".join(problems), pytrace=False)


class ProviderFixtures:
    """The fixtures the suites need, for the provider under test (``--regionvault-provider``,
    regions A and B of the run's site); built on the session fixture ``regionvault_target``
    of the pytest plugin."""

    @pytest.fixture
    def conformance(self, regionvault_target: ConformanceTarget) -> ConformanceTarget:
        return regionvault_target

    @pytest.fixture(autouse=True)
    def _known_limits(self, request: pytest.FixtureRequest, conformance: ConformanceTarget) -> None:
        test = getattr(request.node, "originalname", request.node.name)
        reason = conformance.support.known_limits.get(test)
        if reason is not None:
            pytest.skip(f"known limit of the {conformance.provider} test setup: {reason}")

    @pytest.fixture
    def site(self, conformance: ConformanceTarget) -> Site:
        return conformance.site

    @pytest.fixture
    def region_a(self, conformance: ConformanceTarget) -> Region:
        return conformance.region_a

    @pytest.fixture
    def region_b(self, conformance: ConformanceTarget) -> Region:
        return conformance.region_b

    @pytest.fixture
    def compute_a(self, region_a: Region) -> Compute:
        return region_a.compute

    @pytest.fixture
    def compute_b(self, region_b: Region) -> Compute:
        return region_b.compute

    @pytest.fixture
    def keys_a(self, region_a: Region) -> KeyService:
        return region_a.keys

    @pytest.fixture
    def keys_b(self, region_b: Region) -> KeyService:
        return region_b.keys

    @pytest.fixture
    def sealer_a(self, region_a: Region) -> Sealer:
        """A seal-only handle for A, built from configuration alone (``Provider.sealer``)."""
        return region_a.sealer()

    @pytest.fixture
    def sealer_b(self, region_b: Region) -> Sealer:
        return region_b.sealer()

    @pytest.fixture
    def seal_elsewhere(self, conformance: ConformanceTarget) -> SealElsewhere:
        return functools.partial(seal_in_subprocess, conformance)

    @pytest.fixture
    def vault_a(self, region_a: Region) -> Vault:
        return region_a.vault

    @pytest.fixture
    def vault_b(self, region_b: Region) -> Vault:
        return region_b.vault

    @pytest.fixture
    def reopen_transit_ab(self, conformance: ConformanceTarget) -> Callable[[], Transit]:
        """Makes a new Transit from A into B, as a restarted copy would."""
        return lambda: conformance.transit(conformance.region_a, conformance.region_b)

    @pytest.fixture
    def transit_ab(self, reopen_transit_ab: Callable[[], Transit]) -> Iterator[Transit]:
        transit = reopen_transit_ab()
        yield transit
        transit.close()

    @pytest.fixture
    def transit_ba(self, conformance: ConformanceTarget) -> Iterator[Transit]:
        transit = conformance.transit(conformance.region_b, conformance.region_a)
        yield transit
        transit.close()

    @pytest.fixture
    def make_instance(
        self, conformance: ConformanceTarget, region_a: Region, tmp_path: Path, uid: str
    ) -> Iterator[InstanceFactory]:
        yield from instance_factory(conformance.support, region_a, tmp_path, uid)
