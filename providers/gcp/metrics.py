"""Counting the calls the GCP provider makes: Cloud Storage HTTP requests (every attempt,
retries included) and Cloud KMS RPCs, by region, service and operation, with the bytes sent.

An operation is a short name the service module gives: for storage the method and what the
request does (``POST upload``, ``PUT upload-chunk``, ``GET media``, ``GET list``,
``DELETE object``, ``PATCH object``...), for KMS the RPC's name (``Encrypt``, ``Decrypt``,
``GetPublicKey``, ``AsymmetricDecrypt``...). Nothing here imports the SDK.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["GcpMetrics", "Usage"]

Key = tuple[str, str, str]  # (region, service, operation)


@dataclass(frozen=True)
class Usage:
    """Counts over a span of time (see :meth:`GcpMetrics.since`)."""

    requests: Counter[Key] = field(default_factory=Counter)
    sent: Counter[Key] = field(default_factory=Counter)

    def count(
        self,
        *,
        region: str | None = None,
        service: str | None = None,
        operation: str | None = None,
    ) -> int:
        return sum(
            n
            for (r, s, op), n in self.requests.items()
            if (region is None or r == region)
            and (service is None or s == service)
            and (operation is None or op == operation)
        )

    def bytes_sent(self, *, region: str | None = None, service: str | None = None) -> int:
        return sum(
            n
            for (r, s, _op), n in self.sent.items()
            if (region is None or r == region) and (service is None or s == service)
        )

    def by_operation(self, service: str | None = None) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_region, s, op), n in self.requests.items():
            if service is None or s == service:
                out[f"{s} {op}"] += n
        return dict(sorted(out.items()))


class GcpMetrics:
    """Thread-safe call counts of one provider (``GcpProvider.metrics``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[Key] = Counter()
        self._sent: Counter[Key] = Counter()

    def record(self, region: str, service: str, operation: str, body_bytes: int = 0) -> None:
        key = (region, service, operation)
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
