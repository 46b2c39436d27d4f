"""Prune: remove the data no recovery point uses, in the order that makes a crash at any
point harmless (new packs, a new index superseding the old, then deletions), skipping what a
WORM lock or legal hold keeps; then the links of a copy destination to chunks gone.

Prune lists and deletes only packs, index objects and link objects (and the temporaries of
killed writers): the event log (``events/``) is never listed here, so no prune ever deletes
an event, however old (docs/format.md section 17)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from regionvault.core.errors import IntegrityError
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._links import prune_links
from regionvault.core.repository._locks import RepositoryLock
from regionvault.core.repository._manifest import load_manifests, tree_records
from regionvault.core.repository._pipeline import Aborted, Failure, PackWriter
from regionvault.core.repository._retention import (
    delete_unless_held,
    extend_for_protected_points,
    retention_hold,
)
from regionvault.core.repository._store import IndexState, Store
from regionvault.core.repository._verify import remove_stale_temporaries
from regionvault.core.repository.model import (
    Manifest,
    Problem,
    Progress,
    ProgressCallback,
    PruneReport,
)
from regionvault.core.types import ObjectInfo

__all__ = ["PrunePlan", "plan_prune", "prune"]

log = logging.getLogger(__name__)

#: index objects written by prune hold at most this many blobs each
_INDEX_BLOBS = 100_000


@dataclass
class PrunePlan:
    """What a prune would do, decided from the index, the manifests and one pack listing
    (:func:`plan_prune`): nothing is written or deleted to make it."""

    state: IndexState
    manifests: list[Manifest]
    #: the vault's pack objects by name
    listing: dict[str, ObjectInfo]
    #: each kept or rewritten pack's blobs that points use
    live: dict[str, list[fmt.BlobEntry]]
    keep: list[str]
    rewrite: list[str]
    #: packs nothing uses (those a lock or hold keeps are skipped when pruning)
    drop: list[str]
    #: pack objects no index names (leftovers of killed writers)
    leftovers: list[str]
    #: indexed packs that are in the vault
    present: list[str]
    now: datetime

    @property
    def writes_index(self) -> bool:
        """Whether the prune writes a new index, superseding (and deleting) the objects of
        the one there: when packs go, or the index is in several objects, or leftovers."""
        index = self.state.index
        vanished = len(index.packs) - len(self.present)  # indexed packs not in the vault
        changed = bool(
            self.rewrite or self.drop or vanished or len(self.state.objects) != len(self.state.live)
        )
        return changed or len(self.state.live) > 1 or bool(self.leftovers)

    def locked(self, pack_id: str) -> str | None:
        """Why a WORM lock or legal hold keeps ``pack_id``, or None."""
        info = self.listing.get(fmt.pack_name(pack_id))
        return None if info is None else retention_hold(info, self.now)


def plan_prune(store: Store, *, max_unused: float) -> PrunePlan:
    """Decide which packs a prune keeps, rewrites and deletes; reads only."""
    now = datetime.now(UTC)
    # the manifests before the index: a backup commits its packs, then its index, then its
    # manifest, so every point listed here has its chunks in the index read next, even
    # when the plan is made without a lock (a dry run) while backups commit
    manifests, _ = load_manifests(store)
    state = store.load_index(keep_blobs=True)
    index = state.index
    blobs_of = index.pack_blobs or {}
    used: set[bytes] = set()
    workers = store.settings.worker_count()
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        for manifest in manifests:
            used.update(manifest.tree_chunks)
            for record in tree_records(store, index, pool, manifest):
                used.update(record.chunk_ids())
    missing = [c for c in used if c not in index]
    if missing:
        raise IntegrityError(
            "index",
            f"{len(missing)} chunk(s) that recovery points use are in no index; prune refuses "
            "to delete anything (run rebuild_index, then verify)",
        )
    listing = {info.name: info for info in store.vault.list(fmt.PACK_PREFIX)}
    for pack_id in index.packs:
        if fmt.pack_name(pack_id) not in listing and any(
            b.chunk_id in used for b in blobs_of.get(pack_id, [])
        ):
            raise IntegrityError(fmt.pack_name(pack_id), "pack is missing, yet points use it")

    def locked(pack_id: str) -> str | None:
        info = listing.get(fmt.pack_name(pack_id))
        return None if info is None else retention_hold(info, now)

    # claim each used chunk once: first from packs that are wholly used, then the rest
    claimed: set[bytes] = set()
    live: dict[str, list[fmt.BlobEntry]] = {}
    present = [p for p in sorted(index.packs) if fmt.pack_name(p) in listing]
    whole = [p for p in present if all(b.chunk_id in used for b in blobs_of.get(p, []))]
    for pack_id in whole:
        live[pack_id] = list(blobs_of.get(pack_id, []))
        claimed.update(b.chunk_id for b in live[pack_id])
    keep: list[str] = list(whole)
    rewrite: list[str] = []
    drop: list[str] = []
    for pack_id in present:
        if pack_id in live:
            continue
        blobs = blobs_of.get(pack_id, [])
        mine = []
        for b in blobs:
            if b.chunk_id in used and b.chunk_id not in claimed:
                claimed.add(b.chunk_id)
                mine.append(b)
        live[pack_id] = mine
        unused_bytes = sum(b.length for b in blobs) - sum(b.length for b in mine)
        total_bytes = sum(b.length for b in blobs) or 1
        if locked(pack_id) is not None:
            if mine:
                keep.append(pack_id)
            else:
                drop.append(pack_id)  # skipped below, and reported
        elif not mine:
            drop.append(pack_id)
        elif unused_bytes / total_bytes > max_unused:
            rewrite.append(pack_id)
        else:
            keep.append(pack_id)
    leftovers = sorted(set(listing) - {fmt.pack_name(p) for p in index.packs})
    return PrunePlan(state, manifests, listing, live, keep, rewrite, drop, leftovers, present, now)


def prune(
    store: Store,
    *,
    lock: RepositoryLock,
    max_unused: float,
    progress: ProgressCallback | None,
) -> PruneReport:
    report = PruneReport(stale_locks_removed=lock.stale_removed)
    plan = plan_prune(store, max_unused=max_unused)
    now, state, manifests, listing = plan.now, plan.state, plan.manifests, plan.listing
    index = state.index
    blobs_of = index.pack_blobs or {}
    report.points = len(manifests)
    report.packs_before = len(listing)
    locked = plan.locked
    live, keep, rewrite, drop = plan.live, plan.keep, plan.rewrite, plan.drop

    # copy the live blobs of packs being rewritten into new packs
    failure = Failure()
    writer = PackWriter(store, failure, write_index=False, keep_packs=True)
    try:
        for done, pack_id in enumerate(rewrite, 1):
            name = fmt.pack_name(pack_id)
            data = store.vault.get(name)
            key = store.pack_key(pack_id, index.packs[pack_id].header)
            view = memoryview(data)
            for b in live[pack_id]:
                payload, _ = store.open_blob(
                    key, b.chunk_id, b.blob_type, b.flags, b.offset, b.raw_length,
                    view[b.offset : b.offset + b.length],
                )  # fmt: skip
                writer.add(b.chunk_id, b.blob_type, b.flags, b.raw_length, payload)
            report.blobs_removed += len(index.pack_blobs[pack_id]) - len(live[pack_id])  # type: ignore[index]
            if progress is not None:
                progress(Progress(operation="prune", files_done=done, files_total=len(rewrite)))
        new_packs = writer.close()
    except BaseException as exc:
        failure.set(exc)
        writer.abort()
        if isinstance(exc, Aborted) and failure.error is not None:
            raise failure.error from None  # the writer thread's error (disk full ...)
        raise
    report.packs_rewritten = len(rewrite)
    report.packs_written = len(new_packs)
    report.blobs_removed += sum(len(blobs_of.get(p, [])) for p in drop if locked(p) is None)

    # a new index: every kept pack and every new one; its last object supersedes the old
    entries = [
        fmt.IndexPack(p, index.packs[p].size, index.packs[p].header, blobs_of.get(p, []))
        for p in keep
    ] + new_packs
    extended = False
    leftovers = plan.leftovers
    if plan.writes_index:
        lock.check()
        groups: list[list[fmt.IndexPack]] = [[]]
        count = 0
        for pack in entries:
            if count >= _INDEX_BLOBS:
                groups.append([])
                count = 0
            groups[-1].append(pack)
            count += len(pack.blobs)
        for group in groups[:-1]:
            store.write_index(group)
        store.write_index(groups[-1], supersedes=state.objects)
        report.indexes_written = len(groups)
        # before anything is deleted: what a locked or held point uses, as the new index maps
        # it (the packs just written, the index objects just written), is protected as long
        # as the point
        report.locks_extended = _extend_locks(store, manifests, now)
        extended = True
        for index_id in sorted(state.objects):
            name = fmt.index_name(index_id)
            reason = retention_hold(state.objects[index_id], now)
            if reason is None:
                reason = delete_unless_held(store, name)
            if reason is None:
                report.indexes_deleted += 1
            else:
                report.skipped.append(Problem(name, reason))

    if not extended:  # no new index: the one there maps the same, extended all the same
        report.locks_extended = _extend_locks(store, manifests, now)

    # delete what nothing uses any more: rewritten, unused and unindexed packs
    freed = 0
    for name in [fmt.pack_name(p) for p in rewrite + drop] + leftovers:
        info = listing[name]
        reason = retention_hold(info, now) or delete_unless_held(store, name)
        if reason is None:
            report.packs_deleted += 1
            freed += info.size
        else:
            report.skipped.append(Problem(name, reason))
    report.bytes_freed = freed - sum(p.size for p in new_packs)

    # a copy destination's links to chunks no longer indexed go, once the new index is
    # written (a link counts only while its chunk is indexed, so this only tidies)
    links = prune_links(store, {b.chunk_id for pack in entries for b in pack.blobs}, now)
    report.skipped.extend(links.skipped)
    if links.objects_written or links.objects_deleted:
        log.info(
            "prune: %d stale link(s) dropped, %d link object(s) written, %d deleted",
            links.links_dropped,
            links.objects_written,
            links.objects_deleted,
        )
    report.temporaries_removed = len(remove_stale_temporaries(store))
    if progress is not None:
        progress(Progress(operation="prune", done=True))
    return report


def _extend_locks(store: Store, manifests: list[Manifest], now: datetime) -> int:
    """Extend the locks and holds of the objects protected points use, up to each point's
    own (:func:`extend_for_protected_points`); a crash after the new index and before this
    loses nothing, since the next prune extends them again."""
    count, names = extend_for_protected_points(store, manifests, now)
    if count:
        log.info("prune: locks extended on %d object(s): %s", count, ", ".join(names[:5]))
    return count
