"""Verify and repair: authenticate what a repository holds (its config, index, manifests,
trees, packs, link tables, copy records and event log), and mend what can be mended without losing
data (rebuild the index from the packs, remove damaged link objects and copy records, and
the temporaries killed writers left)."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from regionvault.core.errors import (
    IntegrityError,
    KeyAccessDenied,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
)
from regionvault.core.repository import _format as fmt
from regionvault.core.repository import _keyring
from regionvault.core.repository._events import check_events
from regionvault.core.repository._index import ChunkIndex
from regionvault.core.repository._links import LINK_PREFIX, decode_links
from regionvault.core.repository._locks import RepositoryLock
from regionvault.core.repository._manifest import load_manifests, tree_records
from regionvault.core.repository._restore_blocks import extent_problem
from regionvault.core.repository._retention import delete_unless_held
from regionvault.core.repository._store import Store
from regionvault.core.repository.model import (
    Problem,
    Progress,
    ProgressCallback,
    VerifyReport,
)

__all__ = ["read_pack", "rebuild_index", "remove_stale_temporaries", "verify"]

_MAX_PROBLEMS_PER_PACK = 10


def read_pack(
    store: Store, pack_id: str, data: bytes
) -> tuple[fmt.PackHeader, list[fmt.BlobEntry]]:
    """Parse a whole pack's header and authenticated blob table."""
    name = fmt.pack_name(pack_id)
    header = fmt.PackHeader.parse(name, data)
    if len(data) < header.size + fmt.PACK_FOOTER.size + fmt.GCM_TAG:
        raise IntegrityError(name, "pack is too short")
    table_len, magic = fmt.PACK_FOOTER.unpack_from(data, len(data) - fmt.PACK_FOOTER.size)
    if magic != fmt.PACK_END_MAGIC:
        raise IntegrityError(name, "pack has no end marker (truncated?)")
    table_at = len(data) - fmt.PACK_FOOTER.size - table_len
    if table_at < header.size:
        raise IntegrityError(name, "blob table length is impossible")
    key = store.pack_key(pack_id, header.raw)
    table = key.decrypt_table(table_at, memoryview(data)[table_at : len(data) - 8])
    entries = fmt.decode_blob_table(name, table, pack_size=table_at)
    return header, entries


def _check_pack(
    store: Store, pack_id: str, size: int, header_copy: bytes, indexed: list[fmt.BlobEntry]
) -> tuple[list[Problem], int, int]:
    """Read a whole pack and authenticate every byte: ``(problems, bytes read, blobs)``."""
    name = fmt.pack_name(pack_id)
    problems: list[Problem] = []
    try:
        data = store.vault.get(name)
    except ObjectNotFound:
        return [Problem(name, "pack is missing")], 0, 0
    if len(data) != size:
        problems.append(Problem(name, f"pack is {len(data)} bytes, its index says {size}"))
    try:
        header, entries = read_pack(store, pack_id, data)
    except IntegrityError as exc:
        return [*problems, Problem(exc.object_name, exc.reason)], len(data), 0
    if header.raw != header_copy:
        problems.append(Problem(name, "pack header differs from the index's copy"))
    if {e.encode() for e in entries} != {e.encode() for e in indexed}:
        problems.append(Problem(name, "blob table differs from the index"))
    key = store.pack_key(pack_id, header.raw)
    view = memoryview(data)
    for e in entries:
        try:
            store.decode_blob(
                key, e.chunk_id, e.blob_type, e.flags, e.offset, e.raw_length,
                view[e.offset : e.offset + e.length],
            )  # fmt: skip
        except IntegrityError as exc:
            problems.append(Problem(exc.object_name, exc.reason))
            if len(problems) >= _MAX_PROBLEMS_PER_PACK:
                break
    return problems, len(data), len(entries)


# --------------------------------------------------------------------------- verify


@dataclass
class _Damage:
    """What a verify pass found that :func:`repair` can mend."""

    #: index objects that do not authenticate or parse
    indexes: list[str] = field(default_factory=list)
    #: recovery points use chunks no index lists, while packs no index lists are present
    #: (an index object was lost: the packs still hold the chunks)
    unindexed: bool = False
    #: link and copy-record objects that do not authenticate or parse
    links: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.indexes or self.unindexed or self.links or self.copies)


def verify(
    store: Store,
    *,
    read_data: bool,
    progress: ProgressCallback | None,
    lock: RepositoryLock,
    repair: bool = False,
) -> VerifyReport:
    """Check the repository (see :meth:`Repository.verify`). With ``repair`` (under the
    exclusive lock), mend what the check found that can be mended, remove what killed
    writers left, then check again: the report is the second check's, with ``repaired``."""
    report, damage = _verify(store, read_data=read_data, progress=progress, lock=lock)
    if not repair:
        return report
    repaired, skipped = _repair(store, damage)
    if repaired:
        report, _ = _verify(store, read_data=read_data, progress=progress, lock=lock)
    report.repaired = repaired
    report.warnings.extend(skipped)
    return report


def _verify(
    store: Store, *, read_data: bool, progress: ProgressCallback | None, lock: RepositoryLock
) -> tuple[VerifyReport, _Damage]:
    report = VerifyReport(read_data=read_data)
    damage = _Damage()
    err = report.errors.append
    try:
        config = store.read_config()
        if config.repository_id != store.config.repository_id:
            err(Problem(fmt.CONFIG_NAME, "config was replaced since the repository was opened"))
    except (IntegrityError, KeyAccessDenied, ObjectNotFound) as exc:
        err(Problem(fmt.CONFIG_NAME, str(exc)))
    state = store.load_index(keep_blobs=True, tolerant=True)
    for name, reason in state.problems:
        err(Problem(name, reason))
        damage.indexes.append(name)
    report.indexes = len(state.objects)
    index = state.index
    listing = {info.name: info for info in store.vault.list(fmt.PACK_PREFIX)}
    _check_versions(store, report)
    for pack_id, info in sorted(index.packs.items()):
        name = fmt.pack_name(pack_id)
        found = listing.get(name)
        if found is None:
            err(Problem(name, f"pack is missing (listed by index {sorted(info.index_ids)})"))
        elif found.size != info.size:
            err(Problem(name, f"pack is {found.size} bytes, its index says {info.size}"))
    indexed_names = {fmt.pack_name(p) for p in index.packs}
    leftovers = sorted(set(listing) - indexed_names)
    if leftovers:
        report.warnings.append(
            Problem(
                leftovers[0],
                f"{len(leftovers)} pack(s) no index lists (left by an interrupted run; "
                "prune removes them)",
            )
        )
    report.packs = len(listing)

    manifests, problems = load_manifests(store, tolerant=True)
    report.errors.extend(problems)
    report.points = len(manifests) + len(problems)
    used: set[bytes] = set()
    workers = store.settings.worker_count()
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        for manifest in manifests:
            point = fmt.point_name(manifest.point.id)
            used.update(manifest.tree_chunks)
            missing = 0
            misplaced, first_misplaced = 0, ""
            end = 0
            try:
                for record in tree_records(store, index, pool, manifest):
                    if manifest.image_size is not None:
                        # a block image's extents lie inside the image, in order, on its
                        # disks (the holes between disks hold nothing)
                        problem = extent_problem(record, end, manifest.image_size, manifest.disks)
                        if problem is not None:
                            misplaced += 1
                            first_misplaced = first_misplaced or problem
                        end = max(end, record.offset + record.size)
                    for chunk_id in record.chunk_ids():
                        used.add(chunk_id)
                        if chunk_id not in index:
                            missing += 1
            except IntegrityError as exc:
                err(Problem(exc.object_name, f"{exc.reason} (tree of {point})"))
            if misplaced:
                more = f" (and {misplaced - 1} more)" if misplaced > 1 else ""
                err(Problem(point, f"{first_misplaced}{more}"))
            if missing:
                err(Problem(point, f"{missing} chunk(s) of this point are in no index"))
                damage.unindexed = damage.unindexed or bool(leftovers)
        if progress is not None:
            progress(Progress(operation="verify", files_done=0, files_total=len(index.packs)))
        if read_data:
            blobs = index.pack_blobs or {}
            futures = [
                pool.submit(_check_pack, store, pid, info.size, info.header, blobs.get(pid, []))
                for pid, info in sorted(index.packs.items())
                if fmt.pack_name(pid) in listing
            ]
            total = sum(info.size for info in index.packs.values())
            for done, future in enumerate(futures, 1):
                problems_found, nbytes, nblobs = future.result()
                report.errors.extend(problems_found)
                report.bytes_read += nbytes
                report.blobs += nblobs
                if progress is not None:
                    progress(
                        Progress(
                            operation="verify",
                            files_done=done,
                            files_total=len(futures),
                            bytes_done=report.bytes_read,
                            bytes_total=total,
                        )
                    )
        else:
            report.blobs = len(index)
    _check_copy_objects(store, report, damage)
    _check_keys(store, report, index)

    # the event log: every event authenticated and the chain checked; a damaged event, a
    # gap (a deleted one) or a broken link (a replaced one) is named and kept (the log is
    # append-only: repair never removes evidence), so verify stays failed until it is
    # looked into
    report.events, event_problems = check_events(store)
    report.errors.extend(
        Problem(p.object, f"{p.message} (an event of the log: kept, never repaired away)")
        for p in event_problems
    )
    try:
        stale = list(store.vault.stale_temporaries(store.settings.lock_ttl))
    except RegionVaultError as exc:  # e.g. no permission to list uploads: only a note
        stale = []
        report.warnings.append(Problem("temporaries", f"cannot be listed: {exc}"))
    if stale:
        first = stale[0].name or stale[0].handle
        report.warnings.append(
            Problem(
                first,
                f"{len(stale)} temporar{'y' if len(stale) == 1 else 'ies'} of interrupted "
                "writes (verify --repair or prune removes them)",
            )
        )
    unused = sum(1 for c in index.chunk_ids() if c not in used)
    if unused:
        report.warnings.append(
            Problem("index", f"{unused} blob(s) no recovery point references (prune removes them)")
        )
    lock.check()
    if progress is not None:
        progress(Progress(operation="verify", bytes_done=report.bytes_read, done=True))
    return report, damage


def _check_versions(store: Store, report: VerifyReport) -> None:
    """Versions over a lock (a versioned store): a newer version or a delete marker written
    over a WORM-locked object (or over one written once whose lock ran out), and any other
    version of a name written once, is tampering, named with its version ids; reads still
    use the framework's version, which the rest of the check authenticates."""
    try:
        found = list(store.vault.versions_over_locks())
    except RegionVaultError as exc:  # e.g. no permission to list versions: only a note
        report.warnings.append(Problem("versions", f"cannot be listed: {exc}"))
        return
    for name, what in found:
        report.errors.append(Problem(name, f"tampering: {what}"))


def _check_copy_objects(store: Store, report: VerifyReport, damage: _Damage) -> None:
    """Authenticate the copy protocol's objects: a destination's link tables (``links/``)
    and a source's copy records (``copies/``). Each is read whole (they are small: 64 bytes
    per linked chunk, a line of JSON per record)."""
    for prefix, kind, found in (
        (LINK_PREFIX, fmt.ObjectKind.LINKS, damage.links),
        (fmt.COPIES_PREFIX, fmt.ObjectKind.COPIES, damage.copies),
    ):
        for info in store.vault.list(prefix):
            try:
                body = store.get_sealed(kind, info.name)
                if kind is fmt.ObjectKind.LINKS:
                    report.links += sum(1 for _ in decode_links(info.name, body))
                else:
                    _check_copy_record(info.name, body)
                    report.copy_records += 1
            except ObjectNotFound:
                continue  # merged or tidied away since the listing
            except IntegrityError as exc:
                report.errors.append(
                    Problem(exc.object_name, f"{exc.reason} (verify --repair removes it)")
                )
                found.append(info.name)


@runtime_checkable
class NamesWrappedKeys(Protocol):
    """A KeyService that can tell which of its master keys wrapped a data key, by reading
    the wrapped form (no KMS call): local, Azure Key Vault and PKCS#11 can; AWS KMS and
    Cloud KMS ciphertexts do not say, and their writers follow a rotation at once."""

    def wrapped_key_id(self, wrapped: bytes) -> str | None:
        """The id (as :attr:`KeyService.key_id` says it) of the master key that wrapped
        ``wrapped``; None when the form does not say."""


def _check_keys(store: Store, report: VerifyReport, index: ChunkIndex) -> None:
    """Every keyring authenticates (the newest one is what readers use), and every indexed
    pack's run key is in the newest keyring or unwraps (one KeyService call per run at
    most): a pack whose key is neither is named, since no point using it can restore. A
    run in no keyring whose data key is under a master key other than the current one is a
    warning (:func:`_old_key_warnings`): its packs need that key, so it must stay enabled."""
    present = _keyring.generations(store.vault)
    newest: _keyring.Keyring | None = None
    for generation in present:
        name = fmt.keyring_name(generation)
        try:
            newest = _keyring.read_keyring(
                store.vault, store.keys, store.config.repository_id, generation
            )
        except ObjectNotFound:
            continue
        except IntegrityError as exc:
            report.errors.append(Problem(exc.object_name, exc.reason))
    seen: set[bytes] = set()
    unringed: dict[bytes, tuple[str, bytes]] = {}
    for pack_id, info in sorted(index.packs.items()):
        name = fmt.pack_name(pack_id)
        try:
            header = fmt.PackHeader.parse(name, info.header)
            if header.wrapped_key in seen:
                continue
            seen.add(header.wrapped_key)
            if newest is None or header.run_id not in newest.runs:
                unringed.setdefault(header.run_id, (name, header.wrapped_key))
            store.pack_key(pack_id, info.header)
        except IntegrityError as exc:
            report.errors.append(Problem(exc.object_name, exc.reason))
    report.warnings.extend(_old_key_warnings(store, unringed))


def _old_key_warnings(store: Store, unringed: dict[bytes, tuple[str, bytes]]) -> list[Problem]:
    """One warning per run (``run id -> (a pack of it, its wrapped data key)``) that no
    keyring holds and whose data key is wrapped under a master key other than the current
    one: disabling that key would make the run's packs unreadable (a writer that had not
    yet followed a rotation made by another process). ``rotate-keys`` puts the run in a
    keyring."""
    keys = store.keys
    if not unringed or not isinstance(keys, NamesWrappedKeys):
        return []
    current = keys.key_id
    warnings: list[Problem] = []
    for run_id, (name, wrapped) in sorted(unringed.items()):
        under = keys.wrapped_key_id(wrapped)
        if under is not None and under != current:
            warnings.append(
                Problem(
                    name,
                    f"run {run_id.hex()} is in no keyring and its data key is wrapped under "
                    f"master key {under}, not the current {current}: keep that key enabled "
                    "and run rotate-keys again before disabling it",
                )
            )
    return warnings


def _check_copy_record(name: str, body: bytes) -> None:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise IntegrityError(name, "copy record is not a JSON object")


# --------------------------------------------------------------------------- repair


def _repair(store: Store, damage: _Damage) -> tuple[list[Problem], list[Problem]]:
    """Mend what :func:`_verify` found and remove stale temporaries, under the exclusive
    lock: ``(what was done, what a WORM lock or legal hold kept)``. Only what is provably
    bad or unreferenced goes: a damaged manifest or pack is reported, never removed."""
    repaired: list[Problem] = []
    skipped: list[Problem] = []
    if damage.indexes or damage.unindexed:
        why = (
            f"{len(damage.indexes)} damaged index object(s)"
            if damage.indexes
            else "chunks in no index, packs no index lists"
        )
        packs = rebuild_index(store)
        repaired.append(
            Problem("index", f"rebuilt from the blob tables of {packs} pack(s) ({why})")
        )
    for names, done in (
        (
            damage.links,
            "damaged link object removed (the next copy from its source region sends the "
            "chunks it linked again)",
        ),
        (
            damage.copies,
            "damaged copy record removed (the point is offered to its destination again, "
            "which answers with a receipt)",
        ),
    ):
        for name in names:
            reason = delete_unless_held(store, name)
            if reason is None:
                repaired.append(Problem(name, done))
            else:
                skipped.append(Problem(name, f"damaged, but kept: {reason}"))
    repaired.extend(remove_stale_temporaries(store))
    return repaired, skipped


def remove_stale_temporaries(store: Store) -> list[Problem]:
    """Remove what killed writers left in the vault (temporary files, incomplete multipart
    uploads) that no live process can still be writing: the vault reports those whose
    writer is gone or that are older than the lock expiry. One Problem per removal."""
    removed: list[Problem] = []
    for temporary in list(store.vault.stale_temporaries(store.settings.lock_ttl)):
        store.vault.remove_temporary(temporary)
        size = "" if temporary.size is None else f", {temporary.size:,} bytes"
        removed.append(
            Problem(
                temporary.name or temporary.handle,
                f"temporary of an interrupted write removed ({temporary.reason}{size})",
            )
        )
    return removed


def rebuild_index(store: Store) -> int:
    """Write a fresh index from the packs' own blob tables, superseding every index object
    (recovers from lost or damaged index objects). Returns the number of packs indexed."""
    state = store.load_index(tolerant=True)
    packs: list[fmt.IndexPack] = []
    for info in store.vault.list(fmt.PACK_PREFIX):
        pack_id = info.name.rsplit("/", 1)[-1]
        try:
            fmt.parse_hex_id(pack_id, "pack id")
            data = store.vault.get(info.name)
            header, entries = read_pack(store, pack_id, data)
        except (ValueError, RegionVaultError):
            continue  # unreadable packs stay out of the index (verify names them)
        packs.append(fmt.IndexPack(pack_id, len(data), header.raw, entries))
    store.write_index(packs, supersedes=state.objects)
    for index_id in state.objects:
        with contextlib.suppress(RetentionLocked):
            store.vault.delete(fmt.index_name(index_id))
    return len(packs)
