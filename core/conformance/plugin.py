"""The pytest plugin of the provider conformance suite (entry point ``pytest11``:
``regionvault``), loaded by every pytest run in an environment where regionvault is
installed, and dormant unless asked::

    pytest --pyargs regionvault.core.conformance --regionvault-provider=NAME

Without ``--regionvault-provider`` the suite's tests (marked ``regionvault_conformance``) are
deselected; the plugin otherwise only registers its options and that marker. See
docs/writing-a-provider.md.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from regionvault.core.conformance.support import ConformanceTarget

MARK = "regionvault_conformance"
PACKAGE = __name__.rpartition(".")[0]
#: the suite's directory as Python imports it (the path ``--pyargs`` collects)
SUITE_DIR = Path(__file__).parent
#: what was tested, for the terminal summary: set once the target is open
TESTED = pytest.StashKey[str]()

# The suites' helpers hold the assertions; have pytest rewrite them for readable failures.
# (Names, not the package: the package itself is already imported at this point.)
pytest.register_assert_rewrite(
    *(f"{PACKAGE}.{name}" for name in ("checks", "compute", "fixtures", "keys", "transit", "vault"))
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("regionvault", "regionvault provider conformance suite")
    group.addoption(
        "--regionvault-provider",
        metavar="NAME",
        help="run the conformance suite (pytest --pyargs regionvault.core.conformance) "
        "against this registered provider; without it the suite is deselected",
    )
    group.addoption(
        "--regionvault-site",
        metavar="PATH",
        help="site file with two or more regions of the provider (default: "
        "$REGIONVAULT_<PROVIDER>_SITE, else the provider's own test site)",
    )
    group.addoption(
        "--regionvault-regions",
        metavar="A,B",
        help="the two regions to test (default: $REGIONVAULT_<PROVIDER>_REGIONS, else the "
        "first replication pair of the provider's regions)",
    )
    group.addoption(
        "--regionvault-plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="also load this regionvault plugin module (besides the installed entry points); "
        "may be repeated",
    )


def _provider(config: pytest.Config) -> str | None:
    value = config.getoption("regionvault_provider", default=None)
    return str(value) if value else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK}: a test of regionvault's provider conformance suite (runs only with "
        "--regionvault-provider=NAME)",
    )
    provider = _provider(config)
    if provider is None:
        return
    site = config.getoption("regionvault_site")
    if site and not Path(site).is_file():
        raise pytest.UsageError(f"--regionvault-site {site}: no such file")
    from regionvault.core.conformance.support import make_suite_plugin_manager
    from regionvault.core.errors import RegionVaultError
    from regionvault.core.plugins import registry_from

    try:
        registry = registry_from(make_suite_plugin_manager(config.getoption("regionvault_plugin")))
    except RegionVaultError as exc:
        raise pytest.UsageError(str(exc)) from None
    if provider not in registry:
        raise pytest.UsageError(
            f"--regionvault-provider={provider}: no such provider (registered: "
            f"{', '.join(registry.names()) or 'none'}; is its plugin installed?)"
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    provider = _provider(config)
    if provider is None:
        return None
    from regionvault.core.conformance.support import env_name

    site = config.getoption("regionvault_site") or os.environ.get(env_name(provider, "SITE"))
    return (
        f"regionvault conformance: provider {provider}, site "
        f"{site or 'from the provider (ConformanceSupport.test_site)'}"
    )


# --------------------------------------------------------------------------- collection
#
# regionvault is a namespace package (no regionvault/__init__.py), so pytest's default import
# mode would import the suite's modules under a shortened name ("core.conformance.test_keys").
# The suite's own directories are therefore collected as plain directories, and its modules
# imported by their real names.


class SuiteModule(pytest.Module):
    """A test module of the suite, imported by its full name."""

    def _getobj(self) -> ModuleType:
        return importlib.import_module(f"{PACKAGE}.{self.path.stem}")


def _is_suite_dir(path: Path) -> bool:
    return path in (SUITE_DIR, SUITE_DIR.parent)


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _is_suite_dir(path):
        return pytest.Dir.from_parent(parent, path=path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(
    module_path: Path, parent: pytest.Collector
) -> pytest.Module | None:
    if module_path.parent == SUITE_DIR:
        return SuiteModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _provider(config) is not None:
        return
    dormant = [item for item in items if item.get_closest_marker(MARK) is not None]
    if dormant:
        config.hook.pytest_deselected(items=dormant)
        items[:] = [item for item in items if item.get_closest_marker(MARK) is None]


# --------------------------------------------------------------------------- the target


@pytest.fixture(scope="session")
def regionvault_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConformanceTarget]:
    """The provider under test, its site and regions A and B (see ``support.open_target``)."""
    config = request.config
    provider = _provider(config)
    if provider is None:
        pytest.skip("the conformance suite runs only with --regionvault-provider=NAME")
    from regionvault.core.conformance.support import open_target
    from regionvault.core.errors import RegionVaultError

    site = config.getoption("regionvault_site")
    regions = [r.strip() for r in (config.getoption("regionvault_regions") or "").split(",")]
    with contextlib.ExitStack() as stack:
        try:
            target = open_target(
                provider,
                stack=stack,
                workdir=tmp_path_factory.mktemp("regionvault-site"),
                site_file=Path(site) if site else None,
                regions=[r for r in regions if r],
                plugins=config.getoption("regionvault_plugin"),
            )
        except RegionVaultError as exc:
            pytest.fail(f"regionvault conformance: {exc}", pytrace=False)
        config.stash[TESTED] = target.describe()
        yield target


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    tested = config.stash.get(TESTED, None)
    if tested is not None:
        terminalreporter.write_line(f"regionvault conformance: tested {tested}")
