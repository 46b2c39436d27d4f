"""The provider conformance suite against the openstack provider, run as CI runs it and as
a provider author would::

    python -m pytest --pyargs regionvault.core.conformance --regionvault-provider=openstack

in a child process of its own (its own session, a bounded time), from a directory outside
the project, on the composed edge site the provider's conformance support builds: openstack
compute on the provider's fake clouds, pkcs11 keys on SoftHSM tokens, a libcloud vault on
moto's S3 server, all started and stopped by the run itself.

Checked: nothing left running, the run passed (compute, capture and the pipeline by name),
and the site composed the three providers, naming its secrets by variable only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conformance_run import run_suite

pytest.importorskip("libcloud", reason="the openstack tests need apache-libcloud")
pytest.importorskip("pkcs11", reason="the edge site's keys need python-pkcs11")


def _softhsm_missing() -> str | None:
    from regionvault.providers.pkcs11.softhsm import missing

    return missing()


MIN_PASSED = 40
MUST_PASS = (
    "test_compute.py::TestCompute::test_list_pages_through_every_instance_once",
    "test_compute.py::TestCompute::test_list_filters_by_tag_value_and_by_key",
    "test_compute.py::TestCompute::test_set_tags_and_read_them_back",
    "test_compute.py::TestCompute::test_capture_holds_the_instance_data[blocks]",
    "test_compute.py::TestCompute::test_launch_from_restored_data[blocks]",
    "test_compute.py::TestCompute::test_a_discarded_sink_cannot_be_launched[blocks]",
    "test_compute.py::TestCompute::test_terminated_instance_leaves_the_listings",
    "test_transit.py::TestTransit::test_sealed_payload_reaches_b_and_opens_only_there",
    "test_pipeline.py::TestPipeline::test_backup_copy_restore_launch_and_retain",
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "REGIONVAULT_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.mark.slow
def test_conformance_suite_passes_on_a_composed_edge_site(tmp_path: Path) -> None:
    reason = _softhsm_missing()
    if reason is not None:
        pytest.skip(f"SoftHSM is not available: {reason}")
    run = run_suite(
        "openstack",
        tmp_path,
        env=_child_env(),
        timeout=600,
        test_timeout=180,
        min_passed=MIN_PASSED,
        must_pass=MUST_PASS,
        regions=("openstack:east", "openstack:west"),
    )
    sites = {p.resolve() for p in run.basetemp.glob("*/site.toml")}
    site = next(p for p in sites if "openstack-conformance" in p.read_text(encoding="utf-8"))
    text = site.read_text(encoding="utf-8")
    assert text.count('provider = "pkcs11"') == 2 and text.count('provider = "libcloud"') == 2
    assert 'password_env = "' in text and "password =" not in text
