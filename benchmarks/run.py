"""Side-by-side backup benchmark: regionvault, restic and borg on one fixed-seed dataset.

One command (``./scripts/bench`` installs restic, borg and numpy first, then runs this)::

    python benchmarks/run.py --size 1GiB [--cycles 3] [--tools regionvault,restic,borg]
    python benchmarks/run.py --sizes 1GiB,4GiB        # regionvault's peak RSS at both sizes

Each cycle, on the same data and with a fresh repository per tool: full backup of every tool,
then the 1% change (``dataset.py mutate``), then an incremental backup of every tool, then a
restore of each tool's latest snapshot into an empty directory, checked byte for byte (content,
size, permissions) against the dataset, so a fast wrong tool cannot win. Measured per phase:
wall time, peak RSS of the tool's process tree, repository size after the full backup and its
growth after the incremental one. Results are medians over cycles, written as a table into
docs/benchmarks.md and as JSON into benchmarks/results/<date>.json.

Equal conditions, since caches cannot be dropped without privileges on a shared machine: before
every timed phase the harness calls sync(), before every timed backup it reads the whole
dataset once, so each tool starts with the data in the page cache, and just before the timed
command it writes and deletes a scratch file (see :func:`warm_memory`). Restore targets stay
until the cycle ends. The tool order rotates from cycle to cycle. A tool whose command is
missing is skipped with a note; one that fails is reported as failed, and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = HERE / "results"
PHASES = ("full", "incremental", "restore")
MiB = 1024 * 1024
SAMPLE_INTERVAL = 0.02  # seconds between RSS samples
RESCAN_EVERY = 5  # samples between rescans of the process tree (a rescan costs ~1 ms)
PASSWORD = "regionvault-bench"  # the benchmark repositories hold generated data only


class ToolFailed(Exception):
    """A tool's command failed or produced something the harness cannot use."""


# -- running one measured command -------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    user_s: float  # CPU time of the tool (and its waited-for children) in user space
    sys_s: float  # ... and in the kernel on its behalf
    tree_rss_peak: int  # bytes: highest sampled sum of RSS over the tool's process tree
    max_rss: int  # bytes: the kernel's ru_maxrss for the tool (its largest single process)
    samples: int
    returncode: int
    timed_out: bool

    @property
    def peak_rss(self) -> int:
        # Sampling can miss a short spike; ru_maxrss cannot, but sees one process at a time.
        return max(self.tree_rss_peak, self.max_rss)


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LC_ALL": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1"})
    env.update(extra)
    return env


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class _RssSampler(threading.Thread):
    """Polls the summed RSS of the launcher's descendants every SAMPLE_INTERVAL until stopped."""

    def __init__(self, pid: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.deadline = deadline
        self.peak = 0
        self.samples = 0
        self.timed_out = False
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            launcher = psutil.Process(self.pid)
        except psutil.Error:
            return
        tree: list[Any] = []
        while not self.stopped.is_set():
            if self.samples % RESCAN_EVERY == 0 or not tree:
                with contextlib.suppress(psutil.Error):
                    tree = launcher.children(recursive=True)  # the tool, not the launcher
            total = 0
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self.samples += 1
            if time.perf_counter() > self.deadline and not self.timed_out:
                self.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            self.stopped.wait(SAMPLE_INTERVAL)


# The kernel's ru_maxrss of a child starts from the high-water RSS of the process it was
# spawned from (exec keeps the larger of the two), so a tool spawned straight from this
# harness, which holds numpy and a dataset manifest, would report at least the harness's own
# size. A small launcher (python -S, ~10 MiB) spawns the tool instead, waits for it with
# wait4 and reports the tool's own wall time and ru_maxrss.
_LAUNCHER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
code = os.waitstatus_to_exitcode(status)
with open(report, "w") as f:
    f.write(f"{wall!r} {usage.ru_maxrss} {code} {usage.ru_utime!r} {usage.ru_stime!r}")
sys.exit(code if code >= 0 else 128 - code)
"""


def measure(cmd: Command, log: Path, timeout: float) -> Measurement:
    """Run ``cmd`` with stdout/stderr to ``log``.out/.err; time it and track its memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    report = log.with_suffix(".rusage")
    report.unlink(missing_ok=True)
    launcher = (sys.executable, "-S", "-E", "-c", _LAUNCHER, str(report), *cmd.argv)
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            launcher,
            cwd=cmd.cwd,
            env=_environment(cmd.env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, so a timeout kills the whole tree
        )
        sampler = _RssSampler(proc.pid, started + timeout)
        sampler.start()
        returncode = proc.wait()
        outer_wall = time.perf_counter() - started
        sampler.stopped.set()
        sampler.join()
    try:
        wall_text, maxrss_kib, code, user_text, sys_text = report.read_text().split()
        wall, max_rss, returncode = float(wall_text), int(maxrss_kib) * 1024, int(code)
        user, system = float(user_text), float(sys_text)
    except (FileNotFoundError, ValueError):  # the launcher could not start the tool
        wall, max_rss, user, system = outer_wall, 0, 0.0, 0.0
        returncode = returncode or 127
    return Measurement(
        wall_s=wall,
        user_s=user,
        sys_s=system,
        tree_rss_peak=sampler.peak,
        max_rss=max_rss,
        samples=sampler.samples,
        returncode=returncode,
        timed_out=sampler.timed_out,
    )


def run_plain(cmd: Command, log: Path, timeout: float = 600) -> str:
    """An untimed step (init, registration); returns stdout, raises ToolFailed on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            cmd.argv,
            cwd=cmd.cwd,
            env=_environment(cmd.env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolFailed(f"`{cmd.describe()}`: {exc}") from None
    log.with_suffix(".out").write_bytes(done.stdout)
    log.with_suffix(".err").write_bytes(done.stderr)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise ToolFailed(f"`{cmd.describe()}` exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout.decode(errors="replace")


def tree_size(root: Path) -> int:
    """Apparent size in bytes of every file under ``root``."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size  # noqa: PTH118
    return total


# -- tools ------------------------------------------------------------------------------------


def _probe(argv: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
            env=_environment({}),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    return done.returncode, text


class Tool:
    """One backup tool: how to set up a repository, back up, restore and measure it."""

    name = ""
    #: what the repository size counts, for the report
    repo_note = ""

    def __init__(self) -> None:
        self.home = Path()
        self.dataset = Path()

    def missing(self) -> str | None:
        """None when the tool can run here, else why not."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def prepare(self, home: Path, dataset_dir: Path) -> None:
        """Untimed: a fresh, empty repository under ``home`` for ``dataset_dir``."""
        self.home, self.dataset = home, dataset_dir
        home.mkdir(parents=True)

    def backup(self, phase: str) -> Command:
        raise NotImplementedError

    def backup_done(self, phase: str, log: Path) -> None:
        """Called after a successful timed backup, with its log prefix."""

    def restore(self, target: Path) -> Command:
        raise NotImplementedError

    def repo_size(self) -> int:
        return tree_size(self.home / "repo")


class Restic(Tool):
    name = "restic"
    repo_note = "the local repository directory (cache excluded)"

    def env(self) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_REPOSITORY": str(self.home / "repo"),
            "RESTIC_CACHE_DIR": str(self.home / "cache"),
        }

    def missing(self) -> str | None:
        return None if shutil.which("restic") else "`restic` is not installed (./scripts/bench)"

    def version(self) -> str:
        _, text = _probe(["restic", "version"])
        return " ".join(text.split()[:2])

    def prepare(self, home: Path, dataset_dir: Path) -> None:
        super().prepare(home, dataset_dir)
        run_plain(Command(("restic", "init"), home, self.env()), home / "init")

    def backup(self, phase: str) -> Command:
        # "." from inside the dataset, so that a restore lands directly in its target
        return Command(("restic", "backup", ".", "--host", "bench"), self.dataset, self.env())

    def restore(self, target: Path) -> Command:
        argv = ("restic", "restore", "latest", "--target", str(target))
        return Command(argv, self.home, self.env())


class Borg(Tool):
    name = "borg"
    compression = "zstd,3"
    repo_note = "the local repository directory (cache and security dirs excluded)"

    def __init__(self) -> None:
        super().__init__()
        self.last_archive = ""

    def env(self) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_REPO": str(self.home / "repo"),
            "BORG_BASE_DIR": str(self.home / "base"),
            "BORG_DISPLAY_PASSPHRASE": "no",
        }

    def missing(self) -> str | None:
        return None if shutil.which("borg") else "`borg` is not installed (./scripts/bench)"

    def version(self) -> str:
        _, text = _probe(["borg", "--version"])
        return f"{text.strip()}, {self.compression}"

    def prepare(self, home: Path, dataset_dir: Path) -> None:
        super().prepare(home, dataset_dir)
        self.last_archive = ""
        argv = ("borg", "init", "--encryption=repokey")
        run_plain(Command(argv, home, self.env()), home / "init")

    def backup(self, phase: str) -> Command:
        argv = ("borg", "create", "--compression", self.compression, f"::{phase}", ".")
        return Command(argv, self.dataset, self.env())

    def backup_done(self, phase: str, log: Path) -> None:
        self.last_archive = phase

    def restore(self, target: Path) -> Command:
        # borg extracts into the current directory
        return Command(("borg", "extract", f"::{self.last_archive}"), target, self.env())


class BorgLz4(Borg):
    name = "borg-lz4"
    compression = "lz4"


class RegionVault(Tool):
    """regionvault through its CLI, in a fresh site made by ``regionvault init``."""

    name = "regionvault"
    region = "local:east"
    repo_note = "the whole site directory made by `regionvault init` (vaults, keys, records)"
    probes = (("init",), ("instances", "add"), ("backup",), ("restore",))

    def __init__(self) -> None:
        super().__init__()
        self.point = ""

    @staticmethod
    def executable() -> str | None:
        beside = Path(sys.executable).with_name("regionvault")
        return str(beside) if beside.exists() else shutil.which("regionvault")

    def missing(self) -> str | None:
        exe = self.executable()
        if exe is None:
            return "the `regionvault` command is not installed in this environment"
        for sub in self.probes:
            code, text = _probe([exe, *sub, "--help"])
            if code != 0:
                last = text.splitlines()[-1] if text else "no output"
                return f"`regionvault {' '.join(sub)} --help` exited {code}: {last}"
        return None

    def version(self) -> str:
        try:
            from importlib.metadata import version

            text = f"regionvault {version('regionvault')}"
        except Exception:  # not installed: missing() says so
            text = "regionvault (not installed)"
        _, head = _probe(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        _, dirty = _probe(["git", "-C", str(REPO), "status", "--porcelain"])
        if re.fullmatch(r"[0-9a-f]{4,40}", head):
            text += f" (git {head}{' + uncommitted changes' if dirty else ''})"
        return text

    @property
    def site_file(self) -> Path:
        return self.home / "site" / "site.toml"

    def cli(self, *args: str) -> tuple[str, ...]:
        exe = self.executable() or "regionvault"
        return (exe, "--site", str(self.site_file), *args)

    def prepare(self, home: Path, dataset_dir: Path) -> None:
        super().prepare(home, dataset_dir)
        self.point = ""
        site = home / "site"
        site.mkdir()
        exe = self.executable() or "regionvault"
        run_plain(Command((exe, "init"), site), home / "init")
        if not self.site_file.exists():
            raise ToolFailed(f"`regionvault init` in {site} did not write site.toml there")
        argv = self.cli(
            "instances",
            "add",
            "--region",
            self.region,
            "--name",
            "bench",
            "--data",
            str(dataset_dir),
        )
        run_plain(Command(argv, site), home / "instance")

    def backup(self, phase: str) -> Command:
        return Command(self.cli("backup", "bench"), self.home / "site")

    def backup_done(self, phase: str, log: Path) -> None:
        lines = log.with_suffix(".out").read_text(errors="replace").strip().splitlines()
        if not lines or not lines[-1].strip() or " " in lines[-1].strip():
            got = repr(lines[-1]) if lines else "no output"
            raise ToolFailed(
                "`regionvault backup` did not print a recovery point id alone on the last "
                f"line of its standard output (got {got})"
            )
        self.point = lines[-1].strip()

    def restore(self, target: Path) -> Command:
        argv = self.cli("restore", self.point, "--region", self.region, "--target", str(target))
        return Command(argv, self.home / "site")

    def repo_size(self) -> int:
        return tree_size(self.home / "site")


TOOLS: dict[str, type[Tool]] = {t.name: t for t in (RegionVault, Restic, Borg, BorgLz4)}


# -- checking a restore -----------------------------------------------------------------------

Entry = tuple[str, ...]


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def tree_manifest(root: Path, workers: int = 2) -> dict[str, Entry]:
    """Relative path -> ("file", mode, size, hash) | ("dir",) | ("link", target)."""
    entries: dict[str, Entry] = {}
    files: list[tuple[str, Path, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                entries[rel] = ("link", str(path.readlink()))
            elif path.is_dir():
                entries[rel] = ("dir",)
            else:
                files.append((rel, path, st))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL
        digests = pool.map(lambda item: _digest(item[1]), files)
        for (rel, _, st), digest in zip(files, digests, strict=True):
            entries[rel] = ("file", oct(st.st_mode & 0o7777), str(st.st_size), digest)
    return entries


def compare_trees(expected: Mapping[str, Entry], got: Mapping[str, Entry]) -> list[str]:
    """Human-readable differences (empty when the trees match)."""
    problems = []
    for rel in sorted(expected.keys() - got.keys()):
        problems.append(f"missing {rel}")
    for rel in sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected {rel}")
    fields = ("type", "mode", "size", "content")
    for rel in sorted(expected.keys() & got.keys()):
        want, have = expected[rel], got[rel]
        if want != have:
            if want[0] != have[0] or len(want) != len(have):
                what = f"is a {have[0]}, expected a {want[0]}"
            else:
                what = ", ".join(
                    f"{name} {h if name != 'content' else 'hash ' + h[:12]} "
                    f"!= {w if name != 'content' else w[:12]}"
                    for name, w, h in zip(fields, want, have, strict=True)
                    if w != h
                )
            problems.append(f"{rel}: {what}")
    return problems


def read_all(root: Path) -> None:
    """Pull the dataset into the page cache (each tool then starts from the same state)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:  # noqa: PTH118, PTH123
                while f.read(8 * MiB):
                    pass


# -- one cycle --------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss: int
    tree_rss_peak: int
    max_rss: int
    samples: int
    bytes: int  # dataset bytes the phase covered (for MB/s)


@dataclass
class ToolCycle:
    tool: str
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    repo_after_full: int | None = None
    repo_after_incremental: int | None = None
    restore_verified: bool | None = None
    error: str | None = None
    differences: list[str] = field(default_factory=list)


@dataclass
class Data:
    """The dataset on disk and what its trees must look like before and after the change."""

    root: Path
    plan: dataset.DatasetPlan
    base: dict[str, Entry]
    changed: dict[str, Entry] | None = None
    mutation: dict[str, int] | None = None

    @property
    def base_bytes(self) -> int:
        return self.plan.total

    @property
    def changed_bytes(self) -> int:
        assert self.mutation is not None
        return self.plan.total + self.mutation["new_bytes"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def warm_memory(work: Path, nbytes: int) -> None:
    """Write ``nbytes`` to a scratch file and delete it: the page-cache pages just freed are
    what the timed tool's writes get next.

    In this VM, free memory is handed back to the hypervisor, and the first write into such a
    page is slow: 1 GiB of fresh page cache costs ~2.4 s of kernel time, against ~0.2 s for
    pages freed a moment ago (`dd` of 1 GiB, measured either way). Which one a tool gets
    depends on what ran before it; without this step that difference, the same for every
    tool, swamps the tools' own work in the restore and backup timings.
    """
    scratch = work / ".warm"
    block = bytes(8 * MiB)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(-(-nbytes // len(block))):
            os.write(fd, block)
    finally:
        os.close(fd)
        scratch.unlink()


def settle(data: Data | None, work: Path, warm: int) -> None:
    """Same starting state for every tool: no dirty pages pending, the dataset in cache, and
    ``warm`` bytes of recently freed memory ready for its writes (see :func:`warm_memory`)."""
    os.sync()
    if data is not None:
        read_all(data.root)
    warm_memory(work, warm)


#: how long ext4 without a journal steps over a freed inode when it places a new one: a
#: minute, six while that part of the inode table is dirty (``recently_deleted`` in
#: fs/ext4/ialloc.c), plus a margin
INODE_RECENCY_S = 6 * 60 + 10


def empty_files(root: Path) -> None:
    """Truncate every regular file under ``root`` to zero, keeping the files: their disk space
    and page cache are freed at once, but no inode is (see :data:`INODE_RECENCY_S`)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            try:
                os.truncate(path, 0)
            except PermissionError:  # a read-only file (a restored one, a tool's own)
                path.chmod(0o600)
                os.truncate(path, 0)


#: fewer removed files than this cost the next restores too little to wait for
INODE_WAIT_FILES = 1000


def remove_trees(work: Path, paths: Iterable[Path]) -> None:
    """Delete ``paths`` (those that exist), and note when and how many entries, for
    :func:`wait_for_inodes`."""
    count = 0
    for path in paths:
        if path.exists():
            count += sum(len(dirs) + len(files) for _, dirs, files in os.walk(path)) + 1
            shutil.rmtree(path, ignore_errors=True)
    if count:
        stamp = work / ".removed"
        try:  # removals within the window add up
            if time.time() - stamp.stat().st_mtime < INODE_RECENCY_S:
                count += int(stamp.read_text() or 0)
        except (OSError, ValueError):
            pass
        stamp.write_text(str(count))


def wait_for_inodes(work: Path) -> None:
    """Before the restores: wait until the files this harness removed in ``work`` no longer
    slow the creation of new ones (see METHOD). That is only after thousands of files were
    removed minutes before: at another run's end, or by this run's start (a previous run's
    leftovers, a kept dataset); between its start and its end a run removes nothing."""
    stamp = work / ".removed"
    try:
        age = time.time() - stamp.stat().st_mtime
        count = int(stamp.read_text() or 0)
    except (OSError, ValueError):
        return
    if 0 <= age < INODE_RECENCY_S and count >= INODE_WAIT_FILES:
        pause = INODE_RECENCY_S - age
        say(
            f"  waiting {pause:.0f} s before the restores: {count:,} files were removed in "
            f"{work} {age:.0f} s ago, and every new file would step over their inodes"
        )
        time.sleep(pause)


def run_cycle(
    number: int, tools: Sequence[Tool], data: Data, work: Path, timeout: float
) -> dict[str, ToolCycle]:
    """Full backups, the change, incremental backups, restores: each phase for every tool."""
    cycle_dir = work / f"cycle-{number}-{data.root.name}"
    remove_trees(work, [cycle_dir])
    order = list(tools[number % len(tools) :]) + list(tools[: number % len(tools)])
    results = {t.name: ToolCycle(t.name) for t in tools}
    logs = work / "logs" / f"cycle-{number + 1}"  # kept after the run, for a failure's details

    def timed(tool: Tool, phase: str, cmd: Command, covered: int) -> None:
        say(f"  {tool.name}: {phase} ...")
        m = measure(cmd, logs / f"{tool.name}-{phase}", timeout)
        if m.timed_out:
            raise ToolFailed(f"{phase} did not finish within {timeout:.0f} s")
        if m.returncode != 0:
            tail = _tail((logs / f"{tool.name}-{phase}").with_suffix(".err"), 3)
            raise ToolFailed(
                f"`{cmd.describe()}` exited {m.returncode}: {' | '.join(tail.splitlines())}"
            )
        results[tool.name].phases[phase] = PhaseResult(
            wall_s=m.wall_s,
            user_s=m.user_s,
            sys_s=m.sys_s,
            peak_rss=m.peak_rss,
            tree_rss_peak=m.tree_rss_peak,
            max_rss=m.max_rss,
            samples=m.samples,
            bytes=covered,
        )
        say(f"  {tool.name}: {phase} {m.wall_s:.2f} s, peak RSS {m.peak_rss / MiB:.0f} MiB")

    def each(step: str, fn: Any) -> None:
        for tool in order:
            result = results[tool.name]
            if result.error is not None:
                continue
            try:
                fn(tool, result)
            except (ToolFailed, OSError) as exc:
                result.error = f"{step}: {exc}"
                say(f"  {tool.name}: FAILED at {step}: {exc}")

    def prepare(tool: Tool, result: ToolCycle) -> None:
        tool.prepare(cycle_dir / tool.name, data.root)

    # every phase writes at most about the dataset's size (a repository, or a restore)
    warm = data.base_bytes + data.base_bytes // 4 + 64 * MiB

    def full(tool: Tool, result: ToolCycle) -> None:
        settle(data, work, warm)
        timed(tool, "full", tool.backup("full"), data.base_bytes)
        tool.backup_done("full", logs / f"{tool.name}-full")
        result.repo_after_full = tool.repo_size()

    def incremental(tool: Tool, result: ToolCycle) -> None:
        settle(data, work, warm)
        timed(tool, "incremental", tool.backup("incremental"), data.changed_bytes)
        tool.backup_done("incremental", logs / f"{tool.name}-incremental")
        result.repo_after_incremental = tool.repo_size()

    def restore(tool: Tool, result: ToolCycle) -> None:
        target = cycle_dir / f"restore-{tool.name}"
        target.mkdir()
        settle(None, work, warm)
        # the target is kept (emptied) until the run ends: see main()
        timed(tool, "restore", tool.restore(target), data.changed_bytes)
        assert data.changed is not None
        result.differences = compare_trees(data.changed, tree_manifest(target))
        result.restore_verified = not result.differences
        empty_files(target)  # the next restore gets the same free memory and disk
        if result.differences:
            say(
                f"  {tool.name}: restore DIFFERS from the dataset: "
                f"{len(result.differences)} problems, first: {result.differences[0]}"
            )

    say(f"cycle {number + 1}: order {', '.join(t.name for t in order)}")
    each("prepare", prepare)
    each("full backup", full)
    summary = dataset.mutate(data.root, data.plan)
    data.mutation = summary.as_dict()
    if data.changed is None:  # the change is deterministic: hash the changed tree once
        data.changed = tree_manifest(data.root)
    each("incremental backup", incremental)
    wait_for_inodes(work)
    each("restore", restore)
    dataset.revert(data.root)
    empty_files(cycle_dir)  # the repositories: removed, with the restores, when the run ends
    return results


# -- reporting --------------------------------------------------------------------------------


def _median(values: Iterable[float]) -> float | None:
    items = list(values)
    return statistics.median(items) if items else None


def summarize(tool: str, cycles: Sequence[ToolCycle]) -> dict[str, Any]:
    """Medians over the cycles in which the tool succeeded."""
    ok = [c for c in cycles if c.error is None]
    out: dict[str, Any] = {
        "tool": tool,
        "cycles_ok": len(ok),
        "cycles": len(cycles),
        "errors": [c.error for c in cycles if c.error],
        "restore_verified": all(c.restore_verified for c in ok) if ok else None,
        "differences": next((c.differences[:10] for c in cycles if c.differences), []),
    }
    for phase in PHASES:
        runs = [c.phases[phase] for c in ok if phase in c.phases]
        wall = _median(r.wall_s for r in runs)
        covered = runs[0].bytes if runs else 0
        out[phase] = (
            None
            if wall is None
            else {
                "wall_s": wall,
                "mb_per_s": covered / 1e6 / wall if wall else None,
                "peak_rss_mib": _median(r.peak_rss / MiB for r in runs),
                "user_s": _median(r.user_s for r in runs),
                "sys_s": _median(r.sys_s for r in runs),
            }
        )
    out["repo_after_full_mb"] = _median(
        c.repo_after_full / 1e6 for c in ok if c.repo_after_full is not None
    )
    out["growth_mb"] = _median(
        (c.repo_after_incremental - c.repo_after_full) / 1e6
        for c in ok
        if c.repo_after_incremental is not None and c.repo_after_full is not None
    )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def comparison_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    restic = next((s for s in summaries if s["tool"] == "restic"), None)
    rows = [
        "| tool | phase | wall s | MB/s | × restic | CPU user s | CPU sys s | peak RSS MiB "
        "| repo after full MB | growth MB | restore check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        if s["cycles_ok"] == 0:
            rows.append(f"| {s['tool']} | failed | | | | | | | | | {s['errors'][0]} |")
            continue
        for phase in PHASES:
            p = s[phase]
            if p is None:
                continue
            base = restic[phase] if restic and restic.get(phase) else None
            ratio = p["wall_s"] / base["wall_s"] if base else None
            check = ""
            if phase == "restore":
                check = "byte-exact" if s["restore_verified"] else "**DIFFERS**"
            rows.append(
                f"| {s['tool']} | {phase} | {p['wall_s']:.2f} | {_fmt(p['mb_per_s'], '.0f')} "
                f"| {_fmt(ratio, '.2f')} | {_fmt(p.get('user_s'), '.2f')} "
                f"| {_fmt(p.get('sys_s'), '.2f')} | {_fmt(p['peak_rss_mib'], '.0f')} "
                f"| {_fmt(s['repo_after_full_mb'], ',.0f') if phase == 'full' else ''} "
                f"| {_fmt(s['growth_mb'], '+,.0f') if phase == 'incremental' else ''} "
                f"| {check} |"
            )
    return "\n".join(rows)


def targets(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 3's targets for regionvault, as measured ratios against restic."""
    rv = next((s for s in summaries if s["tool"] == "regionvault"), None)
    restic = next((s for s in summaries if s["tool"] == "restic"), None)
    if rv is None or rv["cycles_ok"] == 0:
        return []
    checks: list[dict[str, Any]] = []

    def ratio(phase: str) -> float | None:
        if restic is None or not restic.get(phase) or not rv.get(phase):
            return None
        return float(rv[phase]["wall_s"] / restic[phase]["wall_s"])

    for phase, label in (
        ("full", "full backup"),
        ("incremental", "incremental backup"),
        ("restore", "restore"),
    ):
        r = ratio(phase)
        ok = r is not None and r <= 0.5 and (phase != "restore" or rv["restore_verified"])
        checks.append({"target": f"{label} wall time ≤ 0.5 × restic", "measured": r, "ok": ok})
    growth = None
    if restic and restic["growth_mb"] and rv["growth_mb"] is not None:
        growth = rv["growth_mb"] / restic["growth_mb"]
    checks.append(
        {
            "target": "repository growth after the change ≤ 0.5 × restic",
            "measured": growth,
            "ok": growth is not None and growth <= 0.5,
        }
    )
    peaks = [rv[p]["peak_rss_mib"] for p in PHASES if rv.get(p)]
    peak = max(peaks) if peaks else None
    checks.append(
        {
            "target": "peak RSS < 200 MiB (highest phase)",
            "measured": peak,
            "ok": peak is not None and peak < 200,
        }
    )
    return checks


def targets_table(checks: Sequence[Mapping[str, Any]]) -> str:
    rows = ["| target (issue 3) | measured | met |", "|---|---:|---|"]
    for c in checks:
        rows.append(
            f"| {c['target']} | {_fmt(c['measured'], '.2f')} | {'yes' if c['ok'] else '**no**'} |"
        )
    return "\n".join(rows)


def machine_facts(work: Path) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir_free_gb": round(shutil.disk_usage(work).free / 1e9, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _command_line(argv: Sequence[str]) -> str:
    prog = os.environ.get("REGIONVAULT_BENCH_WRAPPER") or "python benchmarks/run.py"
    return " ".join([prog, shlex.join(argv)]).strip()


def write_docs_section(name: str, body: str) -> None:
    """Replace one marked section of docs/benchmarks.md (``method``, ``compare``, ``sizes``),
    keeping the others."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = DOCS.read_text() if DOCS.exists() else DOC_TEMPLATE
    if begin not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


METHOD = """\
- the dataset comes from `benchmarks/dataset.py` (`generate`, `mutate`, `revert`), a pure function
  of size and seed; the change is 1% of the bytes overwritten in place in scattered runs across
  ~100 files, plus 5 new files;
- each cycle gives every tool a fresh repository and runs, phase by phase for all tools: full
  backup, the change, incremental backup, restore of the latest snapshot into an empty directory;
- every restore is compared with the dataset (paths, sizes, permissions, BLAKE2 of the content):
  a restore that differs is marked and cannot meet a target;
- a small launcher (`python -S`) spawns each timed command, waits for it with `wait4` and
  reports its wall time (spawn to exit) and the kernel's `ru_maxrss` for it; a tool spawned
  straight from the harness would inherit the harness's own high-water RSS in `ru_maxrss`;
  the launcher's is ~8 MiB, a floor far below any tool here;
- peak RSS is the larger of that `ru_maxrss` (exact, but one process at a time) and the highest
  sum of RSS over the tool's whole process tree, sampled every 20 ms;
- repository size is the apparent size of the repository's files (restic and borg caches are
  kept outside and not counted); growth is the size after the incremental minus after the full;
  restic picks a random chunker polynomial per repository, so its growth varies from cycle to
  cycle: use `--cycles 3` or more for the growth figures;
- page caches cannot be dropped here, so every timed phase starts after `sync`, and every timed
  backup after one read of the whole dataset: each tool starts with the data in the page cache;
  the tool order rotates between cycles;
- this VM hands free memory back to its hypervisor, and the first write into such a page is
  slow: writing 1 GiB of new page cache takes ~2.4 s of kernel time, against ~0.2 s right after
  other files were deleted (`dd if=/dev/zero bs=1M count=1024`, measured both ways). So just
  before every timed phase the harness writes and deletes a scratch file of 1.25× the dataset:
  every tool's writes then start from the same recently freed memory, instead of a cost of
  0.2 to 2.4 s per GiB that depends on what ran before it;
- the harness removes no file until the run ends: each restore is emptied once checked,
  each cycle's repositories when it ends, and the dataset when its size is done (every file
  truncated to zero, which frees the disk and the page cache but no inode). On ext4 without
  a journal (as here), the kernel places a new file's inode past every inode of its block
  group freed in the last minute (six, once that part of the inode table is dirty), one
  buffer lookup each (`recently_deleted` under `ext4_create` in `perf`): removing a cycle's
  thousands of files would tax every restore of the next cycle with a cost of the harness's
  making, the same for each tool and so weighing most on the fastest; keeping them whole
  would fill memory and tax later cycles with page reclaim. A run started within six
  minutes of another run's end (one that removed thousands of files) waits out the rest of
  those minutes before its restores;
- `./scripts/bench` byte-compiles regionvault before the run, as `pip install` does for an
  installed package (the project's editable install does not); restic is one binary and
  Debian's borg is byte-compiled at install;
- CPU user s and CPU sys s are the tool's CPU time (`wait4`'s rusage) in user space and in the
  kernel on its behalf: copying into the page cache, creating files. The kernel part is about
  the same work for every tool, and in this VM its cost swings between runs (see "Reading these
  figures");
- MB = 10^6 bytes; MB/s is the dataset size the phase covered divided by its wall time;
  "× restic" is the tool's wall time over restic's (below 1 is faster).
"""

DOC_TEMPLATE = """\
# Benchmarks

regionvault against restic and borg (Debian's packages) on one fixed-seed dataset shaped like
`shared/research/baselines.md`. The harness is `benchmarks/` (not part of the package, not run by
the tests); one command sets up the tools and runs it:

```
./scripts/bench --size 1GiB              # add --cycles 3 for medians of three
./scripts/bench --sizes 1GiB,4GiB        # regionvault's peak memory at both sizes
```

`./scripts/bench` installs restic and borg (`apt-get`) if they are missing and numpy/psutil
(`benchmarks/requirements.txt`) into `.venv`, then runs `python benchmarks/run.py` with the same
arguments: `--cycles N`, `--tools regionvault,restic,borg` (also `borg-lz4`), `--seed`,
`--workdir` (default `benchmarks/.work`, checked for free space first), `--keep`, `--no-write`
(print only). A tool whose command is missing is skipped with a note. The dataset generator
also works alone: `python benchmarks/dataset.py generate|mutate|revert|describe`.

How it measures:

<!-- BEGIN method -->
{method}
<!-- END method -->

<!-- BEGIN compare -->
(not run yet: `./scripts/bench --size 1GiB` fills this in)
<!-- END compare -->

<!-- BEGIN sizes -->
(not run yet: `./scripts/bench --sizes 1GiB,4GiB` fills this in)
<!-- END sizes -->
""".replace("{method}", METHOD.strip())


# -- the two modes ----------------------------------------------------------------------------


def check_disk(work: Path, size: int, tools: int) -> str | None:
    # the dataset and its undo log, the scratch file of warm_memory(), and per tool a
    # repository and a restore (emptied when the restore is checked and the cycle ends)
    need = int(size * (3.4 + 2.3 * tools)) + 512 * MiB
    free = shutil.disk_usage(work).free
    if free < need:
        return (
            f"needs about {need / 1e9:.1f} GB free in {work} for a {dataset.format_size(size)} run "
            f"of {tools} tool(s) (dataset, a repository and a restore per tool), but "
            f"only {free / 1e9:.1f} GB is free; free some space or pass --workdir on a bigger disk"
        )
    return None


def data_root(work: Path, size: int, seed: int) -> Path:
    return work / f"data-{dataset.format_size(size)}-seed{seed}"


def prepare_data(work: Path, size: int, seed: int) -> Data:
    root = data_root(work, size, seed)
    remove_trees(work, [root])
    dataset.undo_path(root).unlink(missing_ok=True)
    plan = dataset.plan_dataset(size, seed)
    say(f"generating {dataset.summary_line(plan)}")
    started = time.perf_counter()
    dataset.generate(root, size, seed)
    say(f"  generated in {time.perf_counter() - started:.1f} s; hashing it")
    return Data(root=root, plan=plan, base=tree_manifest(root))


def select_tools(names: str) -> tuple[list[Tool], dict[str, str]]:
    chosen, skipped = [], {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in TOOLS:
            raise SystemExit(f"run.py: unknown tool {name!r}; known: {', '.join(TOOLS)}")
        tool = TOOLS[name]()
        reason = tool.missing()
        if reason is None:
            chosen.append(tool)
        else:
            skipped[name] = reason
            say(f"skipping {name}: {reason}")
    return chosen, skipped


def run_size(
    tools: Sequence[Tool],
    work: Path,
    size: int,
    seed: int,
    cycles: int,
    timeout: float,
    keep: bool,
) -> tuple[Data, dict[str, list[ToolCycle]]]:
    data = prepare_data(work, size, seed)
    per_tool: dict[str, list[ToolCycle]] = {t.name: [] for t in tools}
    try:
        for number in range(cycles):
            if number > 0:  # the previous cycle's revert must have restored the base exactly
                dataset.revert(data.root)
                if tree_manifest(data.root) != data.base:
                    raise SystemExit(f"run.py: {data.root} drifted from the generated dataset")
            for name, result in run_cycle(number, tools, data, work, timeout).items():
                per_tool[name].append(result)
    finally:
        dataset.revert(data.root)
        if not keep:
            empty_files(data.root)  # removed with the cycles' files when the run ends: main()
    return data, per_tool


def dataset_facts(data: Data) -> dict[str, Any]:
    facts = dataset.describe(data.plan)
    facts["summary"] = dataset.summary_line(data.plan)
    return facts


def compare_mode(args: argparse.Namespace, argv: Sequence[str]) -> int:
    work: Path = args.workdir
    tools, skipped = select_tools(args.tools)
    if not tools:
        say("run.py: nothing to measure: every requested tool is skipped")
        return 1
    problem = check_disk(work, args.size, len(tools))
    if problem:
        say(f"run.py: {problem}")
        return 2
    facts = machine_facts(work)
    versions = {t.name: t.version() for t in tools}
    started = dt.datetime.now(dt.UTC)
    data, per_tool = run_size(
        tools, work, args.size, args.seed, args.cycles, args.timeout, args.keep
    )
    summaries = [summarize(t.name, per_tool[t.name]) for t in tools]
    checks = targets(summaries)
    facts["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    record = {
        "mode": "compare",
        "date": started.date().isoformat(),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": _command_line(argv),
        "machine": facts,
        "versions": versions,
        "skipped": skipped,
        "dataset": dataset_facts(data),
        "cycles": args.cycles,
        "summaries": summaries,
        "targets": checks,
        "raw": {name: [asdict(c) for c in cs] for name, cs in per_tool.items()},
    }
    table = comparison_table(summaries)
    notes = [f"- {name} skipped: {why}" for name, why in skipped.items()]
    for s in summaries:
        notes += [
            f"- {s['tool']} failed in a cycle: {e} (logs in {args.workdir / 'logs'})"
            for e in s["errors"]
        ]
        if s["restore_verified"] is False:
            notes.append(
                f"- {s['tool']}: restore differs from the dataset: "
                + "; ".join(s["differences"][:3])
            )
    body = "\n".join(
        [
            f"## Side by side, {record['date']}",
            "",
            f"Command: `{record['command']}` ({args.cycles} cycle(s); medians over cycles).",
            "",
            _facts_lines(facts, versions, tools),
            f"Dataset: {record['dataset']['summary']}",
            "",
            table,
            "",
            *(["Targets for regionvault:", "", targets_table(checks), ""] if checks else []),
            *([*notes, ""] if notes else []),
            "The machine is shared with other work, so these figures are rough; compare the ratios "
            "within one run rather than the absolute times across runs.",
        ]
    )
    print(body)
    if not args.no_write:
        write_docs_section("method", METHOD)
        write_docs_section("compare", body)
        out = RESULTS / f"{record['date']}.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {DOCS.relative_to(REPO)} and {out.relative_to(REPO)}")
    failed = any(s["errors"] or s["restore_verified"] is False for s in summaries)
    return 1 if failed else 0


def _facts_lines(
    facts: Mapping[str, Any], versions: Mapping[str, str], tools: Sequence[Tool]
) -> str:
    repo_notes = "; ".join(f"{t.name}: {t.repo_note}" for t in tools)
    return "\n".join(
        [
            f"Machine: {facts['nproc']} cores ({facts['cpu']}), {facts['memory_gib']} GiB memory, "
            f"Linux {facts['kernel']}, Python {facts['python']}; load average at start "
            f"{facts['loadavg_at_start'][0]}, at end {facts.get('loadavg_at_end', ['?'])[0]}.",
            "",
            f"Tools: {'; '.join(versions.values())}.",
            "",
            f"Repository size counts {repo_notes}.",
            "",
        ]
    )


def sizes_mode(args: argparse.Namespace, argv: Sequence[str]) -> int:
    work: Path = args.workdir
    sizes: list[int] = args.size_list
    tools, skipped = select_tools(args.tools or "regionvault")
    if not tools:
        say("run.py: nothing to measure: every requested tool is skipped")
        return 1
    problem = check_disk(work, max(sizes), len(tools))
    if problem:
        say(f"run.py: {problem}")
        return 2
    facts = machine_facts(work)
    versions = {t.name: t.version() for t in tools}
    started = dt.datetime.now(dt.UTC)
    by_size: dict[int, list[dict[str, Any]]] = {}
    datasets: dict[int, dict[str, Any]] = {}
    for size in sizes:
        data, per_tool = run_size(
            tools, work, size, args.seed, args.cycles, args.timeout, args.keep
        )
        by_size[size] = [summarize(t.name, per_tool[t.name]) for t in tools]
        datasets[size] = dataset_facts(data)
    facts["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    labels = [dataset.format_size(s) for s in sizes]
    rows = [
        "| tool | phase | "
        + " | ".join(f"peak RSS MiB @ {x}" for x in labels)
        + f" | {labels[-1]} / {labels[0]} | "
        + " | ".join(f"wall s @ {x}" for x in labels)
        + " |",
        "|---|---|" + "---:|" * (2 * len(sizes) + 1),
    ]
    ratios: dict[str, float] = {}
    for i, tool in enumerate(tools):
        for phase in PHASES:
            cells = [by_size[s][i].get(phase) for s in sizes]
            peaks = [c["peak_rss_mib"] if c else None for c in cells]
            walls = [c["wall_s"] if c else None for c in cells]
            ratio = peaks[-1] / peaks[0] if peaks[0] and peaks[-1] else None
            if ratio is not None:
                ratios[f"{tool.name} {phase}"] = ratio
            rows.append(
                f"| {tool.name} | {phase} | "
                + " | ".join(_fmt(p, ".0f") for p in peaks)
                + f" | {_fmt(ratio, '.2f')} | "
                + " | ".join(_fmt(w, ".2f") for w in walls)
                + " |"
            )
    overall = {}
    for i, tool in enumerate(tools):
        highest = [
            max(
                (by_size[s][i][p]["peak_rss_mib"] for p in PHASES if by_size[s][i].get(p)),
                default=None,
            )
            for s in sizes
        ]
        if highest[0] and highest[-1]:
            overall[tool.name] = highest[-1] / highest[0]
    record = {
        "mode": "sizes",
        "date": started.date().isoformat(),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": _command_line(argv),
        "machine": facts,
        "versions": versions,
        "skipped": skipped,
        "datasets": {dataset.format_size(s): d for s, d in datasets.items()},
        "summaries": {dataset.format_size(s): v for s, v in by_size.items()},
        "phase_ratios": ratios,
        "highest_phase_ratio": overall,
    }
    lines = [
        f"- {name}: highest-phase peak RSS {labels[-1]} / {labels[0]} = {r:.2f} "
        f"({'within' if r <= 1.10 else '**not within**'} the 10% target)"
        for name, r in overall.items()
    ]
    lines += [f"- {name} skipped: {why}" for name, why in skipped.items()]
    body = "\n".join(
        [
            f"## Memory as the data grows, {record['date']}",
            "",
            f"Command: `{record['command']}` ({args.cycles} cycle(s) per size).",
            "",
            _facts_lines(facts, versions, tools),
            *[f"Dataset {dataset.format_size(s)}: {d['summary']}" for s, d in datasets.items()],
            "",
            "\n".join(rows),
            "",
            *lines,
            "",
            "Target (issue 3): regionvault's peak memory within 10% between 1 GiB and 4 GiB.",
        ]
    )
    print(body)
    if not args.no_write:
        write_docs_section("method", METHOD)
        write_docs_section("sizes", body)
        out = RESULTS / f"{record['date']}-sizes.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {DOCS.relative_to(REPO)} and {out.relative_to(REPO)}")
    failed = any(
        s["errors"] or s["restore_verified"] is False
        for summaries in by_size.values()
        for s in summaries
    )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Back up, change, back up again and restore one fixed-seed dataset with "
        "regionvault, restic and borg; write the table to docs/benchmarks.md.",
    )
    parser.add_argument(
        "--size",
        type=dataset.parse_size,
        default=dataset.parse_size("1GiB"),
        help="dataset size (default 1GiB; 4GiB also makes sense)",
    )
    parser.add_argument(
        "--sizes",
        help="e.g. 1GiB,4GiB: peak RSS of the tools at each size "
        "(default tool: regionvault) instead of the side-by-side table",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=1,
        help="cycles, each with fresh repositories; medians are reported",
    )
    parser.add_argument(
        "--tools",
        default=None,
        help=f"comma-separated, from {', '.join(TOOLS)} (default regionvault,restic,borg)",
    )
    parser.add_argument("--seed", type=int, default=dataset.DEFAULT_SEED)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=HERE / ".work",
        help="scratch space (default benchmarks/.work)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds before a phase is killed and counted as failed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the dataset afterwards")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the report only; leave docs/ and results/ alone",
    )
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    try:
        args.size_list = [dataset.parse_size(s) for s in (args.sizes or "").split(",") if s.strip()]
    except ValueError as exc:
        parser.error(f"--sizes: {exc}")
    if args.sizes is not None and not args.size_list:
        parser.error("--sizes needs at least one size, e.g. 1GiB,4GiB")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    remove_trees(args.workdir, args.workdir.glob("cycle-*"))  # a previous run's leftovers
    shutil.rmtree(args.workdir / "logs", ignore_errors=True)  # a few dozen files: no wait
    try:
        if args.sizes:
            return sizes_mode(args, argv)
        args.tools = args.tools or "regionvault,restic,borg"
        return compare_mode(args, argv)
    finally:
        # Every cycle's repositories and restores (and the datasets, unless kept) are removed
        # only now, emptied before (see empty_files). On ext4 without a journal (as here),
        # creating a file steps over the inodes freed in the last minutes of its block group
        # (`recently_deleted` under `ext4_create` in `perf`), one buffer lookup each: removing
        # one cycle's thousands of files would tax every restore of the next cycle (or of the
        # next size) with a cost of the harness's making.
        sizes = args.size_list or [args.size]
        datasets = [] if args.keep else [data_root(args.workdir, n, args.seed) for n in sizes]
        remove_trees(args.workdir, [*args.workdir.glob("cycle-*"), *datasets])
        for root in datasets:
            dataset.undo_path(root).unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
