"""The Transit into a region whose vault is the libcloud provider's: payloads from a source
region land in the destination's inbox, ``inbox_prefix + <source provider>/<source name>/ +
name`` in its ``inbox_container`` (the vault's container when not set), through the same
driver as the vault. A send is one atomic put (streamed above ``single_put_limit``); a
payload of the name already waiting is replaced, as a resumed copy sends it again whole.
What a killed streamed send left in the inbox (an S3 multipart upload, an Azure blob of
uncommitted blocks) is reported by ``stale_temporaries`` for the engine's inbox sweep to
remove, as the vault reports its own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ObjectNotFound, TransitError
from regionvault.core.interfaces import Transit
from regionvault.core.names import name_problem, prefix_problem
from regionvault.providers.libcloud.store import Store, new_driver

if TYPE_CHECKING:
    from regionvault.core.types import Capabilities, RegionConfig, Temporary
    from regionvault.providers.libcloud.settings import LibcloudSettings

__all__ = ["LibcloudTransit"]


class LibcloudTransit(Transit):
    def __init__(
        self,
        *,
        source: RegionConfig,
        destination: RegionConfig,
        settings: LibcloudSettings,
        capabilities: Capabilities,
        make_driver: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(
            provider="libcloud",
            source=source.name,
            region=destination.name,
            capabilities=capabilities,
        )
        settings.need(destination, "transit inbox", "container")
        assert settings.inbox is not None
        self.prefix = f"{settings.inbox_prefix}{source.id.provider}/{source.id.name}/"
        if make_driver is None:
            settings.credentials(destination)  # named now, not at the first request
        self._inbox = Store(
            make=make_driver or functools.partial(new_driver, settings, destination),
            container=settings.inbox,
            settings=settings,
            region=destination.name,
            error=TransitError,
            reserved=f".regionvault/{self.prefix}",
        )
        self._sent = 0
        self._sent_lock = threading.Lock()

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise TransitError(
                f"bad payload name {name!r}: {problem}", provider="libcloud", region=self.region
            )
        return self.prefix + name

    def send(self, name: str, payload: bytes | memoryview) -> None:
        key = self._key(name)
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        self._inbox.put(key, name, payload, if_absent=False)
        with self._sent_lock:
            self._sent += size

    def has(self, name: str) -> bool:
        try:
            self._inbox.head(self._key(name), name)
        except ObjectNotFound:
            return False
        return True

    def inbox(self, prefix: str = "") -> Iterator[str]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise TransitError(
                f"bad inbox prefix {prefix!r} from {self.source}: {problem}",
                provider="libcloud",
                region=self.region,
            )
        return self._names(prefix)

    def _names(self, prefix: str) -> Iterator[str]:
        cut = len(self.prefix)
        for listed in self._inbox.list(self.prefix + prefix):
            yield listed.key[cut:]

    def receive(self, name: str) -> bytes:
        key = self._key(name)
        try:
            return self._inbox.get(key, name)
        except ObjectNotFound:
            raise TransitError(
                f"payload {name!r} is not in the inbox from {self.source}",
                provider="libcloud",
                region=self.region,
            ) from None

    def discard(self, name: str) -> None:
        self._inbox.delete(self._key(name), name)

    def stale_temporaries(self, older_than: timedelta) -> Iterator[Temporary]:
        return self._inbox.temporaries(self.prefix, older_than)

    def remove_temporary(self, temporary: Temporary) -> None:
        self._inbox.remove_temporary(temporary)

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def close(self) -> None:
        self._inbox.close()
