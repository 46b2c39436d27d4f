"""A block image's chunks never cross a cut window (the block size times the fewest blocks
that hold a largest chunk; docs/format.md): a changed block then touches only its own
window's chunks, and an incremental backup reads that window again, not its neighbours
(an EBS volume's changed 512 KiB block costs one GetSnapshotBlock:
tests/aws/test_aws_incremental.py)."""

from __future__ import annotations

import random

from regionvault.core import Region
from regionvault.core.repository._backup import _cut_window
from repository_support import repo_for
from test_incremental_blocks import BS, DiffCapture, merge, restored

#: repo_for's chunker: max_size 32 KiB, so 8 blocks of 4 KiB
WINDOW = 32 * 1024


def test_the_cut_window() -> None:
    assert _cut_window(512 * 1024, 512 * 1024) == 512 * 1024  # one EBS block
    assert _cut_window(4096, 512 * 1024) == 512 * 1024  # 128 blocks of 4 KiB
    assert _cut_window(1 << 20, 512 * 1024) == 1 << 20  # a block larger than a chunk
    assert _cut_window(3000, 8192) == 9000  # whole blocks, never less than a chunk
    assert _cut_window(BS, 32 * 1024) == WINDOW


def test_a_change_at_a_windows_edge_reads_only_that_window(east: Region) -> None:
    """Bytes changed just inside the start of one window and just inside the end of
    another: the incremental backup reads within those two windows only (with chunks
    across windows it would read the chunk reaching back into the window before), and
    restores byte for byte."""
    size = 32 * WINDOW
    old = random.Random(31).randbytes(size)
    repo = repo_for(east)
    first = repo.backup(DiffCapture(old, written=[(0, size)]))

    new = bytearray(old)
    new[5 * WINDOW + 3] ^= 0xFF
    new[9 * WINDOW - 2] ^= 0xFF
    cap = DiffCapture(bytes(new), written=[(0, size)], since=old)
    second = repo.backup(cap, base=first.id)
    read = merge(cap.read)
    inside = [any(w * WINDOW <= o and o + n <= (w + 1) * WINDOW for w in (5, 8)) for o, n in read]
    assert read and all(inside), read
    for changed in (5 * WINDOW + 3, 9 * WINDOW - 2):
        assert any(o <= changed < o + n for o, n in read), (changed, read)
    assert restored(repo, second.id, size) == bytes(new)
    assert restored(repo, first.id, size) == old
