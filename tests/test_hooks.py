"""Site hooks around a capture: ``[hooks.NAME]`` in site.toml, the ``backup-hook`` tag, the
built-in ``sqlite`` hook (docs/hooks.md)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from regionvault.core import FileCapture
from regionvault.core.config import DEFAULT_HOOK_TIMEOUT, parse_site
from regionvault.core.errors import ConfigError, HookFailed, PolicyError
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.hooks import HOOK_WORK_DIR, HookRun, remove_stale_runs
from regionvault.core.pipeline.sqlite_hook import SQLITE_HEADER, SqliteCopies
from regionvault.core.policy import parse_hook_names
from regionvault.core.repository import RepositorySettings, TreeEntry
from regionvault.core.site import Region, Site
from regionvault.core.types import FileEntry, Instance, IssueKind, Tags
from regionvault.providers.local.compute import LocalFileCapture
from repository_support import INSTANCE, repo_for
from site_support import enter_workdir, open_site, site_toml

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)


def write_site(tmp_path: Path, extra: str = "") -> Path:
    """A one-region test site (tests/site_support.py) with ``extra`` TOML after it."""
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(site_toml({"local:east": "east"}, name="hooks", extra=extra))
    return path


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Any]:
    """``make_engine(extra_toml) -> (engine, east)`` over a one-region local site."""
    sites: list[Site] = []

    def make(extra: str = "") -> tuple[Engine, Region]:
        site = open_site(write_site(tmp_path, extra))
        sites.append(site)
        return Engine(site, settings=SETTINGS), site.region("east")

    yield make
    for site in sites:
        site.close()


def add(region: Region, tmp_path: Path, name: str = "db-1", **tags: str) -> Instance:
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    (data / "conf.txt").write_text("state\n")
    return region.compute.register_instance(name, data, tags=tags)


def work_dir(engine: Engine) -> Path:
    return engine.site.config.state_dir / HOOK_WORK_DIR


# --------------------------------------------------------------------------- configuration


def test_hook_tables_parse_strings_through_sh_and_arrays_as_argv() -> None:
    site = parse_site(
        {
            "regions": {"local:east": {"root": "east"}},
            "hooks": {
                "pg": {"before": "psql -c 'select 1'", "after": ["/bin/true", "x"]},
                "quick": {"after": "sync", "timeout": "30"},
            },
        },
        source="site.toml",
    )
    pg, quick = site.hooks["pg"], site.hooks["quick"]
    assert pg.before == ("/bin/sh", "-c", "psql -c 'select 1'")
    assert pg.after == ("/bin/true", "x")
    assert pg.timeout == DEFAULT_HOOK_TIMEOUT == timedelta(minutes=5)
    assert quick.before is None and quick.timeout == timedelta(seconds=30)  # bare = seconds
    assert site.hook_tag_key == "backup-hook"


@pytest.mark.parametrize(
    ("hooks", "key", "words"),
    [
        ({"pg": {"before": "x", "stop": "y"}}, "hooks.pg.stop", "unknown key"),
        ({"pg": {"timeout": "5m"}}, "hooks.pg", "needs a before or an after"),
        ({"pg": {"before": ""}}, "hooks.pg.before", "must not be empty"),
        ({"pg": {"before": []}}, "hooks.pg.before", "empty array"),
        ({"pg": {"before": ["ok", 3]}}, "hooks.pg.before", "array of strings"),
        ({"pg": {"before": 3}}, "hooks.pg.before", "must be a string"),
        ({"pg": {"before": "x", "timeout": "soon"}}, "hooks.pg.timeout", "not a duration"),
        ({"pg": {"before": "x", "timeout": 5}}, "hooks.pg.timeout", "must be a string"),
        ({"pg": "pg_ctl"}, "hooks.pg", "must be a table"),
        ({"sqlite": {"before": "x"}}, "hooks.sqlite", "built-in hook"),
        ({"none": {"before": "x"}}, "hooks.none", "reserved"),
        ({"1pg": {"before": "x"}}, "hooks.1pg", "starts with a letter"),
    ],
)
def test_bad_hook_tables_are_refused_naming_file_and_key(
    hooks: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_site({"regions": {"local:east": {"root": "e"}}, "hooks": hooks}, source="site.toml")
    message = str(info.value)
    assert message.startswith(f"site.toml: {key}: "), message
    assert words in message


def test_hook_tag_names_are_checked_against_the_site() -> None:
    site = parse_site(
        {"regions": {"local:east": {"root": "e"}}, "hooks": {"pg": {"before": "x"}}},
        source="site.toml",
    )
    assert parse_hook_names("sqlite, pg", site=site) == ("sqlite", "pg")
    assert parse_hook_names("none", site=site) == ()
    for value, words in [
        ("pg,mysql", "unknown hook 'mysql' (known: pg, sqlite"),
        ("pg,,sqlite", "empty hook name"),
        ("pg,pg", "names hook 'pg' twice"),
    ]:
        with pytest.raises(PolicyError) as info:
            parse_hook_names(value, site=site)
        assert words in str(info.value)


def test_an_unknown_hook_in_the_tag_fails_that_backup_naming_tag_and_value(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite,mysql"})
    with pytest.raises(PolicyError) as info:
        engine.backup(inst.id)
    message = str(info.value)
    assert "tag backup-hook='sqlite,mysql'" in message and inst.id in message
    assert "unknown hook 'mysql'" in message and "\n" not in message
    assert engine.repository("east").points() == []


# --------------------------------------------------------------------------- running


def logging_hooks(log: Path, *names: str, fail_before: str = "", fail_after: str = "") -> str:
    """[hooks.NAME] tables whose steps append "before NAME" / "after NAME" to ``log``."""
    out = []
    for name in names:
        before = f"echo before {name} >> {log}" + (
            "; echo 'no quorum' >&2; exit 3" if name == fail_before else ""
        )
        after = f"echo after {name} $REGIONVAULT_BACKUP_STATUS >> {log}" + (
            "; echo 'thaw refused' >&2; exit 4" if name == fail_after else ""
        )
        out.append(f'[hooks.{name}]\nbefore = "{before}"\nafter = "{after}"\ntimeout = "20s"\n')
    return "\n".join(out)


def test_befores_run_in_order_and_afters_in_reverse_before_the_commit(
    make_engine: Any, tmp_path: Path
) -> None:
    log = tmp_path / "order.log"
    engine, east = make_engine(logging_hooks(log, "a", "b", "c"))
    inst = add(east, tmp_path, **{"backup-hook": "c,a,b"})
    point = engine.backup(inst.id)
    assert log.read_text().splitlines() == [
        "before c",
        "before a",
        "before b",
        "after b ok",
        "after a ok",
        "after c ok",
    ]
    assert point.issues == 0
    assert list(work_dir(engine).iterdir()) == []  # the run's private directory is gone


def test_a_failing_before_fails_the_backup_in_one_line_and_commits_nothing(
    make_engine: Any, tmp_path: Path
) -> None:
    log = tmp_path / "order.log"
    engine, east = make_engine(logging_hooks(log, "a", "b", "c", fail_before="b"))
    inst = add(east, tmp_path, **{"backup-hook": "a,b,c"})
    with pytest.raises(HookFailed) as info:
        engine.backup(inst.id)
    message = str(info.value)
    assert message == (f"hook 'b' before for instance {inst.id} (db-1): exit status 3: no quorum")
    # a's before ran, so its after did (the backup failed); b failed, c never started
    assert log.read_text().splitlines() == ["before a", "before b", "after a failed"]
    assert engine.repository("east").points() == []


def test_a_failing_after_gives_a_point_with_a_hook_issue(make_engine: Any, tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    engine, east = make_engine(logging_hooks(log, "a", "b", fail_after="b"))
    inst = add(east, tmp_path, **{"backup-hook": "a,b"})
    point = engine.backup(inst.id)
    # the data was taken: the point is committed, and says what went wrong
    assert point.issues == 1
    assert log.read_text().splitlines() == ["before a", "before b", "after b ok", "after a ok"]
    manifest = engine.repository("east").load_manifest(point.id)
    (issue,) = manifest.issues
    assert issue.kind is IssueKind.HOOK
    assert issue.message == (
        f"hook 'b' after for instance {inst.id} (db-1): exit status 4: thaw refused"
    )
    assert [p.issues for p in engine.repository("east").points(inst.id)] == [1]


def test_afters_run_when_the_backup_fails_after_the_befores(
    make_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "order.log"
    engine, east = make_engine(logging_hooks(log, "a"))
    inst = add(east, tmp_path, **{"backup-hook": "a"})

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.repository("east"), "backup", broken)
    with pytest.raises(OSError, match="No space"):
        engine.backup(inst.id)
    assert log.read_text().splitlines() == ["before a", "after a failed"]


def test_hooks_get_the_documented_environment(make_engine: Any, tmp_path: Path) -> None:
    dump = tmp_path / "env"
    dump.mkdir()
    # an argv (a TOML array), not run through a shell
    code = (
        "import json, os, sys; phase = os.environ['REGIONVAULT_HOOK_PHASE']; "
        "json.dump(dict(os.environ), open(os.path.join(sys.argv[1], phase), 'w')); "
        "open(os.path.join(os.environ['REGIONVAULT_HOOK_DIR'], phase), 'w').close()"
    )
    argv = json.dumps([sys.executable, "-c", code, str(dump)])
    engine, east = make_engine(f"[hooks.envdump]\nbefore = {argv}\nafter = {argv}\n")
    inst = add(east, tmp_path, **{"backup-hook": "envdump", "role": "hlr"})
    engine.backup(inst.id)
    before = json.loads((dump / "before").read_text())
    after = json.loads((dump / "after").read_text())
    for env in (before, after):
        assert env["REGIONVAULT_INSTANCE_ID"] == inst.id
        assert env["REGIONVAULT_INSTANCE_NAME"] == "db-1"
        assert env["REGIONVAULT_REGION"] == "local:east"
        assert env["REGIONVAULT_DATA_DIR"] == str((tmp_path / "data" / "db-1").resolve())
        assert env["REGIONVAULT_HOOK_NAME"] == "envdump"
        assert json.loads(env["REGIONVAULT_INSTANCE_TAGS"])["role"] == "hlr"
        assert "PATH" in env  # the service's own environment is passed on
    assert (before["REGIONVAULT_HOOK_PHASE"], after["REGIONVAULT_HOOK_PHASE"]) == (
        "before",
        "after",
    )
    assert "REGIONVAULT_BACKUP_STATUS" not in before
    assert after["REGIONVAULT_BACKUP_STATUS"] == "ok"
    # one private directory shared by a hook's before and after, removed after the backup
    hook_dir = Path(before["REGIONVAULT_HOOK_DIR"])
    assert after["REGIONVAULT_HOOK_DIR"] == str(hook_dir)
    assert hook_dir.is_relative_to(work_dir(engine)) and not hook_dir.exists()


def test_a_cloud_instance_gets_an_empty_data_dir_and_the_sqlite_hook_refuses_it(
    tmp_path: Path,
) -> None:
    dump = tmp_path / "env.json"
    site = parse_site(
        {
            "regions": {"aws:us-east-1": {}},
            "hooks": {"dump": {"before": f"env > {dump}"}},
        },
        source="site.toml",
    )
    vm = Instance(id="i-0abc", name="vm", region="aws:us-east-1", tags=Tags())
    with HookRun(["dump"], site.hooks, vm, region="aws:us-east-1", work_root=tmp_path / "w") as run:
        run.before()
    assert "REGIONVAULT_DATA_DIR=\n" in dump.read_text()
    with (
        pytest.raises(HookFailed, match=r"'sqlite' before .* no local data directory"),
        HookRun(["sqlite"], {}, vm, region="aws:us-east-1", work_root=tmp_path / "w") as run,
    ):
        run.before()


def test_a_hook_past_its_timeout_is_killed_with_its_whole_process_group(
    make_engine: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    before = f"sleep 300 & echo $! > {pid_file}; echo 'still waiting' >&2; wait"
    engine, east = make_engine(f'[hooks.slow]\nbefore = "{before}"\ntimeout = "1s"\n')
    inst = add(east, tmp_path, **{"backup-hook": "slow"})
    with pytest.raises(HookFailed) as info:
        engine.backup(inst.id)
    assert str(info.value) == (
        f"hook 'slow' before for instance {inst.id} (db-1): timed out after 1s (killed): "
        "still waiting"
    )
    child = int(pid_file.read_text())
    for _ in range(200):  # bounded: the kill is sent before backup() returns
        if not _running(child):
            break
        time.sleep(0.05)
    assert not _running(child)
    assert engine.repository("east").points() == []


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_stale_run_directories_of_a_killed_backup_are_removed(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    root = work_dir(engine)
    root.mkdir(parents=True)
    # a run killed with -9: its directory and lock file stay, and nobody holds the lock
    stale = root / "999-dead"
    (stale / "sqlite").mkdir(parents=True)
    (stale / "sqlite" / "0.db").write_bytes(b"x" * 1000)
    (root / "999-dead.lock").touch()
    # a live run's lock is held: its directory stays
    live = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.mkdir(sys.argv[2]); print(flush=True); "
            "time.sleep(60)",
            str(root / "1-live.lock"),
            str(root / "1-live"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert live.stdout is not None
        live.stdout.readline()
        inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
        engine.backup(inst.id)
        assert sorted(p.name for p in root.iterdir()) == ["1-live", "1-live.lock"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.communicate()
    assert remove_stale_runs(root) == [root / "1-live"]
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- sqlite


WRITER = r"""
import sqlite3, sys, time, os
path, stop, ready = sys.argv[1], sys.argv[2], sys.argv[3]
db = sqlite3.connect(path, isolation_level=None, timeout=30)
db.execute("PRAGMA journal_mode=WAL")
# frequent checkpoints: a file-by-file copy then tears the database in most trials
db.execute("PRAGMA wal_autocheckpoint=100")
db.execute("CREATE TABLE IF NOT EXISTS counter (n INTEGER PRIMARY KEY, pad BLOB)")
db.execute("CREATE TABLE IF NOT EXISTS total (k INTEGER PRIMARY KEY, n INTEGER)")
db.execute("INSERT OR IGNORE INTO total VALUES (1, 0)")
n = start = db.execute("SELECT n FROM total").fetchone()[0]
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline and n < 200000:
    n += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO counter VALUES (?, randomblob(20000))", (n,))
    db.execute("UPDATE total SET n = ?", (n,))
    if n % 7 == 0:  # rewrite old pages too, so the database is not only appended
        db.execute("UPDATE counter SET pad = randomblob(20000) WHERE n = ?", (n // 2,))
    db.execute("COMMIT")
    if n - start == 300:
        open(ready, "w").close()
db.close()
"""


def _check_restored(db_path: Path) -> int:
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = [n for (n,) in db.execute("SELECT n FROM counter ORDER BY n")]
        (total,) = db.execute("SELECT n FROM total").fetchone()
    finally:
        db.close()
    # a committed state: rows 1..total, each transaction whole
    assert rows == list(range(1, total + 1))
    return total


def test_a_live_sqlite_writer_backs_up_consistent_with_the_sqlite_hook(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    (data / "state").mkdir()
    db_path = data / "state" / "hlr.db"
    totals = []
    for trial in range(5):
        stop, ready = tmp_path / f"stop-{trial}", tmp_path / f"ready-{trial}"
        argv = [sys.executable, "-c", WRITER, str(db_path), str(stop), str(ready)]
        writer = subprocess.Popen(argv)
        try:
            for _ in range(600):  # bounded: at most 30 s for 300 transactions
                if ready.exists() or writer.poll() is not None:
                    break
                time.sleep(0.05)
            assert ready.exists(), "the writer did not start"
            point = engine.backup(inst.id)
            assert writer.poll() is None, "the writer must still be writing after the backup"
        finally:
            stop.touch()
            writer.wait(timeout=60)
        assert point.issues == 0
        target = tmp_path / f"restore-{trial}"
        engine.restore(point.id, region="east", target=target)
        restored = target / "state"
        # the copy holds what the WAL held: no side files are taken
        assert sorted(p.name for p in restored.iterdir()) == ["hlr.db"]
        totals.append(_check_restored(restored / "hlr.db"))
        assert (target / "conf.txt").read_text() == "state\n"
    assert all(t >= 300 for t in totals) and totals == sorted(totals)
    assert list(work_dir(engine).iterdir()) == []  # every copy removed


@pytest.mark.parametrize("page_size", [512, 65536])
def test_sqlite_hook_copies_rollback_journal_databases_of_any_page_size(
    make_engine: Any, tmp_path: Path, page_size: int
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "app.sqlite")
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE t (x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    db.commit()
    # a transaction in flight: its hot journal must not be taken, nor its changes
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM t")
    point = engine.backup(inst.id)
    db.rollback()
    db.close()
    target = tmp_path / "restore"
    engine.restore(point.id, region="east", target=target)
    assert sorted(p.name for p in target.iterdir()) == ["app.sqlite", "conf.txt"]
    restored = sqlite3.connect(target / "app.sqlite")
    assert restored.execute("PRAGMA page_size").fetchone() == (page_size,)
    assert restored.execute("SELECT count(*) FROM t").fetchone() == (1000,)
    restored.close()


def test_a_file_with_sqlites_header_that_is_no_database_is_taken_and_named(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    fake = SQLITE_HEADER + bytes(range(256)) * 16
    (data / "sealed.db").write_bytes(fake)
    point = engine.backup(inst.id)
    assert point.issues == 1
    (issue,) = engine.repository("east").load_manifest(point.id).issues
    assert issue.path == "sealed.db" and issue.kind is IssueKind.HOOK
    assert "hook 'sqlite' could not copy it" in issue.message
    target = tmp_path / "restore"
    engine.restore(point.id, region="east", target=target)
    assert (target / "sealed.db").read_bytes() == fake


def test_an_incremental_backup_takes_a_database_changed_only_in_its_wal(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "hlr.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # changes stay in the WAL
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    engine.backup(inst.id)
    db.execute("INSERT INTO t VALUES (2)")
    second = engine.backup(inst.id)
    db.close()
    target = tmp_path / "restore"
    engine.restore(second.id, region="east", target=target)
    restored = sqlite3.connect(target / "hlr.db")
    assert restored.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
    restored.close()


def test_the_sqlite_hook_runs_with_named_hooks_in_the_tags_order(
    make_engine: Any, tmp_path: Path
) -> None:
    log = tmp_path / "order.log"
    engine, east = make_engine(logging_hooks(log, "flush"))
    inst = add(east, tmp_path, **{"backup-hook": "flush,sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "a.db")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    point = engine.backup(inst.id)
    assert point.issues == 0
    assert log.read_text().splitlines() == ["before flush", "after flush ok"]


def test_env_of_the_process_is_not_changed_by_hooks() -> None:
    # hooks get their variables in their own environment, never in the service's
    assert not any(k.startswith("REGIONVAULT_HOOK") for k in os.environ)


# --------------------------------------------------------------------------- the command


def cli_with_hooked_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook_toml: str, hook: str
) -> Callable[..., Any]:
    """A CLI site (``regionvault init``) with ``hook_toml`` appended and an instance nf-1
    tagged ``backup-hook=<hook>``; returns a function running the CLI in it."""
    from click.testing import CliRunner
    from regionvault.core.cli import cli

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    enter_workdir(tmp_path, monkeypatch)
    with (tmp_path / "site.toml").open("a") as site:
        site.write("\n" + hook_toml)
    data = tmp_path / "nf-data"
    data.mkdir()
    (data / "state").write_text("x")
    added = run(
        "instances", "add", "--region", "east", "--name", "nf-1", "--data", str(data),
        "--tag", f"backup-hook={hook}",
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    return run


def test_the_backup_command_fails_in_one_line_when_a_before_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cli_with_hooked_instance(
        tmp_path,
        monkeypatch,
        "[hooks.quiesce]\nbefore = \"echo frozen; echo 'lock held' >&2; exit 7\"\n",
        "quiesce",
    )
    result = run("backup", "nf-1")
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("regionvault: error: hook 'quiesce' before for instance i-")
    assert line.endswith("(nf-1): exit status 7: lock held")
    assert run("points").stdout == ""  # nothing committed


def test_the_backup_command_exits_3_naming_a_failed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cli_with_hooked_instance(
        tmp_path, monkeypatch, "[hooks.thaw]\nafter = \"echo 'thaw refused' >&2; exit 4\"\n", "thaw"
    )
    result = run("backup", "nf-1")
    # the data is all there, but the workload was not put back as it should: incomplete
    assert result.exit_code == 3, result.stderr
    point_id = result.stdout.splitlines()[-1]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("regionvault: warning: hook 'thaw' after for instance i-")
    assert warnings[0].endswith("(nf-1): exit status 4: thaw refused")
    assert point_id in run("points").stdout


def test_the_sqlite_hook_leaves_the_data_directory_as_it_was(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "closed.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in data.iterdir())
    engine.backup(inst.id)
    after = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in data.iterdir())
    assert after == before  # no -wal or -shm left beside a database nobody has open


def test_for_a_block_capture_the_afters_run_right_after_the_snapshot(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from regionvault.core.interfaces import BlockCapture

    class Snapshot(BlockCapture):
        def blocks(self) -> Iterator[tuple[int, bytes]]:
            return iter(())

    log = tmp_path / "order.log"
    site = parse_site(
        {
            "regions": {"aws:us-east-1": {}},
            "hooks": {
                "fs": {"before": f"echo freeze >> {log}", "after": f"echo thaw >> {log}; exit 1"}
            },
        },
        source="site.toml",
    )
    vm = Instance(id="i-0abc", name="vm", region="aws:us-east-1")
    with HookRun(["fs"], site.hooks, vm, region="aws:us-east-1", work_root=tmp_path / "w") as run:
        run.before()
        run.captured(Snapshot(vm, datetime.now(UTC), size=512, block_size=512))
        assert log.read_text().splitlines() == ["freeze", "thaw"]  # held only for the snapshot
        (issue,) = run.before_commit()  # the failed after still reaches the point
        assert issue.kind is IssueKind.HOOK and "exit status 1" in issue.message
    assert log.read_text().splitlines() == ["freeze", "thaw"]  # once only


def test_a_database_locked_past_the_sqlite_hooks_limit_fails_the_backup(
    make_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import regionvault.core.pipeline.hooks as hooks_module

    monkeypatch.setattr(hooks_module, "DEFAULT_HOOK_TIMEOUT", timedelta(seconds=1))
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "busy.db", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    db.execute("BEGIN EXCLUSIVE")  # a rollback-journal writer that keeps its lock
    db.execute("INSERT INTO t VALUES (1)")
    try:
        with pytest.raises(HookFailed) as info:
            engine.backup(inst.id)
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert str(info.value) == (
        f"hook 'sqlite' before for instance {inst.id} (db-1): cannot copy 'busy.db': "
        "timed out (a writer kept the database locked)"
    )
    assert engine.repository("east").points() == []
    assert list(work_dir(engine).iterdir()) == []


# --------------------------------------------------------------------------- review fixes


def test_a_wal_commit_keeping_the_copys_size_and_the_newest_mtime_reaches_the_next_point(
    make_engine: Any, tmp_path: Path
) -> None:
    # a commit in the same clock tick as the hook's look: the copy's size and the newest
    # mtime of the database and its side files are as the parent point recorded them
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "hlr.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES ('before')")
    stamp = 1_700_000_000_123_456_789

    def same_tick() -> None:
        for name in ("hlr.db", "hlr.db-wal", "hlr.db-shm"):
            os.utime(data / name, ns=(stamp, stamp))

    same_tick()
    first = engine.backup(inst.id)
    db.execute("UPDATE t SET x = 'after!'")  # as long: the copy keeps its page count
    same_tick()
    second = engine.backup(inst.id)
    db.close()
    repo = engine.repository("east")
    sizes = [
        {e.path: e.size for e in repo.entries(p.id) if isinstance(e, TreeEntry)}["hlr.db"]
        for p in (first, second)
    ]
    assert sizes[0] == sizes[1]
    target = tmp_path / "restore"
    engine.restore(second.id, region="east", target=target)
    restored = sqlite3.connect(target / "hlr.db")
    assert restored.execute("SELECT x FROM t").fetchall() == [("after!",)]
    restored.close()


def test_hard_links_to_a_wal_the_hook_leaves_out_are_restored_as_a_file_and_its_links(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    db = sqlite3.connect(data / "app.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    # walked after app.db-wal, so recorded as hard links to it
    os.link(data / "app.db-wal", data / "wal-keep")
    os.link(data / "app.db-wal", data / "wal-keep2")
    wal = (data / "app.db-wal").read_bytes()
    point = engine.backup(inst.id)
    db.close()
    assert point.issues == 0
    target = tmp_path / "restore"
    engine.restore(point.id, region="east", target=target)
    assert sorted(p.name for p in target.iterdir()) == [
        "app.db",
        "conf.txt",
        "wal-keep",
        "wal-keep2",
    ]
    assert (target / "wal-keep").read_bytes() == wal
    assert (target / "wal-keep").stat().st_ino == (target / "wal-keep2").stat().st_ino
    restored = sqlite3.connect(target / "app.db")
    assert restored.execute("SELECT x FROM t").fetchall() == [(1,)]
    restored.close()


class _LeavingOut(FileCapture):
    """A capture of a directory without the entries named ``left_out``: what the sqlite hook
    gave before it made a hard link to a side file it left out a file of its own."""

    def __init__(self, root: Path, left_out: set[str]) -> None:
        self.inner = LocalFileCapture(INSTANCE, datetime.now(UTC), root)
        super().__init__(self.inner.instance, self.inner.taken_at)
        self.left_out = left_out

    def entries(self) -> Iterator[FileEntry]:
        return (e for e in self.inner.entries() if e.path not in self.left_out)

    def open(self, entry: FileEntry) -> BinaryIO:
        return self.inner.open(entry)


def test_a_point_with_a_hard_link_to_a_name_it_lacks_restores_with_a_note(
    east: Region, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.db-wal").write_bytes(b"wal frames")
    os.link(src / "a.db-wal", src / "b")
    (src / "c").write_text("kept\n")
    repo = repo_for(east)
    point = repo.backup(_LeavingOut(src, {"a.db-wal"}))
    report = repo.restore(point.id, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c"]
    assert (tmp_path / "out" / "c").read_text() == "kept\n"
    assert any("hard links not restored" in note and "b" in note for note in report.notes)
    # and when a selection names the link alone
    report = repo.restore(point.id, tmp_path / "picked", paths=["b"])
    assert list((tmp_path / "picked").iterdir()) == []
    assert any("hard links not restored" in note and "b" in note for note in report.notes)


def _small_database(path: Path, value: str) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (?)", (value,))
    db.commit()
    db.close()


def test_a_database_swapped_for_a_symlink_before_sqlite_opens_it_is_not_followed(
    make_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a user of the instance points a database's name at one they may not read, after the
    # hook looked at the file and before SQLite opens it by name
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    _small_database(data / "app.db", "mine")
    _small_database(tmp_path / "foreign.db", "someone else's secret")
    real_connect = sqlite3.connect
    swapped: list[str] = []

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if "app.db" in str(database) and not swapped:
            swapped.append(str(database))
            (data / "app.db").replace(tmp_path / "app.db.moved")
            (data / "app.db").symlink_to(tmp_path / "foreign.db")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    point = engine.backup(inst.id)
    monkeypatch.undo()
    assert swapped
    (issue,) = engine.repository("east").load_manifest(point.id).issues
    assert issue.path == "app.db" and issue.kind is IssueKind.HOOK
    assert "replaced while the hook copied it" in issue.message
    target = tmp_path / "restore"
    engine.restore(point.id, region="east", target=target)
    assert (target / "app.db").is_symlink()  # taken as the capture found it: a symlink
    for path in target.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"secret" not in path.read_bytes(), path


def test_a_fifo_put_in_a_databases_place_does_not_hang_the_sqlite_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _small_database(data / "app.db", "mine")
    real_isreg = stat.S_ISREG
    swapped: list[bool] = []

    def s_isreg(mode: int) -> bool:
        # the hook has just seen a regular file: a FIFO takes its place now
        regular = real_isreg(mode)
        if regular and not swapped:
            swapped.append(True)
            (data / "app.db").replace(tmp_path / "app.db.moved")
            os.mkfifo(data / "app.db")
        return regular

    copies = SqliteCopies(data, tmp_path / "work")
    # bounded: should the hook wait on the FIFO for a writer, one comes after 10 s
    done = threading.Event()
    unblocked: list[bool] = []

    def watchdog() -> None:
        if not done.wait(10):
            unblocked.append(True)
            with contextlib.suppress(OSError):
                os.close(os.open(data / "app.db", os.O_WRONLY | os.O_NONBLOCK))

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    monkeypatch.setattr(stat, "S_ISREG", s_isreg)
    try:
        copies.make(time.monotonic() + 60, "hook 'sqlite' before")
    finally:
        monkeypatch.undo()
        done.set()
        guard.join(15)
    assert swapped and not unblocked, "the hook waited on a FIFO"
    assert copies.substitutes == {}
    (issue,) = copies.issues
    assert issue.path == "app.db" and issue.kind is IssueKind.HOOK


def test_a_database_deeper_than_path_max_is_named_not_taken_live_in_silence(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    _small_database(tmp_path / "deep.db", "deep")
    content = (tmp_path / "deep.db").read_bytes()
    level = "d" * 200
    depth = 5000 // len(level)  # the path is longer than PATH_MAX (4096)
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(level, dir_fd=fd)
            below = os.open(level, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        out = os.open("deep.db", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, content)
        os.close(out)
    finally:
        os.close(fd)
    rel = "/".join([level] * depth + ["deep.db"])
    point = engine.backup(inst.id)
    issues = engine.repository("east").load_manifest(point.id).issues
    assert [(i.path, i.kind) for i in issues] == [(rel, IssueKind.HOOK)]
    assert "taken as it is, possibly inconsistent" in issues[0].message


def test_a_directory_the_sqlite_hook_cannot_list_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    _small_database(data / "top.db", "reached")
    _small_database(data / "locked" / "app.db", "out of reach")
    real_scandir = os.scandir

    def scandir(where: Any) -> Any:
        # what EACCES or EIO gives an unprivileged or failing walk (root passes EACCES)
        shown = str(Path(f"/proc/self/fd/{where}").readlink() if isinstance(where, int) else where)
        if shown.endswith("/locked"):
            raise PermissionError(13, "Permission denied", shown)
        return real_scandir(where)

    monkeypatch.setattr(os, "scandir", scandir)
    copies = SqliteCopies(data, tmp_path / "work")
    copies.make(time.monotonic() + 60, "hook 'sqlite' before")
    monkeypatch.undo()
    assert sorted(copies.substitutes) == ["top.db"]
    assert [(i.path, i.kind) for i in copies.issues] == [("locked", IssueKind.HOOK)]
    assert "could not look into it (Permission denied)" in copies.issues[0].message


def test_a_database_with_two_names_is_restored_as_one_file_with_two_links(
    make_engine: Any, tmp_path: Path
) -> None:
    engine, east = make_engine()
    inst = add(east, tmp_path, **{"backup-hook": "sqlite"})
    data = tmp_path / "data" / "db-1"
    _small_database(data / "a.db", "both names")
    os.link(data / "a.db", data / "b.db")
    point = engine.backup(inst.id)
    assert point.issues == 0
    target = tmp_path / "restore"
    engine.restore(point.id, region="east", target=target)
    assert (target / "a.db").stat().st_ino == (target / "b.db").stat().st_ino
    restored = sqlite3.connect(target / "b.db")
    assert restored.execute("SELECT x FROM t").fetchall() == [("both names",)]
    restored.close()
