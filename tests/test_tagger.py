"""The tagger on the local provider: tags the untagged, never overwrites an explicit tag unless
told, leaves ``none`` alone, reports malformed values per instance, and is idempotent."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
from regionvault.core import Region, Site
from regionvault.core.errors import ComputeError, ConfigError
from regionvault.core.pipeline.tagger import tag_region
from regionvault.core.types import Instance, Tags


def add(region: Region, tmp_path: Path, name: str, tags: Mapping[str, str] | None = None) -> str:
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    (data / "state.txt").write_text(name)
    return region.compute.register_instance(name, data, tags=tags).id


def tags_of(region: Region, instance_id: str) -> Tags:
    return region.compute.get_instance(instance_id).tags


def test_tags_untagged_and_reports_the_rest(site: Site, east: Region, tmp_path: Path) -> None:
    bare = add(east, tmp_path, "vcu-1")
    other = add(east, tmp_path, "vdu-1", {"owner": "ran"})
    explicit = add(east, tmp_path, "core-1", {"backup": "12h-2d"})
    out = add(east, tmp_path, "scratch", {"backup": "none"})
    bad = add(east, tmp_path, "ims-1", {"backup": "1-x"})

    report = tag_region(east.compute, site.config)

    assert report.region == "local:east"
    assert {t.instance_id for t in report.tagged} == {bare, other}
    assert all(t.value == "1-7" and t.previous is None for t in report.tagged)
    # counted once: a malformed tag is not also "skipped" (issue #20)
    assert {n.instance_id for n in report.skipped} == {explicit, out}
    assert [n.instance_id for n in report.malformed] == [bad]
    assert "retention 'x' is not a duration" in report.malformed[0].reason
    assert report.failed == ()
    assert not report.ok

    assert tags_of(east, bare) == {"backup": "1-7"}
    assert tags_of(east, other) == {"owner": "ran", "backup": "1-7"}
    assert tags_of(east, explicit)["backup"] == "12h-2d"
    assert tags_of(east, out)["backup"] == "none"
    assert tags_of(east, bad)["backup"] == "1-x"  # reported, never "fixed" behind one's back


def test_second_run_tags_nothing(site: Site, east: Region, tmp_path: Path) -> None:
    ids = [add(east, tmp_path, f"vm-{i}") for i in range(3)]
    add(east, tmp_path, "keep", {"backup": "gold-ish"})

    first = tag_region(east.compute, site.config)
    before = {i: tags_of(east, i) for i in ids}
    second = tag_region(east.compute, site.config)

    assert len(first.tagged) == 3
    assert second.tagged == ()
    assert len(second.skipped) == 3
    assert len(second.malformed) == 1  # "gold-ish": malformed, and only that
    assert {i: tags_of(east, i) for i in ids} == before
    assert [n.reason for n in second.malformed] == [n.reason for n in first.malformed]


def test_overwrite_tags_replaces_explicit_but_never_none(
    site: Site, east: Region, tmp_path: Path
) -> None:
    config = dataclasses.replace(site.config, overwrite_tags=True)
    explicit = add(east, tmp_path, "core-1", {"backup": "12h-2d"})
    bad = add(east, tmp_path, "ims-1", {"backup": "1-x"})
    out = add(east, tmp_path, "scratch", {"backup": "none"})

    report = tag_region(east.compute, config)

    assert {(t.instance_id, t.previous) for t in report.tagged} == {
        (explicit, "12h-2d"),
        (bad, "1-x"),
    }
    assert report.malformed == ()
    assert tags_of(east, explicit)["backup"] == "1-7"
    assert tags_of(east, bad)["backup"] == "1-7"
    assert tags_of(east, out)["backup"] == "none"
    assert tag_region(east.compute, config).tagged == ()


def test_configured_key_and_named_default(site: Site, east: Region, tmp_path: Path) -> None:
    config = dataclasses.replace(
        site.config, tag_key="rv-policy", default_policy="gold", policies={"gold": "4h-30d"}
    )
    vm = add(east, tmp_path, "vcu-1", {"backup": "1-7"})
    report = tag_region(east.compute, config)
    assert [t.instance_id for t in report.tagged] == [vm]
    assert tags_of(east, vm) == {"backup": "1-7", "rv-policy": "gold"}


def test_bad_copy_tag_is_reported_next_to_the_tag_written(
    site: Site, east: Region, tmp_path: Path
) -> None:
    vm = add(east, tmp_path, "vcu-1", {"backup-copy-to": "mars"})
    report = tag_region(east.compute, site.config)
    assert [t.instance_id for t in report.tagged] == [vm]
    assert [n.instance_id for n in report.malformed] == [vm]
    assert "'mars' is not a region of this site" in report.malformed[0].reason


def test_walks_every_page(
    site: Site, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = {add(east, tmp_path, f"vm-{i}") for i in range(5)}
    compute = east.compute
    pages: list[str | None] = []
    real_page = compute.list_instances_page

    def spy(**kwargs: object) -> object:
        pages.append(kwargs.get("page_token"))  # type: ignore[arg-type]
        return real_page(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compute, "list_instances_page", spy)
    report = tag_region(compute, site.config, page_size=2)
    assert {t.instance_id for t in report.tagged} == ids
    assert len(pages) == 3


def test_a_failing_write_is_reported_and_the_run_goes_on(
    site: Site, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = add(east, tmp_path, "a-broken")
    fine = add(east, tmp_path, "b-fine")
    compute = east.compute
    real_set = compute.set_tags

    def set_tags(instance_id: str, tags: Mapping[str, str]) -> Tags:
        if instance_id == broken:
            raise ComputeError("tag quota exceeded", provider="local", region="local:east")
        return real_set(instance_id, tags)

    monkeypatch.setattr(compute, "set_tags", set_tags)
    report = tag_region(compute, site.config)
    assert [t.instance_id for t in report.tagged] == [fine]
    assert [n.instance_id for n in report.failed] == [broken]
    assert "tag quota exceeded" in report.failed[0].reason
    assert "backup" not in tags_of(east, broken)


def test_a_bad_site_default_stops_before_tagging(site: Site, east: Region, tmp_path: Path) -> None:
    vm = add(east, tmp_path, "vcu-1")
    with pytest.raises(ConfigError, match="default_policy"):
        tag_region(east.compute, dataclasses.replace(site.config, default_policy="0-7"))
    assert tags_of(east, vm) == {}


def test_instance_names_in_reports(site: Site, east: Region, tmp_path: Path) -> None:
    add(east, tmp_path, "vcu-1")
    report = tag_region(east.compute, site.config)
    assert str(report.tagged[0]).endswith("(vcu-1): '1-7'")
    assert report.summary() == "local:east: tagged 1, skipped 0, malformed 0, failed 0"
    assert isinstance(east.compute.get_instance(report.tagged[0].instance_id), Instance)
