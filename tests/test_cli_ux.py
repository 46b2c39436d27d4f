"""The CLI for people (issue #20, items 2 to 4): progress on a terminal and not elsewhere,
``--json`` on backup, copy and run, ``-q`` / ``-v``, Ctrl-C during tick, backup and copy, and
tables that fit 80 columns (short ids and regions, human sizes, ``--bytes``, ``--wide``).

Terminal behaviour runs the console script in a pseudo-terminal (python's ``pty``), every
wait bounded."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from cli_support import ok, run
from regionvault.core.cli.output import (
    human_age,
    human_duration,
    human_size,
    short_ids,
    short_regions,
)

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
POINT_ID = re.compile(r"[0-9a-f]{32}")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REGIONVAULT_SITE", "COLUMNS")}
    env.update(extra)
    return env


class Terminal:
    """The console script with standard input, output and error on one pseudo-terminal
    (what a person at a shell has). ``read_until`` and ``wait`` are bounded."""

    def __init__(
        self, *args: str, cwd: Path, columns: int = 100, program: list[str] | None = None
    ) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [*(program or [str(CONSOLE_SCRIPT)]), *args],
            cwd=cwd,
            env=_env(COLUMNS=str(columns), TERM="xterm"),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        self.raw += data
        return bool(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def read_until(self, needle: str, *, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not self._pump(min(left, 0.2)) and self.proc.poll() is not None:
                return needle in self.text
        return True

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.1)
        while self._pump(0.05):  # what is left in the terminal's buffer
            pass
        code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        os.close(self.master)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


MakeTerminal = Callable[..., Terminal]


@pytest.fixture
def terminal() -> Iterator[MakeTerminal]:
    """Makes :class:`Terminal` s, and kills any still running when the test ends."""
    made: list[Terminal] = []

    def make(
        *args: str, cwd: Path, columns: int = 100, program: list[str] | None = None
    ) -> Terminal:
        made.append(Terminal(*args, cwd=cwd, columns=columns, program=program))
        return made[-1]

    yield make
    for t in made:
        t.kill()


def _data(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    # incompressible, so that the backup takes a moment and moves every byte
    (root / "big.bin").write_bytes(os.urandom(size))
    (root / "conf.txt").write_text("apn = internet\n")
    return root


def _add(workdir: Path, name: str, size: int) -> str:
    data = _data(workdir / f"{name}-data", size)
    added = ok("instances", "add", "--region", "east", "--name", name, "--data", data)
    return added.stdout.split()[-1]


@pytest.fixture
def small(workdir: Path) -> str:
    return _add(workdir, "nf1", 200_000)


@pytest.fixture
def big(workdir: Path) -> str:
    return _add(workdir, "big", 64 << 20)


# --------------------------------------------------------------------------- units


def test_one_duration_scheme() -> None:
    assert [human_duration(s) for s in (0, 45, 125, 3600 + 7 * 60, 26 * 3600, 76 * 3600)] == [
        "0s",
        "45s",
        "2m05s",
        "1h07m",
        "26h",
        "3d4h",
    ]
    assert human_duration(3 * 86400) == "3d" and human_age(None) == "-"
    assert human_age(84) == "1m24s"  # not "84s" beside another row's "2m"


def test_human_sizes_and_raw_bytes() -> None:
    assert human_size(0) == "0 B" and human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB" and human_size(3_000_000) == "2.86 MiB"
    assert human_size(5 << 40) == "5.0 TiB"
    assert human_size(3_000_000, raw=True) == "3000000"


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (int(9.996 * 1024), "10 KiB"),  # rounds to 10: no "10.0"
        (int(999.4 * 1024), "999 KiB"),
        (int(999.6 * 1024), "0.976 MiB"),  # was "1e+03 KiB"
        (1023576, "0.976 MiB"),
        ((1 << 20) - 100, "1.0 MiB"),  # 1023.9 KiB: was "1024 KiB"
        (1 << 20, "1.0 MiB"),
        (1048261427, "0.976 GiB"),  # was "1e+03 MiB"
        ((1 << 40) - 1, "1.0 TiB"),
        (2000 << 40, "2000 TiB"),  # the last unit grows, in whole units
    ],
)
def test_human_size_at_the_unit_boundaries(size: int, shown: str) -> None:
    assert human_size(size) == shown
    assert "e+" not in human_size(size)


def test_short_ids_are_unique_prefixes_of_at_least_eight() -> None:
    ids = ["b535243a" + "0" * 24, "b535243a9" + "1" * 23, "6953e06d" + "2" * 24]
    short = short_ids(ids)
    assert short[ids[2]] == "6953e06d"
    assert short[ids[0]] == "b535243a0" and short[ids[1]] == "b535243a9"
    assert all(ident.startswith(short[ident]) for ident in ids)
    assert len(set(short.values())) == 3
    assert short_ids(ids, wide=True) == {i: i for i in ids}


def test_short_region_names_only_where_unambiguous() -> None:
    names = ["local:east", "local:west", "aws:west"]
    assert short_regions(names) == {
        "local:east": "east",
        "local:west": "local:west",
        "aws:west": "aws:west",
    }
    assert short_regions(names, wide=True)["local:east"] == "local:east"


# --------------------------------------------------------------------------- tables


def test_points_fit_80_columns_with_short_ids_and_human_sizes(
    workdir: Path, small: str, terminal: MakeTerminal
) -> None:
    rp = ok("backup", "nf1").stdout.split()[-1]
    cp = ok("copy", rp, "--to", "west").stdout.split()[-1]
    term = terminal("points", cwd=workdir, columns=80)
    assert term.wait() == 0, term.text
    lines = term.text.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), term.text
    assert "…" not in term.text
    rows = [line for line in lines if line[:8] in (rp[:8], cp[:8])]
    assert len(rows) == 2, term.text
    home = next(r for r in rows if r.startswith(rp[:8]))
    copy = next(r for r in rows if r.startswith(cp[:8]))
    assert home.split()[1] == "east" and copy.split()[1] == "west"
    assert f"east/{rp[:8]}" in copy  # the source point, short too
    assert "KiB" in home and "200,735" not in term.text
    # each date whole on its row's line (month-day hour:minute), never split over two
    for row, point in ((home, rp), (copy, cp)):
        listed = next(p for p in json.loads(ok("points", "--json").stdout) if p["id"] == point)
        created = datetime.fromisoformat(listed["created_at"]).strftime("%m-%d %H:%M")
        assert created in row, term.text

    raw = terminal("points", "--bytes", cwd=workdir, columns=80)
    assert raw.wait() == 0, raw.text
    size = next(p["size"] for p in json.loads(ok("points", "--json").stdout) if p["id"] == rp)
    assert str(size) in raw.text and "KiB" not in raw.text

    wide = terminal("points", "--wide", cwd=workdir, columns=200)
    assert wide.wait() == 0, wide.text
    assert rp in wide.text and cp in wide.text and "local:west" in wide.text

    # not a terminal: the tab-separated lines for scripts keep every value whole
    plain = [line.split("\t") for line in ok("points").stdout.splitlines()]
    assert [(cells[0], cells[1]) for cells in plain] == [(rp, "local:east"), (cp, "local:west")]


# --------------------------------------------------------------------------- --json


def test_backup_and_copy_json_documents(workdir: Path, small: str) -> None:
    backed = json.loads(ok("backup", "nf1", "--json").stdout)
    assert POINT_ID.fullmatch(backed["id"]) and backed["instance_id"] == small
    assert backed["region"] == "local:east" and backed["incomplete"] is False
    assert backed["stats"]["files"] == 2 and backed["issues_listed"] == []

    copied = json.loads(ok("copy", backed["id"], "--to", "west", "--json").stdout)
    assert copied["region"] == "local:west" and copied["existing"] is False
    source = {"source_region": "local:east", "source_recovery_point": backed["id"]}
    assert copied["lineage"] == source
    assert copied["chunks_sent"] == copied["chunks_total"] > 0

    again = json.loads(ok("copy", backed["id"], "--to", "west", "--json").stdout)
    assert again["existing"] is True and again["id"] == copied["id"]

    # without --json: the id alone on the last line of standard output, as scripts expect
    plain = ok("backup", "nf1")
    assert POINT_ID.fullmatch(plain.stdout.strip())


def test_run_json_is_one_document_per_tick_and_its_lines_are_stamped(
    workdir: Path, small: str
) -> None:
    lines = ok("run", "--json", "--max-ticks", "2", "--interval", "1s").stdout.splitlines()
    ticks = [json.loads(line) for line in lines]
    assert len(ticks) == 2 and all(t["outcome"] == "ok" for t in ticks)
    assert any(j["kind"] == "backup" and j["status"] == "done" for j in ticks[0]["jobs"])

    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
    result = ok("run", "--max-ticks", "1", "--interval", "1s")
    assert result.stdout and all(stamp.match(line) for line in result.stdout.splitlines())
    assert all(stamp.match(line) for line in result.stderr.splitlines()), result.stderr


# --------------------------------------------------------------------------- progress, -q, -v


def test_progress_on_a_terminal_for_tick_run_and_copy_and_quiet_silences_it(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    tick = terminal("tick", cwd=workdir)
    assert tick.read_until("tick: backups (1 job)"), tick.text
    assert tick.wait() == 0, tick.text

    daemon = terminal("run", "--max-ticks", "1", "--interval", "1s", cwd=workdir)
    assert daemon.read_until("run: waiting for the next tick"), daemon.text
    assert daemon.wait() == 0, daemon.text

    rp = ok("backup", "big").stdout.split()[-1]
    copy = terminal("copy", rp, "--to", "west", "--from", "east", cwd=workdir)
    # a copy of a point whose chunks west holds already still reports them
    assert copy.read_until(f"copy {rp[:8]} to west"), copy.text
    assert copy.wait() == 0, copy.text

    quiet = terminal("-q", "backup", "big", cwd=workdir)
    assert quiet.wait() == 0, quiet.text
    text = quiet.text.strip()
    assert POINT_ID.fullmatch(text), text  # the id alone: no progress, no summary


#: a byte count as the progress bars show it: binary units, as every table
BINARY_SIZE = r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB)"


def test_backup_restore_and_verify_bars_speak_binary_units_as_the_tables(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    done_of_total = re.compile(rf"{BINARY_SIZE}/{BINARY_SIZE}")
    decimal = re.compile(r"\d (?:kB|MB|GB)\b")
    backup = terminal("backup", "big", cwd=workdir)
    assert backup.wait() == 0, backup.text
    point = backup.text.split()[-1]
    assert POINT_ID.fullmatch(point), backup.text
    restore = terminal("restore", point, "-r", "east", "-t", str(workdir / "out"), cwd=workdir)
    assert restore.wait() == 0, restore.text
    verify = terminal("verify", "--read-data", "-r", "east", cwd=workdir)
    assert verify.wait() == 0, verify.text
    for term in (backup, restore, verify):
        assert done_of_total.search(term.text), term.text  # the bar was drawn, in KiB/MiB
        assert not decimal.search(term.text), term.text  # never kB or MB beside them
    assert re.search(rf"{BINARY_SIZE}/64 MiB", backup.text), backup.text  # not 67.1 MB


def test_no_progress_when_standard_error_is_not_a_terminal(workdir: Path, big: str) -> None:
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "backup", "big"],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "backup big" not in proc.stderr
    assert proc.stderr.startswith("backed up big")


def test_quiet_and_verbose(workdir: Path, small: str) -> None:
    quiet = ok("-q", "backup", "nf1")
    assert quiet.stderr == "" and POINT_ID.fullmatch(quiet.stdout.strip())
    verbose = ok("-v", "tick")
    stamped_info = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO regionvault\S*: tick: tag: 2 job\(s\)$"
    assert re.search(stamped_info, verbose.stderr, re.M), verbose.stderr
    both = run("-q", "-v", "points")
    assert both.exit_code == 2 and "cannot be used together" in both.stderr
    # the next command line is as Python's default again (nothing at INFO)
    assert " INFO " not in ok("tick").stderr


# --------------------------------------------------------------------------- Ctrl-C


def _verified(workdir: Path) -> None:
    report = json.loads(ok("verify", "--json").stdout)
    assert report and all(r["ok"] for r in report), report


def test_one_ctrl_c_during_tick_stops_at_the_next_step_and_the_next_tick_finishes(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    tick = terminal("tick", cwd=workdir)
    assert tick.read_until("tick: backups"), tick.text
    tick.proc.send_signal(signal.SIGINT)
    assert tick.wait() == 130, tick.text
    assert "stops at its next safe point" in tick.text
    (state,) = [line for line in tick.text.splitlines() if "regionvault: interrupted:" in line]
    # what was committed (the backup's point), and what the next tick does (the copy)
    (point,) = [p for p in json.loads(ok("points", "--json").stdout)]
    assert f"committed backup {point['id']}" in state and point["region"] == "local:east"
    assert "not run: copies: 1 job(s) not run" in state and "next tick" in state
    assert "Traceback" not in tick.text and "Aborted" not in tick.text

    done = ok("tick")
    assert "copy" in done.stdout
    regions = sorted(p["region"] for p in json.loads(ok("points", "--json").stdout))
    assert regions == ["local:east", "local:west"]
    _verified(workdir)


def test_a_second_ctrl_c_exits_at_once_and_the_next_tick_finishes(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    tick = terminal("tick", cwd=workdir)
    assert tick.read_until("tick: backups"), tick.text
    tick.proc.send_signal(signal.SIGINT)
    assert tick.read_until("stops at its next safe point", timeout=30), tick.text
    tick.proc.send_signal(signal.SIGINT)
    assert tick.wait(timeout=30) == 130, tick.text
    assert "interrupted again: exiting now" in tick.text and "Traceback" not in tick.text
    # the progress display hid the cursor; the exit at once shows it again
    raw = tick.raw.decode("utf-8", "replace")
    assert "\x1b[?25l" in raw and raw.rindex("\x1b[?25h") > raw.rindex("\x1b[?25l"), raw
    # it did not wait for the backup's commit (under load the backup may still have
    # committed before the second Ctrl-C arrived: never more than that one point, and
    # nothing torn, which the next tick and the verify below show)
    assert len(json.loads(ok("points", "--json").stdout)) <= 1

    # the next tick takes the lock the exit left (its process is gone), does the backup
    # and the copy, and every vault verifies
    result = ok("tick")
    regions = sorted(p["region"] for p in json.loads(ok("points", "--json").stdout))
    assert regions == ["local:east", "local:west"], result.stdout
    _verified(workdir)


def test_ctrl_c_during_backup_finishes_the_commit_and_exits_130(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    backup = terminal("backup", "big", cwd=workdir)
    assert backup.read_until("backup big"), backup.text  # the progress bar: under way
    backup.proc.send_signal(signal.SIGINT)
    assert backup.wait() == 130, backup.text
    (point,) = json.loads(ok("points", "--json").stdout)
    assert f"interrupted: the backup finished first: point {point['id']} is committed" in (
        backup.text
    )
    _verified(workdir)


def test_the_stopped_state_names_each_job_by_its_kind() -> None:
    from datetime import UTC, datetime

    from regionvault.core.cli.tick import _stopped_state
    from regionvault.core.pipeline.jobs import JobOutcome, JobStatus
    from regionvault.core.pipeline.reports import TickReport

    done = JobStatus.DONE
    report = TickReport(at=datetime.now(UTC), notes=["stopped before retention: 2 job(s) not run"])
    report.jobs += [
        JobOutcome("b", "backup", "local:east", done, result={"point": "b" * 32}),
        # a drill's result names the copy it drilled, and commits nothing
        JobOutcome("d", "drill", "local:west", done, result={"point": "d" * 32, "launched": "i-9"}),
        # a receipt records a copy another region's tick made
        JobOutcome(
            "r", "copy-receipt", "local:east", done, result={"copy": "r" * 32, "recorded": True}
        ),
        JobOutcome(
            "x", "copy-receipt", "local:east", done, result={"copy": None, "recorded": False}
        ),
        JobOutcome(
            "c", "copy-commit", "local:west", done, result={"copy": "c" * 32, "existing": False}
        ),
        JobOutcome("e", "copy", "local:west", done, result={"copy": "e" * 32, "existing": True}),
        # the request phase may name the copy already there: not a commit either
        JobOutcome("q", "copy-request", "local:west", done, result={"existing": "q" * 32}),
    ]
    state = _stopped_state(report)
    assert state == (
        f"committed backup {'b' * 32}, copy {'c' * 32}; "
        f"done drill of {'d' * 32}, receipt of copy {'r' * 32}; "
        "not run: retention: 2 job(s) not run (the next tick runs them)"
    )
    assert "backup " + "d" * 32 not in state and "q" * 32 not in state and "e" * 32 not in state


# the CLI with a slow vault read after the backup's commit (what S3 latency looks like): the
# manifest's read back waits, bounded, until the test creates the file RELEASE names
_SLOW_READ = """
import os, sys, time
from regionvault.core.pipeline import engine
from regionvault.core.repository import repository
committed = []
backup = engine.Engine.backup
def slow_backup(self, *a, **k):
    point = backup(self, *a, **k)
    committed.append(point)
    return point
engine.Engine.backup = slow_backup
load = repository.Repository.load_manifest
def slow_load(self, *a, **k):
    if committed:
        sys.stderr.write("SLOW READ\\n")
        sys.stderr.flush()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.environ["RELEASE"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return load(self, *a, **k)
repository.Repository.load_manifest = slow_load
from regionvault.core.cli import main
sys.argv[0] = "regionvault"
main()
"""


def test_ctrl_c_after_the_backups_commit_still_prints_its_id_and_exits_130(
    workdir: Path, big: str, terminal: MakeTerminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = workdir / "slow_read.py"
    script.write_text(_SLOW_READ)
    release = workdir / "release"
    monkeypatch.setenv("RELEASE", str(release))
    backup = terminal("backup", "big", cwd=workdir, program=[sys.executable, str(script)])
    assert backup.read_until("SLOW READ"), backup.text  # committed; its manifest is read back
    backup.proc.send_signal(signal.SIGINT)
    assert backup.read_until("stops at its next safe point", timeout=30), backup.text
    release.touch()
    assert backup.wait() == 130, backup.text
    (point,) = json.loads(ok("points", "--json").stdout)
    lines = backup.text.splitlines()
    assert point["id"] in lines, backup.text  # the id alone on its line, as without Ctrl-C
    assert f"the backup finished first: point {point['id']} is committed" in backup.text
    assert "Aborted" not in backup.text


def test_ctrl_c_during_copy_finishes_the_commit_and_exits_130(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    rp = ok("backup", "big").stdout.split()[-1]
    copy = terminal("copy", rp, "--to", "west", cwd=workdir)
    assert copy.read_until(f"copy {rp[:8]} to west"), copy.text
    copy.proc.send_signal(signal.SIGINT)
    assert copy.wait() == 130, copy.text
    (west,) = json.loads(ok("points", "--region", "west", "--json").stdout)
    assert west["lineage"]["source_recovery_point"] == rp
    assert f"the copy finished first: point {west['id']} is committed in west" in copy.text
    # the id is still the last line a script reads before the state line
    assert copy.text.splitlines().count(west["id"]) == 1
    _verified(workdir)


@pytest.mark.parametrize("command", [["status"], ["points"], ["verify"]])
def test_ctrl_c_in_any_other_command_exits_130_not_aborted(
    workdir: Path, small: str, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    from regionvault.core.cli.root import CliState

    def interrupted(self: CliState) -> None:
        raise KeyboardInterrupt

    # a Ctrl-C while the site loads (what each of them does first)
    monkeypatch.setattr(CliState, "site", interrupted)
    result = run(*command)
    assert result.exit_code == 130, (result.stdout, result.stderr)
    assert result.stderr.strip() == "regionvault: interrupted"
    assert "Aborted" not in result.stdout + result.stderr


def test_sigterm_in_run_says_the_tick_in_progress_finishes_whole_and_it_does(
    workdir: Path, big: str, terminal: MakeTerminal
) -> None:
    daemon = terminal("run", "--interval", "1h", cwd=workdir)
    assert daemon.read_until("run: backups"), daemon.text
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.text
    assert "SIGTERM: the tick in progress finishes (all its steps), then run stops" in daemon.text
    assert "stopped after 1 tick(s)" in daemon.text
    # not only the backup it was in: the tick's copy ran too (run's stop is not a halt)
    regions = sorted(p["region"] for p in json.loads(ok("points", "--json").stdout))
    assert regions == ["local:east", "local:west"], daemon.text


def test_status_on_a_terminal_keeps_short_ids_regions_and_ages_on_one_line(
    workdir: Path, small: str, terminal: MakeTerminal
) -> None:
    rp = ok("backup", "nf1").stdout.split()[-1]
    cp = ok("copy", rp, "--to", "west").stdout.split()[-1]
    term = terminal("status", cwd=workdir, columns=80)
    assert term.wait() == 0, term.text
    lines = term.text.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in term.text, term.text
    # each row's name, region, state and newest point (short) whole on one line, and the
    # copy's age in the one duration scheme
    home = next(line for line in lines if " east " in line and rp[:8] in line)
    away = next(line for line in lines if " west " in line and cp[:8] in line)
    assert home.split()[:3] == ["nf1", "east", "protected"], term.text
    assert away.split()[:3] == ["nf1", "west", "protected"], term.text
    assert rp[:12] not in home and re.search(r" \d+(?:s|m\d\ds) ago ", away), term.text
    assert "local:" not in term.text and small not in term.text
    # --wide: every column, whole
    wide = terminal("status", "--wide", cwd=workdir, columns=300)
    assert wide.wait() == 0, wide.text
    assert f"nf1 ({small})" in wide.text and rp in wide.text and "local:west" in wide.text
    # not on a terminal: tab-separated whole values, for scripts, the 13 columns of old
    plain = ok("status").stdout.splitlines()
    assert any("\tlocal:east\t" in line and rp in line for line in plain), plain
    assert all(len(line.split("\t")) == 13 for line in plain), plain


def test_audit_on_a_terminal_shows_short_ids_and_regions_and_wide_the_whole(
    workdir: Path, small: str, terminal: MakeTerminal
) -> None:
    rp = ok("backup", "nf1").stdout.split()[-1]
    term = terminal("audit", cwd=workdir, columns=80)
    term.wait()
    # the table's lines (not the closing error line: this site has no copy yet)
    lines = [line for line in term.text.splitlines() if not line.startswith("regionvault:")]
    assert all(len(line) <= 80 for line in lines) and "…" not in term.text, [
        line for line in lines if len(line) > 80
    ]
    backed_up = next(line for line in lines if " backed_up " in line)
    assert backed_up.split()[:4] == ["nf1", "east", "backed_up", "passed"], term.text
    assert rp[:8] in backed_up and rp not in term.text
    wide = terminal("audit", "--wide", cwd=workdir, columns=300)
    wide.wait()
    assert rp in wide.text and "local:east" in wide.text, wide.text
    # not on a terminal: whole values for scripts
    plain = run("audit").stdout.splitlines()
    assert any(line.startswith("nf1\tlocal:east\tbacked_up\tpassed\t") and rp in line
               for line in plain), plain  # fmt: skip
