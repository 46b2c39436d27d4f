"""Site hooks: commands run around an instance's capture, chosen by its ``backup-hook`` tag.

A hook is either a ``[hooks.NAME]`` table of site.toml (a ``before`` and an ``after``
command, a ``timeout``) or the built-in ``sqlite`` hook, which needs no configuration: it
copies every SQLite database of the instance's data directory with SQLite's online backup
API before the capture, and the capture then reads those copies in place of the live files
(:class:`SubstitutedCapture`). docs/hooks.md is the user's description.

Order and failures (one :class:`HookRun` per backup):

- ``before`` steps run in the tag's order before the capture. One that fails (non-zero exit,
  or its timeout: its whole process group is killed) fails the backup with one line naming
  the hook, the phase and the exit status or the last line of its standard error; nothing
  is committed.
- ``after`` steps run in reverse order, once each, for every hook whose ``before``
  succeeded (or that has none): once the capture's data is read and stored, before the
  point is committed (right after the capture for a block capture, which is a snapshot);
  or, when the backup failed, before the failure is reported. A failed ``after`` does not
  fail a backup whose data was taken: the point records a :class:`CaptureIssue` of kind
  :attr:`IssueKind.HOOK`, and the command exits 3 ("incomplete").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

from regionvault.core.config import DEFAULT_HOOK_TIMEOUT, HookConfig
from regionvault.core.durations import format_duration
from regionvault.core.errors import HookFailed
from regionvault.core.interfaces import BlockCapture, Capture, FileCapture
from regionvault.core.pipeline.sqlite_hook import SqliteCopies, SubstitutedCapture
from regionvault.core.types import CaptureIssue, IssueKind

if TYPE_CHECKING:
    from types import TracebackType

    from regionvault.core.types import Instance

__all__ = [
    "HOOK_WORK_DIR",
    "HookFailed",
    "HookRun",
    "remove_stale_runs",
    "run_command",
]

log = logging.getLogger(__name__)

#: where a run keeps its private directories, under the site's state directory
HOOK_WORK_DIR = "hooks"
#: how much of a hook's output is kept for the log and the error message
_OUTPUT_TAIL = 8192
#: how long a killed hook's process group may take to go
_KILL_WAIT = 10.0
#: a lock file without its run directory is someone's run starting, unless this old
_ORPHAN_LOCK_AGE = 3600.0


# --------------------------------------------------------------------------- commands


def _tail(f: IO[bytes]) -> bytes:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read()


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    last = "".join(ch if ch.isprintable() else "?" for ch in lines[-1])
    return last if len(last) <= 200 else f"{last[:200]}…"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # the hook is its own session's leader, so its pid is its process group's id: every
    # process it started goes with it (unless one left the group on purpose)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_WAIT)


def run_command(argv: Sequence[str], *, env: Mapping[str, str], timeout: float, label: str) -> None:
    """Run one hook command with ``env`` added to this process's environment, its output
    kept (logged, and its last line quoted on failure). :class:`HookFailed` with one line
    starting with ``label`` when it exits non-zero, cannot start, or outlives ``timeout``
    seconds (its process group is then killed). Processes it leaves running in the
    background on success are left alone: a ``before`` may hold a session open for its
    ``after``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **env},
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise HookFailed(f"{label}: cannot run {argv[0]!r}: {exc.strerror}") from None
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            last = _last_line(_tail(err)) or _last_line(_tail(out))
            raise HookFailed(
                f"{label}: timed out after {format_duration(timedelta(seconds=timeout))} (killed)"
                + (f": {last}" if last else "")
            ) from None
        except BaseException:
            _kill_group(proc)  # interrupted: leave nothing of it running
            raise
        out_tail, err_tail = _tail(out), _tail(err)
        for name, data in (("stdout", out_tail), ("stderr", err_tail)):
            if data.strip():
                log.info("%s %s: %s", label, name, data.decode("utf-8", "replace").rstrip())
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            last = _last_line(err_tail) or _last_line(out_tail)
            raise HookFailed(f"{label}: {how}" + (f": {last}" if last else ""))


# --------------------------------------------------------------------------- work directories


@dataclass
class _RunDir:
    """A run's private directory, ``<state>/hooks/<id>/`` (mode 0700), and the lock that
    tells later runs it is alive: ``<id>.lock`` held with ``flock`` while the run lasts."""

    path: Path
    lock_path: Path
    lock_fd: int

    @classmethod
    def create(cls, root: Path) -> _RunDir:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_runs(root)
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        lock_path = root / f"{name}.lock"
        # locked before the directory exists, so a cleaner never sees a live run unlocked
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = root / name
            path.mkdir(mode=0o700)
        except BaseException:
            os.close(fd)
            lock_path.unlink(missing_ok=True)
            raise
        return cls(path, lock_path, fd)

    def remove(self) -> None:
        try:
            shutil.rmtree(self.path, ignore_errors=True)
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self.lock_fd)


def remove_stale_runs(root: Path) -> list[Path]:
    """Remove the run directories under ``root`` whose run is gone (killed before it could
    remove them: its lock is free). Returns what was removed. Called when an Engine opens
    the site's state directory (every command and backup) and when a hook run starts."""
    removed: list[Path] = []
    try:
        paths = sorted(root.iterdir())
    except FileNotFoundError:
        return removed
    except OSError as exc:  # unreadable: the next run that can read it removes them
        log.warning("cannot look for stale hook runs in %s: %s", root, exc.strerror)
        return removed
    for path in paths:
        name = path.name
        if name.endswith(".lock"):
            if not (root / name[: -len(".lock")]).exists():
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > _ORPHAN_LOCK_AGE:
                        path.unlink()
            continue
        lock_path = root / f"{name}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, left by a run that ended before removing it", path)
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------- a backup's hooks


class HookRun:
    """The hooks of one backup of one instance: :meth:`before`, then :meth:`wrap` the
    capture, then :meth:`after` (once: from ``before_commit``, or from :meth:`finish` when
    the backup failed), then :meth:`finish`, which always removes the run's directory.

    ``hooks`` are the tag's names resolved against the site (``sqlite`` is the built-in);
    ``work_root`` is where the run's private directory goes (the site's state directory's
    ``hooks/``)."""

    def __init__(
        self,
        names: Sequence[str],
        site_hooks: Mapping[str, HookConfig],
        instance: Instance,
        *,
        region: str,
        work_root: Path,
    ) -> None:
        self.names = tuple(names)
        self._site_hooks = site_hooks
        self.instance = instance
        self.region = region
        self.work_root = work_root
        data_dir = instance.extra.get("data_dir")
        self.data_dir = Path(data_dir) if isinstance(data_dir, str) and data_dir else None
        #: hooks whose after is due, in the order their befores ran
        self._started: list[str] = []
        self._after_done = False
        self._run_dir: _RunDir | None = None
        self.sqlite: SqliteCopies | None = None
        #: what the befores found (databases the sqlite hook could not copy)
        self._early_issues: list[CaptureIssue] = []

    def __enter__(self) -> HookRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(failed=exc is not None)

    # -- helpers -----------------------------------------------------------------------

    def _label(self, name: str, phase: str) -> str:
        who = self.instance.id + (
            f" ({self.instance.name})" if self.instance.name != self.instance.id else ""
        )
        return f"hook {name!r} {phase} for instance {who}"

    def _dir(self, name: str) -> Path:
        if self._run_dir is None:
            self._run_dir = _RunDir.create(self.work_root)
        path = self._run_dir.path / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _env(self, name: str, phase: str, status: str | None) -> dict[str, str]:
        env = {
            "REGIONVAULT_HOOK_NAME": name,
            "REGIONVAULT_HOOK_PHASE": phase,
            "REGIONVAULT_HOOK_DIR": str(self._dir(name)),
            "REGIONVAULT_INSTANCE_ID": self.instance.id,
            "REGIONVAULT_INSTANCE_NAME": self.instance.name,
            "REGIONVAULT_INSTANCE_TAGS": json.dumps(dict(self.instance.tags), sort_keys=True),
            "REGIONVAULT_REGION": self.region,
            "REGIONVAULT_DATA_DIR": str(self.data_dir) if self.data_dir is not None else "",
        }
        if status is not None:
            env["REGIONVAULT_BACKUP_STATUS"] = status
        return env

    # -- phases ------------------------------------------------------------------------

    def before(self) -> None:
        """Run every ``before`` in order. :class:`HookFailed` (one line) when one fails,
        after the ``after`` steps of the hooks started before it have run."""
        for name in self.names:
            try:
                self._before(name)
            except BaseException as exc:
                issues = self.after(failed=True)
                if isinstance(exc, HookFailed) and issues:
                    also = "; ".join(i.message for i in issues)
                    raise HookFailed(f"{exc}; then {also}") from None
                raise
            self._started.append(name)

    def _before(self, name: str) -> None:
        if name == "sqlite":
            self._before_sqlite()
            return
        hook = self._site_hooks[name]
        if hook.before is not None:
            run_command(
                hook.before,
                env=self._env(name, "before", None),
                timeout=hook.timeout.total_seconds(),
                label=self._label(name, "before"),
            )

    def _before_sqlite(self) -> None:
        if self.data_dir is None:
            raise HookFailed(
                f"{self._label('sqlite', 'before')}: the instance has no local data directory "
                "(the sqlite hook copies databases from one; for a cloud instance, run SQLite's "
                "backup inside the VM from a [hooks.NAME] command)"
            )
        copies = SqliteCopies(self.data_dir, self._dir("sqlite"))
        copies.make(
            time.monotonic() + DEFAULT_HOOK_TIMEOUT.total_seconds(),
            self._label("sqlite", "before"),
        )
        self.sqlite = copies
        self._early_issues.extend(copies.issues)
        log.info(
            "hook 'sqlite' for %s: %d database(s) copied", self.instance.id, len(copies.substitutes)
        )

    def wrap(self, capture: Capture) -> Capture:
        """The capture the backup reads: a file capture's databases from the sqlite hook's
        copies when that hook ran; ``capture`` itself otherwise."""
        if self.sqlite is not None and isinstance(capture, FileCapture):
            return SubstitutedCapture(capture, self.sqlite)
        return capture

    def captured(self, capture: Capture) -> None:
        """Called once the capture is taken: a block capture is a snapshot, so the ``after``
        steps run now (their issues go to the point with :meth:`before_commit`'s)."""
        if isinstance(capture, BlockCapture):
            self._early_issues.extend(self.after(failed=False))

    def before_commit(self) -> list[CaptureIssue]:
        """For ``Repository.backup(before_commit=...)``: every byte is stored, so the
        ``after`` steps run now (if not yet). Returns the issues for the point."""
        return [*self._early_issues, *self.after(failed=False)]

    def after(self, *, failed: bool) -> list[CaptureIssue]:
        """Run the ``after`` steps (once) of the hooks whose ``before`` ran, in reverse
        order; each failure is an issue (logged too), never an exception."""
        if self._after_done:
            return []
        self._after_done = True
        issues: list[CaptureIssue] = []
        status = "failed" if failed else "ok"
        for name in reversed(self._started):
            hook = self._site_hooks.get(name)
            if hook is None or hook.after is None:
                continue  # the built-in sqlite hook's copies go in finish()
            try:
                run_command(
                    hook.after,
                    env=self._env(name, "after", status),
                    timeout=hook.timeout.total_seconds(),
                    label=self._label(name, "after"),
                )
            except HookFailed as exc:
                log.warning("%s", exc)
                issues.append(CaptureIssue("", IssueKind.HOOK, str(exc)))
        return issues

    def finish(self, *, failed: bool) -> list[CaptureIssue]:
        """The ``after`` steps if they have not run (the backup failed), then the run's
        private directory (the sqlite hook's copies among it) removed, whatever happens."""
        try:
            return self.after(failed=failed)
        finally:
            if self._run_dir is not None:
                self._run_dir.remove()
                self._run_dir = None
