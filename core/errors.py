"""One error tree for the whole framework.

Every error a provider or the engine raises on purpose derives from :class:`RegionVaultError`
and carries, where known, the provider and region that raised it, so a message read in a log
says where the trouble is. Expected errors are printed by the CLI as one line, without a
traceback.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

__all__ = [
    "AmbiguousName",
    "ComputeError",
    "ConfigError",
    "EntryProblem",
    "HookFailed",
    "InstanceNotFound",
    "IntegrityError",
    "KeyAccessDenied",
    "KeyServiceError",
    "LockedError",
    "ObjectExists",
    "ObjectNotFound",
    "PathNotFound",
    "PayloadWaiting",
    "PolicyError",
    "ProviderNotFound",
    "RegionVaultError",
    "RepositoryNotFound",
    "RetentionLocked",
    "TransientError",
    "TransitError",
    "UnlaunchableKind",
    "UnsupportedOperation",
    "VaultError",
    "configuration_failure",
    "exception_chain",
]


class RegionVaultError(Exception):
    """Base of every error the framework raises on purpose."""

    def __init__(
        self, message: str, *, provider: str | None = None, region: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.region = region

    def __str__(self) -> str:
        where = self.region or self.provider
        if self.region and self.provider and not self.region.startswith(f"{self.provider}:"):
            where = f"{self.provider}:{self.region}"
        return f"[{where}] {self.message}" if where else self.message


class ConfigError(RegionVaultError):
    """The site configuration is wrong: names the file and the key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        provider: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(message, provider=provider, region=region)
        self.file = file
        self.key = key

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        where = ": ".join(parts)
        return f"{where}: {self.message}" if where else self.message


class ProviderNotFound(ConfigError):
    """No registered provider has the requested name."""


class UnsupportedOperation(RegionVaultError):
    """The provider does not offer this operation (see its declared capabilities)."""

    def __init__(
        self, operation: str, *, provider: str | None = None, region: str | None = None
    ) -> None:
        super().__init__(
            f"{operation} is not supported by provider {provider or '?'}",
            provider=provider,
            region=region,
        )
        self.operation = operation


class UnlaunchableKind(UnsupportedOperation):
    """A region's compute cannot launch a recovery point of this kind: the message names
    the region, its compute, the point and where the point came from."""

    def __init__(
        self, message: str, *, provider: str | None = None, region: str | None = None
    ) -> None:
        RegionVaultError.__init__(self, message, provider=provider, region=region)
        self.operation = "launch"

    def __str__(self) -> str:
        return self.message  # it names the region itself


class KeyServiceError(RegionVaultError):
    """A key-management operation failed."""


class KeyAccessDenied(KeyServiceError):
    """This KeyService cannot open the material: another region's, another context, or forged."""


class VaultError(RegionVaultError):
    """An object-store operation failed."""


class ObjectNotFound(VaultError):
    def __init__(
        self, name: str, *, provider: str | None = None, region: str | None = None
    ) -> None:
        super().__init__(f"object {name!r} not found", provider=provider, region=region)
        self.name = name


class PathNotFound(RegionVaultError):
    """A restore asked for paths the recovery point does not hold; ``.paths`` lists them."""

    def __init__(self, point: str, paths: list[str]) -> None:
        names = ", ".join(repr(p) for p in paths)
        noun = "path" if len(paths) == 1 else "paths"
        super().__init__(f"recovery point {point} holds no {noun} {names}")
        self.point = point
        self.paths = paths


class ObjectExists(VaultError):
    """An if-absent put found the name already taken."""

    def __init__(
        self, name: str, *, provider: str | None = None, region: str | None = None
    ) -> None:
        super().__init__(f"object {name!r} already exists", provider=provider, region=region)
        self.name = name


class RetentionLocked(VaultError):
    """A delete or retention change was refused: WORM lock or legal hold."""

    def __init__(
        self,
        name: str,
        reason: str,
        *,
        provider: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(
            f"object {name!r} is protected: {reason}", provider=provider, region=region
        )
        self.name = name
        self.reason = reason


class RepositoryNotFound(ObjectNotFound):
    """A region's vault holds no repository yet (no ``config`` object): nothing has been
    backed up or copied into it. Reading operations raise it; they never create one.

    ``str()`` names the region itself (no ``[region]`` prefix); ``.name`` is ``config``.
    """

    def __init__(
        self,
        region: str,
        *,
        provider: str | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__("config", provider=provider, region=region)
        self.message = (
            message or f"no repository in {region} yet: nothing has been backed up or copied there"
        )
        self.args = (self.message,)

    def __str__(self) -> str:
        return self.message


class LockedError(VaultError):
    """Another writer holds the repository lock and it has not expired."""


class IntegrityError(RegionVaultError):
    """Stored data failed authentication or does not match its references: names the object."""

    def __init__(
        self,
        object_name: str,
        reason: str,
        *,
        provider: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(f"{object_name}: {reason}", provider=provider, region=region)
        self.object_name = object_name
        self.reason = reason


class ComputeError(RegionVaultError):
    """A compute operation failed."""


class EntryProblem(ComputeError):
    """One entry of a file capture cannot be taken whole: it is unreadable, vanished, or is
    not (or no longer) the file that was walked. Raised by ``FileCapture.open`` and while
    reading; the backup records it in the recovery point and goes on with the rest."""

    def __init__(
        self,
        path: str,
        issue: str,
        message: str,
        *,
        provider: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(f"{path!r}: {message}", provider=provider, region=region)
        self.path = path
        #: an :class:`~regionvault.core.types.IssueKind` value
        self.issue = issue
        self.reason = message


class InstanceNotFound(ComputeError):
    def __init__(self, ref: str, *, provider: str | None = None, region: str | None = None) -> None:
        super().__init__(f"no instance {ref!r}", provider=provider, region=region)
        self.ref = ref


class AmbiguousName(ComputeError):
    """A name given where an id or a unique name was expected matches several things."""


class TransitError(RegionVaultError):
    """Moving a payload between regions failed."""


class PayloadWaiting(TransitError):
    """A different payload of this name still waits in the inbox, and this sender may only
    create payloads, not replace one (a create-only permission, as on Cloud Storage)."""


class HookFailed(RegionVaultError):
    """A hook's ``before`` failed (the backup fails), or a hook could not run at all."""


class TransientError(RegionVaultError):
    """A cloud call failed in a way that may pass if it is made again a little later: the
    service throttled it, answered with a server error (HTTP 5xx), or did not answer in time
    (a connect or read timeout, a dropped connection).

    The one error for every such failure, whatever the service (vault, keys, compute,
    transit): a provider maps its SDK's errors onto it (docs/writing-a-provider.md) and the
    executor retries a job that raises it, with backoff (docs/jobs.md). Anything else (denied,
    not found, invalid) is not transient and is never retried. ``retry_after`` is how many
    seconds the service asked the caller to wait, when it said (a ``Retry-After`` header).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        region: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, region=region)
        self.retry_after = retry_after


class PolicyError(RegionVaultError):
    """A policy tag or policy definition is malformed: names the value and why."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (``__cause__``, ``__context__``, exceptions
    among its ``args``), each once, at most 32: where an SDK's wrapped failure says what
    really happened."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo and len(seen) < 32:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([item.__cause__, item.__context__, *item.args])


#: what a resolver answers for a host name that has no address: fails every time. Its
#: EAI_AGAIN ("temporary failure in name resolution") may pass, and so may every other.
_NO_SUCH_HOST = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
)
#: the texts of those answers where only the text is left (a wrapper re-raised without the
#: errno: libcloud does so for EAI_NODATA; urllib3 keeps the text of its cause)
_NO_SUCH_HOST_TEXTS = (
    "Name or service not known",
    "No address associated with hostname",
    "nodename nor servname provided",
)
#: a certificate refused: not trusted, or not for this host name
_CERTIFICATE_TEXTS = ("certificate verify failed", "Hostname mismatch")


def configuration_failure(exc: BaseException) -> bool:
    """A host name without an address or a certificate refused (not trusted, or not for the
    host name) anywhere behind ``exc``: each fails every time until the site file changes,
    so neither is transient. A refused or dropped connection (a TLS session cut mid-way
    included), a timeout, a resolver that could not answer now (EAI_AGAIN), may pass."""
    for cause in exception_chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        if isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_HOST:
            return True
        if isinstance(cause, socket.gaierror) and cause.errno is not None:
            continue  # the resolver said why, and it may pass
        text = str(cause)
        if any(t in text for t in _NO_SUCH_HOST_TEXTS + _CERTIFICATE_TEXTS):
            return True
        if "Certificate" in type(cause).__name__:
            return True
    return False
