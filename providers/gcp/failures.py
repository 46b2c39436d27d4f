"""What the GCP provider's service modules agree on about a failed call, without importing
any SDK: the chain of exceptions behind one, and which of them are configuration (they fail
every time until the site file changes) rather than transient."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["causes", "configuration_failure"]


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (``__cause__``, ``__context__``, exceptions
    among its ``args``), each once, at most 32."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo and len(seen) < 32:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([item.__cause__, item.__context__, *item.args])


def configuration_failure(exc: BaseException) -> bool:
    """A TLS failure or a host name without an address: each fails every time until the
    site file changes, so neither is transient."""
    for cause in causes(exc):
        name = type(cause).__name__
        if "SSL" in name or "Certificate" in name or name == "NameResolutionError":
            return True
        if isinstance(cause, OSError) and "Name or service not known" in str(cause):
            return True
    return False
