"""Restoring a block image: to a file through the :class:`ParallelWriter` (holes stay
holes), in order through a :class:`~regionvault.core.repository._pipeline.Fetcher` to a
:class:`BlockSink`, or, for an image of several disks, to a directory of one raw image file
per disk (through a :class:`DiskFilesSink`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from regionvault.core.errors import IntegrityError, RegionVaultError
from regionvault.core.fsutil import fsync_dir
from regionvault.core.interfaces import BlockSink
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._disks import disk_file_names, off_disks
from regionvault.core.repository._pipeline import Fetcher, Marker
from regionvault.core.repository._restore_fs import TEMP_PREFIX
from regionvault.core.repository._restore_writer import ParallelWriter, Reporter
from regionvault.core.types import Disk, split_by_disk

__all__ = ["BlockRestorer", "DiskFilesSink", "check_sink_disks"]

#: a BlockSink gets writes of about this size
_SINK_WRITE = 4 << 20


def extent_problem(
    record: fmt.RawRecord, end: int, image_size: int, disks: Sequence[Disk]
) -> str | None:
    """Why ``record`` cannot be the next record of a block image's tree (the one before
    ended at ``end``), or None: it must be an extent, after the one before, inside the
    image and on its disks (the holes between disks hold nothing)."""
    if record.tag != fmt.TAG_EXTENT:
        return "block image tree holds a file entry"
    if record.offset < end or record.offset + record.size > image_size:
        return f"extent at {record.offset} is out of place"
    stray = off_disks(disks, record.offset, record.size) if disks else None
    if stray is not None:
        return f"extent at {record.offset} holds data at {stray}, on none of the image's disks"
    return None


def check_sink_disks(what: str, image_disks: Sequence[Disk], sink: BlockSink) -> None:
    """Refuse a sink that does not hold the image's disks where the image has them: a
    write goes by its offset in the image, so each disk must be at its own offset, at
    least as large, and no disk may be missing or added."""
    made = sink.disks
    if len(made) != len(image_disks) or any(
        m.offset != d.offset or m.size < d.size for m, d in zip(made, image_disks, strict=True)
    ):
        raise RegionVaultError(
            f"{what}: the block sink holds {_describe(made)}, not the image's "
            f"{_describe(image_disks)}"
        )


def _describe(disks: Sequence[Disk]) -> str:
    inner = ", ".join(f"{d.name} {d.size} bytes at {d.offset}" for d in disks)
    return f"{len(disks)} disk(s) ({inner})"


class BlockRestorer:
    """Restores a block image into a file (holes stay holes) or a :class:`BlockSink`."""

    def __init__(
        self, *, what: str, image_size: int, report: Reporter, disks: Sequence[Disk] = ()
    ) -> None:
        self.what = what
        self.size = image_size
        self.report = report
        #: the image's disks (none: the checks of where data lies are the image's only)
        self.disks = tuple(disks)

    def _checked(self, records: Iterator[fmt.RawRecord]) -> Iterator[fmt.RawRecord]:
        end = 0
        for record in records:
            problem = extent_problem(record, end, self.size, self.disks)
            if problem is not None:
                raise IntegrityError(self.what, problem)
            end = record.offset + record.size
            yield record

    def to_file(
        self, records: Iterator[fmt.RawRecord], target: Path, writer: ParallelWriter
    ) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        image = writer.target(str(tmp), str(target), self.size)
        try:
            for record in self._checked(records):
                offset = record.offset
                for chunk_id in record.chunk_ids():
                    offset += writer.add(image, chunk_id, offset)
                if offset != record.offset + record.size:
                    raise IntegrityError(
                        self.what, f"extent at {record.offset} holds {offset - record.offset} "
                        f"bytes, its record says {record.size}",
                    )  # fmt: skip
            writer.release(image)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.report.tick(done=True)

    def _chunks(
        self, records: Iterator[fmt.RawRecord], fetcher: Fetcher
    ) -> Iterator[tuple[int, bytes | None]]:
        """``(offset, data)`` of every chunk in order; ``(end, None)`` where an extent ends."""

        def items() -> Iterator[bytes | Marker]:
            for record in self._checked(records):
                yield Marker(record)
                yield from record.chunk_ids()

        pos = end = 0
        started = False
        for item in fetcher.stream(items()):
            if isinstance(item, Marker):
                if started:
                    if pos != end:
                        raise IntegrityError(self.what, f"extent ending at {end} is short")
                    yield pos, None
                record = item.value
                pos, end, started = record.offset, record.offset + record.size, True
            else:
                data = item[1]
                if pos + len(data) > end:
                    raise IntegrityError(self.what, f"extent ending at {end} has too many bytes")
                yield pos, data
                pos += len(data)
                self.report.bytes_done = pos
                self.report.tick()
        if started:
            if pos != end:
                raise IntegrityError(self.what, f"extent ending at {end} is short")
            yield pos, None

    def to_disk_files(
        self, records: Iterator[fmt.RawRecord], target: Path, fetcher: Fetcher, block_size: int
    ) -> None:
        """An image of several disks into the directory ``target`` (new, or empty), one raw
        image file per disk named by :func:`disk_file_names`, holes kept. The files are
        written into a temporary directory beside ``target`` and moved there once all are
        complete and durable: nothing unverified appears under a restored name."""
        sink = DiskFilesSink(target, self.size, block_size, self.disks)
        try:
            self.to_sink(records, sink, fetcher)
            sink.commit()
        except BaseException:
            sink.discard()
            raise

    def to_disk_file(
        self, records: Iterator[fmt.RawRecord], target: Path, fetcher: Fetcher, block_size: int
    ) -> None:
        """An image whose one recorded disk does not span it (shorter than the image, or
        not at offset 0) into the file ``target``: exactly that disk's bytes, holes kept,
        as a raw image to write to a device (the image's bytes outside the disk are only
        padding). Staged beside ``target`` and moved there once complete and durable."""
        (name,) = disk_file_names(self.disks)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self.to_disk_files(records, staging, fetcher, block_size)
            (staging / name).replace(target)
            fsync_dir(target.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(staging)

    def to_sink(self, records: Iterator[fmt.RawRecord], sink: BlockSink, fetcher: Fetcher) -> None:
        """Write the extents in order, in pieces aligned to the sink's block size (partial
        blocks at extent edges are completed with zeros: a sink starts zeroed). The caller,
        who owns the sink, commits it."""
        if sink.size < self.size:
            raise RegionVaultError(
                f"block sink of {sink.size} bytes is smaller than the {self.size}-byte image"
            )
        bs = sink.block_size
        buf = bytearray()
        buf_start = 0

        def flush(final: bool) -> None:
            nonlocal buf, buf_start
            if final:
                pad = -len(buf) % bs
                if buf_start + len(buf) + pad > sink.size:
                    pad = max(0, sink.size - buf_start - len(buf))
                n = len(buf)
                if n:
                    sink.write(buf_start, bytes(buf) + bytes(pad))
                buf, buf_start = bytearray(), buf_start + n + pad
                return
            n = len(buf) - len(buf) % bs
            if n:
                sink.write(buf_start, bytes(buf[:n]))
                del buf[:n]
                buf_start += n

        for offset, data in self._chunks(records, fetcher):
            if data is None:
                continue
            if offset != buf_start + len(buf):
                aligned = offset - offset % bs
                if buf and aligned <= buf_start + len(buf):
                    buf += bytes(offset - (buf_start + len(buf)))  # same block: zero gap
                else:
                    flush(final=True)
                    buf_start = aligned
                    buf = bytearray(offset - aligned)
            buf += data
            if len(buf) >= _SINK_WRITE:
                flush(final=False)
        flush(final=True)
        self.report.tick(done=True)


class DiskFilesSink(BlockSink):
    """One sparse raw image file per disk, in a directory: what a restore of an image of
    several disks into a path gives (and a launch-free stand-in for a cloud's disks)."""

    def __init__(self, target: Path, size: int, block_size: int, disks: Sequence[Disk]) -> None:
        super().__init__(size, block_size, disks)
        self.target = target
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise RegionVaultError(
                f"target {target} is not a new or empty directory: an image of "
                f"{len(self.disks)} disks restores there as one file per disk"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        self.staging.mkdir()
        self.names = disk_file_names(self.disks)
        self._fds: list[int] = []
        try:
            for disk, name in zip(self.disks, self.names, strict=True):
                fd = os.open(self.staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self._fds.append(fd)
                os.ftruncate(fd, disk.size)
        except BaseException:
            self.discard()
            raise
        self._zero = bytes(block_size)

    def write(self, offset: int, data: bytes) -> None:
        # a write past the last disk or between disks can only be padding (zeros): the
        # restorer refused any extent that holds data there, and split_by_disk checks again
        for index, at, piece in split_by_disk(self.disks, offset, data):
            self._write_sparse(self._fds[index], at, piece)

    def _write_sparse(self, fd: int, at: int, data: memoryview) -> None:
        """Write ``data`` at ``at`` (block-aligned), leaving zero blocks as holes."""
        bs, n = self.block_size, len(data)

        def zero(pos: int) -> bool:
            return data[pos : pos + bs] == self._zero[: min(bs, n - pos)]

        pos = 0
        while pos < n:
            while pos < n and zero(pos):
                pos += bs
            start = pos
            while pos < n and not zero(pos):
                pos += bs
            pos = min(pos, n)
            while start < pos:
                start += os.pwrite(fd, data[start:pos], at + start)

    def commit(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
        self._close()
        fsync_dir(self.staging)
        if self.target.is_dir():
            self.target.rmdir()  # empty (checked when made): the staged one takes its place
        self.staging.rename(self.target)
        fsync_dir(self.target.parent)

    def _close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.staging)

    def files(self) -> list[Path]:
        return [self.target / name for name in self.names]
