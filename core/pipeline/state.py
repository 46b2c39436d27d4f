"""The engine's own run state, outside any vault: restore drills and their RTO, and the
captures kept for incremental block backups.

Kept as small JSON files under the site's ``state_dir``; nothing here is secret (ids, times,
durations, a provider's names for its snapshots), so nothing here needs encrypting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from regionvault.core.fsutil import write_atomic
from regionvault.core.pipeline.jobs import job_key

__all__ = ["DrillRecord", "KeptCapture", "KeptCaptures", "StateStore"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrillRecord:
    """One restore-and-launch in a region: from which point, and how long to healthy."""

    region: str
    #: the instance the recovery point was taken of
    instance_id: str
    point_id: str
    #: the instance the launch made
    launched_id: str
    at: datetime
    healthy: bool
    rto_seconds: float | None
    #: a scheduled drill's id and slot (``format_slot``), as its ``drill`` event records
    #: them; None for a plain ``restore --launch``
    drill_id: str | None = None
    slot: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "region": self.region,
            "instance_id": self.instance_id,
            "point_id": self.point_id,
            "launched_id": self.launched_id,
            "at": self.at.isoformat(),
            "healthy": self.healthy,
            "rto_seconds": self.rto_seconds,
            "drill_id": self.drill_id,
            "slot": self.slot,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> DrillRecord:
        rto = data.get("rto_seconds")
        return cls(
            region=str(data["region"]),
            instance_id=str(data["instance_id"]),
            point_id=str(data["point_id"]),
            launched_id=str(data["launched_id"]),
            at=datetime.fromisoformat(str(data["at"])),
            healthy=bool(data["healthy"]),
            rto_seconds=float(rto) if isinstance(rto, int | float) else None,
            drill_id=str(data["drill_id"]) if data.get("drill_id") else None,
            slot=str(data["slot"]) if data.get("slot") else None,
        )


@dataclass(frozen=True)
class KeptCapture:
    """A capture kept for the next incremental block backup (``BlockCapture.ref``), and
    the recovery point made from it. While pending, ``ref`` is None from the moment the
    backup decides to capture until the provider's capture returns: an *intent*, so that
    a run killed while the provider makes its snapshots is still on record."""

    ref: str | None
    point_id: str
    #: the run that took it (``ProcessIdentity.token``), while its point is pending
    owner: str = ""
    #: when the pending entry was recorded (seconds since the epoch; 0: not known, as in
    #: entries written before this was recorded)
    at: float = 0.0
    #: the backup run that took it (a scheduled point's id is the same for every run of its
    #: slot; its manifest's ``regionvault:run`` tag names the run that made it); "" in
    #: entries written before this was recorded
    run: str = ""

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "ref": self.ref,
            "point_id": self.point_id,
            "owner": self.owner,
            "at": self.at,
        }
        if self.run:
            data["run"] = self.run
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KeptCapture:
        ref = data.get("ref")
        at = data.get("at")
        return cls(
            None if ref is None else str(ref),
            str(data["point_id"]),
            str(data.get("owner", "")),
            float(at) if isinstance(at, int | float) else 0.0,
            str(data.get("run") or ""),
        )


@dataclass
class KeptCaptures:
    """One instance's kept captures: ``current``, whose point is committed and which the
    next backup is taken ``since``; ``pending``, taken by a backup whose point is not
    committed yet (or was, by a run killed before it said so); ``release``, refs no longer
    needed whose release has not succeeded yet."""

    current: KeptCapture | None = None
    pending: list[KeptCapture] = field(default_factory=list)
    release: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "current": None if self.current is None else self.current.to_dict(),
            "pending": [p.to_dict() for p in self.pending],
            "release": list(self.release),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KeptCaptures:
        current = data.get("current")
        pending = data.get("pending")
        release = data.get("release")
        return cls(
            current=KeptCapture.from_dict(current) if isinstance(current, dict) else None,
            pending=[KeptCapture.from_dict(p) for p in pending]
            if isinstance(pending, list)
            else [],
            release=[str(r) for r in release] if isinstance(release, list) else [],
        )

    def empty(self) -> bool:
        return self.current is None and not self.pending and not self.release


def _hashed_name(key: str) -> str:
    """A file name for ``key`` of fixed length, as the job ledger names its files: an ARM
    id of an Azure VM is longer than a file name may be (the JSON inside names region and
    instance)."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _legacy_name(kind: str, region: str, instance_id: str) -> str:
    """The name such files had before they were hashed (still read, then moved)."""
    return job_key(kind, region, instance_id).replace("/", "__")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a legacy name too long to exist
        return False


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _drill_path(self, region: str, instance_id: str) -> Path:
        name = _hashed_name(job_key("drill", region, instance_id))
        return self.root / "drills" / f"{name}.json"

    def _legacy_drill_path(self, region: str, instance_id: str) -> Path:
        return self.root / "drills" / f"{_legacy_name('drill', region, instance_id)}.json"

    def record_drill(self, record: DrillRecord) -> None:
        path = self._drill_path(record.region, record.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record.to_dict(), sort_keys=True).encode())
        # the newer record wins: one under the old name would only mislead a reader
        with contextlib.suppress(OSError):
            self._legacy_drill_path(record.region, record.instance_id).unlink()

    def last_drill(self, region: str, instance_id: str) -> DrillRecord | None:
        for path in (
            self._drill_path(region, instance_id),
            self._legacy_drill_path(region, instance_id),
        ):
            try:
                return DrillRecord.from_dict(json.loads(path.read_text("utf-8")))
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    continue  # no legacy record can have that name
                raise
        return None

    # -- kept captures ---------------------------------------------------------------------

    def _kept_path(self, region: str, instance_id: str) -> Path:
        path = self.root / "captures" / f"{_hashed_name(job_key('kept', region, instance_id))}.json"
        legacy = path.with_name(f"{_legacy_name('kept', region, instance_id)}.json")
        if _exists(legacy) and not path.exists():
            # written before names were hashed: moved, so that its refs are still released
            with contextlib.suppress(FileNotFoundError):  # another run moved it first
                legacy.replace(path)
        return path

    def has_kept(self, region: str, instance_id: str) -> bool:
        """Whether anything was ever recorded about the instance's kept captures."""
        return self._kept_path(region, instance_id).exists()

    @contextlib.contextmanager
    def kept_captures(self, region: str, instance_id: str) -> Iterator[KeptCaptures]:
        """The instance's kept captures, to read and change: what the block leaves in them
        is written back (atomically) when it ends without an error. Runs of several
        processes on this machine take turns (a lock file beside it); hold it briefly."""
        path = self._kept_path(region, instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f"{path.name}.lock")
        with lock.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                try:
                    kept = KeptCaptures.from_dict(json.loads(path.read_text("utf-8")))
                except FileNotFoundError:
                    kept = KeptCaptures()
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    # a damaged record costs an incremental read, never a backup: set
                    # aside (what it names may need releasing by hand) and begun afresh
                    # a name of its own: a later damage must not overwrite what this one
                    # tells the operator to release by hand
                    stamp = f"{int(time.time())}-{secrets.token_hex(4)}"
                    aside = path.with_name(f"{path.name}.{stamp}.damaged")
                    path.replace(aside)
                    log.error(
                        "kept captures of %s in %s: %s is damaged (%s), moved to %s; the "
                        "snapshots it names are no longer released by regionvault",
                        instance_id,
                        region,
                        path,
                        exc,
                        aside,
                    )
                    kept = KeptCaptures()
                before = kept.to_dict()
                yield kept
                if kept.to_dict() != before:
                    doc = {**kept.to_dict(), "region": region, "instance_id": instance_id}
                    write_atomic(path, json.dumps(doc, sort_keys=True).encode())
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def kept_instances(self, region: str) -> list[str]:
        """The instances of ``region`` with kept captures recorded."""
        found = []
        for path in sorted((self.root / "captures").glob("*.json")):
            try:
                data = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if data.get("region") == region and isinstance(data.get("instance_id"), str):
                found.append(data["instance_id"])
        return found
