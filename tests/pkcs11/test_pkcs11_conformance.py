"""The provider conformance suite against the pkcs11 provider, run as CI runs it and as a
provider author would::

    python -m pytest --pyargs regionvault.core.conformance --regionvault-provider=pkcs11

in a child process of its own, from a directory outside the project. The provider's support
(providers/pkcs11/conformance.py) makes two SoftHSM tokens and a composed site: each region's
keys from pkcs11, its compute and vault from the local provider.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conformance_run import run_suite
from regionvault.providers.pkcs11.softhsm import missing

pytest.importorskip("pkcs11", reason="the pkcs11 tests need python-pkcs11")

MIN_PASSED = 40
MUST_PASS = (
    "test_keys.py::TestKeyService::test_data_key_round_trips_with_its_context",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[A-to-B]",
    "test_keys.py::TestKeyService::test_isolation_no_region_unwraps_another_regions_data_key[B-to-A]",
    "test_keys.py::TestKeyService::test_isolation_sealed_for_one_region_unseals_only_there[A-to-B]",
    "test_keys.py::TestKeyService::test_isolation_sealed_for_one_region_unseals_only_there[B-to-A]",
    "test_keys.py::TestKeyService::test_sealed_in_another_process_unseals_only_here",
    "test_keys.py::TestKeyService::test_rotation_keeps_old_material_readable",
    "test_keys.py::TestKeyService::test_unwrap_of_altered_bytes_is_denied",
    "test_transit.py::TestTransit::test_sealed_payload_reaches_b_and_opens_only_there",
    "test_pipeline.py::TestPipeline::test_backup_copy_restore_launch_and_retain",
)


@pytest.mark.slow
def test_conformance_suite_passes_with_pkcs11_keys_in_two_regions(tmp_path: Path) -> None:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "REGIONVAULT_"))}
    env.pop("SOFTHSM2_CONF", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    run = run_suite(
        "pkcs11",
        tmp_path,
        env=env,
        timeout=300,
        test_timeout=120,
        min_passed=MIN_PASSED,
        must_pass=MUST_PASS,
        regions=("pkcs11:east", "pkcs11:west"),
    )
    sites = {path.resolve() for path in run.basetemp.glob("*/site.toml")}
    assert len(sites) == 1, f"not one test site under {run.basetemp}: {sites}"
    site = sites.pop().read_text(encoding="utf-8")
    # a composed site: keys from pkcs11, compute and vault from local, no PIN in the file
    assert site.count("token_label = ") == 2
    assert site.count('provider = "local"') == 4
    assert "pin =" not in site and "4711" not in site
