"""The one set of WORM rules (core/retention.py) that every Vault asks before a delete, an
overwrite or a retention change, whatever its cloud would allow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from regionvault.core.retention import Protection
from regionvault.core.types import ObjectInfo, RetentionMode

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=7)
SOONER = NOW + timedelta(days=1)
PAST = NOW - timedelta(seconds=1)
COMPLIANCE, GOVERNANCE = RetentionMode.COMPLIANCE, RetentionMode.GOVERNANCE


@pytest.mark.parametrize(
    ("protection", "bypass", "refused"),
    [
        (Protection(), False, None),
        (Protection(PAST, COMPLIANCE), False, None),
        (Protection(LATER, COMPLIANCE), True, "compliance retention until"),
        (Protection(LATER, GOVERNANCE), False, "governance retention until"),
        (Protection(LATER, GOVERNANCE), True, None),
        # a lock whose mode the cloud did not say is held as the stricter one
        (Protection(LATER, None), True, "compliance retention until"),
        (Protection(PAST, GOVERNANCE, legal_hold=True), True, "legal hold is on"),
    ],
)
def test_removal(protection: Protection, bypass: bool, refused: str | None) -> None:
    why = protection.refuses_removal(NOW, bypass_governance=bypass)
    if refused is None:
        assert why is None
    else:
        assert why is not None and why.startswith(refused)


@pytest.mark.parametrize(
    ("held", "until", "mode", "bypass", "refused"),
    [
        (Protection(LATER, COMPLIANCE), LATER + timedelta(days=1), COMPLIANCE, False, None),
        (Protection(LATER, COMPLIANCE), SOONER, COMPLIANCE, True, "can only be extended"),
        (Protection(LATER, COMPLIANCE), LATER, GOVERNANCE, True, "cannot become governance"),
        (Protection(LATER, GOVERNANCE), SOONER, GOVERNANCE, False, "only be shortened"),
        (Protection(LATER, GOVERNANCE), SOONER, GOVERNANCE, True, None),
        (Protection(LATER, GOVERNANCE), LATER, COMPLIANCE, False, None),
        # an expired lock holds nothing back
        (Protection(PAST, COMPLIANCE), SOONER, GOVERNANCE, False, None),
    ],
)
def test_change(
    held: Protection, until: datetime, mode: RetentionMode, bypass: bool, refused: str | None
) -> None:
    why = held.refuses_change(until, mode, NOW, bypass_governance=bypass)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_of_reads_an_object_info() -> None:
    info = ObjectInfo(
        name="o",
        size=1,
        modified=NOW,
        retain_until=LATER,
        retention_mode=GOVERNANCE,
        legal_hold=True,
    )
    assert Protection.of(info) == Protection(LATER, GOVERNANCE, legal_hold=True)
