"""Site configuration: the happy path, and a clear error for every kind of mistake.

Each error test checks that the message names the file, the key and what is wrong.
"""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import regionvault.providers.local.plugin as local_plugin
from regionvault.core.config import SiteConfig, find_site_file, load_site, parse_site
from regionvault.core.durations import format_duration, parse_duration
from regionvault.core.errors import ConfigError, ProviderNotFound
from regionvault.core.interfaces import Compute, KeyService, Provider, Sealer, Transit, Vault
from regionvault.core.plugins import (
    ProviderRegistry,
    hookimpl,
    make_plugin_manager,
    registry_from,
)
from regionvault.core.types import Capabilities, RegionConfig, RegionId


class FakeStoreProvider(Provider):
    """A provider that only exists to be named in configuration (never builds services)."""

    name = "fakestore"
    capabilities: ClassVar[Capabilities] = Capabilities(worm_lock=True)
    required_settings = frozenset({"bucket"})
    optional_settings = frozenset({"endpoint"})

    def validate(self, region: RegionConfig) -> None:
        endpoint = region.settings.get("endpoint")
        if endpoint is not None and not str(endpoint).startswith("http"):
            raise region.error("endpoint", f"must be an http(s) URL, got {endpoint!r}")

    def compute(self, region: RegionConfig) -> Compute:
        raise AssertionError("not used by these tests")

    def key_service(self, region: RegionConfig) -> KeyService:
        raise AssertionError("not used by these tests")

    def vault(self, region: RegionConfig) -> Vault:
        raise AssertionError("not used by these tests")

    def sealer(self, region: RegionConfig) -> Sealer:
        raise AssertionError("not used by these tests")

    def transit(self, source: RegionConfig, destination: RegionConfig) -> Transit:
        raise AssertionError("not used by these tests")


class FakeStorePlugin:
    @hookimpl
    def regionvault_register_providers(self, registry: ProviderRegistry) -> None:
        registry.add(FakeStoreProvider)


@pytest.fixture(scope="module")
def registry() -> ProviderRegistry:
    """The local provider plus ``fakestore``, and no other plugin (entry-point loading is
    tested in test_plugins.py)."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin, FakeStorePlugin()])
    return registry_from(pm)


GOOD = """
[site]
name = "lab"
default_policy = "12h-2d"
tag_key = "bk"
copy_to_tag_key = "bk-to"
copy_retention_tag_key = "bk-keep"
overwrite_tags = true
tag_interval = "30s"
schedule_interval = "2m"
state_dir = "state"

[policies]
gold = "1-30"

[regions."local:east"]
root = "regions/east"

[regions."local:west"]
root = "/srv/west"

[regions."local:edge"]
root = "regions/edge"

[regions."local:edge".vault]
provider = "fakestore"
bucket = "edge-backups"
endpoint = "http://127.0.0.1:9000"

[[replication]]
from = "east"
to = ["local:west", "edge"]
copy_retention = "4w"

[[replication]]
from = "local:west"
to = "local:east"
"""


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, registry: ProviderRegistry) -> SiteConfig:
    return load_site(write(tmp_path, text), registry=registry)


def config_error(
    tmp_path: Path,
    text: str,
    registry: ProviderRegistry,
    *,
    key: str | None,
    words: tuple[str, ...],
    cls: type[ConfigError] = ConfigError,
) -> ConfigError:
    """Load ``text`` expecting a ConfigError that names the file, ``key`` and ``words``."""
    path = write(tmp_path, text)
    with pytest.raises(cls) as info:
        load_site(path, registry=registry)
    err = info.value
    message = str(err)
    assert err.file == str(path)
    assert message.startswith(f"{path}: "), message
    if key is not None:
        assert err.key == key
        assert f"{path}: {key}: " in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "\n" not in message
    return err


# --------------------------------------------------------------------------- happy path


def test_full_site_parses_with_every_key(tmp_path: Path, registry: ProviderRegistry) -> None:
    site = load(tmp_path, GOOD, registry)
    assert site.name == "lab"
    assert site.source == str(tmp_path / "site.toml")
    assert site.default_policy == "12h-2d"
    assert (site.tag_key, site.copy_to_tag_key, site.copy_retention_tag_key) == (
        "bk",
        "bk-to",
        "bk-keep",
    )
    assert site.overwrite_tags is True
    assert site.tag_interval == timedelta(seconds=30)
    assert site.schedule_interval == timedelta(minutes=2)
    assert site.state_dir == tmp_path.resolve() / "state"
    assert site.policies == {"gold": "1-30"}
    assert sorted(site.regions) == ["local:east", "local:edge", "local:west"]

    east = site.regions["local:east"]
    assert east.id == RegionId("local", "east")
    assert east.path("root") == tmp_path.resolve() / "regions" / "east"
    assert site.regions["local:west"].path("root") == Path("/srv/west")

    east_id, west_id, edge_id = (RegionId("local", n) for n in ("east", "west", "edge"))
    assert site.destinations_of(east_id) == (west_id, edge_id)
    assert site.destinations_of(west_id) == (east_id,)
    assert site.destinations_of(edge_id) == ()
    assert site.replication[0].copy_retention == timedelta(weeks=4)
    assert site.replication[1].copy_retention is None


def test_service_override_with_another_provider(tmp_path: Path, registry: ProviderRegistry) -> None:
    edge = load(tmp_path, GOOD, registry).regions["local:edge"]
    assert edge.services["compute"].provider == "local"
    assert edge.services["keys"].provider == "local"
    assert edge.services["vault"].provider == "fakestore"
    # the other provider sees only its own settings, never the region's local root
    assert dict(edge.for_service("vault").settings) == {
        "bucket": "edge-backups",
        "endpoint": "http://127.0.0.1:9000",
    }
    assert dict(edge.for_service("compute").settings) == {"root": "regions/edge"}


def test_service_override_with_same_provider_merges_settings(
    tmp_path: Path, registry: ProviderRegistry
) -> None:
    site = load(
        tmp_path,
        """
        [regions."local:east"]
        root = "regions/east"

        [regions."local:east".vault]
        root = "/mnt/big/east-vault"
        """,
        registry,
    )
    east = site.regions["local:east"]
    assert east.services["vault"].provider == "local"
    assert east.for_service("vault").path("root") == Path("/mnt/big/east-vault")
    assert east.for_service("keys").path("root") == tmp_path.resolve() / "regions" / "east"


def test_defaults_when_only_regions_are_given(tmp_path: Path, registry: ProviderRegistry) -> None:
    site = load(tmp_path, '[regions."local:east"]\nroot = "r"\n', registry)
    assert site.name == "regionvault"
    assert site.default_policy == "1-7"
    assert site.tag_key == "backup"
    assert site.overwrite_tags is False
    assert site.tag_interval == site.schedule_interval == timedelta(minutes=5)
    assert site.state_dir == tmp_path.resolve() / ".regionvault"
    assert site.replication == ()


def test_region_lookup_by_full_id_and_short_name(
    tmp_path: Path, registry: ProviderRegistry
) -> None:
    site = load(tmp_path, GOOD, registry)
    assert site.region("local:west").name == "local:west"
    assert site.region("west").name == "local:west"
    with pytest.raises(ConfigError) as info:
        site.region("north")
    message = str(info.value)
    assert "unknown region 'north'" in message
    assert "local:east, local:edge, local:west" in message
    assert str(tmp_path / "site.toml") in message


def test_ambiguous_short_name_is_refused(tmp_path: Path, registry: ProviderRegistry) -> None:
    site = load(
        tmp_path,
        """
        [regions."local:east"]
        root = "a"

        [regions."fakestore:east"]
        bucket = "b"
        """,
        registry,
    )
    assert site.region("fakestore:east").provider == "fakestore"
    with pytest.raises(ConfigError, match=r"region 'east' is ambiguous: ") as info:
        site.region("east")
    assert "local:east" in str(info.value)
    assert "fakestore:east" in str(info.value)


# --------------------------------------------------------------------------- providers


def test_unknown_provider_lists_registered_ones(tmp_path: Path, registry: ProviderRegistry) -> None:
    err = config_error(
        tmp_path,
        '[regions."nosuch:east"]\nroot = "r"\n',
        registry,
        key='regions."nosuch:east"',
        words=("unknown provider 'nosuch'", "registered: fakestore, local", "plugin installed"),
        cls=ProviderNotFound,
    )
    assert err.region == "nosuch:east"


def test_unknown_provider_in_a_service_override(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        """
        [regions."local:edge"]
        root = "r"

        [regions."local:edge".keys]
        provider = "kmip"
        """,
        registry,
        key='regions."local:edge".keys.provider',
        words=("unknown provider 'kmip'",),
        cls=ProviderNotFound,
    )


def test_local_region_without_root(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:east"]\n',
        registry,
        key='regions."local:east".root',
        words=("missing", "local provider"),
    )


def test_service_override_missing_its_providers_required_key(
    tmp_path: Path, registry: ProviderRegistry
) -> None:
    config_error(
        tmp_path,
        """
        [regions."local:edge"]
        root = "r"

        [regions."local:edge".vault]
        provider = "fakestore"
        """,
        registry,
        key='regions."local:edge".vault.bucket',
        words=("missing", "fakestore provider", "vault"),
    )


def test_service_override_settings_checked_by_their_provider(
    tmp_path: Path, registry: ProviderRegistry
) -> None:
    config_error(
        tmp_path,
        """
        [regions."local:edge"]
        root = "r"

        [regions."local:edge".vault]
        provider = "fakestore"
        bucket = "b"
        endpoint = "ftp://x"
        """,
        registry,
        key='regions."local:edge".vault.endpoint',
        words=("must be an http(s) URL", "'ftp://x'"),
    )


def test_service_override_must_be_a_table(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:east"]\nroot = "r"\nvault = "fakestore"\n',
        registry,
        key='regions."local:east".vault',
        words=("must be a table, got a string",),
    )


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            '[site]\ntag_interval = 5\n[regions."local:e"]\nroot = "r"\n',
            "site.tag_interval",
            ("must be a string, got an integer 5",),
        ),
        (
            '[site]\noverwrite_tags = "yes"\n[regions."local:e"]\nroot = "r"\n',
            "site.overwrite_tags",
            ("must be a boolean, got a string 'yes'",),
        ),
        (
            '[site]\nname = true\n[regions."local:e"]\nroot = "r"\n',
            "site.name",
            ("must be a string, got a boolean True",),
        ),
        (
            '[policies]\ngold = 30\n[regions."local:e"]\nroot = "r"\n',
            "policies.gold",
            ("must be a string, got an integer 30",),
        ),
        ('site = "lab"\n[regions."local:e"]\nroot = "r"\n', "site", ("must be a table",)),
        ('regions = ["local:e"]\n', "regions", ("must be a table, got an array",)),
        (
            '[regions."local:e"]\nroot = "r"\n[replication]\nfrom = "e"\n',
            "replication",
            ("got a table",),
        ),
        (
            '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
            '[[replication]]\nfrom = 1\nto = "w"\n',
            "replication[0].from",
            ("must be a string, got an integer 1",),
        ),
        (
            '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
            '[[replication]]\nfrom = "e"\nto = "w"\ncopy_retention = 30\n',
            "replication[0].copy_retention",
            ("must be a string, got an integer 30",),
        ),
    ],
    ids=[
        "interval-integer",
        "bool-string",
        "name-bool",
        "policy-integer",
        "site-not-table",
        "regions-array",
        "replication-table",
        "from-integer",
        "copy-retention-integer",
    ],
)
def test_bad_types(
    tmp_path: Path, registry: ProviderRegistry, text: str, key: str, words: tuple[str, ...]
) -> None:
    config_error(tmp_path, text, registry, key=key, words=words)


def test_region_table_must_be_a_table(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions]\n"local:east" = "regions/east"\n',
        registry,
        key='regions."local:east"',
        words=("must be a table, got a string",),
    )


def test_no_regions(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(tmp_path, '[site]\nname = "x"\n', registry, key="regions", words=("no regions",))


def test_empty_tag_key(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[site]\ntag_key = "  "\n[regions."local:e"]\nroot = "r"\n',
        registry,
        key="site.tag_key",
        words=("must not be empty",),
    )


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            '[sites]\nname = "x"\n[regions."local:e"]\nroot = "r"\n',
            "sites",
            ("unknown key", "policies, regions, replication, site"),
        ),
        (
            '[site]\nnmae = "x"\n[regions."local:e"]\nroot = "r"\n',
            "site.nmae",
            ("unknown key", "name"),
        ),
        (
            '[regions."local:e"]\nroot = "r"\nroots = "s"\n',
            'regions."local:e".roots',
            ("unknown setting for the local provider", "root"),
        ),
        (
            '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
            '[[replication]]\nfrom = "e"\nto = "w"\nkeep = "1d"\n',
            "replication[0].keep",
            ("unknown key", "from, to, copy_retention"),
        ),
    ],
    ids=["top-level", "site", "provider-setting", "replication"],
)
def test_unknown_keys(
    tmp_path: Path, registry: ProviderRegistry, text: str, key: str, words: tuple[str, ...]
) -> None:
    config_error(tmp_path, text, registry, key=key, words=words)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("5x", ("'5x' is not a duration",)),
        ("", ("'' is not a duration",)),
        ("1.5h", ("'1.5h' is not a duration",)),
        ("-5m", ("'-5m' is not a duration",)),
        ("0m", ("greater than zero",)),
        ("99999w", ("longer than 100 years",)),
    ],
)
def test_bad_intervals(
    tmp_path: Path, registry: ProviderRegistry, value: str, words: tuple[str, ...]
) -> None:
    config_error(
        tmp_path,
        f'[site]\nschedule_interval = "{value}"\n[regions."local:e"]\nroot = "r"\n',
        registry,
        key="site.schedule_interval",
        words=words,
    )


def test_bad_copy_retention(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
        '[[replication]]\nfrom = "e"\nto = "w"\ncopy_retention = "forever"\n',
        registry,
        key="replication[0].copy_retention",
        words=("'forever' is not a duration",),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("7", timedelta(days=7)),
        ("4w", timedelta(weeks=4)),
        ("90s", timedelta(seconds=90)),
        (" 2 h ", timedelta(hours=2)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_bare_unit_and_format_round_trip() -> None:
    assert parse_duration("15", bare_unit="m") == timedelta(minutes=15)
    for text in ("90s", "30m", "12h", "6d", "4w"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(timedelta(hours=36)) == "36h"


# --------------------------------------------------------------------------- replication


def test_replication_to_an_unknown_region(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[[replication]]\nfrom = "e"\nto = ["local:north"]\n',
        registry,
        key="replication[0].to",
        words=("unknown region 'local:north'", "regions: local:e"),
    )


def test_replication_from_an_unknown_region(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[[replication]]\nfrom = "south"\nto = "e"\n',
        registry,
        key="replication[0].from",
        words=("unknown region 'south'",),
    )


def test_replication_to_itself(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
        '[[replication]]\nfrom = "local:e"\nto = ["w", "e"]\n',
        registry,
        key="replication[0].to",
        words=("cannot replicate to itself", "local:e"),
    )


@pytest.mark.parametrize("to", ["[]", "3", "{ region = 'w' }"])
def test_replication_needs_destinations(
    tmp_path: Path, registry: ProviderRegistry, to: str
) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[regions."local:w"]\nroot = "w"\n'
        f'[[replication]]\nfrom = "e"\nto = {to}\n',
        registry,
        key="replication[0].to",
        words=("must name one region or a non-empty array",),
    )


def test_replication_without_source(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r"\n[[replication]]\nto = "e"\n',
        registry,
        key="replication[0].from",
        words=("missing",),
    )


# --------------------------------------------------------------------------- region ids


@pytest.mark.parametrize(
    ("rid", "words"),
    [
        ("east", ("'east' is not of the form provider:name",)),
        ("local:", ("'local:' is not of the form provider:name",)),
        (":east", ("':east' is not of the form provider:name",)),
        ("local:ea st", ("bad region name 'ea st'",)),
        ("lo/cal:east", ("bad region provider 'lo/cal'",)),
    ],
)
def test_region_id_must_be_provider_colon_name(
    tmp_path: Path, registry: ProviderRegistry, rid: str, words: tuple[str, ...]
) -> None:
    config_error(
        tmp_path, f'[regions."{rid}"]\nroot = "r"\n', registry, key=f'regions."{rid}"', words=words
    )


# --------------------------------------------------------------------------- the file


def test_invalid_toml_names_file_and_line(tmp_path: Path, registry: ProviderRegistry) -> None:
    config_error(
        tmp_path,
        '[regions."local:e"]\nroot = "r\n',
        registry,
        key=None,
        words=("invalid TOML", "line 2"),
    )


def test_missing_file(tmp_path: Path, registry: ProviderRegistry) -> None:
    path = tmp_path / "nope" / "site.toml"
    with pytest.raises(ConfigError) as info:
        load_site(path, registry=registry)
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}: site file not found")
    assert "regionvault init" in str(info.value)


def test_not_utf8(tmp_path: Path, registry: ProviderRegistry) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(b'[site]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_site(path, registry=registry)
    assert info.value.file == str(path)


def test_parse_site_without_registry_skips_provider_checks() -> None:
    data: dict[str, Any] = {"regions": {"nosuch:east": {}}}
    site = parse_site(data, source="inline.toml", base_dir=Path("/base"))
    assert site.regions["nosuch:east"].provider == "nosuch"
    assert site.state_dir == Path("/base/.regionvault")


def test_site_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGIONVAULT_SITE", raising=False)
    assert find_site_file(None) == Path("site.toml")
    monkeypatch.setenv("REGIONVAULT_SITE", str(tmp_path / "env.toml"))
    assert find_site_file(None) == tmp_path / "env.toml"
    assert find_site_file(tmp_path / "flag.toml") == tmp_path / "flag.toml"
    monkeypatch.setenv("REGIONVAULT_SITE", "")
    assert find_site_file(None) == Path("site.toml")
