"""What the conformance suite needs from a provider beyond its four interfaces, and how it
finds the two regions it tests. Nothing here imports pytest: a provider plugin may import
this module from its ``regionvault_conformance_support`` hook implementation.

A run of the suite tests one provider in two of its regions, A and B, taken from a site
file. The site file is, in this order of preference:

1. ``--regionvault-site PATH``;
2. ``$REGIONVAULT_<PROVIDER>_SITE`` (``<PROVIDER>`` is the provider's name in upper case with
   every character other than a letter or digit made ``_``: ``REGIONVAULT_AWS_SITE``);
3. the throwaway site the provider's :class:`ConformanceSupport` builds
   (:meth:`ConformanceSupport.test_site`), which may read environment variables of its own.

Regions A and B are ``--regionvault-regions A,B`` or ``$REGIONVAULT_<PROVIDER>_REGIONS``;
otherwise the first replication pair whose two regions are both the provider's; otherwise
the provider's first two regions in name order.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING

from regionvault.core.errors import ConfigError, ProviderNotFound, UnsupportedOperation
from regionvault.core.plugins import hookspec, make_plugin_manager, registry_from
from regionvault.core.site import Region, Site
from regionvault.core.types import Tags

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import pluggy
    from regionvault.core.interfaces import Transit
    from regionvault.core.types import Instance

__all__ = [
    "IMAGE_ALIGNMENT",
    "RUN_TAG",
    "ConformanceHookSpecs",
    "ConformanceSupport",
    "ConformanceTarget",
    "env_name",
    "open_target",
    "seal_in_subprocess",
    "tags_with_run",
    "tar_image",
    "write_tree",
]

#: disk images of test data are padded to a multiple of this
IMAGE_ALIGNMENT = 1 << 20
#: every test instance carries this tag with the test's unique id as its value, so that the
#: suite lists only its own instances and leftovers in a shared region can be found
RUN_TAG = "rv-conformance"


def env_name(provider: str, suffix: str) -> str:
    """``REGIONVAULT_<PROVIDER>_<SUFFIX>`` for a provider name (``my-cloud`` -> ``MY_CLOUD``)."""
    return f"REGIONVAULT_{re.sub(r'[^A-Za-z0-9]', '_', provider).upper()}_{suffix}"


def write_tree(root: Path, data: Mapping[str, bytes]) -> None:
    """Write ``data`` (relative '/'-separated path -> bytes) as files under ``root``."""
    for rel, content in data.items():
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"test data path {rel!r} is not a plain relative path")
        path = root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def tar_image(data: Mapping[str, bytes]) -> bytes:
    """A disk image holding ``data``: a tar archive, padded to :data:`IMAGE_ALIGNMENT`, in
    which each file's bytes lie contiguous."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(data.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    image = out.getvalue()
    return image + bytes(-len(image) % IMAGE_ALIGNMENT)


class ConformanceSupport:
    """What a provider offers the conformance suite beyond its four interfaces.

    Return an instance of a subclass from the ``regionvault_conformance_support`` hook. Every
    method has a default: without :meth:`test_site` the suite needs a site file, and the
    default :meth:`make_instance` adopts a directory through ``Compute.register_instance``
    where the provider declares it.
    """

    #: never collected as a test class, whatever a subclass is called
    __test__ = False

    #: tests this support's setup cannot pass for reasons outside the provider (an emulator's
    #: gap, say): test function name -> reason. Each is skipped with the reason, so the gap
    #: is visible in every run's summary rather than hidden.
    known_limits: Mapping[str, str] = {}

    def test_site(self, workdir: Path) -> AbstractContextManager[Path]:
        """A throwaway site with at least two regions of this provider, for runs given no
        site file: a context manager that yields the path of a site file (written under
        ``workdir``, an empty directory that outlives the run) and tears down whatever it
        started (a local server, temporary buckets) on exit. Implement it with
        :func:`contextlib.contextmanager`; read provider-specific environment variables
        (``REGIONVAULT_<PROVIDER>_...``) here."""
        raise UnsupportedOperation("ConformanceSupport.test_site")

    def make_instance(
        self,
        region: Region,
        name: str,
        *,
        data: Mapping[str, bytes],
        tags: Mapping[str, str],
        workdir: Path,
    ) -> Instance:
        """Create a running instance named ``name`` with ``tags`` in ``region``, whose data,
        when captured, holds ``data`` (relative path -> bytes). A provider whose instances
        are disks (block captures) writes the files so that each file's bytes lie contiguous
        in the disk image (a tar archive of them does). ``workdir`` is a fresh directory for
        any local files. Raise :class:`UnsupportedOperation` if test instances cannot be
        made (the tests that need them are then skipped)."""
        compute = region.compute
        if not compute.capabilities.register_instance:
            raise UnsupportedOperation(
                "creating test instances (Compute.register_instance is not declared and the "
                "provider's ConformanceSupport has no make_instance)",
                provider=compute.provider,
                region=compute.region,
            )
        directory = workdir / name
        directory.mkdir(parents=True)
        write_tree(directory, data)
        return compute.register_instance(name, directory, tags=tags)

    def remove_instance(self, region: Region, instance: Instance) -> None:
        """Get rid of a test instance (one :meth:`make_instance` made, or one the suite
        launched) after its test."""
        region.compute.terminate(instance.id)


class ConformanceHookSpecs:
    """The conformance suite's own hook specification: the suite, not the core, specifies
    it, and adds it to the plugin manager it builds (:func:`make_suite_plugin_manager`).
    The core never calls the hook, so a plugin implements it with
    ``@hookimpl(optionalhook=True)`` and still loads where the suite is not running (every
    ``regionvault`` command)."""

    @hookspec(firstresult=True)
    def regionvault_conformance_support(self, provider: str) -> ConformanceSupport | None:
        """Called once per run of the conformance suite (``pytest --pyargs
        regionvault.core.conformance --regionvault-provider=NAME``) with the provider's name.
        Return a :class:`~regionvault.core.conformance.ConformanceSupport` (a throwaway
        two-region test site, test instances) when this plugin supports ``provider``, else
        None; the first answer that is not None is taken."""


# --------------------------------------------------------------------------- the target


@dataclass
class ConformanceTarget:
    """The provider under test: its site, the two regions A and B, and its support."""

    provider: str
    site: Site
    site_file: Path
    #: where the site came from, for the report header
    site_source: str
    region_a: Region
    region_b: Region
    support: ConformanceSupport
    #: extra regionvault plugin modules loaded besides the entry points
    plugins: tuple[str, ...] = ()

    def transit(self, source: Region, destination: Region) -> Transit:
        return self.site.transit(source.name, destination.name)

    def describe(self) -> str:
        return (
            f"provider {self.provider}, regions A={self.region_a.name} B={self.region_b.name} "
            f"(site: {self.site_source})"
        )


def load_plugin_modules(names: Sequence[str]) -> list[ModuleType]:
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise ConfigError(f"cannot import regionvault plugin module {name!r}: {exc}") from None
    return modules


def make_suite_plugin_manager(plugins: Sequence[str] = ()) -> pluggy.PluginManager:
    """The plugin manager the suite uses: the suite's hook specification, the entry points,
    then ``plugins`` (module names). Built-in providers bring their support the way outside
    ones do, through ``regionvault_conformance_support``."""
    return make_plugin_manager(
        plugins=load_plugin_modules(plugins), hookspecs=[ConformanceHookSpecs]
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def choose_regions(site: Site, provider: str, wanted: Sequence[str]) -> tuple[Region, Region]:
    """Regions A and B of ``provider`` in ``site`` (see the module docstring)."""
    source = site.config.source
    if wanted:
        regions = [site.region(ref) for ref in wanted]
        if len(regions) < 2 or len({r.name for r in regions}) != len(regions):
            raise ConfigError(
                f"the conformance suite needs two different regions, got {', '.join(wanted)}",
                file=source,
            )
        for region in regions:
            if region.config.provider != provider:
                raise ConfigError(
                    f"region {region.name} is not a region of provider {provider!r}", file=source
                )
        return regions[0], regions[1]
    mine = [r for r in site.regions if r.config.provider == provider]
    if len(mine) < 2:
        listed = ", ".join(r.name for r in mine) or "none"
        raise ConfigError(
            f"the conformance suite needs two regions of provider {provider!r}; the site has "
            f"{len(mine)} ({listed})",
            file=source,
        )
    names = {r.name for r in mine}
    for rep in site.config.replication:
        for dest in rep.destinations:
            if str(rep.source) in names and str(dest) in names:
                return site.region(str(rep.source)), site.region(str(dest))
    return mine[0], mine[1]


def open_target(
    provider: str,
    *,
    stack: contextlib.ExitStack,
    workdir: Path,
    site_file: Path | None = None,
    regions: Sequence[str] = (),
    plugins: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ConformanceTarget:
    """Load the plugins, find the site and regions A and B of ``provider``; everything opened
    is closed by ``stack``. Raises :class:`ConfigError` naming what is missing or wrong."""
    env = os.environ if environ is None else environ
    pm = make_suite_plugin_manager(plugins)
    registry = registry_from(pm)
    if provider not in registry:
        raise ProviderNotFound(
            f"--regionvault-provider={provider}: no such provider (registered: "
            f"{', '.join(registry.names()) or 'none'}; is its plugin installed?)"
        )
    support = pm.hook.regionvault_conformance_support(provider=provider) or ConformanceSupport()
    if not isinstance(support, ConformanceSupport):
        raise ConfigError(
            f"regionvault_conformance_support for {provider!r} returned "
            f"{type(support).__name__}, not a ConformanceSupport"
        )
    site_env = env_name(provider, "SITE")
    if site_file is not None:
        source = f"--regionvault-site {site_file}"
    elif env.get(site_env):
        site_file = Path(env[site_env])
        source = f"${site_env}={site_file}"
    else:
        try:
            site_file = stack.enter_context(support.test_site(workdir))
        except UnsupportedOperation:
            raise ConfigError(
                f"no site to test provider {provider!r} in: give --regionvault-site PATH, set "
                f"{site_env}, or return a ConformanceSupport with a test_site from the "
                "provider's regionvault_conformance_support hook"
            ) from None
        source = f"the {provider} provider's test site {site_file}"
    site = Site.load(site_file, registry=registry, plugin_manager=pm)
    stack.callback(site.close)
    wanted = list(regions) or _split(env.get(env_name(provider, "REGIONS"), ""))
    region_a, region_b = choose_regions(site, provider, wanted)
    return ConformanceTarget(
        provider=provider,
        site=site,
        site_file=Path(site_file),
        site_source=source,
        region_a=region_a,
        region_b=region_b,
        support=support,
        plugins=tuple(plugins),
    )


# --------------------------------------------------------------------------- sealing elsewhere

_SEAL_SCRIPT = """
import json, sys
from regionvault.core.conformance.support import make_suite_plugin_manager
from regionvault.core.plugins import registry_from
from regionvault.core.site import Site
site_file, region, plugins, secret, context = sys.argv[1:]
pm = make_suite_plugin_manager(json.loads(plugins))
registry = registry_from(pm)
with Site.load(site_file, registry=registry, plugin_manager=pm) as site:
    sealer = site.region(region).sealer()
    sys.stdout.write(sealer.seal(bytes.fromhex(secret), json.loads(context)).hex())
"""


def seal_in_subprocess(
    target: ConformanceTarget, region: str, secret: bytes, context: Mapping[str, str]
) -> bytes:
    """Seal ``secret`` for ``region`` in a separate Python process that has only the site
    file, through ``Provider.sealer`` (as another region's backup service would)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _SEAL_SCRIPT,
            str(target.site_file),
            region,
            json.dumps(list(target.plugins)),
            secret.hex(),
            json.dumps(dict(context)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"sealing for {region} in another process failed (exit {result.returncode}):\n"
            f"{result.stderr.strip()}"
        )
    return bytes.fromhex(result.stdout.strip())


def tags_with_run(uid: str, tags: Mapping[str, str] | None) -> Tags:
    return Tags({**(tags or {}), RUN_TAG: uid})
