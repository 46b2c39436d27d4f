"""WORM locks and legal holds: what they keep from deletion (:func:`retention_hold`, used by
forget, prune and the link tables' pruning), and putting them on a recovery point
(:func:`protect`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from regionvault.core.errors import IntegrityError, RetentionLocked
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._manifest import tree_records
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import Manifest, ProtectReport
from regionvault.core.types import ObjectInfo, RetentionMode

__all__ = ["delete_unless_held", "protect", "retention_hold"]


def retention_hold(info: ObjectInfo, now: datetime) -> str | None:
    """Why ``info``'s object may not be deleted at ``now`` (a legal hold, a WORM lock not yet
    ended), or None."""
    if info.legal_hold:
        return "a legal hold is on"
    if info.retain_until is not None and info.retain_until > now:
        return f"retained until {info.retain_until.isoformat(timespec='seconds')}"
    return None


def delete_unless_held(store: Store, name: str) -> str | None:
    """Delete ``name``; the reason when a lock or hold refused it."""
    try:
        store.vault.delete(name)
    except RetentionLocked as exc:
        return exc.reason
    return None


def protect(
    store: Store,
    manifest: Manifest,
    *,
    until: datetime | None,
    mode: RetentionMode,
    legal_hold: bool,
) -> ProtectReport:
    report = ProtectReport(manifest.point.id, until, legal_hold)
    state = store.load_index()
    index = state.index
    packs: set[str] = set()
    chunk_ids = set(manifest.tree_chunks)
    with ThreadPoolExecutor(max_workers=store.settings.worker_count() + 1) as pool:
        for record in tree_records(store, index, pool, manifest):
            chunk_ids.update(record.chunk_ids())
    for chunk_id in chunk_ids:
        loc = index.get(chunk_id)
        if loc is None:
            raise IntegrityError(
                fmt.point_name(manifest.point.id), f"chunk {chunk_id.hex()[:16]} is in no index"
            )
        packs.add(loc.pack_id)
    index_ids = {i for p in packs for i in index.packs[p].index_ids}
    names = (
        [fmt.pack_name(p) for p in sorted(packs)]
        + [fmt.index_name(i) for i in sorted(index_ids)]
        + [fmt.point_name(manifest.point.id)]
    )
    for name in names:
        info = store.vault.head(name)
        changed = False
        if until is not None and (info.retain_until is None or info.retain_until < until):
            store.vault.set_retention(name, until, mode)
            changed = True
        if legal_hold and not info.legal_hold:
            store.vault.set_legal_hold(name, True)
            changed = True
        if changed:
            report.locked.append(name)
        else:
            report.unchanged += 1
    return report
