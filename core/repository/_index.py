"""The in-memory chunk index: chunk id -> where its blob lies (pack, offset, lengths)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _format as fmt

__all__ = ["ChunkIdSet", "ChunkIndex", "Location", "PackInfo"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Location:
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


class ChunkIndex:
    """Chunk id -> location, for every pack the live index objects list.

    A location is kept as one int (pack number, type, flags, offset, stored and raw length),
    about 150 bytes per chunk with the dict, so a few million chunks fit comfortably.
    When the same chunk lies in several packs the first one listed wins.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, int] = {}
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
        return IntegrityError(what, f"chunk {chunk_id.hex()[:16]} is not in any index (data lost)")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._entries

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
        number = len(self._pack_ids)
        self._pack_ids.append(pack.pack_id)
        self.packs[pack.pack_id] = PackInfo(
            pack.pack_id, pack.size, pack.header, {index_id} if index_id else set()
        )
        blobs = pack.blobs(name) if isinstance(pack, fmt.RawIndexPack) else pack.blobs
        if keep_blobs:
            blobs = list(blobs)
            if self.pack_blobs is None:
                self.pack_blobs = {}
            self.pack_blobs[pack.pack_id] = blobs
        entries = self._entries
        base = number << 112
        for blob in blobs:
            if blob.chunk_id not in entries:
                entries[blob.chunk_id] = (
                    base
                    | (blob.blob_type << 104)
                    | (blob.flags << 96)
                    | (blob.offset << 64)
                    | (blob.length << 32)
                    | blob.raw_length
                )

    def get(self, chunk_id: bytes) -> Location | None:
        packed = self._entries.get(chunk_id)
        if packed is None:
            return None
        return Location(
            self._pack_ids[packed >> 112],
            (packed >> 104) & 0xFF,
            (packed >> 96) & 0xFF,
            (packed >> 64) & _M32,
            (packed >> 32) & _M32,
            packed & _M32,
        )

    def chunk_ids(self) -> Iterator[bytes]:
        return iter(self._entries)


class ChunkIdSet:
    """An exact set of chunk ids (32 bytes, uniformly random) in about 34 bytes each, where
    a ``set`` of ``bytes`` takes about 110: the ids are spread over a fixed number of
    buckets by their leading bits and kept back to back in one bytearray per bucket. A
    lookup scans one bucket (a few KiB even at a million ids). Not thread-safe."""

    _BITS = 12

    def __init__(self) -> None:
        self._buckets = [bytearray() for _ in range(1 << self._BITS)]
        self._len = 0

    def _bucket(self, chunk_id: bytes) -> bytearray:
        return self._buckets[int.from_bytes(chunk_id[:4], "big") >> (32 - self._BITS)]

    def __contains__(self, chunk_id: object) -> bool:
        if not isinstance(chunk_id, bytes) or len(chunk_id) != fmt.CHUNK_ID_SIZE:
            return False
        bucket = self._bucket(chunk_id)
        at = bucket.find(chunk_id)
        while at > 0 and at % fmt.CHUNK_ID_SIZE:  # a match across two ids: look further
            at = bucket.find(chunk_id, at + 1)
        return at >= 0

    def add(self, chunk_id: bytes) -> bool:
        """Add ``chunk_id``; False if it was there already."""
        if chunk_id in self:
            return False
        self._bucket(chunk_id).extend(chunk_id)
        self._len += 1
        return True

    def __len__(self) -> int:
        return self._len
