"""Read-only views of a repository for people: the entries under a path of a point (``ls``),
the difference of two points' trees (``diff``), and what ``forget`` and ``prune`` would do
(their dry runs). Nothing here writes to the vault, not even a lock object."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from regionvault.core.errors import IntegrityError, PathNotFound, RegionVaultError
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._manifest import tree_records
from regionvault.core.repository._prune import plan_prune
from regionvault.core.repository._retention import retention_hold
from regionvault.core.repository._tree import path_problem, to_public
from regionvault.core.repository.model import Extent, Manifest, TreeEntry
from regionvault.core.types import FileKind

if TYPE_CHECKING:
    from regionvault.core.repository._store import IndexState
    from regionvault.core.repository.repository import Repository


def tree_reader(repo: Repository) -> Callable[[Manifest], Iterator[TreeEntry | Extent]]:
    """``repo.entries`` for many points of ``repo``: the index is loaded (and decrypted)
    once, on the first point read, not once per point. List the points before the first
    read: a point committed later may have chunks the index then loaded does not name."""
    store = repo._ensure_open()
    loaded: list[IndexState] = []

    def entries(manifest: Manifest) -> Iterator[TreeEntry | Extent]:
        if not loaded:
            loaded.append(store.load_index())
        name = fmt.point_name(manifest.point.id)
        with repo._pool() as pool:
            for record in tree_records(store, loaded[0].index, pool, manifest):
                yield to_public(record, name)

    return entries


__all__ = [
    "EntryChange",
    "PruneForecast",
    "diff_trees",
    "forecast_prune",
    "forget_refusal",
    "list_entries",
    "tree_reader",
]


def _file_entries(repo: Repository, manifest: Manifest) -> Iterator[TreeEntry]:
    if manifest.image_size is not None:
        raise RegionVaultError(
            f"recovery point {manifest.point.id} is a block image: it has disks, not files"
        )
    for entry in repo.entries(manifest):
        if isinstance(entry, Extent):  # pragma: no cover - a file tree holds no extents
            raise RegionVaultError(f"recovery point {manifest.point.id} mixes files and extents")
        yield entry


def _relative(path: str) -> str:
    """``path`` as the point records it: no leading ``/`` or ``./`` (``/etc``, ``./etc``
    and ``etc`` are one path: a point's paths are relative to what was captured), no
    trailing ``/``; ``.`` and ``/`` are the top level (``""``)."""
    path = path.strip("/")
    while path == "." or path.startswith("./"):
        path = path[2:].lstrip("/")
    return path


def list_entries(
    repo: Repository, manifest: Manifest, path: str | None = None, *, recursive: bool = False
) -> Iterator[TreeEntry]:
    """The entries of a file-tree point under ``path`` (a directory: its entries, or with
    ``recursive`` everything below it; a file or other entry: itself), in tree order,
    streamed. :class:`PathNotFound` when the point holds no entry at ``path`` (checked
    once the tree is read: a directory recorded without entries lists nothing)."""
    prefix = ""
    if path is not None:
        path = _relative(path)
        if path:
            problem = path_problem(path)
            if problem is not None:
                raise RegionVaultError(f"path {path!r} {problem}")
            prefix = path + "/"
    found = not prefix
    for entry in _file_entries(repo, manifest):
        if prefix and entry.path == path:
            found = True
            if entry.kind is not FileKind.DIR:
                yield entry
            continue
        if not entry.path.startswith(prefix):
            continue
        found = True
        rest = entry.path[len(prefix) :]
        if recursive or "/" not in rest:
            yield entry
    if not found:
        raise PathNotFound(manifest.point.id, [path or ""])


@dataclass(frozen=True)
class EntryChange:
    """One path that differs between two points: ``added`` (only in the second),
    ``removed`` (only in the first), ``changed``, with what changed (``kind``, ``size``,
    ``mode``, ``mtime``, ``content``, ``target``, ``link``, ``owner``, ``device``,
    ``xattrs``), or ``unknown``: nothing known differs, but the content cannot be compared
    (``what`` is ``content unknown``, which a ``changed`` entry can also list)."""

    path: str
    change: str
    old: TreeEntry | None
    new: TreeEntry | None
    what: tuple[str, ...] = ()


#: what ``what`` says of content that chunk ids cannot compare
CONTENT_UNKNOWN = "content unknown"


@dataclass(frozen=True)
class _Known:
    """What two points' trees let a diff compare."""

    #: their chunk ids compare content: both cut by this vault's own chunker
    content: bool
    #: both recorded owners, device numbers, hard links and xattrs (format 2 on)
    metadata: bool


def _differences(a: TreeEntry, b: TreeEntry, known: _Known) -> tuple[str, ...]:
    what = []
    if a.kind != b.kind:
        what.append("kind")
    if a.size != b.size:
        what.append("size")
    if a.mode != b.mode:
        what.append("mode")
    if a.mtime_ns != b.mtime_ns:
        what.append("mtime")
    # chunk ids are keyed per vault: equal ids mean equal bytes, compared without reading
    # any data (a hard link's bytes are its link's, compared through ``link``). Different
    # ids mean different bytes only when both were cut alike: a copy keeps the cuts of the
    # vault it came from, so its ids differ from a native point's for the same bytes
    if a.chunks != b.chunks:
        if known.content or a.size != b.size:
            what.append("content")
        else:
            what.append(CONTENT_UNKNOWN)
    if a.target != b.target:
        what.append("target")
    if known.metadata:  # format 1 recorded none of these: no difference to show
        if a.link != b.link:
            what.append("link")
        if (a.uid, a.gid, a.user, a.group) != (b.uid, b.gid, b.user, b.group):
            what.append("owner")
        if a.rdev != b.rdev:
            what.append("device")
        if a.xattrs != b.xattrs:
            what.append("xattrs")
    return tuple(what)


def _known(old: Manifest, new: Manifest) -> _Known:
    native = old.point.lineage is None and new.point.lineage is None
    return _Known(
        content=native or old.point.id == new.point.id,
        metadata=min(old.format_version, new.format_version) >= 2,
    )


def diff_trees(repo: Repository, old: Manifest, new: Manifest) -> Iterator[EntryChange]:
    """What differs from point ``old`` to point ``new`` of the same repository: removed
    entries first (in ``old``'s order), then added and changed ones (in ``new``'s order).
    Content is compared by chunk ids, which the same vault derives from the same bytes:
    no data is read. When either point is a copy, its chunks were cut as the vault it came
    from cut them: different ids (of files of one size) then say ``content unknown``, not
    changed. Owners, devices, hard links and xattrs are compared only when both points
    recorded them (format 2 on). The first tree is held in memory (its entries' metadata),
    and so are the added and changed entries until the removed ones are out."""
    known = _known(old, new)
    before = {e.path: e for e in _file_entries(repo, old)}
    seen: set[str] = set()
    later: list[EntryChange] = []
    for entry in _file_entries(repo, new):
        seen.add(entry.path)
        was = before.get(entry.path)
        if was is None:
            later.append(EntryChange(entry.path, "added", None, entry))
            continue
        what = _differences(was, entry, known)
        if what == (CONTENT_UNKNOWN,):
            later.append(EntryChange(entry.path, "unknown", was, entry, what))
        elif what:
            later.append(EntryChange(entry.path, "changed", was, entry, what))
    for path, was in before.items():
        if path not in seen:
            yield EntryChange(path, "removed", was, None)
    yield from later


def forget_refusal(repo: Repository, point_id: str, now: datetime | None = None) -> str | None:
    """Why a WORM lock or legal hold would refuse to forget ``point_id`` now, or None."""
    return retention_hold(repo.point_object(point_id), now or datetime.now(UTC))


@dataclass
class PruneForecast:
    """What :meth:`Repository.prune` would do now, computed as it decides it."""

    points: int = 0
    packs_before: int = 0
    #: packs nothing uses, and pack objects no index names (leftovers of killed writers, or
    #: of a backup running meanwhile: a dry run takes no lock)
    packs_to_delete: list[str] = field(default_factory=list)
    #: packs partly used, to be rewritten with only what points use
    packs_to_rewrite: list[str] = field(default_factory=list)
    unindexed_packs: int = 0
    #: stored bytes of the packs to delete and rewrite, less the blobs the rewrites keep:
    #: exact when nothing is rewritten, otherwise an upper bound (a new pack adds a header)
    bytes_to_free: int = 0
    #: index objects a new index would supersede and delete
    indexes_to_replace: list[str] = field(default_factory=list)
    #: (object name, why) of packs and index objects a prune would delete but a WORM lock
    #: or legal hold keeps
    kept_by_locks: list[tuple[str, str]] = field(default_factory=list)


#: how many times a dry run of prune plans before it believes what it finds wrong
_FORECAST_TRIES = 3


def forecast_prune(repo: Repository, *, max_unused: float = 0.0) -> PruneForecast:
    """What a prune of ``repo`` would delete and rewrite, from the same decision prune
    makes (:func:`plan_prune`); reads only."""
    store = repo._ensure_open()
    for attempt in range(1, _FORECAST_TRIES + 1):
        try:
            plan = plan_prune(store, max_unused=max_unused)
            break
        except IntegrityError:
            # without a lock, a prune running meanwhile can delete a pack between the index
            # read and the pack listing: read both again. A vault still wrong after that
            # is really wrong, and said so
            if attempt == _FORECAST_TRIES:
                raise
    out = PruneForecast(points=len(plan.manifests), packs_before=len(plan.listing))
    freed = 0
    for pack_id in plan.drop:
        name = fmt.pack_name(pack_id)
        reason = plan.locked(pack_id)
        if reason is None:
            out.packs_to_delete.append(name)
            freed += plan.listing[name].size
        else:
            out.kept_by_locks.append((name, reason))
    for pack_id in plan.rewrite:
        name = fmt.pack_name(pack_id)
        out.packs_to_rewrite.append(name)
        freed += plan.listing[name].size - sum(b.length for b in plan.live[pack_id])
    for name in plan.leftovers:
        reason = retention_hold(plan.listing[name], plan.now)
        if reason is None:
            out.packs_to_delete.append(name)
            out.unindexed_packs += 1
            freed += plan.listing[name].size
        else:
            out.kept_by_locks.append((name, reason))
    if plan.writes_index:
        for index_id in sorted(plan.state.objects):
            name = fmt.index_name(index_id)
            reason = retention_hold(plan.state.objects[index_id], plan.now)
            if reason is None:
                out.indexes_to_replace.append(name)
            else:
                out.kept_by_locks.append((name, reason))
    out.bytes_to_free = freed
    return out
