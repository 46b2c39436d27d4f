"""`status` shows what is not protected (issue #20, item 1): every instance of every region
with its protection state, worst first, in the table and in --json, through the console
script; it exits 1 when a row is failing, malformed or late, and 3 when an objective is
breached, whatever else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core.config import parse_site
from regionvault.core.pipeline import SLOT_TAG, Engine
from regionvault.core.pipeline.jobs import format_slot
from regionvault.core.pipeline.protection import judge_copies, judge_home, state_rank
from regionvault.core.policy import CopyTarget, Policy
from regionvault.core.site import Site
from regionvault.core.types import CaptureKind, Instance, Lineage, RecoveryPoint, RegionId, Tags

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"

#: the states, worst first, as status orders them
ORDER = [
    "failing",
    "malformed",
    "late",
    "due",
    "not_backed_up",
    "gone",
    "opted_out",
    "protected",
]


def rv(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"},
    )


def rv_ok(*args: str | Path, cwd: Path) -> str:
    done = rv(*args, cwd=cwd)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def add(cwd: Path, name: str, *tags: str) -> str:
    data = cwd / f"{name}-data"
    data.mkdir()
    (data / "state").write_text(f"{name}\n")
    args: list[str] = ["instances", "add", "--region", "east", "--name", name, "--data", str(data)]
    for tag in tags:
        args += ["--tag", tag]
    return rv_ok(*args, cwd=cwd).splitlines()[-1]


def backup_for_slot(cwd: Path, name: str, slot: datetime) -> None:
    """A scheduled backup of ``name`` made for ``slot`` (as a tick's job would be), through
    the Python API: the scheduler counts the next backup from the slot."""
    site = Site.load(cwd / "site.toml")
    try:
        Engine(site).backup(name, slot=slot)
    finally:
        site.close()


@pytest.fixture
def site_in_every_state(tmp_path: Path) -> dict[str, str]:
    """A site with one instance in each protection state (name -> id); the failing one
    failed its backup in a real tick (its data directory removed)."""
    cwd = tmp_path
    rv_ok("init", cwd=cwd)
    ids: dict[str, str] = {}
    ids["failing"] = add(cwd, "failing", "backup=1-7")
    ids["malformed"] = add(cwd, "malformed", "backup=banana")
    ids["opted_out"] = add(cwd, "opted_out", "backup=none")
    shutil.rmtree(cwd / "failing-data")
    tick = rv("tick", cwd=cwd)
    assert tick.returncode == 1, (tick.stdout, tick.stderr)  # the failing backup

    ids["badops"] = add(cwd, "badops", "backup=1-7", "backup-rpo=soon")
    ids["not_backed_up"] = add(cwd, "not_backed_up", "backup=1-7")
    ids["due"] = add(cwd, "due", "backup=1h-1d")
    ids["late"] = add(cwd, "late", "backup=1h-1d")
    ids["protected"] = add(cwd, "protected", "backup=1-7")
    ids["gone"] = add(cwd, "gone", "backup=1-7")
    now = datetime.now(UTC)
    # due one minute ago (the grace, a tick, is the site's schedule_interval: 5m)
    backup_for_slot(cwd, "due", now - timedelta(hours=1, minutes=1))
    # due two hours ago: late
    backup_for_slot(cwd, "late", now - timedelta(hours=3))
    point = rv_ok("backup", "protected", cwd=cwd).splitlines()[-1]
    rv_ok("copy", point, "--to", "west", cwd=cwd)
    gone = rv_ok("backup", "gone", cwd=cwd).splitlines()[-1]
    rv_ok("copy", gone, "--to", "west", cwd=cwd)
    site = Site.load(cwd / "site.toml")
    try:
        site.region("east").compute.terminate(ids["gone"])
    finally:
        site.close()
    return ids


def test_status_shows_every_instance_with_its_state_worst_first(
    tmp_path: Path, site_in_every_state: dict[str, str]
) -> None:
    ids = site_in_every_state
    done = rv("status", "--json", cwd=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "not protected: 1 failing, 2 malformed, 1 late" in done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    east = {r["instance_name"]: r for r in rows if r["region"] == "local:east"}
    assert {name: r["state"] for name, r in east.items()} == {
        "failing": "failing",
        "malformed": "malformed",
        "badops": "malformed",
        "late": "late",
        "due": "due",
        "not_backed_up": "not_backed_up",
        "gone": "gone",
        "opted_out": "opted_out",
        "protected": "protected",
    }
    assert all(east[name]["instance_id"] == ids[name] for name in ids)
    # the reasons say what is wrong
    assert (
        "data" in east["failing"]["state_reason"] or "No such" in east["failing"]["state_reason"]
    ), east["failing"]["state_reason"]
    assert east["failing"]["state_reason"].startswith("last backup failed: ")
    assert "banana" in east["malformed"]["state_reason"]
    assert "soon" in east["badops"]["state_reason"]
    assert "overdue" in east["late"]["state_reason"]
    assert "never backed up" in east["not_backed_up"]["state_reason"]
    assert "no longer an instance" in east["gone"]["state_reason"]
    assert east["not_backed_up"]["points"] == 0 and east["not_backed_up"]["newest_point"] is None
    assert east["protected"]["points"] == 1 and east["gone"]["points"] == 1
    # every key status printed before is still there, with the two new ones
    assert {"rpo_seconds", "rpo_state", "last_backup_failed", "role"} < set(rows[0])
    assert {"state", "state_reason"} < set(rows[0])

    # the region holding the copies has rows of its own
    west = {r["instance_name"]: r for r in rows if r["region"] == "local:west"}
    assert {name: (r["role"], r["state"]) for name, r in west.items()} == {
        "protected": ("copy", "protected"),
        "gone": ("copy", "gone"),
    }
    assert west["gone"]["state_reason"].startswith("no longer an instance in local:east")

    # worst first
    ranks = [ORDER.index(r["state"]) for r in rows]
    assert ranks == sorted(ranks), [r["state"] for r in rows]

    # the table lists the same, in the same order
    table = rv("status", cwd=tmp_path)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert len(lines) == len(rows)
    cells = [line.split("\t") for line in lines]
    assert [c[0] for c in cells] == [f"{r['instance_name']} ({r['instance_id']})" for r in rows]
    shown = [c[4] for c in cells]
    assert shown == [
        {"failing": "FAILING", "malformed": "MALFORMED", "late": "LATE"}.get(r["state"], r["state"])
        for r in rows
    ]
    assert cells[0][-3].startswith("last backup failed: ")


def test_a_breach_exits_3_over_a_late_row(tmp_path: Path) -> None:
    """An objective breached exits 3 even when rows are late too (the precedence
    docs/commands.md states); a site all protected exits 0."""
    rv_ok("init", cwd=tmp_path)
    add(tmp_path, "nf", "backup=1h-1d")
    point = rv_ok("backup", "nf", cwd=tmp_path).splitlines()[-1]
    status = json.loads(rv_ok("status", "--json", cwd=tmp_path))
    assert [(r["instance_name"], r["state"]) for r in status] == [
        ("nf", "protected"),
        (None, None),  # local:west holds nothing
    ]
    assert status[0]["newest_point"] == point

    # late by its slot; its data older than its RPO objective (1s) by the time status reads
    add(tmp_path, "old", "backup=1h-1d", "backup-rpo=1s")
    backup_for_slot(tmp_path, "old", datetime.now(UTC) - timedelta(hours=3))
    time.sleep(1.1)
    done = rv("status", "--json", cwd=tmp_path)
    assert done.returncode == 3, (done.stdout, done.stderr)
    rows = {r["instance_name"]: r for r in json.loads(done.stdout)}
    assert rows["old"]["state"] == "late" and rows["old"]["rpo_state"] == "breached"
    assert "not protected: 1 late" in done.stderr and "breach" in done.stderr


# --------------------------------------------------------------------- the rules, a fixed clock

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=5)


def point(
    pid: str, created: datetime, *, slot: datetime | None = None, source: str | None = None
) -> RecoveryPoint:
    return RecoveryPoint(
        id=pid,
        region="local:west" if source else "local:east",
        instance_id="i-1",
        instance_name="nf",
        kind=CaptureKind.FILES,
        created_at=created,
        expires_at=None,
        size=1,
        lineage=Lineage("local:east", source) if source else None,
        tags=Tags({SLOT_TAG: format_slot(slot)} if slot else {}),
    )


def judge(tags: dict[str, str], points: list[RecoveryPoint], failed: str | None = None) -> str:
    config = parse_site(
        tomllib.loads(
            '[regions."local:east"]\nroot = "e"\n[regions."local:west"]\nroot = "w"\n'
            '[[replication]]\nfrom = "local:east"\nto = ["local:west"]\n'
        ),
        source="site.toml",
        base_dir=Path("/nonexistent"),
    )
    instance = Instance(id="i-1", name="nf", region="local:east", tags=Tags(tags))
    judged = judge_home(
        instance, points, site=config, now=NOW, grace=GRACE, last_failure=lambda i, p: failed
    )
    return f"{judged.state}: {judged.reason}"


def test_due_and_late_count_from_the_newest_slot_and_a_ticks_grace() -> None:
    hourly = {"backup": "1h-1d"}
    slot = NOW - timedelta(hours=1)  # due exactly now
    assert judge(hourly, [point("a", NOW, slot=slot)]).startswith("due: ")
    assert judge(hourly, [point("a", NOW, slot=slot + timedelta(seconds=1))]).startswith(
        "protected: every 1h: next backup due in 1s"
    )
    assert judge(hourly, [point("a", NOW, slot=slot - GRACE)]).startswith("due: ")
    late = judge(hourly, [point("a", NOW, slot=slot - GRACE - timedelta(seconds=1))])
    assert late == "late: every 1h: backup overdue by 5m1s (grace 5m)"
    # no slot recorded (a manual backup): counted from its creation
    assert judge(hourly, [point("a", NOW - timedelta(hours=2))]).startswith("late: ")
    # the newest point by arrival decides, as the scheduler's
    older = point("a", NOW - timedelta(hours=3), slot=NOW - timedelta(hours=3))
    newer = point("b", NOW, slot=NOW)
    assert judge(hourly, [older, newer]).startswith("protected: ")
    # a failure wins over every time rule; a malformed tag over a failure
    assert judge(hourly, [newer], failed="boom") == "failing: last backup failed: boom"
    assert judge({"backup": "1h-x"}, [newer], failed="boom").startswith("malformed: tag backup=")
    assert judge({"backup": "none"}, []) == "opted_out: backup=none"
    assert judge({"backup": "1h-1d", "backup-drill": "often"}, []).startswith(
        "malformed: tag backup-drill="
    )
    assert judge(hourly, []).startswith("not_backed_up: never backed up (every 1h)")


def test_a_copy_region_is_late_when_the_homes_newest_backup_has_not_reached_it() -> None:
    copy = point("c", NOW - timedelta(hours=1), source="a")
    home_old = point("a", NOW - timedelta(hours=1))
    home_new = point("b", NOW - GRACE - timedelta(seconds=1))
    copying = Policy(
        frequency=timedelta(hours=1),
        retention=timedelta(days=1),
        copies=(CopyTarget(RegionId.parse("local:west"), timedelta(days=1)),),
    )
    elsewhere = Policy(frequency=timedelta(hours=1), retention=timedelta(days=1))

    def state(home: RecoveryPoint | None, policy: Policy | None, opted_out: bool = False) -> str:
        judged = judge_copies(
            "local:west",
            [copy],
            home_newest=home,
            home_policy=policy,
            opted_out=opted_out,
            now=NOW,
            grace=GRACE,
        )
        return f"{judged.state}: {judged.reason}"

    assert state(home_old, copying) == "protected: copies of local:east, up to date"
    assert state(home_new, copying).startswith("late: newest backup b in local:east not copied")
    # within the grace: the tick that made it copies it
    recent = point("b", NOW - GRACE)
    assert state(recent, copying).startswith("protected: ")
    assert state(home_new, elsewhere).startswith("protected: copies of local:east kept")
    assert state(None, None).startswith("protected: ")  # home not readable: not judged
    assert state(home_new, copying, opted_out=True).startswith("opted_out: ")
    assert [state_rank(s) for s in ORDER] == sorted(state_rank(s) for s in ORDER)


def test_status_on_an_80_column_terminal_fits_and_wide_shows_every_column(
    tmp_path: Path, site_in_every_state: dict[str, str]
) -> None:
    from test_cli_ux import Terminal

    rows: list[dict[str, Any]] = json.loads(rv("status", "--json", cwd=tmp_path).stdout)
    term = Terminal("status", cwd=tmp_path, columns=80)
    assert term.wait() == 1, term.text
    lines = term.text.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), term.text
    assert "…" not in term.text
    # one line per row, in the same order, each with its name, region and state word whole
    header = next(n for n, line in enumerate(lines) if line.startswith("instance"))
    body = lines[header + 2 : header + 2 + len(rows)]
    for line, row in zip(body, rows, strict=True):
        cells = line.split()
        state = {"failing": "FAILING", "malformed": "MALFORMED", "late": "LATE"}.get(
            row["state"], row["state"]
        )
        assert cells[:3] == [row["instance_name"], row["region"].split(":")[1], state], line
        if row["newest_point"]:
            assert cells[3] == row["newest_point"][:8], line
    # why, under the table, for each row that is failing, malformed or late
    notes = "\n".join(lines[header + 2 + len(rows) :])
    assert "failing (east): last backup failed: " in notes, term.text
    assert "banana" in notes and "soon" in notes and "overdue" in notes, term.text
    assert "never backed up" not in notes  # not_backed_up is not an alarm

    wide = Terminal("status", "--wide", cwd=tmp_path, columns=400)
    assert wide.wait() == 1, wide.text
    assert all(f"{r['instance_name']} ({r['instance_id']})" in wide.text for r in rows)
    assert "local:west" in wide.text and "never backed up" in wide.text


def test_jobs_on_an_80_column_terminal_name_the_job_and_wide_keeps_its_key(
    tmp_path: Path,
) -> None:
    from test_cli_ux import Terminal

    rv_ok("init", cwd=tmp_path)
    add(tmp_path, "a-long-instance-name", "backup=1-7")
    rv_ok("tick", cwd=tmp_path)
    history = json.loads(rv("jobs", "--json", cwd=tmp_path).stdout)
    (backup,) = (j for j in history if j["kind"] == "backup")
    (copy,) = (j for j in history if j["kind"] == "copy")
    slot = datetime.fromisoformat(backup["key"].rsplit("/", 1)[1])
    for args in (["jobs"], ["status", "--jobs", "20"]):
        term = Terminal(*args, cwd=tmp_path, columns=80)
        assert term.wait() == 0, term.text
        lines = term.text.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), term.text
        assert "i-" not in term.text and "local:" not in term.text, term.text
        # the backup by its instance's name and slot, the copy by its short point and
        # region, each on one line
        assert any(
            "backup" in line and f"{slot:%m-%d %H:%M} a-long-instance-name" in line
            for line in lines
        ), term.text
        point = backup["result"]["point"]
        assert any("copy" in line and f"{point[:8]} west" in line for line in lines), term.text
    assert copy["key"].split("/")[2] == point

    wide = Terminal("jobs", "--wide", cwd=tmp_path, columns=400)
    assert wide.wait() == 0, wide.text
    assert all(j["key"] in wide.text for j in history), wide.text
    # not a terminal: every column, the whole key last
    plain = [line.split("\t") for line in rv_ok("jobs", cwd=tmp_path).splitlines()]
    assert [cells[-1] for cells in plain] == [j["key"] for j in history]
