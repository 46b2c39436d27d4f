"""Sent notices and receipts: two small sealed payloads that let each region run its own
tick with its own keys alone (docs/copy.md, "Receipts"). The source's *sent notice* tells
the destination that every batch it asked for has landed (and how long to keep the copy);
the destination's *receipt* tells the source that it holds the copy, so the source stops
offering the point."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import IntegrityError
from regionvault.core.repository.copy.names import receipt_name, sent_name
from regionvault.core.repository.copy.payloads import open_payload, seal_payload

if TYPE_CHECKING:
    from regionvault.core.interfaces import KeyService, Sealer
    from regionvault.core.types import RecoveryPoint

__all__ = [
    "CopyReceipt",
    "SentNotice",
    "open_receipt",
    "open_sent_notice",
    "parse_time",
    "seal_receipt",
    "seal_sent_notice",
]

_SENT_MAGIC = b"RVSN"
_RECEIPT_MAGIC = b"RVRC"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def parse_time(value: Any, name: str, field: str, *, optional: bool) -> datetime | None:
    """``field`` of the object ``name``: an ISO 8601 time with a time zone (None, when
    ``optional``); :class:`IntegrityError` naming the object otherwise."""
    if value is None and optional:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise IntegrityError(name, f"{field} {value!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise IntegrityError(name, f"{field} {value!r} has no time zone")
    return moment


def _json_body(magic: bytes, doc: dict[str, Any]) -> bytes:
    return magic + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _read_body(magic: bytes, name: str, body: bytes, expect: dict[str, str]) -> dict[str, Any]:
    if body[:4] != magic:
        raise IntegrityError(name, f"not a {magic.decode()} body")
    try:
        doc = json.loads(body[4:])
    except ValueError:
        raise IntegrityError(name, "body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise IntegrityError(name, "unknown format (expected 1)")
    for field, value in expect.items():
        if doc.get(field) != value:
            raise IntegrityError(name, f"{field} is {doc.get(field)!r}, expected {value!r}")
    return doc


@dataclass(frozen=True)
class SentNotice:
    """The source's word, sealed for the destination, that every batch the destination asked
    for has landed in its inbox: the destination may commit. It carries the copy's expiry,
    which the source's policy decides."""

    recovery_point: str
    source: str
    destination: str
    expires_at: datetime | None
    batches: int = 0
    chunks_sent: int = 0


def seal_sent_notice(sealer: Sealer, notice: SentNotice) -> bytes:
    """``notice`` as a payload for ``copy/<point>/sent``, sealed for the destination."""
    body = _json_body(
        _SENT_MAGIC,
        {
            "format": 1,
            "recovery_point": notice.recovery_point,
            "source": notice.source,
            "destination": notice.destination,
            "expires_at": _iso(notice.expires_at),
            "batches": notice.batches,
            "chunks_sent": notice.chunks_sent,
        },
    )
    return seal_payload(
        sealer,
        sent_name(notice.recovery_point),
        body,
        kind="sent",
        source=notice.source,
        destination=notice.destination,
    )


def open_sent_notice(
    keys: KeyService, point_id: str, data: bytes, *, source: str, destination: str
) -> SentNotice:
    """Open the sent notice for ``point_id`` that ``source`` sealed for ``destination``
    (``keys``, the destination's); :class:`IntegrityError` naming it if it does not say what
    its name and seal say."""
    name = sent_name(point_id)
    body = open_payload(keys, name, data, kind="sent", source=source, destination=destination)
    expect = {"recovery_point": point_id, "source": source, "destination": destination}
    doc = _read_body(_SENT_MAGIC, name, body, expect)
    try:
        batches, chunks = int(doc.get("batches", 0)), int(doc.get("chunks_sent", 0))
    except (TypeError, ValueError):
        raise IntegrityError(name, "batch or chunk count is not a number") from None
    return SentNotice(
        point_id,
        source,
        destination,
        parse_time(doc.get("expires_at"), name, "expires_at", optional=True),
        batches,
        chunks,
    )


@dataclass(frozen=True)
class CopyReceipt:
    """The destination's word, sealed for the source, that it holds a committed copy of the
    source's point. The source records it in its own vault (:class:`CopyTracker`) and stops
    offering the point."""

    #: the source's point, its region, and the region holding the copy
    recovery_point: str
    source: str
    destination: str
    #: the copy's id in the destination, when it was committed and when it expires
    copy: str
    committed_at: datetime
    expires_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "recovery_point": self.recovery_point,
            "source": self.source,
            "destination": self.destination,
            "copy": self.copy,
            "committed_at": self.committed_at.isoformat(),
            "expires_at": _iso(self.expires_at),
        }

    @classmethod
    def from_dict(cls, name: str, doc: dict[str, Any]) -> CopyReceipt:
        for field in ("recovery_point", "source", "destination", "copy"):
            if not isinstance(doc.get(field), str) or not doc[field]:
                raise IntegrityError(name, f"receipt lacks {field!r}")
        committed = parse_time(doc.get("committed_at"), name, "committed_at", optional=False)
        assert committed is not None
        return cls(
            doc["recovery_point"],
            doc["source"],
            doc["destination"],
            doc["copy"],
            committed,
            parse_time(doc.get("expires_at"), name, "expires_at", optional=True),
        )

    @classmethod
    def of(cls, source: str, recovery_point: str, copy: RecoveryPoint) -> CopyReceipt:
        """The receipt for ``copy`` (in its own region) of ``source``'s ``recovery_point``."""
        return cls(recovery_point, source, copy.region, copy.id, copy.created_at, copy.expires_at)


def seal_receipt(sealer: Sealer, receipt: CopyReceipt) -> bytes:
    """``receipt`` as a payload for ``copy/<point>/receipt`` in the source's inbox, sealed
    with the source's Sealer (the destination sends it)."""
    return seal_payload(
        sealer,
        receipt_name(receipt.recovery_point),
        _json_body(_RECEIPT_MAGIC, receipt.to_dict()),
        kind="receipt",
        source=receipt.destination,
        destination=receipt.source,
    )


def open_receipt(
    keys: KeyService, point_id: str, data: bytes, *, source: str, destination: str
) -> CopyReceipt:
    """Open the receipt for ``point_id`` that the copy's ``destination`` sealed for its
    ``source`` (``keys``, the source's: the receipt travels destination to source)."""
    name = receipt_name(point_id)
    body = open_payload(keys, name, data, kind="receipt", source=destination, destination=source)
    expect = {"recovery_point": point_id, "source": source, "destination": destination}
    return CopyReceipt.from_dict(name, _read_body(_RECEIPT_MAGIC, name, body, expect))
