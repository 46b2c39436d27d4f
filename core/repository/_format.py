"""The repository's on-vault format, version 3: names, binary layouts, AAD (docs/format.md).

Everything here is pure encoding and decoding: no I/O, no threads. All integers are
big-endian. Every decode that meets something it cannot trust raises
:class:`~regionvault.core.errors.IntegrityError` naming the object.

Why this module is longer than the others: it is the format itself, one section per section
of docs/format.md (names, sealed objects, packs, index objects, tree records), so that a
format change is reviewed in one place against one document, and the golden vaults and the
known-answer vectors check one module. What only uses the format (the store, the tree
writer, manifests, the copy protocol's payloads) lives elsewhere.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from regionvault.core.errors import IntegrityError

__all__ = [
    "BLOB_ENTRY",
    "CHUNK_ID_SIZE",
    "CONFIG_NAME",
    "ENTRY2_FLAG",
    "ENVELOPE_FLAG_ZSTD",
    "ENVELOPE_HEADER",
    "EVENT_PREFIX",
    "FLAG_ZSTD",
    "FORMAT_VERSION",
    "FORMAT_VERSION_CONFIG",
    "FORMAT_VERSION_DISKS",
    "FORMAT_VERSION_WITHOUT_DISKS",
    "GCM_TAG",
    "ID_SIZE",
    "INDEX_PACK",
    "INDEX_PREFIX",
    "KEYRING_PREFIX",
    "KEY_SOURCE_MASTER",
    "KEY_SOURCE_WRAPPED",
    "LAYOUT_VERSION",
    "LOCK_PREFIX",
    "MAX_BLOB_SIZE",
    "MAX_ENTRY_HEAD",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_XATTR_BYTES",
    "MAX_XATTR_NAME",
    "MAX_XATTR_VALUE",
    "NO_ID",
    "OBJECT_MAGIC",
    "PACK_END_MAGIC",
    "PACK_FOOTER",
    "PACK_HEADER",
    "PACK_MAGIC",
    "PACK_PREFIX",
    "POINT_PREFIX",
    "TAG_BLOCKDEV",
    "TAG_CHARDEV",
    "TAG_DIR",
    "TAG_EXTENT",
    "TAG_FIFO",
    "TAG_FILE",
    "TAG_SOCKET",
    "TAG_SYMLINK",
    "BlobEntry",
    "BlobType",
    "EnvelopeHeader",
    "IndexPack",
    "ObjectKind",
    "PackHeader",
    "RawIndexPack",
    "RawRecord",
    "blob_aad",
    "check_version",
    "decode_blob_table",
    "decode_index",
    "decode_records",
    "encode_blob_table",
    "encode_entry",
    "encode_extent",
    "encode_index",
    "encode_record",
    "envelope_aad",
    "index_name",
    "keyring_name",
    "lock_name",
    "new_id",
    "nonce_at",
    "pack_aad_prefix",
    "pack_name",
    "parse_hex_id",
    "parse_index",
    "parse_keyring_name",
    "point_name",
    "record_problem",
    "table_aad",
]

#: the newest format this code writes and reads; readers refuse anything newer. Version 2
#: changed only the tree records (a point's manifest says which version wrote it); sealed
#: objects and packs keep their version 1 layout and say so (:data:`LAYOUT_VERSION`).
#: Version 3 added the disks of a block image to the manifest: only a manifest (and a copy
#: offer) that records disks says 3; everything else is still written as version 2
#: Version 4 added key rotation: the ``keyring`` objects and a config that is rewritten under
#: a new master key; a repository created by version 4 code says 4 in its config
FORMAT_VERSION = 4
#: what the config of a repository created (or rotated) by this code says
FORMAT_VERSION_CONFIG = 4
#: the version of a manifest or copy offer that records the disks of a block image
FORMAT_VERSION_DISKS = 3
#: what the config, and manifests and offers that record no disks, say: their content is
#: what version 2 wrote, so a reader of version 2 still reads them
FORMAT_VERSION_WITHOUT_DISKS = 2
#: the version byte of sealed objects and packs: their layout is the same in formats 1 to 3,
#: so a version 1 reader still opens them, and refuses a version 2 point at its manifest
LAYOUT_VERSION = 1
CHUNK_ID_SIZE = 32
ID_SIZE = 16
#: largest plaintext blob (chunk) a pack may hold; chunker maxima stay far below it
MAX_BLOB_SIZE = 16 << 20

CONFIG_NAME = "config"
PACK_PREFIX = "packs/"
INDEX_PREFIX = "index/"
POINT_PREFIX = "points/"
LOCK_PREFIX = "locks/"
#: a copy source's records of points offered to, and received by, destinations
COPIES_PREFIX = "copies/"
#: key rotation's re-wrapped run data keys, one object per generation (section 2)
KEYRING_PREFIX = "keyring/"

#: the region's event log: one sealed object per event, ``events/<seq>``, never rewritten
#: (section 17; the names are _events.event_seq_name's)
EVENT_PREFIX = "events/"

_HEX_ID = re.compile(r"^[0-9a-f]{32}$")


class ObjectKind(enum.IntEnum):
    """The kind byte of a sealed (non-pack) object; also bound into its AAD by name."""

    CONFIG = 1
    INDEX = 2
    MANIFEST = 3
    LOCK = 4
    #: a copy destination's table from a source region's chunk ids to its own
    LINKS = 5
    #: a copy source's record of a point offered to, or received by, a destination
    COPIES = 6
    #: one entry of the region's append-only event log (who did what, when, with what result)
    EVENTS = 7
    #: run data keys re-wrapped under a newer master key
    KEYRING = 8


class BlobType(enum.IntEnum):
    DATA = 0
    TREE = 1


#: blob flag: the stored payload is a zstd frame of the chunk
FLAG_ZSTD = 0x01
#: every blob flag this version knows (a blob with another is refused)
KNOWN_FLAGS = FLAG_ZSTD


def new_id() -> str:
    return secrets.token_hex(ID_SIZE)


def parse_hex_id(text: str, what: str) -> str:
    if not isinstance(text, str) or not _HEX_ID.match(text):
        raise ValueError(f"{what} {text!r} is not 32 lowercase hex digits")
    return text


def pack_name(pack_id: str) -> str:
    return f"{PACK_PREFIX}{pack_id[:2]}/{pack_id}"


def index_name(index_id: str) -> str:
    return f"{INDEX_PREFIX}{index_id}"


def point_name(point_id: str) -> str:
    return f"{POINT_PREFIX}{point_id}"


def lock_name(lock_id: str) -> str:
    return f"{LOCK_PREFIX}{lock_id}"


def keyring_name(generation: int) -> str:
    return f"{KEYRING_PREFIX}{generation:08x}"


def parse_keyring_name(name: str) -> int | None:
    """The generation of a ``keyring/<8 hex>`` name, or None for any other name."""
    tail = name[len(KEYRING_PREFIX) :]
    if not name.startswith(KEYRING_PREFIX) or not re.fullmatch(r"[0-9a-f]{8}", tail):
        return None
    return int(tail, 16)


def check_version(name: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise IntegrityError(
            name,
            f"format version {version} is newer than this regionvault reads "
            f"(up to {FORMAT_VERSION}); upgrade regionvault to read it",
        )
    if version < 1:
        raise IntegrityError(name, f"format version {version} is not valid")


# --------------------------------------------------------------------------- sealed objects

OBJECT_MAGIC = b"RVLT"
#: magic, version, kind, key source, flags, salt, commitment, wrapped-key length
ENVELOPE_HEADER = struct.Struct(">4sBBBB32s32sH")

KEY_SOURCE_MASTER = 0
KEY_SOURCE_WRAPPED = 1
ENVELOPE_FLAG_ZSTD = 0x01


@dataclass(frozen=True)
class EnvelopeHeader:
    version: int
    kind: ObjectKind
    key_source: int
    flags: int
    salt: bytes
    commitment: bytes
    wrapped_key: bytes
    #: the header's exact bytes (bound into the AAD)
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)

    @classmethod
    def build(
        cls,
        kind: ObjectKind,
        *,
        key_source: int,
        flags: int,
        salt: bytes,
        commitment: bytes,
        wrapped_key: bytes = b"",
    ) -> EnvelopeHeader:
        raw = (
            ENVELOPE_HEADER.pack(
                OBJECT_MAGIC,
                LAYOUT_VERSION,
                int(kind),
                key_source,
                flags,
                salt,
                commitment,
                len(wrapped_key),
            )
            + wrapped_key
        )
        return cls(LAYOUT_VERSION, kind, key_source, flags, salt, commitment, wrapped_key, raw)

    @classmethod
    def parse(cls, name: str, data: bytes, expect: ObjectKind) -> EnvelopeHeader:
        if len(data) < ENVELOPE_HEADER.size:
            raise IntegrityError(name, f"object is {len(data)} bytes, too short to be sealed")
        magic, version, kind, key_source, flags, salt, commitment, wlen = (
            ENVELOPE_HEADER.unpack_from(data)
        )
        if magic != OBJECT_MAGIC:
            raise IntegrityError(name, "not a regionvault object (bad magic)")
        check_version(name, version)
        if kind != expect:
            raise IntegrityError(name, f"object kind {kind} where {expect.name.lower()} expected")
        if key_source not in (KEY_SOURCE_MASTER, KEY_SOURCE_WRAPPED):
            raise IntegrityError(name, f"unknown key source {key_source}")
        if flags & ~ENVELOPE_FLAG_ZSTD:
            raise IntegrityError(name, f"unknown flags {flags:#x}")
        end = ENVELOPE_HEADER.size + wlen
        if len(data) < end + 16:
            raise IntegrityError(name, "object is truncated")
        wrapped = bytes(data[ENVELOPE_HEADER.size : end])
        return cls(
            version, ObjectKind(kind), key_source, flags, salt, commitment, wrapped,
            bytes(data[:end]),
        )  # fmt: skip


def envelope_aad(vault_id: str, kind: ObjectKind, name: str, header: bytes) -> bytes:
    return b"".join(
        (
            b"regionvault/v1\x00",
            _lp(vault_id.encode()),
            _lp(kind.name.lower().encode()),
            _lp(name.encode()),
            header,
        )
    )


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


# --------------------------------------------------------------------------- packs

PACK_MAGIC = b"RVPK"
PACK_END_MAGIC = b"RVPE"
#: magic, version, reserved (3 bytes), run id, salt, commitment, wrapped-key length
PACK_HEADER = struct.Struct(">4sB3s16s32s32sH")
#: trailer (blob table) ciphertext length, end magic
PACK_FOOTER = struct.Struct(">I4s")
#: chunk id, blob type, flags, offset, stored length (ciphertext incl. tag), raw length
BLOB_ENTRY = struct.Struct(">32sBBIII")
GCM_TAG = 16


@dataclass(frozen=True)
class PackHeader:
    version: int
    run_id: bytes
    salt: bytes
    commitment: bytes
    wrapped_key: bytes
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)

    @classmethod
    def build(
        cls, *, run_id: bytes, salt: bytes, commitment: bytes, wrapped_key: bytes
    ) -> PackHeader:
        raw = (
            PACK_HEADER.pack(
                PACK_MAGIC, LAYOUT_VERSION, b"\0\0\0", run_id, salt, commitment, len(wrapped_key)
            )
            + wrapped_key
        )
        return cls(LAYOUT_VERSION, run_id, salt, commitment, wrapped_key, raw)

    @classmethod
    def parse(cls, name: str, data: bytes) -> PackHeader:
        """Parse the header at the start of ``data`` (which may hold more than the header)."""
        if len(data) < PACK_HEADER.size:
            raise IntegrityError(name, "pack is too short to hold a header")
        magic, version, reserved, run_id, salt, commitment, wlen = PACK_HEADER.unpack_from(data)
        if magic != PACK_MAGIC:
            raise IntegrityError(name, "not a regionvault pack (bad magic)")
        check_version(name, version)
        if reserved != b"\0\0\0":
            raise IntegrityError(name, "reserved header bytes are not zero")
        end = PACK_HEADER.size + wlen
        if len(data) < end:
            raise IntegrityError(name, "pack header is truncated")
        return cls(
            version, run_id, salt, commitment, bytes(data[PACK_HEADER.size : end]),
            bytes(data[:end]),
        )  # fmt: skip


def pack_aad_prefix(vault_id: str, name: str, header: bytes) -> bytes:
    """What every blob's and the table's AAD starts with in the pack ``name``."""
    return b"".join(
        (b"regionvault/v1\x00", _lp(vault_id.encode()), _lp(b"pack"), _lp(name.encode()), header)
    )


def blob_aad(prefix: bytes, chunk_id: bytes, blob_type: int, flags: int, raw_length: int) -> bytes:
    return prefix + b"B" + chunk_id + bytes((blob_type, flags)) + raw_length.to_bytes(4, "big")


def table_aad(prefix: bytes) -> bytes:
    return prefix + b"T"


def nonce_at(offset: int) -> bytes:
    """Every encrypted item in a pack uses its own byte offset as its nonce (unique per key)."""
    return offset.to_bytes(12, "big")


@dataclass(frozen=True, slots=True)
class BlobEntry:
    chunk_id: bytes
    blob_type: int
    flags: int
    offset: int
    length: int
    raw_length: int

    def encode(self) -> bytes:
        return BLOB_ENTRY.pack(
            self.chunk_id, self.blob_type, self.flags, self.offset, self.length, self.raw_length
        )


def encode_blob_table(entries: list[BlobEntry]) -> bytes:
    return len(entries).to_bytes(4, "big") + b"".join(e.encode() for e in entries)


def decode_blob_table(name: str, data: bytes, *, pack_size: int | None = None) -> list[BlobEntry]:
    if len(data) < 4:
        raise IntegrityError(name, "blob table is truncated")
    count = int.from_bytes(data[:4], "big")
    if len(data) != 4 + count * BLOB_ENTRY.size:
        raise IntegrityError(name, "blob table length does not match its count")
    return [
        _checked_entry(name, BlobEntry(*fields), pack_size)
        for fields in BLOB_ENTRY.iter_unpack(memoryview(data)[4:])
    ]


def _checked_entry(name: str, entry: BlobEntry, pack_size: int | None) -> BlobEntry:
    if entry.blob_type not in (BlobType.DATA, BlobType.TREE):
        raise IntegrityError(name, f"blob of unknown type {entry.blob_type}")
    if entry.flags & ~KNOWN_FLAGS:
        raise IntegrityError(name, f"blob with unknown flags {entry.flags:#x}")
    if entry.length < GCM_TAG or entry.raw_length > MAX_BLOB_SIZE:
        raise IntegrityError(name, "blob with impossible length")
    if not entry.flags & FLAG_ZSTD and entry.length != entry.raw_length + GCM_TAG:
        raise IntegrityError(name, "uncompressed blob whose lengths disagree")
    if pack_size is not None and entry.offset + entry.length > pack_size:
        raise IntegrityError(name, "blob reaches past the end of its pack")
    return entry


# --------------------------------------------------------------------------- index objects

#: pack id, pack size, blob count, pack header length (the header's bytes follow)
INDEX_PACK = struct.Struct(">16sQIH")


@dataclass(frozen=True)
class IndexPack:
    pack_id: str
    size: int
    #: the pack's plaintext header, copied here so a reader needs no extra request for it
    header: bytes
    blobs: list[BlobEntry]


def encode_index(packs: list[IndexPack], supersedes: list[str]) -> bytes:
    parts = [len(supersedes).to_bytes(4, "big")]
    parts.extend(bytes.fromhex(i) for i in supersedes)
    parts.append(len(packs).to_bytes(4, "big"))
    for pack in packs:
        parts.append(
            INDEX_PACK.pack(
                bytes.fromhex(pack.pack_id), pack.size, len(pack.blobs), len(pack.header)
            )
        )
        parts.append(pack.header)
        parts.extend(e.encode() for e in pack.blobs)
    return b"".join(parts)


@dataclass(frozen=True)
class RawIndexPack:
    """An index entry for one pack with its blob entries still encoded (46 bytes each):
    the compact form the in-memory index is built from."""

    pack_id: str
    size: int
    header: bytes
    entries: bytes

    @property
    def count(self) -> int:
        """How many blob entries it holds."""
        return len(self.entries) // BLOB_ENTRY.size

    def blobs(self, name: str) -> Iterator[BlobEntry]:
        for fields in BLOB_ENTRY.iter_unpack(self.entries):
            yield _checked_entry(f"{name} (pack {self.pack_id})", BlobEntry(*fields), self.size)


def parse_index(name: str, data: bytes) -> tuple[list[RawIndexPack], list[str]]:
    """``(packs, superseded index ids)`` of an index body, blob entries left encoded."""
    view = memoryview(data)
    try:
        pos = 0
        n_sup = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        if pos + n_sup * ID_SIZE > len(view):
            raise IndexError
        supersedes = [
            bytes(view[pos + i * ID_SIZE : pos + (i + 1) * ID_SIZE]).hex() for i in range(n_sup)
        ]
        pos += n_sup * ID_SIZE
        n_packs = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        packs = []
        for _ in range(n_packs):
            pid, size, count, hlen = INDEX_PACK.unpack_from(view, pos)
            pos += INDEX_PACK.size
            header = bytes(view[pos : pos + hlen])
            pos += hlen
            end = pos + count * BLOB_ENTRY.size
            if len(header) != hlen or end > len(view):
                raise IndexError
            packs.append(RawIndexPack(pid.hex(), size, header, bytes(view[pos:end])))
            pos = end
    except (IndexError, struct.error):
        raise IntegrityError(name, "index is truncated or malformed") from None
    if pos != len(view):
        raise IntegrityError(name, "index has trailing bytes")
    return packs, supersedes


def decode_index(name: str, data: bytes) -> tuple[list[IndexPack], list[str]]:
    view = memoryview(data)
    try:
        pos = 0
        n_sup = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        supersedes = []
        for _ in range(n_sup):
            raw = bytes(view[pos : pos + ID_SIZE])
            if len(raw) != ID_SIZE:
                raise IndexError
            supersedes.append(raw.hex())
            pos += ID_SIZE
        n_packs = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        packs = []
        for _ in range(n_packs):
            pid, size, count, hlen = INDEX_PACK.unpack_from(view, pos)
            pos += INDEX_PACK.size
            header = bytes(view[pos : pos + hlen])
            if len(header) != hlen:
                raise IndexError
            pos += hlen
            end = pos + count * BLOB_ENTRY.size
            if end > len(view):
                raise IndexError
            pack = pid.hex()
            blobs = [
                _checked_entry(f"{name} (pack {pack})", BlobEntry(*fields), size)
                for fields in BLOB_ENTRY.iter_unpack(view[pos:end])
            ]
            pos = end
            packs.append(IndexPack(pack, size, header, blobs))
    except (IndexError, struct.error):
        raise IntegrityError(name, "index is truncated or malformed") from None
    if pos != len(view):
        raise IntegrityError(name, "index has trailing bytes")
    return packs, supersedes


# --------------------------------------------------------------------------- tree records

TAG_FILE = 1
TAG_DIR = 2
TAG_SYMLINK = 3
TAG_EXTENT = 4
#: entry kinds of format version 2
TAG_FIFO = 5
TAG_SOCKET = 6
TAG_CHARDEV = 7
TAG_BLOCKDEV = 8
_ENTRY_TAGS = frozenset((TAG_FILE, TAG_DIR, TAG_SYMLINK, TAG_FIFO, TAG_SOCKET, TAG_CHARDEV,
                         TAG_BLOCKDEV))  # fmt: skip
#: a version 2 entry record's first byte is this flag or'ed with its kind's tag
ENTRY2_FLAG = 0x80
#: version 1 entry record: tag, mode, mtime_ns, size, path length
ENTRY_HEAD = struct.Struct(">BIqQH")
#: version 2 entry record: first byte, then the length of its head (everything up to the
#: chunk count)
ENTRY2_START = struct.Struct(">BI")
#: the fixed start of a version 2 head: mode, mtime_ns, size, uid, gid, rdev
ENTRY2_FIXED = struct.Struct(">IqQIIQ")
#: tag, offset, length, chunk count
EXTENT_HEAD = struct.Struct(">BQQI")
U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
#: a uid or gid that was not recorded (``(uid_t) -1`` is no valid owner on POSIX either)
NO_ID = 0xFFFFFFFF
#: bounds of a version 2 record's fields: what Linux allows, or far beyond what any
#: real tree holds; a record beyond them is damaged, and is refused before it is buffered
MAX_PATH_BYTES = 1 << 20
MAX_NAME_BYTES = 1024
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 1 << 16
MAX_XATTR_BYTES = 1 << 20
MAX_CHANGE_BYTES = 32
MAX_ENTRY_HEAD = (
    ENTRY2_FIXED.size
    + 3 * (4 + MAX_PATH_BYTES)
    + 2 * (2 + MAX_NAME_BYTES)
    + (4 + MAX_XATTR_BYTES)
    + (1 + MAX_CHANGE_BYTES)
)
_MODE_BITS = 0o7777


def encode_entry(
    tag: int, mode: int, mtime_ns: int, size: int, path: bytes, target: bytes, ids: bytes
) -> bytes:
    """A version 1 entry record. Nothing writes these any more (:func:`encode_record` writes
    version 2); kept for tests and tools that build version 1 trees."""
    return b"".join(
        (
            ENTRY_HEAD.pack(tag, mode, mtime_ns, size, len(path)),
            path,
            U16.pack(len(target)),
            target,
            U32.pack(len(ids) // CHUNK_ID_SIZE),
            ids,
        )
    )


def encode_extent(offset: int, length: int, ids: bytes) -> bytes:
    return EXTENT_HEAD.pack(TAG_EXTENT, offset, length, len(ids) // CHUNK_ID_SIZE) + ids


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One decoded tree record; ``ids`` is the concatenation of 32-byte chunk ids.

    The fields after ``ids`` exist from format version 2 on; a version 1 record decodes with
    their defaults (owner unknown, no link, no extended attributes)."""

    tag: int
    mode: int
    mtime_ns: int
    size: int
    path: bytes
    target: bytes
    offset: int
    ids: bytes
    #: owner and group numbers (-1: not recorded) and names (empty: not recorded)
    uid: int = -1
    gid: int = -1
    user: bytes = b""
    group: bytes = b""
    #: a device's number (TAG_CHARDEV, TAG_BLOCKDEV)
    rdev: int = 0
    #: an earlier path of the same tree this entry is a hard link to (empty: none); such a
    #: record holds no chunk ids of its own
    link: bytes = b""
    #: extended attributes (POSIX ACLs included) as (name, value), in name order
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    #: a keyed digest of the file's identity when it was read (device, inode, size, mtime,
    #: ctime), so the next backup reads again a file changed in place with its size and
    #: mtime put back; empty: not recorded (then the next backup reads the file again)
    change: bytes = b""

    def chunk_ids(self) -> Iterator[bytes]:
        ids = self.ids
        for i in range(0, len(ids), CHUNK_ID_SIZE):
            yield ids[i : i + CHUNK_ID_SIZE]


def record_problem(record: RawRecord) -> str | None:
    """Why ``record`` cannot be a version 2 entry record, or None; the decoder refuses the
    same things the encoder does."""
    if record.tag not in _ENTRY_TAGS:
        return f"kind {record.tag} is not an entry kind"
    if record.mode & ~_MODE_BITS or record.mode < 0:
        return f"mode {record.mode:#o} has bits beyond the permission bits"
    if not -(1 << 63) <= record.mtime_ns < 1 << 63:
        return "mtime out of range"
    if not 0 <= record.size < 1 << 64 or not 0 <= record.rdev < 1 << 64:
        return "size or device number out of range"
    for what, number in (("uid", record.uid), ("gid", record.gid)):
        if not -1 <= number < NO_ID:
            return f"{what} {number} out of range"
    if len(record.path) > MAX_PATH_BYTES or len(record.link) > MAX_PATH_BYTES:
        return "path longer than its bound"
    if len(record.target) > MAX_PATH_BYTES:
        return "symlink target longer than its bound"
    if len(record.user) > MAX_NAME_BYTES or len(record.group) > MAX_NAME_BYTES:
        return "user or group name longer than its bound"
    if len(record.change) > MAX_CHANGE_BYTES:
        return "change token longer than its bound"
    if len(record.ids) % CHUNK_ID_SIZE:
        return "chunk ids of the wrong length"
    count = len(record.ids) // CHUNK_ID_SIZE
    if count and (record.tag != TAG_FILE or record.link):
        return "chunk ids on an entry that holds no data"
    if count > record.size:
        return f"{count} chunks for {record.size} bytes"
    total = 0
    previous = None
    for name, value in record.xattrs:
        if not name or len(name) > MAX_XATTR_NAME or b"\0" in name:
            return f"extended attribute name {name[:40]!r} is empty, too long or holds NUL"
        if len(value) > MAX_XATTR_VALUE:
            return f"extended attribute {name!r} is longer than {MAX_XATTR_VALUE} bytes"
        if previous is not None and name <= previous:
            return "extended attributes are not in strict name order"
        previous = name
        total += 2 + len(name) + 4 + len(value)
    if total > MAX_XATTR_BYTES:
        return f"extended attributes hold more than {MAX_XATTR_BYTES} bytes"
    return None


def encode_record(record: RawRecord) -> bytes:
    """A tree record as format version 2 writes it: extents as in version 1, entries with
    every field of :class:`RawRecord`. ``ValueError`` names what cannot be encoded."""
    if record.tag == TAG_EXTENT:
        return encode_extent(record.offset, record.size, record.ids)
    if record.mode & ~_MODE_BITS:
        # only the permission bits are a mode here (a version 1 record may hold the type's)
        record = dataclasses.replace(record, mode=record.mode & _MODE_BITS)
    problem = record_problem(record)
    if problem is not None:
        raise ValueError(f"tree record {record.path[:200]!r}: {problem}")
    parts = [
        b"",
        ENTRY2_FIXED.pack(
            record.mode,
            record.mtime_ns,
            record.size,
            NO_ID if record.uid < 0 else record.uid,
            NO_ID if record.gid < 0 else record.gid,
            record.rdev,
        ),
        U32.pack(len(record.path)),
        record.path,
        U32.pack(len(record.target)),
        record.target,
        U32.pack(len(record.link)),
        record.link,
        U16.pack(len(record.user)),
        record.user,
        U16.pack(len(record.group)),
        record.group,
        U32.pack(len(record.xattrs)),
    ]
    for name, value in record.xattrs:
        parts += (U16.pack(len(name)), name, U32.pack(len(value)), value)
    if record.change:  # the one optional field: last in the head, absent when empty
        parts += (U8.pack(len(record.change)), record.change)
    head = sum(len(p) for p in parts)
    parts[0] = ENTRY2_START.pack(ENTRY2_FLAG | record.tag, head)
    parts += (U32.pack(len(record.ids) // CHUNK_ID_SIZE), record.ids)
    return b"".join(parts)


def decode_records(buf: bytearray, name: str, *, final: bool) -> tuple[list[RawRecord], int]:
    """Decode the complete records at the start of ``buf``; return them and the bytes used.

    With ``final``, leftover bytes are an error (the stream ended inside a record).
    """
    out: list[RawRecord] = []
    with memoryview(buf) as view:
        pos = _decode_into(view, name, out)
    if final and pos != len(buf):
        raise IntegrityError(name, "tree ends inside a record")
    return out, pos


class _Head:
    """Reads the fields of a version 2 record's head, each bounded by what is left of it."""

    __slots__ = ("end", "name", "pos", "view")

    def __init__(self, view: memoryview, pos: int, end: int, name: str) -> None:
        self.view, self.pos, self.end, self.name = view, pos, end, name

    def fail(self, what: str) -> IntegrityError:
        return IntegrityError(self.name, f"tree record is malformed: {what}")

    def number(self, form: struct.Struct) -> int:
        if self.pos + form.size > self.end:
            raise self.fail("its head is shorter than its fields")
        (value,) = form.unpack_from(self.view, self.pos)
        self.pos += form.size
        return int(value)

    def field(self, form: struct.Struct, limit: int, what: str) -> bytes:
        n = self.number(form)
        if n > limit:
            raise self.fail(f"{what} of {n} bytes (at most {limit})")
        if self.pos + n > self.end:
            raise self.fail(f"{what} reaches past the record's head")
        value = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        return value


def _decode_entry2(view: memoryview, pos: int, end: int, name: str) -> tuple[RawRecord, int] | None:
    """The version 2 entry record at ``pos`` and the position after it; None when the
    buffer ends inside it."""
    if pos + ENTRY2_START.size > end:
        return None
    first, head_len = ENTRY2_START.unpack_from(view, pos)
    tag = first & ~ENTRY2_FLAG
    if tag not in _ENTRY_TAGS:
        raise IntegrityError(name, f"tree record of unknown kind {first:#x}")
    if head_len > MAX_ENTRY_HEAD:
        raise IntegrityError(name, f"tree record head of {head_len} bytes is beyond its bound")
    p = pos + ENTRY2_START.size
    ids_at = p + head_len + 4
    if ids_at > end:
        return None
    head = _Head(view, p, p + head_len, name)
    if head_len < ENTRY2_FIXED.size:
        raise head.fail("its head is shorter than its fields")
    mode, mtime_ns, size, uid, gid, rdev = ENTRY2_FIXED.unpack_from(view, p)
    head.pos += ENTRY2_FIXED.size
    path = head.field(U32, MAX_PATH_BYTES, "path")
    target = head.field(U32, MAX_PATH_BYTES, "symlink target")
    link = head.field(U32, MAX_PATH_BYTES, "hard link path")
    user = head.field(U16, MAX_NAME_BYTES, "user name")
    group = head.field(U16, MAX_NAME_BYTES, "group name")
    count = head.number(U32)
    xattrs = []
    for _ in range(count):
        if head.pos >= head.end:
            raise head.fail(f"{count} extended attributes in a shorter head")
        xname = head.field(U16, MAX_XATTR_NAME, "extended attribute name")
        xattrs.append((xname, head.field(U32, MAX_XATTR_VALUE, "extended attribute value")))
    change = b""
    if head.pos < head.end:
        change = head.field(U8, MAX_CHANGE_BYTES, "change token")
        if not change:
            raise head.fail("an empty change token (an absent one is left out)")
    if head.pos != head.end:
        raise head.fail("its head holds bytes after its fields")
    (n_ids,) = U32.unpack_from(view, ids_at - 4)
    if n_ids > size:
        raise IntegrityError(name, f"tree record is malformed: {n_ids} chunks for {size} bytes")
    stop = ids_at + n_ids * CHUNK_ID_SIZE
    if stop > end:
        return None
    record = RawRecord(
        tag, mode, mtime_ns, size, path, target, 0, bytes(view[ids_at:stop]),
        -1 if uid == NO_ID else uid, -1 if gid == NO_ID else gid, user, group, rdev, link,
        tuple(xattrs), change,
    )  # fmt: skip
    problem = record_problem(record)
    if problem is not None:
        raise IntegrityError(name, f"tree record {path[:200]!r} is malformed: {problem}")
    return record, stop


def _decode_into(view: memoryview, name: str, out: list[RawRecord]) -> int:
    pos = 0
    end = len(view)
    while pos < end:
        tag = view[pos]
        if tag & ENTRY2_FLAG:
            found = _decode_entry2(view, pos, end, name)
            if found is None:
                break
            record, p = found
            out.append(record)
        elif tag in (TAG_FILE, TAG_DIR, TAG_SYMLINK):
            if pos + ENTRY_HEAD.size > end:
                break
            _, mode, mtime_ns, size, plen = ENTRY_HEAD.unpack_from(view, pos)
            p = pos + ENTRY_HEAD.size
            if p + plen + 2 > end:
                break
            path = bytes(view[p : p + plen])
            p += plen
            (tlen,) = U16.unpack_from(view, p)
            p += 2
            if p + tlen + 4 > end:
                break
            target = bytes(view[p : p + tlen])
            p += tlen
            (count,) = U32.unpack_from(view, p)
            p += 4
            if p + count * CHUNK_ID_SIZE > end:
                break
            ids = bytes(view[p : p + count * CHUNK_ID_SIZE])
            p += count * CHUNK_ID_SIZE
            out.append(RawRecord(tag, mode, mtime_ns, size, path, target, 0, ids))
        elif tag == TAG_EXTENT:
            if pos + EXTENT_HEAD.size > end:
                break
            _, offset, length, count = EXTENT_HEAD.unpack_from(view, pos)
            p = pos + EXTENT_HEAD.size
            if p + count * CHUNK_ID_SIZE > end:
                break
            ids = bytes(view[p : p + count * CHUNK_ID_SIZE])
            p += count * CHUNK_ID_SIZE
            out.append(RawRecord(tag, 0, 0, length, b"", b"", offset, ids))
        else:
            raise IntegrityError(name, f"tree record of unknown kind {tag}")
        pos = p
    return pos
