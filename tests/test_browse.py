"""Browsing points and housekeeping without surprises: ``ls`` (a long listing of a real tree
with names that are not UTF-8, newlines, spaces and backslashes, a hard link, a symlink, a
FIFO; exact names in JSON), ``find`` across points, ``diff`` after a change, the backup
summary line, and dry runs of ``forget``, ``prune`` and ``retain`` that say what the real
run then does and change nothing in any vault."""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from regionvault.core.cli.root import CliState
from regionvault.core.pipeline import Engine
from regionvault.core.site import Site

CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"
#: 2021-03-04 05:06:07 UTC, the mtime of every entry of the tree
MTIME_NS = 1_614_834_367_000_000_000
BAD = b"bad\xff\xfe.bin"  # not UTF-8


def script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"},
    )


def good(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = script(*args, cwd=cwd)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def make_tree(root: Path) -> Path:
    root.mkdir()
    (root / "conf.txt").write_bytes(b"apn = internet\n")
    (root / "db").mkdir()
    (root / "db" / "subscribers.bin").write_bytes(os.urandom(50_000))
    (root / "with space").write_bytes(b"s")
    (root / "new\nline").write_bytes(b"n")
    (root / "back\\slash").write_bytes(b"b")
    (root / os.fsdecode(BAD)).write_bytes(b"x")
    os.link(root / "conf.txt", root / "hard")
    (root / "sym").symlink_to("conf.txt")
    os.mkfifo(root / "fifo")
    for entry in root.rglob("*"):  # Python 3.11: no Path.walk
        os.utime(entry, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    return root


def vault_listing(workdir: Path) -> dict[str, list[tuple[str, int]]]:
    """Every object (name, size) of every region's vault, through the Vault interface."""
    site = Site.load(workdir / "site.toml")
    try:
        return {r.name: sorted((o.name, o.size) for o in r.vault.list()) for r in site.regions}
    finally:
        site.close()


@pytest.fixture
def tree(workdir: Path) -> Path:
    return make_tree(workdir / "nf-data")


@pytest.fixture
def point(workdir: Path, tree: Path) -> str:
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", tree)
    return ok("backup", "nf1").stdout.splitlines()[-1]


# --------------------------------------------------------------------------- ls


def test_ls_lists_a_real_tree_with_odd_names(workdir: Path, point: str) -> None:
    result = good("ls", point[:8], cwd=workdir)
    lines = result.stdout.splitlines()
    by_name = {line.rsplit("  ", 1)[-1]: line for line in lines}
    # one line each, names escaped: the newline and the bytes that are not UTF-8 never break
    # a line, and a backslash is doubled so the escapes are unambiguous
    assert sorted(by_name) == sorted(
        [
            "back\\\\slash",
            "bad\\xff\\xfe.bin",
            "conf.txt",
            "db",
            "fifo",
            "hard => conf.txt (hard link)",
            "new\\nline",
            "sym -> conf.txt",
            "with space",
        ]
    )
    assert by_name["db"].startswith("drwx")
    assert by_name["fifo"].startswith("p")
    assert by_name["sym -> conf.txt"].startswith("lrwxrwxrwx")
    conf = by_name["conf.txt"].split()
    assert conf[0] == "-rw-r--r--"
    assert conf[2] == "15"  # size, as recorded
    assert " ".join(conf[3:5]) == "2021-03-04 05:06:07"  # mtime, UTC
    user = pwd.getpwuid(os.getuid()).pw_name
    assert conf[1].split("/")[0] == user
    # not recursive: db's file is not listed; with -R it is, with its full path
    assert not any("subscribers" in line for line in lines)
    deep = good("ls", "-R", point, cwd=workdir).stdout
    assert any(line.endswith("  db/subscribers.bin") for line in deep.splitlines())
    # PATH selects a directory's entries, or one entry
    assert good("ls", point, "db", cwd=workdir).stdout.rstrip().endswith("  db/subscribers.bin")
    one = good("ls", point, "conf.txt", cwd=workdir).stdout.splitlines()
    assert len(one) == 1 and one[0].endswith("  conf.txt")


def test_ls_json_gives_every_name_exactly(workdir: Path, point: str) -> None:
    out = good("ls", "--json", point, cwd=workdir).stdout
    entries = json.loads(out)
    assert out == json.dumps(entries, indent=2) + "\n"  # streamed, as print_json prints
    raw = {base64.b64decode(e["path_b64"]): e for e in entries}
    assert set(raw) == {
        b"back\\slash",
        BAD,
        b"conf.txt",
        b"db",
        b"fifo",
        b"hard",
        b"new\nline",
        b"sym",
        b"with space",
    }
    assert raw[b"new\nline"]["path"] == "new\nline"  # UTF-8: the name itself
    assert raw[BAD]["path"] == "bad\\xff\\xfe.bin"  # not UTF-8: escaped, exact in path_b64
    assert raw[b"sym"]["type"] == "symlink" and raw[b"sym"]["target"] == "conf.txt"
    assert raw[b"hard"]["link"] == "conf.txt" and raw[b"hard"]["size"] == 15
    assert raw[b"fifo"]["type"] == "fifo" and raw[b"fifo"]["mode"].startswith("p")
    assert raw[b"conf.txt"]["mtime_ns"] == MTIME_NS
    assert raw[b"conf.txt"]["uid"] == os.getuid()


def test_ls_of_an_unknown_path_or_point_is_one_line(workdir: Path, point: str) -> None:
    for args, words in (
        (("ls", point, "no/such"), ("no/such", point)),
        (("ls", "0123456789abcdef"), ("no recovery point", "0123456789abcdef")),
        (("ls", point, "../etc"), ("../etc",)),
    ):
        result = script(*args, cwd=workdir)
        assert result.returncode == 1, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("regionvault: error: "), result.stderr
        assert all(w in lines[0] for w in words), lines[0]
        assert result.stdout == ""


def test_a_reader_that_stops_reading_ends_ls_quietly(workdir: Path, point: str) -> None:
    """``regionvault ls P | head``: no error line, the status SIGPIPE gives (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write of the command meets a closed pipe
    try:
        done = subprocess.run(
            [str(CONSOLE_SCRIPT), "ls", "-R", point],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"},
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


# --------------------------------------------------------------------------- diff, find


def _change(tree: Path) -> None:
    (tree / "conf.txt").write_bytes(b"apn = internet.v2\n")  # also the hard link's inode
    os.utime(tree / "conf.txt", ns=(MTIME_NS, MTIME_NS))
    (tree / "with space").unlink()
    (tree / "db" / "new.log").write_bytes(b"fresh")
    (tree / "back\\slash").chmod(0o600)
    os.utime(tree / "db", ns=(MTIME_NS, MTIME_NS))


def test_diff_after_a_change(workdir: Path, tree: Path, point: str) -> None:
    _change(tree)
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    result = good("diff", point[:8], second[:8], cwd=workdir)
    assert result.stdout.splitlines() == [
        "-  with space",
        "M  back\\\\slash  (mode)",
        "M  conf.txt  (size, content)",
        "+  db/new.log",
        "M  hard  (size)",  # a hard link's size is its file's
    ], result.stdout
    assert "1 added, 1 removed, 3 changed" in result.stderr
    changes = json.loads(good("diff", "--json", point, second, cwd=workdir).stdout)
    kinds = {c["path"]: (c["change"], c["what"]) for c in changes}
    assert kinds["conf.txt"] == ("changed", ["size", "content"])
    assert kinds["db/new.log"] == ("added", [])
    assert kinds["with space"] == ("removed", [])
    # the same point twice: nothing differs
    assert good("diff", point, point, cwd=workdir).stdout == ""


def test_diff_sees_content_change_of_same_size_and_mtime(
    workdir: Path, tree: Path, point: str
) -> None:
    (tree / "db" / "subscribers.bin").write_bytes(os.urandom(50_000))
    os.utime(tree / "db" / "subscribers.bin", ns=(MTIME_NS, MTIME_NS))
    # the backup reads it again only if it notices: a new ctime makes it; the tree records
    # new chunk ids, which diff compares without reading any data
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    changes = json.loads(ok("diff", "--json", point, second).stdout)
    assert [(c["path"], c["what"]) for c in changes] == [("db/subscribers.bin", ["content"])]


def test_find_across_two_points_newest_first(workdir: Path, tree: Path, point: str) -> None:
    _change(tree)
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    lines = good("find", "*.log", cwd=workdir).stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(second[:8]) and lines[0].endswith("db/new.log")
    both = good("find", "conf.txt", "--instance", "nf1", cwd=workdir).stdout.splitlines()
    assert [line.split()[0] for line in both] == [second[:8], point[:8]]
    # a pattern with a / matches the whole path; a name that is not UTF-8 is found and shown
    assert good("find", "db/*", cwd=workdir).stdout.count("db/subscribers.bin") == 2
    assert "bad\\xff\\xfe.bin" in good("find", "bad*", cwd=workdir).stdout
    found = json.loads(good("find", "bad*", "--json", "--region", "east", cwd=workdir).stdout)
    assert {base64.b64decode(f["path_b64"]) for f in found} == {BAD}
    assert {f["point"] for f in found} == {point, second}
    nothing = script("find", "*.nope", cwd=workdir)
    assert nothing.returncode == 1 and "no entry matches '*.nope'" in nothing.stderr
    assert script("find", "conf.txt", "--instance", "other", cwd=workdir).returncode == 1


# --------------------------------------------------------------------------- backup summary


def test_backup_prints_a_summary_line_and_the_id_last(workdir: Path, tree: Path) -> None:
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", tree)
    first = good("backup", "nf1", cwd=workdir)
    assert len(first.stdout.splitlines()) == 1  # the id alone on standard output
    summary = [line for line in first.stderr.splitlines() if line.startswith("files:")]
    # conf.txt, db/subscribers.bin and the four odd names (the hard link is no file of its own)
    assert summary and summary[0].startswith("files: 6 new, 0 changed, 0 unchanged;")
    _change(tree)
    second = good("backup", "nf1", cwd=workdir)
    line = next(x for x in second.stderr.splitlines() if x.startswith("files:"))
    # db/new.log is new; conf.txt (new bytes) and back\\slash (chmod: a new ctime) are read
    # again; subscribers.bin and the two other odd names are not
    assert line.startswith("files: 1 new, 2 changed, 3 unchanged;"), line
    added = int(line.split("added ")[1].split(" bytes")[0].replace(",", ""))
    assert 0 < added < 50_000  # the unchanged 50 kB were not stored again
    assert "dedup ratio" in line


# --------------------------------------------------------------------------- dry runs


def test_forget_and_prune_dry_runs_change_nothing_and_say_what_goes(
    workdir: Path, tree: Path, point: str
) -> None:
    _change(tree)
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    before = vault_listing(workdir)
    said = ok("forget", "--dry-run", point[:8]).stdout
    assert said.startswith(f"would forget {point} in local:east")
    assert json.loads(ok("forget", "-n", "--json", point).stdout)["would_forget"] == point
    assert vault_listing(workdir) == before
    nothing = json.loads(ok("prune", "--dry-run", "--json").stdout)
    assert nothing[0]["packs_to_delete"] == [] and nothing[0]["bytes_to_free"] == 0
    ok("forget", point)
    before = vault_listing(workdir)
    plan = json.loads(ok("prune", "--dry-run", "--json", "--region", "east").stdout)[0]
    text = ok("prune", "-n", "--region", "east").stdout
    assert vault_listing(workdir) == before  # no lock object taken, nothing deleted
    assert plan["packs_to_delete"] or plan["packs_to_rewrite"]
    assert "(dry run: nothing changed)" in text
    done = json.loads(ok("prune", "--json", "--region", "east").stdout)[0]
    assert done["packs_deleted"] == len(plan["packs_to_delete"]) + len(plan["packs_to_rewrite"])
    assert done["packs_rewritten"] == len(plan["packs_to_rewrite"])
    # exact for deleted packs; a rewrite's new pack adds its header: an upper bound
    assert 0 < done["bytes_freed"] <= plan["bytes_to_free"]
    if not plan["packs_to_rewrite"]:
        assert done["bytes_freed"] == plan["bytes_to_free"]
    gone = {name for name, _ in before["local:east"]} - {
        name for name, _ in vault_listing(workdir)["local:east"]
    }
    assert set(plan["packs_to_delete"]) <= gone
    assert ok("ls", second, "conf.txt").stdout  # the remaining point is whole
    assert run("verify", "--read-data", "--region", "east").exit_code == 0


def test_forget_dry_run_refuses_what_a_lock_keeps(workdir: Path, point: str) -> None:
    ok("lock", point, "--for", "1d")
    before = vault_listing(workdir)
    result = run("forget", "--dry-run", point)
    assert result.exit_code == 1
    assert "would not be forgotten: retained until" in result.stderr
    assert vault_listing(workdir) == before
    real = run("forget", point)
    assert real.exit_code == 1 and "cannot be forgotten" in real.stderr


def _clock_in(monkeypatch: pytest.MonkeyPatch, ahead: timedelta) -> None:
    """Commands run as if ``ahead`` had passed (retention reads the engine's clock)."""
    original: Callable[..., Engine] = CliState.engine

    def later(self: CliState, **options: Any) -> Engine:
        return original(self, clock=lambda: datetime.now(UTC) + ahead, **options)

    monkeypatch.setattr(CliState, "engine", later)


def test_retain_dry_run_says_what_retain_then_does(
    workdir: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", tree)
    ok("instances", "add", "--region", "east", "--name", "nf2", "--data", tree)
    ok(
        "instances",
        "add",
        "--region",
        "east",
        "--name",
        "nf3",
        "--data",
        tree,
        "--tag",
        "backup=1-30",
    )
    gone = ok("backup", "nf1").stdout.splitlines()[-1]
    kept = ok("backup", "nf2").stdout.splitlines()[-1]
    young = ok("backup", "nf3").stdout.splitlines()[-1]
    ok("lock", kept, "--for", "20d")
    now = json.loads(ok("retain", "--dry-run", "--json").stdout)
    assert [r["forgotten"] + r["protected"] for r in now] == [[], []]  # nothing expired yet
    _clock_in(monkeypatch, timedelta(days=8))
    before = vault_listing(workdir)
    plan = {r["region"]: r for r in json.loads(ok("retain", "-n", "--json").stdout)}
    assert plan["local:east"]["forgotten"] == [gone]
    assert plan["local:east"]["protected"] == [kept]
    assert "would forget: " + gone in ok("retain", "--dry-run", "--region", "east").stdout
    assert vault_listing(workdir) == before
    done = {r["region"]: r for r in json.loads(ok("retain", "--json").stdout)}
    assert done["local:east"]["forgotten"] == [gone]
    assert done["local:east"]["protected"] == [kept]
    assert {p["id"] for p in json.loads(ok("points", "--json").stdout)} == {kept, young}


# --------------------------------------------------------------------------- block images


def test_ls_of_a_block_image_lists_its_disks(workdir: Path, point: str) -> None:
    from regionvault.core.repository import Repository
    from test_block_images import DISKS, IMAGE_SIZE, DisksCapture, three_disk_blocks

    site = Site.load(workdir / "site.toml")
    try:
        east = site.region("east")
        repo = Repository.open(east.vault, east.keys, region=east.name)
        image = repo.backup(DisksCapture(three_disk_blocks())).id
    finally:
        site.close()
    lines = good("ls", image, cwd=workdir).stdout.splitlines()
    assert [line.split()[1:] for line in lines] == [
        [f"{d.size:,}", "offset", f"{d.offset:,}", d.name] for d in DISKS
    ]
    doc = json.loads(ok("ls", "--json", image).stdout)
    assert doc["image_size"] == IMAGE_SIZE
    assert [(d["name"], d["offset"], d["size"]) for d in doc["disks"]] == [
        (d.name, d.offset, d.size) for d in DISKS
    ]
    refused = run("ls", image, "etc")
    assert refused.exit_code == 1 and "is a block image" in refused.stderr
    refused = run("diff", point, image)
    assert refused.exit_code == 1 and "is a block image" in refused.stderr
    # find passes over it: the file tree's match is all there is
    assert [line.split()[0] for line in ok("find", "conf.txt").stdout.splitlines()] == [point[:8]]


def test_prune_dry_run_names_what_locks_keep_as_prune_then_skips_it(
    workdir: Path, tree: Path, point: str
) -> None:
    ok("lock", point, "--for", "1d")  # its packs and the index objects mapping them
    _change(tree)
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    ok("forget", second)
    before = vault_listing(workdir)
    plan = json.loads(ok("prune", "-n", "--json", "--region", "east").stdout)[0]
    assert vault_listing(workdir) == before
    assert plan["kept_by_locks"], plan
    assert all("retained until" in line for line in plan["kept_by_locks"])
    done = json.loads(ok("prune", "--json", "--region", "east").stdout)[0]
    assert sorted(done["skipped"]) == sorted(plan["kept_by_locks"])
    assert done["packs_deleted"] == len(plan["packs_to_delete"]) + len(plan["packs_to_rewrite"])


def test_ls_dot_and_slash_are_the_top_level(workdir: Path, point: str) -> None:
    top = ok("ls", point).stdout
    assert top and ok("ls", point, ".").stdout == top == ok("ls", point, "/").stdout


def test_latest_names_an_instances_newest_point(workdir: Path, tree: Path, point: str) -> None:
    _change(tree)
    second = ok("backup", "nf1").stdout.splitlines()[-1]
    assert ok("ls", "latest", "--instance", "nf1").stdout == ok("ls", second).stdout
    assert "db/new.log" in ok("ls", "-R", "latest", "-i", "nf1").stdout
    assert ok("diff", point, "latest", "-i", "nf1").stdout == ok("diff", point, second).stdout
    usage = run("ls", "latest")
    assert usage.exit_code == 2 and "needs --instance" in usage.stderr
    usage = run("ls", point, "--instance", "nf1")
    assert usage.exit_code == 2 and "'latest' only" in usage.stderr
    usage = run("diff", point, second, "-i", "nf1")
    assert usage.exit_code == 2 and "'latest' only" in usage.stderr
    none = run("ls", "latest", "-i", "nobody")
    assert none.exit_code == 1
    assert none.stderr == "regionvault: error: instance 'nobody' has no recovery point\n"
