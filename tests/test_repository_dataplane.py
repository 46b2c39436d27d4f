"""The data plane's moving parts: a stream cut in staging blocks gives exactly the chunks of
one cut over the whole stream; a restore into a new, an empty or a non-empty directory, and
a failed one into each; image extents split at their limit; a file that grew since its
capture; and the compact structures that keep memory flat as data grows (the chunk index,
the set of chunks a backup wrote, the parent lookup, the fetcher's windows)."""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pyfastcdc
import pytest
from regionvault.core import FileCapture, IntegrityError, Region
from regionvault.core.repository import (
    Extent,
    Progress,
    Repository,
    _backup,
    _backup_walk,
    _chunking,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.types import FileEntry, FileKind
from repository_support import (
    INSTANCE,
    ImageCapture,
    capture,
    flip_bit,
    listing,
    object_path,
    repo_for,
    snapshot,
)

TEMP_PREFIX = ".rv-tmp-"


class ShortReads(io.RawIOBase):
    """A stream that hands out its bytes a few at a time, as pipes and sockets do."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = rng

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), len(self._data) - self._pos, self._rng.randrange(1, 50_000))
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def test_cutting_in_staging_blocks_matches_one_cut_over_each_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tiny pieces and blocks, so streams cross many block boundaries
    monkeypatch.setattr(_chunking, "PIECE", 8192)
    monkeypatch.setattr(_chunking, "_PIECES_PER_BLOCK", 2)
    rng = random.Random(7)
    streams = [
        rng.randbytes(300_000),
        b"",
        b"tiny",
        bytes(70_000) + rng.randbytes(5_000),
        b"".join(rng.choice([b"abc", b"0123456789", rng.randbytes(9)]) for _ in range(40_000)),
    ]

    def chunker() -> pyfastcdc.FastCDC:
        return pyfastcdc.FastCDC(8192, min_size=2048, max_size=32768, seed=99)

    def exhausted() -> None:
        raise AssertionError("the cutter needed more staging blocks than the pool holds")

    pool = _chunking.StagingPool(2, _chunking.Cutter.block_size(32768), exhausted)
    cutter = _chunking.Cutter(pool, chunker())
    for data in streams:  # back to back, as a reader thread cuts one file after another
        got: list[bytes] = []
        cutter.begin()
        f = ShortReads(data, rng)
        while True:
            want = rng.choice([100, 5000, 8192, 1 << 20])
            n, asked = cutter.fill(f, want)  # type: ignore[arg-type]
            end = n < asked
            assert cutter.block is not None
            got += [bytes(cutter.block.view[o : o + k]) for o, k in cutter.cut(final=end)]
            if end:
                break
        expected = [bytes(c.data) for c in chunker().cut_buf(data)] if data else []
        assert got == expected
    cutter.close()


def test_staging_pool_waits_for_a_free_block_and_stops_on_failure() -> None:
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("run failed")

    pool = _chunking.StagingPool(1, 1024, check)
    block = pool.take()
    pool.retain(block)  # a batch of spans holds it too
    pool.release(block)  # the cutter lets go; the batch still holds it
    with pytest.raises(RuntimeError, match="run failed"):
        pool.take()
    pool.release(block)
    assert pool.take() is block


def damaged_point(east: Region, tmp_path: Path) -> tuple[Repository, str, Path]:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    rng = random.Random(5)
    for i in range(5):
        (src / "d" / f"f{i}.bin").write_bytes(rng.randbytes(30_000 + i * 5_000))
    repo = repo_for(east)
    point = repo.backup(capture(src))
    for name in listing(east, "packs/"):
        path = object_path(east, name)
        header = fmt.PackHeader.parse(name, path.read_bytes())
        flip_bit(path, header.size + 100, bit=2)
    return repo, point.id, src


def test_restore_into_an_empty_directory_keeps_the_directory(east: Region, tmp_path: Path) -> None:
    from test_repository_roundtrip import build_tree

    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    point = repo.backup(capture(src))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    inode = out.stat().st_ino
    repo.restore(point.id, out)
    assert snapshot(out) == snapshot(src)
    assert out.stat().st_ino == inode
    assert out.stat().st_mode & 0o777 == 0o750
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_restore_into_a_directory_that_holds_something(east: Region, tmp_path: Path) -> None:
    from test_repository_roundtrip import build_tree

    src = tmp_path / "src"
    build_tree(src)
    repo = repo_for(east)
    point = repo.backup(capture(src))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    repo.restore(point.id, out)
    got = snapshot(out)
    assert got.pop("keep.txt")[0] == "file"
    assert (out / "keep.txt").read_text() == "mine"
    assert got == snapshot(src)
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("target", ["new", "empty", "holds-a-file"])
def test_a_failed_restore_leaves_nothing_unverified(
    east: Region, tmp_path: Path, target: str
) -> None:
    repo, point_id, src = damaged_point(east, tmp_path)
    out = tmp_path / "out"
    if target != "new":
        out.mkdir()
    if target == "holds-a-file":
        (out / "keep.txt").write_text("mine")
    with pytest.raises(IntegrityError, match="failed authentication"):
        repo.restore(point_id, out)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    if target == "holds-a-file":
        assert (out / "keep.txt").read_text() == "mine"
        assert not [p for p in left if TEMP_PREFIX in p]
        for p in out.rglob("*.bin"):
            assert p.read_bytes() == (src / p.relative_to(out)).read_bytes()
    else:
        assert left == []  # everything went through the staging directory, now removed


def test_image_extents_are_split_at_their_limit(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_backup, "MAX_EXTENT", 100_000)
    rng = random.Random(4)
    size = 2 << 20
    cap = ImageCapture(size, {4096: rng.randbytes(350_000), 1 << 20: rng.randbytes(20_000)})
    repo = repo_for(east)
    point = repo.backup(cap)
    extents = list(repo.entries(point.id))
    assert all(isinstance(e, Extent) for e in extents)
    spans = [(e.offset, e.length) for e in extents if isinstance(e, Extent)]
    assert len(spans) >= 4
    # consecutive pieces of the first range, each closed at the first chunk past the limit
    first = [s for s in spans if s[0] < 1 << 20]
    assert first[0][0] == 4096
    assert sum(length for _, length in first) == 350_000
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(first))
    assert all(n >= 100_000 for _, n in first[:-1])
    assert spans[-1] == (1 << 20, 20_000)
    image = tmp_path / "disk.img"
    repo.restore(point.id, image)
    assert image.read_bytes() == cap.image()


class GrowingCapture(FileCapture):
    """One file whose stream holds more bytes than its entry says (it grew)."""

    def __init__(self, size: int, extra: bytes) -> None:
        super().__init__(INSTANCE, datetime.now(UTC))
        self.size = size
        self.data = random.Random(8).randbytes(size) + extra

    def entries(self):  # type: ignore[no-untyped-def]
        yield FileEntry(path="log", kind=FileKind.FILE, mode=0o644, mtime_ns=1, size=self.size)

    def open(self, entry: FileEntry) -> BinaryIO:
        return io.BytesIO(self.data)


def test_a_file_that_grew_since_its_capture_is_stored_whole(east: Region, tmp_path: Path) -> None:
    cap = GrowingCapture(3 << 20, b"appended later\n" * 1000)
    repo = repo_for(east)
    point = repo.backup(cap)
    assert point.size == len(cap.data)
    repo.restore(point.id, tmp_path / "out")
    assert (tmp_path / "out" / "log").read_bytes() == cap.data


def test_a_failing_write_stops_the_restore_without_a_hang(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os
    import threading
    from dataclasses import replace

    from regionvault.core.repository import _restore_writer
    from repository_support import SMALL

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(2).randbytes(3 << 20))
    point = repo_for(east).backup(capture(src))
    # many small reads of one file: threads queue their writes for each other, and wait
    repo = repo_for(east, replace(SMALL, max_read=64 << 10, restore_window=256 << 10))
    monkeypatch.setattr(_restore_writer, "_QUEUE_BYTES", 1)
    real_pwritev = os.pwritev
    calls = []

    def failing_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(_restore_writer.os, "pwritev", failing_pwritev)
    out = tmp_path / "out"
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            repo.restore(point.id, out)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=restore, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the restore hung after a failed write"
    assert len(errors) == 1 and isinstance(errors[0], OSError), errors
    assert errors[0].errno == errno.ENOSPC
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- memory


def _raw_pack(rng: random.Random, ids: list[bytes], *, size: int = 1 << 24) -> fmt.RawIndexPack:
    entries = b"".join(
        fmt.BLOB_ENTRY.pack(chunk_id, fmt.BlobType.DATA, 0, 1000 * i, 116, 100)
        for i, chunk_id in enumerate(ids)
    )
    return fmt.RawIndexPack(rng.randbytes(16).hex(), size, b"header", entries)


@pytest.mark.parametrize("reserve", [None, 0, 1000, 20_003, 10**6])
def test_chunk_index_finds_every_chunk_at_its_first_listed_place(reserve: int | None) -> None:
    from regionvault.core.repository._index import ChunkIndex

    rng = random.Random(5)
    packs = [_raw_pack(rng, [rng.randbytes(32) for _ in range(500)]) for _ in range(40)]
    again = [fmt.BLOB_ENTRY.unpack_from(packs[0].entries, 46 * i)[0] for i in (0, 7)]
    packs.append(_raw_pack(rng, [*again, rng.randbytes(32)]))  # two chunks listed before
    index = ChunkIndex()
    if reserve is not None:  # sized up front (as load_index does) or not, however well
        index.reserve(reserve)
        sized = index._bits
    for pack in packs:
        index.add_pack(pack, "i1", keep_blobs=False)
    if reserve == 20_003:  # sized for every entry: no growing on the way
        assert index._bits == sized
    bits = index._bits
    index.reserve(10**6)  # too late: a table holding ids keeps its size
    assert index._bits == bits
    index.add_pack(packs[3], "i2", keep_blobs=False)  # a pack listed twice counts once
    assert len(index) == 40 * 500 + 1
    assert index.packs[packs[3].pack_id].index_ids == {"i1", "i2"}
    for pack in packs[:40]:
        for i, fields in enumerate(fmt.BLOB_ENTRY.iter_unpack(pack.entries)):
            loc = index.get(fields[0])
            assert fields[0] in index and loc is not None
            assert (loc.pack_id, loc.offset, loc.length, loc.raw_length) == (
                pack.pack_id, 1000 * i, 116, 100,
            )  # fmt: skip
    assert {index.get(c).pack_id for c in again} == {packs[0].pack_id}  # type: ignore[union-attr]
    assert sorted(index.chunk_ids()) == sorted(
        {f[0] for p in packs for f in fmt.BLOB_ENTRY.iter_unpack(p.entries)}
    )
    assert index.get(rng.randbytes(32)) is None and rng.randbytes(32) not in index
    assert index.get(b"short") is None and b"short" not in index


def test_chunk_index_refuses_a_bad_blob_entry_by_name() -> None:
    from regionvault.core.repository._index import ChunkIndex

    rng = random.Random(6)
    good = _raw_pack(rng, [rng.randbytes(32) for _ in range(3)])
    for fields, problem in [
        ((7, 0, 0, 116, 100), "unknown type 7"),
        ((0, 0x80, 0, 116, 100), "unknown flags"),
        ((0, 0, 0, 117, 100), "lengths disagree"),
        ((0, 0, (1 << 24) - 50, 116, 100), "past the end of its pack"),
    ]:
        bad = fmt.BLOB_ENTRY.pack(rng.randbytes(32), *fields)
        pack = fmt.RawIndexPack(good.pack_id, good.size, good.header, good.entries + bad)
        with pytest.raises(IntegrityError, match=rf"index/x \(pack {pack.pack_id}\).*{problem}"):
            ChunkIndex().add_pack(pack, "x", keep_blobs=False, name="index/x")
    index = ChunkIndex()
    index.add_pack(good, "x", keep_blobs=True)  # maintenance keeps every entry
    assert index.pack_blobs is not None
    assert [b.encode() for b in index.pack_blobs[good.pack_id]] == [
        good.entries[i : i + 46] for i in range(0, len(good.entries), 46)
    ]


def test_chunk_id_set_is_exact() -> None:
    from regionvault.core.repository._index import ChunkIdSet

    rng = random.Random(7)
    ids = [rng.randbytes(32) for _ in range(20_000)]
    seen = ChunkIdSet()
    assert all(seen.add(c) for c in ids) and not any(seen.add(c) for c in ids[::7])
    assert len(seen) == len(ids) and all(c in seen for c in ids)
    assert sorted(seen) == sorted(ids)
    # ids sharing their leading bytes share a bucket: a match that spans two of them (the
    # tail of one and the head of the next) is not a member
    prefix = b"\xab\xcd\xef"
    first = prefix + rng.randbytes(13) + prefix + rng.randbytes(13)
    second = prefix + rng.randbytes(29)
    both = ChunkIdSet()
    both.add(first)
    both.add(second)
    assert first[16:] + second[:16] not in both
    assert both.add(first[16:] + second[:16]) and len(both) == 3


def test_parent_lookup_reads_little_ahead_for_new_files_in_order() -> None:
    def rec(path: str) -> fmt.RawRecord:
        return fmt.RawRecord(fmt.TAG_FILE, 0o644, 1, 1, path.encode(), b"", 0, b"")

    # depth-first name order, as a capture that walks its directories sorted gives
    paths = [f"d{i:02d}/f{j:03d}" for i in range(20) for j in range(0, 100, 2)]
    read = 0

    def records() -> Iterator[fmt.RawRecord]:
        nonlocal read
        for path in paths:
            read += 1
            yield rec(path)

    lookup = _backup_walk.ParentLookup(records(), window=50_000)
    for i in range(20):
        for j in range(100):  # odd j: a new file between two old ones
            found = lookup.find(f"d{i:02d}/f{j:03d}".encode())
            assert (found is not None) == (j % 2 == 0)
            # never more than a few records ahead (those read while its order was learnt)
            assert read <= i * 50 + (j + 1) // 2 + 1 + _backup_walk.ParentLookup._ORDERED
    # a parent out of that order: every record is found through the look-ahead window
    shuffled = [rec(p) for p in paths]
    random.Random(8).shuffle(shuffled)
    lookup = _backup_walk.ParentLookup(iter(shuffled), window=50_000)
    found = sum(lookup.find(p.encode()) is not None for p in paths)
    assert found == len(paths)


def test_a_window_of_repeated_chunks_restores_to_a_block_sink(east: Region) -> None:
    from repository_support import MemorySink

    rng = random.Random(9)
    pattern = rng.randbytes(40_000)
    size = 4 << 20
    cap = ImageCapture(size, {0: pattern * 30, 2 << 20: pattern * 10})
    repo = repo_for(east)
    point = repo.backup(cap)
    sink = MemorySink(size)
    repo.restore(point.id, sink)
    assert bytes(sink.data) == cap.image()


class _Synthetic(FileCapture):
    """``count`` small files made up as they are listed; records how far the listing ran
    ahead of the files opened. With ``counts``, it also tells its totals up front."""

    def __init__(self, count: int, *, counts: bool) -> None:
        super().__init__(INSTANCE, datetime.now(UTC))
        self.count = count
        self.counts = counts
        self.listed = self.opened = self.lead = 0

    @staticmethod
    def content(i: int) -> bytes:
        return f"file {i}\n".encode() * (1 + i % 7)

    def entries(self) -> Iterator[FileEntry]:
        self.listed = 0
        for i in range(self.count):
            self.listed += 1
            self.lead = max(self.lead, self.listed - self.opened)
            size = len(self.content(i))
            yield FileEntry(f"d{i // 1000:03d}/f{i:05d}", FileKind.FILE, 0o644, 1, size)

    def open(self, entry: FileEntry) -> BinaryIO:
        self.opened += 1
        return io.BytesIO(self.content(int(entry.path[-5:])))

    def totals(self) -> tuple[int, int] | None:
        if not self.counts:
            return None
        return self.count, sum(len(self.content(i)) for i in range(self.count))


def test_a_backup_streams_the_capture_and_learns_totals_without_holding_entries(
    east: Region,
) -> None:
    count = _backup._LOOKAHEAD + 2000
    size = sum(len(_Synthetic.content(i)) for i in range(count))
    repo = repo_for(east)
    # a capture that counts itself: streamed, a bounded number of entries ahead
    counted = _Synthetic(count, counts=True)
    seen: list[Progress] = []
    point = repo.backup(counted, progress=seen.append)
    assert point.size == size and counted.opened == count
    assert counted.lead <= 2 * _backup._MAX_PENDING, counted.lead
    assert all(p.files_total == count and p.bytes_total == size for p in seen)
    # one that cannot count: held ahead only up to the look-ahead, then streamed untold
    untold = _Synthetic(count, counts=False)
    seen.clear()
    repo.backup(untold, progress=seen.append, parent=False)
    assert _backup._LOOKAHEAD <= untold.lead <= _backup._LOOKAHEAD + 2 * _backup._MAX_PENDING
    assert all(p.files_total is None and p.bytes_total is None for p in seen)
    assert seen[-1].done and seen[-1].files_done == count
    # a small one that cannot count: the look-ahead holds all of it and learns the totals
    small = _Synthetic(50, counts=False)
    seen.clear()
    repo.backup(small, progress=seen.append, parent=False)
    assert seen[-1].files_total == 50
    # without a progress callback nothing is counted or held ahead, whatever the capture
    for quiet in (_Synthetic(count, counts=True), _Synthetic(count, counts=False)):
        quiet.totals = None  # type: ignore[method-assign,assignment]  # must not be called
        repo.backup(quiet, parent=False)
        assert quiet.opened == count and quiet.lead <= 2 * _backup._MAX_PENDING, quiet.lead
