"""Zones as regions on GCP: Compute Engine instances are zonal, so a GCP region's compute is
one zone (``zone``); a region named after a zone (``gcp:europe-west1-b``) is that zone of its
location. The site refuses two regions on one zone of one project, and two regions on one
Cloud KMS key, vault or inbox bucket. Against two Compute Engine fakes (zones b and c of one
project), each zone region lists and finds its own zone's instances alone.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="the GCP tests need pip install -e '.[test]'")

from gce_world import PROJECT, WORKER
from regionvault.core.config import check_region_claims, parse_site
from regionvault.core.errors import ConfigError, InstanceNotFound
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP
from regionvault.core.plugins import ProviderRegistry, make_plugin_manager, registry_from
from regionvault.core.site import Site
from regionvault.providers.gcp.fakes.compute import GceFake
from regionvault.providers.gcp.settings import GcpSettings

ZONE_B, ZONE_C = "europe-west1-b", "europe-west1-c"
B, C = f"gcp:{ZONE_B}", f"gcp:{ZONE_C}"


@pytest.fixture(scope="module")
def registry() -> ProviderRegistry:
    return registry_from(make_plugin_manager())


def _site(regions: dict[str, dict[str, Any]], registry: ProviderRegistry) -> Any:
    return parse_site({"regions": regions}, source="site.toml", registry=registry)


def _refusal(regions: dict[str, dict[str, Any]], registry: ProviderRegistry) -> str:
    with pytest.raises(ConfigError) as caught:
        check_region_claims(_site(regions, registry), registry)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_a_region_named_after_a_zone_is_that_zone_of_its_location(
    registry: ProviderRegistry,
) -> None:
    site = _site(
        {
            B: {"project": "rv-project", "key_ring": "ring-b"},
            "gcp:edge": {"project": "rv-project", "location": "europe-west1", "zone": ZONE_C},
        },
        registry,
    )
    found = {
        name: (s.location, s.zone)
        for name, s in ((n, GcpSettings.from_region(r)) for n, r in site.regions.items())
    }
    assert found == {B: ("europe-west1", ZONE_B), "gcp:edge": ("europe-west1", ZONE_C)}


def test_two_regions_on_one_zone_of_one_project_are_refused(registry: ProviderRegistry) -> None:
    text = _refusal(
        {
            B: {"project": "rv-project", "key_ring": "ring-1"},
            "gcp:edge": {"project": "rv-project", "zone": ZONE_B, "location": "europe-west1"},
        },
        registry,
    )
    assert text == (
        f'site.toml: regions."gcp:edge": regions "{B}" and "gcp:edge" both list the instances '
        f"of zone {ZONE_B} (gcp project rv-project): each instance would be backed up twice "
        "(give each region its own availability zone)"
    )
    # one zone of two projects: two sets of instances
    site = _site(
        {
            B: {"project": "rv-project", "key_ring": "ring-1"},
            "gcp:other": {"project": "rv-other", "zone": ZONE_B, "location": "europe-west1"},
        },
        registry,
    )
    assert len(site.regions) == 2


def test_two_zone_regions_on_one_key_vault_or_inbox_are_refused(
    registry: ProviderRegistry,
) -> None:
    # zones b and c of one location: the default key ring and key names are one key
    text = _refusal({B: {"project": "rv-project"}, C: {"project": "rv-project"}}, registry)
    assert f'regions "{B}" and "{C}" share one key (kms://cloudkms/projects/rv-project/' in text
    base = {"project": "rv-project"}
    text = _refusal(
        {
            B: {**base, "key_ring": "ring-b", "bucket": "rv-vault"},
            C: {**base, "key_ring": "ring-c", "bucket": "rv-vault", "prefix": "c/"},
        },
        registry,
    )
    assert "share one vault (gs://gcs/rv-vault/)" in text
    text = _refusal(
        {
            B: {**base, "key_ring": "ring-b", "bucket": "rv-b", "inbox_bucket": "rv-inbox"},
            C: {**base, "key_ring": "ring-c", "bucket": "rv-c", "inbox_bucket": "rv-inbox"},
        },
        registry,
    )
    assert "share one inbox (gs://gcs/rv-inbox/)" in text
    # each its own key ring, one bucket under prefixes of their own, inboxes of their own
    site = _site(
        {
            B: {**base, "key_ring": "ring-b", "bucket": "rv-vault", "prefix": "b/"},
            C: {**base, "key_ring": "ring-c", "bucket": "rv-vault", "prefix": "c/"},
        },
        registry,
    )
    assert len(site.regions) == 2


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[dict[str, GceFake]]:
    """One Compute Engine fake per zone of one project."""
    made: dict[str, GceFake] = {}
    try:
        for zone in (ZONE_B, ZONE_C):
            fake = GceFake(
                project=PROJECT, zone=zone, state_dir=tmp_path / zone, worker_instance=WORKER
            )
            fake.start()
            made[zone] = fake
        yield made
    finally:
        for fake in made.values():
            fake.stop()


def test_each_zone_region_lists_and_finds_its_own_zones_instances(
    fakes: dict[str, GceFake], registry: ProviderRegistry, tmp_path: Path
) -> None:
    regions: dict[str, dict[str, Any]] = {}
    for name, zone in ((B, ZONE_B), (C, ZONE_C)):
        settings = fakes[zone].compute_settings()
        del settings["zone"], settings["location"]  # both from the region's name
        regions[name] = {**settings, "key_ring": f"ring-{zone[-1]}", "timeout": 10}
    fakes[ZONE_B].seed_instance("vdu-b1", labels={"backup": "1-7"})
    fakes[ZONE_B].seed_instance("vdu-b2", labels={"backup": "1-7"})
    fakes[ZONE_C].seed_instance("vdu-c1", labels={"backup": "1-7"})
    config = parse_site({"regions": regions}, source="site.toml", base_dir=tmp_path)
    pm = make_plugin_manager()
    with Site(config, registry=registry_from(pm), plugin_manager=pm) as site:
        listed = {
            r.name: sorted(i.id for i in r.compute.list_instances(page_size=1) if i.id != WORKER)
            for r in site.regions
        }
        assert listed == {B: ["vdu-b1", "vdu-b2"], C: ["vdu-c1"]}
        assert site.region(C).compute.get_instance("vdu-c1").extra["zone"] == ZONE_C
        with pytest.raises(InstanceNotFound):
            site.region(C).compute.get_instance("vdu-b1")
        with pytest.raises(InstanceNotFound):
            site.region(B).compute.get_instance("vdu-c1")


def test_the_zone_example_of_docs_gcp_md_is_a_valid_site(registry: ProviderRegistry) -> None:
    text = (Path(__file__).parents[2] / "docs" / "gcp.md").read_text()
    block = text.split("### Zones as regions", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    site = parse_site(tomllib.loads(block), source="gcp.md", registry=registry)
    zones = {n: GcpSettings.from_region(r).zone for n, r in site.regions.items()}
    assert zones == {B: ZONE_B, C: ZONE_C}


@pytest.mark.parametrize("named", ["zones", "existing"])
def test_same_named_vms_of_two_zones_are_each_backed_up(
    fakes: dict[str, GceFake], tmp_path: Path, named: str
) -> None:
    """A GCE name is unique per project and zone only: ``db-1`` in zone b and ``db-1`` in zone
    c are two VMs, and each region's tick backs its own up (regions named after the zones, and
    ``gcp:east``/``gcp:west`` with explicit zones, as sites before zone regions wrote them)."""
    names = {ZONE_B: B, ZONE_C: C} if named == "zones" else {ZONE_B: "gcp:east", ZONE_C: "gcp:west"}
    regions: dict[str, Any] = {}
    for zone, name in names.items():
        settings = fakes[zone].compute_settings()
        if named == "zones":
            del settings["zone"], settings["location"]
        root = str(tmp_path / f"root-{zone[-1]}")
        regions[name] = {
            **settings,
            "key_ring": f"ring-{zone[-1]}",
            "timeout": 10,
            "vault": {"provider": "local", "root": root},
            "keys": {"provider": "local", "root": root},
        }
        fakes[zone].seed_instance("db-1", labels={"backup": "1-7"})
    config = parse_site(
        {"site": {"state_dir": str(tmp_path / "state")}, "regions": regions},
        source="site.toml",
        base_dir=tmp_path,
    )
    pm = make_plugin_manager()
    with Site(config, registry=registry_from(pm), plugin_manager=pm) as site:
        report = Service(Engine(site)).tick()
    assert not [p for p in report.problems if "listed by regions" in p]
    for schedule in report.schedule:
        assert [n.instance_id for n in schedule.failed] == [], schedule.region
    assert sorted(o.region or "" for o in report.jobs if o.kind == BACKUP) == sorted(names.values())


def test_a_zone_named_region_whose_zone_disagrees_is_refused(registry: ProviderRegistry) -> None:
    text = _refusal({B: {"project": PROJECT, "key_ring": "ring-b", "zone": ZONE_C}}, registry)
    assert text == (
        f"site.toml: regions.\"{B}\".zone: '{ZONE_C}' disagrees with the region name {ZONE_B}, "
        "itself a zone (name the region after its zone, or drop zone)"
    )
