"""The policy tag grammar: valid values mean what docs/policies.md says, every malformed value
is a PolicyError that quotes it and says what is wrong, and site defaults fill the gaps."""

from __future__ import annotations

import dataclasses
import string
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regionvault.core.config import SiteConfig, parse_site
from regionvault.core.errors import ConfigError, PolicyError
from regionvault.core.policy import (
    MIN_FREQUENCY,
    CopyTarget,
    Policy,
    parse_copy_retention,
    parse_copy_to,
    parse_duration_part,
    parse_policy,
    parse_spec,
    resolve_policy,
)
from regionvault.core.types import Instance, RegionId, Tags

D, H, M, W = timedelta(days=1), timedelta(hours=1), timedelta(minutes=1), timedelta(weeks=1)
EAST, WEST, SOUTH = RegionId("local", "east"), RegionId("local", "west"), RegionId("local", "south")
CENTURY = timedelta(days=100 * 366)


def make_site(**changes: object) -> SiteConfig:
    data: dict[str, object] = {
        "regions": {
            "local:east": {"root": "e"},
            "local:west": {"root": "w"},
            "local:south": {"root": "s"},
            "other:south": {"root": "o"},
        },
        "replication": [{"from": "east", "to": "west"}],
        "policies": {"gold": "4h-30d", "archive": "1w-52w"},
    }
    data.update(changes)
    return parse_site(data, base_dir=Path("/tmp/regionvault-test"))


def vm(tags: dict[str, str] | None = None, region: str = "local:east") -> Instance:
    return Instance(id="i-0123456789abcdef", name="vcu-1", region=region, tags=Tags(tags or {}))


# --------------------------------------------------------------------------- F-R values


@pytest.mark.parametrize(
    ("value", "frequency", "retention"),
    [
        ("1-7", D, 7 * D),
        ("12h-2d", 12 * H, 2 * D),
        ("30m-6h", 30 * M, 6 * H),
        ("1d-4w", D, 4 * W),
        ("7-30", 7 * D, 30 * D),
        ("5m-5m", 5 * M, 5 * M),
        ("1w-1w", W, W),
        ("01-007", D, 7 * D),
        ("2h-1", 2 * H, D),
        ("1-36600", D, CENTURY),
    ],
)
def test_valid_values(value: str, frequency: timedelta, retention: timedelta) -> None:
    policy = parse_policy(value)
    assert policy is not None
    assert (policy.frequency, policy.retention) == (frequency, retention)
    assert policy.source == value
    assert policy.name is None
    assert parse_spec(value) == (frequency, retention)


def test_spec_is_canonical() -> None:
    policy = parse_policy("1-7")
    assert policy is not None
    assert policy.spec == "1d-1w"
    assert parse_policy(policy.spec) == dataclasses.replace(policy, source=policy.spec)


def test_none_opts_out() -> None:
    assert parse_policy("none") is None
    assert parse_policy("none", policies={"gold": "4h-30d"}) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0-7", "frequency '0' is zero"),
        ("1-0", "retention '0' is zero"),
        ("0h-0h", "is zero"),
        ("1-x", "retention 'x' is not a duration"),
        ("x-7", "not a known policy name"),
        ("", "is empty"),
        ("1--7", "expected exactly one"),
        ("-7", "frequency is missing"),
        ("1-", "retention is missing"),
        ("-", "frequency is missing"),
        ("7", "retention is missing"),  # a bare frequency, and no default to complete it
        ("1-7-30", "expected exactly one"),
        (" 1-7", "whitespace"),
        ("1-7 ", "whitespace"),
        ("1 - 7", "whitespace"),
        ("1-7\n", "whitespace"),
        ("1-\t7", "whitespace"),
        ("１-７", "non-ASCII"),
        ("1-٧", "non-ASCII"),
        ("99999999999d-1", "longer than 100 years"),
        ("1-99999999999d", "longer than 100 years"),
        ("1-36601", "longer than 100 years"),
        ("1-" + "9" * 5000, "longer than 100 years"),
        ("1d-12h", "shorter than the frequency"),
        ("7-1", "shorter than the frequency"),
        ("1m-1h", "shorter than the minimum 5m"),
        ("4m-1h", "shorter than the minimum 5m"),
        ("30s-1h", "unknown unit 's'"),
        ("1D-7D", "lower case"),
        ("1y-2y", "unknown unit 'y'"),
        ("1.5-7", "not a duration"),
        ("+1-7", "not a duration"),
        ("1h30m-7", "not a duration"),
        ("NONE", "lower case"),
        ("None", "lower case"),
        ("silver", "not a known policy name"),
    ],
)
def test_malformed_values(value: str, says: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(value, policies={"gold": "4h-30d"})
    message = str(info.value)
    assert says in message
    assert repr(value[:40]) in message  # the value is quoted (truncated when long)


def test_long_values_are_truncated_in_messages() -> None:
    value = "1-" + "x" * 10_000
    with pytest.raises(PolicyError) as info:
        parse_policy(value)
    message = str(info.value)
    assert len(message) < 400
    assert "10002 characters" in message


def test_control_characters_are_escaped_in_messages() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("1-7\r\nFAKE LOG LINE")
    assert "\n" not in str(info.value) and "\\n" in str(info.value)


def test_not_a_string() -> None:
    with pytest.raises(PolicyError, match="must be a string"):
        parse_policy(7)  # type: ignore[arg-type]


def test_policy_values_are_checked_when_built_directly() -> None:
    with pytest.raises(PolicyError, match="shorter than the frequency"):
        Policy(frequency=D, retention=H, source="custom")
    with pytest.raises(PolicyError, match="minimum"):
        Policy(frequency=timedelta(seconds=30), retention=D)
    with pytest.raises(PolicyError, match="twice"):
        Policy(D, 7 * D, copies=(CopyTarget(WEST, D), CopyTarget(WEST, 2 * D)))


def test_duration_parts() -> None:
    assert parse_duration_part("14d") == 14 * D
    assert parse_duration_part("3") == 3 * D
    with pytest.raises(PolicyError, match="zero"):
        parse_duration_part("0m")
    with pytest.raises(PolicyError, match="whitespace"):
        parse_duration_part("14 d")


# --------------------------------------------------------------------------- properties

units = st.sampled_from(["", "m", "h", "d", "w"])
SECONDS = {"": 86400, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@given(f=st.integers(1, 10**6), fu=units, r=st.integers(1, 10**6), ru=units)
def test_any_well_formed_value_parses_exactly_or_is_rejected_for_its_numbers(
    f: int, fu: str, r: int, ru: str
) -> None:
    value = f"{f}{fu}-{r}{ru}"
    frequency = timedelta(seconds=f * SECONDS[fu])
    retention = timedelta(seconds=r * SECONDS[ru])
    valid = MIN_FREQUENCY <= frequency <= retention <= CENTURY
    if valid:
        policy = parse_policy(value)
        assert policy is not None
        assert (policy.frequency, policy.retention) == (frequency, retention)
        # the canonical form means the same thing
        assert parse_spec(policy.spec) == (frequency, retention)
    else:
        with pytest.raises(PolicyError, match=r"shorter|longer"):
            parse_policy(value)


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_policy_error(value: str) -> None:
    try:
        policy = parse_policy(value, policies={"gold": "4h-30d"})
    except PolicyError as exc:
        assert exc.message.startswith("policy ")
        return
    if policy is not None:
        assert MIN_FREQUENCY <= policy.frequency <= policy.retention <= CENTURY
        assert value.isascii() and not any(c.isspace() for c in value)


@given(
    st.text(alphabet=string.digits + "mhdw-", min_size=1, max_size=12),
    st.sampled_from([" ", "\t", "\n", "\u00a0", "\u3000"]),
    st.integers(0, 12),
)
def test_whitespace_anywhere_is_rejected(value: str, space: str, at: int) -> None:
    at = min(at, len(value))
    with pytest.raises(PolicyError):
        parse_policy(value[:at] + space + value[at:])


@given(st.integers(1, 10**6), st.integers(1, 10**6))
def test_non_ascii_digits_are_rejected(f: int, r: int) -> None:
    fullwidth = str.maketrans("0123456789", "０１２３４５６７８９")
    with pytest.raises(PolicyError, match="non-ASCII"):
        parse_policy(f"{f}-{r}".translate(fullwidth))


# --------------------------------------------------------------------------- named policies


def test_named_policy() -> None:
    policy = parse_policy("gold", policies={"gold": "4h-30d"})
    assert policy is not None
    assert (policy.frequency, policy.retention, policy.name) == (4 * H, 30 * D, "gold")
    assert str(policy) == "gold (4h-30d)"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PolicyError, match=r"'silver'.*gold"):
        parse_policy("silver", policies={"gold": "4h-30d"})


def test_named_policy_with_a_bad_value_names_both() -> None:
    with pytest.raises(PolicyError, match=r"'gold'.*'1-x'.*retention 'x'"):
        parse_policy("gold", policies={"gold": "1-x"})


@pytest.mark.parametrize(
    ("policies", "key", "says"),
    [
        ({"gold": "1-x"}, "policies.gold", "retention 'x' is not a duration"),
        ({"gold": "0-7"}, "policies.gold", "zero"),
        ({"gold": "none"}, "policies.gold", "F-R string"),
        ({"gold": "4h-30d", "silver": "gold"}, "policies.silver", "F-R string"),
        ({"none": "1-7"}, "policies.none", "reserved"),
        ({"1-7": "1-7"}, "policies.1-7", "starts with a letter"),
        ({"my gold": "1-7"}, "policies.my gold", "starts with a letter"),
    ],
)
def test_site_rejects_bad_named_policies(policies: dict[str, str], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_site(policies=policies)
    assert info.value.key == key
    assert says in str(info.value)


@pytest.mark.parametrize("default", ["1-x", "silver", "0-7", ""])
def test_site_rejects_a_bad_default_policy(default: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_site(site={"default_policy": default})
    assert info.value.key == "site.default_policy"


def test_site_accepts_named_and_none_defaults() -> None:
    assert make_site(site={"default_policy": "gold"}).default_policy == "gold"
    assert make_site(site={"default_policy": "none"}).default_policy == "none"


def test_site_rejects_clashing_tag_keys() -> None:
    with pytest.raises(ConfigError) as info:
        make_site(site={"copy_to_tag_key": "backup"})
    assert info.value.key == "site.copy_to_tag_key"


# --------------------------------------------------------------------------- resolve_policy


def test_untagged_instance_gets_the_site_default_and_replication_copies() -> None:
    site = make_site()
    policy = resolve_policy(vm(), site)
    assert policy is not None
    assert (policy.frequency, policy.retention, policy.from_default) == (D, 7 * D, True)
    assert policy.copy_to == (WEST,)
    # no copy_retention on the pair and no tag: copies keep the policy's own retention
    assert policy.copy_retention(WEST) == 7 * D


def test_pair_copy_retention_is_the_fallback() -> None:
    site = make_site(
        replication=[
            {"from": "east", "to": "west", "copy_retention": "30d"},
            {"from": "east", "to": "local:south", "copy_retention": "365d"},
        ]
    )
    policy = resolve_policy(vm({"backup": "gold"}), site)
    assert policy is not None
    assert policy.name == "gold" and not policy.from_default
    assert policy.copies == (CopyTarget(WEST, 30 * D), CopyTarget(SOUTH, 365 * D))
    assert policy.copy_retention("local:south") == 365 * D
    with pytest.raises(PolicyError, match="no copies"):
        policy.copy_retention(EAST)


def test_copy_tags_override_the_site() -> None:
    site = make_site(replication=[{"from": "east", "to": "west", "copy_retention": "30d"}])
    policy = resolve_policy(
        vm({"backup": "12h-2d", "backup-copy-to": "local:south, west", "backup-copy-keep": "14d"}),
        site,
    )
    assert policy is not None
    assert policy.copies == (CopyTarget(SOUTH, 14 * D), CopyTarget(WEST, 14 * D))


def test_copy_to_none_means_no_copies() -> None:
    policy = resolve_policy(vm({"backup-copy-to": "none"}), make_site())
    assert policy is not None and policy.copies == ()


def test_opted_out_instance_ignores_copy_tags() -> None:
    assert resolve_policy(vm({"backup": "none", "backup-copy-to": "nowhere"}), make_site()) is None


def test_site_default_none_opts_untagged_instances_out() -> None:
    assert resolve_policy(vm(), make_site(site={"default_policy": "none"})) is None


def test_configured_tag_keys_are_used() -> None:
    site = make_site(
        site={"tag_key": "rv", "copy_to_tag_key": "rv-to", "copy_retention_tag_key": "rv-keep"}
    )
    policy = resolve_policy(vm({"rv": "30m-6h", "rv-to": "local:south", "backup": "0-0"}), site)
    assert policy is not None
    assert (policy.frequency, policy.copy_to) == (30 * M, (SOUTH,))
    # "south" is ambiguous in this site (local:south and other:south)
    with pytest.raises(PolicyError, match="ambiguous"):
        resolve_policy(vm({"rv": "1-7", "rv-to": "south"}), site)


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        ({"backup": "1-x"}, "tag backup='1-x': retention 'x' is not a duration"),
        ({"backup-copy-to": "north"}, "'north' is not a region of this site"),
        ({"backup-copy-to": "north,west,,east"}, "'north' is not a region"),
        ({"backup-copy-to": "north,west,,east"}, "item 3 is empty"),
        ({"backup-copy-to": "north,west,,east"}, "local:east is the instance's own region"),
        ({"backup-copy-to": ""}, "is empty"),
        ({"backup-copy-to": "we st"}, "is not a region name"),
        ({"backup-copy-keep": "0d"}, "tag backup-copy-keep='0d': retention '0d' is zero"),
        ({"backup-copy-keep": "12h"}, "shorter than the frequency 1d"),
        ({"backup-copy-keep": "14 d"}, "whitespace"),
        ({"backup-copy-keep": "99999999999d"}, "longer than 100 years"),
    ],
)
def test_malformed_tags_name_the_instance_and_the_tag(tags: dict[str, str], says: str) -> None:
    with pytest.raises(PolicyError) as info:
        resolve_policy(vm(tags), make_site())
    message = str(info.value)
    assert says in message
    assert "i-0123456789abcdef (vcu-1)" in message
    assert info.value.region == "local:east"


def test_unknown_regions_are_all_reported_with_the_known_ones() -> None:
    with pytest.raises(PolicyError) as info:
        parse_copy_to("north,up", home=EAST, site=make_site())
    message = str(info.value)
    assert "'north'" in message and "'up'" in message and "local:west" in message


def test_copy_to_accepts_short_and_full_names_and_drops_duplicates() -> None:
    got = parse_copy_to("west,local:west,local:south", home="local:east", site=make_site())
    assert got == (WEST, SOUTH)


def test_copy_retention_parser() -> None:
    assert parse_copy_retention("14d", frequency=D) == 14 * D
    with pytest.raises(PolicyError, match="shorter than the frequency"):
        parse_copy_retention("1h", frequency=D)


def test_an_invalid_default_in_a_hand_built_site_is_named() -> None:
    site = dataclasses.replace(make_site(), default_policy="1-x")
    with pytest.raises(PolicyError, match="site default_policy '1-x'"):
        resolve_policy(vm(), site)
