"""Backup and restore round trips through the repository on the local provider: file trees
with all their metadata, block images with holes, dedup, incremental skipping."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from regionvault.core import (
    CaptureKind,
    FileKind,
    FileSink,
    ObjectNotFound,
    PathNotFound,
    Region,
    RegionVaultError,
    RepositoryNotFound,
)
from regionvault.core.repository import (
    ChunkerParams,
    Extent,
    Progress,
    Repository,
    RepositorySettings,
    TreeEntry,
)
from repository_support import (
    INSTANCE,
    CountingCapture,
    ImageCapture,
    MemorySink,
    capture,
    listing,
    repo_for,
    snapshot,
)


def build_tree(root: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    (root / "etc" / "nf" / "deep" / "deeper").mkdir(parents=True)
    (root / "var" / "log").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "etc" / "nf" / "config.toml").write_text("[nf]\nname = 'vCU'\n" * 50)
    (root / "var" / "log" / "nf.log").write_bytes(
        b"".join(f"2025-01-01 line {i} {rng.random()}\n".encode() for i in range(4000))
    )
    (root / "var" / "blob.bin").write_bytes(rng.randbytes(300_000))
    (root / "etc" / "nf" / "deep" / "deeper" / "small").write_bytes(b"x")
    (root / "ünïcødé ファイル 📦.dat").write_bytes(rng.randbytes(5000))
    (root / "spaces and 'quotes'").write_text("q")
    # a sparse file: a hole, data, a longer hole, a little data, a trailing hole
    with (root / "sparse.img").open("wb") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(10_000))
        f.seek(3 << 20)
        f.write(b"tail data")
        f.truncate(4 << 20)
    (root / "link-to-config").symlink_to("etc/nf/config.toml")
    (root / "var" / "dangling").symlink_to("../../nowhere")
    (root / "abs-link").symlink_to("/absolute/target")
    (root / "etc" / "nf" / "config.toml").chmod(0o640)
    (root / "var" / "blob.bin").chmod(0o600)
    (root / "etc" / "nf" / "deep").chmod(0o750)
    (root / "empty.txt").chmod(0o444)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    # distinct mtimes everywhere, applied deepest first so directories keep theirs
    stamp = 1_600_000_000_123_456_789
    for dirpath, dirs, files in sorted(os.walk(root), key=lambda t: -t[0].count("/")):
        for name in files + dirs:
            p = Path(dirpath, name)
            stamp += 1_000_000_007
            os.utime(p, ns=(stamp, stamp), follow_symlinks=False)


def test_file_tree_round_trip_is_byte_exact_with_metadata(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    expires = datetime.now(UTC) + timedelta(days=7)
    point = repo.backup(capture(src), policy="1-7", expires_at=expires)
    assert point.kind is CaptureKind.FILES
    assert point.instance_id == INSTANCE.id
    assert (point.policy, point.expires_at) == ("1-7", expires)
    assert point.size == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()
    )

    out = tmp_path / "out"
    report = repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)
    assert report.files == 9
    # holes stay holes: the 4 MiB sparse file takes far less space than its size
    st = (out / "sparse.img").stat()
    assert st.st_size == 4 << 20
    assert st.st_blocks * 512 < 1 << 20
    # no temporary names are left behind
    assert not [p for p in out.rglob("*") if p.name.startswith(".rv-tmp-")]


def test_restore_into_a_file_sink_and_selected_paths(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    point = repo.backup(capture(src))

    sink_root = tmp_path / "sink"
    repo.restore(point.id, FileSink(sink_root))
    assert snapshot(sink_root) == snapshot(src)

    part = tmp_path / "part"
    repo.restore(point.id, part, paths=["etc/nf/deep", "var/log/nf.log"])
    got = snapshot(part)
    assert set(got) == {
        "etc", "etc/nf", "etc/nf/deep", "etc/nf/deep/deeper", "etc/nf/deep/deeper/small",
        "var", "var/log", "var/log/nf.log",
    }  # fmt: skip
    full = snapshot(src)
    for path in ("etc/nf/deep/deeper/small", "var/log/nf.log", "etc/nf/deep", "var/log"):
        assert got[path] == full[path]
    with pytest.raises(PathNotFound, match=f"recovery point {point.id} holds no path 'no/such'"):
        repo.restore(point.id, tmp_path / "none", paths=["no/such"])
    with pytest.raises(PathNotFound, match=r"holds no paths 'no/such', 'var/lo'$") as caught:
        repo.restore(point.id, tmp_path / "none", paths=["var/log", "var/lo", "no/such"])
    assert caught.value.paths == ["no/such", "var/lo"]
    assert not (tmp_path / "none").exists()
    with pytest.raises(RegionVaultError, match=r"'\.\.' part"):
        repo.restore(point.id, tmp_path / "none", paths=["../etc"])


def test_block_image_with_holes_round_trips(east: Region, tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 8 << 20
    blocks = {
        0: rng.randbytes(64 << 10),
        1 << 20: b"\0" * (128 << 10) + rng.randbytes(40_000),
        (3 << 20) + 4096: rng.randbytes(12_288),
        size - 8192: rng.randbytes(8192),
    }
    # an unaligned last extent length: 40,000 is not a multiple of 4,096
    cap = ImageCapture(size, blocks)
    repo = repo_for(east)
    point = repo.backup(cap)
    assert point.kind is CaptureKind.BLOCKS
    assert point.size == size

    image = tmp_path / "disk.img"
    repo.restore(point.id, image)
    assert image.read_bytes() == cap.image()
    assert image.stat().st_blocks * 512 < 2 << 20  # holes stayed holes

    sink = MemorySink(size)
    repo.restore(point.id, sink)
    assert not sink.committed  # its owner commits it (the pipeline, before a launch)
    assert bytes(sink.data) == cap.image()

    extents = [e for e in repo.entries(point.id)]
    assert all(isinstance(e, Extent) for e in extents)
    assert [(e.offset, e.length) for e in extents] == sorted((o, len(d)) for o, d in blocks.items())
    with pytest.raises(ValueError, match="BlockSink"):
        repo.restore(point.id, FileSink(tmp_path / "x"))


def test_second_backup_of_the_same_data_writes_no_new_packs(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    first = repo.backup(capture(src))
    packs = listing(east, "packs/")
    assert len(packs) >= 2  # small packs: the data spans several

    cap = CountingCapture(src)
    second = repo.backup(cap)
    assert cap.opened == []  # every file unchanged by size, mtime and mode
    assert listing(east, "packs/") == packs  # not a byte of new pack data
    assert repo.load_manifest(second.id).parent == first.id

    # without the parent every file is read again, yet dedup still writes nothing new
    cap = CountingCapture(src)
    third = repo.backup(cap, parent=False)
    assert len(cap.opened) == 9
    assert listing(east, "packs/") == packs
    assert repo.load_manifest(third.id).parent is None
    assert [p.id for p in repo.points()] == [first.id, second.id, third.id]
    assert [p.id for p in repo.points(instance_id="other")] == []

    out = tmp_path / "out"
    repo.restore(second.id, out)
    assert snapshot(out) == snapshot(src)


def test_incremental_backup_reads_only_changed_files(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    repo.backup(capture(src))
    before = sum(info.size for info in east.vault.list("packs/"))

    blob = src / "var" / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[150_000:150_010] = b"CHANGED!!!"
    blob.write_bytes(bytes(data))
    (src / "new-file").write_bytes(b"new" * 1000)
    (src / "empty.txt").chmod(0o644)  # a mode change alone makes the file read again
    cap = CountingCapture(src)
    point = repo.backup(cap)
    # (each once, or twice: a file changed just before its read is read again once settled)
    assert sorted(set(cap.opened)) == ["empty.txt", "new-file", "var/blob.bin"]
    grown = sum(info.size for info in east.vault.list("packs/")) - before
    assert grown < 64 << 10  # a few chunks and the tree, not the 300 kB file

    out = tmp_path / "out"
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)


def test_entries_and_manifest_describe_the_point(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    point = repo.backup(capture(src))
    manifest = repo.load_manifest(point.id)
    assert manifest.point == point
    assert manifest.format_version == 2
    assert manifest.vault_id == east.vault.vault_id
    assert len(manifest.root_hash) == 64
    assert manifest.stats["files"] == 9
    entries = list(repo.entries(point.id))
    assert len(entries) == manifest.entry_count
    by_path = {e.path: e for e in entries if isinstance(e, TreeEntry)}
    assert by_path["link-to-config"].kind is FileKind.SYMLINK
    assert by_path["link-to-config"].target == "etc/nf/config.toml"
    assert by_path["empty.txt"].size == 0 and by_path["empty.txt"].chunks == ()
    assert by_path["var/blob.bin"].mode == 0o600
    assert len(by_path["var/blob.bin"].chunks) > 5
    with pytest.raises(ObjectNotFound):
        repo.load_manifest("0" * 32)
    with pytest.raises(ObjectNotFound, match=r"points/\.\./config"):
        repo.load_manifest("../config")


def test_progress_is_reported(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    seen: list[Progress] = []
    point = repo.backup(capture(src), progress=seen.append)
    assert seen[-1].done and seen[-1].operation == "backup"
    assert seen[-1].files_done == seen[-1].files_total == 9
    assert seen[-1].bytes_done == seen[-1].bytes_total == point.size
    assert seen[-1].bytes_written > 0
    seen.clear()
    repo.restore(point.id, tmp_path / "out", progress=seen.append)
    assert seen[-1].done and seen[-1].operation == "restore"
    assert seen[-1].bytes_done == point.size and seen[-1].files_done == 9


def test_several_reader_threads_give_the_same_point(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    rng = random.Random(4)
    for i in range(40):
        (src / "var" / f"extra-{i:02d}").write_bytes(rng.randbytes(rng.randrange(1, 90_000)))
    one = repo_for(east)
    first = one.backup(capture(src), parent=False)
    from dataclasses import replace

    from repository_support import SMALL

    many = repo_for(east, replace(SMALL, read_threads=3))
    second = many.backup(capture(src), parent=False)
    assert list(many.entries(first.id)) == list(many.entries(second.id))
    assert many.load_manifest(second.id).stats["chunks_new"] == 0
    out = tmp_path / "out"
    many.restore(second.id, out)
    assert snapshot(out) == snapshot(src)


def test_large_file_streams_through_many_packs(east: Region, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(9)
    # larger than one read block (8 MiB), mixed random and repetitive data
    with (src / "big.bin").open("wb") as f:
        for i in range(20):
            f.write(rng.randbytes(300_000) if i % 2 else bytes([i]) * 300_000)
    settings = RepositorySettings(pack_size=1 << 20, workers=3)
    repo = Repository.init_or_open(east.vault, east.keys, region=east.name, settings=settings)
    assert repo.chunker == ChunkerParams()
    point = repo.backup(capture(src))
    assert len(listing(east, "packs/")) >= 3
    out = tmp_path / "out"
    repo.restore(point.id, out)
    assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_init_or_open_is_idempotent_and_racing_initialisers_agree(east: Region) -> None:
    import threading

    ids: list[str] = []

    def init() -> None:
        ids.append(Repository.init_or_open(east.vault, east.keys, region=east.name).repository_id)

    threads = [threading.Thread(target=init) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert listing(east, "config") == ["config"]
    assert Repository.open(east.vault, east.keys, region=east.name).repository_id == ids[0]


def test_open_without_a_repository_names_the_config(west: Region) -> None:
    with pytest.raises(RepositoryNotFound, match="no repository in local:west yet") as raised:
        Repository.open(west.vault, west.keys, region=west.name)
    assert isinstance(raised.value, ObjectNotFound) and raised.value.name == "config"
    assert list(west.vault.list()) == []  # opening writes nothing


def test_any_vault_will_do(east: Region, tmp_path: Path) -> None:
    """The repository uses nothing but the Vault interface: an in-memory one works."""
    from repository_support import MemoryVault

    src = tmp_path / "src"
    build_tree(src)
    vault = MemoryVault()
    repo = Repository.init_or_open(vault, east.keys, region="memory:one")
    point = repo.backup(capture(src))
    out = tmp_path / "out"
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)
    assert repo.verify(read_data=True).ok
    repo.forget([point.id])
    repo.prune()
    assert sorted({name.split("/")[0] for name in vault.objects}) == ["config", "index"]


def test_parent_lookup_survives_reordering_and_changes() -> None:
    from regionvault.core.repository import _format as fmt
    from regionvault.core.repository._backup_walk import ParentLookup

    def rec(path: str) -> fmt.RawRecord:
        return fmt.RawRecord(fmt.TAG_FILE, 0o644, 1, 1, path.encode(), b"", 0, b"")

    parent = [rec(f"f{i:03d}") for i in range(200)]
    lookup = ParentLookup(iter(parent), window=50)
    # the new tree: some files gone, new ones inserted, a stretch in another order
    wanted = [f"f{i:03d}" for i in range(0, 60)] + ["new-a"]
    wanted += [f"f{i:03d}" for i in reversed(range(60, 90))] + ["new-b"]
    wanted += [f"f{i:03d}" for i in range(120, 200)]
    found = [p for p in wanted if lookup.find(p.encode()) is not None]
    assert "new-a" not in found and "new-b" not in found
    assert len(found) >= 160  # nearly everything found, with a window of only 50


def test_bad_capture_input_is_refused_by_name(east: Region, tmp_path: Path) -> None:
    from collections.abc import Iterator
    from typing import BinaryIO

    from regionvault.core import ComputeError, FileCapture, FileEntry

    class BadCapture(FileCapture):
        def entries(self) -> Iterator[FileEntry]:
            yield FileEntry("ok", FileKind.DIR, 0o755, 1)
            yield FileEntry("ok/../../etc/passwd", FileKind.FILE, 0o644, 1, size=1)

        def open(self, entry: FileEntry) -> BinaryIO:
            raise AssertionError("never read")

    repo = repo_for(east)
    with pytest.raises(ComputeError, match=r"'ok/\.\./\.\./etc/passwd'"):
        repo.backup(BadCapture(INSTANCE, datetime.now(UTC)))
    overlapping = ImageCapture(1 << 20, {0: b"a" * 8192, 4096: b"b" * 8192})
    with pytest.raises(ComputeError, match="overlaps"):
        repo.backup(overlapping)
    assert repo.points() == []


def test_a_failing_file_read_stops_the_backup_cleanly(east: Region, tmp_path: Path) -> None:
    from dataclasses import replace
    from typing import BinaryIO

    from regionvault.core import ComputeError, FileEntry
    from repository_support import SMALL

    src = tmp_path / "src"
    build_tree(src)

    class Failing(CountingCapture):
        def open(self, entry: FileEntry) -> BinaryIO:
            if entry.path == "var/log/nf.log":
                raise ComputeError("var/log/nf.log vanished")
            return super().open(entry)

    for threads in (1, 3):
        repo = repo_for(east, replace(SMALL, read_threads=threads))
        with pytest.raises(ComputeError, match="vanished"):
            repo.backup(Failing(src))
        assert repo.points() == []
        assert listing(east, "locks/") == []
    assert repo_for(east).verify().ok
