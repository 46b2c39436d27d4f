"""Who the Azure provider is: a region's ``TokenCredential``, from its site.toml settings or
handed in by embedding code.

site.toml names the credential class with ``credential`` (azure-identity's, built with
exactly the settings given, never ``DefaultAzureCredential``, whose probing of the metadata
service and of developer tools makes failures hard to read):

====================  =====================================================================
``credential``        built as
====================  =====================================================================
``client-secret``     ``ClientSecretCredential(tenant_id, client_id, <secret>)``; the secret
                      comes from the file ``client_secret_file`` or the environment variable
                      ``client_secret_env`` (default ``AZURE_CLIENT_SECRET``), never from
                      site.toml itself
``managed-identity``  ``ManagedIdentityCredential(client_id=...)``: the system-assigned
                      identity, or the user-assigned one ``client_id`` names
``workload-identity`` ``WorkloadIdentityCredential(tenant_id, client_id,
                      token_file_path=federated_token_file)``; each defaults to the
                      ``AZURE_*`` variable AKS's workload identity webhook sets
``azure-cli``         ``AzureCliCredential(tenant_id=...)``: whoever ``az login`` signed in
``embedder``          none: the embedding code passes one (:class:`CredentialSource`)
====================  =====================================================================

``authority`` points the Entra ID login at another host (a sovereign cloud, or a test's fake
token endpoint); instance discovery, which asks the public cloud about that host, is off
whenever ``authority`` is set unless ``instance_discovery = true``. ``ca_file`` is a PEM
bundle to trust for the login and for the Azure services (a TLS-inspecting proxy, a fake).

The seam for embedders: a :class:`CredentialSource` made with ``credential=`` (every region)
or ``per_region=`` (region name to credential) hands that object to every Azure client of
those regions, whatever site.toml says; any ``azure.core.credentials.TokenCredential`` will
do. A source shares one credential, and so one token cache, between the services of a
region (Key Vault, Blob Storage, ARM) and between regions with the same identity.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import ConfigError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from regionvault.core.types import RegionConfig

__all__ = [
    "CREDENTIAL_KINDS",
    "CREDENTIAL_SETTINGS",
    "CredentialSettings",
    "CredentialSource",
    "WatchedCredential",
]

CREDENTIAL_KINDS = (
    "client-secret",
    "managed-identity",
    "workload-identity",
    "azure-cli",
    "embedder",
)
#: the site.toml keys this module reads (a region's settings)
CREDENTIAL_SETTINGS = frozenset(
    {
        "credential",
        "tenant_id",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "federated_token_file",
        "authority",
        "instance_discovery",
        "ca_file",
    }
)

_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# a tenant is a GUID or a verified domain (contoso.onmicrosoft.com)
_TENANT = re.compile(r"^[0-9a-fA-F-]{36}$|^[A-Za-z0-9][A-Za-z0-9.-]{0,252}\.[A-Za-z]{2,}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AUTHORITY = re.compile(r"^https://[^/\s?#]+/?$")


@dataclass(frozen=True)
class CredentialSettings:
    """One region's identity settings, checked without touching Azure."""

    region: str
    kind: str
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret_env: str = "AZURE_CLIENT_SECRET"
    client_secret_file: Path | None = None
    federated_token_file: Path | None = None
    authority: str | None = None
    instance_discovery: bool = True
    ca_file: Path | None = None
    #: where the settings came from, for errors found when the credential is built
    source: str = "<memory>"

    @property
    def connection_verify(self) -> str | bool:
        """What azure-core's transport verifies TLS with: ``ca_file``, or the system's CAs."""
        return str(self.ca_file) if self.ca_file is not None else True

    @classmethod
    def from_region(cls, region: RegionConfig) -> CredentialSettings:
        """Parse and check the identity keys of ``region.settings``; :class:`ConfigError`
        names the bad key. ``credential`` defaults to ``client-secret`` when ``client_id``
        and ``tenant_id`` are set, else ``managed-identity``."""
        s = region.settings

        def string(key: str) -> str | None:
            value = s.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise region.error(key, f"must be a non-empty string, got {value!r}")
            return value.strip()

        def path(key: str) -> Path | None:
            return region.path(key) if s.get(key) is not None else None

        kind = string("credential")
        tenant_id = string("tenant_id")
        client_id = string("client_id")
        if kind is None:
            kind = "client-secret" if tenant_id and client_id else "managed-identity"
        if kind not in CREDENTIAL_KINDS:
            raise region.error(
                "credential", f"{kind!r} is not one of {', '.join(CREDENTIAL_KINDS)}"
            )
        if tenant_id is not None and not _TENANT.match(tenant_id):
            raise region.error("tenant_id", f"{tenant_id!r} is not a tenant GUID or domain")
        if client_id is not None and not _GUID.match(client_id):
            raise region.error("client_id", f"{client_id!r} is not an application (client) id")
        if kind == "client-secret":
            for key, value in (("tenant_id", tenant_id), ("client_id", client_id)):
                if value is None:
                    raise region.error(key, "missing (credential = 'client-secret' needs it)")
        secret_env = string("client_secret_env") or "AZURE_CLIENT_SECRET"
        if not _ENV.match(secret_env):
            raise region.error(
                "client_secret_env", f"{secret_env!r} is not an environment variable name"
            )
        if kind != "client-secret":
            for key in ("client_secret_env", "client_secret_file"):
                if key in s:
                    raise region.error(
                        key, f"applies to credential = 'client-secret', not {kind!r}"
                    )
        if kind != "workload-identity" and "federated_token_file" in s:
            raise region.error(
                "federated_token_file", f"applies to 'workload-identity', not {kind!r}"
            )
        authority = string("authority")
        if authority is not None and not _AUTHORITY.match(authority):
            raise region.error(
                "authority", f"{authority!r} is not an https://host[:port] login authority"
            )
        discovery = s.get("instance_discovery", authority is None)
        if not isinstance(discovery, bool):
            raise region.error("instance_discovery", f"must be true or false, got {discovery!r}")
        return cls(
            region=region.name,
            kind=kind,
            tenant_id=tenant_id,
            client_id=client_id,
            client_secret_env=secret_env,
            client_secret_file=path("client_secret_file"),
            federated_token_file=path("federated_token_file"),
            authority=authority.rstrip("/") if authority else None,
            instance_discovery=discovery,
            ca_file=path("ca_file"),
            source=region.source,
        )

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(
            message, file=self.source, key=f'regions."{self.region}".{key}', region=self.region
        )

    def client_secret(self) -> str:
        """The client secret, read now from its file or environment variable."""
        if self.client_secret_file is not None:
            try:
                secret = self.client_secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise self.error(
                    "client_secret_file",
                    f"cannot read {self.client_secret_file}: {exc.strerror or exc}",
                ) from None
            if not secret:
                raise self.error("client_secret_file", f"{self.client_secret_file} is empty")
            return secret
        secret = os.environ.get(self.client_secret_env, "").strip()
        if not secret:
            raise self.error(
                "client_secret_env",
                f"the environment variable {self.client_secret_env} holding the client "
                "secret is not set (or set client_secret_file)",
            )
        return secret

    def build(self, **options: Any) -> TokenCredential:
        """The azure-identity credential these settings name (``embedder`` has none),
        wrapped in a :class:`WatchedCredential`; ``options`` go to its azure-core pipeline
        (``retry_total``, a test's ``transport``)."""
        watch = _LoginWatch()
        return WatchedCredential(self._build(watch, options), watch)

    def _build(self, watch: _LoginWatch, options: Mapping[str, Any]) -> TokenCredential:
        from azure.identity import (
            AzureCliCredential,
            ClientSecretCredential,
            ManagedIdentityCredential,
            WorkloadIdentityCredential,
        )

        login: dict[str, Any] = {
            "connection_verify": self.connection_verify,
            "raw_response_hook": watch,
            **options,
        }
        if self.authority is not None:
            login["authority"] = self.authority
        login["disable_instance_discovery"] = not self.instance_discovery
        if self.kind == "client-secret":
            assert self.tenant_id is not None and self.client_id is not None  # from_region
            return ClientSecretCredential(
                self.tenant_id, self.client_id, self.client_secret(), **login
            )
        if self.kind == "workload-identity":
            token_file = self.federated_token_file
            return WorkloadIdentityCredential(
                tenant_id=self.tenant_id,
                client_id=self.client_id,
                token_file_path=str(token_file) if token_file is not None else None,
                **login,
            )
        if self.kind == "managed-identity":
            extra = {"raw_response_hook": watch, **options}
            if self.client_id is not None:
                return ManagedIdentityCredential(client_id=self.client_id, **extra)
            return ManagedIdentityCredential(**extra)
        if self.kind == "azure-cli":
            return AzureCliCredential(tenant_id=self.tenant_id or "")
        raise self.error(
            "credential",
            "is 'embedder', but the embedding code gave the azure provider no credential "
            "for this region (CredentialSource(credential=...) or per_region=...)",
        )


class _LoginWatch:
    """azure-core's ``raw_response_hook`` on a credential's own pipeline: remembers the
    status and ``Retry-After`` of the login endpoint's answers, the latest one this thread
    saw during the current call, and the latest failure of any thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._failure: tuple[int, str | None] | None = None

    def __call__(self, response: Any) -> None:
        http = response.http_response
        answer = (int(http.status_code), http.headers.get("Retry-After"))
        self._local.seen = answer
        if answer[0] >= 400:
            self._failure = answer

    def reset(self) -> None:
        self._local.seen = None

    def failure(self) -> tuple[int, str | None] | None:
        """Why the current call failed: the answer it got or, when it got none because MSAL
        replayed a throttled answer (it does so for 429 and 5xx until their Retry-After,
        5 s by default, has passed), the latest failure."""
        seen: tuple[int, str | None] | None = getattr(self._local, "seen", None)
        if seen is not None:
            return seen if seen[0] >= 400 else None
        return self._failure


class WatchedCredential:
    """A ``TokenCredential`` that tells a login endpoint's outage from a refusal.

    azure-identity raises ``ClientAuthenticationError`` without a status for every failed
    login, a wrong secret as much as a throttled or failing Entra ID. This wrapper gives
    that error the HTTP status of the login endpoint's last answer (``status_code``) and its
    ``Retry-After`` (``retry_after``), so that the provider's error mapping retries a 429 or
    5xx and refuses a 400 or 401 (keyvault.key_vault_error).
    """

    def __init__(self, inner: TokenCredential, watch: _LoginWatch) -> None:
        self.inner = inner
        self._watch = watch

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import ClientAuthenticationError

        self._watch.reset()
        try:
            return getattr(self.inner, method)(*args, **kwargs)
        except ClientAuthenticationError as exc:
            failure = self._watch.failure()
            if exc.status_code is None and failure is not None:
                exc.status_code = failure[0]
                exc.retry_after = failure[1]  # type: ignore[attr-defined]
            raise

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._call("get_token", *scopes, **kwargs)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        return self._call("get_token_info", *scopes, options=options)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> WatchedCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CredentialSource:
    """Hands out each region's ``TokenCredential``: the embedder's when one was given
    (``credential`` for every region, ``per_region`` by region name, which wins), else one
    built from the region's settings, made once and shared by every client that asks with
    the same settings (``options`` go to the pipelines of those it builds). :meth:`close`
    closes the credentials it built, never the embedder's.
    """

    def __init__(
        self,
        credential: TokenCredential | None = None,
        *,
        per_region: Mapping[str, TokenCredential] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._options = dict(options or {})
        self._default = credential
        self._per_region = dict(per_region or {})
        self._built: dict[tuple[Any, ...], TokenCredential] = {}
        self._lock = threading.Lock()

    def credential(self, settings: CredentialSettings) -> TokenCredential:
        given = self._per_region.get(settings.region, self._default)
        if given is not None:
            return given
        # one credential per identity: the region name is not part of who logs in
        identity = (
            settings.kind,
            settings.tenant_id,
            settings.client_id,
            settings.client_secret_env,
            settings.client_secret_file,
            settings.federated_token_file,
            settings.authority,
            settings.instance_discovery,
            settings.ca_file,
        )
        with self._lock:
            made = self._built.get(identity)
            if made is None:
                made = self._built[identity] = settings.build(**self._options)
            return made

    def close(self) -> None:
        with self._lock:
            built, self._built = list(self._built.values()), {}
        for credential in built:
            close = getattr(credential, "close", None)
            if callable(close):
                close()
