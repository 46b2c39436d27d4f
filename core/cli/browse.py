"""Commands that look inside recovery points, and retention's own command: ``ls`` (a point's
entries, long listing), ``find`` (paths matching a glob across points, newest first),
``diff`` (what changed between two points) and ``retain`` (forget what retention would, or
with ``--dry-run`` say what). POINT is an id or a unique prefix of at least 6 characters,
as everywhere. Names are shown escaped (:func:`shown_name`): bytes that are not UTF-8 as
``\\xNN``, control, invisible and bidi characters and backslashes escaped; in ``--json``
each name is also given exactly, as the base64 of its bytes (``path_b64``, ``target_b64``,
``link_b64``)."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import signal
import stat
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import echo_err, print_json
from regionvault.core.cli.root import CliState, ExpectedError, pass_state
from regionvault.core.errors import RepositoryNotFound
from regionvault.core.types import FileKind

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.repository import (
        EntryChange,
        Extent,
        Manifest,
        Repository,
        TreeEntry,
    )
    from regionvault.core.types import RecoveryPoint

    Reader = Callable[[Manifest], Iterator[TreeEntry | Extent]]

__all__ = ["diff", "entry_json", "find", "ls", "retain", "shown_name"]

_TYPE_BITS = {
    FileKind.FILE: stat.S_IFREG,
    FileKind.DIR: stat.S_IFDIR,
    FileKind.SYMLINK: stat.S_IFLNK,
    FileKind.FIFO: stat.S_IFIFO,
    FileKind.SOCKET: stat.S_IFSOCK,
    FileKind.CHARDEV: stat.S_IFCHR,
    FileKind.BLOCKDEV: stat.S_IFBLK,
}
_REGION = click.option(
    "--region", "-r", metavar="REGION", help="The region whose vault holds POINT (if ambiguous)."
)

_INSTANCE = click.option(
    "--instance",
    "-i",
    metavar="NAME|ID",
    help="With POINT 'latest': the instance whose newest point it is.",
)


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


#: characters that reorder or hide text around them without being controls: bidi
#: embeddings, overrides and isolates, and the marks (a name can look like another)
_BIDI = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def shown_name(name: str) -> str:
    """``name`` as one unambiguous printable line: a byte that is not UTF-8 as ``\\xNN``,
    ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` escaped, other C0 controls and DEL as ``\\xNN``
    (their byte), and every other character that is not printable (C1 controls such as
    U+009B, an 8-bit CSI, and U+0085; U+2028, U+2029; format characters) or that reorders
    the text around it (bidi controls such as U+202E) as ``\\uNNNN``: a name can neither
    drive the terminal, end the line nor reorder what follows it. A space stays a space."""
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape kept
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code in _BIDI or not (ch.isprintable() or ch == " "):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _exact(key: str, name: str | None) -> dict[str, Any]:
    """``{key: text, key_b64: bytes}``: the text is the name itself when it is UTF-8, its
    escaped form otherwise; the base64 is always exact."""
    if name is None:
        return {key: None}
    raw = _raw(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = shown_name(name)
    return {key: text, f"{key}_b64": base64.b64encode(raw).decode("ascii")}


def _mode_text(entry: TreeEntry) -> str:
    return stat.filemode(_TYPE_BITS[entry.kind] | entry.mode)


def _owner(entry: TreeEntry) -> str:
    user = entry.user if entry.user is not None else entry.uid
    group = entry.group if entry.group is not None else entry.gid
    user_text = "-" if user is None else shown_name(str(user))
    group_text = "-" if group is None else shown_name(str(group))
    return f"{user_text}/{group_text}"


def _time(mtime_ns: int) -> datetime:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC)


def _size_text(entry: TreeEntry) -> str:
    if entry.kind in (FileKind.CHARDEV, FileKind.BLOCKDEV):
        return f"{os.major(entry.rdev)}, {os.minor(entry.rdev)}"
    return f"{entry.size:,}" if entry.kind is FileKind.FILE else "0"


def _long_line(entry: TreeEntry) -> str:
    name = shown_name(entry.path)
    if entry.target is not None:
        name += f" -> {shown_name(entry.target)}"
    if entry.link is not None:
        name += f" => {shown_name(entry.link)} (hard link)"
    when = _time(entry.mtime_ns).strftime("%Y-%m-%d %H:%M:%S")
    return f"{_mode_text(entry)}  {_owner(entry):<17} {_size_text(entry):>14}  {when}  {name}"


def entry_json(entry: TreeEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        **_exact("path", entry.path),
        "type": entry.kind.value,
        "mode": _mode_text(entry),
        "perm": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "user": entry.user,
        "group": entry.group,
        "size": entry.size,
        "mtime": _time(entry.mtime_ns).isoformat(),
        "mtime_ns": entry.mtime_ns,
        **_exact("target", entry.target),
        **_exact("link", entry.link),
        "xattrs": [shown_name(k.decode("utf-8", "surrogateescape")) for k, _ in entry.xattrs],
    }
    if entry.kind in (FileKind.CHARDEV, FileKind.BLOCKDEV):
        out["device"] = {"major": os.major(entry.rdev), "minor": os.minor(entry.rdev)}
    return out


def _print_json_list(items: Iterable[dict[str, Any]]) -> None:
    """A JSON array as :func:`print_json` prints it, written item by item: a listing of a
    million entries never lives in memory whole."""
    first = True
    for item in items:
        text = textwrap.indent(json.dumps(item, indent=2, default=str), "  ")
        click.echo(("[\n" if first else ",\n") + text, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


@contextmanager
def _piped() -> Iterator[None]:
    """A reader that stopped reading (``regionvault ls P | head``) ends the listing quietly,
    with the status a process killed by SIGPIPE has (141), as ``ls`` and ``find`` do, not
    with an error line."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout at exit again: point it at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise click.exceptions.Exit(128 + signal.SIGPIPE) from None


#: the POINT that names an instance's newest point (with ``--instance``), as restic's does
LATEST = "latest"


def _point(engine: Engine, ref: str, region: str | None, instance: str | None) -> RecoveryPoint:
    """The point ``ref`` names: an id or unique prefix, or ``latest``: the point of
    ``instance`` (name or id as the points recorded it) holding the newest data, in
    ``region`` or in any. The newest data is the latest capture (a copy's is its source's,
    ``taken_at``), not the latest arrival: a copy of an old point made today is old data.
    When a copy holds the same capture as its source, the source (in the instance's home
    region) is the one named."""
    from regionvault.core.pipeline.objectives import newest_captured

    if ref != LATEST:
        if instance is not None:
            raise click.UsageError("--instance goes with POINT 'latest' only")
        return engine.find_point(ref, region)
    if instance is None:
        raise click.UsageError("POINT 'latest' needs --instance NAME|ID")
    site = engine.site
    best: tuple[datetime, bool, datetime, RecoveryPoint] | None = None
    for r in [site.region(region)] if region else site.regions:
        try:
            repo = engine.repository(r.name, create=False)
            points = [p for p in repo.points() if instance in (p.instance_id, p.instance_name)]
        except RepositoryNotFound:
            continue
        found = newest_captured(repo, points)  # points are oldest (by arrival) first
        if found is None:
            continue
        p, taken = found
        key = (taken, p.lineage is None, p.created_at, p)
        if best is None or key[:3] > best[:3]:
            best = key
    if best is None:
        where = f" in {site.region(region).name}" if region else ""
        raise ExpectedError(f"instance {instance!r} has no recovery point{where}")
    return best[3]


def _open(found: RecoveryPoint, engine: Engine) -> tuple[Repository, Manifest]:
    repo = engine.repository(found.region, create=False)
    return repo, repo.load_manifest(found.id)


# --------------------------------------------------------------------------- ls


@click.command()
@click.argument("point")
@click.argument("path", required=False)
@click.option(
    "--recursive", "-R", is_flag=True, help="Everything below PATH, not only its entries."
)
@_REGION
@_INSTANCE
@json_option
@pass_state
def ls(
    state: CliState,
    point: str,
    path: str | None,
    recursive: bool,
    region: str | None,
    instance: str | None,
    as_json: bool,
) -> None:
    """List recovery point POINT's entries (under PATH, a directory or an entry of the
    point): type and mode, owner/group as recorded, size (major, minor for a device),
    modification time (UTC), path, and a symlink's target (->) or a hard link's first path
    (=>). A block image lists its disks (name, offset, size). POINT 'latest' with
    --instance NAME|ID is that instance's newest point."""
    from regionvault.core.repository import list_entries

    engine = state.engine()
    repo, manifest = _open(_point(engine, point, region, instance), engine)
    if manifest.image_size is not None:
        if path:
            raise ExpectedError(
                f"recovery point {manifest.point.id} is a block image: it has disks, not paths"
            )
        disks = [{"name": d.name, "offset": d.offset, "size": d.size} for d in manifest.disks]
        if as_json:
            print_json(
                {"point": manifest.point.id, "image_size": manifest.image_size, "disks": disks}
            )
            return
        for disk in manifest.disks:
            click.echo(f"disk  {disk.size:>16,}  offset {disk.offset:,}  {shown_name(disk.name)}")
        return
    entries = list_entries(repo, manifest, path, recursive=recursive)
    with _piped():
        if as_json:
            _print_json_list(entry_json(e) for e in entries)
            return
        for entry in entries:
            click.echo(_long_line(entry))


# --------------------------------------------------------------------------- find


def _matcher(pattern: str) -> Callable[[str], bool]:
    """A pattern with a ``/`` matches the whole path (``*`` crosses ``/``), taken as a
    point's paths read: relative, so ``/etc/*`` and ``./etc/*`` are ``etc/*``; without
    one, it matches the entry's own name, as ``find -name`` does."""
    if "/" not in pattern:
        return lambda path: fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    while pattern.startswith(("/", "./")):
        pattern = pattern[1:] if pattern[0] == "/" else pattern[2:]
    return lambda path: fnmatch.fnmatchcase(path, pattern)


@click.command()
@click.argument("pattern")
@click.option(
    "--instance", "-i", metavar="NAME|ID", help="Only points of this instance (name or id)."
)
@click.option("--region", "-r", metavar="REGION", help="Only points in this region.")
@json_option
@pass_state
def find(
    state: CliState, pattern: str, instance: str | None, region: str | None, as_json: bool
) -> None:
    """Find entries whose name (or, for a PATTERN with a /, whole path) matches the glob
    PATTERN, in every file-tree point (newest first): point id, its time (UTC) and the
    path. Exits 1 when nothing matches."""
    from regionvault.core.repository import tree_reader

    engine = state.engine()
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    points: list[tuple[RecoveryPoint, Repository, Reader]] = []
    for r in regions:
        try:
            repo = engine.repository(r.name, create=False)
        except RepositoryNotFound:
            continue
        read = tree_reader(repo)  # one index load for all of this region's points
        points.extend(
            (p, repo, read)
            for p in repo.points()
            if instance is None or instance in (p.instance_id, p.instance_name)
        )
    points.sort(key=lambda pr: (pr[0].created_at, pr[0].id), reverse=True)
    hits = [0]
    with _piped():
        matches = _find_in(points, _matcher(pattern), hits)
        if as_json:
            _print_json_list(_match_json(point, entry) for point, entry in matches)
        else:
            for point, entry in matches:
                when = point.created_at.strftime("%Y-%m-%d %H:%M:%S")
                click.echo(f"{point.id[:8]}  {when}  {point.region}  {shown_name(entry.path)}")
    if not hits[0]:
        raise ExpectedError(f"no entry matches {pattern!r} in {len(points)} point(s)")


def _match_json(point: RecoveryPoint, entry: TreeEntry) -> dict[str, Any]:
    return {
        "point": point.id,
        "region": point.region,
        "instance_name": point.instance_name,
        "created_at": point.created_at.isoformat(),
        **entry_json(entry),
    }


def _find_in(
    points: list[tuple[RecoveryPoint, Repository, Reader]],
    matches: Callable[[str], bool],
    hits: list[int],
) -> Iterator[tuple[RecoveryPoint, TreeEntry]]:
    """The matches, streamed point by point (``hits[0]`` counts them)."""
    from regionvault.core.repository import TreeEntry

    for point, repo, read in points:
        manifest = repo.load_manifest(point.id)
        if manifest.image_size is not None:
            continue  # a block image has no paths
        for entry in read(manifest):
            if isinstance(entry, TreeEntry) and matches(entry.path):
                hits[0] += 1
                yield point, entry


# --------------------------------------------------------------------------- diff


def _change_json(change: EntryChange) -> dict[str, Any]:
    return {
        **_exact("path", change.path),
        "change": change.change,
        "what": list(change.what),
        "old": None if change.old is None else entry_json(change.old),
        "new": None if change.new is None else entry_json(change.new),
    }


_MARK = {"added": "+", "removed": "-", "changed": "M", "unknown": "?"}


@click.command()
@click.argument("old")
@click.argument("new")
@_REGION
@_INSTANCE
@json_option
@pass_state
def diff(
    state: CliState,
    old: str,
    new: str,
    region: str | None,
    instance: str | None,
    as_json: bool,
) -> None:
    """What changed from point OLD to point NEW of the same region: ``+`` added, ``-``
    removed, ``M`` changed (and what: size, mode, mtime, content, target, link, owner,
    device, xattrs), ``?`` content unknown. Content is compared by chunk ids, reading no
    file data: a copy's ids differ from a native point's for the same bytes, so there
    they say 'content unknown'. NEW (or OLD) 'latest' with --instance NAME|ID is that
    instance's point with the newest data, in the other point's region unless told."""
    from regionvault.core.repository import diff_trees

    if instance is not None and LATEST not in (old, new):
        raise click.UsageError("--instance goes with POINT 'latest' only")
    engine = state.engine()
    # 'latest' beside a named point is looked for in that point's region, unless told
    if old == LATEST and new != LATEST:
        b = _point(engine, new, region, None)
        a = _point(engine, old, region or b.region, instance)
    else:
        a = _point(engine, old, region, instance if old == LATEST else None)
        if new == LATEST:
            b = _point(engine, new, region or a.region, instance)
        else:
            b = _point(engine, new, region, None)
    if a.region != b.region:
        raise ExpectedError(
            f"points {a.id[:8]} ({a.region}) and {b.id[:8]} ({b.region}) are in different "
            "regions: chunk ids are keyed per vault, so compare two points of one region"
        )
    repo = engine.repository(a.region, create=False)
    first, second = repo.load_manifest(a.id), repo.load_manifest(b.id)
    for m in (first, second):
        if m.image_size is not None:
            raise ExpectedError(
                f"recovery point {m.point.id} is a block image: diff compares files"
            )
    changes = diff_trees(repo, first, second)
    counts = dict.fromkeys(_MARK, 0)
    with _piped():
        if as_json:
            _print_json_list(_change_json(c) for c in changes)
            return
        for c in changes:
            counts[c.change] += 1
            what = f"  ({', '.join(c.what)})" if c.what else ""
            click.echo(f"{_MARK[c.change]}  {shown_name(c.path)}{what}")
    unknown = f", {counts['unknown']} content unknown" if counts["unknown"] else ""
    echo_err(
        f"{counts['added']} added, {counts['removed']} removed, {counts['changed']} changed"
        + unknown
    )


# --------------------------------------------------------------------------- retain


@click.command()
@click.option("--region", "-r", metavar="REGION", help="Only this region.")
@click.option(
    "--dry-run", "-n", is_flag=True, help="Say what would be forgotten and kept; change nothing."
)
@json_option
@pass_state
def retain(state: CliState, region: str | None, dry_run: bool, as_json: bool) -> None:
    """Apply retention now, as a tick does: forget each region's points past their
    retention (those a WORM lock or legal hold keeps stay, and are named), then prune.
    With --dry-run, only say which points would go and which locks would keep."""
    engine = state.engine()
    site = state.site()
    regions = [site.region(region)] if region else site.regions
    out: list[dict[str, Any]] = []
    for r in regions:
        report = engine.retention_forecast(r.name) if dry_run else engine.retain(r.name)
        out.append(
            {
                "region": r.name,
                "dry_run": dry_run,
                "forgotten": report.forgotten,
                "protected": report.protected,
                "prune": report.prune or None,
            }
        )
    if as_json:
        print_json(out)
        return
    verb = "would forget" if dry_run else "forgot"
    for row in out:
        click.echo(
            f"{row['region']}: {verb} {len(row['forgotten'])} point(s), "
            f"{len(row['protected'])} expired kept by a lock or hold"
        )
        for pid in row["forgotten"]:
            click.echo(f"  {verb}: {pid}")
        for pid in row["protected"]:
            click.echo(f"  kept (locked or held): {pid}")
