"""Shared fixtures. ``site`` is the two-region local test site (``local:east`` replicating to
``local:west``: tests/site_support.py) loaded from a site.toml in the test's tmp_path;
``east`` and ``west`` are its regions. ``workdir`` is a working directory where
``regionvault init`` has run, as a user of the command would have it. No test sees a
``$REGIONVAULT_SITE`` of the environment it runs in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from regionvault.core import Region, Site
from site_support import enter_workdir, open_site, site_toml


@pytest.fixture(autouse=True)
def _no_site_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGIONVAULT_SITE", raising=False)


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(site_toml())
    return path


@pytest.fixture
def site(site_file: Path) -> Iterator[Site]:
    with open_site(site_file) as s:
        yield s


@pytest.fixture
def east(site: Site) -> Region:
    return site.region("east")


@pytest.fixture
def west(site: Site) -> Region:
    return site.region("west")


@pytest.fixture
def empty_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's tmp_path as the working directory, before ``regionvault init``."""
    return enter_workdir(tmp_path, monkeypatch, init=False)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's tmp_path as the working directory, holding the site ``regionvault init``
    writes (local:east and local:west, east -> west)."""
    return enter_workdir(tmp_path, monkeypatch)
