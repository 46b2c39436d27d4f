"""The in-memory chunk index: chunk id -> where its blob lies (pack, offset, lengths)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _format as fmt

__all__ = ["ChunkIdSet", "ChunkIndex", "Location", "PackInfo"]

_ID = fmt.CHUNK_ID_SIZE
#: a location packed beside its chunk id: pack number, blob type, flags, offset, stored and
#: raw length (offsets and lengths are 32-bit in the format too)
_LOC = struct.Struct(">IBBIII")


class Location(NamedTuple):
    """Where a chunk lies: a tuple, made once per chunk a restore, copy or verify looks up
    (three times cheaper to make than a frozen dataclass)."""

    pack_id: str
    blob_type: int
    flags: int
    offset: int
    length: int
    raw_length: int


@dataclass(slots=True)
class PackInfo:
    pack_id: str
    size: int
    header: bytes
    #: the index objects that list this pack
    index_ids: set[str]


class _IdTable:
    """Chunk ids (32 bytes, uniformly random: keyed BLAKE3), each with ``extra`` bytes of
    its own, kept back to back in one bytearray per bucket, the bucket chosen by the id's
    leading bits. The buckets multiply as ids are added, so a lookup scans a few hundred
    bytes (in C) however many ids there are, and an id costs its own bytes plus a few: no
    Python object per id. Not thread-safe while ids are added; lookups alone may run on any
    number of threads."""

    #: the buckets grow fourfold once they hold this many records on average
    _LOAD = 24
    #: a bucket is chosen by the id's first 3 bytes
    _MAX_BITS = 24

    def __init__(self, extra: int) -> None:
        self._stride = _ID + extra
        self._bits = 6
        self._shift = self._MAX_BITS - self._bits
        self._buckets = [bytearray() for _ in range(1 << self._bits)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _locate(self, chunk_id: bytes) -> tuple[bytearray, int]:
        """``chunk_id``'s bucket, and the offset of its record there or -1."""
        bucket = self._buckets[int.from_bytes(chunk_id[:3], "big") >> self._shift]
        at = bucket.find(chunk_id)
        while at % self._stride and at >= 0:  # a match across two records: look further
            at = bucket.find(chunk_id, at + 1)
        return bucket, at

    def __contains__(self, chunk_id: object) -> bool:
        if not isinstance(chunk_id, bytes) or len(chunk_id) != _ID:
            return False
        return self._locate(chunk_id)[1] >= 0

    def _insert(self, chunk_id: bytes, extra: bytes) -> bool:
        """Add ``chunk_id`` with its ``extra`` bytes; False (nothing changed) if it is there
        already."""
        if len(chunk_id) != _ID:
            raise ValueError(f"a chunk id is {_ID} bytes, not {len(chunk_id)}")
        bucket, at = self._locate(chunk_id)
        if at >= 0:
            return False
        bucket += chunk_id
        bucket += extra
        self._len += 1
        if self._len > self._LOAD << self._bits and self._bits < self._MAX_BITS:
            self._grow()
        return True

    def reserve(self, count: int) -> None:
        """Size an empty table for about ``count`` ids at once, instead of growing (and
        moving every id) several times on the way: a fifth off building the index."""
        if self._len:
            return
        bits = self._bits
        while count > self._LOAD << bits and bits < self._MAX_BITS:
            bits = min(bits + 2, self._MAX_BITS)
        if bits != self._bits:
            self._bits, self._shift = bits, self._MAX_BITS - bits
            self._buckets = [bytearray() for _ in range(1 << bits)]

    def _grow(self) -> None:
        """Four times the buckets: each splits in four by the next two bits of its ids."""
        bits = min(self._bits + 2, self._MAX_BITS)
        shift = self._MAX_BITS - bits
        mask = (1 << (bits - self._bits)) - 1
        stride = self._stride
        buckets: list[bytearray] = []
        for old in self._buckets:
            parts = [bytearray() for _ in range(mask + 1)]
            for at in range(0, len(old), stride):
                parts[int.from_bytes(old[at : at + 3], "big") >> shift & mask] += old[
                    at : at + stride
                ]
            buckets += parts
        self._buckets, self._bits, self._shift = buckets, bits, shift

    def _ids(self) -> Iterator[bytes]:
        stride = self._stride
        for bucket in self._buckets:
            for at in range(0, len(bucket), stride):
                yield bytes(bucket[at : at + _ID])


def _plausible(pack: fmt.RawIndexPack) -> bool:
    """True when every blob entry of ``pack`` passes the checks of ``RawIndexPack.blobs``
    (``_format._checked_entry``), tested on the plain tuples: building a ``BlobEntry`` per
    blob would cost more than the rest of loading the index. On False the caller takes the
    slow path, which raises the error naming the entry (or accepts what this refused)."""
    zstd, known, tag = fmt.FLAG_ZSTD, fmt.KNOWN_FLAGS, fmt.GCM_TAG
    types = (fmt.BlobType.DATA, fmt.BlobType.TREE)
    size, largest = pack.size, fmt.MAX_BLOB_SIZE
    return all(
        blob_type in types
        and not flags & ~known
        and tag <= length
        and raw_length <= largest
        and (flags & zstd or length == raw_length + tag)
        and offset + length <= size
        for _, blob_type, flags, offset, length, raw_length in fmt.BLOB_ENTRY.iter_unpack(
            pack.entries
        )
    )


class ChunkIndex(_IdTable):
    """Chunk id -> location, for every pack the live index objects list.

    An entry takes about 60 bytes (the 32-byte id and its location packed in 18, see
    :class:`_IdTable`), so millions of chunks fit comfortably: a dict of the same entries
    took about 150. When the same chunk lies in several packs the first one listed wins.
    Built by :meth:`add_pack` on one thread; then read from any number.
    """

    def __init__(self) -> None:
        super().__init__(_LOC.size)
        self._pack_ids: list[str] = []
        self.packs: dict[str, PackInfo] = {}
        #: per pack, every blob (including duplicates), when loaded for maintenance
        self.pack_blobs: dict[str, list[fmt.BlobEntry]] | None = None
        #: index objects that could not be read (a tolerant load left them out)
        self.damaged: list[tuple[str, str]] = []

    def missing(self, chunk_id: bytes, what: str) -> IntegrityError:
        """The error for a chunk ``what`` needs that no index lists: it names a damaged
        index object when there is one (the chunk is most likely listed there)."""
        if self.damaged:
            name, reason = self.damaged[0]
            return IntegrityError(
                name, f"{reason} (and chunk {chunk_id.hex()[:16]} of {what} is in no other index)"
            )
        return IntegrityError(
            what,
            f"chunk {chunk_id.hex()[:16]} is in no index (if an index object was lost, "
            "`regionvault verify --repair` rebuilds it from the packs)",
        )

    def add_pack(
        self,
        pack: fmt.IndexPack | fmt.RawIndexPack,
        index_id: str | None,
        *,
        keep_blobs: bool,
        name: str = "index",
    ) -> None:
        info = self.packs.get(pack.pack_id)
        if info is not None:
            if index_id is not None:
                info.index_ids.add(index_id)
            return
        blobs: Iterable[tuple[bytes, int, int, int, int, int]]
        if isinstance(pack, fmt.RawIndexPack) and not keep_blobs and _plausible(pack):
            blobs = fmt.BLOB_ENTRY.iter_unpack(pack.entries)  # checked: no objects needed
        else:
            entries = pack.blobs(name) if isinstance(pack, fmt.RawIndexPack) else pack.blobs
            if keep_blobs:
                entries = list(entries)
                if self.pack_blobs is None:
                    self.pack_blobs = {}
                self.pack_blobs[pack.pack_id] = entries
            blobs = (
                (b.chunk_id, b.blob_type, b.flags, b.offset, b.length, b.raw_length)
                for b in entries
            )
        number = len(self._pack_ids)
        self._pack_ids.append(pack.pack_id)
        self.packs[pack.pack_id] = PackInfo(
            pack.pack_id, pack.size, pack.header, {index_id} if index_id else set()
        )
        # _insert, inlined: this loop runs once per chunk in the repository
        pack_loc = _LOC.pack
        buckets, shift, stride = self._buckets, self._shift, self._stride
        limit = self._LOAD << self._bits
        for chunk_id, blob_type, flags, offset, length, raw_length in blobs:
            bucket = buckets[int.from_bytes(chunk_id[:3], "big") >> shift]
            at = bucket.find(chunk_id)
            while at % stride and at >= 0:
                at = bucket.find(chunk_id, at + 1)
            if at >= 0:
                continue  # listed before: the first location wins
            bucket += chunk_id
            bucket += pack_loc(number, blob_type, flags, offset, length, raw_length)
            self._len += 1
            if self._len > limit and self._bits < self._MAX_BITS:
                self._grow()
                buckets, shift = self._buckets, self._shift
                limit = self._LOAD << self._bits

    def get(self, chunk_id: bytes) -> Location | None:
        if len(chunk_id) != _ID:
            return None
        bucket, at = self._locate(chunk_id)
        if at < 0:
            return None
        number, blob_type, flags, offset, length, raw_length = _LOC.unpack_from(bucket, at + _ID)
        return Location(self._pack_ids[number], blob_type, flags, offset, length, raw_length)

    def chunk_ids(self) -> Iterator[bytes]:
        return self._ids()


class ChunkIdSet(_IdTable):
    """An exact set of chunk ids in about 40 bytes each, where a ``set`` of ``bytes`` takes
    about 110 (see :class:`_IdTable`). Not thread-safe."""

    def __init__(self) -> None:
        super().__init__(0)

    def add(self, chunk_id: bytes) -> bool:
        """Add ``chunk_id``; False if it was there already."""
        return self._insert(chunk_id, b"")

    def __iter__(self) -> Iterator[bytes]:
        return self._ids()
