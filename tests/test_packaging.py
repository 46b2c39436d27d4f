"""The core, the local provider and the CLI work with no cloud SDK installed; the wheel holds
every package, the entry points and the type markers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: top-level packages of the cloud SDKs; only a provider for that cloud may import one
CLOUD_SDKS = ("boto3", "botocore", "s3transfer", "azure", "google", "googleapiclient")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    BLOCKED = {CLOUD_SDKS!r}


    class BlockCloudSdks(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
            return None


    sys.meta_path.insert(0, BlockCloudSdks())
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED:
            del sys.modules[name]
    """
)


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_core_local_provider_and_cli_import_without_cloud_sdks(tmp_path: Path) -> None:
    result = run_blocked(
        """
        import json

        try:
            import boto3
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("the blocker does not work")

        import regionvault.core
        import regionvault.core.cli
        import regionvault.providers.local.plugin
        import regionvault.providers.local.provider
        from regionvault.core.cli import main
        from regionvault.core.plugins import get_plugin_manager

        # every registered plugin loads, and registers its providers, without an SDK
        pm, registry = get_plugin_manager()
        assert "local" in registry.names(), registry.names()

        for argv in (["--help"], ["init", "site.toml"], ["--site", "site.toml", "regions"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        loaded = sorted(
            {m.partition(".")[0] for m in sys.modules} & set(BLOCKED)
        )
        print(json.dumps({"loaded": loaded}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: regionvault" in result.stdout
    assert "local:east" in result.stdout
    assert json.loads(result.stdout.splitlines()[-1]) == {"loaded": []}


def test_core_does_not_import_providers_or_sdks_on_its_own(tmp_path: Path) -> None:
    result = run_blocked(
        """
        import regionvault.core

        bad = sorted(m for m in sys.modules if m.startswith("regionvault.providers."))
        print(bad)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_wheel_holds_every_package_entry_point_and_type_marker(tmp_path: Path) -> None:
    """Build the wheel (no network, no build isolation) from a copy of the source tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("core", "providers", "plugins"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    out = tmp_path / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("regionvault-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        entry_text = zf.read(entry_points).decode()
        metadata_text = zf.read(metadata).decode()
    for module in (
        "regionvault/core/__init__.py",
        "regionvault/core/cli/__init__.py",
        "regionvault/core/cli/backup.py",
        "regionvault/core/plugins.py",
        "regionvault/providers/local/plugin.py",
        "regionvault/providers/local/provider.py",
        "regionvault/plugins/__init__.py",
        "regionvault/core/py.typed",
        "regionvault/providers/py.typed",
    ):
        assert module in names, f"{module} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "docs/")) for n in names)
    assert "regionvault = regionvault.core.cli:main" in entry_text
    assert "local = regionvault.providers.local.plugin" in entry_text
    # the commands, the demo's included, come through their entry-point group
    assert "[regionvault.cli]" in entry_text
    assert "backup = regionvault.core.cli.backup:backup" in entry_text
    assert "demo = regionvault.plugins.samplenf.demo:demo" in entry_text
    # cloud SDKs are extras only, never plain requirements
    for line in metadata_text.splitlines():
        if line.startswith("Requires-Dist:") and any(
            sdk in line for sdk in ("boto3", "azure-", "google-cloud")
        ):
            assert "extra ==" in line, line
