"""The edge kill -9 trials (edge_kill_cases.py), run in a child pytest process of their own:
SoftHSM reads its configuration once per process, and the trials build SoftHSM tokens of
their own (through the openstack provider's conformance support), which would leave
tests/pkcs11's session tokens unreachable in a shared process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES = HERE / "edge_kill_cases.py"


@pytest.mark.slow
def test_edge_kill_trials_in_a_process_of_their_own(tmp_path: Path) -> None:
    pytest.importorskip("pkcs11", reason="the edge tests need python-pkcs11")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SOFTHSM2_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(CASES),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "-s",
            f"--basetemp={tmp_path / 'basetemp'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "1 passed" in out, out[-3000:]
