"""Restoring a block image: to a file through the :class:`ParallelWriter` (holes stay
holes), or in order through a :class:`~regionvault.core.repository._pipeline.Fetcher` to a
:class:`BlockSink`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

from regionvault.core.errors import IntegrityError, RegionVaultError
from regionvault.core.interfaces import BlockSink
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._pipeline import Fetcher, Marker
from regionvault.core.repository._restore_fs import TEMP_PREFIX
from regionvault.core.repository._restore_writer import ParallelWriter, Reporter

__all__ = ["BlockRestorer"]

#: a BlockSink gets writes of about this size
_SINK_WRITE = 4 << 20


class BlockRestorer:
    """Restores a block image into a file (holes stay holes) or a :class:`BlockSink`."""

    def __init__(self, *, what: str, image_size: int, report: Reporter) -> None:
        self.what = what
        self.size = image_size
        self.report = report

    def _checked(self, records: Iterator[fmt.RawRecord]) -> Iterator[fmt.RawRecord]:
        end = 0
        for record in records:
            if record.tag != fmt.TAG_EXTENT:
                raise IntegrityError(self.what, "block image tree holds a file entry")
            if record.offset < end or record.offset + record.size > self.size:
                raise IntegrityError(self.what, f"extent at {record.offset} is out of place")
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
