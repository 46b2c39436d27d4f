"""The sites the tests run on, defined once: ``site_toml`` writes a site file's text (by
default the two-region local site, ``local:east`` replicating to ``local:west``),
``worker_site`` the site of one region's own worker (that region's keys only), ``open_site``
loads one with the local provider alone, and ``enter_workdir`` puts a test where a user of
the ``regionvault`` command would be. tests/conftest.py builds its fixtures (``site``,
``east``, ``west``, ``workdir``) from these."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from cli_support import ok
from regionvault.core import Region, Site, load_site
from regionvault.core.plugins import make_plugin_manager, registry_from
from regionvault.providers.local import plugin as local_plugin

__all__ = ["TWO_REGIONS", "enter_workdir", "open_site", "region_root", "site_toml", "worker_site"]

#: the two regions of the test site and their roots (relative to the site file)
TWO_REGIONS: Mapping[str, str | Path] = {"local:east": "east", "local:west": "west"}

TomlValue = str | int | bool | Path


def _value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string quotes as JSON does


def _table(header: str, values: Mapping[str, TomlValue]) -> str:
    return "\n".join([header, *(f"{key} = {_value(v)}" for key, v in values.items())]) + "\n"


def site_toml(
    regions: Mapping[str, str | Path] = TWO_REGIONS,
    *,
    name: str | None = "test",
    settings: Mapping[str, TomlValue] | None = None,
    replicate: tuple[str, str] | None = ("local:east", "local:west"),
    services: Mapping[str, Mapping[str, Mapping[str, TomlValue]]] | None = None,
    extra: str = "",
) -> str:
    """A site file's text: ``[site]`` with ``name`` and ``settings``; one
    ``[regions."provider:name"]`` per entry of ``regions`` (region -> its ``root``), with
    ``services`` (region -> service -> settings, e.g. another keys root) as its sub-tables;
    the replication pair ``replicate`` (source, destination) when both are in ``regions``;
    then ``extra`` (more TOML: hooks, policies)."""
    site = {**({"name": name} if name is not None else {}), **(settings or {})}
    parts = [_table("[site]", site)] if site else []
    for region, root in regions.items():
        parts.append(_table(f'[regions."{region}"]', {"root": root}))
        for service, values in (services or {}).get(region, {}).items():
            parts.append(_table(f'[regions."{region}".{service}]', values))
    if replicate is not None and set(replicate) <= set(regions):
        source, destination = replicate
        parts.append(f"[[replication]]\nfrom = {_value(source)}\nto = [{_value(destination)}]\n")
    if extra:
        parts.append(extra)
    return "\n".join(parts)


def open_site(path: Path, *plugins: object) -> Site:
    """The site of ``path`` with the built-in local provider, registered through its plugin
    module, and ``plugins``: the tests do not depend on which other provider distributions
    happen to be installed."""
    pm = make_plugin_manager(load_entry_points=False, plugins=[local_plugin, *plugins])
    registry = registry_from(pm)
    return Site(load_site(path, registry=registry), registry=registry, plugin_manager=pm)


def region_root(region: Region) -> Path:
    """A local region's root directory."""
    return Path(region.config.path("root")).resolve()


def worker_site(directory: Path, own: Region, other: Region, *, replicate: bool = False) -> Path:
    """The site file of a worker (or service) of ``own``, in ``directory``: ``own``'s
    services in full; of ``other`` its vault and inbox (the Transits between them) and a
    keys directory holding nothing but ``other``'s sealing public key, so the worker holds
    one region's keys, as in a deployment. ``replicate``: with the pair east -> west."""
    public = directory.parent / f"public-of-{other.name.split(':')[1]}"
    (public / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(region_root(other) / "keys" / "sealing.pub", public / "keys" / "sealing.pub")
    path = directory / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        site_toml(
            {own.name: region_root(own), other.name: region_root(other)},
            name=directory.name,
            settings={"state_dir": directory / "state"},
            services={other.name: {"keys": {"root": public}}},
            replicate=("local:east", "local:west") if replicate else None,
        )
    )
    return path


def enter_workdir(path: Path, monkeypatch: pytest.MonkeyPatch, *, init: bool = True) -> Path:
    """Make ``path`` the working directory of a ``regionvault`` user, with no
    ``$REGIONVAULT_SITE``, holding (with ``init``) the site ``regionvault init`` writes."""
    monkeypatch.delenv("REGIONVAULT_SITE", raising=False)
    monkeypatch.chdir(path)
    if init:
        ok("init")
    return path
