"""Clocks for tests that must pass at any time of day (CI runs at 23:59:59 UTC too).

The engine's slots come from its clock: a daily backup's slot starts at 00:00 UTC, tag and
retention jobs have 5-minute slots (``tag_interval``, ``schedule_interval``). A test that
ticks twice on the real clock and expects the second tick to find the first one's work done
fails when a slot boundary falls between the two. ``stopped_clock`` gives an engine one
moment for the whole test; ``clear_of_day_end`` is for steps the test cannot give a clock to
(the ``regionvault`` command, in-process or in a subprocess, reads the real clock)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from regionvault.core.pipeline.jobs import slot_of

__all__ = ["DAY", "clear_of_day_end", "stopped_clock"]

DAY = timedelta(days=1)


def stopped_clock() -> Callable[[], datetime]:
    """An engine clock that reads the real time of its making, ever after: every tick of the
    test is in one slot of every length. (Recovery points record their real creation times,
    which come later than this reading.)"""
    at = datetime.now(UTC)
    return lambda: at


def clear_of_day_end(span: timedelta = timedelta(seconds=90)) -> None:
    """Return when the real clock's UTC day has at least ``span`` left, waiting past midnight
    (at most ``span``) when it has less: the daily slot then stays the same for the next
    ``span``. ``span`` is many times what the tests that call this take on a loaded machine."""
    now = datetime.now(UTC)
    left = slot_of(now, DAY) + DAY - now
    if left < span:
        time.sleep(left.total_seconds() + 0.05)
        assert slot_of(datetime.now(UTC), DAY) > slot_of(now, DAY), "the wait missed midnight"
