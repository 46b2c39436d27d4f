"""The operations grammar (core/operations.py): drill, objectives, lock and hold, by tag, by
named policy and by site, and the errors that name what is wrong."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.config import parse_site
from regionvault.core.errors import ConfigError, PolicyError
from regionvault.core.operations import (
    LockRule,
    Operations,
    OperationsConfig,
    parse_objective,
    resolve_operations,
)
from regionvault.core.types import Instance, Tags


def inst(**tags: str) -> Instance:
    return Instance(id="i-1", name="hlr", region="local:east", tags=Tags(tags))


SITE = OperationsConfig(
    defaults={"rpo": "26h", "drill": "7d"},
    by_policy={"gold": {"rpo": "5h", "lock": "compliance-30d", "hold": "on"}},
)


def test_nothing_asked_is_nothing() -> None:
    assert resolve_operations(inst(), OperationsConfig()) == Operations()


def test_tag_beats_named_policy_beats_site() -> None:
    ops = resolve_operations(inst(), SITE)
    assert (ops.rpo, ops.drill, ops.lock, ops.hold) == (
        timedelta(hours=26),
        timedelta(days=7),
        None,
        False,
    )
    assert ops.sources == {"rpo": "site", "drill": "site"}
    gold = resolve_operations(inst(), SITE, policy_name="gold")
    assert gold.rpo == timedelta(hours=5) and gold.hold is True
    assert gold.lock == LockRule("compliance", timedelta(days=30))
    assert gold.sources == {"rpo": "policy", "drill": "site", "lock": "policy", "hold": "policy"}
    tagged = resolve_operations(
        inst(**{"backup-rpo": "90s", "backup-lock": "governance-2w", "backup-hold": "off"}),
        SITE,
        policy_name="gold",
    )
    assert tagged.rpo == timedelta(seconds=90)
    assert tagged.lock == LockRule("governance", timedelta(weeks=2))
    assert tagged.hold is False and "hold" not in tagged.sources
    assert tagged.sources["rpo"] == "tag" and str(tagged.lock) == "governance-2w"


def test_none_turns_a_site_default_off() -> None:
    ops = resolve_operations(inst(**{"backup-drill": "none", "backup-rpo": "none"}), SITE)
    assert ops.drill is None and ops.rpo is None and ops.sources == {}


@pytest.mark.parametrize(
    ("tag", "value", "reason"),
    [
        ("backup-drill", "30m", "shorter than 1h"),
        ("backup-drill", "banana", "not a duration"),
        ("backup-rpo", "0s", "is zero"),
        ("backup-rpo", "NONE", "lower case"),
        ("backup-rto", "5 m", "whitespace"),
        ("backup-rto", "10x", "unknown unit"),
        ("backup-lock", "compliance", "not a lock"),
        ("backup-lock", "worm-30d", "not a lock"),
        ("backup-lock", "governance-0d", "is zero"),
        ("backup-hold", "yes", "not on or off"),
        ("backup-rpo", "", "is empty"),
    ],
)
def test_bad_tags_name_instance_tag_and_reason(tag: str, value: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason) as info:
        resolve_operations(inst(**{tag: value}), SITE)
    message = str(info.value)
    assert message.startswith("[local:east] instance i-1 (hlr): tag " + tag)
    assert info.value.region == "local:east"


def test_a_bad_site_value_names_the_table_key() -> None:
    config = OperationsConfig(by_policy={"gold": {"hold": "maybe"}})
    with pytest.raises(PolicyError, match=r"site.toml operations.gold.hold: 'maybe' is not on"):
        resolve_operations(inst(), config, policy_name="gold")


def test_objective_values() -> None:
    assert parse_objective("15m") == timedelta(minutes=15)
    assert parse_objective("45s") == timedelta(seconds=45)
    assert parse_objective("none") is None
    with pytest.raises(PolicyError, match=r"s, m, h, d or w"):
        parse_objective("7y")
    with pytest.raises(PolicyError, match=r"s, m, h, d or w"):
        parse_objective("7q")
    with pytest.raises(PolicyError, match="longer than 100 years"):
        parse_objective("9" * 40 + "s")


def site(operations: dict[str, Any]) -> dict[str, Any]:
    return {
        "regions": {"local:east": {"root": "/tmp/x"}},
        "policies": {"gold": "4h-30d"},
        "operations": operations,
    }


def test_site_toml_operations_table() -> None:
    config = parse_site(
        site({"rpo": "26h", "gold": {"lock": "compliance-30d"}}),
        source="s.toml",
        base_dir=Path("/b"),
    )
    assert config.operations.defaults == {"rpo": "26h"}
    assert config.operations.by_policy == {"gold": {"lock": "compliance-30d"}}


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"drill": "5m"}, "operations.drill", "shorter than 1h"),
        ({"rpo": 5}, "operations.rpo", "must be a string"),
        ({"frequency": "1d"}, "operations.frequency", "unknown key"),
        ({"silver": {"rpo": "1d"}}, "operations.silver", "not a named policy"),
        ({"gold": {"lock": "compliance-"}}, "operations.gold.lock", "missing"),
        ({"gold": {"rto": 3}}, "operations.gold.rto", "must be a string"),
    ],
)
def test_bad_site_operations_name_the_key(table: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_site(site(table), source="s.toml", base_dir=Path("/b"))
    assert info.value.key == key and info.value.file == "s.toml"


def test_every_value_fits_gcp_label_rules() -> None:
    """GCP label values: at most 63 of lowercase letters, digits, '_' and '-'."""
    import re

    label = re.compile(r"[a-z0-9_-]{0,63}")
    for value in ("7d", "26h", "90s", "none", "compliance-30d", "governance-2w", "on", "off"):
        assert label.fullmatch(value)


def test_keys_read_only_those_settings_so_a_bad_drill_tag_does_not_stop_a_lock() -> None:
    tagged = inst(**{"backup-drill": "30m", "backup-lock": "compliance-1d"})
    with pytest.raises(PolicyError, match="drill interval"):
        resolve_operations(tagged, SITE)
    ops = resolve_operations(tagged, SITE, keys={"lock", "hold"})
    assert ops.lock == LockRule("compliance", timedelta(days=1)) and ops.drill is None
    assert ops.rpo is None  # the site's rpo is not read either
