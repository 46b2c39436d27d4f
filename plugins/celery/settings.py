"""The ``[executor]`` table of ``kind = "celery"``, checked without Celery installed.

=====================  ===========================================================  ========
key                    meaning                                                      default
=====================  ===========================================================  ========
``broker``             the Celery broker, ``redis://HOST:PORT/DB`` (``rediss://``   required
                       for TLS); never a password in it
``result_backend``     where outcomes come back (same form)                         broker
``password_env``       the environment variable holding Redis's password (ACL       none
                       user: ``username``)
``username``           the Redis ACL user the password is for                       none
``visibility_timeout`` how long a delivered job may go unacknowledged before Redis  ``6h``
                       delivers it again (a killed worker's job comes back then)
``lock_ttl``           how long a job's ledger lock outlives its holder's last      ``5m``
                       renewal (a killed worker's key is free again then)
``queue_timeout``      how long a job may wait for a worker of its region before    ``15m``
                       the tick gives up on it (a region whose workers are all
                       down fails its own jobs, never the others')
``concurrency``        jobs one ``regionvault worker`` runs at once                 ``1``
``run_timeout``        how long the coordinator waits for any one job in all,       see below
                       whatever befalls it (then FAILED, the next tick makes it
                       again); default ``queue_timeout`` + 2 × ``visibility_timeout``
``namespace``          the prefix of the job ledger's keys and of the queues'       ``regionvault``
                       names in Redis (one per site)
=====================  ===========================================================  ========

Why ``6h``: Redis (kombu's transport) delivers a job again when its worker has not
acknowledged it within ``visibility_timeout``; acknowledgement comes at the end of the job
(``acks_late``), so the timeout must exceed the longest job, which is a copy phase moving a
large point: a 1 TiB point over a 100 MB/s link takes about 3 h, and 6 h leaves room for a
slow link. A job delivered again while it still runs does no harm (the second delivery finds
the key's lock held, waits until the holder is done, and replays its record), so a shorter
timeout only costs deliveries; a longer one only makes a killed worker's job wait longer
before another worker of its region takes it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from regionvault.core.durations import parse_duration
from regionvault.core.errors import ConfigError

__all__ = ["DEFAULTS", "EXTRA", "CelerySettings", "parse_settings", "queue_of"]

#: how to install what the celery executor needs
EXTRA = "pip install 'regionvault[celery]'"

DEFAULTS: dict[str, Any] = {
    "visibility_timeout": timedelta(hours=6),
    "lock_ttl": timedelta(minutes=5),
    "queue_timeout": timedelta(minutes=15),
    "concurrency": 1,
    "namespace": "regionvault",
}

_KEYS = frozenset(
    {"broker", "result_backend", "visibility_timeout", "lock_ttl", "queue_timeout", "run_timeout"}
    | {"concurrency", "namespace", "password_env", "username"}
)
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def queue_of(region: str, namespace: str) -> str:
    """The queue of ``region``'s workers of the site whose namespace is ``namespace``:
    ``<namespace>.region.<region>`` (``regionvault.region.aws:us-east-1``), so that two sites
    sharing a Redis never take each other's jobs."""
    return f"{namespace}.region.{region}"


@dataclass(frozen=True)
class CelerySettings:
    broker: str
    result_backend: str
    visibility_timeout: timedelta = DEFAULTS["visibility_timeout"]
    lock_ttl: timedelta = DEFAULTS["lock_ttl"]
    queue_timeout: timedelta = DEFAULTS["queue_timeout"]
    concurrency: int = 1
    namespace: str = "regionvault"
    #: the overall bound of one job's wait; None: ``queue_timeout`` + 2 × ``visibility_timeout``
    run_timeout: timedelta | None = None
    #: the environment variable holding Redis's password, and the ACL user it is for
    password_env: str | None = None
    username: str | None = None
    source: str = "<memory>"

    def _with_login(self, url: str) -> str:
        if self.password_env is None:
            return url
        password = os.environ.get(self.password_env)
        if not password:
            raise ConfigError(
                f"the environment variable {self.password_env} it names is not set",
                file=self.source,
                key="executor.password_env",
            )
        parts = urlsplit(url)
        login = quote(self.username or "", safe="") + ":" + quote(password, safe="")
        # the host as written (an IPv6 one keeps its brackets); a login is refused in the URL
        netloc = f"{login}@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def job_timeout(self) -> timedelta:
        """How long the coordinator waits for one job in all (``run_timeout``)."""
        if self.run_timeout is not None:
            return self.run_timeout
        return self.queue_timeout + 2 * self.visibility_timeout

    def broker_url(self) -> str:
        """The broker's URL with the password from ``password_env`` (never kept here)."""
        return self._with_login(self.broker)

    def backend_url(self) -> str:
        """The result backend's URL with the password from ``password_env``."""
        return self._with_login(self.result_backend)


def _redis_url(value: Any, source: str, key: str) -> str:
    form = "redis://HOST:PORT/DB (rediss:// for TLS)"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a Redis URL, {form}", file=source, key=key)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"not a Redis URL ({exc}): use {form}", file=source, key=key) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"scheme {parts.scheme or '(none)'!r} is not redis or rediss: use {form}",
            file=source,
            key=key,
        )
    if not parts.hostname or port is None:
        raise ConfigError(f"names no host and port: use {form}", file=source, key=key)
    if parts.username or parts.password:
        raise ConfigError(
            "holds a login: secrets are never in site.toml; name the variable holding the "
            "password in executor.password_env (and the ACL user in executor.username)",
            file=source,
            key=key,
        )
    db = parts.path.lstrip("/")
    if not db.isdigit():
        raise ConfigError(f"names no database number: use {form}", file=source, key=key)
    return value


def _duration(value: Any, source: str, key: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError("must be a duration like 90s, 30m or 6h", file=source, key=key)
    try:
        return parse_duration(str(value), bare_unit="s")
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key=key) from None


def parse_settings(settings: Mapping[str, Any], source: str = "<memory>") -> CelerySettings:
    """The settings of ``[executor]`` (its keys but ``kind``) in the site file ``source``;
    :class:`ConfigError` naming ``executor.<key>``."""
    for key in sorted(settings):
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(
                f"unknown key (the celery executor takes {known})",
                file=source,
                key=f"executor.{key}",
            )
    if "broker" not in settings:
        raise ConfigError(
            "missing: the celery executor needs its broker, redis://HOST:PORT/DB",
            file=source,
            key="executor.broker",
        )
    broker = _redis_url(settings["broker"], source, "executor.broker")
    backend = _redis_url(settings.get("result_backend", broker), source, "executor.result_backend")
    durations = {
        key: _duration(settings[key], source, f"executor.{key}") if key in settings else default
        for key, default in DEFAULTS.items()
        if key in ("visibility_timeout", "lock_ttl", "queue_timeout")
    }
    if durations["visibility_timeout"] <= durations["lock_ttl"]:
        raise ConfigError(
            f"must be longer than lock_ttl ({durations['lock_ttl']}): a job delivered again "
            "must find its killed holder's lock already expired, and well longer than the "
            "longest copy",
            file=source,
            key="executor.visibility_timeout",
        )
    run_timeout = None
    if "run_timeout" in settings:
        run_timeout = _duration(settings["run_timeout"], source, "executor.run_timeout")
        if run_timeout <= durations["queue_timeout"]:
            raise ConfigError(
                f"must be longer than queue_timeout ({durations['queue_timeout']})",
                file=source,
                key="executor.run_timeout",
            )
    concurrency = settings.get("concurrency", 1)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(
            f"must be a whole number of at least 1, got {concurrency!r}",
            file=source,
            key="executor.concurrency",
        )
    namespace = settings.get("namespace", "regionvault")
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(
            "must be 1 to 64 letters, digits or _.:-", file=source, key="executor.namespace"
        )
    login: dict[str, str] = {}
    for key in ("password_env", "username"):
        value = settings.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or (key == "password_env" and not _ENV.fullmatch(value)):
            raise ConfigError(
                "must be an environment variable's name" if key == "password_env" else
                "must be a string",
                file=source,
                key=f"executor.{key}",
            )  # fmt: skip
        login[key] = value
    if "username" in login and "password_env" not in login:
        raise ConfigError(
            "needs executor.password_env (the variable holding its password)",
            file=source,
            key="executor.username",
        )
    return CelerySettings(
        broker=broker,
        source=source,
        password_env=login.get("password_env"),
        username=login.get("username"),
        result_backend=backend,
        concurrency=concurrency,
        namespace=namespace,
        run_timeout=run_timeout,
        **durations,
    )
