"""A fake Microsoft Entra ID tenant: the token endpoint that azure-identity's
``ClientSecretCredential`` logs in with, shared by the provider's wire-level fakes.

A :class:`FakeTenant` holds registered applications (client id and secret) and the tokens it
issued; a fake's HTTPS server serves its two endpoints (:meth:`FakeTenant.serve`) and checks
the bearer tokens of its own requests against it (:meth:`FakeTenant.client_of`). Several
fakes in one process may share one tenant, as the services of one Azure tenant do: a token
for ``https://vault.azure.net/.default`` opens the fake Key Vault only, one for
``https://management.azure.com/.default`` an ARM fake only.

    GET  /<tenant>/v2.0/.well-known/openid-configuration
    POST /<tenant>/oauth2/v2.0/token     grant_type=client_credentials, client_secret_post

Access tokens are JWTs shaped as Entra ID's v1 access tokens (``iss``
``https://sts.windows.net/<tenant>/``, ``aud`` the resource, ``iat``/``nbf``/``exp``, ``tid``,
``appid``, ``oid``), so that Azurite's ``--oauth basic``, which checks those claims (but no
signature), accepts a storage token; their signature is random bytes, and the fakes know a
token by its whole text.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

__all__ = ["FakeAnswer", "FakeTenant"]

_TOKEN_LIFETIME = 3600


class FakeAnswer(Exception):
    """Raised inside a fake's handler to answer with an error status."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class FakeTenant:
    """One tenant's applications and tokens. ``directory`` receives one file per registered
    application holding its secret (``client-<id>.secret``, mode 0600)."""

    def __init__(self, directory: Path, *, tenant_id: str | None = None) -> None:
        self.directory = directory
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self._lock = threading.Lock()
        self._clients: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, str, float]] = {}
        #: the first application, registered when the tenant is made
        self.client_id = self.add_client()

    def add_client(self, client_id: str | None = None) -> str:
        """Register an application (service principal) with a new secret, written to
        :meth:`secret_file`; returns its client id."""
        client_id = client_id or str(uuid.uuid4())
        secret = secrets.token_urlsafe(32)
        with self._lock:
            self._clients[client_id] = secret
        path = self.secret_file(client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secret + "\n", encoding="utf-8")
        return client_id

    def secret_file(self, client_id: str | None = None) -> Path:
        return self.directory / f"client-{client_id or self.client_id}.secret"

    @staticmethod
    def is_login_path(parts: list[str]) -> bool:
        """Whether a request path (split on '/', without the leading '') is a login's."""
        return len(parts) >= 2 and parts[1] in ("v2.0", "oauth2")

    def serve(
        self, method: str, parts: list[str], body: bytes, base_url: str
    ) -> tuple[str, str | None, dict[str, Any]]:
        """Answer a login request: ``(operation, client id or None, JSON answer)`` with
        operation ``openid-configuration`` or ``token``; :class:`FakeAnswer` for errors
        (OAuth's ``{"error": ..., "error_description": ...}`` is the caller's to render)."""
        tenant, rest = parts[0], parts[1:]
        if tenant != self.tenant_id:
            raise FakeAnswer(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.")
        if rest == ["v2.0", ".well-known", "openid-configuration"] and method == "GET":
            return "openid-configuration", None, self._openid_configuration(base_url)
        if rest == ["oauth2", "v2.0", "token"] and method == "POST":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8")).items()}
            return "token", form.get("client_id"), self._issue_token(form)
        raise FakeAnswer(404, "not_found", f"no endpoint /{'/'.join(parts)}")

    def operation_of(self, method: str, parts: list[str]) -> str:
        """The operation a login request asks for (before it is served)."""
        rest = parts[1:]
        if rest == ["v2.0", ".well-known", "openid-configuration"]:
            return "openid-configuration"
        if rest == ["oauth2", "v2.0", "token"] and method == "POST":
            return "token"
        return "unknown"

    def client_of(
        self, header: str | None, resource: str, challenge: Mapping[str, str] | None = None
    ) -> str:
        """The client id behind a request's ``Authorization`` header, whose token must be
        for ``resource``; :class:`FakeAnswer` 401 (with ``challenge`` headers) otherwise."""
        if not header or not header.startswith("Bearer "):
            raise FakeAnswer(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.",
                challenge,
            )  # fmt: skip
        with self._lock:
            known = self._tokens.get(header[len("Bearer ") :])
        if known is None or known[2] < time.monotonic():
            raise FakeAnswer(401, "Unauthorized", "AKV10022: Invalid audience or token.", challenge)
        client_id, scope, _expiry = known
        if scope.split("/.default")[0].rstrip("/") != resource:
            raise FakeAnswer(401, "Unauthorized", f"Invalid audience {scope!r}.", challenge)
        return client_id

    def _openid_configuration(self, base_url: str) -> dict[str, Any]:
        base = f"{base_url}/{self.tenant_id}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{base}/v2.0",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
            "response_types_supported": ["code", "id_token", "token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def _jwt(self, client_id: str, scope: str) -> str:
        def part(doc: Mapping[str, Any]) -> str:
            raw = json.dumps(doc, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

        now = int(time.time())
        claims = {
            "aud": scope.split("/.default")[0].rstrip("/"),
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now - 1,
            "exp": now + _TOKEN_LIFETIME,
            "tid": self.tenant_id,
            "appid": client_id,
            "oid": client_id,
            "sub": client_id,
            "uti": secrets.token_urlsafe(12),
            "ver": "1.0",
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": "regionvault-fake"}
        signature = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()
        return f"{part(header)}.{part(claims)}.{signature}"

    def _issue_token(self, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise FakeAnswer(400, "unsupported_grant_type", "AADSTS70003: only client_credentials")
        client_id = form.get("client_id", "")
        with self._lock:
            expected = self._clients.get(client_id)
        if expected is None:
            raise FakeAnswer(
                400,
                "unauthorized_client",
                f"AADSTS700016: Application with identifier '{client_id}' was not found in "
                f"the directory '{self.tenant_id}'.",
            )
        if not secrets.compare_digest(form.get("client_secret", ""), expected):
            raise FakeAnswer(
                401,
                "invalid_client",
                f"AADSTS7000215: Invalid client secret provided for '{client_id}'.",
            )
        token = self._jwt(client_id, form.get("scope", ""))
        with self._lock:
            self._tokens[token] = (
                client_id,
                form.get("scope", ""),
                time.monotonic() + _TOKEN_LIFETIME,
            )
        return {
            "token_type": "Bearer",
            "expires_in": _TOKEN_LIFETIME,
            "ext_expires_in": _TOKEN_LIFETIME,
            "access_token": token,
        }
