"""THE PIPELINE SUITE: tag, back up, copy to a second region, restore and launch there, retain.

Every call into the pipeline goes through the adapter functions below, so that an API change
is one edit here. Skipped with the
reason "pipeline not built yet" only while ``regionvault.core.pipeline.engine`` does not exist: any
other import error fails the tests.

The API (core/pipeline/engine.py)::

    from regionvault.core.pipeline import Engine
    engine = Engine(site)
    engine.tag(region) -> TagReport                                 (core/pipeline/tagger.py)
    engine.backup(instance_id, region=...) -> RecoveryPoint
    engine.copy(point_id, source=region_a, to=region_b) -> CopyResult
        (.point: the copy, lineage set; .bytes_forward: payload bytes sent over Transit)
    engine.restore(point_id, region=region_b, launch=True) -> RestoreResult
        (.instance, .seconds_to_healthy)
    engine.retain(region) -> report
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from regionvault.core.conformance.checks import check_capture_holds, payload
from regionvault.core.conformance.fixtures import InstanceFactory, ProviderFixtures, SuiteBase
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance, RecoveryPoint

__all__ = ["PipelineSuite"]

pytestmark = pytest.mark.regionvault_conformance

PIPELINE_MODULE = "regionvault.core.pipeline.engine"
NOT_BUILT = "pipeline not built yet"


# --------------------------------------------------------------------------- API adapter


def make_engine(site: Site) -> Any:
    try:
        module = importlib.import_module(PIPELINE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == PIPELINE_MODULE:
            pytest.skip(NOT_BUILT)
        raise
    return module.Engine(site)


def tag(engine: Any, region: Region) -> Any:
    return engine.tag(region.name)


def tagged_ids(report: Any) -> set[str]:
    return {item.instance_id for item in report.tagged}


def backup(engine: Any, instance: Instance, region: Region) -> RecoveryPoint:
    point: RecoveryPoint = engine.backup(instance.id, region=region.name)
    return point


def copy(
    engine: Any, point: RecoveryPoint, source: Region, to: Region
) -> tuple[RecoveryPoint, int]:
    """The copy, and the payload bytes that crossed from ``source`` to ``to``."""
    result = engine.copy(point.id, source=source.name, to=to.name)
    copied: RecoveryPoint = result.point
    return copied, int(result.bytes_forward)


def restore_and_launch(engine: Any, point: RecoveryPoint, region: Region) -> tuple[Instance, Any]:
    result = engine.restore(point.id, region=region.name, launch=True)
    return result.instance, result.seconds_to_healthy


def retain(engine: Any, region: Region) -> Any:
    return engine.retain(region.name)


# --------------------------------------------------------------------------- the suite


class PipelineSuite(SuiteBase):
    """Fixtures: ``site`` (the Site), ``region_a`` and ``region_b`` (two of its regions, A
    replicating to B), ``make_instance`` (an InstanceFactory for region A)."""

    @pytest.fixture
    def engine(self, site: Site) -> Iterator[Any]:
        engine = make_engine(site)
        yield engine
        close = getattr(engine, "close", None)
        if callable(close):
            close()

    def test_tagger_gives_untagged_instances_the_default_policy(
        self, engine: Any, site: Site, region_a: Region, make_instance: InstanceFactory
    ) -> None:
        instance = make_instance("untagged")
        report = tag(engine, region_a)
        assert instance.id in tagged_ids(report), (
            f"the tagger did not tag the untagged instance {instance.id} in {region_a.name}: "
            f"{report}"
        )
        tags = region_a.compute.get_instance(instance.id).tags
        assert tags.get(site.config.tag_key) == site.config.default_policy, (
            f"{instance.id} is tagged {dict(tags)} after tagging, expected "
            f"{site.config.tag_key}={site.config.default_policy}"
        )
        again = tag(engine, region_a)
        assert instance.id not in tagged_ids(again), (
            f"a second tagging pass tagged {instance.id} again"
        )

    def test_backup_copy_restore_launch_and_retain(
        self,
        engine: Any,
        site: Site,
        region_a: Region,
        region_b: Region,
        make_instance: InstanceFactory,
        uid: str,
    ) -> None:
        data = payload(f"{uid}-pipeline")
        instance = make_instance("pipeline", data=data, tags={site.config.tag_key: "1-7"})
        point = backup(engine, instance, region_a)
        assert (point.region, point.instance_id) == (region_a.name, instance.id), (
            f"backup of {instance.id} in {region_a.name} made {point}"
        )
        copied, moved = copy(engine, point, region_a, region_b)
        assert moved > 0, f"copying {point.id} to {region_b.name} sent nothing over Transit"
        assert copied.region == region_b.name, f"the copy to {region_b.name} is in {copied.region}"
        assert copied.lineage is not None, "the copy records no lineage"
        assert (copied.lineage.source_region, copied.lineage.source_recovery_point) == (
            region_a.name,
            point.id,
        ), f"the copy's lineage {copied.lineage} does not name {point.id} in {region_a.name}"
        # retention must keep both fresh recovery points
        retain(engine, region_a)
        retain(engine, region_b)
        launched, seconds = restore_and_launch(engine, copied, region_b)
        make_instance.adopt(launched, region_b)
        assert launched.region == region_b.name, (
            f"restore into {region_b.name} launched {launched.id} in {launched.region}"
        )
        assert seconds is not None, (
            f"{launched.id} launched in {region_b.name} never became healthy"
        )
        with region_b.compute.capture(launched.id) as capture:
            check_capture_holds(
                capture, data, f"the instance {launched.id} restored into {region_b.name}"
            )


class TestPipeline(ProviderFixtures, PipelineSuite):
    """The pipeline suite on the provider under test."""
