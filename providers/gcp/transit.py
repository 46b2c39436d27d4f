"""Transit into an inbox bucket of the destination region.

The source writes ``<source provider>/<source name>/<name>`` into the destination's
``inbox_bucket`` (never the vault's bucket: settings.py refuses that). A sender needs only
to create objects there (``storage.objects.create``): every send is first an upload with
``ifGenerationMatch=0``, which such a sender may always make. Only a payload of the same
name still waiting (an offer sent again before the destination took the first) is then
replaced by a plain upload, which Cloud Storage allows only with ``storage.objects.delete``
too: a create-only sender gets one error saying so, and the payload that waits stays.
:meth:`GcsTransit.has`, :meth:`~GcsTransit.inbox`, :meth:`~GcsTransit.receive` and
:meth:`~GcsTransit.discard` are the destination's (the engine asks them with its
credentials): a one-name listing, a listing, a read and a delete.

An interrupted send leaves nothing in the inbox: an unfinished resumable upload is no
object, and Cloud Storage offers no listing of upload sessions (it drops them after a
week), so the transit reports no stale temporaries.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import requests
from regionvault.core.errors import ObjectExists, ObjectNotFound, TransitError
from regionvault.core.interfaces import Transit
from regionvault.core.names import name_problem, prefix_problem
from regionvault.providers.gcp.clients import storage_client
from regionvault.providers.gcp.storage import GcsBucket

if TYPE_CHECKING:
    from regionvault.core.types import Capabilities, RegionConfig
    from regionvault.providers.gcp.metrics import GcpMetrics
    from regionvault.providers.gcp.settings import GcpSettings

__all__ = ["GcsTransit"]


class GcsTransit(Transit):
    """Payloads from a source region into the destination's inbox bucket.

    ``adapter`` (tests): a requests adapter mounted on the client's session."""

    def __init__(
        self,
        *,
        source: RegionConfig,
        destination: RegionConfig,
        settings: GcpSettings,
        credentials: Any,
        capabilities: Capabilities,
        metrics: GcpMetrics | None = None,
        adapter: requests.adapters.HTTPAdapter | None = None,
    ) -> None:
        super().__init__(
            provider="gcp", source=source.name, region=destination.name, capabilities=capabilities
        )
        settings.need(destination, "transit inbox", "inbox_bucket")
        assert settings.inbox_bucket is not None
        self.bucket_name = settings.inbox_bucket
        self.prefix = f"{source.id.provider}/{source.id.name}/"
        #: the destination's settings
        self.settings = settings
        self._client = storage_client(settings, credentials, metrics=metrics, adapter=adapter)
        self._inbox = GcsBucket(
            client=self._client,
            bucket=settings.inbox_bucket,
            settings=settings,
            region=destination.name,
            error=TransitError,
        )
        self._sent = 0
        self._sent_lock = threading.Lock()

    def _ready(self) -> GcsBucket:
        self._inbox.ensure(create=self.settings.create)
        return self._inbox

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise TransitError(
                f"bad payload name {name!r}: {problem}", provider="gcp", region=self.region
            )
        return self.prefix + name

    # ------------------------------------------------------------------ the sender's side

    def send(self, name: str, payload: bytes | memoryview) -> None:
        key = self._key(name)
        inbox = self._ready()
        try:
            inbox.put(key, name, payload, if_absent=True)
        except ObjectExists:
            # an earlier payload of this name still waits: replacing it is an overwrite
            try:
                inbox.put(key, name, payload, if_absent=False)
            except TransitError as exc:
                if getattr(exc, "http_status", None) != 403:
                    raise
                raise TransitError(
                    f"payload {name!r} from {self.source} still waits in {inbox.label} and "
                    "replacing it needs storage.objects.delete there besides "
                    f"storage.objects.create ({exc.message})",
                    provider="gcp",
                    region=self.region,
                ) from None
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        with self._sent_lock:
            self._sent += size

    def has(self, name: str) -> bool:
        return self._ready().first(self._key(name))

    # ------------------------------------------------------------------ the destination's side

    def inbox(self, prefix: str = "") -> Iterator[str]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise TransitError(
                f"bad inbox prefix {prefix!r} from {self.source}: {problem}",
                provider="gcp",
                region=self.region,
            )
        return self._names(prefix)

    def _names(self, prefix: str) -> Iterator[str]:
        cut = len(self.prefix)
        for blob in self._ready().list(self.prefix + prefix):
            yield str(blob.name)[cut:]

    def receive(self, name: str) -> bytes:
        key = self._key(name)
        try:
            return self._ready().get(key, name)
        except ObjectNotFound:
            raise TransitError(
                f"payload {name!r} is not in the inbox from {self.source}",
                provider="gcp",
                region=self.region,
            ) from None

    def discard(self, name: str) -> None:
        self._ready().delete(self._key(name), name)

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
