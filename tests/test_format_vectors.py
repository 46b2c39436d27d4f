"""docs/format.md's known-answer vectors (section 16) hold: each is read out of the document
and recomputed here with the code from the inputs the document states, so the document
cannot drift from what the code writes and reads. The chunker is also checked against a
plain transcription of the document's pseudocode (section 4) with the document's gear table
and masks, so the text alone is enough to cut the same chunks."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyfastcdc.py.constants import GEAR, GEAR_LS, MASKS
from regionvault.core import KeyService, Region
from regionvault.core.repository import (
    ChunkerParams,
    CopyTracker,
    Repository,
    _crypto,
    open_payload,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._chunking import Rechunker
from regionvault.core.repository._links import keyed_tag
from regionvault.core.repository._manifest import root_hash
from regionvault.core.repository._store import RepoConfig, Store, canonical_json
from regionvault.core.repository.copy.names import copy_point_id

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"
VECTOR_NAMES = {
    "key-derivation",
    "index-body",
    "sealed-object",
    "pack",
    "transit-payload",
    "canonical-json",
    "chunking",
    "gear",
    "masks",
}
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Vector:
    """One block of section 16: ``(name, value)`` lines, a value's indented continuation
    lines joined to it with a space."""

    name: str
    lines: tuple[tuple[str, str], ...]

    def all(self, key: str) -> list[str]:
        found = [value for name, value in self.lines if name == key]
        assert found, f"vector {self.name} has no {key!r}"
        return found

    def text(self, key: str) -> str:
        (value,) = self.all(key)
        return value

    def bytes(self, key: str) -> bytes:
        value = self.text(key)
        if value.startswith('"'):
            return str(json.loads(value)).encode()
        return bytes.fromhex(value)

    def int(self, key: str) -> int:
        return int(self.text(key), 0)

    def ints(self, key: str) -> list[int]:
        return [int(word, 0) for word in self.text(key).split()]


def read_vectors() -> dict[str, Vector]:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^<!-- vector: ([a-z0-9-]+) -->\n```text\n(.*?)\n```$", text, re.S | re.M)
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names)), f"a vector appears twice in {DOC}: {names}"
    vectors = {}
    for name, body in blocks:
        lines: list[list[str]] = []
        for line in body.splitlines():
            if line[:1].isspace():
                assert lines, f"vector {name} starts with a continuation line"
                lines[-1][1] += " " + line.strip()
            elif line.strip():
                key, _, value = line.partition(" ")
                lines.append([key, value.strip()])
        vectors[name] = Vector(name, tuple((k, v) for k, v in lines))
    return vectors


VECTORS = read_vectors()


class VectorStore(Store):
    """A Store whose config holds the vectors' keys and chunker: the code's own key and
    chunker methods, with no vault behind them."""

    def __init__(self, config: RepoConfig) -> None:
        self._vector_config = config

    @property
    def config(self) -> RepoConfig:
        return self._vector_config


def vector_store(*, chunker: ChunkerParams | None = None, seed: int = 1) -> VectorStore:
    keys = VECTORS["key-derivation"]
    return VectorStore(
        RepoConfig(
            version=fmt.FORMAT_VERSION,
            repository_id="0" * 32,
            vault_id=VECTORS["sealed-object"].bytes("vault_id").decode(),
            created_at=datetime(2026, 12, 7, tzinfo=UTC),
            chunker=chunker or ChunkerParams(),
            chunker_seed=seed,
            chunk_id_key=keys.bytes("chunk_id_key"),
            master_key=keys.bytes("secret"),
        )
    )


def test_the_document_holds_every_vector() -> None:
    assert set(VECTORS) == VECTOR_NAMES


def test_key_derivation() -> None:
    v = VECTORS["key-derivation"]
    enc_key, commitment = _crypto.derive(v.bytes("secret"), v.bytes("salt"))
    assert enc_key == v.bytes("enc_key")
    assert commitment == v.bytes("commitment")
    store = vector_store()
    assert store.chunk_id(v.bytes("chunk")) == v.bytes("chunk_id")
    source = v.bytes("links_source").decode()
    assert bytes.fromhex(keyed_tag(store, source)) == v.bytes("links_tag")
    point = v.bytes("copy_source_point").decode()
    assert bytes.fromhex(copy_point_id(store, source, point)) == v.bytes("copy_point_id")
    destination = v.bytes("copies_destination").decode()
    assert bytes.fromhex(keyed_tag(store, f"tracker:{destination}")) == v.bytes("copies_tag")


def test_copy_records_are_named_as_the_document_says(east: Region) -> None:
    """Section 14's rule for ``copies/<tag>/<point>/...``, checked on a real repository
    (the vector above checks the hash; this, that the tracker names its objects by it)."""
    repo = Repository.init_or_open(east.vault, east.keys, region=east.name)
    point = "0123456789abcdef0123456789abcdef"
    CopyTracker(repo).mark_offered("local:west", point, datetime(2026, 12, 7, 10, 43, tzinfo=UTC))
    store = repo._ensure_open()
    tag = blake3.blake3(b"links:tracker:local:west", key=store.config.chunk_id_key).hexdigest()
    names = [info.name for info in east.vault.list(fmt.COPIES_PREFIX)]
    assert names == [f"copies/{tag[:32]}/{point}/offered"]
    body = json.loads(store.get_sealed(fmt.ObjectKind.COPIES, names[0]))
    assert body == {"point": point, "destination": "local:west", "at": "2026-12-07T10:43:00+00:00"}


def blob_entries(v: Vector) -> list[fmt.BlobEntry]:
    entries = []
    for line in v.all("blob"):
        chunk_id, *numbers = line.split()
        entries.append(fmt.BlobEntry(bytes.fromhex(chunk_id), *map(int, numbers)))
    return entries


def test_index_body() -> None:
    v = VECTORS["index-body"]
    _, commitment = _crypto.derive(v.bytes("data_key"), v.bytes("pack_salt"))
    assert commitment == v.bytes("pack_commitment")
    header = fmt.PackHeader.build(
        run_id=v.bytes("run_id"),
        salt=v.bytes("pack_salt"),
        commitment=commitment,
        wrapped_key=v.bytes("wrapped_key"),
    )
    assert header.raw == v.bytes("pack_header")
    entries = blob_entries(v)
    assert entries[0].chunk_id == VECTORS["key-derivation"].bytes("chunk_id")
    pack = fmt.IndexPack(v.bytes("pack_id").hex(), v.int("pack_size"), header.raw, entries)
    superseded = [v.bytes("superseded").hex()]
    body = fmt.encode_index([pack], superseded)
    assert body == v.bytes("index_body")
    # and the reader takes the stated bytes back to the same packs
    assert fmt.decode_index("index/vector", v.bytes("index_body")) == ([pack], superseded)


def test_sealed_object(monkeypatch: pytest.MonkeyPatch) -> None:
    v = VECTORS["sealed-object"]
    keys = VECTORS["key-derivation"]
    vault_id, name = v.bytes("vault_id").decode(), v.bytes("name").decode()
    kind = fmt.ObjectKind(v.int("kind"))
    body = VECTORS["index-body"].bytes("index_body")
    salt = keys.bytes("salt")

    def fixed_salt(n: int) -> bytes:
        assert n == len(salt)
        return salt

    # the salt is the one random input of seal(): the vector states it
    monkeypatch.setattr(_crypto, "os", SimpleNamespace(urandom=fixed_salt))
    sealed = _crypto.seal(
        vault_id=vault_id, kind=kind, name=name, body=body, secret=keys.bytes("secret"),
        compress_level=None,
    )  # fmt: skip
    assert sealed == v.bytes("sealed")
    header = fmt.EnvelopeHeader.parse(name, v.bytes("sealed"), kind)
    assert header.raw == v.bytes("header")
    assert header.commitment == keys.bytes("commitment")
    assert fmt.envelope_aad(vault_id, kind, name, header.raw) == v.bytes("aad")
    opened = _crypto.open_sealed(
        vault_id=vault_id, name=name, data=v.bytes("sealed"), header=header,
        secret=keys.bytes("secret"),
    )  # fmt: skip
    assert opened == body


def test_pack() -> None:
    """A pack of one blob, written as the pack writer does (blob at the header's end, then
    the sealed blob table at its offset, then the footer), and read back."""
    v = VECTORS["pack"]
    index, keys = VECTORS["index-body"], VECTORS["key-derivation"]
    vault_id, name = VECTORS["sealed-object"].bytes("vault_id").decode(), v.bytes("name").decode()
    assert name == fmt.pack_name(index.bytes("pack_id").hex())
    header = fmt.PackHeader.parse(name, index.bytes("pack_header"))
    data_key = index.bytes("data_key")
    assert _crypto.derive(data_key, index.bytes("pack_salt"))[0] == v.bytes("enc_key")
    key = _crypto.PackKey.make(vault_id=vault_id, name=name, header=header, data_key=data_key)
    chunk, chunk_id = keys.bytes("chunk"), keys.bytes("chunk_id")
    entry = blob_entries(index)[0]
    assert (entry.chunk_id, entry.offset, entry.raw_length) == (chunk_id, header.size, len(chunk))
    assert fmt.nonce_at(entry.offset) == v.bytes("blob_nonce")
    blob_aad = fmt.blob_aad(key.aad_prefix, chunk_id, entry.blob_type, entry.flags, len(chunk))
    assert blob_aad == v.bytes("blob_aad")

    pack = bytearray(header.raw) + bytearray(entry.length)
    view = memoryview(pack)
    key.encrypt_blob_into(
        view[entry.offset :], entry.offset, chunk_id, entry.blob_type, entry.flags,
        len(chunk), chunk,
    )  # fmt: skip
    view.release()
    table = fmt.encode_blob_table([entry])
    assert table == v.bytes("table")
    assert fmt.nonce_at(len(pack)) == v.bytes("table_nonce")
    sealed_table = key.encrypt_table(len(pack), table)
    pack += sealed_table + fmt.PACK_FOOTER.pack(len(sealed_table), fmt.PACK_END_MAGIC)
    assert bytes(pack) == v.bytes("pack")

    # read back from the stated bytes: footer, table, blob, chunk id
    stated = v.bytes("pack")
    table_length, end_magic = fmt.PACK_FOOTER.unpack_from(stated, len(stated) - 8)
    table_at = len(stated) - 8 - table_length
    assert end_magic == fmt.PACK_END_MAGIC
    (read,) = fmt.decode_blob_table(
        name, key.decrypt_table(table_at, stated[table_at:-8]), pack_size=len(stated)
    )
    assert read == entry
    ciphertext = stated[read.offset : read.offset + read.length]
    blob = key.decrypt_blob(ciphertext, read.offset, chunk_id, 0, 0, read.raw_length)
    assert blob == chunk and vector_store().chunk_id(blob) == chunk_id


class TransitKeys:
    """The destination's KeyService as far as opening a payload goes: it unseals the
    vector's sealed transfer key, and only under the vector's context."""

    def __init__(self, v: Vector) -> None:
        self.vector = v

    def unseal(self, sealed: bytes, context: dict[str, str]) -> bytes:
        assert sealed == self.vector.bytes("sealed_key")
        assert context == json.loads(self.vector.text("context"))
        return self.vector.bytes("transfer_key")


def test_transit_payload() -> None:
    """Written by the rules of docs/copy.md "Payloads" (transcribed here), the stated
    payload is what the code opens, with the stated context, to the stated body."""
    v = VECTORS["transit-payload"]
    keys = VECTORS["key-derivation"]
    name = v.bytes("name").decode()
    chunk = keys.bytes("chunk")
    body = keys.bytes("chunk_id") + bytes((0, 0)) + struct.pack(">II", len(chunk), len(chunk))
    assert body + chunk == v.bytes("body")
    aad = b"RVT2" + name.encode()
    payload_key = blake3.blake3(aad, key=v.bytes("transfer_key")).digest()
    assert payload_key == v.bytes("payload_key")
    sealed_key = v.bytes("sealed_key")
    head = b"RVT2" + struct.pack(">H", len(sealed_key)) + sealed_key + v.bytes("session")
    head += v.bytes("nonce")
    sealed = head + AESGCM(payload_key).encrypt(v.bytes("nonce"), v.bytes("body"), aad)
    assert sealed + blake3.blake3(sealed).digest() == v.bytes("payload")
    opened = open_payload(
        cast(KeyService, TransitKeys(v)), name, v.bytes("payload"),
        kind=v.bytes("kind").decode(), source=v.bytes("source").decode(),
        destination=v.bytes("destination").decode(),
    )  # fmt: skip
    assert opened == v.bytes("body")


def test_canonical_json_and_root_hash() -> None:
    v = VECTORS["canonical-json"]
    doc = json.loads(v.text("document"))
    assert canonical_json({k: val for k, val in doc.items() if k != "root_hash"}) == v.bytes(
        "canonical"
    )
    assert bytes.fromhex(root_hash(vector_store(), doc)) == v.bytes("root_hash")


def chunking_input() -> bytes:
    """Section 16's chunking input, built as the document says."""
    stream = blake3.blake3(b"regionvault chunker vector").digest(length=41_000)
    return stream[:40_000] + bytes(40_000) + stream[40_000:]


def chunking_params() -> ChunkerParams:
    v = VECTORS["chunking"]
    return ChunkerParams(
        min_size=v.int("min_size"), avg_size=v.int("avg_size"), max_size=v.int("max_size")
    )


def block_words(name: str) -> list[str]:
    """Every word of a vector block that is a table (gear, masks) rather than named values."""
    return [word for key, value in VECTORS[name].lines for word in (key, *value.split())]


def doc_gear() -> list[int]:
    return [int(word, 16) for word in block_words("gear")]


def doc_masks() -> dict[int, int]:
    words = block_words("masks")
    return {int(words[i]): int(words[i + 1], 16) for i in range(0, len(words), 2)}


def doc_cut(data: bytes, params: ChunkerParams, seed: int) -> list[int]:
    """Section 4's pseudocode, transcribed: the chunk lengths of ``data``."""
    gear = [g ^ seed for g in doc_gear()]
    gear_ls = [(g << 1) & U64 for g in gear]
    masks = doc_masks()
    bits = params.avg_size.bit_length() - 1
    mask_s, mask_l = masks[bits + 1], masks[bits - 1]
    mask_s_ls, mask_l_ls = (mask_s << 1) & U64, (mask_l << 1) & U64

    def next_length(buf: memoryview) -> int:
        n = len(buf)
        if n <= params.min_size:
            return n
        center = params.avg_size
        if n > params.max_size:
            n = params.max_size
        elif n < center:
            center = n
        h = 0
        for start, stop, m_ls, m in (
            (params.min_size & ~1, center & ~1, mask_s_ls, mask_s),
            (center & ~1, n & ~1, mask_l_ls, mask_l),
        ):
            for i in range(start, stop, 2):
                h = ((h << 2) + gear_ls[buf[i]]) & U64
                if not h & m_ls:
                    return i
                h = (h + gear[buf[i + 1]]) & U64
                if not h & m:
                    return i + 1
        return n

    lengths = []
    view = memoryview(data)
    while view:
        length = next_length(view)
        lengths.append(length)
        view = view[length:]
    return lengths


def test_gear_table_and_masks_are_the_chunkers() -> None:
    gear = doc_gear()
    assert len(gear) == 256 and gear == list(GEAR)
    assert list(GEAR_LS) == [(g << 1) & U64 for g in gear]  # section 4: GEAR_LS = GEAR << 1
    assert doc_masks() == dict(enumerate(MASKS))


@pytest.mark.parametrize("seed_key", ["seed", None])
def test_chunking(seed_key: str | None) -> None:
    v = VECTORS["chunking"]
    seed = v.int("seed") if seed_key else 0
    expected = v.ints("chunks" if seed_key else "chunks_seed_0")
    data = chunking_input()
    assert len(data) == 81_000 and sum(expected) == len(data)
    params = chunking_params()
    chunker = vector_store(chunker=params, seed=seed).new_chunker()
    assert [c.length for c in chunker.cut_buf(data)] == expected
    # cut in pieces, the last chunk of each carried into the next, as backups cut streams
    rechunker = Rechunker(chunker, threshold=10_000)
    pieces = [
        len(c) for i in range(0, len(data), 7_000) for c in rechunker.feed(data[i : i + 7_000])
    ]
    pieces += [len(c) for c in rechunker.finish()]
    assert pieces == expected
    # and the document's own text is enough to cut the same chunks
    assert doc_cut(data, params, seed) == expected


def test_a_new_repositorys_seed_is_56_bits_never_zero(east: Region) -> None:
    """Section 4: the config's seed is 56 random bits with the lowest set, so the gear
    table is always changed by it (the vector shows that a seed changes the cuts)."""
    repo = Repository.init_or_open(east.vault, east.keys, region=east.name)
    seed = repo._ensure_open().config.chunker_seed
    assert seed & 1 and 0 < seed < 1 << 56
    v = VECTORS["chunking"]
    assert v.ints("chunks") != v.ints("chunks_seed_0")
