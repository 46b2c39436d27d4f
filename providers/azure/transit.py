"""Transit into an inbox container in the destination region's storage account.

The source writes ``<source provider>/<source name>/<name>`` into the destination's inbox
container through a SAS that allows create and write only (``sp=cw``): it can neither read,
list nor delete there. The SAS is the destination's ``inbox_sas_env`` when set (a SAS the
destination's operators handed over), else one this process mints with the destination's
own credential, short-lived and renewed before it expires: a service SAS signed with the
account key, or a user-delegation SAS when the credential is a token. The destination lists,
reads and deletes with its own credential.

:meth:`AzureTransit.has` asks without reading: a Set Blob Metadata (a write, so the SAS
allows it) with ``If-Unmodified-Since`` a date before any payload was written, a condition
every existing blob fails. A present blob answers 412 and is not changed; an absent one
answers 404.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContainerSasPermissions, generate_container_sas
from regionvault.core.errors import ObjectNotFound, TransitError
from regionvault.core.interfaces import Transit
from regionvault.core.names import name_problem, prefix_problem
from regionvault.providers.azure.blob import BlobContainer
from regionvault.providers.azure.errors import error_code, error_status

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient
    from regionvault.core.types import Capabilities, RegionConfig
    from regionvault.providers.azure.settings import BlobSettings

__all__ = ["SAS_PERMISSION", "AzureTransit", "mint_inbox_sas"]

#: what a sender may do in the destination's inbox: create and write blobs, nothing else
SAS_PERMISSION = "cw"
#: a minted SAS is renewed this long before it expires; its start lies this far back (clocks)
SAS_MARGIN = timedelta(minutes=5)
#: the condition of :meth:`AzureTransit.has`: every blob was last written after this
_BEFORE_ANY_PAYLOAD = datetime(2000, 1, 1, tzinfo=UTC)


#: hosts whose plain-HTTP blob endpoint (Azurite on this machine) may be used with a SAS
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def sas_protocol(url: str) -> str:
    """The ``spr`` of an inbox SAS: HTTPS only, except for a plain-HTTP endpoint on this
    machine (Azurite in the offline tests: ``http://127.0.0.1:<port>/<account>``), which
    also allows HTTP. A plain-HTTP endpoint anywhere else still gets an HTTPS-only SAS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return "https,http"
    return "https"


def mint_inbox_sas(
    service: BlobServiceClient,
    settings: BlobSettings,
    *,
    account_key: str | None,
    now: datetime | None = None,
) -> tuple[str, datetime]:
    """A create/write SAS on ``settings.inbox_container`` and its expiry, signed with the
    account key, or with a user delegation key the token credential of ``service`` fetches."""
    start = (now or datetime.now(UTC)) - SAS_MARGIN
    expiry = start + SAS_MARGIN + timedelta(seconds=settings.inbox_sas_lifetime)
    permission = ContainerSasPermissions(create=True, write=True)
    if account_key is not None:
        token = generate_container_sas(
            settings.account_name,
            settings.inbox_container,
            account_key=account_key,
            permission=permission,
            start=start,
            expiry=expiry,
            protocol=sas_protocol(settings.url),
        )
    else:
        delegation = service.get_user_delegation_key(start, expiry)
        token = generate_container_sas(
            settings.account_name,
            settings.inbox_container,
            user_delegation_key=delegation,
            permission=permission,
            start=start,
            expiry=expiry,
            protocol=sas_protocol(settings.url),
        )
    return token, expiry


class AzureTransit(Transit):
    """Payloads from a source region into the destination's inbox container."""

    def __init__(
        self,
        *,
        source: RegionConfig,
        destination: RegionConfig,
        settings: BlobSettings,
        receiver: Callable[[], ContainerClient],
        sender: Callable[[str], ContainerClient],
        service: BlobServiceClient | None,
        account_key: str | None,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(
            provider="azure", source=source.name, region=destination.name, capabilities=capabilities
        )
        settings.need_account(destination, "transit inbox")
        self.container_name = settings.inbox_container
        self.prefix = f"{source.id.provider}/{source.id.name}/"
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.upload_concurrency, thread_name_prefix="rv-inbox-block"
        )
        # the destination's side is made when first used: a sending process given a SAS
        # holds no credential of the destination's
        self._make_receiver = receiver
        self._recv: BlobContainer | None = None
        self._make_sender = sender
        self._service = service
        self._account_key = account_key
        self._send: BlobContainer | None = None
        self._send_expiry: datetime | None = None
        self._send_lock = threading.Lock()
        self._sent = 0
        self._sent_lock = threading.Lock()

    # ------------------------------------------------------------------ the sender's side

    def _sender(self) -> BlobContainer:
        """The container client holding only the create/write SAS, renewed when a minted
        SAS nears its expiry."""
        with self._send_lock:
            fresh = self._send_expiry is None or self._send_expiry - SAS_MARGIN > datetime.now(UTC)
            if self._send is not None and fresh:
                return self._send
            given = self._settings.inbox_sas()
            if given is not None:
                token, expiry = given, None
            else:
                if self._service is None:
                    raise TransitError(
                        f"no SAS for the inbox of {self.region}: set inbox_sas_env for it, or "
                        "give this process the region's storage credential",
                        provider="azure",
                        region=self.region,
                    )
                receiving = self._ready_recv()
                try:
                    token, expiry = mint_inbox_sas(
                        self._service, self._settings, account_key=self._account_key
                    )
                except AzureError as exc:
                    raise receiving.error(exc, "cannot make a SAS for the inbox") from None
            if self._send is not None:
                with contextlib.suppress(AzureError):
                    self._send.client.close()
            self._send = BlobContainer(
                client=self._make_sender(token),
                settings=self._settings,
                region=self.region,
                error=TransitError,
                pool=self._pool,
            )
            self._send_expiry = expiry
            return self._send

    def _key(self, name: str) -> str:
        problem = name_problem(name)
        if problem is not None:
            raise TransitError(
                f"bad payload name {name!r}: {problem}", provider="azure", region=self.region
            )
        return self.prefix + name

    def send(self, name: str, payload: bytes | memoryview) -> None:
        key = self._key(name)
        self._sender().put(key, name, payload, if_absent=False)
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        with self._sent_lock:
            self._sent += size

    def has(self, name: str) -> bool:
        key = self._key(name)
        sender = self._sender()
        try:
            sender.blob(key).set_blob_metadata({}, if_unmodified_since=_BEFORE_ANY_PAYLOAD)
        except ResourceNotFoundError:
            return False
        except ResourceModifiedError:
            return True
        except AzureError as exc:
            if error_status(exc) == 412 or error_code(exc) == "ConditionNotMet":
                return True
            raise sender.error(exc, f"cannot ask for {key!r}") from None
        raise TransitError(
            f"asking for {key!r} in the inbox changed it: the service ignored If-Unmodified-Since",
            provider="azure",
            region=self.region,
        )

    # ------------------------------------------------------------------ the destination's side

    def _ready_recv(self) -> BlobContainer:
        if self._recv is None:
            self._recv = BlobContainer(
                client=self._make_receiver(),
                settings=self._settings,
                region=self.region,
                error=TransitError,
            )
        self._recv.ensure(create=self._settings.create)
        return self._recv

    def inbox(self, prefix: str = "") -> Iterator[str]:
        problem = prefix_problem(prefix)
        if problem is not None:
            raise TransitError(
                f"bad inbox prefix {prefix!r}: {problem}", provider="azure", region=self.region
            )
        cut = len(self.prefix)
        for item in self._ready_recv().list(self.prefix + prefix):
            yield str(item.name)[cut:]

    def receive(self, name: str) -> bytes:
        key = self._key(name)
        try:
            return self._ready_recv().get(key, name)
        except ObjectNotFound:
            raise TransitError(
                f"payload {name!r} is not in the inbox from {self.source}",
                provider="azure",
                region=self.region,
            ) from None

    def discard(self, name: str) -> None:
        self._ready_recv().delete(self._key(name), name)

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for side in (self._send, self._recv):
            if side is not None:
                with contextlib.suppress(AzureError):
                    side.client.close()
