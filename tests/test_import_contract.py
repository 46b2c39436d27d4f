"""The import contract (pyproject.toml ``[tool.importlinter]``, run by scripts/test) fails on
an import that breaks an arrow of the layout, and names it.

Each case copies the source tree into a temporary directory, adds one import there (most of
them late, inside a function, where a cycle likes to hide; one under TYPE_CHECKING) and runs
lint-imports on the copy: the contract must fail, and its report must name the importing
module, the imported one and the line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "providers", "plugins")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> dict[str, dict[str, object]]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


@dataclass(frozen=True)
class Break:
    """One import added to one module of the copy, and what the report must say."""

    module: str  # path under the copy's regionvault/
    code: str  # appended to the module
    contract: str  # the id of the contract it breaks
    named: str  # a regular expression the contract's report must match ({line}: the line)


LATE = "\n\ndef _added_by_the_test() -> None:\n    {}  # noqa\n"
TYPING_ONLY = "\nif TYPE_CHECKING:\n    {}  # noqa\n"

BREAKS = {
    "the SPI imports the pipeline": Break(
        "core/names.py",
        LATE.format("from regionvault.core.pipeline import engine"),
        "layers",
        r"regionvault\.core\.names -> regionvault\.core\.pipeline\.engine \(l\.{line}\)",
    ),
    "the core's own __init__ imports the CLI": Break(
        "core/__init__.py",
        "\nfrom regionvault.core.cli import root  # noqa\n",
        "core-init-spi",
        r"regionvault\.core -> regionvault\.core\.cli\.root \(l\.{line}\)",
    ),
    "the plugin manager imports the conformance suite for a type": Break(
        "core/plugins.py",
        TYPING_ONLY.format("from regionvault.core.conformance import support"),
        "layers",
        r"regionvault\.core\.plugins -> regionvault\.core\.conformance\.support \(l\.{line}\)",
    ),
    "a late import makes a cycle in the SPI": Break(
        "core/durations.py",
        LATE.format("from regionvault.core import policy"),
        "no-cycles",
        r"No cycles are allowed in regionvault\.core\.\n.*\n\n- \.(policy -> \.durations|"
        r"durations -> \.policy) ",
    ),
    "a provider's service imports the conformance suite": Break(
        "providers/local/vault.py",
        LATE.format("from regionvault.core.conformance import support"),
        "conformance-for-test-support",
        r"regionvault\.providers\.local\.vault -> regionvault\.core\.conformance\.support "
        r"\(l\.{line}\)",
    ),
    "a provider imports another": Break(
        "providers/local/_fs.py",
        LATE.format("from regionvault.providers.aws import s3"),
        "providers-independent",
        r"regionvault\.providers\.local\._fs -> regionvault\.providers\.aws\.s3 \(l\.{line}\)",
    ),
    "a plugin imports a provider": Break(
        "plugins/samplenf/nf.py",
        LATE.format("from regionvault.providers.local import vault"),
        "plugins-no-providers",
        r"regionvault\.plugins\.samplenf\.nf -> regionvault\.providers\.local\.vault "
        r"\(l\.{line}\)",
    ),
    "the core imports a cloud SDK": Break(
        "core/site.py",
        LATE.format("import boto3"),
        "cloud-sdks",
        r"regionvault\.core\.site -> boto3 \(l\.{line}\)",
    ),
    "a provider imports another cloud's SDK (not installed here)": Break(
        "providers/aws/s3.py",
        LATE.format("from azure.storage import blob"),
        "aws-sdk-only",
        r"regionvault\.providers\.aws\.s3 -> azure \(l\.{line}\)",
    ),
}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree as it is, laid out as an importable ``regionvault`` namespace package."""
    top = tmp_path_factory.mktemp("pristine")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            top / "src" / "regionvault" / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    shutil.copy2(ROOT / "pyproject.toml", top / "pyproject.toml")
    return top


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # the copy comes first on the path, before the installed (editable) regionvault
        "PYTHONPATH": str(tree / "src"),
        "COLUMNS": "400",  # one report line per import, unwrapped
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def broken_report(output: str, name: str) -> str:
    """The section of ``output`` that reports the broken contract called ``name``."""
    _, found, broken = output.partition("Broken contracts")
    assert found, f"no contract is broken:\n{output}"
    sections = re.split(r"^(.+)\n-+\n", broken, flags=re.MULTILINE)
    reports = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert name in reports, f"contract {name!r} is not reported broken:\n{output}"
    return reports[name]


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_the_contract_fails_naming_a_broken_import(
    case: str, source_copy: Path, tmp_path: Path
) -> None:
    added = BREAKS[case]
    tree = tmp_path / "tree"
    shutil.copytree(source_copy, tree)
    module = tree / "src" / "regionvault" / added.module
    text = module.read_text(encoding="utf-8")
    if "TYPE_CHECKING" in added.code:
        assert "TYPE_CHECKING" in text, f"{added.module} no longer imports TYPE_CHECKING"
    text += added.code
    line = text.splitlines().index(added.code.rstrip().splitlines()[-1]) + 1
    module.write_text(text, encoding="utf-8")

    run = lint_imports(tree)

    assert run.returncode != 0, run.stdout + run.stderr
    report = broken_report(run.stdout, str(_contracts()[added.contract]["name"]))
    assert re.search(added.named.format(line=line), report), report


def test_the_copy_is_what_lint_imports_reads(source_copy: Path, tmp_path: Path) -> None:
    # Without this the cases above could pass by reading the installed tree: a module that
    # exists only in the copy must be found, and break the layers' exhaustiveness.
    tree = tmp_path / "tree"
    shutil.copytree(source_copy, tree)
    (tree / "src" / "regionvault" / "core" / "stray.py").write_text("", encoding="utf-8")
    run = lint_imports(tree)
    assert run.returncode != 0
    assert "regionvault.core.stray" in run.stdout + run.stderr


def test_every_provider_is_held_to_the_cloud_sdk_contracts() -> None:
    contracts = _contracts()
    shared = set(contracts["cloud-sdks"]["source_modules"])  # type: ignore[call-overload]
    providers = sorted(
        p.name for p in (ROOT / "providers").iterdir() if (p / "__init__.py").is_file()
    )
    assert "local" in providers and "aws" in providers
    for name in providers:
        assert f"regionvault.providers.{name}" in shared or f"{name}-sdk-only" in contracts, (
            f"provider {name}: add it to the cloud-sdks contract's source_modules, or give it "
            f"a contract {name}-sdk-only forbidding the other clouds' SDKs"
        )
    assert {"regionvault.core", "regionvault.plugins"} <= shared
