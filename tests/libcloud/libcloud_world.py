"""Fixtures of the libcloud provider's tests: one moto S3 server (the provider's own launcher,
providers/libcloud/testing.py), one Azurite (providers/azure/azurite.py), stopped by their
PIDs, and one OpenStack fake whose keystone lists its Swift (providers/openstack/fakes) per
session; the stores' credentials in the environment variables the test
regions name; a region of either store built through a parsed site, as a command builds it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("libcloud", reason="the libcloud tests need apache-libcloud")

from regionvault.core.config import parse_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.libcloud import plugin as libcloud_plugin
from regionvault.providers.libcloud.testing import S3Server
from regionvault.providers.local import plugin as local_plugin

KEY_ENV, SECRET_ENV = "RV_LC_UNIT_KEY", "RV_LC_UNIT_SECRET"
_serial = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from regionvault.providers.azure.azurite import AzuriteServer, AzuriteUnavailable

    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    server = AzuriteServer({"rvunit": None}, log=log)
    try:
        server.start()
    except AzuriteUnavailable as exc:
        pytest.skip(f"Azurite is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def swift_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The OpenStack fake (keystone v3 and its Swift) in this process, on 127.0.0.1."""
    from regionvault.providers.openstack.fakes.cloud import OpenStackFake

    with OpenStackFake(tmp_path_factory.mktemp("swift")) as cloud:
        yield cloud


def swift_settings(cloud: Any, container: str) -> dict[str, Any]:
    """A region's settings on container ``container`` of the fake's Swift; conditional puts
    claimed (the tests put one writer at a time, or show the gap of two in flight)."""
    return {
        "driver": "openstack_swift",
        "container": container,
        "auth_url": cloud.auth_url,
        "project": cloud.project,
        "domain": cloud.domain,
        "service_region": cloud.region,
        "key_env": KEY_ENV,
        "secret_env": SECRET_ENV,
        "create": True,
        "conditional_put": True,
    }


@pytest.fixture(params=["s3", "azure_blobs", "openstack_swift"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The settings of a region on a fresh container of moto's S3, Azurite or Swift."""
    n = next(_serial)
    if request.param == "openstack_swift":
        cloud = request.getfixturevalue("swift_cloud")
        monkeypatch.setenv(KEY_ENV, cloud.username)
        monkeypatch.setenv(SECRET_ENV, cloud.password)
        return swift_settings(cloud, f"rv-unit-{n}")
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        monkeypatch.setenv(KEY_ENV, "testing")
        monkeypatch.setenv(SECRET_ENV, "testing")
    else:
        server = request.getfixturevalue("azurite")
        monkeypatch.setenv(KEY_ENV, "rvunit")
        monkeypatch.setenv(SECRET_ENV, server.accounts["rvunit"])
    return {
        "driver": request.param,
        "container": f"rv-unit-{n}",
        "host": server.host,
        "port": server.port,
        "secure": False,
        "key_env": KEY_ENV,
        "secret_env": SECRET_ENV,
        "create": True,
    }


def build_region(settings: dict[str, Any], name: str = "libcloud:edge") -> Any:
    """(provider, region config) of a one-region site with ``settings``, its keys and
    compute from the local provider."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[libcloud_plugin, local_plugin])
    registry = registry_from(pm)
    table = dict(settings)
    table["keys"] = {"provider": "local", "root": "/nonexistent/keys"}
    table["compute"] = {"provider": "local", "root": "/nonexistent/compute"}
    site = parse_site({"regions": {name: table}}, registry=registry, source="site.toml")
    return registry.get("libcloud"), site.region(name.partition(":")[2])


@pytest.fixture
def make_vault(store: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        provider, region = build_region({**store, **overrides})
        vault = provider.vault(region.for_service("vault"))
        made.append(vault)
        return vault

    yield make
    for vault in made:
        vault.close()
