"""An opened repository's low-level services: its config and secrets, sealed objects, data
keys, the index, and decoding (decrypt, decompress, check the id of) blobs."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import blake3
import pyfastcdc
from regionvault.core.errors import (
    ConfigError,
    IntegrityError,
    KeyAccessDenied,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
)
from regionvault.core.interfaces import KeyService, Vault
from regionvault.core.repository import _crypto, _keyring
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository.model import ChunkerParams, RepositorySettings
from regionvault.core.types import DataKey, ObjectInfo

__all__ = ["IndexState", "RepoConfig", "Store", "check_rotation_key"]

_CONFIG_PURPOSE = "regionvault-repository"
#: at most this many pack ciphers are kept (each holds an AES key schedule)
_PACK_KEY_CACHE = 4096


@dataclass(frozen=True)
class RepoConfig:
    version: int
    repository_id: str
    vault_id: str
    created_at: datetime
    chunker: ChunkerParams
    chunker_seed: int
    chunk_id_key: bytes = field(repr=False)
    master_key: bytes = field(repr=False)
    #: the master key the config's data key is wrapped under (format 4 configs say it)
    key_id: str | None = None


@dataclass
class IndexState:
    """The live index and the index objects it came from."""

    index: ChunkIndex
    #: live index object ids (not superseded)
    live: list[str]
    #: every index object present, live or superseded, by id
    objects: dict[str, ObjectInfo]
    #: problems met while loading (only when loaded tolerantly)
    problems: list[tuple[str, str]] = field(default_factory=list)


def config_context(vault_id: str) -> dict[str, str]:
    return {"vault": vault_id, "kind": "config", "purpose": _CONFIG_PURPOSE}


def check_rotation_key(region: str, what: str, used: str, expected: str) -> None:
    """A rotation's writes must be under exactly its new master key: a KeyService that
    answered with another (a key change still propagating, or another rotation meanwhile)
    would leave the repository under a key the operator is about to disable."""
    if used != expected:
        raise RegionVaultError(
            f"rotate-keys: the key service wrapped {what} under {used}, not the new master key "
            f"{expected} (the key change may still be propagating): nothing was lost; run "
            "rotate-keys again",
            region=region,
        )


class Store:
    """What every operation on an opened repository shares; thread-safe."""

    def __init__(
        self, vault: Vault, keys: KeyService, *, region: str, settings: RepositorySettings
    ) -> None:
        self.vault = vault
        self.keys = keys
        self.region = region
        self.settings = settings
        self.vault_id = vault.vault_id
        self._config: RepoConfig | None = None
        self._lock = threading.Lock()
        self._data_keys: dict[bytes, bytes] = {}
        self._pack_keys: dict[tuple[str, bytes], _crypto.PackKey] = {}
        #: run keys of the newest keyring (None: not read yet), and why it could not be read
        self._keyring: dict[bytes, bytes] | None = None
        self._keyring_problem: str | None = None

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> RepoConfig:
        if self._config is None:
            raise RegionVaultError("repository is not open", region=self.region)
        return self._config

    def init_or_open(self, chunker: ChunkerParams | None) -> bool:
        """Open the repository, creating its config first if the vault has none. Returns
        True when this call created it. Two racing initialisers agree: the if-absent put
        lets exactly one config exist, and the loser opens the winner's."""
        try:
            self.open()
            return False
        except ObjectNotFound:
            pass
        params = chunker or ChunkerParams()
        problem = params.problem()
        if problem is not None:
            raise ConfigError(f"chunker parameters: {problem}", key="chunker")
        context = config_context(self.vault_id)
        data_key = self.keys.generate_data_key(context)
        body = {
            # version 4: the config may be rewritten under a newer master key, and the
            # repository may hold keyrings, which a reader of version 3 would not know
            "format": fmt.FORMAT_VERSION_CONFIG,
            "key_id": data_key.key_id,
            "repository": fmt.new_id(),
            "vault": self.vault_id,
            "created_at": datetime.now(UTC).isoformat(),
            "chunk_id": {"algorithm": "blake3-keyed", "key": os.urandom(32).hex()},
            "master_key": os.urandom(32).hex(),
            "chunker": {
                "algorithm": "fastcdc2020",
                "min_size": params.min_size,
                "avg_size": params.avg_size,
                "max_size": params.max_size,
                "normalization": 1,
                "seed": int.from_bytes(os.urandom(7), "big") | 1,
            },
            "cipher": "aes-256-gcm",
            "compression": "zstd",
        }
        sealed = _crypto.seal(
            vault_id=self.vault_id,
            kind=fmt.ObjectKind.CONFIG,
            name=fmt.CONFIG_NAME,
            body=json.dumps(body, sort_keys=True).encode(),
            secret=data_key.plaintext,
            key_source=fmt.KEY_SOURCE_WRAPPED,
            wrapped_key=data_key.wrapped,
            compress_level=None,
        )
        created = True
        try:
            self.vault.put(fmt.CONFIG_NAME, sealed, if_absent=True)
        except ObjectExists:
            created = False
        self.open()
        return created

    def open(self) -> RepoConfig:
        data = self.vault.get(fmt.CONFIG_NAME)
        config = self._parse_config(data)
        self._config = config
        return config

    def read_config(self) -> RepoConfig:
        """Read and authenticate the config again (verify uses it)."""
        return self._parse_config(self.vault.get(fmt.CONFIG_NAME))

    def _parse_config(self, data: bytes) -> RepoConfig:
        name = fmt.CONFIG_NAME
        doc = self._config_document(data)
        try:
            fmt.check_version(name, int(doc["format"]))
            if doc["vault"] != self.vault_id:
                raise IntegrityError(name, f"belongs to vault {doc['vault']}, not {self.vault_id}")
            chunker = doc["chunker"]
            if chunker["algorithm"] != "fastcdc2020" or doc["chunk_id"]["algorithm"] != (
                "blake3-keyed"
            ):
                raise IntegrityError(name, "unknown chunker or chunk id algorithm")
            params = ChunkerParams(
                min_size=int(chunker["min_size"]),
                avg_size=int(chunker["avg_size"]),
                max_size=int(chunker["max_size"]),
            )
            if params.problem() is not None:
                raise IntegrityError(name, f"chunker parameters: {params.problem()}")
            chunk_key = bytes.fromhex(doc["chunk_id"]["key"])
            master = bytes.fromhex(doc["master_key"])
            if len(chunk_key) != 32 or len(master) != 32:
                raise IntegrityError(name, "a key has the wrong length")
            key_id = doc.get("key_id")
            return RepoConfig(
                version=int(doc["format"]),
                repository_id=fmt.parse_hex_id(doc["repository"], "repository id"),
                vault_id=doc["vault"],
                created_at=datetime.fromisoformat(doc["created_at"]),
                chunker=params,
                chunker_seed=int(chunker["seed"]),
                chunk_id_key=chunk_key,
                master_key=master,
                key_id=None if key_id is None else str(key_id),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(name, f"config is malformed ({exc})") from None

    def _config_document(self, data: bytes) -> dict[str, Any]:
        """The config's body, authenticated (one unwrap), as a JSON object."""
        name = fmt.CONFIG_NAME
        header = fmt.EnvelopeHeader.parse(name, data, fmt.ObjectKind.CONFIG)
        if header.key_source != fmt.KEY_SOURCE_WRAPPED or not header.wrapped_key:
            raise IntegrityError(name, "config carries no wrapped key")
        try:
            secret = self.keys.unwrap(header.wrapped_key, config_context(self.vault_id))
        except KeyAccessDenied as exc:
            raise KeyAccessDenied(
                f"{name}: the KeyService of {self.keys.region} cannot unwrap this repository's "
                f"key: the vault belongs to another region or key service, or the object was "
                f"altered ({exc.message})",
                provider=self.keys.provider,
                region=self.keys.region,
            ) from None
        body = _crypto.open_sealed(
            vault_id=self.vault_id, name=name, data=data, header=header, secret=secret
        )
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise IntegrityError(name, f"config is malformed ({exc})") from None
        if not isinstance(doc, dict):
            raise IntegrityError(name, "config is malformed (not a JSON object)")
        return doc

    def rewrap_config(self, expect_key_id: str | None = None) -> RepoConfig:
        """Rewrite the config (an atomic overwrite) with the same secrets under a fresh data
        key of the KeyService's current master key, saying format 4 and that key's id: key
        rotation's last write (docs/format.md, "Rotate keys"). A crash leaves the old config
        or the new one whole; either opens while the old master key is enabled. With
        ``expect_key_id``, a data key under any other master key writes nothing and raises
        "run again" (:func:`check_rotation_key`)."""
        name = fmt.CONFIG_NAME
        doc = self._config_document(self.vault.get(name))
        data_key = self.keys.generate_data_key(config_context(self.vault_id))
        if expect_key_id is not None:
            check_rotation_key(self.region, name, data_key.key_id, expect_key_id)
        if doc.get("repository") != self.config.repository_id:
            raise IntegrityError(name, "config was replaced since the repository was opened")
        doc = {**doc, "format": fmt.FORMAT_VERSION_CONFIG, "key_id": data_key.key_id}
        sealed = _crypto.seal(
            vault_id=self.vault_id,
            kind=fmt.ObjectKind.CONFIG,
            name=name,
            body=json.dumps(doc, sort_keys=True).encode(),
            secret=data_key.plaintext,
            key_source=fmt.KEY_SOURCE_WRAPPED,
            wrapped_key=data_key.wrapped,
            compress_level=None,
        )
        self.vault.put(name, sealed)
        self._config = config = self._parse_config(sealed)
        return config

    # ------------------------------------------------------------------ sealed objects

    def seal(self, kind: fmt.ObjectKind, name: str, body: bytes) -> bytes:
        return _crypto.seal(
            vault_id=self.vault_id,
            kind=kind,
            name=name,
            body=body,
            secret=self.config.master_key,
        )

    def put_sealed(
        self, kind: fmt.ObjectKind, name: str, body: bytes, *, if_absent: bool = False
    ) -> ObjectInfo:
        return self.vault.put(name, self.seal(kind, name, body), if_absent=if_absent)

    def open_sealed(self, kind: fmt.ObjectKind, name: str, data: bytes) -> bytes:
        header = fmt.EnvelopeHeader.parse(name, data, kind)
        if header.key_source != fmt.KEY_SOURCE_MASTER:
            raise IntegrityError(name, f"unexpected key source {header.key_source}")
        return _crypto.open_sealed(
            vault_id=self.vault_id,
            name=name,
            data=data,
            header=header,
            secret=self.config.master_key,
        )

    def get_sealed(self, kind: fmt.ObjectKind, name: str) -> bytes:
        return self.open_sealed(kind, name, self.vault.get(name))

    # ------------------------------------------------------------------ chunks and keys

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.config.chunk_id_key).digest()

    def new_chunker(self) -> pyfastcdc.FastCDC:
        params = self.config.chunker
        return pyfastcdc.FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=1,
            seed=self.config.chunker_seed,
        )

    def data_key_context(self, run_id: bytes) -> dict[str, str]:
        return {
            "vault": self.vault_id,
            "kind": "pack",
            "repository": self.config.repository_id,
            "run": run_id.hex(),
        }

    def new_data_key(self, run_id: bytes) -> DataKey:
        return self.keys.generate_data_key(self.data_key_context(run_id))

    def pack_key(self, pack_id: str, header_raw: bytes) -> _crypto.PackKey:
        cache_key = (pack_id, header_raw)
        with self._lock:
            found = self._pack_keys.get(cache_key)
        if found is not None:
            return found
        name = fmt.pack_name(pack_id)
        header = fmt.PackHeader.parse(name, header_raw)
        if header.size != len(header_raw):
            raise IntegrityError(name, "pack header has trailing bytes")
        data_key = self._unwrap_data_key(name, header)
        key = _crypto.PackKey.make(
            vault_id=self.vault_id, name=name, header=header, data_key=data_key
        )
        with self._lock:
            if len(self._pack_keys) >= _PACK_KEY_CACHE:
                self._pack_keys.clear()
            self._pack_keys[cache_key] = key
        return key

    def _unwrap_data_key(self, name: str, header: fmt.PackHeader) -> bytes:
        with self._lock:
            found = self._data_keys.get(header.wrapped_key)
            if found is not None:
                return found
            secret = self._run_key_locked(name, header)
            self._data_keys[header.wrapped_key] = secret
            return secret

    def run_key(self, name: str, header: fmt.PackHeader) -> bytes:
        """The data key of the run that wrote pack ``name``: from the newest keyring when it
        holds the run, else unwrapped from the pack header (one KeyService call per run)."""
        return self._unwrap_data_key(name, header)

    def _run_key_locked(self, name: str, header: fmt.PackHeader) -> bytes:
        ring = self._keyring_locked(reload=False)
        found = ring.get(header.run_id)
        if found is not None:
            return found
        # one KMS call per backup run, however many packs the run wrote
        try:
            return self.keys.unwrap(header.wrapped_key, self.data_key_context(header.run_id))
        except KeyAccessDenied as exc:
            denied = exc.message
        # a rotation since the keyring was read may have re-wrapped the run (and its old
        # master key may be gone): read the newest keyring again, once
        found = self._keyring_locked(reload=True).get(header.run_id)
        if found is not None:
            return found
        keyring = f"; {self._keyring_problem}" if self._keyring_problem else ""
        raise IntegrityError(
            name,
            "its run key is in no keyring and its data key does not unwrap with this "
            "repository's key service: the pack was altered, comes from another vault, or "
            f"its master key was disabled before a rotation re-wrapped it ({denied}){keyring}",
        )

    def _keyring_locked(self, *, reload: bool) -> dict[bytes, bytes]:
        """The newest keyring's run keys (empty when there is none or it is damaged: then
        ``_keyring_problem`` says why, and pack headers are unwrapped instead). Any other
        error (a KMS outage or throttle: TransientError, KeyServiceError) propagates and
        nothing is cached, so the next call reads the keyring again."""
        if self._keyring is None or reload:
            try:
                ring = _keyring.newest_keyring(self.vault, self.keys, self.config.repository_id)
            except (IntegrityError, ObjectNotFound) as exc:
                self._keyring_problem = str(exc)
                self._keyring = {}
            else:
                self._keyring_problem = None
                self._keyring = dict(ring.runs) if ring is not None else {}
        return self._keyring

    def adopt_keyring(self, ring: _keyring.Keyring) -> None:
        """Use the run keys of the keyring this process just wrote (a :class:`Keyring`)."""
        with self._lock:
            self._keyring = dict(ring.runs)
            self._keyring_problem = None

    def decode_blob(
        self,
        key: _crypto.PackKey,
        chunk_id: bytes,
        blob_type: int,
        flags: int,
        offset: int,
        raw_length: int,
        ciphertext: bytes | memoryview,
    ) -> bytes:
        """The verified plaintext of one blob: authenticated, decompressed, id checked."""
        return self.open_blob(key, chunk_id, blob_type, flags, offset, raw_length, ciphertext)[1]

    def open_blob(
        self,
        key: _crypto.PackKey,
        chunk_id: bytes,
        blob_type: int,
        flags: int,
        offset: int,
        raw_length: int,
        ciphertext: bytes | memoryview,
    ) -> tuple[bytes, bytes]:
        """``(stored payload, chunk)`` of one blob, verified like :meth:`decode_blob`."""
        plain = key.decrypt_blob(ciphertext, offset, chunk_id, blob_type, flags, raw_length)
        if flags & fmt.FLAG_ZSTD:
            data = _crypto.decompress(key.name, plain, raw_length)
        else:
            data = plain
            if len(data) != raw_length:
                raise IntegrityError(key.name, f"blob {chunk_id.hex()[:16]} has the wrong length")
        if self.chunk_id(data) != chunk_id:
            raise IntegrityError(
                key.name, f"blob {chunk_id.hex()[:16]} does not hash to its chunk id"
            )
        return plain, data

    # ------------------------------------------------------------------ index

    def write_index(self, packs: list[fmt.IndexPack], supersedes: Iterable[str] = ()) -> str:
        index_id = fmt.new_id()
        body = fmt.encode_index(packs, sorted(supersedes))
        self.put_sealed(fmt.ObjectKind.INDEX, fmt.index_name(index_id), body, if_absent=True)
        return index_id

    def load_index(self, *, keep_blobs: bool = False, tolerant: bool = False) -> IndexState:
        """Read every index object and build the live index (superseded objects left out).

        With ``tolerant``, an index object that fails to read is reported in ``problems``
        instead of raising (verify uses this).
        """
        objects = {
            info.name[len(fmt.INDEX_PREFIX) :]: info for info in self.vault.list(fmt.INDEX_PREFIX)
        }
        problems: list[tuple[str, str]] = []
        decoded: dict[str, tuple[list[fmt.RawIndexPack], list[str]]] = {}

        def read(index_id: str) -> tuple[str, Any]:
            name = fmt.index_name(index_id)
            try:
                body = self.get_sealed(fmt.ObjectKind.INDEX, name)
                return index_id, fmt.parse_index(name, body)
            except ObjectNotFound:
                return index_id, None  # removed by a concurrent prune: superseded anyway
            except IntegrityError as exc:
                if not tolerant:
                    raise
                return index_id, exc

        with ThreadPoolExecutor(max_workers=8) as pool:
            for index_id, result in pool.map(read, sorted(objects)):
                if isinstance(result, IntegrityError):
                    problems.append((fmt.index_name(index_id), result.reason))
                elif result is not None:
                    decoded[index_id] = result
        superseded = {old for _, sup in decoded.values() for old in sup}
        live = sorted(index_id for index_id in decoded if index_id not in superseded)
        index = ChunkIndex()
        index.reserve(sum(pack.count for index_id in live for pack in decoded[index_id][0]))
        for index_id in live:
            packs = decoded.pop(index_id)[0]
            name = fmt.index_name(index_id)
            try:
                for pack in packs:
                    index.add_pack(pack, index_id, keep_blobs=keep_blobs, name=name)
            except IntegrityError as exc:
                if not tolerant:
                    raise
                problems.append((name, exc.reason))
        index.damaged = problems
        return IndexState(index, live, objects, problems)


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
