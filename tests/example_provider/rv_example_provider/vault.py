"""A Vault that keeps every object as one file in one flat directory.

An object name is a '/'-separated path; here it becomes a single file name by
percent-encoding (``packs/00/pack-1`` is stored as ``packs%2F00%2Fpack-1``), with '.' encoded
too so that no object's file starts with a dot. Dot files are the vault's own: ``.vault-id``
and the ``.tmp-*`` files of writes in flight.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

from regionvault.core import (
    Capabilities,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Vault,
    VaultError,
)
from regionvault.core.names import name_problem


def file_name(name: str) -> str:
    return quote(name, safe="").replace(".", "%2E")


class FlatVault(Vault):
    def __init__(
        self, directory: Path, *, provider: str, region: str, capabilities: Capabilities
    ) -> None:
        super().__init__(provider=provider, region=region, capabilities=capabilities)
        self.directory = directory

    def _path(self, name: str) -> Path:
        problem = name_problem(name)  # the one rule for names, the same in every vault
        if problem is not None:
            raise VaultError(
                f"bad object name {name!r}: {problem}", provider=self.provider, region=self.region
            )
        encoded = file_name(name)
        if len(encoded.encode()) > 255:
            raise VaultError(
                f"object name {name[:40]!r}... is too long for a flat directory",
                provider=self.provider,
                region=self.region,
            )
        return self.directory / encoded

    def _info(self, name: str, path: Path) -> ObjectInfo:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ObjectNotFound(name, provider=self.provider, region=self.region) from None
        modified = datetime.fromtimestamp(st.st_mtime, UTC)
        return ObjectInfo(name=name, size=st.st_size, modified=modified)

    def _publish(self, data: bytes, path: Path, *, if_absent: bool) -> bool:
        """Write ``data`` to a temporary file, then give it its name in one atomic step:
        readers see the old object or the whole new one, never part of it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{secrets.token_hex(8)}"
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if if_absent:
                try:
                    os.link(tmp, path)  # fails if the name is taken: check and create at once
                except FileExistsError:
                    return False
            else:
                tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new name survives a power cut
        finally:
            os.close(fd)
        return True

    @property
    def vault_id(self) -> str:
        path = self.directory / ".vault-id"
        if not path.exists():
            self._publish(f"flat-{secrets.token_hex(16)}".encode(), path, if_absent=True)
        return path.read_text().strip()

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        path = self._path(name)
        if not self._publish(bytes(data), path, if_absent=if_absent):
            raise ObjectExists(name, provider=self.provider, region=self.region)
        return self._info(name, path)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        try:
            f = self._path(name).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(name, provider=self.provider, region=self.region) from None
        with f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def head(self, name: str) -> ObjectInfo:
        return self._info(name, self._path(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.directory.is_dir():
            return
        names = sorted(unquote(p.name) for p in self.directory.iterdir() if p.name[0] != ".")
        for name in names:
            if name.startswith(prefix):
                try:
                    yield self._info(name, self._path(name))
                except ObjectNotFound:
                    continue  # deleted while we listed

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        self._path(name).unlink(missing_ok=True)
