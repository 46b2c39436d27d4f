"""The provider conformance suite against the GCP provider, run as CI runs it and as a
provider author would::

    python -m pytest --pyargs regionvault.core.conformance --regionvault-provider=gcp

in a child process of its own (its own session, a bounded time), from a directory outside the
project. The provider's conformance support (providers/gcp/conformance.py) starts one
gcp-storage-emulator (four buckets: two vaults, two inboxes), two Cloud KMS fakes (gRPC) and
two Compute Engine fakes (REST), all on 127.0.0.1; this test checks that the run was
self-contained (nothing left running afterwards), that it passed (pytest's exit status, its
summary line, the Vault, Transit, KeyService, Compute and pipeline tests by name) and that
the WORM enforcement tests were skipped with the emulator's reason, not passed.

With ``REGIONVAULT_GCP_LIVE=1`` the child runs against real GCP, two regions described by
the environment (providers/gcp/testing.py), which it is handed along with the login
variables; the checks of the offline stack are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conformance_run import run_suite
from regionvault.providers.gcp.conformance import WORM_TESTS
from regionvault.providers.gcp.testing import LIVE_ENV, LiveSettings, live_mode

pytest.importorskip("google.cloud.kms", reason="the GCP tests need google-cloud-kms")

#: at least this many tests must pass on the offline site
MIN_PASSED = 40
#: seconds for the whole child run offline
SUITE_TIMEOUT = 300
#: live: instances, disks and snapshots on GCE take minutes each
LIVE_TIMEOUT = 4 * 3600
MUST_PASS = (
    "test_compute.py::TestCompute::test_list_pages_through_every_instance_once",
    "test_compute.py::TestCompute::test_capture_holds_the_instance_data[blocks]",
    "test_compute.py::TestCompute::test_launch_from_restored_data[blocks]",
    "test_compute.py::TestCompute::test_a_discarded_sink_cannot_be_launched[blocks]",
    "test_pipeline.py::TestPipeline::test_backup_copy_restore_launch_and_retain",
    "test_vault.py::TestVault::test_if_absent_race_has_exactly_one_winner",
    "test_vault.py::TestVault::test_put_is_atomic_for_concurrent_readers",
    "test_vault.py::TestVault::test_ranged_get",
    "test_transit.py::TestTransit::test_sealed_payload_reaches_b_and_opens_only_there",
    "test_transit.py::TestTransit::test_resume_asks_what_already_arrived",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[A-to-B]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[B-to-A]",
    "test_keys.py::TestKeyService::test_sealed_in_another_process_unseals_only_here",
    "test_keys.py::TestKeyService::test_rotation_keeps_old_material_readable",
)


def _child_env(live: bool) -> dict[str, str]:
    """The caller's environment without what would steer the child: no pytest options, no
    regionvault variables (the provider's own site and servers are used), and offline no
    Google login variables; live, the REGIONVAULT_GCP_* and GOOGLE_* ones."""

    def kept(name: str) -> bool:
        if live and name.startswith("REGIONVAULT_GCP_"):
            return True
        if name.startswith(("PYTEST_", "REGIONVAULT_")):
            return False
        return live or not name.startswith(("GOOGLE_", "CLOUDSDK_"))

    env = {k: v for k, v in os.environ.items() if kept(k)}
    if live:
        env[LIVE_ENV] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.mark.slow
def test_conformance_suite_passes_with_gcp_in_two_regions(tmp_path: Path) -> None:
    live = live_mode()
    if live:
        LiveSettings.from_environment()  # one line naming what is missing, before the run
    run = run_suite(
        "gcp",
        tmp_path,
        env=_child_env(live),
        timeout=LIVE_TIMEOUT if live else SUITE_TIMEOUT,
        test_timeout=1800 if live else 120,
        min_passed=MIN_PASSED,
        must_pass=MUST_PASS,
        regions=("gcp:east", "gcp:west"),
    )
    if live:
        return
    for name in WORM_TESTS:
        assert not any(name in p for p in run.passed), f"{name} passed against the emulator"
    skipped = run.skipped_saying("gcp-storage-emulator drops object retention")
    assert len(skipped) >= len(WORM_TESTS), f"the WORM tests were not skipped so:\n{run.tail}"
    sites = {path.resolve() for path in run.basetemp.glob("*/site.toml")}
    assert len(sites) == 1, f"not one test site under {run.basetemp}: {sites}"
    site = sites.pop().read_text(encoding="utf-8")
    assert 'provider = "local"' not in site, "a test region took a service from another provider"
    for key in ("compute_endpoint", "kms_endpoint", "storage_endpoint"):
        assert site.count(f"{key} = ") == 2, f"the test regions do not both set {key}"
