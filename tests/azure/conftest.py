"""Fixtures of the Azure provider's tests: the real azure-storage-blob SDK over HTTP against
Azurite on 127.0.0.1 with two storage accounts, ``east`` and ``west`` (two regions), started
once per session by the provider's own launcher (which installs the pinned Azurite with
``npm ci`` on first use) and stopped by its PID.

Without npm (and no ``azurite-blob`` on PATH) every test that needs Azurite fails with the
launcher's one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from azure_world import AzureWorld
from regionvault.providers.azure.azurite import AzuriteServer, AzuriteUnavailable
from regionvault.providers.azure.conformance import ACCOUNTS, key_variable


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    pytest.importorskip(
        "azure.storage.blob",
        reason="the Azure tests need azure-storage-blob: pip install -e '.[test]'",
    )
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
    azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[AzureWorld]:
    """The session's Azurite with its account keys in the environment for the test only;
    containers named for the test."""
    for account in ACCOUNTS:
        monkeypatch.setenv(key_variable(account), azurite.accounts[account])
    world = AzureWorld(azurite, tmp_path)
    try:
        yield world
    finally:
        world.close()
