"""One container of an object store through apache-libcloud's storage driver: what the
Vault and the Transit share (the only module with the vault's and inbox's requests).

Every object request is sent through the driver's own signed connection, and its answer's
status is checked here, not by libcloud (whose S3 and Azure drivers take a HEAD answered 400
for "no such object" and a DELETE answered 409 for done):

- A put of up to ``single_put_limit`` bytes is one PUT: the object appears whole or not at
  all; its ObjectInfo comes from the PUT's answer. Larger ones are uploaded in parts that
  only the last request commits: S3's multipart upload (initiate, parts, complete; a
  complete answered 200 with an ``<Error>`` body is a TransientError; after a failed
  complete the key is looked at, size and ETag compared, before the put is declared failed;
  otherwise the upload is aborted, and an abort's failure is logged, never raised over the
  first error), Azure's Put Block and Put Block List with block ids unique to each upload
  (libcloud numbers them 1..n, so two uploads of one name would mix their blocks).
- An if-absent put is one PUT with ``If-None-Match: *``: 412 (S3, MinIO, Swift) or Azure's
  409 ``BlobAlreadyExists`` is ObjectExists; S3's 409 ``ConditionalRequestConflict`` (a
  racing write or delete won; the name may well be absent) is a TransientError. Before the
  first one, once per store and process, the store is shown to honour the header: a probe
  name under ``.regionvault/`` put twice if-absent must be refused the second time
  (UnsupportedOperation naming ``conditional_put`` otherwise), then deleted. A store
  configured ``conditional_put = false`` is refused if-absent puts outright.
- Ranged reads are GETs with a Range; 416 (at or past the end) is ``b''`` once a HEAD shows
  the object there, as the other providers' vaults answer; more bytes than asked is an error.
- A HEAD is ObjectNotFound only on 404; a DELETE must answer 2xx or 404. A read (GET, HEAD)
  answered 5xx is asked again twice at most; no write is.
- Listings are ``iterate_container_objects`` with a prefix (Azure: List Blobs of 5000 names
  a page), in the store's name order (UTF-8 byte order for S3, Azure and Swift).
- Swift (``openstack_swift``): every put is one PUT, atomic in Swift (a larger one streamed
  chunked through ``upload_object_via_stream``; no segments, so nothing is left to sweep, and
  nothing above Swift's 5 GiB).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError
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
from regionvault.core.types import ObjectInfo, Temporary

if TYPE_CHECKING:
    from regionvault.core.types import RegionConfig
    from regionvault.providers.libcloud.settings import LibcloudSettings

__all__ = ["Listed", "Store", "new_driver"]

_log = logging.getLogger(__name__)

#: parts of a streamed upload (S3 parts, Azure blocks)
PART = 8 * 1024 * 1024
#: the largest object Swift takes (its default max_file_size is 5 GiB + 2 bytes)
SWIFT_MOST = 5 * 1024 * 1024 * 1024
#: names a page of Azure's List Blobs (the most the API gives)
AZURE_PAGE = 5000
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: a read answered so is asked again after these pauses (seconds)
_READ_RETRY_STATUS = frozenset({500, 502, 503, 504})
_READ_RETRY_PAUSES = (0.05, 0.25)
#: the libcloud S3 driver's signing region when ``s3_region`` is one libcloud does not list
_KNOWN_S3_REGION = "us-east-1"


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
        from libcloud.storage.drivers.s3 import REGION_TO_HOST_MAP

        cls = get_driver(Drivers.S3)
        known = settings.s3_region in REGION_TO_HOST_MAP
        # libcloud refuses a region it does not list (a MinIO's or Ceph zonegroup's own);
        # with a host (settings check that there is one) it signs with the region it is told
        kwargs["region"] = settings.s3_region if known else _KNOWN_S3_REGION
        driver: Any = cls(key, secret, **kwargs)
        if not known:
            driver.region_name = settings.s3_region
        return driver
    return get_driver(Drivers.AZURE_BLOBS)(key, secret, **kwargs)


class _Refused(Exception):
    """A request's answer that is not a success."""

    def __init__(self, code: int, text: str, error_code: str | None = None) -> None:
        what = f"{error_code}: " if error_code else ""
        super().__init__(f"Status code: {code} {what}{text}".rstrip())
        self.code = code
        self.error_code = error_code


class _Answer(NamedTuple):
    """A request's answer: its status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes
    #: libcloud's text where the driver raised instead of answering (S3's 412, 5xx)
    text: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str | None:
        """The store's error code: Azure's ``x-ms-error-code``, S3's ``<Code>``."""
        code = self.headers.get("x-ms-error-code")
        if code:
            return code
        return _xml_text(self.body, "Code") if self.body.lstrip().startswith(b"<") else None


@dataclass(frozen=True)
class Listed:
    """One object of a listing: its key in the container and what the listing says of it."""

    key: str
    size: int
    etag: str | None
    modified: datetime


#: the stores whose if-absent puts were probed in this process: identity -> None (honoured)
#: or why not
_PROBED: dict[tuple[object, ...], str | None] = {}
_PROBE_LOCK = threading.Lock()

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


def _xml_text(body: bytes, tag: str) -> str | None:
    """The text of the first element named ``tag`` (any namespace) in ``body``."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag == tag or element.tag.endswith("}" + tag):
            return (element.text or "").strip()
    return None


def _etag(headers: dict[str, str]) -> str | None:
    return headers.get("etag", "").strip('"') or None


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class Store:
    """Container ``container`` of the store; errors are ``error`` (VaultError or
    TransitError) naming the provider and ``region``; ``reserved`` is where the store's own
    objects (the if-absent probe) go, a prefix no object name can have.

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
        reserved: str = ".regionvault/",
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
        self.reserved = reserved
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

    @property
    def _kind(self) -> str:
        return self.settings.libcloud_driver

    # ------------------------------------------------------------------ errors

    def _fail(self, what: str, exc: BaseException) -> RegionVaultError:
        status = _status(exc)
        text = f"{what} in {self.label} failed: {type(exc).__name__}: {exc}"
        if configuration_failure(exc):
            where = (
                "auth_url (and the endpoints keystone's catalog lists)"
                if self._kind == "openstack_swift"
                else "host, port and secure"
            )
            return self.error(
                f"{text} (a host without an address or a certificate refused: check {where} "
                "in site.toml)",
                provider="libcloud",
                region=self.region,
            )
        if isinstance(exc, InvalidCredsError) or status in (401, 403):
            return self.error(
                f"{what} in {self.label} was refused (credentials from "
                f"{self.settings.key_env}/{self.settings.secret_env}): {exc}",
                provider="libcloud",
                region=self.region,
            )
        if isinstance(exc, OSError) or (status is not None and status in _TRANSIENT_STATUS):
            return TransientError(text, provider="libcloud", region=self.region)
        return self.error(text, provider="libcloud", region=self.region)

    def _refused(self, what: str, answer: _Answer) -> RegionVaultError:
        text = answer.text or answer.body[:300].decode("utf-8", "replace")
        return self._fail(what, _Refused(answer.status, " ".join(text.split()), answer.error_code))

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

    def _exchange(
        self,
        what: str,
        path: str,
        *,
        method: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> _Answer:
        """One request through the driver's signed connection, and its answer whatever its
        status; no answer at all raises ``error`` (or TransientError) saying ``what``. A read
        (GET, HEAD) answered 500, 502, 503 or 504 is sent again, twice at most, shortly after,
        as the AWS and Azure SDKs do (S3 documents "please try again"); nothing else is, so
        an if-absent PUT whose answer was lost is never sent twice."""
        for pause in (*_READ_RETRY_PAUSES, None):
            answer = self._exchange_once(
                what, path, method=method, params=params, headers=headers, data=data
            )
            if pause is None or method not in ("GET", "HEAD"):
                return answer
            if answer.status not in _READ_RETRY_STATUS:
                return answer
            _log.info("%s in %s: answered %d, asking again", what, self.label, answer.status)
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _exchange_once(
        self,
        what: str,
        path: str,
        *,
        method: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> _Answer:
        """One request through the driver's signed connection, and its answer whatever its
        status; no answer at all raises ``error`` (or TransientError) saying ``what``."""
        try:
            extra: dict[str, Any] = {}
            if self._kind != "openstack_swift":  # its connection takes no stream (nor needs it)
                extra["stream"] = method == "GET"
            response = self.driver.connection.request(
                path, method=method, params=params, headers=headers, data=data, raw=True, **extra
            )
            status = int(response.status)
            answered = {str(k).lower(): str(v) for k, v in dict(response.headers).items()}
            body = b"" if method == "HEAD" else b"".join(response.iter_content(PART))
            return _Answer(status, answered, body)
        except InvalidCredsError as exc:
            raise self._fail(what, exc) from exc
        except (LibcloudError, BaseHTTPError) as exc:
            # libcloud's S3 responses raise on a status they do not take (412, 416, 5xx)
            refused = _status(exc)
            if refused is None:
                raise self._fail(what, exc) from exc
            return _Answer(refused, {}, b"", text=str(getattr(exc, "value", "") or exc))
        except OSError as exc:
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

    def _path(self, key: str) -> str:
        return f"/{quote(self.name)}/{quote(key)}"

    def _info(self, name: str, size: int, headers: dict[str, str]) -> ObjectInfo:
        return ObjectInfo(
            name=name,
            size=size,
            modified=_parse_time(headers.get("last-modified")) or datetime.now(UTC),
            etag=_etag(headers),
        )

    # ------------------------------------------------------------------ objects

    def put(self, key: str, name: str, data: bytes | memoryview, *, if_absent: bool) -> ObjectInfo:
        body = bytes(data)
        if if_absent and not self.settings.conditional_put:
            raise UnsupportedOperation(
                f"an if-absent put ({self.label} is configured conditional_put = false)",
                provider="libcloud",
                region=self.region,
            )
        swift = self._kind == "openstack_swift"
        if swift and len(body) > SWIFT_MOST:
            raise self.error(
                f"putting {name!r} in {self.label}: {len(body)} bytes, over the {SWIFT_MOST} "
                "bytes Swift takes in one object (this provider makes no SLO/DLO segments)",
                provider="libcloud",
                region=self.region,
            )
        self.container()
        if if_absent:
            self._check_conditional_put()
        if len(body) > self.settings.single_put_limit and not if_absent:
            if self._kind == "s3":
                return self._multipart(key, name, body)
            if self._kind == "azure_blobs":
                return self._blocks(key, name, body)
            return self._swift_streamed(key, name, body)
        what = f"putting {name!r}"
        answer = self._exchange(
            what,
            self._path(key),
            method="PUT",
            data=body,
            headers=self._put_headers(body, if_absent),
        )
        if answer.ok:
            return self._info(name, len(body), answer.headers)
        if if_absent:
            if self._taken(answer):
                raise ObjectExists(name, provider="libcloud", region=self.region)
            if answer.status == 409 and self._kind == "s3":
                raise TransientError(
                    f"{what} in {self.label}: 409 {answer.error_code or 'Conflict'} (a "
                    "concurrent write or delete of the name won; it may be absent: put again)",
                    provider="libcloud",
                    region=self.region,
                )
        raise self._refused(what, answer)

    def _put_headers(self, body: bytes, if_absent: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream"}
        if body:
            # signed as sent (Azure's shared key signs an empty body's length as '')
            headers["Content-Length"] = str(len(body))
        if self._kind == "azure_blobs":
            headers["x-ms-blob-type"] = "BlockBlob"
        if self._kind == "openstack_swift":
            # Swift refuses (422) a body whose MD5 is not this: nothing altered on the way lands
            headers["ETag"] = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if if_absent:
            headers["If-None-Match"] = "*"
        return headers

    def _taken(self, answer: _Answer) -> bool:
        """Whether an if-absent PUT's answer says the name is taken: 412 (S3, MinIO, Swift),
        Azure's 409 BlobAlreadyExists (its 409 ContainerBeingDeleted, LeaseIdMissing, ...
        are something else)."""
        if answer.status == 412:
            return True
        return (
            self._kind == "azure_blobs"
            and answer.status == 409
            and answer.error_code == "BlobAlreadyExists"
        )

    # ------------------------------------------------------------------ the if-absent probe

    def _identity(self) -> tuple[object, ...]:
        s = self.settings
        return (s.libcloud_driver, s.host, s.port, s.secure, s.s3_region, s.auth_url,
                s.project, s.service_region, self.name)  # fmt: skip

    def _check_conditional_put(self) -> None:
        """Raise UnsupportedOperation unless this store refuses a second if-absent PUT of a
        name (probed once per store in this process, before its first if-absent put)."""
        identity = self._identity()
        with _PROBE_LOCK:
            if identity not in _PROBED:
                _PROBED[identity] = self._probe()
            why = _PROBED[identity]
        if why is not None:
            raise UnsupportedOperation(
                f"an if-absent put ({self.label} is configured conditional_put = true, but "
                f"{why}: it does not honour If-None-Match: *; set conditional_put = false, or "
                "use a store release that honours it)",
                provider="libcloud",
                region=self.region,
            )

    def _probe(self) -> str | None:
        """Put a probe name twice if-absent, then delete it: None when the second was
        refused, else what the store answered. A failed request raises (nothing cached)."""
        key = f"{self.reserved}probe-{uuid.uuid4().hex}"
        what = "probing if-absent puts"
        headers = self._put_headers(b"probe", True)
        first = self._exchange(what, self._path(key), method="PUT", data=b"probe", headers=headers)
        if not first.ok:
            raise self._refused(what, first)
        try:
            second = self._exchange(
                what, self._path(key), method="PUT", data=b"probe", headers=headers
            )
        finally:
            self._delete_quietly(key)
        if second.ok:
            return f"it answered {second.status} to a second PUT of {key!r} with If-None-Match: *"
        if self._taken(second):
            return None
        raise self._refused(what, second)

    def _delete_quietly(self, key: str) -> None:
        try:
            answer = self._exchange("deleting", self._path(key), method="DELETE")
            if not (answer.ok or answer.status == 404):
                raise self._refused(f"deleting {key!r}", answer)
        except RegionVaultError as exc:
            _log.warning("%s in %s: %s (left behind, harmless)", key, self.label, exc)

    # ------------------------------------------------------------------ streamed puts

    def _multipart(self, key: str, name: str, body: bytes) -> ObjectInfo:
        """S3's multipart upload of ``body`` (initiate, parts, complete)."""
        what = f"uploading {name!r}"
        path = self._path(key)
        started = self._exchange(
            f"{what} (initiating)", path, method="POST", params={"uploads": ""}
        )
        upload_id = _xml_text(started.body, "UploadId") if started.ok else None
        if not upload_id:
            raise self._refused(f"{what} (initiating)", started)
        try:
            listed = []
            digests = []
            for number, at in enumerate(range(0, len(body), PART), 1):
                part = body[at : at + PART]
                digests.append(hashlib.md5(part, usedforsecurity=False).digest())
                answer = self._exchange(
                    f"{what} (part {number})",
                    path,
                    method="PUT",
                    params={"partNumber": str(number), "uploadId": upload_id},
                    data=part,
                    headers={"Content-Length": str(len(part)), "Content-MD5": _md5_b64(part)},
                )
                if answer.status != 200 or not answer.headers.get("etag"):
                    raise self._refused(f"{what} (part {number})", answer)
                listed.append(
                    f"<Part><PartNumber>{number}</PartNumber>"
                    f"<ETag>{answer.headers['etag']}</ETag></Part>"
                )
            etag = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
            expected = f"{etag}-{len(digests)}"
            document = (
                "<CompleteMultipartUpload>" + "".join(listed) + "</CompleteMultipartUpload>"
            ).encode()
            try:
                done = self._exchange(
                    f"{what} (completing)",
                    path,
                    method="POST",
                    params={"uploadId": upload_id},
                    data=document,
                    headers={"Content-Length": str(len(document))},
                )
                return self._completed(what, name, len(body), done)
            except RegionVaultError:
                landed = self._landed(key, name, len(body), etag=expected)
                if landed is not None:
                    return landed
                raise
        except BaseException as exc:
            self._abort_quietly(key, upload_id, exc)
            raise

    def _completed(self, what: str, name: str, size: int, answer: _Answer) -> ObjectInfo:
        if not answer.ok:
            raise self._refused(f"{what} (completing)", answer)
        try:
            root = ElementTree.fromstring(answer.body)
        except ElementTree.ParseError:
            root = ElementTree.Element("Unparsed")
        etag = None
        if root.tag.rpartition("}")[2] == "CompleteMultipartUploadResult":
            etag = next((e.text for e in root if e.tag.rpartition("}")[2] == "ETag"), None)
        if not etag:
            # S3 documents a 200 whose body is an <Error>: the upload is not complete
            message = _xml_text(answer.body, "Message") or answer.body[:200].decode(
                "utf-8", "replace"
            )
            raise TransientError(
                f"{what} (completing) in {self.label}: answered {answer.status} with "
                f"{answer.error_code or 'no CompleteMultipartUploadResult'}: {message}",
                provider="libcloud",
                region=self.region,
            )
        return ObjectInfo(
            name=name, size=size, modified=datetime.now(UTC), etag=etag.strip().strip('"')
        )

    def _landed(
        self, key: str, name: str, size: int, *, etag: str | None = None, md5: str | None = None
    ) -> ObjectInfo | None:
        """The object at ``key`` if it is the upload that failed to hear its commit answered
        (its size, and its ETag or Content-MD5, are the upload's), else None."""
        try:
            answer = self._exchange(f"looking up {name!r}", self._path(key), method="HEAD")
        except RegionVaultError as exc:
            _log.warning("after a failed commit, %s in %s: %s", name, self.label, exc)
            return None
        if answer.status != 200 or answer.headers.get("content-length") != str(size):
            return None
        if etag is not None and _etag(answer.headers) != etag:
            return None
        if md5 is not None and answer.headers.get("content-md5") != md5:
            return None
        return self._info(name, size, answer.headers)

    def _abort_quietly(self, key: str, upload_id: str, cause: BaseException) -> None:
        try:
            self.abort(key, upload_id)
        except Exception as exc:
            _log.warning(
                "aborting the upload of %s in %s after %s: %s (left for the sweep)",
                key, self.label, type(cause).__name__, exc,
            )  # fmt: skip

    def _blocks(self, key: str, name: str, body: bytes) -> ObjectInfo:
        """Azure's Put Block of each part under block ids of this upload only (fixed length,
        as Azure requires of one blob's ids), then one Put Block List."""
        what = f"uploading {name!r}"
        path = self._path(key)
        upload = uuid.uuid4().hex
        ids = []
        for number, at in enumerate(range(0, len(body), PART), 1):
            part = body[at : at + PART]
            block_id = base64.b64encode(f"{upload}-{number:06d}".encode()).decode()
            answer = self._exchange(
                f"{what} (block {number})",
                path,
                method="PUT",
                params={"comp": "block", "blockid": block_id},
                data=part,
                headers={"Content-Length": str(len(part)), "Content-MD5": _md5_b64(part)},
            )
            if answer.status != 201:
                raise self._refused(f"{what} (block {number})", answer)
            ids.append(f"<Uncommitted>{block_id}</Uncommitted>")
        document = ('<?xml version="1.0" encoding="utf-8"?><BlockList>' + "".join(ids)
                    + "</BlockList>").encode()  # fmt: skip
        md5 = _md5_b64(body)
        try:
            done = self._exchange(
                f"{what} (committing)",
                path,
                method="PUT",
                params={"comp": "blocklist"},
                data=document,
                headers={
                    "Content-Length": str(len(document)),
                    "x-ms-blob-content-type": "application/octet-stream",
                    "x-ms-blob-content-md5": md5,
                },
            )
            if done.status == 201:
                return self._info(name, len(body), done.headers)
            if done.status == 400 and done.error_code == "InvalidBlockList":
                # another upload of the name committed first, which dropped these blocks
                raise TransientError(
                    f"{what} (committing) in {self.label}: 400 InvalidBlockList (another "
                    "upload of the name committed first: put again)",
                    provider="libcloud",
                    region=self.region,
                )
            raise self._refused(f"{what} (committing)", done)
        except RegionVaultError:
            landed = self._landed(key, name, len(body), md5=md5)
            if landed is not None:
                return landed
            raise

    def _swift_streamed(self, key: str, name: str, body: bytes) -> ObjectInfo:
        # one chunked PUT; libcloud then hashes the stream it sent again to check the ETag
        container = self.container()
        obj = self._call(
            f"uploading {name!r}",
            lambda: self.driver.upload_object_via_stream(_Parts(body), container, key),
        )
        etag = str(getattr(obj, "hash", "") or "").strip('"') or None
        return ObjectInfo(name=name, size=len(body), modified=datetime.now(UTC), etag=etag)

    # ------------------------------------------------------------------ reads

    def get(self, key: str, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            self.head(key, name)
            return b""
        self.container()
        headers = {}
        ranged = bool(offset) or length is not None
        if ranged:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        what = f"reading {name!r}"
        answer = self._exchange(what, self._path(key), method="GET", headers=headers)
        if answer.status == 404:
            raise ObjectNotFound(name, provider="libcloud", region=self.region)
        if answer.status == 416 and ranged:
            # at or past the end: nothing there, if the object is
            self.head(key, name)
            return b""
        if answer.status == 206 and ranged:
            data = answer.body
        elif answer.status == 200:
            # the whole object (some stores answer a range so)
            end = None if length is None else offset + length
            data = answer.body[offset:end] if ranged else answer.body
        else:
            raise self._refused(what, answer)
        if length is not None and len(data) > length:
            raise self.error(
                f"{what} in {self.label}: {len(data)} bytes answered for a range of {length}",
                provider="libcloud",
                region=self.region,
            )
        return data

    def head(self, key: str, name: str) -> ObjectInfo:
        self.container()
        what = f"looking up {name!r}"
        answer = self._exchange(what, self._path(key), method="HEAD")
        if answer.status == 404:
            raise ObjectNotFound(name, provider="libcloud", region=self.region)
        if not answer.ok:
            raise self._refused(what, answer)
        try:
            size = int(answer.headers["content-length"])
        except (KeyError, ValueError):
            raise self.error(
                f"{what} in {self.label}: the answer has no Content-Length",
                provider="libcloud",
                region=self.region,
            ) from None
        return self._info(name, size, answer.headers)

    def list(self, prefix: str) -> Iterator[Listed]:
        if self._kind == "azure_blobs":
            yield from self._azure_list(prefix, uncommitted=False)
            return
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
            yield Listed(
                key=str(obj.name),
                size=int(obj.size),
                etag=str(obj.hash).strip('"') if obj.hash else None,
                modified=_modified(obj.extra or {}),
            )

    def _azure_list(self, prefix: str, *, uncommitted: bool) -> Iterator[Listed]:
        """Azure's List Blobs, 5000 names a page (libcloud asks for 100); with
        ``uncommitted``, blobs that have uncommitted blocks only are listed too."""
        self.container()
        params = {"restype": "container", "comp": "list", "maxresults": str(AZURE_PAGE)}
        if prefix:
            params["prefix"] = prefix
        if uncommitted:
            params["include"] = "uncommittedblobs"
        while True:
            answer = self._exchange("listing", f"/{quote(self.name)}", method="GET", params=params)
            if not answer.ok:
                raise self._refused("listing", answer)
            try:
                root = ElementTree.fromstring(answer.body)
            except ElementTree.ParseError as exc:
                raise self._fail("listing", exc) from exc
            for blob in root.iter("Blob"):
                props = blob.find("Properties")
                if props is None:
                    props = ElementTree.Element("Properties")
                yield Listed(
                    key=blob.findtext("Name") or "",
                    size=int(props.findtext("Content-Length") or 0),
                    etag=(props.findtext("Etag") or "").strip('"') or None,
                    modified=_parse_time(props.findtext("Last-Modified")) or datetime.now(UTC),
                )
            marker = root.findtext("NextMarker")
            if not marker:
                return
            params["marker"] = marker

    def delete(self, key: str, name: str) -> None:
        self.container()
        what = f"deleting {name!r}"
        answer = self._exchange(what, self._path(key), method="DELETE")
        if not (answer.ok or answer.status == 404):
            raise self._refused(what, answer)

    # ------------------------------------------------------------------ leftovers

    def unfinished(self, prefix: str, older_than: timedelta) -> Iterator[tuple[str, str, datetime]]:
        """(key, upload id, started) of what killed streamed uploads under ``prefix`` left,
        last written more than ``older_than`` ago: S3's multipart uploads; Azure's blobs that
        have uncommitted blocks only (upload id ""; a committed blob's uncommitted blocks,
        from a killed re-upload of its name, are not listable apart and expire after a
        week); on Swift none."""
        cutoff = datetime.now(UTC) - older_than
        if self._kind == "azure_blobs":
            committed = {listed.key for listed in self._azure_list(prefix, uncommitted=False)}
            for listed in self._azure_list(prefix, uncommitted=True):
                if listed.key not in committed and listed.modified <= cutoff:
                    yield listed.key, "", listed.modified
            return
        if self._kind != "s3":
            return
        container = self.container()
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

    def temporaries(self, prefix: str, older_than: timedelta) -> Iterator[Temporary]:
        """:meth:`unfinished` under ``prefix`` as the Vault's and the Transit's temporaries,
        named without the prefix."""
        cut = len(prefix)
        for key, upload_id, started in self.unfinished(prefix, older_than):
            what = "a multipart upload started" if upload_id else "uncommitted blocks written"
            yield Temporary(
                handle=json.dumps([key, upload_id]),
                name=key[cut:],
                size=None,
                modified=started,
                reason=f"{what} over {older_than} ago, never completed",
            )

    def remove_temporary(self, temporary: Temporary) -> None:
        key, upload_id = json.loads(temporary.handle)
        self.abort(str(key), str(upload_id))

    def abort(self, key: str, upload_id: str) -> None:
        """Drop what :meth:`unfinished` listed (gone already is not an error). Azure has no
        call for uncommitted blocks: an empty block list is committed if-absent (which drops
        them, and never touches a blob committed since), and that empty blob deleted by its
        ETag."""
        self.container()
        what = f"aborting the upload of {key!r}"
        if self._kind == "azure_blobs":
            document = b'<?xml version="1.0" encoding="utf-8"?><BlockList></BlockList>'
            made = self._exchange(
                what,
                self._path(key),
                method="PUT",
                params={"comp": "blocklist"},
                data=document,
                headers={"Content-Length": str(len(document)), "If-None-Match": "*"},
            )
            if made.status in (409, 412):
                return  # a blob was committed there since, which dropped the blocks
            etag = made.headers.get("etag")
            if made.status != 201 or not etag:
                raise self._refused(what, made)
            gone = self._exchange(
                what, self._path(key), method="DELETE", headers={"If-Match": etag}
            )
            if not (gone.ok or gone.status in (404, 412)):
                raise self._refused(what, gone)
            return
        answer = self._exchange(
            what, self._path(key), method="DELETE", params={"uploadId": upload_id}
        )
        if not (answer.ok or answer.status == 404):
            raise self._refused(what, answer)

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
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _modified(extra: dict[str, Any]) -> datetime:
    return _parse_time(extra.get("last_modified")) or datetime.now(UTC)
