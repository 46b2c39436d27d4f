"""Repository locks: objects under ``locks/``, shared (backup, restore, verify, protect) or
exclusive (prune), created with if-absent puts, refreshed by their holder, stale when not
refreshed for ``lock_ttl`` or when their holder's process is gone (same host).

Acquiring writes the lock first and then looks for conflicting ones; if it finds any, it
removes its own and retries, so two racing processes never both proceed (at worst both back
off and retry after a random delay).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from regionvault.core.errors import (
    IntegrityError,
    LockedError,
    ObjectNotFound,
    RegionVaultError,
)
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._store import Store

__all__ = ["LockInfo", "RepositoryLock", "read_locks", "remove_stale_locks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockInfo:
    name: str
    exclusive: bool
    operation: str
    host: str
    pid: int
    pid_ticks: int | None
    created_at: datetime
    expires_at: datetime
    #: the holder's boot, pid namespace and machine (core/procs.py); None in locks of
    #: earlier versions, which ignore these fields when they read a lock of this one
    boot_id: str | None = None
    pid_ns: int | None = None
    machine: str | None = None

    def stale(self, now: datetime) -> bool:
        if self.expires_at <= now:
            return True
        # a holder nobody here can judge (another host, another pid namespace) is judged by
        # its expiry alone (alive() is None); so is one of another boot: a vault may be shared
        # by machines cloned with one machine id, and breaking a live lock there runs two
        # prunes at once, while waiting out a rebooted holder's lock costs one lock_ttl
        holder = ProcessIdentity(
            self.host, self.pid, self.pid_ticks, self.boot_id, self.pid_ns, self.machine
        )
        return holder.alive(trust_machine_id=False) is False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return (
            f"{kind} lock {self.name} of {self.operation} by pid {self.pid} on {self.host}, "
            f"expires {self.expires_at.isoformat(timespec='seconds')}"
        )

    def encode(self) -> bytes:
        return json.dumps(
            {
                "exclusive": self.exclusive,
                "operation": self.operation,
                "host": self.host,
                "pid": self.pid,
                "pid_ticks": self.pid_ticks,
                "boot_id": self.boot_id,
                "pid_ns": self.pid_ns,
                "machine": self.machine,
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, name: str, body: bytes) -> LockInfo:
        try:
            doc: dict[str, Any] = json.loads(body)
            return cls(
                name=name,
                exclusive=bool(doc["exclusive"]),
                operation=str(doc["operation"]),
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                pid_ticks=None if doc["pid_ticks"] is None else int(doc["pid_ticks"]),
                created_at=datetime.fromisoformat(doc["created_at"]),
                expires_at=datetime.fromisoformat(doc["expires_at"]),
                boot_id=_text(doc.get("boot_id")),
                pid_ns=None if doc.get("pid_ns") is None else int(doc["pid_ns"]),
                machine=_text(doc.get("machine")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(name, f"lock is malformed ({exc})") from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_locks(store: Store, now: datetime) -> tuple[list[LockInfo], list[str]]:
    """``(live locks, stale lock names)``. A lock that cannot be read counts as live until
    the vault's modification time of it is ``lock_ttl`` old."""
    live: list[LockInfo] = []
    stale: list[str] = []
    ttl = store.settings.lock_ttl
    for info in store.vault.list(fmt.LOCK_PREFIX):
        try:
            lock = LockInfo.decode(info.name, store.get_sealed(fmt.ObjectKind.LOCK, info.name))
        except ObjectNotFound:
            continue
        except IntegrityError:
            if info.modified + ttl <= now:
                stale.append(info.name)
            else:
                live.append(
                    LockInfo(info.name, True, "unknown", "?", 0, None, info.modified,
                             info.modified + ttl)
                )  # fmt: skip
            continue
        if lock.stale(now):
            stale.append(lock.name)
        else:
            live.append(lock)
    return live, stale


def delete_lock(store: Store, name: str) -> bool:
    """Delete a lock object, best effort: a lock that cannot be removed now goes stale on
    its own, so no operation fails over it. True when it is gone."""
    try:
        store.vault.delete(name)
    except ObjectNotFound:
        return True
    except Exception as exc:
        log.warning("could not remove lock %s (it will expire): %s", name, exc)
        return False
    return True


def remove_stale_locks(store: Store, names: list[str]) -> int:
    return sum(delete_lock(store, name) for name in names)


class RepositoryLock:
    """One lock held by this process; use as a context manager."""

    def __init__(self, store: Store, *, exclusive: bool, operation: str) -> None:
        self.store = store
        self.exclusive = exclusive
        self.operation = operation
        self.name: str | None = None
        self.stale_removed = 0
        self._ttl: timedelta = store.settings.lock_ttl
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._lost: str | None = None
        self._created = datetime.now(UTC)
        self._mutex = threading.Lock()

    def _info(self, now: datetime) -> LockInfo:
        assert self.name is not None
        me = ProcessIdentity.current()
        return LockInfo(
            name=self.name,
            exclusive=self.exclusive,
            operation=self.operation,
            host=me.host,
            pid=me.pid,
            pid_ticks=me.ticks,
            created_at=self._created,
            expires_at=now + self._ttl,
            boot_id=me.boot,
            pid_ns=me.pid_ns,
            machine=me.machine,
        )

    def _conflicts(self, live: list[LockInfo]) -> list[LockInfo]:
        others = [lock for lock in live if lock.name != self.name]
        return others if self.exclusive else [lock for lock in others if lock.exclusive]

    def acquire(self) -> RepositoryLock:
        deadline = time.monotonic() + self.store.settings.lock_wait.total_seconds()
        delay = 0.05
        while True:
            now = datetime.now(UTC)
            live, stale = read_locks(self.store, now)
            self.stale_removed += remove_stale_locks(self.store, stale)
            conflicts = self._conflicts(live)
            if not conflicts:
                self.name = fmt.lock_name(fmt.new_id())
                self._created = now
                body = self._info(now).encode()
                self.store.put_sealed(fmt.ObjectKind.LOCK, self.name, body, if_absent=True)
                live, _ = read_locks(self.store, datetime.now(UTC))
                conflicts = self._conflicts(live)
                if not conflicts:
                    break
                self._delete_own()
            if time.monotonic() >= deadline:
                raise LockedError(
                    f"repository is locked: {conflicts[0].describe()}",
                    provider=self.store.vault.provider,
                    region=self.store.vault.region,
                )
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        self._refresher = threading.Thread(
            target=self._refresh_loop, name="regionvault-lock-refresh", daemon=True
        )
        self._refresher.start()
        return self

    def _refresh_loop(self) -> None:
        interval = max(0.05, self._ttl.total_seconds() / 4)
        while not self._stop.wait(interval):
            # a failed refresh is retried on the next tick; check() reports a lost lock
            with contextlib.suppress(RegionVaultError):
                self.refresh()

    def refresh(self) -> None:
        with self._mutex:
            if self.name is None or self._lost is not None:
                return
            try:
                self.store.vault.head(self.name)
            except ObjectNotFound:
                self._lost = "another process removed it as stale"
                return
            body = self._info(datetime.now(UTC)).encode()
            self.store.put_sealed(fmt.ObjectKind.LOCK, self.name, body)

    def check(self) -> None:
        """Refresh now and raise :class:`LockedError` if the lock was lost (then another
        process may have pruned what this operation wrote, so it must not commit)."""
        self.refresh()
        with self._mutex:
            lost = self._lost
        if lost is not None:
            raise LockedError(
                f"lost the repository lock {self.name}: {lost}",
                provider=self.store.vault.provider,
                region=self.store.vault.region,
            )

    def _delete_own(self) -> None:
        if self.name is not None:
            delete_lock(self.store, self.name)
            self.name = None

    def release(self) -> None:
        """Stop refreshing and delete the lock (best effort, see :func:`delete_lock`)."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        with self._mutex:
            self._delete_own()

    def __enter__(self) -> RepositoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
