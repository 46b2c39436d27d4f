"""What a Cloud Storage test sees: gcp-storage-emulator on 127.0.0.1 (the provider's own
launcher), region configs with bucket names unique to the test, and a recording requests
adapter mounted on the real client's session that can answer chosen requests with Cloud
Storage's documented answers (imported by tests/gcp/test_gcp_storage.py and
test_gcp_transit.py).

The emulator ignores ``ifGenerationMatch``: the tests reach it through the launcher's
precondition front (``GcsEmulator(preconditions=True)``, emulator.py), which applies Cloud
Storage's documented rule for ``ifGenerationMatch=0``; ``emulator.backend_endpoint`` is the
emulator alone.
"""

from __future__ import annotations

import io
import json
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
from regionvault.providers.gcp.emulator import GcsEmulator
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


def _seen(request: Any) -> Seen:
    return Seen(
        str(request.method), str(request.url), CaseInsensitiveDict(request.headers), _body(request)
    )


class RecordingAdapter(HTTPAdapter):
    """Records every request the SDK sends; answers those a rule picks with a canned
    response (Cloud Storage's documented answers), sending the rest to the server."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self._record = threading.Lock()

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        seen = _seen(request)
        with self._record:
            self.seen.append(seen)
        for rule in list(self.rules):
            answer = rule(seen)
            if answer is not None:
                return self._answer(request, seen, answer)
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


class LosingAdapter(RecordingAdapter):
    """A RecordingAdapter that loses the answer to the first request ``lose`` picks: the
    request reaches the server and takes effect, then the connection drops before the answer
    is read (``requests.ConnectionError``), as when a connection is reset after an upload
    landed. The SDK's retry (``sdk_retries`` above 0) sends it again."""

    def __init__(self, lose: Callable[[Seen], bool]) -> None:
        super().__init__()
        self.lose = lose
        #: the requests whose answers were lost (at most one)
        self.lost: list[Seen] = []

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().send(request, *args, **kwargs)
        seen = _seen(request)
        if not self.lost and self.lose(seen):
            self.lost.append(seen)
            response.close()
            raise requests.ConnectionError("connection reset after the request was sent")
        return response


def creating(seen: Seen) -> bool:
    """An if-absent upload's request that makes the object: a multipart upload, or the last
    chunk of a resumable one (its Content-Range names the total)."""
    if not seen.path.startswith("/upload/"):
        return False
    if seen.method == "POST":
        return seen.query.get("uploadType") == "multipart" and (
            seen.query.get("ifGenerationMatch") == "0"
        )
    final = seen.headers.get("Content-Range", "")
    return seen.method == "PUT" and not final.endswith("/*") and not final.startswith("bytes */")


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


@pytest.fixture
def gcs(gcs_emulator: GcsEmulator, tmp_path: Path) -> Iterator[GcsWorld]:
    world = GcsWorld(gcs_emulator, tmp_path)
    try:
        yield world
    finally:
        world.close()
