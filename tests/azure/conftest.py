"""Fixtures of the Azure provider's tests: the real azure-storage-blob SDK over HTTP against
Azurite on 127.0.0.1 with two storage accounts, ``east`` and ``west`` (two regions), started
once per session by the provider's own launcher (which installs the pinned Azurite with
``npm ci`` on first use) and stopped by its PID.

Without npm (and no ``azurite-blob`` on PATH) every test that needs Azurite fails with the
launcher's one-line reason.

Live (``REGIONVAULT_AZURE_LIVE=1``, providers/azure/testing.py): the ``azure`` world is the two
real storage accounts of the environment, reached with the regions' identity, each test's
containers deleted after it; tests that need Azurite itself (its account keys, the ARM fake
over it, its HTTPS OAuth mode) are skipped saying so, and the Key Vault suite runs against
the real vaults (test_azure_keyvault.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure_compute_world import ArmWorld
from azure_world import AzureWorld
from regionvault.core.errors import ConfigError
from regionvault.providers.azure.azurite import AzuriteServer, AzuriteUnavailable
from regionvault.providers.azure.conformance import ACCOUNTS, key_variable
from regionvault.providers.azure.fakes.arm import ArmFake
from regionvault.providers.azure.testing import LiveSettings, live_mode

#: why a test of the offline stack does not run live
OFFLINE_ONLY = (
    "offline only (REGIONVAULT_AZURE_LIVE=1): this test runs on Azurite or the ARM fake; "
    "live mode covers the same through the conformance suite and the live world"
)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    pytest.importorskip(
        "azure.storage.blob",
        reason="the Azure tests need azure-storage-blob: pip install -e '.[test]'",
    )
    if live_mode():
        pytest.skip(OFFLINE_ONLY)
    workdir = tmp_path_factory.mktemp("azurite")
    server = AzuriteServer(dict.fromkeys(ACCOUNTS), log=workdir / "azurite.log", workdir=workdir)
    try:
        server.start()
    except AzuriteUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azure(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[AzureWorld]:
    """The session's Azurite with its account keys in the environment for the test only;
    containers named for the test. Live: the environment's two storage accounts through the
    regions' identity, the test's containers deleted after it."""
    if live_mode():
        pytest.importorskip("azure.storage.blob", reason="the Azure tests need the Azure SDK")
        try:
            live = LiveSettings.from_environment()
        except ConfigError as exc:
            pytest.fail(str(exc), pytrace=False)
        world = AzureWorld(None, tmp_path, live=live)
        try:
            yield world
        finally:
            world.close()
        return
    azurite: AzuriteServer = request.getfixturevalue("azurite")
    for account in ACCOUNTS:
        monkeypatch.setenv(key_variable(account), azurite.accounts[account])
    world = AzureWorld(azurite, tmp_path)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def world(azurite: AzuriteServer, tmp_path: Path) -> Iterator[ArmWorld]:
    """An ARM fake whose disks are page blobs in the first Azurite account (a container of
    its own), and the SDK clients a test reaches it with."""
    account = sorted(azurite.accounts)[0]
    url = azurite.account_url(account)
    fake = ArmFake(
        blob_endpoint=url,
        account=account,
        account_key=azurite.accounts[account],
        workdir=tmp_path / "arm",
        container=f"disks-{uuid.uuid4().hex[:12]}",
    )
    with fake:
        arm_world = ArmWorld(fake, url)
        try:
            yield arm_world
        finally:
            arm_world.close()
