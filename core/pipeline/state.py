"""The engine's own run state, outside any vault: restore drills and their RTO.

Kept as small JSON files under the site's ``state_dir``; nothing here is secret (ids, times,
durations), so nothing here needs encrypting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from regionvault.core.fsutil import write_atomic
from regionvault.core.pipeline.jobs import job_key

__all__ = ["DrillRecord", "StateStore"]


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

    def to_dict(self) -> dict[str, object]:
        return {
            "region": self.region,
            "instance_id": self.instance_id,
            "point_id": self.point_id,
            "launched_id": self.launched_id,
            "at": self.at.isoformat(),
            "healthy": self.healthy,
            "rto_seconds": self.rto_seconds,
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
        )


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _drill_path(self, region: str, instance_id: str) -> Path:
        # job_key escapes each part, so region and instance ids make safe file names
        name = job_key("drill", region, instance_id).replace("/", "__")
        return self.root / "drills" / f"{name}.json"

    def record_drill(self, record: DrillRecord) -> None:
        path = self._drill_path(record.region, record.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record.to_dict(), sort_keys=True).encode())

    def last_drill(self, region: str, instance_id: str) -> DrillRecord | None:
        path = self._drill_path(region, instance_id)
        try:
            return DrillRecord.from_dict(json.loads(path.read_text("utf-8")))
        except FileNotFoundError:
            return None
