"""Availability zones as regions, checked from site.toml alone (no cloud, no SDK call): a
zone region's settings, the refusal of two regions that would claim one instance, one
repository, one inbox or one key, and the tick's refusal of an instance two regions listed.
"""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import run
from regionvault.core.config import check_region_claims, compute_overlaps, parse_site
from regionvault.core.errors import ConfigError
from regionvault.core.pipeline.claims import (
    claimed_twice,
    compute_scopes,
    refuse_claimed_twice,
    without_refused,
)
from regionvault.core.pipeline.jobs import backup_job, tag_job
from regionvault.core.pipeline.scheduler import DueBackup, NotDue, ScheduleReport
from regionvault.core.pipeline.tagger import InstanceNote
from regionvault.core.plugins import ProviderRegistry, make_plugin_manager, registry_from
from regionvault.core.policy import parse_policy
from regionvault.core.types import Instance
from regionvault.providers.aws.settings import AwsSettings


@pytest.fixture(scope="module")
def registry() -> ProviderRegistry:
    return registry_from(make_plugin_manager())


def _site(regions: dict[str, dict[str, Any]], registry: ProviderRegistry) -> Any:
    return parse_site({"regions": regions}, source="site.toml", registry=registry)


def _aws(bucket: str, key: str, **more: Any) -> dict[str, Any]:
    return {"bucket": bucket, "kms_key": f"alias/{key}", **more}


# --------------------------------------------------------------------------- settings


def test_a_region_named_after_a_zone_is_that_zone_of_its_aws_region(
    registry: ProviderRegistry,
) -> None:
    site = _site(
        {
            "aws:us-east-1a": _aws("b-1a", "k1a"),
            "aws:east-b": _aws(
                "b-1b", "k1b", aws_region="us-east-1", availability_zone="us-east-1b"
            ),
            "aws:us-east-1-bos-1a": _aws("b-bos", "kbos"),
            "aws:us-west-2": _aws("b-w2", "kw2"),
        },
        registry,
    )
    found = {
        name: (s.aws_region, s.availability_zone)
        for name, s in ((n, AwsSettings.from_region(r)) for n, r in site.regions.items())
    }
    assert found == {
        "aws:us-east-1a": ("us-east-1", "us-east-1a"),
        "aws:east-b": ("us-east-1", "us-east-1b"),
        "aws:us-east-1-bos-1a": ("us-east-1", "us-east-1-bos-1a"),
        "aws:us-west-2": ("us-west-2", None),
    }


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"aws_region": "us-east-1", "availability_zone": "us-west-2a"},
            "availability_zone: 'us-west-2a' is not an availability zone of us-east-1 "
            "(like us-east-1a)",
        ),
        (
            {"aws_region": "us-east-1", "availability_zone": "us-east-1"},
            "availability_zone: 'us-east-1' is not an availability zone of us-east-1 "
            "(like us-east-1a)",
        ),
        (
            {"aws_region": "us-east-1", "availability_zone": "us-east-12"},
            "availability_zone: 'us-east-12' is not an availability zone of us-east-1 "
            "(like us-east-1a)",
        ),
        ({"availability_zone": 7}, "availability_zone: must be a non-empty string, got 7"),
    ],
)
def test_a_bad_availability_zone_is_named(
    registry: ProviderRegistry, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _site({"aws:edge": _aws("b-edge", "k", **settings)}, registry)
    assert str(caught.value) == f'site.toml: regions."aws:edge".{message}'


# --------------------------------------------------------------------------- instances

ZONE = "give each region its own availability zone"
WIDE = "give each region its own availability zone, cloud region or credentials, or merge them"


@pytest.mark.parametrize(
    ("first", "second", "claimed", "advice"),
    [
        # the whole region and one of its zones
        ("aws:us-east-1", "aws:us-east-1a", "zone us-east-1a (aws default credentials)", WIDE),
        ("aws:us-east-1a", "aws:us-east-1", "zone us-east-1a (aws default credentials)", WIDE),
        # two regions on one zone, under other names
        ("aws:us-east-1a", "aws:edge-a", "zone us-east-1a (aws default credentials)", ZONE),
        # two regions on one whole AWS region (a site that loaded before zone regions)
        ("aws:us-east-1", "aws:east", "every zone of us-east-1 (aws default credentials)", WIDE),
    ],
)
def test_two_regions_claiming_one_instance_are_refused_naming_both(
    registry: ProviderRegistry, first: str, second: str, claimed: str, advice: str
) -> None:
    """Refused for the commands that back up (:data:`CLAIMING_COMMANDS`); the site still
    loads, so that status, points and restore keep working on a site that loaded before."""
    named = {
        "aws:edge-a": {"aws_region": "us-east-1", "availability_zone": "us-east-1a"},
        "aws:east": {"aws_region": "us-east-1"},
    }
    regions = {
        first: _aws("b-one", "k-one", **named.get(first, {})),
        second: _aws("b-two", "k-two", **named.get(second, {})),
    }
    site = _site(regions, registry)
    with pytest.raises(ConfigError) as caught:
        check_region_claims(site, registry)
    text = str(caught.value)
    assert text == (
        f'site.toml: regions."{second}": regions "{first}" and "{second}" both list the '
        f"instances of {claimed}: each instance would be backed up twice ({advice})"
    )
    assert [str(e) for e in compute_overlaps(site, registry)] == [text]
    assert "\n" not in text


def test_zones_of_one_region_other_regions_and_other_accounts_are_allowed(
    registry: ProviderRegistry,
) -> None:
    site = _site(
        {
            "aws:us-east-1a": _aws("b-1a", "k1a"),
            "aws:us-east-1b": _aws("b-1b", "k1b"),
            "aws:us-west-2": _aws("b-w2", "kw2"),
            # another account (profile): the site cannot tell; the tick checks listed ids
            "aws:partner": _aws("b-p", "kp", aws_region="us-east-1", profile="partner"),
        },
        registry,
    )
    assert sorted(site.regions) == [
        "aws:partner",
        "aws:us-east-1a",
        "aws:us-east-1b",
        "aws:us-west-2",
    ]


# --------------------------------------------------------------------------- storage and keys


def test_zone_regions_may_share_a_bucket_under_their_own_prefixes(
    registry: ProviderRegistry,
) -> None:
    site = _site(
        {
            "aws:us-east-1a": _aws("shared", "k1a", prefix="1a/", inbox_prefix="inbox-1a/"),
            "aws:us-east-1b": _aws("shared", "k1b", prefix="1b", inbox_prefix="inbox-1b/"),
        },
        registry,
    )
    assert len(site.regions) == 2


@pytest.mark.parametrize(
    ("a", "b", "what"),
    [
        # one bucket, no prefix: one repository
        ({}, {}, "vault (s3://aws/shared/)"),
        # a prefix inside the other region's whole bucket
        ({}, {"prefix": "1b/", "inbox_prefix": "in-1b/"}, "vault (s3://aws/shared/)"),
        ({"prefix": "x/"}, {"prefix": "x/y/"}, "vault (s3://aws/shared/x/)"),
        # own repositories, one inbox: a third region's copies to both would land in one
        ({"prefix": "1a/"}, {"prefix": "1b/"}, "inbox (s3://aws/shared/inbox/)"),
        # one region's inbox inside the other's repository
        (
            {"prefix": "1a/", "inbox_prefix": "in-1a/"},
            {"prefix": "1b/", "inbox_prefix": "1a/in/"},
            "vault/inbox (s3://aws/shared/1a/)",
        ),
    ],
)
def test_two_regions_on_one_repository_or_inbox_are_refused(
    registry: ProviderRegistry, a: dict[str, Any], b: dict[str, Any], what: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _site(
            {
                "aws:us-east-1a": _aws("shared", "k1a", **a),
                "aws:us-east-1b": _aws("shared", "k1b", **b),
            },
            registry,
        )
    assert str(caught.value) == (
        'site.toml: regions."aws:us-east-1b": regions "aws:us-east-1a" and "aws:us-east-1b" '
        f"share one {what}: every region needs its own repository, inbox and key"
    )


def test_two_regions_on_one_kms_key_are_refused(registry: ProviderRegistry) -> None:
    # one key: each region's KeyService could unwrap what the other's holds (invariant 1)
    with pytest.raises(ConfigError, match=r'"aws:us-east-1a" and "aws:us-east-1b" share one key'):
        _site({"aws:us-east-1a": _aws("b-1a", "k"), "aws:us-east-1b": _aws("b-1b", "k")}, registry)
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(ConfigError, match=r"share one key \(kms:arn:aws:kms:us-east-1:"):
        _site(
            {
                "aws:us-east-1a": {"bucket": "b-1a", "kms_key": arn},
                "aws:us-east-1b": {"bucket": "b-1b", "kms_key": arn},
            },
            registry,
        )
    # one alias name in two AWS regions (or two accounts) names two keys
    site = _site(
        {
            "aws:us-east-1a": _aws("b-1a", "k"),
            "aws:us-west-2a": _aws("b-2a", "k"),
            "aws:p": _aws("b-p", "k", aws_region="us-east-1", profile="p"),
        },
        registry,
    )
    assert len(site.regions) == 3


# --------------------------------------------------------------------------- the tick's check


NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


def _instance(instance_id: str, region: str) -> Instance:
    return Instance(id=instance_id, name=f"vm-{instance_id}", region=region)


def _schedule(region: str, due: list[str], waiting: tuple[str, ...] = ()) -> ScheduleReport:
    policy = parse_policy("1-7")
    assert policy is not None
    return ScheduleReport(
        region=region,
        now=NOW,
        due=tuple(DueBackup(_instance(i, region), policy, NOW, None) for i in due),
        not_due=tuple(
            NotDue(_instance(i, region), policy, NOW, NOW + timedelta(days=1)) for i in waiting
        ),
        opted_out=(InstanceNote("i-out", "out", "opted out"),),
    )


def test_an_instance_two_regions_listed_is_backed_up_by_neither(
    registry: ProviderRegistry,
) -> None:
    site = _site(
        {
            "aws:east": _aws("b-e", "ke", aws_region="us-east-1"),
            "aws:partner": _aws("b-p", "kp", aws_region="us-east-1", profile="partner"),
        },
        registry,
    )
    schedules = [
        _schedule("aws:east", ["i-a", "i-both"], ("i-both-waiting",)),
        _schedule("aws:partner", ["i-b", "i-both"], ("i-both-waiting",)),
    ]
    assert claimed_twice(schedules, site, compute_scopes(site, registry)) == {
        "i-both": ["aws:east", "aws:partner"],
        "i-both-waiting": ["aws:east", "aws:partner"],
        "i-out": ["aws:east", "aws:partner"],
    }
    refused, problems = refuse_claimed_twice(schedules, site, compute_scopes(site, registry))
    assert problems[0] == (
        "instance i-both is listed by regions aws:east and aws:partner: not backed up until one "
        "region stops listing it (make the regions list disjoint instances: their own zone, cloud "
        "region, project/account or credentials, or merge them)"
    )
    assert len(problems) == 3
    east, partner = refused
    assert [d.instance.id for d in east.due] == ["i-a"]
    assert [d.instance.id for d in partner.due] == ["i-b"]
    assert east.not_due == partner.not_due == ()
    assert [(n.instance_id, n.reason) for n in east.failed] == [
        ("i-both", "also listed by aws:partner: not backed up by either region"),
        ("i-both-waiting", "also listed by aws:partner: not backed up by either region"),
    ]
    jobs = [
        backup_job("aws:east", "i-a", NOW),
        backup_job("aws:east", "i-both", NOW),
        backup_job("aws:partner", "i-both", NOW),
        backup_job("aws:partner", "i-b", NOW),
        tag_job("aws:east", NOW),
    ]
    kept = without_refused(jobs, refused)
    assert [(j.region, j.payload.get("instance_id")) for j in kept] == [
        ("aws:east", "i-a"),
        ("aws:partner", "i-b"),
        ("aws:east", None),
    ]


def test_disjoint_regions_are_left_as_they_are(registry: ProviderRegistry) -> None:
    site = _site(
        {"aws:us-east-1a": _aws("b-1", "k1"), "aws:us-east-1b": _aws("b-2", "k2")}, registry
    )
    schedules = [_schedule("aws:us-east-1a", ["i-a"]), _schedule("aws:us-east-1b", ["i-b"])]
    schedules[1] = ScheduleReport(region="aws:us-east-1b", now=NOW, due=schedules[1].due)
    refused, problems = refuse_claimed_twice(schedules, site, compute_scopes(site, registry))
    assert problems == [] and refused == schedules


def test_the_zone_example_of_docs_aws_md_is_a_valid_site(registry: ProviderRegistry) -> None:
    text = (Path(__file__).parents[1] / "docs" / "aws.md").read_text()
    section = text.split("## Availability zones as regions", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    site = parse_site(tomllib.loads(block), source="aws.md", registry=registry)
    zones = {n: AwsSettings.from_region(r).availability_zone for n, r in site.regions.items()}
    assert zones == {"aws:us-east-1a": "us-east-1a", "aws:edge-b": "us-east-1b"}


def test_regions_that_cannot_list_one_instance_may_list_one_id(
    registry: ProviderRegistry,
) -> None:
    """Ids equal across zones or cloud regions (GCE names) are distinct instances: only regions
    whose scopes could reach one instance (same location, compatible zones, any account) are
    compared."""
    site = _site(
        {
            "aws:us-east-1a": _aws("b-a", "ka"),
            "aws:us-east-1b": _aws("b-b", "kb"),
            "aws:whole": _aws("b-w", "kw", aws_region="us-east-1", profile="partner"),
            "aws:us-west-2": _aws("b-2", "k2"),
        },
        registry,
    )
    names = ["aws:us-east-1a", "aws:us-east-1b", "aws:whole", "aws:us-west-2"]
    scopes = compute_scopes(site, registry)
    schedules = [_schedule(name, ["db-1"]) for name in names]
    assert claimed_twice(schedules[:2] + schedules[3:], site, scopes) == {}
    assert claimed_twice(schedules, site, scopes)["db-1"] == names[:3]
    refused, problems = refuse_claimed_twice(schedules, site, scopes)
    assert [p.split(": not")[0] for p in problems if "db-1" in p] == [
        "instance db-1 is listed by regions aws:us-east-1a and aws:us-east-1b and aws:whole"
    ]
    reasons = {s.region: [(n.instance_id, n.reason) for n in s.failed] for s in refused}
    assert reasons["aws:us-east-1a"] == [
        ("db-1", "also listed by aws:whole: not backed up by either region")
    ]
    assert reasons["aws:whole"] == [
        ("db-1", "also listed by aws:us-east-1a, aws:us-east-1b: not backed up by either region")
    ]
    assert reasons["aws:us-west-2"] == []
    assert [d.instance.id for d in refused[3].due] == ["db-1"]


def test_a_site_of_two_whole_regions_on_one_aws_region_still_loads_but_does_not_back_up(
    tmp_path: Path,
) -> None:
    """Such a site loaded before zone regions: read and restore commands keep working with a
    warning line; tick, run, backup and tag refuse it, naming both regions."""
    site = tmp_path / "site.toml"
    site.write_text(
        '[regions."aws:us-east-1"]\nbucket = "b-east"\nkms_key = "alias/k-east"\n'
        '[regions."aws:east-legacy"]\naws_region = "us-east-1"\nbucket = "b-legacy"\n'
        'kms_key = "alias/k-legacy"\n'
    )
    line = (
        'regions "aws:us-east-1" and "aws:east-legacy" both list the instances of every zone '
        "of us-east-1 (aws default credentials): each instance would be backed up twice "
        f"({WIDE})"
    )
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    listed = run("--site", site, "regions", env=env)
    assert listed.exit_code == 0, listed.output
    assert listed.stderr.startswith("regionvault: warning: ") and line in listed.stderr
    assert "aws:east-legacy" in listed.stdout
    for command in (["tick"], ["run", "--max-ticks", "1"], ["backup", "i-1"], ["tag"]):
        refused = run("--site", site, *command, env=env)
        assert refused.exit_code == 1, (command, refused.output)
        assert "regionvault: error: " in refused.stderr and line in refused.stderr


def test_status_shows_an_instance_two_regions_list_as_failing(tmp_path: Path) -> None:
    """West's compute is east's (what settings cannot tell): the tick backs the instance up in
    neither region, and status says so, failing in both rows, exit 1."""
    site = tmp_path / "site.toml"
    site.write_text(
        '[regions."local:east"]\nroot = "east"\n[regions."local:west"]\nroot = "west"\n'
        '[regions."local:west".compute]\nprovider = "local"\nroot = "east"\n'
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f.txt").write_text("x")
    added = run(
        "--site",
        site,
        "instances",
        "add",
        "-r",
        "local:east",
        "-n",
        "db-1",
        "--data",
        tmp_path / "data",
        "--tag",
        "backup=1-7",
    )
    assert added.exit_code == 0, added.output
    status = run("--site", site, "status", "--json")
    assert status.exit_code == 1, status.output
    rows = {row["region"]: row for row in json.loads(status.stdout)}
    assert {r: (row["instance_name"], row["state"]) for r, row in rows.items()} == {
        "local:east": ("db-1", "failing"),
        "local:west": ("db-1", "failing"),
    }
    assert rows["local:east"]["state_reason"] == (
        "also listed by local:west: not backed up by either region"
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"aws_region": "us-east-1", "availability_zone": "us-east-1b"},
        {"availability_zone": "us-east-1b"},
    ],
)
def test_a_zone_named_region_whose_availability_zone_disagrees_is_refused(
    registry: ProviderRegistry, settings: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        _site({"aws:us-east-1a": _aws("b-1a", "k", **settings)}, registry)
    assert str(caught.value) == (
        "site.toml: regions.\"aws:us-east-1a\".availability_zone: 'us-east-1b' disagrees with "
        "the region name us-east-1a, itself a zone of us-east-1 (name the region after its "
        "zone, or drop availability_zone)"
    )


def test_a_zone_named_region_may_repeat_its_zone(registry: ProviderRegistry) -> None:
    site = _site({"aws:us-east-1a": _aws("b-1a", "k", availability_zone="us-east-1a")}, registry)
    settings = AwsSettings.from_region(site.regions["aws:us-east-1a"])
    assert (settings.aws_region, settings.availability_zone) == ("us-east-1", "us-east-1a")
