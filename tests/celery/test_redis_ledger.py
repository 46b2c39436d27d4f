"""RedisLedger on its own: what it keeps in Redis (records without expiry, locks with one),
execute_job through it, and a Redis that is down, restarted or stalled: a TransientError
within a bounded time, never a hang, and the password never in a message."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_py
from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.pipeline.executor import ThreadExecutor, execute_job
from regionvault.core.pipeline.jobs import Job, JobHandlers, JobStatus, backup_job
from regionvault.plugins.celery import RedisLedger as LazyRedisLedger
from regionvault.plugins.celery.ledger import RedisLedger, redact_url
from regionvault.plugins.celery.redis_server import RedisServer

SLOT = datetime(2026, 11, 25, tzinfo=UTC)
KEY = "backup/local:east/i-abc/2026-11-25T00:00Z"


def job() -> Job:
    return backup_job("local:east", "i-abc", SLOT)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ledger(redis: RedisServer, namespace: str) -> Iterator[RedisLedger]:
    with RedisLedger(redis.url, namespace=namespace) as made:
        yield made


@pytest.fixture
def own_redis(redis_binary: None, tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to stop, restart or pause."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def raw(server: RedisServer) -> redis_py.Redis:
    return redis_py.Redis.from_url(server.url, socket_timeout=5)


def test_the_package_loads_the_ledger_on_first_use() -> None:
    assert LazyRedisLedger is RedisLedger


def test_a_job_run_twice_is_recorded_once(
    redis: RedisServer, ledger: RedisLedger, namespace: str
) -> None:
    runs: list[str] = []

    def handler(job: Job) -> dict[str, str]:
        runs.append(job.key)
        return {"recovery_point": "rp-1"}

    handlers = JobHandlers({"backup": handler})
    with ThreadExecutor(handlers, ledger) as executor:
        first = executor.run([job()])[0]
    # another worker, on another machine as far as it knows: its own client, the same Redis
    with RedisLedger(redis.url, namespace=namespace) as other:
        second = execute_job(job(), handlers, other)
        assert [o.key for o in other.finished()] == [KEY]
    assert (first.status, second.status) == (JobStatus.DONE, JobStatus.REPLAYED)
    assert second.result == {"recovery_point": "rp-1"} and runs == [KEY]
    client = raw(redis)
    keys = sorted(k.decode() for k in client.scan_iter(f"{namespace}:*"))
    assert keys == [f"{namespace}:done:{KEY}", f"{namespace}:finished"]
    assert client.ttl(f"{namespace}:done:{KEY}") == -1  # kept until pruned or forgotten
    assert json.loads(client.get(f"{namespace}:done:{KEY}"))["status"] == "done"


def test_the_lock_in_redis_names_its_holder_and_expires(
    redis: RedisServer, ledger: RedisLedger, namespace: str
) -> None:
    lock = ledger.acquire(KEY)
    assert lock is not None
    try:
        client = raw(redis)
        body = json.loads(client.get(f"{namespace}:lock:{KEY}"))
        assert body["token"] == lock.token and body["key"] == KEY
        assert body["runner"] == f"{os.uname().nodename}:{os.getpid()}"
        assert body["host"] == os.uname().nodename and body["pid"] == os.getpid()
        assert body["process_start"].isdigit()
        assert 0 < client.pttl(f"{namespace}:lock:{KEY}") <= 5 * 60 * 1000
    finally:
        lock.release()
    assert client.exists(f"{namespace}:lock:{KEY}") == 0


def test_namespaces_are_apart(redis: RedisServer, ledger: RedisLedger) -> None:
    execute_job(job(), JobHandlers({"backup": lambda job: 1}), ledger)
    with RedisLedger(redis.url, namespace="elsewhere-" + uuid.uuid4().hex[:8]) as other:
        assert other.record(KEY) is None
        lock = other.acquire(KEY)
        assert lock is not None
        lock.release()


def test_a_record_that_cannot_be_read_runs_the_job_again(
    redis: RedisServer, ledger: RedisLedger, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw(redis).set(f"{namespace}:done:{KEY}", b"{not json")
    with caplog.at_level(logging.WARNING):
        assert ledger.record(KEY) is None
    assert "ignoring unreadable job record" in caplog.text
    assert execute_job(job(), JobHandlers({"backup": lambda job: 1}), ledger).ok


def test_bad_settings_are_refused() -> None:
    with pytest.raises(RegionVaultError, match="lock_ttl must be positive"):
        RedisLedger("redis://127.0.0.1:1/0", lock_ttl=timedelta(0))
    with pytest.raises(RegionVaultError, match="namespace"):
        RedisLedger("redis://127.0.0.1:1/0", namespace="a b")
    with pytest.raises(RegionVaultError, match="bad Redis URL") as caught:
        RedisLedger("http://:secret@127.0.0.1:1/0")
    assert "secret" not in str(caught.value)


def test_urls_lose_their_password() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:s3cret@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert "s3cret" not in redact_url("unix:///run/redis.sock?db=0&password=s3cret")


# --------------------------------------------------------------------------- faults


def test_a_redis_that_is_down_gives_transient_errors_at_once(
    own_redis: RedisServer, namespace: str
) -> None:
    url = own_redis.url.replace("redis://", "redis://:pa55word@")
    ledger = RedisLedger(url, namespace=namespace, timeout=2)
    own_redis.stop()
    for call in (
        lambda: ledger.record(KEY),
        lambda: ledger.acquire(KEY),
        lambda: ledger.holder(KEY),
        lambda: ledger.prune(datetime.now(UTC)),
        lambda: execute_job(job(), JobHandlers({"backup": lambda job: 1}), ledger),
    ):
        start = time.monotonic()
        with pytest.raises(TransientError) as caught:
            call()
        assert time.monotonic() - start < 5
        message = str(caught.value)
        assert "pa55word" not in message and ":***@127.0.0.1" in message, message
    ledger.close()


def test_a_restarted_redis_is_reached_again_and_a_lock_it_lost_is_lost(
    own_redis: RedisServer, namespace: str
) -> None:
    ledger = RedisLedger(own_redis.url, namespace=namespace, timeout=2)
    lock = ledger.acquire(KEY)
    assert lock is not None
    own_redis.stop()
    with pytest.raises(TransientError):
        lock.renew()
    own_redis.start()  # the same port, empty: persistence is off
    # the client's pooled connection died with the server; the ledger reconnects by itself
    assert lock.renew() is False  # the lock went with the data: it is not ours any more
    assert ledger.record(KEY) is None
    other = ledger.acquire(KEY)
    assert other is not None
    lock.release()  # the old holder releases nothing of the new holder's
    assert ledger.holder(KEY) is not None
    assert other.renew() is True
    other.release()
    ledger.close()


def test_a_stalled_redis_times_out_instead_of_hanging(
    own_redis: RedisServer, namespace: str
) -> None:
    ledger = RedisLedger(own_redis.url, namespace=namespace, timeout=0.5)
    ledger.ping()
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        start = time.monotonic()
        with pytest.raises(TransientError, match="Timeout"):
            ledger.record(KEY)
        assert time.monotonic() - start < 5
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert ledger.record(KEY) is None  # answered again
    ledger.close()


def test_a_release_that_cannot_reach_redis_is_logged_and_expires(
    own_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = RedisLedger(own_redis.url, namespace=namespace, timeout=1)
    lock = ledger.acquire(KEY)
    assert lock is not None
    own_redis.stop()
    with caplog.at_level(logging.WARNING):
        lock.release()  # no raise: execute_job's finally must not turn a result into an error
    assert "releasing the lock of job" in caplog.text and "it expires within" in caplog.text
    ledger.close()


def test_wrong_credentials_are_a_clear_error_not_a_transient_one(
    redis: RedisServer, namespace: str
) -> None:
    url = redis.url.replace("redis://", "redis://nobody:wr0ng@")
    with (
        RedisLedger(url, namespace=namespace, timeout=2) as ledger,
        pytest.raises(RegionVaultError) as caught,
    ):
        ledger.record(KEY)
    assert not isinstance(caught.value, TransientError)
    message = str(caught.value)
    assert "wr0ng" not in message and "nobody:***@127.0.0.1" in message, message


def test_the_server_is_private_and_stopped(redis_binary: None, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")
    with server:
        pid = server.pid
        assert pid is not None and server.url.startswith("redis://127.0.0.1:")
        client = raw(server)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_finished_lists_the_newest_records_first(ledger: RedisLedger) -> None:
    handlers = JobHandlers({"backup": lambda job: job.payload["n"]})
    jobs = [backup_job("local:east", f"i-{n}", SLOT, {"n": n}) for n in range(5)]
    for j in jobs:
        execute_job(j, handlers, ledger)
    newest = ledger.finished(limit=3)
    assert [o.result for o in newest] == [4, 3, 2]
    since = newest[1].finished_at
    assert since is not None
    assert [o.result for o in ledger.finished(since=since)] == [4, 3]
    assert ledger.prune(since) == 3
    assert [o.result for o in ledger.finished()] == [4, 3]
    with pytest.raises(RegionVaultError, match="no time zone"):
        ledger.prune(datetime(2026, 1, 1))


def test_a_lock_whose_reply_was_lost_is_still_ours(
    redis: RedisServer, ledger: RedisLedger, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a SET NX that took the lock, but whose reply timed out, is sent again by the client's
    # retry: the second finds the first's lock, which carries this very token
    from regionvault.plugins.celery import ledger as module

    monkeypatch.setattr(module.secrets, "token_hex", lambda n: "t0ken")
    raw(redis).set(f"{namespace}:lock:{KEY}", json.dumps({"key": KEY, "token": "t0ken"}), px=60000)
    lock = ledger.acquire(KEY)
    assert lock is not None and lock.token == "t0ken"
    lock.release()
    assert ledger.holder(KEY) is None
    raw(redis).set(f"{namespace}:lock:{KEY}", json.dumps({"key": KEY, "token": "other"}), px=60000)
    assert ledger.acquire(KEY) is None


def test_a_redis_lost_while_the_job_runs_fails_the_job_and_the_next_run_repeats_it(
    own_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = RedisLedger(own_redis.url, namespace=namespace, timeout=1)
    runs: list[str] = []

    def handler(job: Job) -> str:
        runs.append(job.key)
        if len(runs) == 1:
            own_redis.stop()  # the work is done; its record cannot be written
        return "rp-1"

    handlers = JobHandlers({"backup": handler})
    with caplog.at_level(logging.WARNING):
        failed = execute_job(job(), handlers, ledger)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and "recording its result failed" in failed.error
    assert "ConnectionError" in failed.error  # (the core wraps it in a RegionVaultError)
    own_redis.start()
    assert execute_job(job(), handlers, ledger).status is JobStatus.DONE
    assert runs == [KEY, KEY]  # run again, as a lost record always is (handlers are idempotent)
    ledger.close()
