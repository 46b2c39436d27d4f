"""Fixtures and helpers of the openstack provider's tests: one fake OpenStack cloud (the
provider's own, providers/openstack/fakes) per test, stopped at its end; a region on it
built through a parsed site, as a command builds it, its keys and vault the local
provider's; the password in the environment variable the region names."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libcloud", reason="the openstack tests need apache-libcloud")

from regionvault.core.config import parse_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.local import plugin as local_plugin
from regionvault.providers.openstack import plugin as openstack_plugin
from regionvault.providers.openstack.fakes.cloud import OpenStackFake

PASSWORD_ENV = "RV_OS_UNIT_PASSWORD"
FLAVOR = "m1.small"


def region_settings(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "auth_url": f"{url}/identity",
        "username": "regionvault",
        "project": "regionvault",
        "password_env": PASSWORD_ENV,
        "poll_interval": 0.02,
        "wait_timeout": 30,
        **overrides,
    }


def build_region(settings: dict[str, Any], name: str = "openstack:edge") -> Any:
    """(provider, region config) of a one-region site with ``settings``, its keys and
    vault from the local provider."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[openstack_plugin, local_plugin])
    registry = registry_from(pm)
    table = dict(settings)
    table["keys"] = {"provider": "local", "root": "/nonexistent/keys"}
    table["vault"] = {"provider": "local", "root": "/nonexistent/vault"}
    site = parse_site({"regions": {name: table}}, registry=registry, source="site.toml")
    return registry.get("openstack"), site.region(name.partition(":")[2])


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[OpenStackFake, str]]:
    monkeypatch.setenv(PASSWORD_ENV, "secret")
    fake = OpenStackFake(tmp_path / "cloud", password="secret", project="regionvault")
    url = fake.start()
    try:
        yield fake, url
    finally:
        fake.stop()


@pytest.fixture
def make_compute(cloud: tuple[OpenStackFake, str]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        provider, region = build_region(region_settings(cloud[1], **overrides))
        compute = provider.compute(region.for_service("compute"))
        made.append(compute)
        return compute

    yield make
    for compute in made:
        compute.close()


@contextlib.contextmanager
def edge_regions(workdir: Path) -> Iterator[tuple[dict[str, dict[str, Any]], dict[str, Any]]]:
    """Two composed edge regions (``openstack:east``, ``openstack:west``) as the provider's
    conformance support builds them: a fake cloud each, a SoftHSM token each, libcloud vaults
    in two buckets of one moto S3 server (``rv-east-vault``, ``rv-west-vault``). Yields
    (region name -> settings, region short name -> its OpenStackFake); all stopped after."""
    from regionvault.providers.openstack.conformance import OpenStackConformanceSupport

    support = OpenStackConformanceSupport()
    with support.test_site(workdir) as path:
        with Path(path).open("rb") as f:
            regions = tomllib.load(f)["regions"]
        yield regions, dict(support.fakes)
