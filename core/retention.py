"""The WORM rules every Vault enforces the same way, whatever its cloud enforces.

A retain-until date in the future protects an object: in compliance mode nobody may delete,
overwrite or weaken it; in governance mode a caller that says ``bypass_governance`` may. A
legal hold protects it until lifted, whatever the date. A lock may be extended; only a
governance lock may be shortened (with the bypass), and a compliance lock never becomes a
governance one. Some clouds allow what these rules refuse (S3 lets a COMPLIANCE lock be
shortened through the API; Azure lifts an Unlocked policy): a provider asks here first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from regionvault.core.types import ObjectInfo, RetentionMode

__all__ = ["Protection"]


@dataclass(frozen=True)
class Protection:
    """An object's WORM state: a retain-until date and its mode, and a legal hold."""

    retain_until: datetime | None = None
    mode: RetentionMode | None = None
    legal_hold: bool = False

    @classmethod
    def of(cls, info: ObjectInfo) -> Protection:
        return cls(info.retain_until, info.retention_mode, info.legal_hold)

    def locked(self, now: datetime) -> bool:
        """A retain-until date still in the future (a legal hold aside)."""
        return self.retain_until is not None and self.retain_until > now

    def refuses_removal(self, now: datetime, *, bypass_governance: bool) -> str | None:
        """Why a delete or overwrite is refused at ``now``, or None."""
        if self.legal_hold:
            return "legal hold is on"
        if not self.locked(now):
            return None
        assert self.retain_until is not None
        until = self.retain_until.isoformat()
        if self.mode is RetentionMode.GOVERNANCE:
            if bypass_governance:
                return None
            return f"governance retention until {until} (bypass_governance overrides it)"
        # a lock of unknown mode is treated as the stricter one
        return f"compliance retention until {until}"

    def refuses_change(
        self, until: datetime, mode: RetentionMode, now: datetime, *, bypass_governance: bool
    ) -> str | None:
        """Why a new lock (``until``, ``mode``) may not replace this one at ``now``, or None."""
        if not self.locked(now):
            return None
        assert self.retain_until is not None
        held = self.retain_until.isoformat()
        if self.mode is RetentionMode.GOVERNANCE:
            if until < self.retain_until and not bypass_governance:
                return (
                    f"governance retention until {held} can only be shortened "
                    "with bypass_governance"
                )
            return None
        if mode is not RetentionMode.COMPLIANCE:
            return (
                f"compliance retention until {held} can only be extended; "
                "it cannot become governance"
            )
        if until < self.retain_until:
            return f"compliance retention until {held} can only be extended"
        return None
