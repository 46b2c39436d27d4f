"""What an Azure test sees: a fresh provider (optionally over a scripted transport), region
configs with container names unique to the test, the Azurite accounts' keys, and a recording
requests adapter that can answer chosen requests with Azure's documented errors (imported by
tests/azure)."""

from __future__ import annotations

import contextlib
import io
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from regionvault.core.config import SERVICES
from regionvault.core.types import RegionConfig, RegionId, ServiceConfig
from regionvault.providers.azure.azurite import AzuriteServer
from regionvault.providers.azure.conformance import key_variable
from regionvault.providers.azure.provider import AzureProvider
from regionvault.providers.azure.settings import COMPUTE_SETTINGS
from regionvault.providers.azure.testing import LiveSettings
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse

EAST = "east"
WEST = "west"


@dataclass
class Seen:
    """One request as it left the SDK."""

    method: str
    url: str
    headers: dict[str, str]

    @property
    def query(self) -> str:
        return self.url.partition("?")[2]

    @property
    def path(self) -> str:
        return re.sub(r"^https?://[^/]+", "", self.url.partition("?")[0])


@dataclass
class Answer:
    status: int
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Rule = Callable[[Seen], Answer | None]


def error_answer(status: int, code: str, **headers: str) -> Answer:
    return Answer(status, code, {"x-ms-error-code": code, **headers})


class ScriptedAdapter(HTTPAdapter):
    """A requests adapter that records every request and answers those a rule picks with a
    canned response (Azure's error XML), sending the rest to the real server."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        seen = Seen(str(request.method), str(request.url), dict(request.headers))
        self.seen.append(seen)
        for rule in self.rules:
            answer = rule(seen)
            if answer is not None:
                body = answer.body
                if answer.code:
                    body = (
                        '<?xml version="1.0" encoding="utf-8"?><Error>'
                        f"<Code>{answer.code}</Code><Message>scripted</Message></Error>"
                    ).encode()
                raw = HTTPResponse(
                    body=io.BytesIO(body),
                    headers={
                        "Content-Length": str(len(body)),
                        "Content-Type": "application/xml",
                        **answer.headers,
                    },
                    status=answer.status,
                    request_method=seen.method,  # a HEAD answer has a length, not a body
                    preload_content=False,
                )
                return self.build_response(request, raw)
        return super().send(request, *args, **kwargs)


class AzureWorld:
    """One test's view of Azurite: region configs whose containers are unique to the test,
    and providers that talk to Azurite (through a :class:`ScriptedAdapter` when asked).

    Live (``live`` given, ``server`` None): the regions are the environment's two storage
    accounts (``east`` is A, ``west`` B), reached with their identity, and :meth:`close`
    deletes the test's containers."""

    def __init__(
        self, server: AzuriteServer | None, base_dir: Path, *, live: LiveSettings | None = None
    ) -> None:
        self._server = server
        self.live = live
        self.base_dir = base_dir
        self.tag = uuid.uuid4().hex[:10]
        self.provider = AzureProvider()
        self._services: list[Any] = []

    @property
    def server(self) -> AzuriteServer:
        """The Azurite of an offline run; a test that needs it is skipped live."""
        if self._server is None:
            pytest.skip("offline only: this test needs Azurite itself (its account keys)")
        return self._server

    def settings(self, account: str, **extra: Any) -> dict[str, Any]:
        settings: dict[str, Any]
        if self.live is not None:
            letter = "A" if account == EAST else "B"
            settings = {
                k: v
                for k, v in self.live.region_settings(letter, tag=self.tag).items()
                if k not in COMPUTE_SETTINGS and k not in ("key_vault_url", "key_name")
            }
        else:
            settings = {
                "account_url": self.server.account_url(account),
                "account_key_env": key_variable(account),
                "container": f"rv-{self.tag}",
                "inbox_container": f"rv-{self.tag}-inbox",
                "create": True,
                "sdk_retries": 0,
            }
        settings.update(extra)
        return {k: v for k, v in settings.items() if v is not None}

    def region(self, account: str, **extra: Any) -> RegionConfig:
        settings = self.settings(account, **extra)
        return RegionConfig(
            id=RegionId("azure", account),
            settings=settings,
            services={svc: ServiceConfig("azure", settings) for svc in SERVICES},
            base_dir=self.base_dir,
            source="test-site.toml",
        )

    def scripted(self, **options: Any) -> tuple[AzureProvider, ScriptedAdapter]:
        """A provider whose every request goes through a new :class:`ScriptedAdapter`;
        ``options`` go to its SDK clients too."""
        from azure.core.pipeline.transport import RequestsTransport

        adapter = ScriptedAdapter()
        session = requests.Session()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        transport = RequestsTransport(session=session, session_owner=False)
        return AzureProvider(client_options={"transport": transport, **options}), adapter

    def track(self, service: Any) -> Any:
        self._services.append(service)
        return service

    def close(self) -> None:
        while self._services:
            self._services.pop().close()
        if self.live is not None:
            self._remove_live_containers()
        self.provider.close()

    def _remove_live_containers(self) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        for account in (EAST, WEST):
            region = self.region(account)
            settings = self.provider.settings(region)
            service = self.provider.clients(region).service(
                settings, self.provider._storage_login(region, settings)
            )
            with service:
                for name in (settings.container, settings.inbox_container):
                    with contextlib.suppress(ResourceNotFoundError):
                        service.delete_container(name)
