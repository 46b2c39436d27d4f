"""The local Transit: payloads land in ``<destination root>/inbox/<source region>/<name>``,
each written atomically (temporary file, fsync, rename, fsync of the directory), so an
interrupted copy leaves whole payloads only and resumes by asking :meth:`LocalTransit.has`.
The temporary file of a killed send is found by :meth:`LocalTransit.stale_temporaries` and
removed by ``verify --repair``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from regionvault.core import names
from regionvault.core.errors import TransitError
from regionvault.core.interfaces import Transit
from regionvault.core.types import Capabilities, Temporary
from regionvault.providers.local import _fs

__all__ = ["LocalTransit"]

_NOT_THERE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class LocalTransit(Transit):
    """A one-way link from ``source`` into ``destination_root``'s inbox."""

    def __init__(
        self,
        *,
        destination_root: Path,
        provider: str,
        source: str,
        region: str,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(provider=provider, source=source, region=region, capabilities=capabilities)
        self.inbox_dir = destination_root / "inbox" / source
        self._sent = 0
        self._sent_lock = threading.Lock()
        # orders a send's temporary file against a discard removing an emptied directory
        self._dir_lock = _fs.FileLock(destination_root / f".inbox-{source}.lock")

    def _error(self, message: str) -> TransitError:
        return TransitError(message, provider=self.provider, region=self.region)

    def _path(self, name: str) -> Path:
        problem = names.name_problem(name)
        if problem is not None:
            raise self._error(f"bad payload name {name!r}: {problem}")
        return self.inbox_dir / name

    def send(self, name: str, payload: bytes | memoryview) -> None:
        path = self._path(name)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise self._error(f"send {name!r}: payload must be bytes, not {type(payload).__name__}")
        try:
            with self._dir_lock.hold():
                created = _fs.create_temp(path.parent)
            _fs.publish(_fs.write_temp(path.parent, payload, created=created), path)
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            raise self._error(f"send {name!r}: the name conflicts with another payload") from None
        except OSError as exc:
            raise self._error(f"send {name!r} from {self.source}: {exc.strerror}") from None
        with self._sent_lock:
            self._sent += memoryview(payload).nbytes

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def inbox(self, prefix: str = "") -> Iterator[str]:
        problem = names.prefix_problem(prefix)
        if problem is not None:
            raise self._error(f"bad inbox prefix {prefix!r}: {problem}")
        return iter(sorted(name for name, _ in _fs.walk_files(self.inbox_dir, prefix)))

    def receive(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return path.read_bytes()
        except _NOT_THERE:
            raise self._error(f"payload {name!r} from {self.source} is not in the inbox") from None

    def discard(self, name: str) -> None:
        path = self._path(name)
        with self._dir_lock.hold(), contextlib.suppress(*_NOT_THERE):
            path.unlink()
            _fs.remove_empty_parents(path, self.inbox_dir)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        """Partial payloads (temporary files) of sends whose process is gone or that were
        last written more than ``older_than`` ago; ``handle`` is the path under the inbox."""
        if not self.inbox_dir.exists():
            return iter(())
        return _fs.stale_temps(self.inbox_dir, older_than)

    def remove_temporary(self, temporary: Temporary) -> None:
        try:
            with self._dir_lock.hold():
                _fs.remove_temp(self.inbox_dir, temporary.handle)
        except ValueError as exc:
            raise self._error(f"remove_temporary: {exc}") from None

    @property
    def bytes_sent(self) -> int:
        with self._sent_lock:
            return self._sent
