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
from pathlib import Path

import pytest
from conformance_run import run_suite
from regionvault.providers.aws.conformance import MOTO_LAUNCHED_DATA
from regionvault.providers.aws.testing import DUMMY_CREDENTIALS, LIVE_ENV, live_mode

#: the suite had 45 tests that pass on this provider (and 7 skipped by its capabilities)
#: when this was written; a run that passes fewer has lost tests, not gained a pass
MIN_PASSED = 40
#: seconds for the whole child run (it takes about 10 s against moto on 2 cores)
SUITE_TIMEOUT = 240
REGIONS = ("aws:us-east-1", "aws:eu-west-1")
#: tests that must be among the passed ones: the pipeline across the two regions, the
#: block launch (and the discard of a failed one), and the key isolation between them
#: (the two that capture a launched instance run live only: on moto they are skipped with
#: the provider's reason, providers/aws/conformance.py LAUNCHED_DATA_TESTS)
LAUNCHED_DATA = (
    "test_pipeline.py::TestPipeline::test_backup_copy_restore_launch_and_retain",
    "test_compute.py::TestCompute::test_launch_from_restored_data[blocks]",
)
MUST_PASS = (
    *(LAUNCHED_DATA if live_mode() else ()),
    "test_compute.py::TestCompute::test_a_discarded_sink_cannot_be_launched[blocks]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[A-to-B]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[B-to-A]",
)


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


@pytest.mark.slow
def test_conformance_suite_passes_with_aws_in_two_regions(tmp_path: Path) -> None:
    pytest.importorskip("boto3", reason="the AWS tests need boto3: pip install -e '.[test]'")
    if not live_mode():
        pytest.importorskip("moto", reason="the AWS tests need moto[server]")
    run = run_suite(
        "aws",
        tmp_path,
        env=_child_env(tmp_path),
        timeout=SUITE_TIMEOUT,
        test_timeout=120,
        min_passed=MIN_PASSED,
        must_pass=MUST_PASS,
        regions=REGIONS,
        extra_args=[f"--regionvault-regions={','.join(REGIONS)}"],
    )
    if not live_mode():
        # the suite ran on a moto server it started itself (its log is in the run's tmp dir)
        logs = list(run.basetemp.glob("*/moto-server.log"))
        assert logs, f"no moto server log under {run.basetemp}: the run used another server"
        # what moto cannot show is skipped with its reason, not checked against the restored
        # snapshot in the instance's place
        skipped = run.skipped_saying(MOTO_LAUNCHED_DATA)
        # the summary names where each test skipped: the block launch test's class lives in
        # conformance/compute.py, the pipeline test in conformance/test_pipeline.py
        for where in ("conformance/compute.py:", "conformance/test_pipeline.py:"):
            assert any(where in line for line in skipped), run.tail
