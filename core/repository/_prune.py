"""Prune: remove the data no recovery point uses, in the order that makes a crash at any
point harmless (new packs, a new index superseding the old, then deletions), skipping what a
WORM lock or legal hold keeps; then the links of a copy destination to chunks gone.

Prune lists and deletes only packs, index objects and link objects (and the temporaries of
killed writers): the event log (``events/``) is never listed here, so no prune ever deletes
an event, however old (docs/format.md section 17)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from regionvault.core.errors import IntegrityError
from regionvault.core.interfaces import Vault
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._links import prune_links
from regionvault.core.repository._locks import RepositoryLock
from regionvault.core.repository._manifest import load_manifests, tree_records
from regionvault.core.repository._pipeline import Aborted, Failure, PackWriter
from regionvault.core.repository._retention import (
    Need,
    delete_unless_held,
    extend_for_protected_points,
    protected_points,
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
    #: the locked or held points, each with what it needs (their manifests HEADed once)
    protected: list[tuple[Manifest, Need]] = field(default_factory=list)
    #: pack objects a locked or held point uses: never rewritten nor dropped
    shielded: set[str] = field(default_factory=set)
    #: the vault's own answer (a HEAD) for packs whose listing said no lock
    heads: dict[str, str | None] = field(default_factory=dict)
    #: whether the vault can lock at all (else no HEAD is asked)
    can_lock: bool = False
    vault: Vault | None = None

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
        """Why a WORM lock or legal hold keeps ``pack_id``, or None: a locked or held point
        uses it, or the listing says it is locked."""
        name = fmt.pack_name(pack_id)
        if name in self.shielded:
            return "a locked or held point uses it"
        info = self.listing.get(name)
        return None if info is None else retention_hold(info, self.now)

    def locked_now(self, pack_id: str) -> str | None:
        """:meth:`locked`, and where the listing says no lock, the vault's HEAD (asked once
        per pack prune would rewrite or delete, only of a vault that can lock: S3's listing
        does not say an object's lock)."""
        reason = self.locked(pack_id)
        if reason is not None or not self.can_lock or self.vault is None:
            return reason
        name = fmt.pack_name(pack_id)
        if name not in self.heads:
            self.heads[name] = retention_hold(self.vault.head(name), self.now)
        return self.heads[name]


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
    # what locked or held points use (their manifests HEADed once: a listing need not say
    # an object's lock, S3's does not) is never rewritten nor dropped, whatever the listing
    # says: their data never moves out of the objects their lock protects
    protected = protected_points(store, manifests, now)
    protected_ids = {m.point.id for m, _need in protected}
    used: set[bytes] = set()
    shielded_chunks: set[bytes] = set()
    workers = store.settings.worker_count()
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        for manifest in manifests:
            chunks = set(manifest.tree_chunks)
            for record in tree_records(store, index, pool, manifest):
                chunks.update(record.chunk_ids())
            used.update(chunks)
            if manifest.point.id in protected_ids:
                shielded_chunks.update(chunks)
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

    shielded = {
        fmt.pack_name(loc.pack_id)
        for loc in (index.get(c) for c in shielded_chunks)
        if loc is not None
    }
    caps = store.vault.capabilities
    plan = PrunePlan(
        state, manifests, listing, {}, [], [], [], [], [], now,
        protected=protected, shielded=shielded, can_lock=caps.worm_lock or caps.legal_hold,
        vault=store.vault,
    )  # fmt: skip
    locked_now = plan.locked_now

    # claim each used chunk once: first from packs that are wholly used, then from the packs
    # protected points use, then the rest
    claimed: set[bytes] = set()
    live: dict[str, list[fmt.BlobEntry]] = {}
    present = [p for p in sorted(index.packs) if fmt.pack_name(p) in listing]
    whole = [p for p in present if all(b.chunk_id in used for b in blobs_of.get(p, []))]
    for pack_id in whole:
        live[pack_id] = list(blobs_of.get(pack_id, []))
        claimed.update(b.chunk_id for b in live[pack_id])
    keep: list[str] = list(whole)
    for pack_id in present:
        if pack_id not in live and fmt.pack_name(pack_id) in shielded:
            live[pack_id] = [b for b in blobs_of.get(pack_id, []) if b.chunk_id in used]
            claimed.update(b.chunk_id for b in live[pack_id])
            keep.append(pack_id)
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
        if not mine:
            drop.append(pack_id)  # a locked one is skipped below, and reported
        elif unused_bytes / total_bytes > max_unused and locked_now(pack_id) is None:
            rewrite.append(pack_id)
        else:
            keep.append(pack_id)
    plan.live, plan.keep, plan.rewrite, plan.drop, plan.present = live, keep, rewrite, drop, present
    plan.leftovers = sorted(set(listing) - {fmt.pack_name(p) for p in index.packs})
    return plan


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
    live, keep, rewrite, drop = plan.live, plan.keep, plan.rewrite, plan.drop
    locked_now, heads, protected = plan.locked_now, plan.heads, plan.protected

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
    report.blobs_removed += sum(len(blobs_of.get(p, [])) for p in drop if locked_now(p) is None)

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
        # (the index objects about to be deleted are left as they are: extending them would
        # keep them as long as the newest locked point)
        superseded = {fmt.index_name(i) for i in state.objects}
        report.locks_extended = _extend_locks(store, protected, now, skip=superseded)
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
        report.locks_extended = _extend_locks(store, protected, now)

    # delete what nothing uses any more: rewritten, unused and unindexed packs
    freed = 0
    for name in [fmt.pack_name(p) for p in rewrite + drop] + leftovers:
        info = listing[name]
        # the listing's lock, else the vault's own refusal (S3 HEADs each version first)
        reason = retention_hold(info, now) or heads.get(name) or delete_unless_held(store, name)
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


def _extend_locks(
    store: Store,
    protected: list[tuple[Manifest, Need]],
    now: datetime,
    *,
    skip: frozenset[str] | set[str] = frozenset(),
) -> int:
    """Extend the locks and holds of the objects protected points use, up to each point's
    own (:func:`extend_for_protected_points`). A crash after the new index and before this
    leaves the index objects just written unlocked until the next prune extends them; the
    packs a protected point uses are never rewritten (they keep their own lock), so its
    data stays locked throughout, and a lost index object is rebuilt from the packs."""
    count, names = extend_for_protected_points(store, protected, now, skip=skip)
    if count:
        log.info("prune: locks extended on %d object(s): %s", count, ", ".join(names[:5]))
    return count
