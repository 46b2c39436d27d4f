"""Snapshot waits follow the snapshot's progress: a large snapshot that keeps moving is
waited for however long it takes; one that stops moving for ``snapshot_stall_timeout``
seconds fails, naming it and where it stopped. A fake clock that the fake sleep advances
stands in for time: nothing here sleeps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from aws_world import EAST, AwsWorld
from regionvault.core.errors import ComputeError, ConfigError
from regionvault.core.interfaces import BlockCapture
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.aws.ec2 import follow_snapshot
from regionvault.providers.aws.settings import AwsSettings
from regionvault.providers.aws.testing import seed_snapshot


class FakeTime:
    """A monotonic clock that only the fake sleep moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def _moving(
    fake: FakeTime, *, seconds_per_percent: float, stop_at: float | None = None, step: int = 1
) -> Any:
    """What DescribeSnapshots says of a snapshot that gains ``step`` percent every ``step *
    seconds_per_percent`` seconds from the fake clock's start (and stops gaining at
    ``stop_at`` percent)."""
    start = fake.now

    def describe() -> Mapping[str, Any]:
        steps = (fake.now - start) // (seconds_per_percent * step)
        done = min(100.0, steps * step)
        if stop_at is not None:
            done = min(done, stop_at)
        if done >= 100:
            return {"SnapshotId": "snap-1", "State": "completed", "Progress": "100%"}
        return {"SnapshotId": "snap-1", "State": "pending", "Progress": f"{done:g}%"}

    return describe


def test_a_slow_snapshot_that_keeps_moving_is_waited_for() -> None:
    """1% every 25 minutes: 41 hours in all, each step well inside a 30-minute stall
    window, so the wait never fails (the old fixed 1,800 s limit would have)."""
    fake = FakeTime()
    describe = _moving(fake, seconds_per_percent=1500)
    facts = follow_snapshot(
        describe,
        "snap-1",
        stall_timeout=1800,
        region="aws:us-east-1",
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert facts["State"] == "completed"
    assert fake.now - 1000.0 >= 100 * 1500
    assert max(fake.sleeps) <= 15.0  # looks at least every 15 s


def test_a_snapshot_that_stops_moving_fails_after_the_stall_window() -> None:
    fake = FakeTime()
    describe = _moving(fake, seconds_per_percent=60, stop_at=42)
    with pytest.raises(ComputeError, match=r"snap-1 made no progress .*at 42%") as caught:
        follow_snapshot(
            describe,
            "snap-1",
            stall_timeout=600,
            region="aws:us-east-1",
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert "snapshot_stall_timeout is 600 s" in str(caught.value)
    stalled_from = 1000.0 + 42 * 60  # when it reached 42% (give or take one look)
    assert stalled_from + 600 <= fake.now <= stalled_from + 600 + 15


def test_no_progress_reported_and_the_error_state() -> None:
    fake = FakeTime()
    with pytest.raises(ComputeError, match="no progress reported"):
        follow_snapshot(
            lambda: {"State": "pending"},
            "snap-2",
            stall_timeout=30,
            region="aws:us-east-1",
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert 1030.0 <= fake.now <= 1030.0 + 15
    fake = FakeTime()
    with pytest.raises(ComputeError, match="snap-3 is in state error: copy failed"):
        follow_snapshot(
            lambda: {"State": "error", "StateMessage": "copy failed"},
            "snap-3",
            stall_timeout=30,
            region="aws:us-east-1",
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert fake.sleeps == []


def test_the_provider_follows_describe_snapshots_progress(aws: AwsWorld) -> None:
    """Through the real client against moto (whose snapshots are completed at once): a
    response hook reports the snapshot pending at a progress that moves with the fake
    clock, then stalls; the provider's wait follows it and fails only on the stall."""
    if aws.live:
        pytest.skip("rewrites moto's DescribeSnapshots answers")
    compute = aws.track(aws.provider.compute(aws.region(EAST, snapshot_stall_timeout=300)))
    snapshot = seed_snapshot(aws.client("ebs", EAST), {0: b"x"})
    fake = FakeTime()
    compute._clock, compute._sleep = fake.clock, fake.sleep
    # 25% every 250 s: 1,000 s in all, more than three stall windows of 300 s
    progress = _moving(fake, seconds_per_percent=10, step=25)
    looks = 0

    def pending(parsed: dict[str, Any], **_: Any) -> None:
        nonlocal looks
        looks += 1
        for found in parsed.get("Snapshots", []):
            seen = progress()
            found["State"], found["Progress"] = seen["State"], seen["Progress"]

    compute.ec2.meta.events.register("after-call.ec2.DescribeSnapshots", pending)
    facts = compute.wait_for_snapshot(snapshot)
    assert facts["State"] == "completed" and facts["SnapshotId"] == snapshot
    assert fake.now - 1000.0 >= 1000
    assert looks > 4

    progress = _moving(fake, seconds_per_percent=10, step=25, stop_at=50)
    with pytest.raises(ComputeError, match=rf"{snapshot} made no progress .*at 50%"):
        compute.wait_for_snapshot(snapshot)


def _settings(**settings: Any) -> AwsSettings:
    region = RegionConfig(
        id=RegionId("aws", "us-east-1"),
        settings=settings,
        services={"compute": ServiceConfig("aws", settings)},
        base_dir=Path(),
        source="site.toml",
    )
    return AwsSettings.from_region(region)


def test_stall_timeout_settings_and_the_older_name() -> None:
    assert _settings().snapshot_stall_timeout == 1800
    assert _settings(snapshot_stall_timeout=7200).snapshot_stall_timeout == 7200
    # snapshot_timeout, the older name, is read as the stall window
    assert _settings(snapshot_timeout=900).snapshot_stall_timeout == 900
    with pytest.raises(ConfigError, match="give snapshot_stall_timeout only"):
        _settings(snapshot_timeout=900, snapshot_stall_timeout=600)
    with pytest.raises(ConfigError, match=r"snapshot_stall_timeout.*between 1 and 86400"):
        _settings(snapshot_stall_timeout=0)
    with pytest.raises(ConfigError, match=r"snapshot_timeout.*must be an integer"):
        _settings(snapshot_timeout="30m")


def _scripted(fake: FakeTime, script: list[tuple[float, str | None]]) -> Any:
    """DescribeSnapshots of a snapshot whose Progress is ``script``'s last entry at or
    before the fake clock's time since the start (None: no Progress); "100%" completes."""
    start = fake.now

    def describe() -> Mapping[str, Any]:
        now = fake.now - start
        shown = [p for t, p in script if t <= now][-1]
        if shown == "100%":
            return {"SnapshotId": "snap-q", "State": "completed", "Progress": shown}
        facts: dict[str, Any] = {"SnapshotId": "snap-q", "State": "pending"}
        if shown is not None:
            facts["Progress"] = shown
        return facts

    return describe


def _follow(fake: FakeTime, describe: Any, *, stall: float, queue: float) -> Mapping[str, Any]:
    return follow_snapshot(
        describe,
        "snap-q",
        stall_timeout=stall,
        queue_timeout=queue,
        region="aws:us-east-1",
        clock=fake.clock,
        sleep=fake.sleep,
    )


@pytest.mark.parametrize("queued", ["0%", None])
def test_a_queued_snapshot_has_the_longer_queue_window(queued: str | None) -> None:
    """Pending at 0% (or with no Progress) for 2.5 hours, then done at once, as AWS shows a
    snapshot queued behind another of its volume: not a stall within the queue window
    (6 hours by default), although far past the 30-minute stall window."""
    fake = FakeTime()
    script = [(0.0, queued), (9000.0, "100%")]
    facts = _follow(fake, _scripted(fake, script), stall=1800, queue=6 * 3600)
    assert facts["State"] == "completed" and fake.now - 1000.0 >= 9000
    # past a shorter queue window it fails, naming that setting
    fake = FakeTime()
    with pytest.raises(ComputeError, match=r"snapshot_queue_timeout is 3600 s") as caught:
        _follow(fake, _scripted(fake, script), stall=1800, queue=3600)
    assert "made no progress for 3600 s" in str(caught.value)
    assert 1000.0 + 3600 <= fake.now <= 1000.0 + 3600 + 15


def test_once_it_moved_the_stall_window_applies_again() -> None:
    """Moved from 0% to 5% and then stuck at 5% (or back at 0%): the stall window, not the
    queue window."""
    for stuck in ("5%", "0%"):
        fake = FakeTime()
        script = [(0.0, "0%"), (100.0, "5%"), (200.0, stuck), (90000.0, "100%")]
        with pytest.raises(ComputeError, match=r"snapshot_stall_timeout is 600 s"):
            _follow(fake, _scripted(fake, script), stall=600, queue=6 * 3600)
        assert fake.now - 1000.0 <= 200 + 600 + 15 + 15


def test_progress_going_down_and_up_again_is_progress() -> None:
    """50%, then 10%, then 1% more every minute: each change is movement, so it is waited
    for to the end, although it stays below its old 50% for 40 minutes (> the window)."""
    fake = FakeTime()
    script: list[tuple[float, str | None]] = [(0.0, "50%"), (60.0, "10%")]
    script += [(60.0 + 60 * k, f"{10 + k}%") for k in range(1, 90)]
    script.append((60.0 + 60 * 90, "100%"))
    facts = _follow(fake, _scripted(fake, script), stall=1800, queue=6 * 3600)
    assert facts["State"] == "completed" and fake.now - 1000.0 >= 60 + 60 * 90


def test_queue_timeout_setting() -> None:
    assert _settings().snapshot_queue_timeout == 6 * 3600
    assert _settings(snapshot_queue_timeout=600).snapshot_queue_timeout == 600
    with pytest.raises(ConfigError, match=r"snapshot_queue_timeout.*between 1 and 172800"):
        _settings(snapshot_queue_timeout=0)


def test_a_capture_returns_its_ref_before_waiting_for_its_snapshot(aws: AwsWorld) -> None:
    """The capture is returned (with its ref, for the engine to record) as soon as
    CreateSnapshot answers, not after the snapshot completes: a run killed during the wait
    leaves a ref on record to release. The first read waits, and fails on a stall."""
    if aws.live:
        pytest.skip("rewrites moto's DescribeSnapshots answers")
    compute = aws.track(aws.provider.compute(aws.region(EAST, snapshot_stall_timeout=300)))
    fake = FakeTime()
    compute._clock, compute._sleep = fake.clock, fake.sleep

    def pending(parsed: dict[str, Any], **_: Any) -> None:
        for found in parsed.get("Snapshots", []):
            found["State"], found["Progress"] = "pending", "42%"

    compute.ec2.meta.events.register("after-call.ec2.DescribeSnapshots", pending)
    iid = aws.run_instance(EAST, {})
    capture = compute.capture(iid, keep=True)
    try:
        assert fake.sleeps == []  # nothing waited for yet
        assert isinstance(capture, BlockCapture) and capture.ref is not None
        snapshot = capture.parts[0].snapshot_id  # type: ignore[attr-defined]
        assert snapshot in capture.ref
        with pytest.raises(ComputeError, match=rf"{snapshot} made no progress .*at 42%"):
            list(capture.blocks())
        assert 1000.0 + 300 <= fake.now <= 1000.0 + 300 + 15
    finally:
        capture.close()
        compute.release_capture(capture.ref or "")
    ec2 = aws.client("ec2", EAST)
    left = ec2.describe_snapshots(Filters=[{"Name": "tag:regionvault:instance", "Values": [iid]}])
    assert left["Snapshots"] == []
