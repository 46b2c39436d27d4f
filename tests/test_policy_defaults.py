"""Policy tags with defaults (issue #21 item 1): a tag that lacks a part takes it from the
site's default policy (``1-``, ``-7``, a bare ``1``), through the grammar, the tagger (which
reports it as completed and leaves the tag as written) and a tick (whose recovery point keeps
the completed retention). Truly malformed tags stay errors, named per instance; a site whose
default is ``none`` has no part to give."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cli_support import ok
from regionvault.core import Region, Site
from regionvault.core.config import SiteConfig, parse_site
from regionvault.core.errors import ConfigError, PolicyError
from regionvault.core.pipeline import SLOT_TAG, Engine, Service
from regionvault.core.pipeline.jobs import slot_of
from regionvault.core.pipeline.tagger import tag_region
from regionvault.core.policy import parse_policy, resolve_policy
from regionvault.core.repository import RepositorySettings
from regionvault.core.types import Instance, Tags
from site_support import open_site, site_toml

H, D, W = timedelta(hours=1), timedelta(days=1), timedelta(weeks=1)


def make_site(default: str = "12h-3d", **policies: str) -> SiteConfig:
    data = {
        "site": {"name": "t", "default_policy": default},
        "regions": {"local:east": {"root": "east"}, "local:west": {"root": "west"}},
        "policies": policies,
    }
    return parse_site(data, source="site.toml", base_dir=Path("/tmp/regionvault-test"))


def vm(value: str) -> Instance:
    return Instance(
        id="i-0123456789abcdef", name="vcu-1", region="local:east", tags=Tags({"backup": value})
    )


# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("value", "frequency", "retention", "completed", "part"),
    [
        ("1-", D, 3 * D, "1-3d", "retention"),
        ("-7", 12 * H, 7 * D, "12h-7", "frequency"),
        ("1", D, 3 * D, "1-3d", "retention"),  # a bare number is a frequency
        ("6h", 6 * H, 3 * D, "6h-3d", "retention"),
        ("12h-", 12 * H, 3 * D, "12h-3d", "retention"),
        ("-2w", 12 * H, 2 * W, "12h-2w", "frequency"),
        ("30m", timedelta(minutes=30), 3 * D, "30m-3d", "retention"),
    ],
)
def test_each_partial_form_is_completed_from_the_default(
    value: str, frequency: timedelta, retention: timedelta, completed: str, part: str
) -> None:
    policy = resolve_policy(vm(value), make_site("12h-3d"))
    assert policy is not None
    assert (policy.frequency, policy.retention) == (frequency, retention)
    assert (policy.source, policy.completed, policy.completed_part) == (value, completed, part)
    assert not policy.from_default  # the tag was there; only a part of it came from the site
    assert parse_policy(value, default="12h-3d") == dataclasses.replace(policy, copies=())


def test_the_patent_forms_under_the_patent_default() -> None:
    site = make_site("1-7")
    for value in ("1-", "-7", "1"):
        policy = resolve_policy(vm(value), site)
        assert policy is not None and (policy.frequency, policy.retention) == (D, 7 * D)
        assert policy.completed == "1-7"


def test_a_named_default_gives_its_parts() -> None:
    site = make_site("gold", gold="4h-30d")
    daily = resolve_policy(vm("1-"), site)
    weekly_keep = resolve_policy(vm("-7"), site)
    assert daily is not None and weekly_keep is not None
    assert (daily.frequency, daily.retention, daily.completed) == (D, 30 * D, "1-30d")
    assert (weekly_keep.frequency, weekly_keep.retention) == (4 * H, 7 * D)


def test_whole_values_are_not_completed() -> None:
    for value in ("1-7", "12h-2d"):
        policy = resolve_policy(vm(value), make_site())
        assert policy is not None and policy.completed is None and policy.completed_part is None
    untagged = Instance(id="i-1", name="vm", region="local:east", tags=Tags({}))
    default = resolve_policy(untagged, make_site("1-7"))
    assert default is not None and default.from_default and default.completed is None


def test_a_later_change_of_the_default_applies_to_a_partial_tag() -> None:
    # the reason the tagger does not rewrite "1-" to "1-7": the owner asked for the default
    before = resolve_policy(vm("1-"), make_site("1-7"))
    after = resolve_policy(vm("1-"), make_site("1-30"))
    assert before is not None and after is not None
    assert (before.retention, after.retention) == (7 * D, 30 * D)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("-", "frequency is missing"),
        ("1-7-3", "expected exactly one"),
        ("1--7", "expected exactly one"),
        ("x-7", "not a known policy name"),
        ("0-7", "frequency '0' is zero"),
        ("0-", "frequency '0' is zero"),
        ("-0", "retention '0' is zero"),
        ("0", "frequency '0' is zero"),
        ("", "is empty"),
        ("7x", "frequency '7x' has unknown unit 'x'"),
        ("-7x", "retention '7x' has unknown unit 'x'"),
        ("1D-", "lower case"),
        (" 1-", "whitespace"),
        ("1- ", "whitespace"),
        ("２-", "non-ASCII"),
        ("1m", "shorter than the minimum 5m"),
        # complete, but the completed policy breaks a rule: both named
        ("2w-", "completes to 2w-3d with the retention of default_policy '12h-3d', and then "),
        ("-6h", "completes to 12h-6h with the frequency of default_policy '12h-3d', and then "),
    ],
)
def test_truly_malformed_tags_stay_errors_naming_the_instance(value: str, says: str) -> None:
    with pytest.raises(PolicyError) as info:
        resolve_policy(vm(value), make_site("12h-3d"))
    message = info.value.message
    assert message.startswith("instance i-0123456789abcdef (vcu-1): tag backup=")
    assert says in message, message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["1m", "4m-"])
@pytest.mark.parametrize("default", ["1-7", "none"])
def test_a_written_frequency_below_the_minimum_blames_the_written_side(
    value: str, default: str
) -> None:
    # the default plays no part: the message is a whole value's, with no completion in it
    with pytest.raises(PolicyError) as info:
        resolve_policy(vm(value), make_site(default))
    frequency = value.rstrip("-")
    assert info.value.message == (
        f"instance i-0123456789abcdef (vcu-1): tag backup={value!r}: frequency {frequency} is "
        "shorter than the minimum 5m"
    )


def test_a_completed_policy_breaking_a_rule_says_which() -> None:
    with pytest.raises(PolicyError, match="retention 3d is shorter than the frequency 2w"):
        resolve_policy(vm("2w-"), make_site("12h-3d"))


@pytest.mark.parametrize(
    ("value", "missing"), [("1-", "retention"), ("1", "retention"), ("-7", "frequency")]
)
def test_a_default_of_none_has_no_part_to_give(value: str, missing: str) -> None:
    with pytest.raises(PolicyError) as info:
        resolve_policy(vm(value), make_site("none"))
    message = info.value.message
    assert f"tag backup={value!r}: {missing} is missing" in message
    assert "default_policy is 'none'" in message


def test_without_a_default_a_partial_value_is_an_error() -> None:
    with pytest.raises(PolicyError, match=r"policy '1-': retention is missing .*there is none"):
        parse_policy("1-")
    with pytest.raises(PolicyError, match=r"policy '-7': frequency is missing"):
        parse_policy("-7", default="none")


@pytest.mark.parametrize("default", ["1-", "-7", "1", "12h"])
def test_the_site_default_itself_must_be_whole(default: str) -> None:
    with pytest.raises(ConfigError, match=r"site\.default_policy.*is partial"):
        make_site(default)


def test_a_named_policy_must_be_whole() -> None:
    with pytest.raises(ConfigError, match=r"policies\.gold.*retention is missing"):
        make_site("1-7", gold="4h-")


# --------------------------------------------------------------------------- the tagger


def add(region: Region, tmp_path: Path, name: str, tags: dict[str, str] | None = None) -> str:
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    (data / "state.txt").write_text(f"{name}\n" * 100)
    return region.compute.register_instance(name, data, tags=tags).id


def test_the_tagger_reports_partial_tags_as_completed_and_leaves_them(
    site: Site, east: Region, tmp_path: Path
) -> None:
    daily = add(east, tmp_path, "vcu-1", {"backup": "1-"})
    keep = add(east, tmp_path, "vdu-1", {"backup": "-7"})
    bare = add(east, tmp_path, "core-1", {"backup": "1"})
    whole = add(east, tmp_path, "ims-1", {"backup": "12h-2d"})
    dash = add(east, tmp_path, "upf-1", {"backup": "-"})
    untagged = add(east, tmp_path, "amf-1")
    config = dataclasses.replace(site.config, default_policy="2-14")

    report = tag_region(east.compute, config)

    completed = {c.instance_id: c for c in report.completed}
    assert set(completed) == {daily, keep, bare}
    assert str(completed[daily]).endswith(
        "(vcu-1): 1- -> 1-14 (retention from default_policy '2-14')"
    )
    assert (completed[keep].completed, completed[keep].part) == ("2-7", "frequency")
    assert (completed[bare].value, completed[bare].completed) == ("1", "1-14")
    # counted once: completed, not also skipped nor malformed
    assert [n.instance_id for n in report.skipped] == [whole]
    assert [n.instance_id for n in report.malformed] == [dash]
    assert "tag backup='-': frequency is missing" in report.malformed[0].reason
    assert [t.instance_id for t in report.tagged] == [untagged]
    assert report.summary() == (
        "local:east: tagged 1, skipped 1, completed 3, malformed 1, failed 0"
    )
    # never rewritten: a later change of the default applies to them
    for instance_id, value in ((daily, "1-"), (keep, "-7"), (bare, "1")):
        assert east.compute.get_instance(instance_id).tags["backup"] == value
    again = tag_region(east.compute, config)
    assert again.tagged == () and len(again.completed) == 3


def test_the_tagger_names_the_missing_part_when_the_default_is_none(
    site: Site, east: Region, tmp_path: Path
) -> None:
    daily = add(east, tmp_path, "vcu-1", {"backup": "1-"})
    untagged = add(east, tmp_path, "amf-1")
    config = dataclasses.replace(site.config, default_policy="none")

    report = tag_region(east.compute, config)

    assert report.completed == ()
    assert [n.instance_id for n in report.malformed] == [daily]
    reason = report.malformed[0].reason
    assert "(vcu-1): tag backup='1-': retention is missing" in reason
    assert "default_policy is 'none'" in reason
    assert [t.instance_id for t in report.tagged] == [untagged]  # it is given "none"
    assert east.compute.get_instance(daily).tags["backup"] == "1-"


# --------------------------------------------------------------------------- a tick


@pytest.fixture
def tick_site(tmp_path: Path) -> Iterator[Site]:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml(name="defaults", settings={"default_policy": "2-3"}))
    with open_site(path) as site:
        yield site


def test_a_tick_backs_up_with_the_completed_policy(tick_site: Site, tmp_path: Path) -> None:
    # early in a UTC day (the 1-day slot must not turn over between the two ticks)
    now = slot_of(datetime.now(UTC), D) + timedelta(hours=1)
    engine = Engine(tick_site, clock=lambda: now, settings=RepositorySettings(pack_size=1 << 20))
    east = tick_site.region("east")
    daily = add(east, tmp_path, "vcu-1", {"backup": "1-"})  # every day, keep the default 3
    keep = add(east, tmp_path, "vdu-1", {"backup": "-5"})  # the default 2 days, keep 5

    report = Service(engine).tick()

    assert report.ok, report.failures()
    (schedule,) = [s for s in report.schedule if s.region == east.name]
    due = {d.instance.id: d for d in schedule.due}
    assert set(due) == {daily, keep}
    assert (due[daily].policy.frequency, due[daily].policy.retention) == (D, 3 * D)
    assert due[daily].policy.completed == "1-3"
    assert due[daily].job().payload["retention_s"] == (3 * D).total_seconds()
    (tag_job,) = [o for o in report.jobs if o.kind == "tag" and o.region == east.name]
    assert len(tag_job.result["completed"]) == 2
    points = {p.instance_id: p for p in engine.repository(east.name).points() if not p.lineage}
    assert set(points) == {daily, keep}
    assert points[daily].expires_at == now + 3 * D
    assert points[keep].expires_at == now + 5 * D
    # the copy keeps the completed retention too (no copy_retention on the pair)
    copies = {p.instance_id: p for p in engine.repository("west").points() if p.lineage}
    assert copies[daily].expires_at == points[daily].created_at + 3 * D
    assert copies[keep].expires_at == points[keep].created_at + 5 * D


# --------------------------------------------------------------------------- the command


def test_the_tag_command_prints_what_it_completed(workdir: Path) -> None:
    data = workdir / "nf"
    data.mkdir()
    (data / "db.txt").write_text("subscribers\n")
    added = ok(
        "instances", "add", "-r", "east", "-n", "vcu-1", "--data", data, "--tag", "backup=1-"
    )
    assert "warning" not in added.stderr  # a partial tag is not malformed
    instance_id = added.stdout.splitlines()[-1]

    lines = ok("tag", "-r", "east").stdout.splitlines()
    assert lines[0] == "local:east: tagged 0, skipped 0, completed 1, malformed 0, failed 0"
    assert lines[1] == (
        f"  completed {instance_id} (vcu-1): 1- -> 1-7 (retention from default_policy '1-7')"
    )
    (east,) = json.loads(ok("tag", "-r", "east", "--json").stdout)
    assert east["completed"] == [
        {"id": instance_id, "name": "vcu-1", "value": "1-", "completed": "1-7"}
    ]


def test_a_changed_default_applies_to_the_next_point_and_not_to_those_made(
    tick_site: Site, tmp_path: Path
) -> None:
    now = slot_of(datetime.now(UTC), D) + timedelta(hours=1)
    settings = RepositorySettings(pack_size=1 << 20)
    east = tick_site.region("east")
    daily = add(east, tmp_path, "vcu-1", {"backup": "1-"})
    assert Service(Engine(tick_site, clock=lambda: now, settings=settings)).tick().ok

    # the site's retention becomes 30 days: the tag "1-" follows it, the point made keeps 3
    path = tmp_path / "site" / "site.toml"
    path.write_text(site_toml(name="defaults", settings={"default_policy": "1-30"}))
    later = now + D
    with open_site(path) as site:
        engine = Engine(site, clock=lambda: later, settings=settings)
        assert Service(engine).tick().ok
        points = [p for p in engine.repository("east").points(daily) if p.lineage is None]
    first, second = sorted(points, key=lambda p: p.tags[SLOT_TAG])  # by the day made for
    assert east.compute.get_instance(daily).tags["backup"] == "1-"
    assert (first.expires_at, second.expires_at) == (now + 3 * D, later + 30 * D)
