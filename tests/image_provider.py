"""A test-only provider, ``imagefake``, whose compute's instances are sparse image files: the
local provider's keys, vault and transit, and a block compute for incremental block backups.

A capture copies the instance's image (sparse: its data ranges only) to a snapshot file and
reads that; taken with ``keep=True`` it keeps the snapshot and names it in ``ref``; taken with
``since=ref`` its changed ranges are exact: the blocks whose bytes differ between the two
snapshots (none guessed, none left out). ``release_capture`` deletes a kept snapshot. Each
capture counts what it read (``bytes_read``), so tests can tell an incremental read from a
full one. Loaded with ``open_site(path, image_provider)``; regions ``imagefake:<name>``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from regionvault.core import (
    BlockCapture,
    BlockSink,
    Capture,
    CaptureKind,
    Compute,
    Instance,
    InstanceNotFound,
    InstancePage,
    LaunchSpec,
    ProviderRegistry,
    RegionConfig,
    RestoreSink,
    Tags,
    hookimpl,
)
from regionvault.core.types import Disk
from regionvault.providers.local import LocalProvider

BLOCK = 4096
#: a capture reads and compares in pieces of this size
PIECE = 256 << 10
#: set (to a path) in a process's environment: each capture's first read blocks until that
#: file exists, so a test can kill a run that holds a capture and has read nothing yet
HOLD_ENV = "IMAGEFAKE_HOLD"


def data_ranges(path: Path) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the file's data (not its holes), ascending."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            at = end
    finally:
        os.close(fd)


def sparse_copy(source: Path, target: Path) -> None:
    size = source.stat().st_size
    with source.open("rb") as src, target.open("wb") as dst:
        for offset, length in data_ranges(source):
            src.seek(offset)
            dst.seek(offset)
            dst.write(src.read(length))
        dst.truncate(size)


class ImageCapture(BlockCapture):
    def __init__(
        self, instance: Instance, snapshot: Path, *, keep: bool, since: Path | None
    ) -> None:
        size = snapshot.stat().st_size
        super().__init__(instance, datetime.now(UTC), size=size, block_size=BLOCK)
        self.snapshot = snapshot
        self._keep = keep
        self._since = since
        self.bytes_read = 0
        self._changed: tuple[list[tuple[int, int]] | None] | None = None
        if keep:
            self.ref = json.dumps({"instance": instance.id, "snapshot": snapshot.name})

    def _hold(self) -> None:
        hold = os.environ.get(HOLD_ENV)
        if hold:
            for _ in range(6000):  # at most 10 minutes
                if Path(hold).exists():
                    return
                threading.Event().wait(0.1)

    def _read(self, spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        self._hold()
        with self.snapshot.open("rb") as f:
            for offset, length in spans:
                f.seek(offset)
                for at in range(offset, offset + length, PIECE):
                    data = f.read(min(PIECE, offset + length - at))
                    self.bytes_read += len(data)
                    yield at, data

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        return self._read(data_ranges(self.snapshot))

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        def within() -> Iterator[tuple[int, int]]:
            data = list(data_ranges(self.snapshot))
            for lo, n in spans:
                for d_lo, d_n in data:
                    a, b = max(lo, d_lo), min(lo + n, d_lo + d_n)
                    if a < b:
                        yield a, b - a

        return self._read(within())

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        # worked out once (the backup asks first), as a cloud's diff call would answer it
        if self._changed is None:
            self._changed = (self._diff(),)
        return self._changed[0]

    def _diff(self) -> list[tuple[int, int]] | None:
        since = self._since
        if since is None or not since.exists() or since.stat().st_size != self.size:
            return None
        changed: list[tuple[int, int]] = []
        with self.snapshot.open("rb") as new, since.open("rb") as old:
            for at in range(0, self.size, PIECE):
                a, b = new.read(PIECE), old.read(PIECE)
                for i in range(0, len(a), BLOCK):
                    if a[i : i + BLOCK] != b[i : i + BLOCK]:
                        o, n = at + i, min(BLOCK, len(a) - i)
                        if changed and changed[-1][0] + changed[-1][1] == o:
                            changed[-1] = (changed[-1][0], changed[-1][1] + n)
                        else:
                            changed.append((o, n))
        return changed

    def close(self) -> None:
        if not self._keep:
            self.snapshot.unlink(missing_ok=True)


class ImageSink(BlockSink):
    def __init__(self, path: Path, size: int, disks: Sequence[Disk] | None) -> None:
        super().__init__(size, BLOCK, disks)
        self.path = path
        with path.open("wb") as f:
            f.truncate(size)

    def write(self, offset: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def commit(self) -> None:
        pass


class ImageCompute(Compute):
    """Instances are ``images/<id>.img`` with ``images/<id>.json`` (name, tags)."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = root / "images"
        self.snapshots = root / "snapshots"
        self.images.mkdir(parents=True, exist_ok=True)
        self.snapshots.mkdir(parents=True, exist_ok=True)
        #: the captures this compute made, newest last (tests look at what they read)
        self.captures: list[ImageCapture] = []

    def image(self, instance_id: str) -> Path:
        return self.images / f"{instance_id}.img"

    def make_instance(self, name: str, size: int, tags: Mapping[str, str] = {}) -> Instance:
        instance_id = f"img-{secrets.token_hex(4)}"
        with self.image(instance_id).open("wb") as f:
            f.truncate(size)
        self._write(instance_id, {"name": name, "tags": dict(tags)})
        return self.get_instance(instance_id)

    def _write(self, instance_id: str, meta: Mapping[str, Any]) -> None:
        (self.images / f"{instance_id}.json").write_text(json.dumps(meta))

    def _meta(self, instance_id: str) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((self.images / f"{instance_id}.json").read_text())
        except FileNotFoundError:
            raise InstanceNotFound(instance_id, region=self.region) from None
        return meta

    def get_instance(self, instance_id: str) -> Instance:
        meta = self._meta(instance_id)
        return Instance(
            id=instance_id,
            name=meta["name"],
            region=self.region,
            tags=Tags(meta["tags"]),
            capture_kinds=frozenset({CaptureKind.BLOCKS}),
        )

    def list_instances_page(
        self,
        *,
        tag_filters: Mapping[str, str | None] | None = None,
        page_token: str | None = None,
        page_size: int = 100,
    ) -> InstancePage:
        found = []
        for path in sorted(self.images.glob("*.json")):
            inst = self.get_instance(path.stem)
            if all(
                key in inst.tags and (value is None or inst.tags[key] == value)
                for key, value in (tag_filters or {}).items()
            ):
                found.append(inst)
        return InstancePage(tuple(found), None)

    def set_tags(self, instance_id: str, tags: Mapping[str, str]) -> Tags:
        meta = self._meta(instance_id)
        meta["tags"] = {**meta["tags"], **tags}
        self._write(instance_id, meta)
        return Tags(meta["tags"])

    def remove_tags(self, instance_id: str, keys: list[str]) -> Tags:
        meta = self._meta(instance_id)
        meta["tags"] = {k: v for k, v in meta["tags"].items() if k not in keys}
        self._write(instance_id, meta)
        return Tags(meta["tags"])

    def capture(
        self,
        instance_id: str,
        *,
        kind: CaptureKind | None = None,
        since: str | None = None,
        keep: bool = False,
    ) -> Capture:
        if kind is not None and CaptureKind(kind) is not CaptureKind.BLOCKS:
            raise self.unsupported(f"capture of kind {kind}")
        instance = self.get_instance(instance_id)
        snapshot = self.snapshots / f"{instance_id}-{secrets.token_hex(6)}.img"
        sparse_copy(self.image(instance_id), snapshot)
        earlier = None
        if since is not None:
            named = json.loads(since)
            if named["instance"] == instance_id:
                earlier = self.snapshots / Path(named["snapshot"]).name
        capture = ImageCapture(instance, snapshot, keep=keep, since=earlier)
        self.captures.append(capture)
        return capture

    def release_capture(self, ref: str) -> None:
        named = json.loads(ref)
        (self.snapshots / Path(named["snapshot"]).name).unlink(missing_ok=True)

    def open_restore_sink(
        self,
        spec: LaunchSpec,
        kind: CaptureKind,
        *,
        size: int | None = None,
        disks: Sequence[Disk] | None = None,
    ) -> RestoreSink:
        if CaptureKind(kind) is not CaptureKind.BLOCKS or size is None:
            raise self.unsupported(f"restore sink of kind {kind}")
        instance_id = f"img-{secrets.token_hex(4)}"
        sink = ImageSink(self.image(instance_id), size, disks)
        sink.instance_id = instance_id  # type: ignore[attr-defined]
        return sink

    def launch(self, spec: LaunchSpec, sink: RestoreSink) -> Instance:
        instance_id: str = sink.instance_id  # type: ignore[attr-defined]
        self._write(instance_id, {"name": spec.name, "tags": dict(spec.tags)})
        return self.get_instance(instance_id)

    def terminate(self, instance_id: str) -> None:
        (self.images / f"{instance_id}.json").unlink(missing_ok=True)
        self.image(instance_id).unlink(missing_ok=True)


class ImageProvider(LocalProvider):
    name: ClassVar[str] = "imagefake"

    def compute(self, region: RegionConfig) -> ImageCompute:  # type: ignore[override]
        return ImageCompute(
            self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=replace(
                self.capabilities, capture_kinds=frozenset({CaptureKind.BLOCKS}), launch=True
            ),
        )


@hookimpl
def regionvault_register_providers(registry: ProviderRegistry) -> None:
    registry.add(ImageProvider)
