"""Fixtures shared by the GCP provider's tests: the real google-cloud-storage client against
one gcp-storage-emulator on 127.0.0.1, started once per session by the provider's own
launcher (providers/gcp/emulator.py) and stopped by its PID; tests keep apart by bucket
names unique to each test. The Cloud KMS and Compute Engine fakes are cheap (threads in this
process) and each test that needs them starts its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip(
    "google.cloud.storage",
    reason="the GCP tests need the Google Cloud SDK: pip install -e '.[test]'",
)

from regionvault.providers.gcp.emulator import EmulatorUnavailable, GcsEmulator
from regionvault.providers.gcp.testing import live_mode

#: why a test of the offline stack does not run live
OFFLINE_ONLY = (
    "offline only (REGIONVAULT_GCP_LIVE=1): this test runs on the emulator or the fakes; "
    "live mode covers the same through the conformance suite"
)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """The session's gcp-storage-emulator, behind the precondition front (emulator.py), which
    applies Cloud Storage's ``ifGenerationMatch`` rule the emulator ignores; stopped by its
    PID at the end."""
    if live_mode():
        pytest.skip(OFFLINE_ONLY)
    workdir = tmp_path_factory.mktemp("gcs-emulator")
    emulator = GcsEmulator(log=workdir / "emulator.log", preconditions=True)
    try:
        emulator.start()
    except EmulatorUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield emulator
    finally:
        emulator.stop()
