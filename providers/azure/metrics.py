"""Counting the HTTP requests the Azure provider's Blob Storage clients send: every attempt
(retries included), by region and operation, with request body bytes.

An operation is the method and what the request's query names: ``PUT blob`` (Put Blob),
``PUT block``, ``PUT blocklist``, ``GET blob`` (a read or ranged read), ``HEAD blob``,
``GET list`` (one listing page), ``DELETE blob``, ``PUT metadata`` (transit's ``has``),
``PUT container``, ``PUT immutabilityPolicies``, ``PUT legalhold``, ``POST userdelegationkey``.
Nothing here imports the Azure SDK: clients.py attaches :meth:`BlobMetrics.record` to each
client through an azure-core policy.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

__all__ = ["BlobMetrics", "Usage", "operation_of"]


def operation_of(method: str, url: str) -> str:
    query = parse_qs(urlsplit(url).query)
    comp = (query.get("comp") or [""])[0]
    if comp:
        return f"{method} {comp}"
    if (query.get("restype") or [""])[0] == "container":
        return f"{method} container"
    return f"{method} blob"


@dataclass(frozen=True)
class Usage:
    """Counts over a span of time (see :meth:`BlobMetrics.since`)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)

    def count(self, *, region: str | None = None, operation: str | None = None) -> int:
        return sum(
            n
            for (r, op), n in self.requests.items()
            if (region is None or r == region) and (operation is None or op == operation)
        )

    def bytes_sent(self, *, region: str | None = None) -> int:
        return sum(n for (r, _op), n in self.sent.items() if region is None or r == region)

    def by_operation(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_region, op), n in self.requests.items():
            out[op] += n
        return dict(sorted(out.items()))


class BlobMetrics:
    """Thread-safe request counts of one provider."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._sent: Counter[tuple[str, str]] = Counter()

    def record(self, region: str, method: str, url: str, body_bytes: int) -> None:
        key = (region, operation_of(method, url))
        with self._lock:
            self._requests[key] += 1
            self._sent[key] += body_bytes

    def snapshot(self) -> Usage:
        with self._lock:
            return Usage(Counter(self._requests), Counter(self._sent))

    def since(self, before: Usage) -> Usage:
        now = self.snapshot()
        requests = now.requests.copy()
        requests.subtract(before.requests)
        sent = now.sent.copy()
        sent.subtract(before.sent)
        return Usage(+requests, +sent)
