"""One container of an object store through apache-libcloud's storage driver: what the
Vault and the Transit share (the only module with the vault's and inbox's requests).

- A put of up to ``single_put_limit`` bytes is one PUT through the driver's own signed
  connection: the object appears whole or not at all. Larger ones go through the driver's
  streamed upload (S3 multipart, Azure blocks then one block list), which also makes the
  object appear only when the last request commits it.
- An if-absent put is one PUT with ``If-None-Match: *``: S3 (and MinIO) answer 412, Azure
  409, when the name is taken, so checking and creating are one step in the store. A store
  that does not honour it is configured ``conditional_put = false`` and the put is refused
  (UnsupportedOperation) rather than done as a racy check-then-put.
- Ranged reads are ``download_object_range_as_stream``; listings ``iterate_container_objects``
  with a prefix, in the store's name order (UTF-8 byte order for S3, Azure and Swift, which
  is code-point order).
- Swift (``openstack_swift``): every put is one PUT, atomic in Swift (a larger one streamed
  chunked through ``upload_object_via_stream``; no segments, so nothing is left to sweep, and
  nothing above Swift's 5 GiB). Reads go through the driver's connection with the name
  quoted: libcloud's Swift downloads put the name in the path unquoted (a '?', '#' or '%' in
  a name would be cut or decoded).
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.storage.base import Object
from libcloud.storage.providers import get_driver
from libcloud.storage.types import (
    ContainerAlreadyExistsError,
    ContainerDoesNotExistError,
    ObjectDoesNotExistError,
)
from libcloud.storage.types import Provider as Drivers
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    TransientError,
    UnsupportedOperation,
    configuration_failure,
)
from regionvault.core.types import ObjectInfo

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.libcloud.settings import LibcloudSettings

__all__ = ["Store", "new_driver"]

#: parts of a streamed upload
PART = 8 * 1024 * 1024
#: the largest object Swift takes (its default max_file_size is 5 GiB + 2 bytes)
SWIFT_MOST = 5 * 1024 * 1024 * 1024
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def new_driver(settings: LibcloudSettings, region: RegionConfig) -> Any:
    """The libcloud storage driver of ``settings``, logged in with the credentials the
    environment variables it names hold."""
    key, secret = settings.credentials(region)
    kwargs: dict[str, Any] = {"secure": settings.secure, "timeout": settings.timeout}
    if settings.host is not None:
        kwargs["host"] = settings.host
    if settings.port is not None:
        kwargs["port"] = settings.port
    if settings.libcloud_driver == "openstack_swift":
        # the endpoint, its scheme and port are the ones keystone's catalog lists
        return get_driver(Drivers.OPENSTACK_SWIFT)(
            key,
            secret,
            secure=urlsplit(settings.auth_url or "").scheme != "http",
            region=settings.service_region,
            timeout=settings.timeout,
            ex_force_auth_url=settings.auth_url,
            ex_force_auth_version="3.x_password",
            ex_force_service_region=settings.service_region,
            ex_tenant_name=settings.project,
            ex_domain_name=settings.domain,
        )
    if settings.libcloud_driver == "s3":
        cls = get_driver(Drivers.S3)
        kwargs["region"] = settings.s3_region
    else:
        cls = get_driver(Drivers.AZURE_BLOBS)
    return cls(key, secret, **kwargs)


class _Refused(Exception):
    """A raw request's answer that is not a success."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"Status code: {code} {text}")
        self.code = code


#: libcloud's S3 and Azure responses raise LibcloudError with the status only in the text
_STATUS_TEXT = re.compile(r"status[ _]code[:=] ?(\d{3})\b", re.IGNORECASE)


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request: BaseHTTPError's code, else the one the text of
    libcloud's S3 and Azure errors carries ("Unknown error. Status code: 412",
    "Error in multipart abort. status_code=404")."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    found = _STATUS_TEXT.search(str(getattr(exc, "value", "")) or str(exc))
    return int(found.group(1)) if found else None


class Store:
    """Container ``container`` of the store; errors are ``error`` (VaultError or
    TransitError) naming the provider and ``region``.

    A libcloud driver is not safe to share between threads: its connection keeps the request
    in flight (path, method, body) on itself and signs from there, so two threads' requests
    would be signed with each other's paths. Each thread gets a driver of its own from
    ``make``."""

    def __init__(
        self,
        *,
        make: Callable[[], Any],
        container: str,
        settings: LibcloudSettings,
        region: str,
        error: type[RegionVaultError],
    ) -> None:
        self._make = make
        #: each live thread's driver; a finished thread's goes with it
        self._drivers: weakref.WeakKeyDictionary[threading.Thread, Any] = (
            weakref.WeakKeyDictionary()
        )
        self.name = container
        self.settings = settings
        self.region = region
        self.error = error
        self._container: Any = None
        self._lock = threading.RLock()
        self.label = f"{settings.driver} container {container}"

    @property
    def driver(self) -> Any:
        thread = threading.current_thread()
        driver = self._drivers.get(thread)
        if driver is None:
            driver = self._make()
            with self._lock:
                self._drivers[thread] = driver
        return driver

    # ------------------------------------------------------------------ errors

    def _fail(self, what: str, exc: BaseException) -> RegionVaultError:
        status = _status(exc)
        text = f"{what} in {self.label} failed: {type(exc).__name__}: {exc}"
        if configuration_failure(exc):
            where = (
                "auth_url (and the endpoints keystone's catalog lists)"
                if self.settings.libcloud_driver == "openstack_swift"
                else "host, port and secure"
            )
            return self.error(
                f"{text} (a host without an address or a TLS failure: check {where} in site.toml)",
                provider="libcloud",
                region=self.region,
            )
        if isinstance(exc, InvalidCredsError) or status == 401:
            return self.error(
                f"{what} in {self.label} was refused (credentials from "
                f"{self.settings.key_env}/{self.settings.secret_env}): {exc}",
                provider="libcloud",
                region=self.region,
            )
        if isinstance(exc, OSError) or (status is not None and status in _TRANSIENT_STATUS):
            return TransientError(text, provider="libcloud", region=self.region)
        return self.error(text, provider="libcloud", region=self.region)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (
            ObjectDoesNotExistError,
            ContainerDoesNotExistError,
            ContainerAlreadyExistsError,
            ObjectExists,
            ObjectNotFound,
        ):
            raise
        except (LibcloudError, BaseHTTPError, OSError) as exc:
            raise self._fail(what, exc) from exc

    # ------------------------------------------------------------------ the container

    def container(self) -> Any:
        with self._lock:
            if self._container is None:
                self._container = self._find_or_make()
            return self._container

    def _find_or_make(self) -> Any:
        try:
            return self._call("looking up", lambda: self.driver.get_container(self.name))
        except ContainerDoesNotExistError:
            if not self.settings.create:
                raise self.error(
                    f"{self.label} does not exist (make it, or set create = true)",
                    provider="libcloud",
                    region=self.region,
                ) from None
        try:
            return self._call("creating", lambda: self.driver.create_container(self.name))
        except ContainerAlreadyExistsError:
            return self._call("looking up", lambda: self.driver.get_container(self.name))

    def _object(self, key: str) -> Object:
        return Object(key, 0, "", {}, {}, self.container(), self.driver)

    def _path(self, key: str) -> str:
        return f"/{quote(self.name)}/{quote(key)}"

    # ------------------------------------------------------------------ objects

    def put(self, key: str, name: str, data: bytes | memoryview, *, if_absent: bool) -> None:
        body = bytes(data)
        if if_absent and not self.settings.conditional_put:
            raise UnsupportedOperation(
                f"an if-absent put ({self.label} is configured conditional_put = false)",
                provider="libcloud",
                region=self.region,
            )
        swift = self.settings.libcloud_driver == "openstack_swift"
        if swift and len(body) > SWIFT_MOST:
            raise self.error(
                f"putting {name!r} in {self.label}: {len(body)} bytes, over the {SWIFT_MOST} "
                "bytes Swift takes in one object (this provider makes no SLO/DLO segments)",
                provider="libcloud",
                region=self.region,
            )
        if len(body) > self.settings.single_put_limit and not if_absent:
            self._streamed(key, body)
            return
        self.container()
        headers = {"Content-Type": "application/octet-stream"}
        if body:
            # signed as sent (Azure's shared key signs an empty body's length as '')
            headers["Content-Length"] = str(len(body))
        if self.settings.libcloud_driver == "azure_blobs":
            headers["x-ms-blob-type"] = "BlockBlob"
        if swift:
            # Swift refuses (422) a body whose MD5 is not this: nothing altered on the way lands
            headers["ETag"] = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if if_absent:
            headers["If-None-Match"] = "*"
        try:
            response = self.driver.connection.request(
                self._path(key), method="PUT", data=body, headers=headers, raw=True
            )
            status = int(response.status)
            if not 200 <= status < 300:
                text = str(getattr(response, "body", "") or "")[:300]
                raise _Refused(status, text)
        except (LibcloudError, BaseHTTPError, OSError, _Refused) as exc:
            # S3 and MinIO answer 412 to If-None-Match: * on a taken name, Azure 409
            if if_absent and _status(exc) in (409, 412):
                raise ObjectExists(name, provider="libcloud", region=self.region) from None
            raise self._fail(f"putting {name!r}", exc) from exc

    def _streamed(self, key: str, body: bytes) -> None:
        parts: Iterator[bytes] = iter([body[i : i + PART] for i in range(0, len(body), PART)])
        if self.settings.libcloud_driver == "openstack_swift":
            # one chunked PUT; libcloud then hashes the stream it sent again to check the ETag
            parts = _Parts(body)
        container = self.container()
        self._call(
            f"uploading {key!r}",
            lambda: self.driver.upload_object_via_stream(parts, container, key),
        )

    def get(self, key: str, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            self.head(key, name)
            return b""
        if self.settings.libcloud_driver == "openstack_swift":
            return self._swift_get(key, name, offset, length)
        obj = self._object(key)
        try:
            if offset == 0 and length is None:
                stream = self._call(
                    f"reading {name!r}", lambda: self.driver.download_object_as_stream(obj)
                )
            else:
                end = None if length is None else offset + length
                stream = self._call(
                    f"reading {name!r}",
                    lambda: self.driver.download_object_range_as_stream(obj, offset, end),
                )
            return b"".join(self._call(f"reading {name!r}", lambda: list(stream)))
        except ObjectDoesNotExistError:
            raise ObjectNotFound(name, provider="libcloud", region=self.region) from None

    def _swift_get(self, key: str, name: str, offset: int, length: int | None) -> bytes:
        self.container()
        headers = {}
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        try:
            response = self.driver.connection.request(
                self._path(key), method="GET", headers=headers, raw=True
            )
            status = int(response.status)
            if status == 404:
                raise ObjectNotFound(name, provider="libcloud", region=self.region)
            if status not in (200, 206) or (headers and status != 206):
                raise _Refused(status, str(getattr(response, "body", "") or "")[:300])
            return b"".join(response.iter_content(PART))
        except (LibcloudError, BaseHTTPError, OSError, _Refused) as exc:
            raise self._fail(f"reading {name!r}", exc) from exc

    def head(self, key: str, name: str) -> ObjectInfo:
        container = self.container()
        try:
            obj = self._call(
                f"looking up {name!r}", lambda: self.driver.get_object(container.name, key)
            )
        except ObjectDoesNotExistError:
            raise ObjectNotFound(name, provider="libcloud", region=self.region) from None
        return self.info(obj, name)

    def info(self, obj: Object, name: str) -> ObjectInfo:
        return ObjectInfo(
            name=name, size=int(obj.size), modified=_modified(obj), etag=obj.hash or None
        )

    def list(self, prefix: str) -> Iterator[Object]:
        container = self.container()
        objects = self._call(
            "listing",
            lambda: self.driver.iterate_container_objects(container, prefix=prefix or None),
        )
        while True:
            try:
                obj = self._call("listing", lambda: next(objects))
            except StopIteration:
                return
            yield obj

    def delete(self, key: str, name: str) -> None:
        obj = self._object(key)
        try:
            self._call(f"deleting {name!r}", lambda: self.driver.delete_object(obj))
        except ObjectDoesNotExistError:
            return

    # ------------------------------------------------------------------ leftovers

    def unfinished(self, prefix: str, older_than: timedelta) -> Iterator[tuple[str, str, datetime]]:
        """(key, upload id, started) of S3 multipart uploads under ``prefix`` started more
        than ``older_than`` ago: what a killed streamed upload leaves. Azure's uncommitted
        blocks cannot be listed without their blob (and expire after a week): none."""
        if self.settings.libcloud_driver != "s3":
            return
        container = self.container()
        cutoff = datetime.now(UTC) - older_than
        uploads = self._call(
            "listing unfinished uploads",
            lambda: self.driver.ex_iterate_multipart_uploads(container, prefix=prefix or None),
        )
        while True:
            try:
                upload = self._call("listing unfinished uploads", lambda: next(uploads))
            except StopIteration:
                return
            started = _parse_time(upload.created_at)
            if started is not None and started <= cutoff:
                yield str(upload.key), str(upload.id), started

    def abort(self, key: str, upload_id: str) -> None:
        container = self.container()
        try:
            self._call(
                f"aborting the upload of {key!r}",
                lambda: self.driver._abort_multipart(container, key, upload_id),
            )
        except self.error as exc:
            if _status(exc.__cause__ or exc) != 404:
                raise

    def close(self) -> None:
        with self._lock:
            drivers = list(self._drivers.values())
            self._drivers.clear()
        for driver in drivers:
            connection = getattr(driver, "connection", None)
            session = getattr(getattr(connection, "connection", None), "session", None)
            if session is not None:
                session.close()


class _Parts:
    """``body`` in parts, as an iterator that starts again when sought to 0: requests sends
    it chunked (no length to find), and libcloud's Swift upload re-reads the stream it sent
    to compare its MD5 with the ETag Swift answers."""

    def __init__(self, body: bytes) -> None:
        self._body = memoryview(body)
        self._at = 0

    def __iter__(self) -> _Parts:
        return self

    def __next__(self) -> bytes:
        if self._at >= len(self._body):
            raise StopIteration
        part = bytes(self._body[self._at : self._at + PART])
        self._at += len(part)
        return part

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0):
            raise OSError("only a rewind to the start")
        self._at = 0
        return 0


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _modified(obj: Object) -> datetime:
    extra = obj.extra or {}
    text = extra.get("last_modified")
    if isinstance(text, str):
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            try:
                when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return datetime.now(UTC)
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return datetime.now(UTC)
