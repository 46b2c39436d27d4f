"""WORM locks and legal holds: what they keep from deletion (:func:`retention_hold`, used by
forget, prune and the link tables' pruning), and putting them on a recovery point
(:func:`protect`)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from regionvault.core.errors import IntegrityError, RetentionLocked
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._manifest import tree_records
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import Manifest, ProtectReport, ReleaseReport
from regionvault.core.types import ObjectInfo, RetentionMode

__all__ = [
    "Need",
    "delete_unless_held",
    "extend_for_protected_points",
    "objects_of",
    "protect",
    "protected_points",
    "release",
    "retention_hold",
]


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


@dataclass(frozen=True)
class Need:
    """The protection an object needs: the latest retain-until of the points that use it and
    its mode (compliance when any of them is compliance-locked: the stricter mode wins), and
    whether one of them is under legal hold."""

    until: datetime | None = None
    mode: RetentionMode = RetentionMode.GOVERNANCE
    legal_hold: bool = False

    @classmethod
    def of_point(cls, info: ObjectInfo, now: datetime) -> Need | None:
        """What a point's manifest (``info``) asks of every object the point uses: its lock
        while it lasts, its hold; None when it has neither."""
        until = info.retain_until if info.retain_until and info.retain_until > now else None
        if until is None and not info.legal_hold:
            return None
        # a lock whose mode the vault does not say is held as the stricter one; a hold alone
        # asks no mode
        mode = (
            RetentionMode.COMPLIANCE
            if until is not None and info.retention_mode is not RetentionMode.GOVERNANCE
            else RetentionMode.GOVERNANCE
        )
        return cls(until, mode, info.legal_hold)

    def merge(self, other: Need) -> Need:
        locks = [n for n in (self, other) if n.until is not None]
        compliance = any(n.mode is RetentionMode.COMPLIANCE for n in locks)
        return Need(
            max(n.until for n in locks if n.until is not None) if locks else None,
            RetentionMode.COMPLIANCE if compliance else RetentionMode.GOVERNANCE,
            self.legal_hold or other.legal_hold,
        )


def objects_of(
    store: Store, index: ChunkIndex, pool: ThreadPoolExecutor, manifest: Manifest
) -> list[str]:
    """The objects a point uses, as ``index`` maps its chunks: its packs, the index objects
    that list them, then its manifest (the order protect locks them in: the manifest last, so
    a manifest that carries a lock says the rest does)."""
    packs: set[str] = set()
    chunk_ids = set(manifest.tree_chunks)
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
    return (
        [fmt.pack_name(p) for p in sorted(packs)]
        + [fmt.index_name(i) for i in sorted(index_ids)]
        + [fmt.point_name(manifest.point.id)]
    )


def _extend(store: Store, info: ObjectInfo, need: Need, now: datetime) -> bool:
    """Give ``info``'s object at least ``need``: a lock only ever grows, and a compliance
    lock in force stays compliance (a governance one asked of it is kept as compliance, the
    stricter). Returns whether anything changed."""
    changed = False
    if need.until is not None:
        held = info.retain_until if info.retain_until and info.retain_until > now else None
        held_compliance = held is not None and info.retention_mode is not RetentionMode.GOVERNANCE
        mode = RetentionMode.COMPLIANCE if held_compliance else need.mode
        upgrade = (
            held is not None
            and mode is RetentionMode.COMPLIANCE
            and info.retention_mode is RetentionMode.GOVERNANCE
        )
        if held is None or held < need.until or upgrade:
            until = need.until if held is None else max(held, need.until)
            store.vault.set_retention(info.name, until, mode)
            changed = True
    if need.legal_hold and not info.legal_hold:
        store.vault.set_legal_hold(info.name, True)
        changed = True
    return changed


def protect(
    store: Store,
    manifest: Manifest,
    *,
    until: datetime | None,
    mode: RetentionMode,
    legal_hold: bool,
) -> ProtectReport:
    report = ProtectReport(manifest.point.id, until, legal_hold)
    index = store.load_index().index
    with ThreadPoolExecutor(max_workers=store.settings.worker_count() + 1) as pool:
        names = objects_of(store, index, pool, manifest)
    need = Need(until, mode, legal_hold)
    now = datetime.now(UTC)
    for name in names:
        if _extend(store, store.vault.head(name), need, now):
            report.locked.append(name)
        else:
            report.unchanged += 1
    return report


def protected_points(
    store: Store, manifests: Iterable[Manifest], now: datetime
) -> list[tuple[Manifest, Need]]:
    """The points whose manifest carries a lock in force or a legal hold, with it (nothing
    when the vault has neither capability: then no object can carry either). One HEAD per
    manifest: a listing need not say an object's lock (S3's does not)."""
    caps = store.vault.capabilities
    if not (caps.worm_lock or caps.legal_hold):
        return []
    found = []
    for manifest in manifests:
        need = Need.of_point(store.vault.head(fmt.point_name(manifest.point.id)), now)
        if need is not None:
            found.append((manifest, need))
    return found


def extend_for_protected_points(
    store: Store,
    protected: list[tuple[Manifest, Need]],
    now: datetime,
    *,
    skip: Collection[str] = (),
) -> tuple[int, list[str]]:
    """Extend the lock (and hold) of every object a locked or held point (``protected``,
    :func:`protected_points`) uses, as the live index maps it now, up to that point's own:
    prune calls this once its new index is written, so the packs it wrote and the index
    objects that now map a protected point's chunks are protected as long as the point, and
    nothing a protected point needs has a shorter lock than the point (as kopia's
    maintenance extends object-lock retention). Objects named in ``skip`` (the index objects
    prune is about to delete) are left as they are. One HEAD per object extended or not.
    Returns the count of objects extended and their names."""
    if not protected:
        return 0, []
    index = store.load_index().index
    needs: dict[str, Need] = {}
    with ThreadPoolExecutor(max_workers=store.settings.worker_count() + 1) as pool:
        for manifest, need in protected:
            for name in objects_of(store, index, pool, manifest):
                if name not in skip:
                    needs[name] = needs[name].merge(need) if name in needs else need
    extended = [
        name
        for name, need in sorted(needs.items())
        if _extend(store, store.vault.head(name), need, now)
    ]
    return len(extended), extended


def release(
    store: Store,
    manifest: Manifest,
    others: Iterable[Manifest],
    *,
    legal_hold: bool,
    bypass_governance: bool,
) -> ReleaseReport:
    """Lift what protects one point: its legal hold (``legal_hold``) and, with
    ``bypass_governance``, its governance lock. An object the point shares with another
    protected point keeps what that point needs (a hold stays on; a lock is shortened only
    down to the other point's). A compliance lock in force is never touched:
    :class:`RetentionLocked` names its date, before anything changes."""
    now = datetime.now(UTC)
    name = fmt.point_name(manifest.point.id)
    info = store.vault.head(name)
    report = ReleaseReport(manifest.point.id)
    held = info.retain_until if info.retain_until and info.retain_until > now else None
    if bypass_governance and held and info.retention_mode is not RetentionMode.GOVERNANCE:
        raise RetentionLocked(
            name,
            f"compliance retention until {held.isoformat(timespec='seconds')} "
            "cannot be lifted or shortened by anyone",
            provider=store.vault.provider,
            region=store.vault.region,
        )
    index = store.load_index().index
    needs: dict[str, Need] = {}
    with ThreadPoolExecutor(max_workers=store.settings.worker_count() + 1) as pool:
        mine = objects_of(store, index, pool, manifest)
        for other, need in protected_points(
            store, (m for m in others if m.point.id != manifest.point.id), now
        ):
            for object_name in objects_of(store, index, pool, other):
                needs[object_name] = (
                    needs[object_name].merge(need) if object_name in needs else need
                )
    for object_name in mine:
        current = store.vault.head(object_name)
        keep = needs.get(object_name, Need())
        changed = False
        if legal_hold and current.legal_hold and not keep.legal_hold:
            store.vault.set_legal_hold(object_name, False)
            changed = True
        if (
            bypass_governance
            and current.retain_until is not None
            and current.retain_until > now
            and current.retention_mode is RetentionMode.GOVERNANCE
            and (keep.until is None or keep.until < current.retain_until)
        ):
            # down to what the other points need, else to now: the lock is lifted (a vault
            # removes the retention given a past time with the bypass: S3 an empty Retention)
            store.vault.set_retention(
                object_name,
                keep.until or now,
                RetentionMode.GOVERNANCE,
                bypass_governance=True,
            )
            changed = True
        if changed:
            report.released.append(object_name)
        elif object_name in needs:
            report.kept.append(object_name)
    return report
