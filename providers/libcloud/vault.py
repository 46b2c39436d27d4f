"""A region's Vault in one container of an object store, through apache-libcloud.

Objects are ``prefix + name`` in the container; the vault id lives under the reserved
``.regionvault/`` (never a valid object name: names do not start with '.'), made if-absent
so that every process agrees on it. libcloud offers no object lock and no legal hold (its
storage API has neither), so this vault declares neither: ``set_retention`` and
``set_legal_hold`` raise UnsupportedOperation.

A streamed upload that a killed writer left unfinished (an S3 multipart upload, Azure
uncommitted blocks) is no object: it is never listed or read. The vault reports what such
uploads under its prefix left, last written longer ago than the engine's lock expiry, as
stale temporaries for ``verify --repair`` and ``prune`` to remove: S3's (and MinIO's,
Ceph's) multipart uploads, and Azure's blobs that have uncommitted blocks only (listed with
``include=uncommittedblobs``; the uncommitted blocks of a killed re-upload of a committed
name are not listable apart, and Azure drops them after a week). Swift takes every put in
one PUT (no segments): a cut upload leaves nothing, and none are reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import VaultError
from regionvault.core.interfaces import Vault, establish_vault_id
from regionvault.core.names import name_problem
from regionvault.core.types import ObjectInfo, Temporary
from regionvault.providers.libcloud.store import Store, new_driver

if TYPE_CHECKING:
    from regionvault.core.types import Capabilities, RegionConfig
    from regionvault.providers.libcloud.settings import LibcloudSettings

__all__ = ["RESERVED_PREFIX", "LibcloudVault"]

RESERVED_PREFIX = ".regionvault/"


class LibcloudVault(Vault):
    def __init__(
        self,
        *,
        region: RegionConfig,
        settings: LibcloudSettings,
        capabilities: Capabilities,
        make_driver: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(provider="libcloud", region=region.name, capabilities=capabilities)
        settings.need(region, "vault", "container")
        assert settings.container is not None
        self.settings = settings
        self.prefix = settings.prefix
        if make_driver is None:
            settings.credentials(region)  # named now, not at the first request
        self._store = Store(
            make=make_driver or functools.partial(new_driver, settings, region),
            container=settings.container,
            settings=settings,
            region=region.name,
            error=VaultError,
            reserved=f"{RESERVED_PREFIX}{settings.prefix}",
        )
        self._vault_id: str | None = None

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise VaultError(
                f"bad object name {name!r}: {problem}", provider="libcloud", region=self.region
            )
        return self.prefix + name

    @property
    def vault_id(self) -> str:
        if self._vault_id is None:
            key = f"{RESERVED_PREFIX}{self.prefix}vault-id"
            self._vault_id = establish_vault_id(
                lambda: self._store.get(key, "vault id"),
                lambda data: self._store.put(key, "vault id", data, if_absent=True),
                provider="libcloud",
                region=self.region,
            )
        return self._vault_id

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> ObjectInfo:
        return self._store.put(self._key(name), name, data, if_absent=if_absent)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise VaultError(
                f"bad range of {name!r}: offset {offset}, length {length}",
                provider="libcloud",
                region=self.region,
            )
        return self._store.get(self._key(name), name, offset=offset, length=length)

    def head(self, name: str) -> ObjectInfo:
        return self._store.head(self._key(name), name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        cut = len(self.prefix)
        for listed in self._store.list(self.prefix + prefix):
            if listed.key.startswith(RESERVED_PREFIX):
                continue
            yield ObjectInfo(
                name=listed.key[cut:], size=listed.size, modified=listed.modified, etag=listed.etag
            )

    def delete(self, name: str, *, bypass_governance: bool = False) -> None:
        self._store.delete(self._key(name), name)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        return self._store.temporaries(self.prefix, older_than)

    def remove_temporary(self, temporary: Temporary) -> None:
        self._store.remove_temporary(temporary)

    def close(self) -> None:
        self._store.close()
