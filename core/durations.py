"""Durations as site.toml and policy tags write them: a whole number with an optional unit.

One grammar, two strictnesses. A site file's settings (intervals, hook timeouts, copy
retention) take :func:`parse_duration`: ``s``, ``m``, ``h``, ``d`` or ``w``, blanks around the
parts allowed, a bare number in a unit the setting chooses. A policy tag's sides take
:func:`parse_tag_duration`: no blanks (a tag value is one token), no seconds (nothing a backup
policy means is that short), a bare number is days, and each way of being wrong has its own
reason, since a tag is typed by hand on a cloud console. Both refuse zero and anything longer
than :data:`MAX_DURATION`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta

__all__ = [
    "MAX_DURATION",
    "TAG_UNITS",
    "UNITS",
    "DurationError",
    "format_duration",
    "parse_duration",
    "parse_tag_duration",
    "quote_value",
]

#: every unit, in seconds
UNITS: Mapping[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: the units of a policy tag: no seconds, nothing a backup policy means is that short
TAG_UNITS: Mapping[str, int] = {unit: UNITS[unit] for unit in ("m", "h", "d", "w")}
#: nothing a policy or an interval means is longer than this (guards against huge values)
MAX_DURATION = timedelta(days=100 * 366)

_SETTING = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TAG = re.compile(r"([0-9]+)([A-Za-z]*)")
#: more significant digits than this is beyond 100 years in any unit (100y = 52,704,000 min)
_MAX_DIGITS = 9
#: how much of a bad value an error message quotes
_QUOTE_LIMIT = 40


class DurationError(ValueError):
    """Why a text is not a duration; ``reason`` is the message without any location."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def quote_value(value: object, limit: int = _QUOTE_LIMIT) -> str:
    """``repr`` of a value for an error message, cut to ``limit`` characters (control
    characters escaped, so a hostile tag cannot forge log lines)."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def parse_duration(text: str, *, bare_unit: str = "d") -> timedelta:
    """A site-file duration: ``"30m"``, ``"12h"``, ``"7d"``, ``"4w"``, ``"90s"``; a bare number
    is ``bare_unit``s. :class:`DurationError` (a ValueError) says what is wrong."""
    m = _SETTING.match(text) if isinstance(text, str) else None
    if m is None:
        raise DurationError(f"{text!r} is not a duration like 30m, 12h, 7d or 4w")
    number, unit = int(m.group(1)), m.group(2) or bare_unit
    if number <= 0:
        raise DurationError(f"{text!r}: a duration must be greater than zero")
    seconds = number * UNITS[unit]
    if seconds > MAX_DURATION.total_seconds():
        raise DurationError(f"{text!r} is longer than 100 years")
    return timedelta(seconds=seconds)


def parse_tag_duration(text: str, what: str = "duration") -> timedelta:
    """One side of a policy tag (``30m``, ``12h``, ``7``, ``4w``); a bare number is days.
    :class:`DurationError` names ``what`` (``"frequency"``, ``"retention"``) and the value."""
    if not text:
        raise DurationError(f"{what} is missing")
    if not text.isascii():
        raise DurationError(f"{what} {quote_value(text)} has non-ASCII characters (use digits 0-9)")
    m = _TAG.fullmatch(text)
    if m is None:
        raise DurationError(
            f"{what} {quote_value(text)} is not a duration (a whole number with an optional "
            "unit m, h, d or w; a bare number is days)"
        )
    digits, unit = m.group(1), m.group(2)
    if unit and unit not in TAG_UNITS:
        if unit.lower() in TAG_UNITS:
            hint = f"units are lower case: {unit.lower()}"
        elif unit.lower() in {"s", "sec", "secs", "second", "seconds"}:
            hint = "seconds are too short for a policy; use m, h, d or w"
        else:
            hint = "use m, h, d or w; a bare number is days"
        raise DurationError(f"{what} {quote_value(text)} has unknown unit {unit!r} ({hint})")
    significant = digits.lstrip("0")
    if not significant:
        raise DurationError(f"{what} {quote_value(text)} is zero")
    # Checked before int(): a thousand-digit number is rejected without big-int arithmetic.
    seconds = int(significant) * TAG_UNITS[unit or "d"] if len(significant) <= _MAX_DIGITS else None
    if seconds is None or seconds > MAX_DURATION.total_seconds():
        raise DurationError(f"{what} {quote_value(text)} is longer than 100 years")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact form: ``timedelta(hours=36)`` is ``36h``, a week is ``1w``."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = UNITS[unit]
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
