"""The names the copy protocol gives things: its payloads in an inbox (``copy/<point>/...``,
docs/copy.md), and the name parts in a vault that must not say what they name (a source
region's links, a copy's id, a source's copy records), keyed hashes under the vault's own
chunk-id key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionvault.core.repository._links import keyed_tag

if TYPE_CHECKING:
    from regionvault.core.repository._store import Store

__all__ = [
    "batch_prefix",
    "copy_point_id",
    "keyed_tag",
    "offer_name",
    "receipt_name",
    "request_name",
    "sent_name",
]


def offer_name(point_id: str) -> str:
    return f"copy/{point_id}/offer"


def request_name(point_id: str) -> str:
    return f"copy/{point_id}/request"


def batch_prefix(point_id: str) -> str:
    return f"copy/{point_id}/batch-"


def sent_name(point_id: str) -> str:
    """The source's notice, in the destination's inbox, that it sent every batch asked for."""
    return f"copy/{point_id}/sent"


def receipt_name(point_id: str) -> str:
    """The destination's receipt, in the source's inbox, for a copy it holds."""
    return f"copy/{point_id}/receipt"


def copy_point_id(store: Store, source_region: str, source_point: str) -> str:
    """The id a copy of ``source_point`` from ``source_region`` has in this repository."""
    return keyed_tag(store, f"copy:{source_region}:{source_point}")
