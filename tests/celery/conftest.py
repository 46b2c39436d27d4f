"""The fixtures of tests/celery: one private redis-server for the session (Debian's
redis-server on 127.0.0.1, a free port, persistence off, stopped by PID at the end), and the
ledger contract's ``ledgers`` fixture (a ``celery_world.LedgerKind``), which makes ledgers
sharing one store: JobLedger's state directory, or RedisLedger's server and namespace.
Without redis-server, and no way to install it here (root with apt-get), every test that
needs it skips with the one line of ``install()``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip(
    "redis", reason="the celery tests need redis-py: pip install -e '.[test]' (or '.[celery]')"
)

from celery_world import LedgerKind
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.plugins.celery import redis_server
from regionvault.plugins.celery.ledger import RedisLedger
from regionvault.plugins.celery.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_binary() -> None:
    """redis-server is here, installed now when it can be (as root with apt-get)."""
    if redis_server.missing() is not None:
        line = redis_server.install()
        if redis_server.missing() is not None:
            pytest.skip(line)


@pytest.fixture(scope="session")
def redis(redis_binary: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server. A test that stops or restarts a server uses its own."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
    assert not server.running


@pytest.fixture(params=["file", "redis"])
def ledgers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerKind]:
    """A maker of ledgers sharing one store: each call is another runner's view of it."""
    if request.param == "file":
        state = tmp_path / "state"
        yield LedgerKind(
            "file",
            ("file", str(state), ""),
            True,
            lambda lock_ttl: JobLedger(state, lock_ttl=lock_ttl),
        )
        return
    server: RedisServer = request.getfixturevalue("redis")
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    made: list[RedisLedger] = []

    def make(lock_ttl: timedelta) -> RedisLedger:
        ledger = RedisLedger(server.url, namespace=namespace, lock_ttl=lock_ttl, timeout=5)
        made.append(ledger)
        return ledger

    yield LedgerKind("redis", ("redis", server.url, namespace), False, make)
    for ledger in made:
        ledger.close()
