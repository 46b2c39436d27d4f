"""A wire-level fake of Azure Key Vault and of the Microsoft Entra token endpoint.

No Key Vault emulator exists. This is one HTTPS server on 127.0.0.1 that speaks enough of
both REST APIs that the unmodified ``ClientSecretCredential`` (authority pointed here,
instance discovery off), ``KeyClient`` and ``CryptographyClient`` run against it unchanged:

- the token endpoint of one tenant: ``GET /<tenant>/v2.0/.well-known/openid-configuration``
  and ``POST /<tenant>/oauth2/v2.0/token`` (client-credentials grant, checked against the
  registered clients' secrets), served for a :class:`~.entra.FakeTenant` that other fakes of
  the process (an ARM fake) may share;
- one vault's keys (api-version 7.x): create, get (latest or a version), list versions,
  rotate, and wrapKey/unwrapKey/encrypt/decrypt with RSA-OAEP-256 and RSA-OAEP, on RSA keys
  whose private halves never leave this process. A request without a bearer token gets
  Key Vault's 401 challenge naming this tenant, exactly as the SDK's challenge policy needs.

What it does not do: it enforces no RBAC or access policy (every registered client may do
everything) except what a test asks for with :meth:`FakeKeyVault.deny`; it keeps no soft
delete, HSM keys, key rotation policies, or signing. Tests that need Azure's real behaviour
there run live. Each request is recorded (:attr:`FakeKeyVault.requests`), so tests can show
which operations a client used; :meth:`FakeKeyVault.fail` answers the next requests with an
error status, for the mapping of throttling and server errors.

Start one per region (each its own tenant, vault and keys)::

    with FakeKeyVault(tmp_path / "east") as vault:
        settings = vault.region_settings(key_name="regionvault")

or run it alone: ``python -m regionvault.providers.azure.fakes.keyvault DIR`` prints the
settings as JSON and serves until interrupted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from regionvault.providers.azure.fakes.entra import FakeAnswer, FakeTenant
from regionvault.providers.azure.fakes.tls import LocalCA

__all__ = ["KEY_VAULT_RESOURCE", "FakeKeyVault", "Recorded", "fake_key_vaults"]

#: the resource Key Vault names in its challenge; the SDK asks for ``<resource>/.default``
KEY_VAULT_RESOURCE = "https://vault.azure.net"
_MAX_BODY = 1 << 20

_OAEP = {
    "RSA-OAEP-256": lambda: padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    ),
    "RSA-OAEP": lambda: padding.OAEP(
        mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    ),
}
_CRYPTO_OPS = {
    "wrapkey": "wrapKey",
    "unwrapkey": "unwrapKey",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
}
_ALL_OPS = ("encrypt", "decrypt", "wrapKey", "unwrapKey", "sign", "verify")


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


@dataclass(frozen=True)
class Recorded:
    """One request the fake answered: its operation (``token``, ``openid-configuration``,
    ``keys/create``, ``keys/get``, ``keys/versions``, ``keys/rotate``, ``keys/wrapKey``,
    ``keys/unwrapKey``, ``keys/encrypt``, ``keys/decrypt``, ``unknown``), the key and
    version it named, the client whose token it carried, and the status answered."""

    operation: str
    key: str | None
    version: str | None
    client_id: str | None
    status: int


@dataclass
class _KeyVersion:
    version: str
    private: rsa.RSAPrivateKey = field(repr=False)
    key_ops: tuple[str, ...]
    created: int
    kty: str = "RSA"
    enabled: bool = True


@dataclass
class _Failure:
    status: int
    operation: str | None
    remaining: int
    retry_after: int | None
    stall: float


class FakeKeyVault:
    """One tenant's token endpoint and one Key Vault, on ``https://127.0.0.1:<port>``.

    ``directory`` receives the CA certificate (``ca.pem``, for ``connection_verify``) and the
    server's certificate and key; ``tenant`` (a :class:`FakeTenant` other fakes of this
    process may share, by default one of its own in ``directory``) holds the applications,
    one file per application with its secret. Its first application is :attr:`client_id`;
    :meth:`add_client` registers more. ``key_size`` is what a create without one gets.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tenant: FakeTenant | None = None,
        port: int = 0,
        key_size: int = 3072,
    ) -> None:
        self.directory = directory
        self.tenant = tenant or FakeTenant(directory)
        self.key_size = key_size
        self._port = port
        self._lock = threading.Lock()
        self._keys: dict[str, list[_KeyVersion]] = {}
        self._denied: dict[str, set[str]] = {}
        self._failures: list[_Failure] = []
        self.requests: list[Recorded] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ca: LocalCA | None = None

    @property
    def tenant_id(self) -> str:
        return self.tenant.tenant_id

    @property
    def client_id(self) -> str:
        """The tenant's first application."""
        return self.tenant.client_id

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The vault URL, which is also the authority host of the token endpoint."""
        if self._server is None:
            raise RuntimeError("the fake Key Vault is not running")
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def ca_file(self) -> Path:
        if self.ca is None:
            raise RuntimeError("the fake Key Vault is not running")
        return self.ca.ca_file

    def start(self) -> FakeKeyVault:
        if self._server is not None:
            return self
        self.ca = LocalCA.create(self.directory, name="regionvault fake Key Vault")
        server = _QuietServer(("127.0.0.1", self._port), _handler(self))
        server.daemon_threads = True
        server.socket = self.ca.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-key-vault-{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakeKeyVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls

    def add_client(self, client_id: str | None = None) -> str:
        """Register an application in the tenant (:meth:`FakeTenant.add_client`)."""
        return self.tenant.add_client(client_id)

    def secret_file(self, client_id: str | None = None) -> Path:
        return self.tenant.secret_file(client_id)

    def deny(self, client_id: str, operations: Iterable[str]) -> None:
        """Answer 403 Forbidden (as Key Vault's RBAC does) to ``client_id`` for these key
        operations (``get``, ``create``, ``rotate``, ``versions``, ``wrapKey``,
        ``unwrapKey``, ``encrypt``, ``decrypt``)."""
        with self._lock:
            self._denied.setdefault(client_id, set()).update(operations)

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        operation: str | None = None,
        retry_after: int | None = None,
        stall: float = 0.0,
    ) -> None:
        """Answer the next ``times`` requests (of ``operation`` only, e.g. ``keys/unwrapKey``
        or ``token``, when given) with ``status``, and ``Retry-After`` when given; after
        ``stall`` seconds when given (longer than the client's read timeout: no answer)."""
        with self._lock:
            self._failures.append(_Failure(status, operation, times, retry_after, stall))

    def clear_failures(self) -> None:
        """Forget the failures :meth:`fail` asked for that have not happened yet."""
        with self._lock:
            self._failures.clear()

    def operations(self, client_id: str | None = None) -> list[str]:
        """The operations recorded so far (of one client's token, when given)."""
        with self._lock:
            return [
                r.operation for r in self.requests if client_id is None or r.client_id == client_id
            ]

    def key_versions(self, name: str) -> list[str]:
        with self._lock:
            return [v.version for v in self._keys.get(name, [])]

    def region_settings(self, *, key_name: str, client_id: str | None = None) -> dict[str, Any]:
        """site.toml settings that point a region's keys at this fake, logging in as
        ``client_id`` (the first client by default) with a client secret from its file; the
        key is made on first use (``create = true``)."""
        client = client_id or self.client_id
        return {
            "key_vault_url": self.url,
            "key_name": key_name,
            "credential": "client-secret",
            "tenant_id": self.tenant_id,
            "client_id": client,
            "client_secret_file": str(self.secret_file(client)),
            "authority": self.url,
            "ca_file": str(self.ca_file),
            # the challenge names https://vault.azure.net, not 127.0.0.1
            "verify_challenge_resource": False,
            "create": True,
        }

    # ------------------------------------------------------------------ the handlers' side

    def _take_failure(self, operation: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.operation in (None, operation) and failure.remaining > 0:
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                    return failure
        return None

    def _record(self, recorded: Recorded) -> None:
        with self._lock:
            self.requests.append(recorded)

    def _authenticate(self, header: str | None) -> str:
        """The client id behind a request's bearer token; Key Vault's 401 challenge, naming
        this tenant, otherwise."""
        challenge = {
            "WWW-Authenticate": (
                f'Bearer authorization="{self.url}/{self.tenant_id}", '
                f'resource="{KEY_VAULT_RESOURCE}"'
            )
        }
        return self.tenant.client_of(header, KEY_VAULT_RESOURCE, challenge)

    def _authorize(self, client_id: str, operation: str, name: str) -> None:
        with self._lock:
            denied = operation in self._denied.get(client_id, set())
        if denied:
            raise FakeAnswer(
                403,
                "Forbidden",
                f"Caller is not authorized to perform action on resource. Caller: "
                f"appid={client_id}; Action: 'Microsoft.KeyVault/vaults/keys/{operation}/"
                f"action'; Resource: 'keys/{name}'",
            )

    def _bundle(self, name: str, version: _KeyVersion) -> dict[str, Any]:
        public = version.private.public_key().public_numbers()
        return {
            "key": {
                "kid": f"{self.url}/keys/{name}/{version.version}",
                "kty": version.kty,
                "key_ops": list(version.key_ops),
                "n": _b64u(_int_bytes(public.n)),
                "e": _b64u(_int_bytes(public.e)),
            },
            "attributes": {
                "enabled": version.enabled,
                "created": version.created,
                "updated": version.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
            "tags": {},
        }

    def _new_version(self, body: Mapping[str, Any]) -> _KeyVersion:
        kty = body.get("kty", "RSA")
        if kty not in ("RSA", "RSA-HSM"):
            raise FakeAnswer(400, "BadParameter", f"the fake makes RSA keys only, not {kty!r}")
        size = body.get("key_size") or self.key_size
        if size not in (2048, 3072, 4096):
            raise FakeAnswer(400, "BadParameter", f"key_size {size!r} is not 2048, 3072 or 4096")
        ops = body.get("key_ops") or list(_ALL_OPS)
        if not isinstance(ops, list) or not all(op in _ALL_OPS for op in ops):
            raise FakeAnswer(400, "BadParameter", f"invalid key_ops {ops!r}")
        return _KeyVersion(
            version=uuid.uuid4().hex,
            private=rsa.generate_private_key(public_exponent=65537, key_size=int(size)),
            key_ops=tuple(ops),
            created=int(time.time()),
            kty=str(kty),
        )

    def _find(self, name: str, version: str | None) -> _KeyVersion:
        with self._lock:
            versions = self._keys.get(name)
            if versions:
                if not version:
                    return versions[-1]
                for candidate in versions:
                    if candidate.version == version:
                        return candidate
        what = f"{name}/{version}" if version else name
        raise FakeAnswer(
            404,
            "KeyNotFound",
            f"A key with (name/id) {what} was not found in this key vault. If you recently "
            "deleted this key you may be able to recover it using the correct recovery "
            "command.",
        )

    def _crypto(self, name: str, version: str, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
        key = self._find(name, version)
        if op not in key.key_ops:
            raise FakeAnswer(403, "Forbidden", f"Operation {op} is not permitted on this key.")
        alg = body.get("alg")
        if alg not in _OAEP:
            raise FakeAnswer(400, "BadParameter", f"the fake supports {sorted(_OAEP)}, not {alg!r}")
        try:
            value = _unb64u(str(body.get("value", "")))
        except (ValueError, TypeError):
            raise FakeAnswer(400, "BadParameter", "value is not base64url") from None
        try:
            if op in ("wrapKey", "encrypt"):
                out = key.private.public_key().encrypt(value, _OAEP[alg]())
            else:
                out = key.private.decrypt(value, _OAEP[alg]())
        except ValueError:
            # Key Vault answers a ciphertext that does not decrypt under the key this way
            raise FakeAnswer(400, "BadParameter", "The parameter is incorrect.") from None
        return {"kid": f"{self.url}/keys/{name}/{key.version}", "value": _b64u(out)}

    def _keys_request(
        self, method: str, parts: list[str], body: Mapping[str, Any], client_id: str
    ) -> tuple[str, str | None, str | None, dict[str, Any]]:
        """Route ``/keys/...``: returns (operation, key, version, answer)."""
        if len(parts) < 2 or not parts[1]:
            raise FakeAnswer(400, "BadParameter", "a key name is needed")
        name = parts[1]
        rest = parts[2:]
        if method == "POST" and rest == ["create"]:
            self._authorize(client_id, "create", name)
            version = self._new_version(body)
            with self._lock:
                self._keys.setdefault(name, []).append(version)
            return "keys/create", name, version.version, self._bundle(name, version)
        if method == "POST" and rest == ["rotate"]:
            self._authorize(client_id, "rotate", name)
            current = self._find(name, None)
            version = self._new_version(
                {
                    "kty": current.kty,
                    "key_size": current.private.key_size,
                    "key_ops": list(current.key_ops),
                }
            )
            with self._lock:
                self._keys[name].append(version)
            return "keys/rotate", name, version.version, self._bundle(name, version)
        if method == "GET" and rest == ["versions"]:
            self._authorize(client_id, "versions", name)
            self._find(name, None)
            with self._lock:
                items = [
                    {
                        "kid": f"{self.url}/keys/{name}/{v.version}",
                        "attributes": self._bundle(name, v)["attributes"],
                    }
                    for v in self._keys[name]
                ]
            return "keys/versions", name, None, {"value": items, "nextLink": None}
        if method == "GET" and len(rest) <= 1:
            self._authorize(client_id, "get", name)
            version_id = rest[0] if rest else None
            key = self._find(name, version_id)
            return "keys/get", name, version_id, self._bundle(name, key)
        if method == "POST" and len(rest) == 2 and rest[1].lower() in _CRYPTO_OPS:
            op = _CRYPTO_OPS[rest[1].lower()]
            self._authorize(client_id, op, name)
            return f"keys/{op}", name, rest[0], self._crypto(name, rest[0], op, body)
        served = "/".join(rest)
        raise FakeAnswer(400, "BadParameter", f"the fake does not serve {method} /keys/{served}")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a read timeout, a test's refused TLS handshake) is not
        the fake's error: nothing to print."""


def _handler(fake: FakeKeyVault) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Nagle and delayed ACK together cost ~40 ms per small answer
        disable_nagle_algorithm = True
        server_version = "regionvault-fake-key-vault"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: tests read fake.requests instead

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                raise FakeAnswer(413, "BadParameter", "request too large")
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any, headers: Mapping[str, str]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            parts = split.path.split("/")[1:]
            operation, key, version = "unknown", None, None
            client_id: str | None = None
            status = 200
            payload: dict[str, Any] = {}
            headers: dict[str, str] = {}
            is_token = False
            try:
                raw = self._body()
                if FakeTenant.is_login_path(parts):
                    is_token = True
                    operation = fake.tenant.operation_of(method, parts)
                    self._maybe_fail(operation)
                    operation, client_id, payload = fake.tenant.serve(method, parts, raw, fake.url)
                elif parts and parts[0] == "keys":
                    operation = _operation_of(method, parts)
                    key = parts[1] if len(parts) > 1 and parts[1] else None
                    client_id = fake._authenticate(self.headers.get("Authorization"))
                    try:
                        body = json.loads(raw) if raw else {}
                    except json.JSONDecodeError:
                        raise FakeAnswer(400, "BadParameter", "body is not JSON") from None
                    if not isinstance(body, dict):
                        raise FakeAnswer(400, "BadParameter", "body is not a JSON object")
                    self._maybe_fail(operation)
                    operation, key, version, payload = fake._keys_request(
                        method, parts, body, client_id
                    )
                else:
                    fake._authenticate(self.headers.get("Authorization"))
                    raise FakeAnswer(404, "NotFound", f"no endpoint {split.path}")
            except FakeAnswer as answer:
                status, headers = answer.status, answer.headers
                if is_token:
                    payload = {
                        "error": answer.code,
                        "error_description": answer.message,
                        "error_codes": [],
                        "correlation_id": str(uuid.uuid4()),
                    }
                else:
                    payload = {"error": {"code": answer.code, "message": answer.message}}
            fake._record(Recorded(operation, key, version, client_id, status))
            self._send(status, payload, headers)

        def _maybe_fail(self, operation: str) -> None:
            failure = fake._take_failure(operation)
            if failure is None:
                return
            if failure.stall > 0:
                time.sleep(failure.stall)
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = str(failure.retry_after)
            phrase = HTTPStatus(failure.status).phrase.replace(" ", "")
            raise FakeAnswer(failure.status, phrase, f"injected {failure.status}", headers)

    return Handler


@contextlib.contextmanager
def fake_key_vaults(
    directory: Path, regions: Iterable[str], *, key_size: int = 3072
) -> Iterator[dict[str, FakeKeyVault]]:
    """The launcher for tests and conformance support: one started :class:`FakeKeyVault`
    per region name (each its own tenant, client, CA and keys, in ``directory/<region>``),
    all stopped on exit. A region's site.toml key settings are
    ``fakes[region].region_settings(key_name=...)``."""
    with contextlib.ExitStack() as stack:
        fakes: dict[str, FakeKeyVault] = {}
        for region in regions:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in region)
            fakes[region] = stack.enter_context(FakeKeyVault(directory / safe, key_size=key_size))
        yield fakes


def _operation_of(method: str, parts: list[str]) -> str:
    rest = parts[2:]
    if method == "POST" and rest in (["create"], ["rotate"]):
        return f"keys/{rest[0]}"
    if method == "GET" and rest == ["versions"]:
        return "keys/versions"
    if method == "GET":
        return "keys/get"
    if len(rest) == 2 and rest[1].lower() in _CRYPTO_OPS:
        return f"keys/{_CRYPTO_OPS[rest[1].lower()]}"
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Serve a fake Key Vault until interrupted; print its settings as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m regionvault.providers.azure.fakes.keyvault DIRECTORY")
        return 2
    with FakeKeyVault(Path(args[0])) as fake:
        print(json.dumps(fake.region_settings(key_name="regionvault")), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
