"""Fixtures of the AWS provider's tests: the real boto3 SDK over HTTP against a moto server
on 127.0.0.1 (started once per session on a free port, reset before each test), or, with
``REGIONVAULT_AWS_LIVE=1`` and credentials, against real AWS.

The tests use the two regions us-east-1 and eu-west-1. Skipped, with the reason, when boto3 or
moto is not installed (``pip install -e '.[test]'`` installs both).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aws_world import AwsWorld
from regionvault.providers.aws.testing import (
    DUMMY_CREDENTIALS,
    LIVE_ENV,
    MotoServer,
    live_mode,
)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer | None]:
    """The moto server for the whole session (its log in the session's tmp dir), or None in
    live mode."""
    pytest.importorskip("boto3", reason="the AWS tests need boto3: pip install -e '.[test]'")
    if live_mode():
        import boto3

        if boto3.session.Session().get_credentials() is None:
            pytest.skip(f"{LIVE_ENV}=1 but no AWS credentials were found")
        yield None
        return
    pytest.importorskip("moto", reason="the AWS tests need moto[server]: pip install -e '.[test]'")
    log = tmp_path_factory.mktemp("moto") / "moto-server.log"
    with MotoServer(log=log) as server:
        yield server


@pytest.fixture
def aws(
    moto_server: MotoServer | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[AwsWorld]:
    """A clean moto (reset before the test) with dummy credentials in the environment for
    the test only; in live mode the real credential chain and unique resource names."""
    if moto_server is not None:
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in DUMMY_CREDENTIALS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        moto_server.reset()
    world = AwsWorld(moto_server.endpoint if moto_server else None, tmp_path)
    try:
        yield world
    finally:
        world.close()
