"""Links: a destination's map from one source region's chunk ids to its own, kept sealed in
its own vault (docs/format.md, "Links"), and how a prune there drops the links whose own
chunk is gone."""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import blake3
from regionvault.core.errors import IntegrityError, ObjectNotFound, RetentionLocked
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._retention import retention_hold
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import Problem

if TYPE_CHECKING:
    from regionvault.core.repository._index import ChunkIndex
    from regionvault.core.types import ObjectInfo

__all__ = [
    "LINK_PREFIX",
    "LinkPruneReport",
    "LinkTable",
    "decode_links",
    "keyed_tag",
    "prune_links",
]

log = logging.getLogger(__name__)

#: where a destination keeps its links from one source region's chunk ids
LINK_PREFIX = "links/"
#: prune writes a link table's live links back in objects of at most this many pairs
LINKS_PER_OBJECT = 1 << 18
#: ... and merges a table's objects into few once it has more than this many, even when
#: none of them holds a stale link (each ingested batch writes one; a copy reads them all)
LINK_OBJECTS_MERGED_AT = 64


class LinkTable:
    """The destination's map from one source region's chunk ids to its own, sealed in its
    vault as ``links/<source-tag>/<id>`` objects (each a batch of 64-byte pairs). A link is
    trusted only while its own chunk is still in the index (prune may have collected it)."""

    def __init__(self, store: Store, source_region: str) -> None:
        self.store = store
        # the source's name goes into object names only as a keyed hash
        tag = keyed_tag(self.store, source_region)
        self.prefix = f"{LINK_PREFIX}{tag}/"
        self.links: dict[bytes, bytes] = {}
        self._load()

    def _load(self) -> None:
        for info in self.store.vault.list(self.prefix):
            try:
                body = self.store.get_sealed(fmt.ObjectKind.LINKS, info.name)
                self.links.update(decode_links(info.name, body))
            except ObjectNotFound:
                continue  # merged into another object by a prune since the listing
            except IntegrityError as exc:
                raise IntegrityError(
                    exc.object_name,
                    f"{exc.reason} (`regionvault verify --repair` removes it; the chunks it "
                    "linked are then sent again)",
                ) from None

    def resolve(self, index: ChunkIndex, source_id: bytes) -> bytes | None:
        mine = self.links.get(source_id)
        return mine if mine is not None and mine in index else None

    def save(self, pairs: dict[bytes, bytes]) -> None:
        """Record new links, after the chunks they point at are durable and indexed."""
        if not pairs:
            return
        body = b"".join(a + b for a, b in pairs.items())
        self.store.put_sealed(
            fmt.ObjectKind.LINKS, f"{self.prefix}{fmt.new_id()}", body, if_absent=True
        )
        self.links.update(pairs)


def decode_links(name: str, body: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(body) % 64:
        raise IntegrityError(name, "link table has a torn entry")
    for i in range(0, len(body), 64):
        yield body[i : i + 32], body[i + 32 : i + 64]


def keyed_tag(store: Store, text: str) -> str:
    """A name part for ``text`` that does not reveal it: BLAKE3 keyed with the vault's
    chunk-id key, 128 bits in hex."""
    return blake3.blake3(b"links:" + text.encode(), key=store.config.chunk_id_key).hexdigest()[:32]


@dataclass
class LinkPruneReport:
    """What :func:`prune_links` did."""

    #: links dropped (their own chunk is in no live index any more)
    links_dropped: int = 0
    objects_written: int = 0
    objects_deleted: int = 0
    #: link objects a WORM lock or legal hold kept although they hold stale links
    skipped: list[Problem] = field(default_factory=list)
    #: link objects that do not authenticate (left alone, and logged)
    unreadable: list[str] = field(default_factory=list)


def prune_links(store: Store, live: Container[bytes], now: datetime) -> LinkPruneReport:
    """Drop the links whose own chunk is not in ``live`` (the chunk ids of the index a prune
    just made), called by prune under its exclusive lock.

    Per link table (``links/<tag>/``), when any of its objects holds a stale link (or it has
    more than :data:`LINK_OBJECTS_MERGED_AT` objects), the live links of all its objects are
    written into new objects first, and only then are the old objects deleted: a crash in
    between leaves each live link in two objects, which readers merge, never one lost. A
    table left with no live link is simply deleted. Objects under a WORM lock or legal hold
    are neither read into the new objects nor deleted (their stale links are harmless: a link
    counts only while its chunk is indexed); those with stale links are reported. An object
    that does not authenticate is left alone, with a logged warning."""
    report = LinkPruneReport()
    tables: dict[str, list[ObjectInfo]] = {}
    for info in store.vault.list(LINK_PREFIX):
        tag, _, object_id = info.name[len(LINK_PREFIX) :].partition("/")
        if object_id:
            tables.setdefault(tag, []).append(info)
    for tag, infos in sorted(tables.items()):
        kept: dict[bytes, bytes] = {}
        merged: list[str] = []  # unprotected objects whose live links go into ``kept``
        stale = 0
        for info in infos:
            try:
                pairs = list(
                    decode_links(info.name, store.get_sealed(fmt.ObjectKind.LINKS, info.name))
                )
            except ObjectNotFound:
                continue
            except IntegrityError as exc:
                log.warning("prune: leaving an unreadable link object alone: %s", exc)
                report.unreadable.append(info.name)
                continue
            dead = sum(1 for _, mine in pairs if mine not in live)
            reason = retention_hold(info, now)
            if reason is not None:
                if dead:
                    report.skipped.append(Problem(info.name, reason))
                continue
            stale += dead
            merged.append(info.name)
            kept.update((theirs, mine) for theirs, mine in pairs if mine in live)
        needed = -(-len(kept) // LINKS_PER_OBJECT)
        if not stale and len(merged) <= needed + LINK_OBJECTS_MERGED_AT:
            continue
        report.links_dropped += stale
        # new objects first, then the old ones go
        pairs_kept = list(kept.items())
        for start in range(0, len(pairs_kept), LINKS_PER_OBJECT):
            body = b"".join(a + b for a, b in pairs_kept[start : start + LINKS_PER_OBJECT])
            name = f"{LINK_PREFIX}{tag}/{fmt.new_id()}"
            store.put_sealed(fmt.ObjectKind.LINKS, name, body, if_absent=True)
            report.objects_written += 1
        for name in merged:
            try:
                store.vault.delete(name)
            except RetentionLocked as exc:  # locked since it was listed
                report.skipped.append(Problem(name, exc.reason))
            else:
                report.objects_deleted += 1
    return report
