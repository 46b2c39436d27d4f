"""What a Cloud Storage test sees: gcp-storage-emulator on 127.0.0.1 (the provider's own
launcher), region configs with bucket names unique to the test, and a recording requests
adapter mounted on the real client's session that can answer chosen requests with Cloud
Storage's documented answers (imported by tests/gcp/test_gcp_storage.py and
test_gcp_transit.py).

The emulator ignores ``ifGenerationMatch``. :class:`RecordingAdapter` with ``referee=True``
applies Cloud Storage's documented rule for ``ifGenerationMatch=0`` in front of it: the
request that makes an object (a multipart upload, the last chunk of a resumable one) is
answered 412 ``conditionNotMet`` when the object exists, checked and forwarded under one
lock, as the service does it atomically. Everything else in the SDK's path (the query it
sends, the 412 it parses, the mapping onto ``ObjectExists``) is the real thing.
"""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from regionvault.core.config import SERVICES
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.gcp.emulator import EmulatorUnavailable, GcsEmulator
from regionvault.providers.gcp.provider import GcpProvider
from regionvault.providers.gcp.storage import GcsVault
from regionvault.providers.gcp.transit import GcsTransit
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPResponse

EAST = "europe-west1"
WEST = "us-east1"
PROJECT = "regionvault-test"


@dataclass
class Seen:
    """One request as it left the SDK."""

    method: str
    url: str
    headers: CaseInsensitiveDict[str]
    body: bytes

    @property
    def path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.url).query))

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Rule = Callable[[Seen], Answer | None]


def gcs_error(status: int, reason: str, message: str = "scripted") -> Answer:
    """An error answer as Cloud Storage's JSON API gives it."""
    return Answer(
        status,
        {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }
        },
    )


def _body(request: Any) -> bytes:
    body = request.body
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    return b"<stream>"


def _multipart_name(body: bytes) -> str | None:
    """The object name in the JSON part of a multipart upload's body."""
    _head, sep, rest = body.partition(b"\r\n\r\n")
    if not sep:
        return None
    document = rest.partition(b"\r\n--")[0]
    try:
        return str(json.loads(document)["name"])
    except (ValueError, KeyError):
        return None


_FINAL_RANGE = re.compile(r"^bytes (\d+-\d+|\*)/(\d+)$")


class RecordingAdapter(HTTPAdapter):
    """Records every request the SDK sends; answers those a rule picks with a canned
    response; with ``referee``, applies ``ifGenerationMatch=0`` as Cloud Storage does."""

    def __init__(self, *, referee: bool = False) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self.referee = referee
        self._lock = threading.Lock()
        self._record = threading.Lock()
        #: resumable sessions made under ifGenerationMatch=0: upload_id -> (endpoint, object)
        self._sessions: dict[str, tuple[str, str, str]] = {}

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        seen = Seen(
            str(request.method),
            str(request.url),
            CaseInsensitiveDict(request.headers),
            _body(request),
        )
        with self._record:
            self.seen.append(seen)
        for rule in list(self.rules):
            answer = rule(seen)
            if answer is not None:
                return self._answer(request, seen, answer)
        if self.referee:
            return self._refereed(request, seen, *args, **kwargs)
        return super().send(request, *args, **kwargs)

    def _answer(self, request: Any, seen: Seen, answer: Answer) -> requests.Response:
        body = b"" if answer.body is None else json.dumps(answer.body).encode()
        raw = HTTPResponse(
            body=io.BytesIO(body),
            headers={
                "Content-Length": str(len(body)),
                "Content-Type": "application/json; charset=UTF-8",
                **answer.headers,
            },
            status=answer.status,
            request_method=seen.method,
            preload_content=False,
        )
        return self.build_response(request, raw)

    def _refereed(self, request: Any, seen: Seen, *args: Any, **kwargs: Any) -> requests.Response:
        query = seen.query
        parts = urllib.parse.urlsplit(seen.url)
        endpoint = f"{parts.scheme}://{parts.netloc}"
        match = re.match(r"^/upload/storage/v1/b/([^/]+)/o$", seen.path)
        if match is None:
            return super().send(request, *args, **kwargs)
        bucket = match.group(1)
        kind = query.get("uploadType")
        if seen.method == "POST" and kind == "multipart" and query.get("ifGenerationMatch") == "0":
            name = _multipart_name(seen.body)
            if name is not None:
                return self._create(request, seen, endpoint, bucket, name, *args, **kwargs)
        if seen.method == "POST" and kind == "resumable" and "upload_id" not in query:
            response = super().send(request, *args, **kwargs)
            if query.get("ifGenerationMatch") == "0" and response.status_code == 200:
                location = response.headers.get("Location", "")
                upload = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
                name = json.loads(seen.body or b"{}").get("name") or query.get("name")
                if upload.get("upload_id") and name:
                    self._sessions[upload["upload_id"]] = (endpoint, bucket, str(name))
            return response
        session = self._sessions.get(query.get("upload_id", ""))
        final = _FINAL_RANGE.match(seen.headers.get("Content-Range", ""))
        if session is not None and final is not None:
            endpoint, bucket, name = session
            return self._create(request, seen, endpoint, bucket, name, *args, **kwargs)
        return super().send(request, *args, **kwargs)

    def _create(
        self,
        request: Any,
        seen: Seen,
        endpoint: str,
        bucket: str,
        name: str,
        *args: Any,
        **kwargs: Any,
    ) -> requests.Response:
        """The request that makes ``name``: 412 if it exists, else forwarded, atomically."""
        with self._lock:
            if _exists(endpoint, bucket, name):
                return self._answer(
                    request,
                    seen,
                    gcs_error(
                        412,
                        "conditionNotMet",
                        "At least one of the pre-conditions you specified did not hold.",
                    ),
                )
            return super().send(request, *args, **kwargs)


def _exists(endpoint: str, bucket: str, name: str) -> bool:
    url = f"{endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


class GcsWorld:
    """One test's view of the emulator: two regions (``EAST`` is A, ``WEST`` B) whose
    buckets are unique to the test, and the services built on them."""

    def __init__(self, emulator: GcsEmulator, base_dir: Path) -> None:
        self.emulator = emulator
        self.base_dir = base_dir
        self.tag = uuid.uuid4().hex[:10]
        self.provider = GcpProvider()
        self._services: list[Any] = []

    def bucket(self, location: str) -> str:
        return f"rv-{self.tag}-{location}"

    def settings(self, location: str, **extra: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "project": PROJECT,
            "location": location,
            "credentials": "anonymous",
            "storage_endpoint": self.emulator.endpoint,
            "bucket": self.bucket(location),
            "inbox_bucket": f"{self.bucket(location)}-inbox",
            "create": True,
            "sdk_retries": 0,
            "timeout": 30,
        }
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, location: str, **extra: Any) -> RegionConfig:
        settings = self.settings(location, **extra)
        return RegionConfig(
            id=RegionId("gcp", location),
            settings=settings,
            services={svc: ServiceConfig("gcp", settings) for svc in SERVICES},
            base_dir=self.base_dir,
            source="test-site.toml",
        )

    def vault(
        self, location: str = EAST, *, adapter: RecordingAdapter | None = None, **extra: Any
    ) -> GcsVault:
        """The provider's vault, or (``adapter``) one built the way the provider builds it,
        with the adapter on its session."""
        region = self.region(location, **extra)
        if adapter is None:
            return self.track(self.provider.vault(region))
        settings = self.provider.settings(region)
        return self.track(
            GcsVault(
                region=region,
                settings=settings,
                credentials=self.provider.credentials(region, settings, "storage"),
                capabilities=self.provider._vault_capabilities(settings),
                metrics=self.provider.metrics,
                adapter=adapter,
            )
        )

    def transit(
        self,
        source: str = EAST,
        destination: str = WEST,
        *,
        adapter: RecordingAdapter | None = None,
        **extra: Any,
    ) -> GcsTransit:
        src, dst = self.region(source), self.region(destination, **extra)
        if adapter is None:
            return self.track(self.provider.transit(src, dst))
        settings = self.provider.settings(dst)
        return self.track(
            GcsTransit(
                source=src,
                destination=dst,
                settings=settings,
                credentials=self.provider.credentials(dst, settings, "storage"),
                capabilities=GcpProvider.capabilities,
                metrics=self.provider.metrics,
                adapter=adapter,
            )
        )

    def track(self, service: Any) -> Any:
        self._services.append(service)
        return service

    def close(self) -> None:
        while self._services:
            self._services.pop().close()
        self.provider.close()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One emulator per test module that asks for it, stopped by its PID afterwards."""
    pytest.importorskip(
        "google.cloud.storage",
        reason="the GCP tests need google-cloud-storage: pip install -e '.[test]'",
    )
    workdir = tmp_path_factory.mktemp("gcs-emulator")
    emulator = GcsEmulator(log=workdir / "emulator.log")
    try:
        emulator.start()
    except EmulatorUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[GcsWorld]:
    world = GcsWorld(gcs_emulator, tmp_path)
    try:
        yield world
    finally:
        world.close()
