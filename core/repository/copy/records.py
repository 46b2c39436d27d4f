"""Copy records: what a source region keeps, in its own vault under its own keys, about the
copies of its points (:class:`CopyTracker`; docs/format.md, "Copies")."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository.copy.names import keyed_tag
from regionvault.core.repository.copy.notices import CopyReceipt, parse_time

if TYPE_CHECKING:
    from regionvault.core.repository.repository import Repository

__all__ = ["CopyTracker"]


class CopyTracker:
    """What a source region knows about its copies, kept in its own vault under its own
    keys: per destination and point, when it last offered the point (``offered``) and the
    destination's receipt (``receipt``). Nothing of it is plaintext.

    Objects are ``copies/<destination tag>/<point id>/offered`` (replaced by every offer) and
    ``.../receipt`` (written once, if absent): sealed objects of kind ``COPIES`` (docs/format.md,
    the envelope under the repository's master key) holding JSON. The tag is a keyed hash of
    the destination's name (:func:`~regionvault.core.repository.copy.names.keyed_tag`), so names
    do not say which region a copy went to.
    """

    PREFIX = fmt.COPIES_PREFIX

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self._store = repository._ensure_open()

    def _name(self, destination: str, point_id: str, what: str) -> str:
        return f"{self.PREFIX}{keyed_tag(self._store, f'tracker:{destination}')}/{point_id}/{what}"

    def _put(self, name: str, doc: dict[str, Any], *, if_absent: bool = False) -> None:
        body = json.dumps(doc, sort_keys=True).encode()
        self._store.put_sealed(fmt.ObjectKind.COPIES, name, body, if_absent=if_absent)

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            body = self._store.get_sealed(fmt.ObjectKind.COPIES, name)
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise IntegrityError(name, "copy tracker object is not a JSON object")
        return doc

    def offered_at(self, destination: str, point_id: str) -> datetime | None:
        """When ``point_id`` was last offered to ``destination`` (None: never)."""
        name = self._name(destination, point_id, "offered")
        doc = self._get(name)
        return None if doc is None else parse_time(doc.get("at"), name, "at", optional=False)

    def mark_offered(self, destination: str, point_id: str, at: datetime) -> None:
        self._put(
            self._name(destination, point_id, "offered"),
            {"point": point_id, "destination": destination, "at": at.isoformat()},
        )

    def receipt(self, destination: str, point_id: str) -> CopyReceipt | None:
        """``destination``'s receipt for ``point_id``, if one was recorded."""
        name = self._name(destination, point_id, "receipt")
        doc = self._get(name)
        return None if doc is None else CopyReceipt.from_dict(name, doc)

    def record(self, receipt: CopyReceipt) -> bool:
        """Record ``receipt`` (once: True when it was new, False when one was there)."""
        if receipt.source != self.repository.region:
            raise RegionVaultError(
                f"a receipt for {receipt.source}'s point cannot be kept in "
                f"{self.repository.region}",
                region=self.repository.region,
            )
        name = self._name(receipt.destination, receipt.recovery_point, "receipt")
        if self._get(name) is not None:
            return False
        try:
            self._put(name, receipt.to_dict(), if_absent=True)
        except ObjectExists:
            return False  # another runner recorded it meanwhile
        return True

    def tidy(self, live_points: set[str]) -> int:
        """Delete what is kept for points no longer in the repository; returns how many
        objects went."""
        gone = 0
        for info in list(self.repository.vault.list(self.PREFIX)):
            parts = info.name[len(self.PREFIX) :].split("/")
            if len(parts) == 3 and parts[1] not in live_points:
                try:
                    self.repository.vault.delete(info.name)
                except RetentionLocked:
                    continue  # a vault-wide lock: it goes when the lock ends
                gone += 1
        return gone
