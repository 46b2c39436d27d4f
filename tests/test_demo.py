"""`regionvault demo` as a user runs it: a subprocess of the console script, green, with the
RPO/RTO/transit line, leaving neither its temporary directory nor a sample network function
behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
SAMPLENF = "regionvault.plugins.samplenf"


def samplenf_processes(under: Path) -> list[psutil.Process]:
    """Sample network functions whose data directory lies under ``under``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if SAMPLENF not in " ".join(proc.info["cmdline"] or []):
                continue
            data_dir = proc.environ().get("REGIONVAULT_DATA_DIR", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if data_dir.startswith(str(under)):
            found.append(proc)
    return found


def stop_leftovers(under: Path) -> list[int]:
    """Stop (so that a failing test leaks nothing) and return the pids of sample network
    functions still running from ``under``."""
    leftovers = samplenf_processes(under)
    for proc in leftovers:
        proc.kill()
    psutil.wait_procs(leftovers, timeout=10)
    return [proc.pid for proc in leftovers]


def run_demo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    env["TMPDIR"] = str(tmp)  # where the demo makes its temporary directory
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp,
    )


def test_the_demo_runs_green_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = run_demo(tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in out + result.stderr
    steps = [line for line in out.splitlines() if re.match(r"\d\. ", line)]
    assert [s[:2] for s in steps] == [f"{i}." for i in range(1, 9)], out
    assert "tagged vcore-1=1-7" in out
    assert "east's keys on west's copy: refused (KeyAccessDenied" in out
    assert "(same as east)" in out and "DIFFERENT" not in out
    (figures,) = [line for line in out.splitlines() if "RPO in west" in line]
    match = re.search(
        r"RPO in west: ([\d.]+)s .*RTO in west: ([\d.]+)s .*transit: ([\d,]+) bytes", figures
    )
    assert match, figures
    assert float(match[1]) >= 0 and float(match[2]) > 0 and int(match[3].replace(",", "")) > 0
    assert out.splitlines()[-1].startswith("demo finished in")

    # its temporary directory is gone, and so are the functions it launched
    assert list(tmp.iterdir()) == []
    assert stop_leftovers(tmp) == []


def test_the_demo_keeps_its_directory_when_asked(tmp_path: Path) -> None:
    where = tmp_path / "demo-dir"
    result = run_demo(tmp_path, "--dir", str(where), "--keep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"kept {where}" in result.stdout
    assert (where / "site.toml").is_file()
    assert stop_leftovers(where) == []  # kept files, but nothing left running


def test_the_demo_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    where = tmp_path / "busy"
    where.mkdir()
    (where / "mine.txt").write_text("keep me")
    result = run_demo(tmp_path, "--dir", str(where))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"regionvault: error: {where} is not empty"]
    assert (where / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--help"])
def test_the_demo_is_listed_with_help(tmp_path: Path, flag: str) -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", flag], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "two-region demo" in result.stdout
