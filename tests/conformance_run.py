"""Running the provider conformance suite as CI runs it and as a provider author would::

    python -m pytest --pyargs regionvault.core.conformance --regionvault-provider=NAME

in a child process of its own (its own session, a bounded time), from a directory outside the
project, and checking the run (tests/aws, tests/azure and tests/gcp each run it for their
provider): nothing left running in the child's session afterwards, pytest's exit status, its
summary line (no failures or errors, at least ``min_passed`` tests passed, so a run that
silently collected or selected nothing fails), the suite's key tests by name among the passed
ones, and the line that names the provider and the two regions tested.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

__all__ = ["SuiteRun", "left_running", "run_suite"]

_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def left_running(session: int) -> list[psutil.Process]:
    """Processes still in the child's session (a server the run started, say)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@dataclass(frozen=True)
class SuiteRun:
    """A finished, passing run: its whole output, the tests it passed, its basetemp."""

    text: str
    passed: frozenset[str]
    basetemp: Path

    @property
    def tail(self) -> str:
        return self.text[-6000:]

    def skipped_saying(self, reason: str) -> list[str]:
        """The SKIPPED lines of the summary whose reason contains ``reason``."""
        return [
            line for line in self.text.splitlines() if line.startswith("SKIPPED") and reason in line
        ]


def run_suite(
    provider: str,
    tmp_path: Path,
    *,
    env: Mapping[str, str],
    timeout: float,
    test_timeout: int,
    min_passed: int,
    must_pass: Sequence[str],
    regions: tuple[str, str],
    extra_args: Sequence[str] = (),
) -> SuiteRun:
    """Run the suite for ``provider`` in a child with ``env`` (``timeout`` seconds for the
    whole run, ``test_timeout`` for each test) and check it as the module says; fails the
    calling test with the output's end when anything is wrong."""
    basetemp = tmp_path / "basetemp"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "regionvault.core.conformance",
        f"--regionvault-provider={provider}",
        *extra_args,
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        "-W",
        "error",
        f"--timeout={test_timeout}",
        f"--basetemp={basetemp}",
    ]
    child = subprocess.Popen(
        command,
        cwd=tmp_path,  # no project configuration: the suite as an outside author runs it
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        pytest.fail(
            f"the conformance run took over {timeout}s; its output ended:\n"
            + out.decode(errors="replace")[-4000:]
        )
    finally:
        leftovers = left_running(child.pid)
        for process in leftovers:
            process.kill()
    text = out.decode(errors="replace")
    tail = text[-6000:]
    assert leftovers == [], f"the conformance run left processes behind: {leftovers}"
    assert child.returncode == 0, f"pytest exited with {child.returncode}:\n{tail}"
    summary = [line for line in text.splitlines() if re.search(r"\d+ passed", line)]
    assert summary, f"no pytest summary line in the output:\n{tail}"
    counts = {kind.rstrip("s"): int(n) for n, kind in _COUNTS.findall(summary[-1])}
    assert counts.get("failed", 0) == 0 and counts.get("error", 0) == 0, summary[-1]
    assert counts.get("passed", 0) >= min_passed, f"too few tests passed: {summary[-1]}"
    passed = frozenset(
        line.split(" ", 1)[1].strip() for line in text.splitlines() if line.startswith("PASSED ")
    )
    missing = [name for name in must_pass if not any(p.endswith(name) for p in passed)]
    assert missing == [], f"not among the passed tests: {missing}\n{tail}"
    a, b = regions
    assert f"regionvault conformance: tested provider {provider}, regions A={a} B={b}" in text, tail
    return SuiteRun(text, passed, basetemp)
