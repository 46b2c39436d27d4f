"""Regressions of the browsing review (issue #20 part 5): names and owners that could drive
a terminal or split a line, ``latest`` that named a copy of stale data, ``diff`` that saw
changes a format-1 point or a copy cannot show, a ``prune --dry-run`` that told a healthy
vault to repair when a backup committed meanwhile, backup summary numbers (block images'
holes as dedup), and ``find`` reading the index once per point and holding its JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from regionvault.core.cli.backup import _summary
from regionvault.core.cli.browse import _long_line, shown_name
from regionvault.core.repository import Repository, TreeEntry, _prune
from regionvault.core.repository._store import Store
from regionvault.core.types import FileKind
from repository_support import repo_for
from test_block_images import DisksCapture, KiB
from test_golden_vaults import GOLDEN, open_golden, rv
from test_honest_capture import READ_STEP, HookedCapture, settle

#: a character that drives a terminal or splits a line, with how it must be shown
HOSTILE = {
    "\u009b": "\\u009b",  # C1 CSI: xterm takes "\u009b31m" as a colour in UTF-8
    "\u0085": "\\u0085",  # NEL: str.splitlines() splits on it
    "\u2028": "\\u2028",  # LINE SEPARATOR
    "\u2029": "\\u2029",
    "\u202e": "\\u202e",  # RIGHT-TO-LEFT OVERRIDE: the rest of the line shows reversed
    "\u2066": "\\u2066",  # LEFT-TO-RIGHT ISOLATE
    "\x1b": "\\x1b",
    "\x7f": "\\x7f",
}


def _ratio(line: str) -> float:
    return float(line.rsplit("dedup ratio ", 1)[1].rstrip("x").replace(",", ""))


# --------------------------------------------------------------------------- names


def test_shown_name_escapes_c1_line_separators_and_bidi_controls() -> None:
    for ch, shown in HOSTILE.items():
        assert shown_name(f"a{ch}b") == f"a{shown}b"
    # printable text beyond ASCII, and spaces, stay as they are; a byte that is not UTF-8
    # (kept by surrogateescape) is \xNN, never confused with the character U+0080-U+00FF
    assert shown_name("é ü 日本") == "é ü 日本"
    assert shown_name(b"\x9b".decode("utf-8", "surrogateescape")) == "\\x9b"
    assert shown_name("\\u009b") == "\\\\u009b"  # a name spelling an escape stays apart


def test_owner_and_group_names_are_escaped() -> None:
    entry = TreeEntry(
        path="f",
        kind=FileKind.FILE,
        mode=0o644,
        mtime_ns=0,
        size=1,
        user="ev\x1b[2J",
        group="g\nx\u0085",
    )
    line = _long_line(entry)
    assert "ev\\x1b[2J/g\\nx\\u0085" in line
    assert line.isprintable() and len(line.splitlines()) == 1


def test_ls_and_find_print_hostile_names_one_per_line(workdir: Path) -> None:
    data = workdir / "d"
    data.mkdir()
    names = [f"n{i}{ch}x" for i, ch in enumerate(HOSTILE)]
    for name in names:
        (data / name).write_bytes(b"x")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = ok("backup", "nf1").stdout.splitlines()[-1]
    listing = ok("ls", point).stdout
    lines = listing.splitlines()  # splits on U+0085, U+2028, U+2029 too
    assert len(lines) == len(names), lines
    assert all(line.isprintable() for line in lines), lines
    shown = {line.rsplit("  ", 1)[1] for line in lines}
    assert shown == {f"n{i}{esc}x" for i, esc in enumerate(HOSTILE.values())}
    found = ok("find", "n*").stdout.splitlines()
    assert len(found) == len(names) and all(line.isprintable() for line in found)


# --------------------------------------------------------------------------- latest


def test_latest_is_the_newest_capture_not_the_newest_copy(workdir: Path) -> None:
    data = workdir / "d"
    data.mkdir()
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ids = []
    for i in range(3):
        (data / "small.txt").write_bytes(b"v" * (10 + i))
        ids.append(ok("backup", "nf1").stdout.splitlines()[-1])
    # a copy of the second point arrives in west after the third was taken in east
    copy = ok("copy", ids[1], "--to", "west").stdout.splitlines()[-1]
    assert copy not in ids
    assert ok("ls", "latest", "-i", "nf1").stdout == ok("ls", ids[2]).stdout
    assert ok("ls", "latest", "-i", "nf1", "-r", "west").stdout == ok("ls", copy).stdout
    # beside a named point, latest is looked for in that point's region
    first = ok("diff", ids[0], "latest", "-i", "nf1")
    assert first.stdout == ok("diff", ids[0], ids[2]).stdout
    assert "size" in first.stdout
    back = ok("diff", "latest", copy, "-i", "nf1")  # west's latest: the copy itself
    assert back.stdout == "" and back.stderr == "0 added, 0 removed, 0 changed\n"


# --------------------------------------------------------------------------- diff


def test_diff_of_format_1_points_shows_no_owner_changes(tmp_path: Path) -> None:
    golden = open_golden(GOLDEN / "v1", tmp_path)
    old = golden.spec["points"][1]
    assert old["region"] == "local:east"
    data = tmp_path / "data"
    rv(golden, "restore", old["id"], "--region", "local:east", "--target", data)
    inst = rv(golden, "instances", "add", "-r", "local:east", "-n", "again", "--data", data)
    new = rv(golden, "backup", inst.stdout.splitlines()[-1]).stdout.splitlines()[-1]
    changes = rv(golden, "diff", old["id"], new)
    # the restore put back all format 1 recorded (same bytes, so the same chunk ids, and
    # the same sizes, modes and mtimes); owners it never recorded are no change
    assert (changes.stdout, changes.stderr) == ("", "0 added, 0 removed, 0 changed\n")


def test_diff_of_a_copy_and_a_native_point_says_content_unknown(workdir: Path) -> None:
    data = workdir / "d"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(1 << 20))
    (data / "small.txt").write_bytes(b"small\n")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ok("instances", "add", "--region", "west", "--name", "nf2", "--data", data)
    east_point = ok("backup", "nf1").stdout.splitlines()[-1]
    copy = ok("copy", east_point, "--to", "west").stdout.splitlines()[-1]
    native = ok("backup", "nf2").stdout.splitlines()[-1]
    result = ok("diff", copy, native)
    # the copy kept east's cuts of big.bin: its ids cannot tell the same bytes apart
    assert result.stdout == "?  big.bin  (content unknown)\n", result.stdout
    assert result.stderr == "0 added, 0 removed, 0 changed, 1 content unknown\n"
    # a change of size is known all the same
    (data / "big.bin").write_bytes(os.urandom((1 << 20) + 1))
    later = ok("backup", "nf2").stdout.splitlines()[-1]
    assert ok("diff", copy, later).stdout == "M  big.bin  (size, mtime, content)\n"


# --------------------------------------------------------------------------- dry runs


def test_prune_dry_run_during_a_backup_commit(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = workdir / "d"
    data.mkdir()
    (data / "a").write_bytes(os.urandom(100_000))
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ok("backup", "nf1")
    original_index = Store.load_index
    done: list[int] = []

    def racing(self: Store, **kw: Any) -> Any:
        # another process's backup commits between the dry run's two reads of the vault
        state = original_index(self, **kw)
        if not done and kw.get("keep_blobs"):
            done.append(1)
            (data / "b").write_bytes(os.urandom(100_000))
            ok("backup", "nf1")
        return state

    monkeypatch.setattr(Store, "load_index", racing)
    result = run("prune", "--dry-run", "--region", "east")
    assert done
    assert result.exit_code == 0, result.stderr
    assert "repair" not in result.stderr and "no index" not in result.stderr


def test_prune_dry_run_reads_again_when_a_prune_deleted_a_pack_meanwhile(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = workdir / "d"
    data.mkdir()
    (data / "a").write_bytes(os.urandom(100_000))
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ok("backup", "nf1")
    original = _prune.plan_prune
    calls: list[int] = []

    def once_wrong(store: Store, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise _prune.IntegrityError("packs/x", "pack is missing, yet points use it")
        return original(store, **kw)

    monkeypatch.setattr("regionvault.core.repository._browse.plan_prune", once_wrong)
    result = run("prune", "--dry-run", "--region", "east")
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 2


# --------------------------------------------------------------------------- summary


def test_block_summary_does_not_count_holes_as_dedup(east: Any) -> None:
    repo = Repository.init_or_open(east.vault, east.keys, region=east.name)
    # a 64 MiB image, one disk, with 256 KiB of random data and nothing else (a hole)
    cap = DisksCapture({0: os.urandom(256 * KiB)}, disks=None, size=64 * 1024 * KiB)
    point = repo.backup(cap)
    line = _summary(repo.load_manifest(point.id))
    assert "image: 67,108,864 bytes, 262,144 read, 0 taken from the base" in line, line
    assert 1.0 <= _ratio(line) < 1.1, line  # random data, read once: nothing deduplicated


def test_summary_ratio_is_at_least_one_and_counts_reads(workdir: Path) -> None:
    data = workdir / "d"
    data.mkdir()
    block = os.urandom(300_000)
    (data / "a").write_bytes(block)
    (data / "b").write_bytes(block)  # the same bytes: stored once
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    line = next(x for x in ok("backup", "nf1").stderr.splitlines() if x.startswith("files:"))
    assert line.startswith("files: 2 new, 0 changed, 0 unchanged;"), line
    assert 1.9 < _ratio(line) < 2.1, line


def test_a_file_read_again_counts_once_in_the_summary(east: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    log = src / "nf.log"
    log.write_bytes(os.urandom(1 << 20))
    settle()
    cap = HookedCapture(src)

    def append(opened: int, offset: int) -> None:
        if opened == 1 and offset == READ_STEP:  # the first read sees it grow: read again
            with log.open("ab") as f:
                f.write(b"one more line\n")

    cap.after_read["nf.log"] = append
    repo = repo_for(east)
    point = repo.backup(cap)
    assert cap.opens["nf.log"] >= 2 and point.issues == 0  # (3: once more, once settled)
    manifest = repo.load_manifest(point.id)
    line = _summary(manifest)
    assert line.startswith("files: 1 new, 0 changed, 0 unchanged;"), line
    # random data read twice is stored about once: no ratio of 2 (the second read counted
    # as dedup), none below 1 (the first read's chunks counted as stored for nothing)
    assert manifest.stats["bytes_read"] == (1 << 20) + len(b"one more line\n")
    assert 1.0 <= _ratio(line) < 1.05, line


# --------------------------------------------------------------------------- find


def test_find_reads_the_index_once_per_region(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = workdir / "d"
    data.mkdir()
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    for i in range(5):
        (data / f"f{i}").write_bytes(os.urandom(1000))
        ok("backup", "nf1")
    calls: list[int] = []
    original = Store.load_index

    def counting(self: Store, **kw: Any) -> Any:
        calls.append(1)
        return original(self, **kw)

    monkeypatch.setattr(Store, "load_index", counting)
    found = json.loads(ok("find", "f0", "--json").stdout)
    assert len(found) == 5 and len(calls) == 1
    assert [f["path"] for f in found] == ["f0"] * 5


def test_find_json_streams_its_matches(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON array is written as the matches are found: the first is out before the
    second point's tree is read."""
    data = workdir / "d"
    data.mkdir()
    (data / "f").write_bytes(b"f")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ok("backup", "nf1")
    ok("backup", "nf1")
    from regionvault.core.cli import browse

    written: list[str] = []
    reads: list[int] = []
    original_echo = browse.click.echo

    def echo(message: Any = None, **kw: Any) -> None:
        written.append(str(message))
        original_echo(message, **kw)

    original_find = browse._find_in

    def find_in(*args: Any) -> Any:
        for match in original_find(*args):
            reads.append(len(written))  # what was written when this match was found
            yield match

    monkeypatch.setattr(browse.click, "echo", echo)
    monkeypatch.setattr(browse, "_find_in", find_in)
    assert len(json.loads(ok("find", "f", "--json").stdout)) == 2
    assert reads == [0, 1]  # the first match was out before the second was found


# --------------------------------------------------------------------------- forget


def test_forget_takes_several_points_all_or_none(workdir: Path) -> None:
    data = workdir / "d"
    data.mkdir()
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    ids = []
    for i in range(3):
        (data / "f").write_bytes(b"v" * (i + 1))
        ids.append(ok("backup", "nf1").stdout.splitlines()[-1])
    copy = ok("copy", ids[0], "--to", "west").stdout.splitlines()[-1]

    def listed() -> set[str]:
        return {p["id"] for p in json.loads(ok("points", "--json").stdout)}

    everything = listed()
    ok("lock", ids[2], "--for", "1d")
    # one of them locked: none goes, and the refusal names it
    refused = run("forget", ids[0], copy, ids[2])
    assert refused.exit_code == 1
    assert f"point {ids[2]} in local:east cannot be forgotten" in refused.stderr
    assert "(nor the 2 other(s) named)" in refused.stderr
    assert listed() == everything
    dry = run("forget", "-n", ids[0], ids[2])
    assert dry.exit_code == 1 and "would not be forgotten" in dry.stderr
    # across two regions, a prefix and a repeat: each forgotten once
    said = ok("forget", "-n", "--json", ids[0][:8], copy, ids[0])
    assert json.loads(said.stdout) == [
        {"would_forget": ids[0], "region": "local:east", "dry_run": True},
        {"would_forget": copy, "region": "local:west", "dry_run": True},
    ]
    assert listed() == everything
    done = ok("forget", ids[0][:8], copy, ids[0])
    assert done.stdout == f"forgot {ids[0]} in local:east\nforgot {copy} in local:west\n"
    assert listed() == everything - {ids[0], copy}
    one = json.loads(ok("forget", "--json", ids[1]).stdout)  # one POINT: one object
    assert one == {"forgotten": ids[1], "region": "local:east"}
    usage = run("forget")
    assert usage.exit_code == 2


def test_ls_and_find_take_paths_with_a_leading_slash_or_dot(workdir: Path) -> None:
    data = workdir / "d"
    (data / "etc").mkdir(parents=True)
    (data / "etc" / "nf.conf").write_bytes(b"c")
    (data / "nf.conf").write_bytes(b"top")
    ok("instances", "add", "--region", "east", "--name", "nf1", "--data", data)
    point = ok("backup", "nf1").stdout.splitlines()[-1]
    listing = ok("ls", point, "etc").stdout
    assert listing.rstrip().endswith("etc/nf.conf")
    for path in ("/etc", "./etc", "./etc/", "/./etc", "././etc"):
        assert ok("ls", point, path).stdout == listing, path
    whole = ok("find", "etc/*").stdout
    assert whole.rstrip().endswith("etc/nf.conf") and len(whole.splitlines()) == 1
    assert ok("find", "/etc/*").stdout == ok("find", "./etc/*").stdout == whole
    # a leading / keeps the pattern a whole path: only the top-level nf.conf
    top = ok("find", "/nf.conf").stdout.splitlines()
    assert len(top) == 1 and top[0].endswith("  nf.conf")
    assert len(ok("find", "nf.conf").stdout.splitlines()) == 2  # a name: both
