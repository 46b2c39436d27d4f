"""Helpers for the repository tests (tests/test_repository_*.py): small captures and sinks,
tree snapshots for byte-exact comparison, and bit flipping in a local vault."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from regionvault.core import (
    BlockCapture,
    BlockSink,
    FileCapture,
    Instance,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Region,
    Vault,
)
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.repository._format import POINT_PREFIX
from regionvault.providers.local.compute import LocalFileCapture
from regionvault.providers.local.vault import LocalVault

INSTANCE = Instance(id="i-test", name="test-nf", region="local:east")

#: small packs and chunks so that little test data still makes several packs
SMALL = RepositorySettings(pack_size=256 << 10, index_every_packs=2, workers=2)


def repo_for(region: Region, settings: RepositorySettings = SMALL) -> Repository:
    from regionvault.core.repository import ChunkerParams

    return Repository.init_or_open(
        region.vault,
        region.keys,
        region=region.name,
        chunker=ChunkerParams(min_size=2048, avg_size=8192, max_size=32768),
        settings=settings,
    )


def capture(root: Path, instance: Instance = INSTANCE) -> LocalFileCapture:
    return LocalFileCapture(instance, datetime.now(UTC), root)


class CountingCapture(FileCapture):
    """A capture of a directory that counts which files were opened."""

    def __init__(self, root: Path, instance: Instance = INSTANCE) -> None:
        super().__init__(instance, datetime.now(UTC))
        self._inner = LocalFileCapture(instance, self.taken_at, root)
        self.opened: list[str] = []

    def entries(self) -> Iterator:  # type: ignore[type-arg]
        return self._inner.entries()

    def open(self, entry) -> BinaryIO:  # type: ignore[no-untyped-def]
        self.opened.append(entry.path)
        return self._inner.open(entry)


class ImageCapture(BlockCapture):
    """A block image given as ``{offset: bytes}``; everything else is never written."""

    def __init__(
        self, size: int, blocks: Mapping[int, bytes], *, block_size: int = 4096,
        instance: Instance = INSTANCE,
    ) -> None:  # fmt: skip
        super().__init__(instance, datetime.now(UTC), size=size, block_size=block_size)
        self._blocks = dict(blocks)

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        for offset in sorted(self._blocks):
            data = self._blocks[offset]
            # hand the data over in uneven pieces, as a real device reader might
            step = 3 * self.block_size
            for i in range(0, len(data), step):
                yield offset + i, data[i : i + step]

    def image(self) -> bytes:
        out = bytearray(self.size)
        for offset, data in self._blocks.items():
            out[offset : offset + len(data)] = data
        return bytes(out)


class MemorySink(BlockSink):
    def __init__(self, size: int, block_size: int = 4096) -> None:
        super().__init__(size, block_size)
        self.data = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.committed = False

    def write(self, offset: int, data: bytes) -> None:
        assert offset % self.block_size == 0, offset
        assert offset + len(data) <= self.size
        self.data[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    def commit(self) -> None:
        self.committed = True


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: kind, permission bits, mtime, size and content hash (or
    link target). Directory mtimes are compared too."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", str(p.readlink()), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, digest)
    return out


def object_path(region: Region, name: str) -> Path:
    return Path(region.config.path("root")).resolve() / "vault" / "objects" / name


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def listing(region: Region, prefix: str) -> list[str]:
    return [info.name for info in region.vault.list(prefix)]


class MemoryVault(Vault):
    """A minimal in-memory Vault (no WORM): the repository must work on any Vault."""

    def __init__(self) -> None:
        from regionvault.core import Capabilities

        super().__init__(
            provider="memory", region="memory:one",
            capabilities=Capabilities(conditional_put=True),
        )  # fmt: skip
        self.objects: dict[str, tuple[bytes, datetime]] = {}
        self._lock = threading.Lock()

    @property
    def vault_id(self) -> str:
        return "v-memory"

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        with self._lock:
            if if_absent and name in self.objects:
                raise ObjectExists(name)
            self.objects[name] = (bytes(data), datetime.now(UTC))
            return ObjectInfo(name, len(data), self.objects[name][1])

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            if name not in self.objects:
                raise ObjectNotFound(name)
            data = self.objects[name][0]
        return data[offset:] if length is None else data[offset : offset + length]

    def head(self, name: str) -> ObjectInfo:
        with self._lock:
            if name not in self.objects:
                raise ObjectNotFound(name)
            data, modified = self.objects[name]
        return ObjectInfo(name, len(data), modified)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            found = sorted((n, len(d), m) for n, (d, m) in self.objects.items()
                           if n.startswith(prefix))  # fmt: skip
        return iter([ObjectInfo(n, s, m) for n, s, m in found])

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        with self._lock:
            self.objects.pop(name, None)


class ManifestReads:
    """Counts, per region, the manifest GETs and the listings of ``points/`` that every
    :class:`LocalVault` makes while it is installed (``monkeypatch`` undoes it): each GET of
    a manifest is one decryption."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gets: Counter[str] = Counter()
        self.lists: Counter[str] = Counter()
        self._lock = threading.Lock()
        get, list_ = LocalVault.get, LocalVault.list
        reads = self

        def counted_get(vault: LocalVault, name: str, **kwargs: Any) -> bytes:
            if name.startswith(POINT_PREFIX):
                with reads._lock:
                    reads.gets[vault.region] += 1
            return get(vault, name, **kwargs)

        def counted_list(vault: LocalVault, prefix: str = "") -> Iterator[ObjectInfo]:
            if prefix.startswith(POINT_PREFIX):
                with reads._lock:
                    reads.lists[vault.region] += 1
            return list_(vault, prefix)

        monkeypatch.setattr(LocalVault, "get", counted_get)
        monkeypatch.setattr(LocalVault, "list", counted_list)

    def reset(self) -> None:
        with self._lock:
            self.gets.clear()
            self.lists.clear()
