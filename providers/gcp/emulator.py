"""gcp-storage-emulator, the Cloud Storage emulator, for the GCP tests and the provider's
conformance support: started as a child process in a session of its own on 127.0.0.1,
in memory, waited for until it answers, and stopped by its PID.

What the emulator does not do (the tests assert the requests the real client sends instead,
and the conformance suite skips what cannot be shown offline, saying why): it ignores
``ifGenerationMatch`` and every other precondition, ``maxResults`` and ``pageToken`` (a
listing is one page), the location of a bucket, object retention and holds (dropped from
the object's metadata) and bucket lock.

``GcsEmulator(preconditions=True)`` puts a small front on ``endpoint`` that forwards every
request to the emulator (listening on a port of its own, ``backend_endpoint``) and applies
Cloud Storage's documented rule for ``ifGenerationMatch=0`` itself: the request that makes
an object under it (a multipart or media upload, or the last chunk of a resumable one) is
answered ``412 conditionNotMet`` when the object exists, the check and the forwarding done
under one lock, as the service does them atomically. A resumable session that has finished
is answered as Cloud Storage answers one ("check upload status"): any later request to it
(the SDK resending its last chunk, a status query ``bytes */N``) gets the finished upload's
answer again, 200 and the object, not a 412 for its own object. Only that rule: every other
precondition passes through, ignored as before. The client, its requests and its handling
of the 412 are the real ones; what the front shows is the vault's side of an if-absent race,
not the service's (that runs live).

Nothing here imports the Google SDK. ``python -m regionvault.providers.gcp.emulator
[--port P]`` starts one, prints its endpoint, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from regionvault.core.errors import RegionVaultError

__all__ = [
    "EmulatorUnavailable",
    "GcsEmulator",
    "PreconditionFront",
    "emulator_command",
    "free_port",
]


class EmulatorUnavailable(RegionVaultError):
    """The storage emulator is not installed here, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_command() -> list[str]:
    """``gcp-storage-emulator`` next to this Python (a venv's), else on PATH."""
    beside = Path(sys.executable).parent / "gcp-storage-emulator"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gcp-storage-emulator")
    if found is not None:
        return [found]
    raise EmulatorUnavailable(
        "gcp-storage-emulator is not installed: pip install -e '.[test]' "
        "(it is among the test dependencies)"
    )


_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
_FINAL_RANGE = re.compile(r"^bytes (\d+-\d+|\*)/(\d+)$")
#: headers of one connection, not of the request or answer (RFC 9110 7.6.1)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
)
_NOT_MET = json.dumps(
    {
        "error": {
            "code": 412,
            "message": "At least one of the pre-conditions you specified did not hold.",
            "errors": [
                {
                    "domain": "global",
                    "reason": "conditionNotMet",
                    "message": "At least one of the pre-conditions you specified did not hold.",
                    "locationType": "header",
                    "location": "If-Match",
                }
            ],
        }
    }
).encode()


def _multipart_name(body: bytes) -> str | None:
    """The object name in the JSON part (the first) of a multipart upload's body."""
    _head, sep, rest = body.partition(b"\r\n\r\n")
    if not sep:
        return None
    try:
        return str(json.loads(rest.partition(b"\r\n--")[0])["name"])
    except (ValueError, KeyError, TypeError):
        return None


class PreconditionFront(http.server.ThreadingHTTPServer):
    """The front of ``GcsEmulator(preconditions=True)`` (the module's docstring)."""

    daemon_threads = True

    def __init__(self, port: int, backend: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", port), _FrontHandler)
        self.backend = backend
        self.lock = threading.RLock()  # the forwarding of a creating request holds it too
        #: resumable sessions begun under ifGenerationMatch=0: upload_id -> (bucket, name)
        self.sessions: dict[str, tuple[str, str]] = {}
        #: how many requests the front answered 412 itself
        self.refused = 0
        #: resumable sessions finished through the front: upload_id -> their answer
        self.finished: dict[str, tuple[int, dict[str, str], bytes]] = {}
        #: how many requests to a finished session the front answered itself
        self.replayed = 0

    def exists(self, bucket: str, name: str) -> bool:
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        connection = http.client.HTTPConnection(*self.backend, timeout=30)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
        finally:
            connection.close()
        if answer.status not in (200, 404):
            raise OSError(f"the emulator answered {answer.status} to {path}")
        return answer.status == 200


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    server: PreconditionFront
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else 40 ms per request: Nagle and delayed ACKs

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator is started quiet too."""

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        upload_id = self._upload_id()
        if upload_id is not None:
            with self.server.lock:
                done = self.server.finished.get(upload_id)
                if done is not None:
                    self.server.replayed += 1
            if done is not None:
                self._reply(*done)
                return
        target = self._creates()
        if target is None:
            self._forward(body)
            return
        if target == ("", ""):  # a multipart upload whose name is in the body
            name = _multipart_name(body)
            if name is None:
                self._forward(body)
                return
            bucket = _UPLOAD_PATH.match(urllib.parse.urlsplit(self.path).path)
            assert bucket is not None
            target = (bucket.group(1), name)
        with self.server.lock:
            if self.server.exists(*target):
                self.server.refused += 1
                self._reply(412, {"Content-Type": "application/json; charset=UTF-8"}, _NOT_MET)
                return
            self._forward(body)

    def _upload_id(self) -> str | None:
        """The session of a request to a resumable upload (a chunk or a status query)."""
        parts = urllib.parse.urlsplit(self.path)
        if self.command != "PUT" or _UPLOAD_PATH.match(parts.path) is None:
            return None
        return dict(urllib.parse.parse_qsl(parts.query)).get("upload_id")

    def _creates(self) -> tuple[str, str] | None:
        """(bucket, object) when this request makes an object under ifGenerationMatch=0
        (("", "") for a multipart upload: the name is in its body); None otherwise. Notes
        the resumable sessions begun under it on the way."""
        parts = urllib.parse.urlsplit(self.path)
        match = _UPLOAD_PATH.match(parts.path)
        if match is None:
            return None
        query = dict(urllib.parse.parse_qsl(parts.query))
        if "upload_id" in query:
            session = self.server.sessions.get(query["upload_id"])
            final = _FINAL_RANGE.match(self.headers.get("Content-Range", ""))
            return session if session is not None and final is not None else None
        if query.get("ifGenerationMatch") != "0":
            return None
        kind = query.get("uploadType")
        if self.command == "POST" and kind == "multipart":
            return ("", "")
        if self.command == "POST" and kind == "media" and query.get("name"):
            return (match.group(1), query["name"])
        return None

    def _forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        connection = http.client.HTTPConnection(*self.server.backend, timeout=120)
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            out = {k: v for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP}
        finally:
            connection.close()
        self._note_session(answer.status, out, body)
        upload_id = self._upload_id()
        if upload_id is not None and answer.status in (200, 201):
            with self.server.lock:
                self.server.finished[upload_id] = (answer.status, out, data)
        self._reply(answer.status, out, data)

    def _note_session(self, status: int, headers: dict[str, str], body: bytes) -> None:
        parts = urllib.parse.urlsplit(self.path)
        match = _UPLOAD_PATH.match(parts.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if (
            match is None
            or self.command != "POST"
            or query.get("uploadType") != "resumable"
            or query.get("ifGenerationMatch") != "0"
            or "upload_id" in query
            or status != 200
        ):
            return
        location = next((v for k, v in headers.items() if k.lower() == "location"), "")
        upload = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        try:
            name = query.get("name") or json.loads(body or b"{}").get("name")
        except ValueError:
            name = None
        if upload.get("upload_id") and name:
            self.server.sessions[upload["upload_id"]] = (match.group(1), str(name))

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class GcsEmulator:
    """gcp-storage-emulator on 127.0.0.1 (``endpoint``: ``http://127.0.0.1:P``), in memory,
    in a child process of its own session; a context manager. With ``preconditions``,
    ``endpoint`` is the :class:`PreconditionFront` (a thread of this process) and the
    emulator itself listens on ``backend_endpoint``."""

    def __init__(
        self, *, port: int | None = None, log: Path | None = None, preconditions: bool = False
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.log = log
        self.preconditions = preconditions
        self.backend_port = free_port() if preconditions else self.port
        self.front: PreconditionFront | None = None
        self._front_thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_endpoint(self) -> str:
        """The emulator itself (``endpoint`` unless ``preconditions``)."""
        return f"http://{self.host}:{self.backend_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 30.0) -> GcsEmulator:
        """Start the emulator and wait, at most ``timeout`` seconds, until it answers."""
        if self._process is not None:
            return self
        command = [
            *emulator_command(),
            "start",
            "--host",
            self.host,
            "--port",
            str(self.backend_port),
            "--in-memory",
            "-q",
        ]
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log is not None:
            self._log_file = out = self.log.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a terminal's Ctrl-C reaches the test run, not this
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise EmulatorUnavailable(
                    f"gcp-storage-emulator exited with code {code} while starting on "
                    f"{self.endpoint}"
                )
            if self._answers():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorUnavailable(
                    f"gcp-storage-emulator on {self.endpoint} not ready in {timeout}s"
                )
            time.sleep(0.05)
        if self.preconditions:
            self.front = PreconditionFront(self.port, (self.host, self.backend_port))
            self._front_thread = threading.Thread(
                target=self.front.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="gcs-precondition-front",
                daemon=True,
            )
            self._front_thread.start()
        return self

    def _answers(self) -> bool:
        """Any HTTP answer to a bucket listing means it is serving."""
        url = f"{self.backend_endpoint}/storage/v1/b?project=ready-check"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the front, then the child by its PID (SIGTERM, then SIGKILL after 10 s)."""
        front, self.front = self.front, None
        if front is not None:
            front.shutdown()
            front.server_close()
            if self._front_thread is not None:
                self._front_thread.join(timeout=10)
                self._front_thread = None
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            else:
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m regionvault.providers.gcp.emulator [--port P]``: start the emulator,
    print its endpoint, and stop it on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m regionvault.providers.gcp.emulator")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--preconditions",
        action="store_true",
        help="apply ifGenerationMatch=0 as Cloud Storage does, in front of the emulator",
    )
    args = parser.parse_args(argv)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        emulator = GcsEmulator(port=args.port, preconditions=args.preconditions).start()
    except EmulatorUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        print(emulator.endpoint, flush=True)
        while not stopping:
            if emulator._process is None or emulator._process.poll() is not None:
                print("gcp-storage-emulator exited", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
