"""A wire-level fake of OpenStack Swift's object-store API (v1), served by the OpenStack fake
(:mod:`regionvault.providers.openstack.fakes.cloud`) at ``/object-store/v1/AUTH_<project_id>``
and listed in its keystone catalog as the ``object-store`` service ``swift``.

What it answers, as Swift's proxy does (swift/proxy/controllers, swift/obj/server.py,
swift/common/constraints.py):

- Every request needs a token keystone issued in ``X-Auth-Token``: 401 otherwise.
- Containers: ``PUT`` (201, or 202 when it exists), ``HEAD`` (204 with
  ``X-Container-Object-Count`` and ``X-Container-Bytes-Used``), ``GET`` (the listing, JSON with
  ``format=json`` else one name a line; ``prefix``, ``marker``, ``end_marker``, ``limit`` of at
  most :attr:`SwiftFake.page_limit`, Swift's ``container_listing_limit`` of 10000, 412 above
  it; names in UTF-8 byte order), ``DELETE`` (204; 409 while it holds objects). The account
  ``GET`` lists containers.
- Objects: ``PUT`` with ``Content-Length`` or a chunked body (411 with neither): the bytes go
  to a temporary file and become the object only when the body is complete, so an upload cut
  short leaves nothing; 201 with ``ETag`` = the body's MD5 hex (422 when a sent ``ETag``
  differs); above ``max_file_size`` (5 GiB + 2 bytes, Swift's default) 413.
  ``If-None-Match: *`` is 412 when the name exists *when the request arrives* (the object
  server's ``_pre_create_checks``); any other value is 400 ("If-None-Match only supports
  *"). As in Swift, two PUTs in flight at once are both checked before either lands: both
  succeed, and the one that arrived later (the newer X-Timestamp) is the object.
  ``GET`` (``Range: bytes=a-b``, ``a-``, ``-n``: 206 with ``Content-Range``; 416 when the range
  starts past the end; a malformed Range is ignored, 200), ``HEAD`` (``Content-Length``,
  ``ETag``, ``Last-Modified``, ``X-Timestamp``), ``DELETE`` (204; 404 when missing).

Test hooks, not on the wire: :meth:`SwiftFake.fail_next` (an HTTP error for the next request
of a method whose path matches), :meth:`SwiftFake.cut_next_put` (close the connection once a
matching PUT's body has brought that many bytes), :meth:`SwiftFake.hold_next_put` (park a
matching PUT after its checks until an event is set), :attr:`SwiftFake.counts`,
:attr:`SwiftFake.page_limit`, :meth:`SwiftFake.object_names`, :meth:`SwiftFake.temporaries`.
Bytes are files under ``workdir`` (``objects/``, ``tmp/``); names and metadata are in memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import BinaryIO

__all__ = ["MAX_FILE_SIZE", "SwiftFake"]

#: Swift's default max_file_size (swift/common/constraints.py): 5 GiB + 2 bytes
MAX_FILE_SIZE = 5 * 1024 * 1024 * 1024 + 2
MAX_OBJECT_NAME = 1024
MAX_CONTAINER_NAME = 256
_BLOCK = 64 * 1024


class _Answer(Exception):
    def __init__(
        self,
        status: int,
        text: str = "",
        headers: dict[str, str] | None = None,
        *,
        body_read: bool = False,
    ) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}
        #: the request's body was read (or given up on) before this answer
        self.body_read = body_read


class _Cut(Exception):
    """The request's connection ended (or the fake cut it) before its body did."""


@dataclass
class _Object:
    path: Path
    size: int
    etag: str
    timestamp: float
    content_type: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class _Hook:
    method: str
    pattern: re.Pattern[str]
    status: int = 0
    message: str = ""
    after: int = 0
    event: threading.Event | None = None


def _http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


class SwiftFake:
    """One Swift account. ``token_ok`` says whether a token is one keystone issued."""

    def __init__(self, workdir: str | Path, *, token_ok: Callable[[str], bool]) -> None:
        self.workdir = Path(workdir)
        self._token_ok = token_ok
        #: container_listing_limit: the most names one listing answers
        self.page_limit = 10000
        self.max_file_size = MAX_FILE_SIZE
        #: requests per "METHOD account|container|object"
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._containers: dict[str, dict[str, _Object]] = {}
        self._failures: list[_Hook] = []
        self._cuts: list[_Hook] = []
        self._holds: list[_Hook] = []
        self._last_timestamp = 0.0
        for sub in ("objects", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- test hooks ----------------------------------------------------------------------------

    def fail_next(self, method: str, pattern: str, status: int, message: str = "") -> None:
        """The next ``method`` request whose path (below the account) matches ``pattern`` is
        answered ``status`` (its body unread: the connection is closed after)."""
        with self._lock:
            self._failures.append(_Hook(method, re.compile(pattern), status, message))

    def cut_next_put(self, pattern: str, after: int) -> None:
        """The next object PUT matching ``pattern`` has its connection closed once ``after``
        bytes of its body have arrived, as a network cut or a killed proxy."""
        with self._lock:
            self._cuts.append(_Hook("PUT", re.compile(pattern), after=after))

    def hold_next_put(self, pattern: str) -> threading.Event:
        """The next object PUT matching ``pattern`` waits, once its preconditions are checked
        and before its body is read, until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._holds.append(_Hook("PUT", re.compile(pattern), event=event))
        return event

    def object_names(self, container: str) -> list[str]:
        with self._lock:
            return sorted(self._containers.get(container, {}), key=lambda n: n.encode())

    def temporaries(self) -> list[Path]:
        """Bodies being received (none once every upload ended, whole or cut)."""
        return sorted((self.workdir / "tmp").iterdir())

    # -- serving -------------------------------------------------------------------------------

    def serve(self, handler: BaseHTTPRequestHandler, rest: str) -> None:
        """Answer ``handler``'s request; ``rest`` is its path below ``/v1/AUTH_<project>``."""
        method = handler.command
        parsed = urllib.parse.urlsplit(rest)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        parts = parsed.path.lstrip("/").split("/", 1)
        container = urllib.parse.unquote(parts[0]) if parts[0] else ""
        name = urllib.parse.unquote(parts[1]) if len(parts) > 1 and parts[1] else ""
        kind = "object" if name else "container" if container else "account"
        headers = {k.lower(): v for k, v in handler.headers.items()}
        body_pending = method in ("PUT", "POST")
        try:
            with self._lock:
                self.counts[f"{method} {kind}"] += 1
                for hook in self._failures:
                    if hook.method == method and hook.pattern.search(parsed.path):
                        self._failures.remove(hook)
                        raise _Answer(hook.status, hook.message or f"injected {hook.status}")
            if not self._token_ok(headers.get("x-auth-token", "")):
                raise _Answer(401, "<html><h1>Unauthorized</h1><p>This server could not verify "
                              "that you are authorized to access the document you requested."
                              "</p></html>")  # fmt: skip
            if kind == "object":
                status, out, data, file = self._object(handler, method, container, name, headers)
                body_pending = False
            elif kind == "container":
                status, out, data = self._container(method, container, query)
                file = None
            else:
                status, out, data = self._account(method, query)
                file = None
        except _Cut:
            handler.close_connection = True
            return
        except _Answer as answer:
            status, out, data, file = (
                answer.status,
                dict(answer.headers),
                answer.text.encode(),
                None,
            )
            out.setdefault("Content-Type", "text/html; charset=UTF-8")
            if body_pending and not answer.body_read and not _drain(handler, headers):
                out["Connection"] = "close"
            if out.get("Connection") == "close":
                handler.close_connection = True
        self._send(handler, status, out, data, file)

    def _send(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        data: bytes,
        file: tuple[BinaryIO, int, int] | None,
    ) -> None:
        handler.send_response(status)
        headers.setdefault("X-Trans-Id", f"tx{uuid.uuid4().hex[:21]}-{int(time.time()):010x}")
        headers.setdefault("Date", _http_date(time.time()))
        if "Content-Length" not in headers:
            headers["Content-Length"] = str(file[2] if file else len(data))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if file is None:
            handler.wfile.write(data)
            return
        reader, start, length = file
        with reader as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(_BLOCK, length))
                if not chunk:
                    break
                handler.wfile.write(chunk)
                length -= len(chunk)

    # -- account and containers ----------------------------------------------------------------

    def _account(self, method: str, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if method not in ("GET", "HEAD"):
            raise _Answer(405, "Method Not Allowed")
        with self._lock:
            rows = [
                {"name": c, "count": len(objs), "bytes": sum(o.size for o in objs.values())}
                for c, objs in sorted(self._containers.items(), key=lambda i: i[0].encode())
            ]
        rows = self._page(rows, query)
        return self._listing(rows, query)

    def _container(
        self, method: str, container: str, query: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if len(container.encode()) > MAX_CONTAINER_NAME:
            raise _Answer(400, f"Container name length of {len(container)} longer than 256")
        with self._lock:
            objects = self._containers.get(container)
            if method == "PUT":
                if objects is not None:
                    return 202, {}, b""
                self._containers[container] = {}
                return 201, {}, b""
            if objects is None:
                raise _Answer(404, "<html><h1>Not Found</h1></html>")
            if method == "DELETE":
                if objects:
                    raise _Answer(409, "<html><h1>Conflict</h1><p>There was a conflict when "
                                  "trying to complete your request.</p></html>")  # fmt: skip
                del self._containers[container]
                return 204, {}, b""
            count, used = len(objects), sum(o.size for o in objects.values())
            if method == "HEAD":
                return 204, self._container_headers(count, used), b""
            if method != "GET":
                raise _Answer(405, "Method Not Allowed")
            rows = [
                {
                    "name": n,
                    "hash": o.etag,
                    "bytes": o.size,
                    "content_type": o.content_type,
                    "last_modified": dt.datetime.fromtimestamp(o.timestamp, dt.UTC)
                    .replace(tzinfo=None)
                    .isoformat(timespec="microseconds"),
                }
                for n, o in objects.items()
            ]
        rows.sort(key=lambda r: str(r["name"]).encode())
        rows = self._page(rows, query)
        status, headers, data = self._listing(rows, query)
        headers.update(self._container_headers(count, used))
        return status, headers, data

    @staticmethod
    def _container_headers(count: int, used: int) -> dict[str, str]:
        return {
            "X-Container-Object-Count": str(count),
            "X-Container-Bytes-Used": str(used),
            "Accept-Ranges": "bytes",
        }

    def _page(
        self, rows: list[dict[str, object]], query: dict[str, str]
    ) -> list[dict[str, object]]:
        limit = self.page_limit
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                raise _Answer(412, "Value of limit must be a positive integer") from None
            if limit < 0:
                raise _Answer(412, "Value of limit must be a positive integer")
            if limit > self.page_limit:
                raise _Answer(412, f"Maximum limit is {self.page_limit}")
        prefix = query.get("prefix", "")
        marker = query.get("marker", "").encode()
        end = query.get("end_marker", "").encode()
        out = []
        for row in rows:
            key = str(row["name"]).encode()
            if not str(row["name"]).startswith(prefix) or (marker and key <= marker):
                continue
            if end and key >= end:
                break
            out.append(row)
            if len(out) >= limit:
                break
        return out

    @staticmethod
    def _listing(
        rows: list[dict[str, object]], query: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if query.get("format") == "json":
            return (
                200,
                {"Content-Type": "application/json; charset=utf-8"},
                json.dumps(rows).encode(),
            )
        if not rows:
            return 204, {"Content-Type": "text/plain; charset=utf-8"}, b""
        text = "".join(f"{r['name']}\n" for r in rows)
        return 200, {"Content-Type": "text/plain; charset=utf-8"}, text.encode()

    # -- objects -------------------------------------------------------------------------------

    def _object(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        container: str,
        name: str,
        headers: dict[str, str],
    ) -> tuple[int, dict[str, str], bytes, tuple[BinaryIO, int, int] | None]:
        if len(name.encode()) > MAX_OBJECT_NAME:
            raise _Answer(400, f"Object name length of {len(name)} longer than 1024")
        if method == "PUT":
            status, out = self._put(handler, container, name, headers)
            return status, out, b"", None
        with self._lock:
            objects = self._containers.get(container)
            found = None if objects is None else objects.get(name)
            if found is None:
                raise _Answer(404, "<html><h1>Not Found</h1><p>The resource could not be found."
                              "</p></html>")  # fmt: skip
            if method == "DELETE":
                del objects[name]  # type: ignore[union-attr]
                found.path.unlink(missing_ok=True)
                return 204, {}, b"", None
            if method not in ("GET", "HEAD"):
                raise _Answer(405, "Method Not Allowed")
            # opened while the object is the one found: a PUT or DELETE of the name meanwhile
            # replaces or unlinks the file, and this read goes on from the old one, whole
            # (as Swift's object server serves an open file)
            reader = found.path.open("rb") if method == "GET" else None
        out = {
            "Content-Type": found.content_type,
            "ETag": found.etag,
            "Last-Modified": _http_date(float(int(found.timestamp) + 1)),
            "X-Timestamp": f"{found.timestamp:016.5f}",
            "Accept-Ranges": "bytes",
            **{f"X-Object-Meta-{k}": v for k, v in found.meta.items()},
        }
        size = found.size
        try:
            span = _range(headers.get("range"), size) if method == "GET" else None
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        if reader is None:  # HEAD: the object's length, no body
            out["Content-Length"] = str(size)
            return 200, out, b"", None
        if span is None:
            return 200, out, b"", (reader, 0, size)
        start, end = span
        out["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, out, b"", (reader, start, end - start + 1)

    def _put(
        self,
        handler: BaseHTTPRequestHandler,
        container: str,
        name: str,
        headers: dict[str, str],
    ) -> tuple[int, dict[str, str]]:
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise _Answer(400, "If-None-Match only supports *")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if "transfer-encoding" in headers and not chunked:
            raise _Answer(501, "Not Implemented")
        if not chunked and "content-length" not in headers:
            raise _Answer(411, "Length Required")
        length = None if chunked else int(headers["content-length"])
        if length is not None and length > self.max_file_size:
            raise _Answer(413, "Your request is too large.")
        path = "/" + urllib.parse.quote(container) + "/" + urllib.parse.quote(name)
        with self._lock:
            if container not in self._containers:
                raise _Answer(404, "<html><h1>Not Found</h1></html>")
            if if_none_match is not None and name in self._containers[container]:
                raise _Answer(412, "<html><h1>Precondition Failed</h1></html>")
            # the proxy stamps the request when it arrives: the newer stamp wins
            timestamp = max(time.time(), self._last_timestamp + 0.00001)
            self._last_timestamp = timestamp
            cut = self._take(self._cuts, path)
            hold = self._take(self._holds, path)
        if hold is not None and hold.event is not None:
            hold.event.wait(60)
        tmp = self.workdir / "tmp" / uuid.uuid4().hex
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            size = self._receive(handler, tmp, md5, length, cut)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        etag = md5.hexdigest()
        sent = headers.get("etag", "").strip('"')
        if sent and sent.lower() != etag:
            tmp.unlink()
            raise _Answer(422, "<html><h1>Unprocessable Entity</h1></html>", body_read=True)
        final = self.workdir / "objects" / uuid.uuid4().hex
        tmp.replace(final)
        meta = {k[len("x-object-meta-") :]: v for k, v in headers.items()
                if k.startswith("x-object-meta-")}  # fmt: skip
        made = _Object(
            final, size, etag, timestamp, headers.get("content-type") or "application/octet-stream",
            meta,
        )  # fmt: skip
        with self._lock:
            objects = self._containers.get(container)
            if objects is None:
                final.unlink()
                raise _Answer(404, "<html><h1>Not Found</h1></html>", body_read=True)
            old = objects.get(name)
            if old is not None and old.timestamp > timestamp:
                final.unlink()  # a newer PUT landed meanwhile: it stays the object
            else:
                objects[name] = made
                if old is not None:
                    old.path.unlink(missing_ok=True)
        return 201, {
            "ETag": etag,
            "Last-Modified": _http_date(float(int(timestamp) + 1)),
            "Content-Type": "text/html; charset=UTF-8",
        }

    @staticmethod
    def _take(hooks: list[_Hook], path: str) -> _Hook | None:
        for hook in hooks:
            if hook.pattern.search(path):
                hooks.remove(hook)
                return hook
        return None

    def _receive(
        self,
        handler: BaseHTTPRequestHandler,
        tmp: Path,
        md5: hashlib._Hash,
        length: int | None,
        cut: _Hook | None,
    ) -> int:
        got = 0

        def take(data: bytes, out: object) -> None:
            nonlocal got
            if cut is not None and got + len(data) >= cut.after:
                data = data[: max(0, cut.after - got)]
                out.write(data)  # type: ignore[attr-defined]
                handler.connection.shutdown(socket.SHUT_RDWR)
                raise _Cut
            got += len(data)
            if got > self.max_file_size:
                raise _Answer(
                    413, "Your request is too large.", {"Connection": "close"}, body_read=True
                )
            md5.update(data)
            out.write(data)  # type: ignore[attr-defined]

        rfile = handler.rfile
        with tmp.open("wb") as out:
            if length is not None:
                left = length
                while left > 0:
                    data = rfile.read(min(_BLOCK, left))
                    if not data:
                        raise _Cut
                    take(data, out)
                    left -= len(data)
                return got
            while True:
                line = rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise _Cut
                try:
                    size = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    raise _Answer(
                        400, "Bad chunk", {"Connection": "close"}, body_read=True
                    ) from None
                if size == 0:
                    while True:
                        trailer = rfile.readline(1024)
                        if not trailer:
                            raise _Cut
                        if trailer in (b"\r\n", b"\n"):
                            return got
                while size > 0:
                    data = rfile.read(min(_BLOCK, size))
                    if not data:
                        raise _Cut
                    take(data, out)
                    size -= len(data)
                if rfile.readline(16) not in (b"\r\n", b"\n"):
                    raise _Cut


def _drain(handler: BaseHTTPRequestHandler, headers: dict[str, str]) -> bool:
    """Read and drop an unread body of up to 16 MiB sent with Content-Length, so that the
    client reads the answer and the connection stays usable; False when it is not."""
    try:
        left = int(headers.get("content-length", ""))
    except ValueError:
        return False
    if "transfer-encoding" in headers or not 0 <= left <= 16 * 1024 * 1024:
        return False
    while left > 0:
        data = handler.rfile.read(min(_BLOCK, left))
        if not data:
            return False
        left -= len(data)
    return True


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a satisfiable single ``Range``; None to answer the whole object
    (no header, or one Swift ignores as malformed); 416 when it starts past the end."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or (not match[1] and not match[2]):
        return None
    if match[1]:
        start = int(match[1])
        end = int(match[2]) if match[2] else size - 1
        if match[2] and end < start:
            return None
    else:
        start, end = max(0, size - int(match[2])), size - 1
        if int(match[2]) == 0:
            start = size
    if start >= size:
        raise _Answer(
            416, "<html><h1>Requested Range Not Satisfiable</h1></html>",
            {"Content-Range": f"bytes */{size}"},
        )  # fmt: skip
    return start, min(end, size - 1)
