"""The provider conformance suite (regionvault.core.conformance): it passes against the local
provider and against the example outside provider (tests/example_provider, pip-installed as
its own distribution, exactly as docs/writing-a-provider.md shows); deliberately broken
providers (tests/broken_providers.py) fail it with messages that say what is wrong; it stays
dormant without --regionvault-provider; the guide matches the example's files and commands.

The suite runs in child pytest processes, as a provider author runs it, with warnings as
errors and strict markers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from regionvault.core import ConfigError, Region, Site, Vault
from regionvault.core.conformance import VaultSuite, env_name, open_target
from regionvault.core.conformance.support import choose_regions, make_suite_plugin_manager
from site_support import site_toml

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
EXAMPLE = TESTS / "example_provider"
GUIDE = ROOT / "docs" / "writing-a-provider.md"
SUITE = "regionvault.core.conformance"
#: pytest's exit codes for "usage error" and "no tests ran"
USAGE_ERROR, NO_TESTS = 4, 5


# --------------------------------------------------------------------------- running pytest


@dataclass
class Run:
    returncode: int
    output: str
    #: "Class::test[param]" -> (outcome, message)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def having(self, outcome: str) -> dict[str, str]:
        return {name: msg for name, (out, msg) in self.outcomes.items() if out == outcome}

    def explain(self) -> str:
        return f"exit {self.returncode}\n{self.output[-6000:]}"


def _outcomes(report: Path) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    if not report.exists():
        return found
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message") or ""
                break
        found[name] = (outcome, message)
    return found


def run_pytest(
    args: Sequence[str],
    *,
    cwd: Path,
    pythonpath: Sequence[Path] = (),
    env: dict[str, str] | None = None,
) -> Run:
    """``pytest ARGS`` in a child process, in ``cwd``, with warnings as errors, strict
    markers, its own base temporary directory, no REGIONVAULT_* or PYTEST_* variables from
    this process, and a JUnit report."""
    report = cwd / f"report-{len(list(cwd.glob('report-*.xml')))}.xml"
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REGIONVAULT_", "PYTEST_"))
    }
    # wide lines: the one-line failure summaries are not cut at 80 columns
    child_env.update(COLUMNS="400", PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    child_env.update(env or {})
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
        "--strict-markers",
        f"--junitxml={report}",
        # a private base directory: pytest's clean-up of the shared numbered ones under
        # /tmp/pytest-of-USER can leave a scandir iterator open, which -W error fails on
        f"--basetemp={report.with_suffix('.tmp')}",
        *args,
    ]
    result = subprocess.run(
        command, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=240
    )
    return Run(result.returncode, result.stdout + result.stderr, _outcomes(report))


def two_region_site(path: Path, provider: str, names: Sequence[str] = ("east", "west")) -> Path:
    """The test site (tests/site_support.py) with regions ``names`` of ``provider``, the
    first replicating to the second."""
    regions = {f"{provider}:{name}": name for name in names}
    ids = list(regions)
    pair = (ids[0], ids[1]) if len(ids) >= 2 else None
    path.write_text(site_toml(regions, name=None, replicate=pair), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the guide


def guide_blocks() -> dict[str, str]:
    """Fenced blocks of the guide marked by an HTML comment: marker -> text."""
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- (.+?) -->\n```[a-z]*\n(.*?)\n```", text, flags=re.S)
    return {marker: body for marker, body in blocks}


def guide_commands() -> list[list[str]]:
    lines = guide_blocks()["commands"].splitlines()
    return [shlex.split(line.removeprefix("$ ")) for line in lines if line.startswith("$ ")]


def check_guide_lines(block: str, output: str, *, only: str = "") -> None:
    """Every line of a guide block (with ``only`` in it) appears in ``output``, each ``...``
    standing for whatever the run printed there."""
    lines = [line for line in block.splitlines() if only in line and line.strip() != "..."]
    assert lines, f"the guide shows no output line with {only!r}"
    for line in lines:
        for fragment in line.split("..."):
            assert fragment in output, (
                f"docs/writing-a-provider.md shows {line!r}, but the run printed no {fragment!r}"
            )


@pytest.fixture(scope="session")
def example_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example provider installed with the guide's own pip command (from a copy of
    tests/example_provider, so the source tree gets no build files), into a directory of its
    own that runs put on PYTHONPATH: the project's environment and its entry points stay as
    they are."""
    work = tmp_path_factory.mktemp("example-provider")
    shutil.copytree(
        EXAMPLE,
        work / "rv-example-provider",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    pip = guide_commands()[0]
    assert pip == ["python", "-m", "pip", "install", "./rv-example-provider"], pip
    target = work / "site-packages"
    options = ["--target", str(target), "--no-deps", "--no-build-isolation", "--quiet"]
    result = subprocess.run(
        [sys.executable, *pip[1:], *options, "--disable-pip-version-check"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "rv_example_provider" / "vault.py").is_file()
    return target


# --------------------------------------------------------------------------- passing providers


def test_suite_passes_against_the_local_provider(tmp_path: Path) -> None:
    run = run_pytest(["--pyargs", SUITE, "--regionvault-provider=local", "-ra"], cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    assert not run.having("failed") and not run.having("error"), run.explain()
    assert len(run.having("passed")) >= 40, run.explain()
    skipped = run.having("skipped")
    # the local provider declares WORM and legal holds: those tests ran
    assert "TestVault::test_compliance_retention_refuses_delete_and_shortening" not in skipped
    assert "TestVault::test_legal_hold_refuses_delete_until_lifted" not in skipped
    assert "TestCompute::test_a_discarded_sink_cannot_be_launched[files]" in run.having("passed")
    blocks = skipped["TestCompute::test_capture_holds_the_instance_data[blocks]"]
    assert "provider local does not declare capture kind 'blocks'" in blocks
    assert "regionvault conformance: tested provider local, regions A=local:east B=local:west" in (
        run.output
    )


def test_suite_passes_against_the_example_provider_as_the_guide_runs_it(
    tmp_path: Path, example_installed: Path
) -> None:
    command = guide_commands()[1]
    assert command[0] == "pytest", command
    run = run_pytest(command[1:], cwd=tmp_path, pythonpath=[example_installed])
    assert run.returncode == 0, run.explain()
    assert not run.having("failed") and not run.having("error"), run.explain()
    skipped = run.having("skipped")
    for test in (
        "TestVault::test_governance_retention_refuses_early_delete",
        "TestVault::test_legal_hold_refuses_delete_until_lifted",
    ):
        assert "provider flatdir does not declare Capabilities." in skipped[test], skipped
    # what flatdir does not declare, it refuses with a named error
    passed = run.having("passed")
    assert "TestVault::test_undeclared_retention_is_refused" in passed
    assert "TestVault::test_undeclared_legal_hold_is_refused" in passed
    assert "TestVault::test_put_is_atomic_for_concurrent_readers" in passed
    check_guide_lines(guide_blocks()["output"], run.output)


def test_the_guides_own_fixtures_example_runs(tmp_path: Path, example_installed: Path) -> None:
    module = tmp_path / "tests" / "test_flatvault.py"
    module.parent.mkdir()
    module.write_text(guide_blocks()["run: own-fixtures"] + "\n", encoding="utf-8")
    run = run_pytest([str(module)], cwd=tmp_path, pythonpath=[example_installed])
    assert run.returncode == 0, run.explain()
    passed = run.having("passed")
    assert "TestFlatVault::test_if_absent_race_has_exactly_one_winner" in passed, run.explain()
    assert len(passed) >= 10, run.explain()


# --------------------------------------------------------------------------- broken providers


BROKEN = {
    "leakykeys": (
        "test_keys",
        {
            "TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[A-to-B]": (
                "KeyService of region leakykeys:west unwrapped a data key wrapped by region "
                "leakykeys:east: key isolation is broken"
            ),
            "TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[B-to-A]": (
                "KeyService of region leakykeys:east unwrapped a data key wrapped by region "
                "leakykeys:west: key isolation is broken"
            ),
        },
    ),
    "tornvault": (
        "test_vault",
        {
            "TestVault::test_put_is_atomic_for_concurrent_readers": (
                "Vault of region tornvault:east: put is not atomic: a concurrent reader of "
            ),
        },
    ),
    "filterblind": (
        "test_compute",
        {
            f"TestCompute::{test}": "Compute of region filterblind:east ignored tag filter {"
            for test in (
                "test_list_pages_through_every_instance_once",
                "test_list_filters_by_tag_value_and_by_key",
                "test_set_tags_and_read_them_back",
                "test_remove_tags",
                "test_launch_from_restored_data[files]",
            )
        },
    ),
    "miscount": (
        "test_compute",
        {
            f"TestCompute::{test}[files]": "totals() says"
            for test in ("test_capture_holds_the_instance_data", "test_launch_from_restored_data")
        },
    ),
}


@pytest.mark.parametrize("provider", list(BROKEN))
def test_a_broken_provider_fails_the_suite_saying_what_is_wrong(
    tmp_path: Path, provider: str
) -> None:
    module, expected = BROKEN[provider]
    site = two_region_site(tmp_path / "site.toml", provider)
    run = run_pytest(
        [
            "--pyargs",
            f"{SUITE}.{module}",
            f"--regionvault-provider={provider}",
            "--regionvault-site",
            str(site),
            "--regionvault-plugin=broken_providers",
            "-ra",
        ],
        cwd=tmp_path,
        pythonpath=[TESTS],
    )
    assert run.returncode == 1, run.explain()
    failed = run.having("failed")
    assert sorted(failed) == sorted(expected), run.explain()
    for test, message in expected.items():
        assert message in failed[test], f"{test}: {failed[test]}"
        assert message in run.output  # in the one-line summary an author reads first
    # only the broken promise fails: the rest of the interface's suite still passes
    assert not run.having("error") and len(run.having("passed")) >= 3, run.explain()
    check_guide_lines(guide_blocks()["failures"], run.output, only=provider)


# --------------------------------------------------------------------------- dormant and misuse


def test_without_the_option_the_suite_is_deselected_not_failed(tmp_path: Path) -> None:
    run = run_pytest(["--pyargs", SUITE], cwd=tmp_path)
    assert run.returncode == NO_TESTS, run.explain()
    assert re.search(r"\b[4-9]\d deselected\b", run.output), run.explain()
    assert not run.outcomes


def test_an_unknown_provider_is_a_usage_error(tmp_path: Path) -> None:
    run = run_pytest(["--pyargs", SUITE, "--regionvault-provider=nosuch"], cwd=tmp_path)
    assert run.returncode == USAGE_ERROR, run.explain()
    assert "--regionvault-provider=nosuch: no such provider (registered: " in run.output
    assert "local" in run.output


def test_a_site_with_one_region_of_the_provider_errors_with_the_reason(tmp_path: Path) -> None:
    site = two_region_site(tmp_path / "site.toml", "local", names=["solo"])
    run = run_pytest(
        [
            "--pyargs",
            f"{SUITE}.test_keys",
            "--regionvault-provider=local",
            f"--regionvault-site={site}",
            "-k",
            "round_trips",
        ],
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.explain()
    assert set(run.having("error")) == {
        "TestKeyService::test_data_key_round_trips_with_its_context"
    }
    assert (
        "the conformance suite needs two regions of provider 'local'; the site has 1 (local:solo)"
    ) in run.output


def test_site_and_regions_from_the_environment(tmp_path: Path) -> None:
    site = two_region_site(tmp_path / "site.toml", "local", names=["a", "b", "c"])
    run = run_pytest(
        ["--pyargs", f"{SUITE}.test_keys", "--regionvault-provider=local", "-k", "isolation"],
        cwd=tmp_path,
        env={"REGIONVAULT_LOCAL_SITE": str(site), "REGIONVAULT_LOCAL_REGIONS": "c,a"},
    )
    assert run.returncode == 0, run.explain()
    assert len(run.having("passed")) == 4, run.explain()
    assert (
        f"tested provider local, regions A=local:c B=local:a (site: $REGIONVAULT_LOCAL_SITE={site})"
    ) in run.output


def test_the_built_in_providers_bring_their_support_through_the_hook() -> None:
    # the suite knows no provider by name: each one's plugin answers the suite's hook
    pm = make_suite_plugin_manager()
    for provider, module in [
        ("local", "regionvault.providers.local.conformance"),
        ("aws", "regionvault.providers.aws.conformance"),
    ]:
        support = pm.hook.regionvault_conformance_support(provider=provider)
        assert type(support).__module__ == module
    assert pm.hook.regionvault_conformance_support(provider="nosuch") is None


LIMITS_PLUGIN = """
from regionvault.core import hookimpl
from regionvault.providers.local.conformance import LocalConformanceSupport


class EmulatedLocal(LocalConformanceSupport):
    known_limits = {"test_data_keys_are_fresh": "this emulator hands out one key"}


@hookimpl
def regionvault_conformance_support(provider):
    return EmulatedLocal() if provider == "local" else None
"""


def test_known_limits_of_a_test_setup_are_skipped_with_their_reason(tmp_path: Path) -> None:
    (tmp_path / "limits_plugin.py").write_text(LIMITS_PLUGIN, encoding="utf-8")
    run = run_pytest(
        [
            "--pyargs",
            f"{SUITE}.test_keys",
            "--regionvault-provider=local",
            "--regionvault-plugin=limits_plugin",
            "-k",
            "fresh or round_trips",
        ],
        cwd=tmp_path,
        pythonpath=[tmp_path],
    )
    assert run.returncode == 0, run.explain()
    assert run.having("skipped") == {
        "TestKeyService::test_data_keys_are_fresh": (
            "known limit of the local test setup: this emulator hands out one key"
        )
    }
    assert set(run.having("passed")) == {
        "TestKeyService::test_data_key_round_trips_with_its_context"
    }


# --------------------------------------------------------------------------- in-process


def test_env_names() -> None:
    assert env_name("aws", "SITE") == "REGIONVAULT_AWS_SITE"
    assert env_name("my-cloud.v2", "REGIONS") == "REGIONVAULT_MY_CLOUD_V2_REGIONS"


def test_regions_follow_replication_then_name_order(site: Site) -> None:
    a, b = choose_regions(site, "local", [])
    assert (a.name, b.name) == ("local:east", "local:west")
    a, b = choose_regions(site, "local", ["west", "east"])
    assert (a.name, b.name) == ("local:west", "local:east")
    with pytest.raises(ConfigError, match="needs two regions of provider 'aws'; the site has 0"):
        choose_regions(site, "aws", [])
    with pytest.raises(ConfigError, match="two different regions"):
        choose_regions(site, "local", ["east", "east"])


def test_without_any_site_the_error_names_the_ways_to_give_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        with (
            contextlib.ExitStack() as stack,
            pytest.raises(ConfigError) as info,
        ):
            open_target(
                "leakykeys",
                stack=stack,
                workdir=tmp_path,
                plugins=["broken_providers"],
                environ={},
            )
    finally:
        sys.path.remove(str(TESTS))
    message = str(info.value)
    assert "no site to test provider 'leakykeys' in" in message
    assert "--regionvault-site PATH" in message and "REGIONVAULT_LEAKYKEYS_SITE" in message


class TestVaultSuiteWithFixturesOfOurOwn(VaultSuite):
    """The mixin route an author takes: the vault suite on this project's own fixtures."""

    @pytest.fixture
    def vault_a(self, east: Region) -> Vault:
        return east.vault

    @pytest.fixture
    def vault_b(self, west: Region) -> Vault:
        return west.vault


# --------------------------------------------------------------------------- the guide's files


def test_the_guide_shows_every_file_of_the_example_provider_as_it_is() -> None:
    shown = {
        marker.removeprefix("file: rv-example-provider/"): body
        for marker, body in guide_blocks().items()
        if marker.startswith("file: ")
    }
    files = {
        path.relative_to(EXAMPLE).as_posix()
        for path in EXAMPLE.rglob("*")
        if path.is_file()
        and not any(
            p in ("build", "__pycache__") or p.endswith(".egg-info") or p.startswith(".")
            for p in path.relative_to(EXAMPLE).parts
        )
    }
    assert sorted(shown) == sorted(files), "the guide must show every file of the example"
    for name, body in shown.items():
        actual = (EXAMPLE / name).read_text(encoding="utf-8")
        assert body + "\n" == actual, (
            f"docs/writing-a-provider.md shows a {name} that differs from tests/example_provider"
        )


def test_the_example_registers_through_its_own_entry_point() -> None:
    text = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    assert '[project.entry-points.regionvault]\nflatdir = "rv_example_provider.plugin"' in text
    assert 'name = "rv-example-provider"' in text
