"""Shared fixtures. ``site`` is a two-region local site (``local:east`` replicating to
``local:west``) loaded from a site.toml in the test's tmp_path; ``east`` and ``west`` are
its regions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from regionvault.core import Region, Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.local import plugin as local_plugin

SITE_TOML = """\
[site]
name = "test"

[regions."local:east"]
root = "east"

[regions."local:west"]
root = "west"

[[replication]]
from = "east"
to = "west"
"""


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    return path


@pytest.fixture
def site(site_file: Path) -> Iterator[Site]:
    # Only the built-in local provider, registered through its plugin module: the tests
    # do not depend on which other provider distributions happen to be installed.
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin])
    registry = registry_from(pm)
    with Site(load_site(site_file, registry=registry), registry=registry, plugin_manager=pm) as s:
        yield s


@pytest.fixture
def east(site: Site) -> Region:
    return site.region("east")


@pytest.fixture
def west(site: Site) -> Region:
    return site.region("west")
