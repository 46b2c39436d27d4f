"""Counting what the AWS provider asks of AWS: HTTP requests per region, service, operation.

Hooked onto each boto3 client through botocore's ``before-send`` event, so every HTTP request
is counted once, retries included (they are requests AWS bills and rate-limits). The lead's
"KMS calls and S3 requests per GiB" figures come from here::

    metrics = site.registry.get("aws").metrics
    before = metrics.snapshot()
    ...  # back up, copy
    delta = metrics.since(before)
    delta.count(service="kms"), delta.count(service="s3")
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

__all__ = ["AwsMetrics", "MetricsSnapshot"]

#: (AWS region, service, operation), e.g. ("us-east-1", "s3", "PutObject")
MetricKey = tuple[str, str, str]


class MetricsSnapshot:
    """Request counts frozen at one moment; subtract two with :meth:`AwsMetrics.since`."""

    def __init__(self, counts: Mapping[MetricKey, int], sent_bytes: Mapping[MetricKey, int]):
        self.counts: Mapping[MetricKey, int] = dict(counts)
        self.sent_bytes: Mapping[MetricKey, int] = dict(sent_bytes)

    def count(
        self, *, service: str | None = None, operation: str | None = None, region: str | None = None
    ) -> int:
        """Requests matching every filter given (None matches all)."""
        return sum(n for key, n in self.counts.items() if _matches(key, region, service, operation))

    def bytes_sent(
        self, *, service: str | None = None, operation: str | None = None, region: str | None = None
    ) -> int:
        """Request body bytes sent, matching every filter given."""
        return sum(
            n for key, n in self.sent_bytes.items() if _matches(key, region, service, operation)
        )

    def by_operation(self) -> dict[str, int]:
        """``{"s3.PutObject": n, ...}`` over all regions, for reports."""
        out: Counter[str] = Counter()
        for (_region, service, operation), n in self.counts.items():
            out[f"{service}.{operation}"] += n
        return dict(sorted(out.items()))

    def __repr__(self) -> str:
        return f"MetricsSnapshot({self.by_operation()!r})"


def _matches(
    key: MetricKey, region: str | None, service: str | None, operation: str | None
) -> bool:
    return (
        (region is None or key[0] == region)
        and (service is None or key[1] == service)
        and (operation is None or key[2] == operation)
    )


def _body_size(request: Any) -> int:
    """Payload bytes of a prepared request: the decoded length of an aws-chunked body (a
    body with a trailing checksum), else Content-Length."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return 0
    for name in ("X-Amz-Decoded-Content-Length", "Content-Length"):
        value = headers.get(name)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                return 0
    body = getattr(request, "body", None)
    return len(body) if isinstance(body, bytes | bytearray) else 0


class AwsMetrics:
    """Thread-safe request counters shared by every client one provider object makes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[MetricKey] = Counter()
        self._bytes: Counter[MetricKey] = Counter()

    def attach(self, client: Any, region: str) -> None:
        """Count every HTTP request ``client`` (a boto3 client in ``region``) sends."""
        service = str(client.meta.service_model.service_name)

        def on_send(request: Any = None, event_name: str = "", **_: Any) -> None:
            # event_name is "before-send.<service id>.<Operation>"; returning None lets the
            # request go ahead (a returned value would replace the response)
            operation = event_name.rsplit(".", 1)[-1] if event_name else "?"
            size = _body_size(request)
            key = (region, service, operation)
            with self._lock:
                self._counts[key] += 1
                if size:
                    self._bytes[key] += size

        client.meta.events.register("before-send", on_send)

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(self._counts, self._bytes)

    def since(self, before: MetricsSnapshot) -> MetricsSnapshot:
        """What was counted after ``before`` was taken."""
        now = self.snapshot()
        counts = {k: n - before.counts.get(k, 0) for k, n in now.counts.items()}
        sent = {k: n - before.sent_bytes.get(k, 0) for k, n in now.sent_bytes.items()}
        return MetricsSnapshot(
            {k: n for k, n in counts.items() if n}, {k: n for k, n in sent.items() if n}
        )

    def count(
        self, *, service: str | None = None, operation: str | None = None, region: str | None = None
    ) -> int:
        return self.snapshot().count(service=service, operation=operation, region=region)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._bytes.clear()
