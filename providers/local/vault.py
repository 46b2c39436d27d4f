"""The local Vault: objects as files, atomic puts, retention and legal hold in sidecars.

On disk, under ``<root>/vault/``:

``VAULT_ID``
    this vault's random id (``v-`` + 32 hex), created once with an if-absent link.
``objects/<name>``
    each object's bytes; the name's '/'-separated parts are directories.
``meta/<name>``
    an object's retention and legal hold (JSON), present only once one was set.
``vault.lock``
    serialises the protection check with the change it guards (put over, delete,
    retention changes) between threads and processes.

Temporary files of in-flight writes (``.rv-tmp-*``) live next to their target; listings skip
them; :meth:`LocalVault.stale_temporaries` finds those a killed writer left (each name
carries its writer's host, pid and start time, so a live writer's file is never taken for
one) and :meth:`LocalVault.remove_temporary` removes them (``verify --repair`` and prune do).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from regionvault.core import names
from regionvault.core.errors import ObjectExists, ObjectNotFound, RetentionLocked, VaultError
from regionvault.core.interfaces import Vault
from regionvault.core.retention import Protection
from regionvault.core.types import Capabilities, ObjectInfo, RetentionMode, Temporary
from regionvault.providers.local import _fs

__all__ = ["LocalVault"]

_VAULT_ID = re.compile(r"^v-[0-9a-f]{32}$")
_NOT_THERE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _encode_protection(p: Protection) -> bytes:
    record: dict[str, Any] = {
        "retain_until": None if p.retain_until is None else p.retain_until.isoformat(),
        "mode": None if p.mode is None else p.mode.value,
        "legal_hold": p.legal_hold,
    }
    return json.dumps(record, sort_keys=True).encode("utf-8")


def _modified(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)


class LocalVault(Vault):
    """One region's object store in ``<root>/vault``."""

    def __init__(
        self, *, root: Path, provider: str, region: str, capabilities: Capabilities
    ) -> None:
        super().__init__(provider=provider, region=region, capabilities=capabilities)
        self.vault_dir = root / "vault"
        self.objects_dir = self.vault_dir / "objects"
        self.meta_dir = self.vault_dir / "meta"
        self._lock = _fs.FileLock(self.vault_dir / "vault.lock")
        self._vault_id: str | None = None

    # helpers -----------------------------------------------------------------------

    def _error(self, message: str) -> VaultError:
        return VaultError(message, provider=self.provider, region=self.region)

    def _not_found(self, name: str) -> ObjectNotFound:
        return ObjectNotFound(name, provider=self.provider, region=self.region)

    def _locked(self, name: str, reason: str) -> RetentionLocked:
        return RetentionLocked(name, reason, provider=self.provider, region=self.region)

    def _path(self, name: str) -> Path:
        problem = names.name_problem(name)
        if problem is not None:
            raise self._error(f"bad object name {name!r}: {problem}")
        return self.objects_dir / name

    def _read_protection(self, name: str) -> Protection | None:
        try:
            raw = (self.meta_dir / name).read_bytes()
        except _NOT_THERE:
            return None
        try:
            record = json.loads(raw)
            until = record["retain_until"]
            mode = record["mode"]
            return Protection(
                retain_until=None if until is None else datetime.fromisoformat(until),
                mode=None if mode is None else RetentionMode(mode),
                legal_hold=bool(record["legal_hold"]),
            )
        except (ValueError, KeyError, TypeError):
            # refuse rather than guess: a damaged record must not unlock anything
            raise self._error(f"retention record of {name!r} is malformed") from None

    def _write_protection(self, name: str, protection: Protection) -> None:
        path = self.meta_dir / name
        try:
            _fs.atomic_write(path, _encode_protection(protection))
        except (NotADirectoryError, FileExistsError):
            raise self._error(f"cannot record retention of {name!r}: name conflict") from None

    def _drop_protection(self, name: str) -> None:
        path = self.meta_dir / name
        try:
            path.unlink()
        except _NOT_THERE:
            return
        _fs.remove_empty_parents(path, self.meta_dir)

    def _info(self, name: str, st: os.stat_result, protection: Protection | None) -> ObjectInfo:
        p = protection or Protection()
        return ObjectInfo(
            name=name,
            size=st.st_size,
            modified=_modified(st),
            retain_until=p.retain_until,
            retention_mode=p.mode,
            legal_hold=p.legal_hold,
        )

    def _stat(self, name: str, path: Path) -> os.stat_result:
        try:
            st = path.stat()
        except _NOT_THERE:
            raise self._not_found(name) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(name)
        return st

    # Vault -------------------------------------------------------------------------

    @property
    def vault_id(self) -> str:
        if self._vault_id is None:
            path = self.vault_dir / "VAULT_ID"
            if not path.exists():
                _fs.ensure_dir(self.vault_dir)
                candidate = f"v-{os.urandom(16).hex()}\n".encode("ascii")
                _fs.atomic_write(path, candidate, if_absent=True)
            text = path.read_text("ascii").strip()
            if not _VAULT_ID.match(text):
                raise self._error(f"{path} does not hold a vault id")
            self._vault_id = text
        return self._vault_id

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        path = self._path(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self._error(f"put {name!r}: data must be bytes, not {type(data).__name__}")
        if path.is_dir():
            raise self._error(f"put {name!r}: other objects' names start with {name + '/'!r}")
        try:
            # created under the lock, so a delete cannot remove its emptied directory between
            # making the directory and creating the file; written outside it
            with self._lock.hold():
                created = _fs.create_temp(path.parent)
            tmp = _fs.write_temp(path.parent, data, created=created)
        except (NotADirectoryError, FileExistsError):
            raise self._error(
                f"put {name!r}: a leading part of the name is itself an object"
            ) from None
        except OSError as exc:
            # disk full, quota, read-only: one line naming the object and the vault's path;
            # the temporary file is gone already (write_temp removes it), so nothing is torn
            raise self._error(f"put {name!r} into {self.objects_dir}: {exc.strerror}") from None
        try:
            with self._lock.hold():
                exists = path.exists()
                if exists and not if_absent:
                    refusal = (self._read_protection(name) or Protection()).refuses_removal(
                        datetime.now(UTC), bypass_governance=False
                    )
                    if refusal is not None:
                        raise self._locked(name, f"{refusal}; it cannot be overwritten")
                if not (exists and if_absent):
                    # a new object starts unprotected; an old record is stale by now
                    self._drop_protection(name)
                published = _fs.publish(tmp, path, if_absent=if_absent, sync_dir=False)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if not published:
            raise ObjectExists(name, provider=self.provider, region=self.region)
        with contextlib.suppress(FileNotFoundError):  # deleted again at once, with its parent
            _fs.fsync_dir(path.parent)
        return self._info(name, path.stat(), None)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if offset < 0 or (length is not None and length < 0):
            raise self._error(f"get {name!r}: bad range offset={offset} length={length}")
        try:
            f = path.open("rb")
        except _NOT_THERE:
            raise self._not_found(name) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                raise self._error(
                    f"get {name!r}: range starts at {offset}, past the end ({size} bytes)"
                )
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def head(self, name: str) -> ObjectInfo:
        path = self._path(name)
        st = self._stat(name, path)
        return self._info(name, st, self._read_protection(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        problem = names.prefix_problem(prefix)
        if problem is not None:
            raise self._error(f"bad list prefix {prefix!r}: {problem}")
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: list[tuple[str, os.stat_result]] = []
        for name, entry in _fs.walk_files(self.objects_dir, prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                found.append((name, entry.stat(follow_symlinks=False)))
        found.sort(key=lambda item: item[0])
        protected = {name for name, _ in _fs.walk_files(self.meta_dir, prefix)}
        for name, st in found:
            protection = self._read_protection(name) if name in protected else None
            yield self._info(name, st, protection)

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        path = self._path(name)
        with self._lock.hold():
            try:
                st = path.lstat()
            except _NOT_THERE:
                self._drop_protection(name)
                return
            if not stat.S_ISREG(st.st_mode):
                return  # a directory of other objects' names, not an object
            refusal = (self._read_protection(name) or Protection()).refuses_removal(
                datetime.now(UTC), bypass_governance=bypass_governance
            )
            if refusal is not None:
                raise self._locked(name, f"{refusal}; it cannot be deleted")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._drop_protection(name)
            # under the lock: a put creates its temporary file under it too, so an emptied
            # directory is never removed from under a put about to write into it
            _fs.fsync_dir(path.parent)
            _fs.remove_empty_parents(path, self.objects_dir)

    def set_retention(
        self,
        name: str,
        until: datetime,
        mode: RetentionMode = RetentionMode.COMPLIANCE,
        *,
        bypass_governance: bool = False,
    ) -> ObjectInfo:
        path = self._path(name)
        if not isinstance(until, datetime) or until.tzinfo is None:
            raise self._error(f"set_retention {name!r}: until must be a timezone-aware datetime")
        try:
            mode = RetentionMode(mode)
        except ValueError:
            raise self._error(f"set_retention {name!r}: unknown retention mode {mode!r}") from None
        until = until.astimezone(UTC)
        with self._lock.hold():
            self._stat(name, path)
            current = self._read_protection(name) or Protection()
            refusal = current.refuses_change(
                until, mode, datetime.now(UTC), bypass_governance=bypass_governance
            )
            if refusal is not None:
                raise self._locked(name, refusal)
            updated = Protection(retain_until=until, mode=mode, legal_hold=current.legal_hold)
            self._write_protection(name, updated)
            return self._info(name, self._stat(name, path), updated)

    def set_legal_hold(self, name: str, on: bool) -> ObjectInfo:
        path = self._path(name)
        with self._lock.hold():
            self._stat(name, path)
            current = self._read_protection(name) or Protection()
            updated = Protection(
                retain_until=current.retain_until, mode=current.mode, legal_hold=bool(on)
            )
            self._write_protection(name, updated)
            return self._info(name, self._stat(name, path), updated)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """Temporary files of puts whose process is gone (their names carry its identity)
        or that were last written more than ``older_than`` ago; ``handle`` is the path under
        ``vault/``, ``name`` the object's directory."""
        if not self.vault_dir.exists():
            return iter(())
        return _fs.stale_temps(self.vault_dir, older_than)

    def remove_temporary(self, temporary: Temporary) -> None:
        try:
            _fs.remove_temp(self.vault_dir, temporary.handle)
        except ValueError as exc:
            raise self._error(f"remove_temporary: {exc}") from None

    # provider-only -----------------------------------------------------------------

    def ex_remove_stale_temp(self, older_than: float = 3600.0) -> int:
        """Delete temporary files that killed writers left, if older than ``older_than``
        seconds; return how many."""
        if not self.vault_dir.exists():
            return 0
        return _fs.remove_stale_temp(self.vault_dir, older_than)
