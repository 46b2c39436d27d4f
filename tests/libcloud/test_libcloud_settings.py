"""The libcloud provider's settings and services, checked without a store: every bad setting
is an error naming its key; the credentials come only from the environment variables the
settings name (a secret in site.toml is an unknown key); the services it does not offer raise
UnsupportedOperation naming the provider and the service; the provider registers and
validates with apache-libcloud blocked; docs/edge-vault.md documents every key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from libcloud_world import build_region
from regionvault.core.errors import ConfigError, UnsupportedOperation
from regionvault.providers.libcloud.settings import (
    AWS_S3_REGIONS,
    DRIVERS,
    NOT_OFFERED,
    OPTIONAL_SETTINGS,
    REQUIRED_SETTINGS,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "edge-vault.md"
BASE: dict[str, Any] = {
    "driver": "s3",
    "container": "rv-edge",
    "key_env": "RV_KEY",
    "secret_env": "RV_SECRET",
}
SWIFT: dict[str, Any] = {
    **BASE,
    "driver": "openstack_swift",
    "auth_url": "https://keystone.edge-a.lan:5000",
    "project": "edge",
}


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"driver": "ftp"}, "driver", "must be one of s3, minio, ceph, azure_blobs"),
        ({"container": "Bad_Bucket"}, "container", "not a valid s3 container name"),
        ({"driver": "azure_blobs", "container": "a.b"}, "container", "azure_blobs container"),
        ({"inbox_container": "x"}, "inbox_container", "not a valid"),
        ({"prefix": "vault"}, "prefix", "must end with '/'"),
        ({"inbox_prefix": "/in/"}, "inbox_prefix", "must end with '/'"),
        ({"prefix": "a/", "inbox_prefix": "a/b/"}, "inbox_prefix", "overlap"),
        ({"host": "http://minio:9000"}, "host", "not a URL"),
        ({"port": 70000}, "port", "not a port number"),
        ({"port": True}, "port", "must be a port number"),
        ({"secure": "no"}, "secure", "true or false"),
        ({"create": 1}, "create", "true or false"),
        ({"conditional_put": "yes"}, "conditional_put", "true or false"),
        ({"s3_region": 3}, "s3_region", "a string"),
        ({"s3_region": "edge-a"}, "s3_region", "not an AWS region libcloud's S3 driver knows"),
        ({"s3_region": "edge a", "host": "minio.lan"}, "s3_region", "not a region name"),
        ({"key_env": "my key"}, "key_env", "environment variable"),
        ({"secret_env": "1X"}, "secret_env", "environment variable"),
        ({"single_put_limit": 0}, "single_put_limit", "at least 1"),
        ({"timeout": "slow"}, "timeout", "whole number"),
        (
            {"driver": "azure_blobs", "single_put_limit": 300 << 20},
            "single_put_limit",
            "at most 268435456 bytes",
        ),
        ({"driver": "minio"}, "host", "reaches the store at a host"),
        ({"driver": "ceph"}, "host", "reaches the store at a host"),
        ({"secret": "hunter2"}, "secret", ""),
        ({"key": "AKIA"}, "key", ""),
    ],
)
def test_a_bad_setting_names_its_key(change: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as bad:
        build_region({**BASE, **change})
    assert f'regions."libcloud:edge".{key}' in str(bad.value)
    assert says in str(bad.value)


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"auth_url": None}, "auth_url", "logs in to keystone v3"),
        ({"project": None}, "project", "logs in to keystone v3"),
        ({"auth_url": "keystone:5000"}, "auth_url", "not an http(s) URL"),
        ({"auth_url": "http://keystone.lan:5000"}, "auth_url", "plain http only to a loopback"),
        ({"project": " "}, "project", "must not be empty"),
        ({"domain": 7}, "domain", "a string"),
        ({"host": "swift.lan"}, "host", "keystone's catalog gives the Swift endpoint"),
        ({"port": 8080}, "port", "keystone's catalog gives the Swift endpoint"),
        ({"secure": False}, "secure", "keystone's catalog gives the Swift endpoint"),
        ({"s3_region": "x"}, "s3_region", "keystone's catalog gives the Swift endpoint"),
        ({"container": "a/b"}, "container", "not a valid openstack_swift container name"),
        ({"container": "x" * 257}, "container", "not a valid openstack_swift container"),
        ({"single_put_limit": 6 << 30}, "single_put_limit", "at most 5368709120 bytes"),
    ],
)
def test_a_bad_swift_setting_names_its_key(change: dict[str, Any], key: str, says: str) -> None:
    settings = {k: v for k, v in {**SWIFT, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as bad:
        build_region(settings)
    assert f'regions."libcloud:edge".{key}' in str(bad.value)
    assert says in str(bad.value)


def test_swift_settings_and_their_defaults() -> None:
    provider, region = build_region(
        {**SWIFT, "auth_url": "http://127.0.0.1:5000/identity", "container": "Vault Ä"}
    )
    settings = provider.settings(region.for_service("vault"))
    assert (settings.project, settings.domain, settings.service_region) == ("edge", "Default", None)
    assert settings.conditional_put is False, "Swift checks If-None-Match only on arrival"
    provider, region = build_region({**SWIFT, "conditional_put": True})
    assert provider.settings(region.for_service("vault")).conditional_put is True
    with pytest.raises(ConfigError, match="it is an openstack_swift setting") as bad:
        build_region({**BASE, "project": "edge"})
    assert 'regions."libcloud:edge".project' in str(bad.value)


def test_every_libcloud_storage_driver_is_offered_or_refused_with_a_reason() -> None:
    from libcloud.storage.providers import DRIVERS as LIBCLOUD_DRIVERS

    names = {str(name) for name in LIBCLOUD_DRIVERS}
    undecided = names - set(DRIVERS) - set(NOT_OFFERED)
    assert not undecided, f"libcloud storage drivers neither offered nor refused: {undecided}"
    assert not set(NOT_OFFERED) - names, "a refusal of a name libcloud does not list"
    assert set(DRIVERS) - {"ceph"} <= names
    for name, why in NOT_OFFERED.items():
        with pytest.raises(ConfigError) as bad:
            build_region({**BASE, "driver": name})
        text = str(bad.value)
        assert f"libcloud's {name!r} driver is not offered: {why}" in text, text
        assert "offered: s3, minio, ceph, azure_blobs, openstack_swift" in text


def test_an_s3_region_is_one_libcloud_knows_or_a_stores_own_with_host() -> None:
    from libcloud.storage.drivers.s3 import REGION_TO_HOST_MAP

    assert set(REGION_TO_HOST_MAP) == AWS_S3_REGIONS, "libcloud's S3 regions changed"
    provider, region = build_region({**BASE, "s3_region": "eu-south-1"})
    assert provider.settings(region.for_service("vault")).s3_region == "eu-south-1"
    provider, region = build_region({**BASE, "driver": "minio", "host": "minio.lan",
                                     "s3_region": "edge-a"})  # fmt: skip
    assert provider.settings(region.for_service("vault")).s3_region == "edge-a"


def test_the_docs_show_the_driver_table() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = {
        name: status
        for status, name in re.findall(
            r"^\| (not offered|offered) \| `([a-z0-9_]+)` \|", text, re.M
        )
    }
    expected = {name: "not offered" for name in NOT_OFFERED}
    expected.update({name: "offered" for name in DRIVERS})
    assert rows == expected


def test_every_key_is_checked_and_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", text, re.M))
    assert documented == REQUIRED_SETTINGS | OPTIONAL_SETTINGS


def test_conditional_puts_follow_the_driver_unless_set() -> None:
    for driver, host, claimed in (("s3", None, True), ("minio", "m", True), ("ceph", "c", False)):
        settings: dict[str, Any] = {**BASE, "driver": driver}
        if host:
            settings["host"] = host
        provider, region = build_region(settings)
        assert provider.settings(region.for_service("vault")).conditional_put is claimed
    provider, region = build_region(
        {**BASE, "driver": "ceph", "host": "c", "conditional_put": True}
    )
    assert provider.settings(region.for_service("vault")).conditional_put is True


def test_credentials_come_from_the_named_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    provider, region = build_region(BASE)
    view = region.for_service("vault")
    monkeypatch.delenv("RV_KEY", raising=False)
    with pytest.raises(ConfigError, match="RV_KEY it names is not set") as bad:
        provider.vault(view)
    assert 'regions."libcloud:edge".key_env' in str(bad.value)
    monkeypatch.setenv("RV_KEY", "k")
    monkeypatch.setenv("RV_SECRET", "s")
    assert provider.settings(view).credentials(view) == ("k", "s")


def test_a_vault_needs_a_container() -> None:
    provider, region = build_region({k: v for k, v in BASE.items() if k != "container"})
    with pytest.raises(ConfigError, match="needs container for the vault"):
        provider.vault(region.for_service("vault"))


def test_the_services_it_does_not_offer_name_provider_and_service() -> None:
    provider, region = build_region(BASE)
    for call, service in (
        (provider.compute, "compute"),
        (provider.key_service, "keys"),
        (provider.sealer, "sealer"),
    ):
        with pytest.raises(UnsupportedOperation) as refused:
            call(region)
        text = str(refused.value)
        assert "libcloud" in text and f"the {service}" in text, text
    assert provider.capabilities.worm_lock is False
    assert provider.capabilities.legal_hold is False


def test_registers_and_validates_without_apache_libcloud() -> None:
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "libcloud" or name.startswith("libcloud."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from regionvault.core.config import parse_site
from regionvault.core.errors import RegionVaultError
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.libcloud import plugin
registry = registry_from(make_plugin_manager(load_entry_points=False, plugins=[plugin]))
site = parse_site({"regions": {"libcloud:e": {"driver": "s3", "container": "rv-e",
    "key_env": "K", "secret_env": "S"}}}, registry=registry, source="site.toml")
region = site.region("e")
try:
    registry.get("libcloud").vault(region.for_service("vault"))
except RegionVaultError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"K": "k", "S": "s", "PATH": "/usr/bin"},
    )
    assert "pip install 'regionvault[edge]'" in out.stdout, out.stdout + out.stderr


def test_the_docs_example_is_a_valid_composed_region() -> None:
    import tomllib

    from regionvault.core.config import parse_site
    from regionvault.core.plugins import make_plugin_manager, registry_from
    from regionvault.providers.libcloud import plugin
    from regionvault.providers.local import plugin as local_plugin

    block = re.search(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert block is not None
    registry = registry_from(
        make_plugin_manager(load_entry_points=False, plugins=[plugin, local_plugin])
    )
    site = parse_site(tomllib.loads(block.group(1)), registry=registry, source="edge-vault.md")
    region = site.region("edge-a")
    assert region.services["vault"].provider == "libcloud"
    assert region.services["keys"].provider == "local"
    settings = registry.get("libcloud").settings(region.for_service("vault"))
    assert (settings.driver, settings.host, settings.port) == ("minio", "minio.edge-a.lan", 9000)


def test_regions_shows_each_region_as_its_settings_configure_it(tmp_path: Path) -> None:
    """`regionvault regions` answers per region, from its settings: a libcloud vault on a
    store configured conditional_put = false offers no conditional put, one on S3 does;
    an AWS bucket without Object Lock offers no WORM lock (nothing is reached to say so)."""
    import json

    from cli_support import ok

    site = tmp_path / "site.toml"
    site.write_text(
        """
[regions."local:ceph-edge"]
root = "ceph-edge"
[regions."local:ceph-edge".vault]
provider = "libcloud"
driver = "ceph"
host = "rgw.edge.example"
container = "rv-edge"

[regions."local:s3-edge"]
root = "s3-edge"
[regions."local:s3-edge".vault]
provider = "libcloud"
driver = "s3"
container = "rv-edge"

[regions."aws:eu-west-1"]
bucket = "example-rv"
kms_key = "alias/rv"
object_lock = false

[regions."aws:eu-west-2"]
bucket = "example-rv-2"
kms_key = "alias/rv"
object_lock = true
""",
        encoding="utf-8",
    )
    listed = {
        r["id"]: r["capabilities"]
        for r in json.loads(ok("--site", site, "regions", "--json").stdout)
    }
    assert listed["local:ceph-edge"]["conditional_put"] is False
    assert listed["local:s3-edge"]["conditional_put"] is True
    assert listed["aws:eu-west-1"]["worm_lock"] is False
    assert listed["aws:eu-west-2"]["worm_lock"] is True
    table = ok("--site", site, "regions").stdout
    row = next(line for line in table.splitlines() if line.startswith("local:ceph-edge"))
    assert "conditional_put" not in row


def test_the_docs_swift_example_is_a_valid_region() -> None:
    import tomllib

    from regionvault.core.config import parse_site
    from regionvault.core.plugins import make_plugin_manager, registry_from
    from regionvault.providers.libcloud import plugin
    from regionvault.providers.local import plugin as local_plugin

    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    (block,) = [b for b in blocks if "openstack_swift" in b]
    registry = registry_from(
        make_plugin_manager(load_entry_points=False, plugins=[plugin, local_plugin])
    )
    site = parse_site(tomllib.loads(block), registry=registry, source="edge-vault.md")
    settings = registry.get("libcloud").settings(site.region("edge-b").for_service("vault"))
    assert (settings.driver, settings.project, settings.conditional_put) == (
        "openstack_swift",
        "backup",
        False,
    )
