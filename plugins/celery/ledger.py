"""The job ledger in Redis: finished keys and one lock per key, shared by every worker of a
site, whatever machine it runs on (docs/jobs.md, "A shared ledger on Redis").

:class:`RedisLedger` implements the core's ``Ledger`` as :class:`~regionvault.core.pipeline.
ledger.JobLedger` does in files, with these keys under its ``namespace``:

- ``<ns>:done:<key>``: a finished key's outcome (the JSON ``JobOutcome.to_dict()``), kept
  until :meth:`~RedisLedger.forget` or :meth:`~RedisLedger.prune`, or, when marked done with
  ``expires`` (the plan jobs' records), until then (``PEXPIRE``); the index entries of such
  records are listed in ``<ns>:expiring`` (scored by when they expire) and dropped, a
  bounded batch at a time, by the next :meth:`~RedisLedger.mark_done` after that;
- ``<ns>:failed:<key>``: the last failure of a key not yet done (cleared when it is done);
- ``<ns>:finished`` and ``<ns>:failures``: sorted sets of those keys, scored by when each
  finished, so ``prune`` (and a status report) reads the old ones without a scan;
- ``<ns>:lock:<key>``: the key's lock, taken with ``SET NX PX lock_ttl``; its body (JSON)
  names the holder (host, pid, process start, boot, pid namespace, machine, runner) and a
  random token. Only the token's holder renews (``PEXPIRE``) or releases (``DEL``) it, each
  checked and done in one Lua script, so a lock that expired and was taken by another runner
  is never pushed forward or removed by its old holder; a holder that finds its lock gone
  sets the lock's ``lost`` event (the core renews once more before it records the job, and
  records nothing if the lock is gone). While held, a background thread
  renews it every third of ``lock_ttl``, so a live holder keeps it however long the job
  runs; a holder that dies (SIGKILL, a lost machine) leaves it to expire ``lock_ttl`` after
  its last renewal: Redis alone judges, since whether a process on another machine lives
  cannot be told here.

Every Redis failure is raised as :class:`~regionvault.core.errors.TransientError` when it may
pass (no connection, a timeout, a server loading its data or read-only during a failover)
and as a :class:`~regionvault.core.errors.RegionVaultError` otherwise (refused credentials,
a command the server refuses); each names the ledger's URL without its password.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions as rexc
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.pipeline.jobs import JobOutcome
from regionvault.core.pipeline.ledger import RenewingLock, runner_name

if TYPE_CHECKING:
    from regionvault.core.pipeline.ledger import Ledger, LedgerLock
from regionvault.core.procs import ProcessIdentity

__all__ = ["RedisLedger", "RedisLock", "redact_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the lock's token is compared inside Redis, so that checking and acting are one step
_RENEW = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
local ok, lock = pcall(cjson.decode, body)
if not ok or type(lock) ~= 'table' or lock['token'] ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
local ok, lock = pcall(cjson.decode, body)
if not ok or type(lock) ~= 'table' or lock['token'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

#: what may pass if the call is made again a little later
_TRANSIENT: tuple[type[Exception], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.TryAgainError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.MaxConnectionsError,
)
#: a connection error that will not pass by waiting: the server refused who we are
_REFUSED: tuple[type[Exception], ...] = (rexc.AuthenticationError, rexc.AuthorizationError)


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://:***@host:6379/0``), also one given as a
    ``password=`` query parameter."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = quote(parts.username or "", safe="")
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<a Redis URL that cannot be parsed>"


def _utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RegionVaultError(f"{what} {moment.isoformat()} has no time zone (use UTC)")
    return moment.astimezone(UTC)


def _token(body: bytes | str) -> str | None:
    try:
        token = json.loads(body).get("token")
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLock(RenewingLock):
    """A held lock on one job key (see :meth:`RedisLedger.acquire`): a Redis key holding its
    token, renewed by a background thread every third of the ledger's ``lock_ttl``
    (:class:`~regionvault.core.pipeline.ledger.RenewingLock`)."""

    #: Redis unreachable for a moment
    transient = (RegionVaultError,)

    def __init__(self, ledger: RedisLedger, key: str, token: str) -> None:
        self.ledger = ledger
        super().__init__(key, token, ledger.lock_ttl)

    def _renew_once(self) -> bool:
        return self.ledger._renew(self)

    def _release_once(self) -> None:
        """A release that cannot reach Redis is logged, not raised: the lock then expires
        ``lock_ttl`` after its last renewal."""
        try:
            self.ledger._release(self)
        except RegionVaultError as exc:
            log.warning(
                "releasing the lock of job %s failed (it expires within %s): %s",
                self.key,
                self.ledger.lock_ttl,
                exc,
            )


class RedisLedger:
    """Finished jobs and job locks in Redis at ``url`` (``redis://[:password@]host:port/db``,
    ``rediss://`` for TLS, ``unix:///path``), under ``namespace``.

    Every runner of a site that shares one ``url`` and ``namespace`` shares the ledger: a key
    done by one is replayed by all, and a key is run by one at a time. ``lock_ttl`` is how
    long a lock outlives its holder's last renewal; ``timeout`` bounds each call to Redis
    (connect and reply), so a Redis that is down or unreachable gives a
    :class:`TransientError` within a few ``timeout``, never a hang.

    Keep the Redis the ledger lives in persistent (AOF or RDB): a Redis restarted empty has
    forgotten which keys are done, and their jobs run again (they are idempotent, so this
    repeats work, it makes no second recovery point).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "regionvault",
        lock_ttl: timedelta = timedelta(minutes=5),
        timeout: float = 5.0,
    ) -> None:
        if lock_ttl <= timedelta(0):
            raise RegionVaultError(f"lock_ttl must be positive, got {lock_ttl}")
        if not namespace or any(c.isspace() for c in namespace):
            raise RegionVaultError(f"namespace must be a word without spaces, got {namespace!r}")
        if timeout <= 0:
            raise RegionVaultError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.where = redact_url(url)
        self.namespace = namespace
        self.lock_ttl = lock_ttl
        self.timeout = timeout
        try:
            self.client: redis.Redis = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # a connection the pool held across a Redis restart fails once: try it again
                # on a fresh one, briefly; longer outages are the executor's to retry
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                health_check_interval=30,
            )
        except (ValueError, rexc.RedisError) as exc:
            raise RegionVaultError(f"job ledger: bad Redis URL {self.where}: {exc}") from None
        self._renew_script = self.client.register_script(_RENEW)
        self._release_script = self.client.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"RedisLedger({self.where!r}, namespace={self.namespace!r})"

    # ---- Redis calls

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, with Redis's errors turned into the framework's, naming the URL."""
        try:
            return call()
        except _REFUSED as exc:
            raise RegionVaultError(
                f"job ledger at {self.where}: {what}: Redis refused the credentials: "
                f"{self._clean(exc)}"
            ) from None
        except _TRANSIENT as exc:
            raise TransientError(
                f"job ledger at {self.where}: {what}: {type(exc).__name__}: {self._clean(exc)}"
            ) from None
        except rexc.RedisError as exc:
            raise RegionVaultError(
                f"job ledger at {self.where}: {what}: {type(exc).__name__}: {self._clean(exc)}"
            ) from None

    def _clean(self, exc: BaseException) -> str:
        text = str(exc)
        password = self.client.connection_pool.connection_kwargs.get("password")
        if isinstance(password, str) and password:
            text = text.replace(password, "***")
        return text

    def ping(self) -> None:
        """Reach Redis once (raises as every call does)."""
        self._call("ping", self.client.ping)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RedisLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, sub: str, key: str = "") -> str:
        return f"{self.namespace}:{sub}:{key}" if key else f"{self.namespace}:{sub}"

    # ---- records

    def _outcome(self, raw: Any, key: str, where: str) -> JobOutcome | None:
        if raw is None:
            return None
        try:
            outcome = JobOutcome.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            # Written whole in one command, so this is outside damage; running the job again
            # is safe (handlers are idempotent).
            log.warning("ignoring unreadable job record %s at %s: %s", where, self.where, exc)
            return None
        return outcome if outcome.key == key else None

    def record(self, key: str) -> JobOutcome | None:
        """The recorded outcome of a finished key, None if it has not finished."""
        name = self._key("done", key)
        return self._outcome(
            self._call(f"reading {name}", lambda: self.client.get(name)), key, name
        )

    def last_failure(self, key: str) -> JobOutcome | None:
        name = self._key("failed", key)
        return self._outcome(
            self._call(f"reading {name}", lambda: self.client.get(name)), key, name
        )

    @staticmethod
    def _score(outcome: JobOutcome) -> float:
        # a record without a finish time is never old enough to prune, as in JobLedger
        return outcome.finished_at.timestamp() if outcome.finished_at else math.inf

    def mark_done(self, outcome: JobOutcome, *, expires: timedelta | None = None) -> None:
        """Record ``outcome`` as its key's; with ``expires``, the record vanishes after that
        (a plan job's: only the tick that made it replays it)."""
        data = json.dumps(outcome.to_dict(), sort_keys=True, allow_nan=False)
        key = outcome.key
        ms = None if expires is None else max(1, int(expires.total_seconds() * 1000))

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._key("done", key), data, px=ms)
            pipe.zadd(self._key("finished"), {key: self._score(outcome)})
            pipe.delete(self._key("failed", key))
            pipe.zrem(self._key("failures"), key)
            if ms is not None:
                pipe.zadd(self._key("expiring"), {key: time.time() + ms / 1000})
            else:
                pipe.zrem(self._key("expiring"), key)
            pipe.execute()

        self._call(f"recording {key} done", write)
        if ms is not None:
            self._call("dropping expired index entries", self._drop_expired)

    def _drop_expired(self, batch: int = 200) -> int:
        """Drop the index entries of records that expired (at most ``batch``); no MULTI, so
        it works on a Redis out of memory too (DEL and ZREM are allowed there)."""
        keys = self.client.zrangebyscore(
            self._key("expiring"), "-inf", repr(time.time()), start=0, num=batch
        )
        if not keys:
            return 0
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self._key("finished"), *keys)
        pipe.zrem(self._key("expiring"), *keys)
        pipe.execute()
        return len(keys)

    def mark_failed(self, outcome: JobOutcome) -> None:
        data = json.dumps(outcome.to_dict(), sort_keys=True, default=str)
        key = outcome.key

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._key("failed", key), data)
            pipe.zadd(self._key("failures"), {key: self._score(outcome)})
            pipe.execute()

        self._call(f"recording {key} failed", write)

    def forget(self, key: str) -> None:
        """Drop a key's records, so that it runs again. No MULTI (a Redis out of memory
        refuses it): the record goes first, then its index entries."""

        def drop() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self._key("done", key), self._key("failed", key))
            pipe.zrem(self._key("finished"), key)
            pipe.zrem(self._key("failures"), key)
            pipe.zrem(self._key("expiring"), key)
            pipe.execute()

        self._call(f"forgetting {key}", drop)

    #: at most how many records one :meth:`prune` drops (a call's work stays bounded; the
    #: next call goes on)
    PRUNE_LIMIT = 10_000

    def prune(self, older_than: datetime, *, limit: int | None = None) -> int:
        """Drop records of jobs finished before ``older_than`` (at most ``limit``, by default
        :attr:`PRUNE_LIMIT`, a call), and the index entries of expired ones; returns how
        many records it dropped. It uses no MULTI, so it frees memory on a Redis that is out
        of memory (``noeviction`` refuses MULTI there, not DEL or ZREM); a prune cut short
        leaves at worst an index entry without its record, which the next one drops."""
        cutoff = _utc(older_than, "older_than").timestamp()
        budget = self.PRUNE_LIMIT if limit is None else limit

        def drop(sub: str, index: str, budget: int) -> int:
            # the same strictly-before rule as JobLedger; a batch at a time, so a large
            # ledger is never read into memory at once
            seen = removed = 0
            while seen < budget:
                keys = self.client.zrangebyscore(
                    self._key(index), "-inf", f"({cutoff!r}", start=0, num=min(500, budget - seen)
                )
                if not keys:
                    break
                pipe = self.client.pipeline(transaction=False)
                for raw in keys:
                    pipe.delete(self._key(sub, _text(raw)))
                removed += sum(int(n) for n in pipe.execute())
                # the index entries only once their records are gone
                self.client.zrem(self._key(index), *keys)
                seen += len(keys)
            return removed

        def run() -> int:
            self._drop_expired(batch=budget)
            done = drop("done", "finished", budget)
            return done + drop("failed", "failures", max(0, budget - done))

        return self._call("pruning old records", run)

    def finished(self, *, since: datetime | None = None, limit: int = 100) -> list[JobOutcome]:
        """The newest finished keys' records (at most ``limit``), newest first; only those
        finished at or after ``since`` when given. Any machine of the site reads the same."""
        low = "-inf" if since is None else repr(_utc(since, "since").timestamp())

        def read() -> list[JobOutcome]:
            raw_keys = self.client.zrevrangebyscore(
                self._key("finished"), "+inf", low, start=0, num=limit
            )
            keys = [_text(k) for k in raw_keys]
            names = [self._key("done", key) for key in keys]
            values = self.client.mget(names) if names else []
            found = []
            for key, name, raw in zip(keys, names, values, strict=True):
                outcome = self._outcome(raw, key, name)
                if outcome is not None:
                    found.append(outcome)
            return found

        return self._call("listing finished jobs", read)

    def claim(self, name: str, value: str, *, ttl: timedelta) -> str:
        """Set ``<ns>:claim:<name>`` to ``value`` unless it is set (``SET NX``, kept
        ``ttl``); the value it holds afterwards: ``value`` when this call set it, else the
        first claimer's. The Celery executor claims a task id ``started`` (a worker) or
        ``abandoned`` (a coordinator that stopped waiting): exactly one wins."""
        key = self._key("claim", name)
        ms = max(1, int(ttl.total_seconds() * 1000))

        def take() -> str:
            if self.client.set(key, value, nx=True, px=ms):
                return value
            held = self.client.get(key)
            return value if held is None else _text(held)

        return self._call(f"claiming {name}", take)

    def memory_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``, None when the server will not say (a managed Redis
        may refuse ``CONFIG``) or cannot be reached."""
        try:
            got = self.client.config_get("maxmemory-policy")
        except rexc.RedisError:
            return None
        value = got.get("maxmemory-policy") if isinstance(got, dict) else None
        return None if value is None else _text(value)

    def warn_if_evicting(self) -> bool:
        """Log a warning when Redis may evict keys (any policy but ``noeviction``): an evicted
        lock lets a second runner take a key its holder still runs. True if it warned."""
        policy = self.memory_policy()
        if policy is None or policy == "noeviction":
            return False
        log.warning(
            "the Redis at %s has maxmemory-policy %s: it may evict a running job's lock when "
            "full; set maxmemory-policy noeviction (docs/distributed.md, Redis's memory)",
            self.where,
            policy,
        )
        return True

    def holds_message(self, task_id: str, queue: str) -> bool:
        """Whether the broker (kombu's Redis transport, in this same Redis) still holds
        the message of ``task_id``: waiting in ``queue``, or delivered and not acknowledged
        (``unacked``: a dead worker's, to be delivered again after ``visibility_timeout``).
        It reads the whole queue and the unacked hash, so it is for the rare question of a
        started job whose lock is gone, not for every poll."""
        needle = task_id.encode()

        def look() -> bool:
            for _, body in self.client.hscan_iter("unacked", count=500):
                if needle in body:
                    return True
            length = int(self.client.llen(queue))
            for start in range(0, length, 500):
                if any(needle in raw for raw in self.client.lrange(queue, start, start + 499)):
                    return True
            return False

        return self._call(f"looking for task {task_id} in the broker", look)

    # ---- locks

    def _lock_body(self, key: str, token: str) -> str:
        """The lock's body: the fields of JobLedger's lock file (a reader of either finds
        the same names and types), and the runner as outcomes name it."""
        me = ProcessIdentity.current()
        return json.dumps(
            {
                "key": key,
                "token": token,
                "host": me.host,
                "pid": me.pid,
                "process_start": None if me.ticks is None else str(me.ticks),
                "boot_id": me.boot,
                "pid_ns": None if me.pid_ns is None else str(me.pid_ns),
                "machine": me.machine,
                "runner": runner_name(),
                "acquired_at": time.time(),
            },
            sort_keys=True,
        )

    def _ttl_ms(self) -> int:
        return max(1, int(self.lock_ttl.total_seconds() * 1000))

    def acquire(self, key: str) -> RedisLock | None:
        """Take the exclusive lock on ``key``; None while another runner holds it (until it
        releases it, or ``lock_ttl`` after its last renewal)."""
        token = secrets.token_hex(16)
        name = self._key("lock", key)
        body = self._lock_body(key, token)

        def take() -> bool:
            if self.client.set(name, body, nx=True, px=self._ttl_ms()):
                return True
            # A SET whose reply was lost (a timeout) is sent again by the client's retry and
            # then finds the lock its first try took: that lock is ours all the same.
            held = self.client.get(name)
            return held is not None and _token(held) == token

        return RedisLock(self, key, token) if self._call(f"locking {key}", take) else None

    def holder(self, key: str) -> dict[str, Any] | None:
        """Who holds ``key``'s lock (host, pid, runner, ...) and until when (``expires_at``,
        from Redis's own count of what is left), None if nobody."""
        name = self._key("lock", key)

        def read() -> tuple[Any, Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(name)
            pipe.pttl(name)
            body, left = pipe.execute()
            return body, left

        body, left = self._call(f"reading the lock of {key}", read)
        if body is None:
            return None
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError:
            data = {"key": key}
        if isinstance(left, int) and left >= 0:
            data["expires_at"] = time.time() + left / 1000
        return data

    def _renew(self, lock: RedisLock) -> bool:
        name = self._key("lock", lock.key)
        done = self._call(
            f"renewing the lock of {lock.key}",
            lambda: self._renew_script(keys=[name], args=[lock.token, self._ttl_ms()]),
        )
        return bool(done)

    def _release(self, lock: RedisLock) -> None:
        name = self._key("lock", lock.key)
        self._call(
            f"releasing the lock of {lock.key}",
            lambda: self._release_script(keys=[name], args=[lock.token]),
        )


if TYPE_CHECKING:

    def _is_a_ledger(ledger: RedisLedger, lock: RedisLock) -> tuple[Ledger, LedgerLock]:
        return ledger, lock  # mypy holds RedisLedger to the core's protocols
