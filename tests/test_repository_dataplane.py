"""The data plane's moving parts: a stream cut in staging blocks gives exactly the chunks of
one cut over the whole stream; a restore into a new, an empty or a non-empty directory, and
a failed one into each; image extents split at their limit; a file that grew since its
capture."""

from __future__ import annotations

import io
import itertools
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pyfastcdc
import pytest
from regionvault.core import FileCapture, IntegrityError, Region
from regionvault.core.repository import Extent, Repository, _backup, _chunking
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

    from regionvault.core.repository import _restore
    from repository_support import SMALL

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(2).randbytes(3 << 20))
    point = repo_for(east).backup(capture(src))
    # many small reads of one file: threads queue their writes for each other, and wait
    repo = repo_for(east, replace(SMALL, max_read=64 << 10, restore_window=256 << 10))
    monkeypatch.setattr(_restore, "_QUEUE_BYTES", 1)
    real_pwritev = os.pwritev
    calls = []

    def failing_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(_restore.os, "pwritev", failing_pwritev)
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
