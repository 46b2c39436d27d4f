"""The provider conformance suite against the AWS provider, run as CI runs it and as a
provider author would::

    python -m pytest --pyargs regionvault.core.conformance --regionvault-provider=aws

in a child process of its own (its own session, a bounded time), with the regions us-east-1
and eu-west-1. The provider's conformance support starts its own moto server on 127.0.0.1
and stops it by its PID at the end; this test checks that the run was self-contained (a
server of its own, nothing left running afterwards) and that it passed: pytest's exit status,
its summary line (no failures or errors, at least ``MIN_PASSED`` tests passed, so a run that
silently collected or selected nothing fails) and the suite's key tests by name.

With ``REGIONVAULT_AWS_LIVE=1`` the child runs against real AWS with the caller's credentials.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from regionvault.providers.aws.testing import DUMMY_CREDENTIALS, LIVE_ENV, live_mode

#: the suite had 45 tests that pass on this provider (and 7 skipped by its capabilities)
#: when this was written; a run that passes fewer has lost tests, not gained a pass
MIN_PASSED = 40
#: seconds for the whole child run (it takes about 10 s against moto on 2 cores)
SUITE_TIMEOUT = 240
REGIONS = ("aws:us-east-1", "aws:eu-west-1")
#: tests that must be among the passed ones: the pipeline across the two regions, the
#: block launch (and the discard of a failed one), and the key isolation between them
MUST_PASS = (
    "test_pipeline.py::TestPipeline::test_backup_copy_restore_launch_and_retain",
    "test_compute.py::TestCompute::test_launch_from_restored_data[blocks]",
    "test_compute.py::TestCompute::test_a_discarded_sink_cannot_be_launched[blocks]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[A-to-B]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[B-to-A]",
)
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def _child_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without anything that would steer the child: no pytest
    options, no regionvault variables (so the provider's own site and server are used), and
    against moto no AWS settings but dummy credentials."""
    live = live_mode()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "REGIONVAULT_")) and (live or not k.startswith("AWS_"))
    }
    if live:
        env[LIVE_ENV] = "1"
    else:
        env.update(DUMMY_CREDENTIALS)
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-credentials")
        env["AWS_CONFIG_FILE"] = str(tmp_path / "no-config")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _left_running(session: int) -> list[psutil.Process]:
    """Processes still in the child's session (the run's moto server, say)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.mark.slow
def test_conformance_suite_passes_with_aws_in_two_regions(tmp_path: Path) -> None:
    pytest.importorskip("boto3", reason="the AWS tests need boto3: pip install -e '.[test]'")
    if not live_mode():
        pytest.importorskip("moto", reason="the AWS tests need moto[server]")
    basetemp = tmp_path / "basetemp"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "regionvault.core.conformance",
        "--regionvault-provider=aws",
        f"--regionvault-regions={','.join(REGIONS)}",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        "-W",
        "error",
        "--timeout=120",
        f"--basetemp={basetemp}",
    ]
    child = subprocess.Popen(
        command,
        cwd=tmp_path,  # no project configuration: the suite as an outside author runs it
        env=_child_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=SUITE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        pytest.fail(
            f"the conformance run took over {SUITE_TIMEOUT}s; its output ended:\n"
            + out.decode(errors="replace")[-4000:]
        )
    finally:
        leftovers = _left_running(child.pid)
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
    assert counts.get("passed", 0) >= MIN_PASSED, f"too few tests passed: {summary[-1]}"
    passed = {
        line.split(" ", 1)[1].strip() for line in text.splitlines() if line.startswith("PASSED ")
    }
    missing = [name for name in MUST_PASS if not any(p.endswith(name) for p in passed)]
    assert missing == [], f"not among the passed tests: {missing}\n{tail}"
    a, b = REGIONS
    assert f"regionvault conformance: tested provider aws, regions A={a} B={b}" in text, tail
    if not live_mode():
        # the suite ran on a moto server it started itself (its log is in the run's tmp dir)
        logs = list(basetemp.glob("*/moto-server.log"))
        assert logs, f"no moto server log under {basetemp}: the run used another server"
