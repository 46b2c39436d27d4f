"""kill -9 trials through the command line: ``regionvault backup``, ``copy``, ``prune`` and
``restore`` run as processes against a local site and are SIGKILLed at a random moment;
after every kill the vault passes ``verify --read-data``, the same command run again
succeeds, and the data is all there (the point it made restores byte-exact).

tests/test_repository_crash.py kills backups and prunes made through the Python API; these
trials take the evidence to the CLI and to copy and restore.

Kill moments come from a seeded RNG and one measured, unkilled run of the same kind of
command: the first trial of each operation kills after a delay within that run's duration
(start-up included); the others kill once the command has made the k-th of the changes the
measured run made under the regions' roots, or a restore's target (a name appearing or
vanishing: a temporary file, a pack, an index, a manifest, a lock, a staging directory, a
restored file), k drawn at random, plus up to
5 ms, so the kills fall across the writing rather than in the interpreter's start-up. A
last test kills a backup, a copy and a prune the moment they have a temporary file and
checks that ``verify --repair`` leaves none. Each trial prints its seed and moment (shown
with a failure); REGIONVAULT_KILL_SEED picks another seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from regionvault.core.cli import cli
from regionvault.core.pipeline import Engine
from regionvault.core.site import Site
from repository_support import snapshot

#: the console script pip installed next to this interpreter
CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
SEED = int(os.environ.get("REGIONVAULT_KILL_SEED", "13"))
#: trials per operation
TRIALS = 4
#: the instance's data: this many files of 1 MiB, of which a trial rewrites CHANGED
FILES, CHANGED = 20, 12
MiB = 1 << 20
TEMP_PREFIX = ".rv-tmp-"
#: seconds between two looks at what a running command has written
POLL = 0.002

pytestmark = pytest.mark.slow


class Changes:
    """Counts the names that appear or vanish under ``top`` (a vault, its inboxes, a restore
    target), polled: the moments a command writes something, to kill it at one of them."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.names = self._names()
        self.count = 0

    def _names(self) -> set[str]:
        # os.walk ignores a directory that vanishes while it is read
        return {f"{d}/{n}" for d, dirs, files in os.walk(self.top) for n in dirs + files}

    def poll(self) -> int:
        now = self._names()
        self.count += len(now ^ self.names)
        self.names = now
        return self.count


@dataclass(frozen=True)
class Measured:
    """One whole run of a command: how long it took and how many changes it made."""

    seconds: float
    changes: int


@dataclass
class Rig:
    """A two-region local site in ``root`` with one instance, ``nf``, whose data is ``data``."""

    root: Path
    rng: random.Random
    name: str
    #: expected tree of every point made, by id
    trees: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> Path:
        return self.root / "site.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def regions(self) -> Path:
        return self.root / "regions"

    def cli(self, *args: str | Path) -> str:
        """Run a command in this process (checks are quicker so); its standard output."""
        result = CliRunner().invoke(
            cli, ["--site", str(self.site), *map(str, args)], catch_exceptions=False
        )
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def start(self, *args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(CONSOLE_SCRIPT), "--site", str(self.site), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"},
        )

    def run(self, *args: str | Path) -> str:
        """Run a command to its end as a process (the re-run after a kill); its last line."""
        proc = self.start(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (args, out, err)
        assert "Traceback" not in err, err
        lines = out.strip().splitlines()
        return lines[-1] if lines else ""

    def measure(self, *args: str | Path, watch: Path) -> tuple[str, Measured]:
        """Run a command whole, counting the changes it makes under ``watch``."""
        changes = Changes(watch)
        started = time.monotonic()
        proc = self.start(*args)
        while proc.poll() is None and time.monotonic() - started < 120:
            changes.poll()
            time.sleep(POLL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (args, out, err)
        measured = Measured(time.monotonic() - started, changes.poll())
        print(f"measured {args}: {measured}")
        return out.strip().splitlines()[-1] if out.strip() else "", measured

    def kill(
        self,
        trial: int,
        *args: str | Path,
        watch: Path,
        measured: Measured,
        until: Callable[[], bool] | None = None,
    ) -> bool:
        """Start the command and SIGKILL it at a random moment: in the first trial after a
        delay within the measured run's duration (start-up included), in the others once
        it has made a random number of the changes the measured run made (plus up to 5 ms);
        with ``until``, as soon as that is true. Whether it was killed (not finished first)."""
        if until is not None:
            delay, changes, moment = 0.0, 0, "when it has written a temporary file"
        elif trial == 0:
            delay, changes = self.rng.uniform(0, measured.seconds), 0
            moment = f"after {delay:.3f}s of {measured.seconds:.3f}s"
        else:
            delay = self.rng.uniform(0, 0.005)
            changes = self.rng.randint(1, max(1, measured.changes))
            moment = f"{delay:.3f}s after change {changes} of {measured.changes}"
        print(f"kill trial {self.name} #{trial} (seed {SEED}): SIGKILL {moment}: {args}")
        watching = Changes(watch)
        proc = self.start(*args)
        try:
            deadline = time.monotonic() + 120
            while (
                proc.poll() is None
                and watching.poll() < changes
                and (until is None or not until())
                and time.monotonic() < deadline
            ):
                time.sleep(POLL)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.communicate(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        print(f"  {'killed' if killed else f'had finished, exit status {proc.returncode}'}")
        return killed

    def verify(self, *, clean: bool = False) -> None:
        """``verify --read-data`` passes in every region holding a repository; with
        ``clean``, nothing unreferenced is left either."""
        for row in json.loads(self.cli("verify", "--read-data", "--json")):
            assert row["ok"] and row["errors"] == [], row
            if clean:
                assert row["warnings"] == [], row

    def assert_restores(self, point: str, region: str, target: Path) -> None:
        self.cli("restore", point, "--region", region, "--target", target)
        assert snapshot(target) == self.trees[point], f"{point} in {region}"

    def new_data(self, files: int, *, changed: int) -> None:
        """Rewrite ``changed`` of the ``files`` 1 MiB files of the data (all when new)."""
        self.data.mkdir(exist_ok=True)
        for i in self.rng.sample(range(files), k=changed):
            (self.data / f"f{i:02d}.bin").write_bytes(self.rng.randbytes(MiB))

    def backup(self) -> str:
        """A point of the data now, made in this process."""
        point = self.cli("backup", "nf").splitlines()[-1]
        self.trees[point] = snapshot(self.data)
        return point

    def work_for_prune(self) -> None:
        """A point forgotten whose packs hold chunks a kept point shares: a prune deletes
        and rewrites packs."""
        self.new_data(FILES, changed=CHANGED)
        gone = self.backup()
        self.new_data(FILES, changed=CHANGED // 2)
        self.backup()
        with Site.load(self.site) as site:  # the CLI has no forget: retention does it
            Engine(site).repository("local:east").forget([gone])
        del self.trees[gone]

    def temporaries(self) -> list[Path]:
        return list(self.regions.rglob(f"{TEMP_PREFIX}*"))

    def new_temporary(self) -> Callable[[], bool]:
        """An ``until`` for :meth:`kill`: a temporary file is there that is not there now."""
        before = set(self.temporaries())
        return lambda: bool(set(self.temporaries()) - before)

    def inbox_files(self) -> list[Path]:
        return [p for p in self.regions.glob("*/inbox/**/*") if p.is_file()]

    def vault_files(self, region: str, prefix: str) -> list[Path]:
        top = self.regions / region / "vault" / "objects" / prefix
        found = top.rglob("*") if top.exists() else iter(())
        return [p for p in found if p.is_file() and not p.name.startswith(TEMP_PREFIX)]


def _holds_an_entry(directory: Path) -> Callable[[], bool]:
    return lambda: directory.is_dir() and any(directory.iterdir())


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Rig:
    assert CONSOLE_SCRIPT.is_file(), f"no console script at {CONSOLE_SCRIPT}"
    name = request.node.name
    rig = Rig(tmp_path, random.Random(f"{SEED} {name}"), name)
    rig.cli("init", rig.site)
    rig.new_data(FILES, changed=FILES)
    rig.cli("instances", "add", "-r", "east", "-n", "nf", "--data", rig.data)
    return rig


def test_backup_killed_at_random_moments(rig: Rig) -> None:
    rig.backup()
    rig.new_data(FILES, changed=CHANGED)
    # measured on a run like the trials': an incremental backup of as many changed files
    second, measured = rig.measure("backup", "nf", watch=rig.regions)
    rig.trees[second] = snapshot(rig.data)
    for trial in range(TRIALS):
        rig.new_data(FILES, changed=CHANGED)
        rig.kill(trial, "backup", "nf", watch=rig.regions, measured=measured)
        rig.verify()
        point = rig.run("backup", "nf")
        rig.trees[point] = snapshot(rig.data)
        rig.assert_restores(point, "east", rig.root / f"restored-{trial}")
        # a point the killed run committed (it was killed late) is of the same data: it is
        # whole, restored below with every other
        listed = {p["id"] for p in json.loads(rig.cli("points", "-r", "east", "--json"))}
        for committed in listed - set(rig.trees):
            rig.trees[committed] = rig.trees[point]
        assert set(rig.trees) == listed
    # every killed run's leftovers are garbage that prune collects; no lock outlives its run
    rig.cli("prune", "-r", "east")
    rig.verify(clean=True)
    assert rig.vault_files("east", "locks") == []
    for point in rig.trees:
        rig.assert_restores(point, "east", rig.root / f"finally-{point}")


def test_copy_killed_at_random_moments(rig: Rig) -> None:
    rig.cli("copy", rig.backup(), "--to", "west")
    rig.new_data(FILES, changed=CHANGED)
    # measured on a run like the trials': a copy of a point sharing as much with the last one
    _, measured = rig.measure("copy", rig.backup(), "--to", "west", watch=rig.regions)
    for trial in range(TRIALS):
        rig.new_data(FILES, changed=CHANGED)
        point = rig.backup()
        rig.kill(trial, "copy", point, "--to", "west", watch=rig.regions, measured=measured)
        rig.verify()
        copy = rig.run("copy", point, "--to", "west")
        rig.trees[copy] = rig.trees[point]
        rig.assert_restores(copy, "west", rig.root / f"restored-{trial}")
        # the re-run finished the copy the killed run began, or found it made: one copy
        copies = [
            p["id"]
            for p in json.loads(rig.cli("points", "-r", "west", "--json"))
            if (p["lineage"] or {}).get("source_recovery_point") == point
        ]
        assert copies == [copy]
    rig.cli("prune")
    rig.verify(clean=True)
    assert rig.vault_files("east", "locks") == rig.vault_files("west", "locks") == []


def test_prune_killed_at_random_moments(rig: Rig) -> None:
    rig.work_for_prune()
    _, measured = rig.measure("prune", "-r", "east", watch=rig.regions)
    for trial in range(TRIALS):
        rig.work_for_prune()
        rig.kill(trial, "prune", "-r", "east", watch=rig.regions, measured=measured)
        rig.verify()
        rig.run("prune", "-r", "east")
        for n, point in enumerate(rig.trees):
            rig.assert_restores(point, "east", rig.root / f"restored-{trial}-{n}")
    rig.verify(clean=True)
    assert rig.vault_files("east", "locks") == []


def test_restore_killed_at_random_moments_is_run_again(rig: Rig) -> None:
    point = rig.backup()
    measuring = rig.root / "measured"
    _, measured = rig.measure("restore", point, "-r", "east", "-t", measuring, watch=measuring)
    for trial in range(TRIALS):
        target = rig.root / f"restored-{trial}"
        target.mkdir()  # an empty directory to restore into, watched from the start
        argv = ("restore", point, "-r", "east", "-t", target)
        rig.kill(trial, *argv, watch=target, measured=measured)
        # a restore killed after it finished (its marker gone, the process not yet ended)
        # left the target whole, and a re-run rightly refuses it as not empty
        if snapshot(target) != rig.trees[point]:
            rig.run(*argv)
        assert snapshot(target) == rig.trees[point]
    rig.verify()


def test_verify_repair_clears_what_killed_writers_left(rig: Rig) -> None:
    """A backup, a copy and a prune killed while they write leave temporary objects (and a
    copy a partial inbox payload); after the re-runs, verify --repair removes every one."""
    unused = Measured(seconds=60.0, changes=0)
    rig.kill(0, "backup", "nf", watch=rig.regions, measured=unused, until=rig.new_temporary())
    point = rig.run("backup", "nf")
    rig.trees[point] = snapshot(rig.data)
    until = rig.new_temporary()
    rig.kill(0, "copy", point, "--to", "west", watch=rig.regions, measured=unused, until=until)
    copy = rig.run("copy", point, "--to", "west")
    rig.trees[copy] = rig.trees[point]
    rig.work_for_prune()
    until = rig.new_temporary()
    rig.kill(0, "prune", "-r", "east", watch=rig.regions, measured=unused, until=until)
    rig.run("prune", "-r", "east")
    rig.cli("verify", "--repair")
    assert rig.temporaries() == []
    assert rig.inbox_files() == []
    rig.verify()
    rig.assert_restores(copy, "west", rig.root / "restored-copy")
    for n, kept in enumerate(p for p in rig.trees if p != copy):
        rig.assert_restores(kept, "east", rig.root / f"restored-{n}")
