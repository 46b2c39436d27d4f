"""A fixed-seed backup dataset shaped like ``shared/research/baselines.md``, and its 1% change.

Per GiB: about 2,600 files from 4 KiB to ~62 MiB (log-normal body, median ~36 KiB, plus a few
dozen large files that carry most of the bytes) in nested directories; 60% of the bytes are
random (incompressible), 40% are text (logs, prose, NDJSON) drawn from a Zipf-weighted vocabulary,
so it compresses like real text rather than like repeated bytes. Everything (sizes, names,
content, modes, mtimes) is a pure function of ``(size, seed)``.

``mutate`` overwrites 1% of the dataset's bytes in place, in scattered 32-96 KiB runs across
~100 files (picked with probability proportional to size), and adds 5 new files (~8 MB per GiB).
It saves the bytes it overwrites to ``DIR.undo`` beside the directory (never inside it), so
``revert`` puts the base dataset back exactly without regenerating it.

Usage::

    python benchmarks/dataset.py generate DIR [--size 1GiB] [--seed 1]
    python benchmarks/dataset.py mutate DIR [--size 1GiB] [--seed 1]
    python benchmarks/dataset.py revert DIR [--size 1GiB] [--seed 1]
    python benchmarks/dataset.py describe [--size 1GiB] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_SEED",
    "GENERATOR_VERSION",
    "DatasetPlan",
    "FileSpec",
    "MutationPlan",
    "MutationSummary",
    "check_layout",
    "describe",
    "format_size",
    "generate",
    "mutate",
    "mutation_plan",
    "parse_size",
    "plan_dataset",
    "revert",
    "summary_line",
    "undo_path",
]

#: bump when the output for a given (size, seed) changes
GENERATOR_VERSION = 1
DEFAULT_SEED = 1

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

FILES_PER_GIB = 2560  # the log-normal body; ~30 large files per GiB come on top
MEDIAN_SIZE = 35 * KiB
SIGMA = 1.35
MIN_SIZE = 4 * KiB
BODY_MAX = 8 * MiB
LARGE_MIN = 8 * MiB
LARGE_MAX = 62 * MiB
TEXT_SHARE = 0.40
FILES_PER_DIR = 20
CHANGE_SHARE = 0.01
CHANGED_FILES = 100
RUN_MIN, RUN_MAX = 32 * KiB, 96 * KiB
NEW_FILES = 5
NEW_BYTES_PER_GIB = 7_900_000
BASE_MTIME = 1_700_000_000  # 2023-11-14

Kind = Literal["random", "text"]
Style = Literal["random", "log", "prose", "json"]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# seed-sequence purposes, so no two uses of one seed share a stream
_PLAN, _CONTENT, _MUTATE, _VOCAB, _NEW = 1, 2, 3, 4, 5

_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "random": (".bin", ".dat", ".jpg", ".zst", ".pack", ".db"),
    "log": (".log",),
    "prose": (".txt", ".md"),
    "json": (".json", ".ndjson"),
}


# -- sizes ------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """``"1GiB"`` -> 1073741824; ``"100MB"`` -> 100000000; a bare number is bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size like 1GiB, 512MiB or 100MB")
    unit = m.group(2).lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit and unit[0] != "b" else 0
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be greater than zero")
    return value


def format_size(n: int) -> str:
    """Binary units, as used on the command line (``1GiB``, ``512MiB``, ``1.5GiB``)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{value:g}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


# -- the plan: names, sizes, kinds ------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """One file of the dataset; its content is a pure function of (seed, purpose, index)."""

    index: int
    path: str  # relative, "/"-separated
    size: int
    style: Style
    mode: int
    mtime: int

    @property
    def kind(self) -> Kind:
        return "random" if self.style == "random" else "text"


@dataclass(frozen=True)
class DatasetPlan:
    total: int
    seed: int
    dirs: tuple[str, ...]
    files: tuple[FileSpec, ...]


def _rng(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, purpose, index])))


@lru_cache(maxsize=4)
def plan_dataset(total: int, seed: int = DEFAULT_SEED) -> DatasetPlan:
    """The dataset's layout for ``total`` bytes: exact byte count, deterministic for a seed."""
    if total < MIN_SIZE:
        raise ValueError(f"size {total} is below the smallest file ({MIN_SIZE} bytes)")
    rng = _rng(seed, _PLAN)
    words = _words(seed)

    body_count = max(1, round(FILES_PER_GIB * total / GiB))
    body = np.exp(rng.normal(math.log(MEDIAN_SIZE), SIGMA, body_count))
    sizes = [int(s) for s in np.clip(body, MIN_SIZE, BODY_MAX)]
    while len(sizes) > 1 and sum(sizes) > total // 2:  # only for tiny datasets
        sizes.pop()
    remaining = total - sum(sizes)
    large: list[int] = []
    while remaining > LARGE_MAX:
        s = int(math.exp(rng.uniform(math.log(LARGE_MIN), math.log(LARGE_MAX))))
        large.append(s)
        remaining -= s
    if remaining >= MIN_SIZE:
        large.append(remaining)
    else:
        sizes[-1] += remaining
    sizes += large
    order = rng.permutation(len(sizes))
    sizes = [sizes[i] for i in order]

    # 40% text by bytes: small files coin-flip, large files fill the budget, then small
    # random files are flipped to text until the split is as close as a small file allows.
    target = round(total * TEXT_SHARE)
    is_text = [bool(rng.random() < 0.45) and s < LARGE_MIN for s in sizes]
    text_bytes = sum(s for s, t in zip(sizes, is_text, strict=True) if t)
    for i, s in enumerate(sizes):
        if s >= LARGE_MIN and text_bytes + s <= target:
            is_text[i], text_bytes = True, text_bytes + s
    for i, s in enumerate(sizes):
        if text_bytes > target:
            if is_text[i] and s < LARGE_MIN:
                is_text[i], text_bytes = False, text_bytes - s
        elif not is_text[i] and s < LARGE_MIN and text_bytes + s <= target:
            is_text[i], text_bytes = True, text_bytes + s

    dirs = _plan_dirs(rng, words, max(1, len(sizes) // FILES_PER_DIR))
    where = rng.integers(0, len(dirs), len(sizes))
    styles = rng.choice(3, len(sizes), p=[0.4, 0.3, 0.3])
    modes = rng.choice(3, len(sizes), p=[0.9, 0.05, 0.05])
    mtimes = rng.integers(0, 365 * 86400, len(sizes))
    name_words = rng.integers(0, len(words), len(sizes))
    ext_pick = rng.integers(0, 6, len(sizes))
    files = []
    for i, size in enumerate(sizes):
        style: Style = ("log", "prose", "json")[styles[i]] if is_text[i] else "random"
        exts = _EXTENSIONS[style]
        name = f"{words[name_words[i]]}-{i:05d}{exts[ext_pick[i] % len(exts)]}"
        parent = dirs[where[i]]
        files.append(
            FileSpec(
                index=i,
                path=f"{parent}/{name}" if parent else name,
                size=size,
                style=style,
                mode=(0o644, 0o600, 0o755)[modes[i]],
                mtime=BASE_MTIME + int(mtimes[i]),
            )
        )
    return DatasetPlan(total=total, seed=seed, dirs=tuple(d for d in dirs if d), files=tuple(files))


def _plan_dirs(rng: np.random.Generator, words: Sequence[str], count: int) -> list[str]:
    """A random tree: each new directory hangs under an existing one at depth < 5."""
    dirs = [""]
    children: dict[str, set[str]] = {"": set()}
    tops = ("home", "srv", "var", "opt", "data")
    for i in range(count):
        candidates = [d for d in dirs if d.count("/") < 4] if i >= len(tops) else [""]
        parent = candidates[int(rng.integers(0, len(candidates)))]
        name = tops[i] if i < len(tops) else words[int(rng.integers(0, len(words)))]
        if name in children[parent]:
            name = f"{name}{i}"
        children[parent].add(name)
        path = f"{parent}/{name}" if parent else name
        dirs.append(path)
        children[path] = set()
    return dirs


# -- text -------------------------------------------------------------------------------------

# fmt: off
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ee", "ie", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "rk", "ck")
# fmt: on


@lru_cache(maxsize=4)
def _words(seed: int, count: int = 6000) -> tuple[str, ...]:
    rng = _rng(seed, _VOCAB)
    seen: dict[str, None] = {}
    while len(seen) < count:
        n = int(rng.choice(4, p=[0.3, 0.45, 0.2, 0.05])) + 1
        word = "".join(
            _ONSETS[int(rng.integers(len(_ONSETS)))]
            + _VOWELS[int(rng.integers(len(_VOWELS)))]
            + _CODAS[int(rng.integers(len(_CODAS)))]
            for _ in range(n)
        )
        seen.setdefault(word, None)
    # frequent words are short, as in real text: Zipf rank follows length (stable, so seeded)
    return tuple(sorted(seen, key=len))


def _zipf(n: int, exponent: float = 1.05, shift: float = 2.7) -> npt.NDArray[np.float64]:
    weights: npt.NDArray[np.float64] = 1.0 / (np.arange(n, dtype=np.float64) + shift) ** exponent
    return weights


class _Sampler:
    """O(1) draws from a fixed discrete distribution through an inverse-CDF lookup table."""

    def __init__(self, weights: Sequence[float] | npt.NDArray[np.float64], bits: int = 16) -> None:
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        points = (np.arange(1 << bits, dtype=np.float64) + 0.5) / (1 << bits)
        table = np.searchsorted(cdf / cdf[-1], points, side="right")
        self.table: I64 = np.minimum(table, len(cdf) - 1).astype(np.int64)

    def draw(self, rng: np.random.Generator, n: int) -> I64:
        return self.table[rng.integers(0, len(self.table), n)]


class _TextModel:
    """All text tokens in one flat byte table; a style draws rows of token ids, then renders."""

    def __init__(self, seed: int) -> None:
        rng = _rng(seed, _VOCAB, 1)
        words = _words(seed)
        self.nwords = len(words)
        tokens: list[bytes] = []

        def add(items: Sequence[str | bytes]) -> int:
            start = len(tokens)
            tokens.extend(t.encode() if isinstance(t, str) else t for t in items)
            return start

        # prose: one token per word with its separator, lower-case or capitalised
        seps = (" ", ", ", "; ", ". ", ".\n\n")
        self.nseps = len(seps)
        self.prose = add(
            [
                (w.capitalize() if cap else w) + sep
                for cap in (False, True)
                for w in words
                for sep in seps
            ]
        )
        self.sep_pick = _Sampler([0.83, 0.08, 0.01, 0.065, 0.015])
        self.word_pick = _Sampler(_zipf(self.nwords), bits=20)

        # log lines: date, time, millis, level, component, message, status, latency, request
        self.date = add(
            [time.strftime("%Y-%m-%dT", time.gmtime(BASE_MTIME + d * 86400)) for d in range(366)]
        )
        self.clock = add([f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400)])
        self.millis = add([f".{m:03d}Z " for m in range(1000)])
        self.level = add(["INFO  ", "DEBUG ", "WARN  ", "ERROR "])
        self.level_pick = _Sampler([0.7, 0.18, 0.09, 0.03])
        services = ("api", "auth", "billing", "cache", "db", "gateway", "ingest", "sched")
        self.component = add([f"[{s}-{i}] " for s in services for i in range(8)])
        message_words = rng.integers(0, 400, (600, 8))
        lengths = rng.integers(3, 9, 600)
        self.message = add(
            [
                " ".join(words[w] for w in row[:n]) + " "
                for row, n in zip(message_words, lengths, strict=True)
            ]
        )
        self.message_pick = _Sampler(_zipf(600, 1.2))
        self.status = add([f"status={c} " for c in (200, 201, 204, 301, 304, 400, 404, 500)])
        self.status_pick = _Sampler([0.72, 0.05, 0.04, 0.01, 0.08, 0.03, 0.05, 0.02])
        self.latency = add([f"latency_ms={v} " for v in range(5000)])
        self.request = add([f"req={h}\n" for h in rng.bytes(4 * 65536).hex(" ", 4).split()])

        # NDJSON records
        self.ident = add([f'{{"id": {i}, "ts": "' for i in range(100000)])
        self.json_millis = add([f'.{m:03d}Z", "user": "' for m in range(1000)])
        self.user = add([f'{w}", "event": "' for w in words])
        events = [
            f"{a}.{b}"
            for a in ("user", "order", "session", "job", "file")
            for b in (
                "created",
                "updated",
                "deleted",
                "failed",
                "retried",
                "viewed",
                "started",
                "finished",
            )
        ]
        self.event = add([f'{e}", "ok": ' for e in events])
        self.event_pick = _Sampler(_zipf(len(events), 1.1))
        self.ok = add(['true, "trace": "', 'false, "trace": "'])
        self.trace = add([f"{h}" for h in rng.bytes(4 * 65536).hex(" ", 4).split()])
        self.trace_end = add([f'{h}", ' for h in rng.bytes(4 * 65536).hex(" ", 4).split()])
        self.score = add([f'"score": {v / 10000:.4f}, "tags": [' for v in range(10000)])
        tag_names = [f'"{words[i]}"' for i in range(40)]
        self.tags = add(
            [", ".join(tag_names[(j * 7 + k * 3) % 40] for k in range(j % 4)) for j in range(200)]
        )
        regions = (
            "us-east-1",
            "us-west-2",
            "eu-west-1",
            "eu-central-1",
            "ap-south-1",
            "ap-northeast-1",
            "sa-east-1",
            "ca-central-1",
        )
        self.region = add([f'], "region": "{r}"}}\n' for r in regions])

        lengths_arr = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        self.lengths: I64 = lengths_arr
        self.offsets: I64 = np.cumsum(lengths_arr) - lengths_arr
        self.flat: U8 = np.frombuffer(b"".join(tokens), dtype=np.uint8)
        self.lengths32 = lengths_arr.astype(np.int32)
        self.offsets32 = self.offsets.astype(np.int32)
        self.row_bytes = {s: self._measure(s) for s in ("log", "prose", "json")}

    def _measure(self, style: str) -> float:
        rows = 4000
        ids = self.rows(style, _rng(0, _VOCAB, 2), rows, {})
        return float(self.lengths[ids].sum()) / rows

    def rows(self, style: str, rng: np.random.Generator, n: int, state: dict[str, int]) -> I64:
        """Token ids of ``n`` rows of ``style``, continuing ``state`` (clock, ids)."""
        if style == "prose":
            words = self.word_pick.draw(rng, n)
            seps = self.sep_pick.draw(rng, n)
            capital = np.empty(n, dtype=np.int64)  # after a full stop
            capital[0] = state.get("capital", 1)
            capital[1:] = seps[:-1] >= 3
            state["capital"] = int(seps[-1] >= 3)
            ids: I64 = self.prose + (capital * self.nwords + words) * self.nseps + seps
            return ids
        seconds = state["clock"] if "clock" in state else int(rng.integers(0, 86400 * 300))
        clock = seconds + np.cumsum(rng.integers(0, 3, n))
        state["clock"] = int(clock[-1])
        day, second = np.divmod(clock, 86400)
        if style == "log":
            cols = [
                self.date + day % 366,
                self.clock + second,
                self.millis + rng.integers(0, 1000, n),
                self.level + self.level_pick.draw(rng, n),
                self.component + rng.integers(0, 64, n),
                self.message + self.message_pick.draw(rng, n),
                self.status + self.status_pick.draw(rng, n),
                self.latency + np.minimum(rng.exponential(40.0, n).astype(np.int64), 4999),
                self.request + rng.integers(0, 65536, n),
            ]
        else:
            ident = state["id"] if "id" in state else int(rng.integers(0, 50000))
            state["id"] = ident + n
            cols = [
                self.ident + (ident + np.arange(n)) % 100000,
                self.date + day % 366,
                self.clock + second,
                self.json_millis + rng.integers(0, 1000, n),
                self.user + self.word_pick.draw(rng, n),
                self.event + self.event_pick.draw(rng, n),
                self.ok + (rng.random(n) < 0.08),
                self.trace + rng.integers(0, 65536, n),
                self.trace_end + rng.integers(0, 65536, n),
                self.score + rng.integers(0, 10000, n),
                self.tags + rng.integers(0, 200, n),
                self.region + rng.integers(0, 8, n),
            ]
        return np.stack(cols).T.ravel().astype(np.int64)

    def render(self, ids: I64) -> bytes:
        # int32 positions: blocks stay far below 2 GiB, and half the memory traffic of int64
        lengths = self.lengths32[ids]
        ends = np.cumsum(lengths, dtype=np.int32)
        positions = np.arange(int(ends[-1]), dtype=np.int32)
        positions += np.repeat(self.offsets32[ids] - (ends - lengths), lengths)
        return self.flat[positions].tobytes()

    def blocks(self, style: str, size: int, rng: np.random.Generator) -> Iterator[bytes]:
        """Exactly ``size`` bytes of ``style`` text, in blocks of at most ~4 MiB."""
        state: dict[str, int] = {}
        left = size
        while left > 0:
            want = min(left, 4 * MiB)
            rows = max(4, int(want / self.row_bytes[style] * 1.1) + 4)
            block = self.render(self.rows(style, rng, rows, state))
            while len(block) < want:  # unlucky draw: top it up
                block += self.render(self.rows(style, rng, rows, state))
            block = block[:want]
            left -= len(block)
            yield block


@lru_cache(maxsize=2)
def _model(seed: int) -> _TextModel:
    return _TextModel(seed)


def _random_blocks(size: int, rng: np.random.Generator) -> Iterator[bytes]:
    left = size
    while left > 0:
        want = min(left, 8 * MiB)
        raw = rng.bit_generator.random_raw((want + 7) // 8)
        yield np.asarray(raw, dtype=np.uint64).tobytes()[:want]
        left -= want


def _content(spec_style: str, size: int, rng: np.random.Generator, seed: int) -> Iterator[bytes]:
    if spec_style == "random":
        return _random_blocks(size, rng)
    return _model(seed).blocks(spec_style, size, rng)


# -- generate ---------------------------------------------------------------------------------


def _write_file(root: Path, spec: FileSpec, seed: int) -> None:
    path = root / spec.path
    with path.open("wb") as f:
        for block in _content(spec.style, spec.size, _rng(seed, _CONTENT, spec.index), seed):
            f.write(block)
    path.chmod(spec.mode)
    os.utime(path, (spec.mtime, spec.mtime))


def _parallel(fn: Callable[[FileSpec], None], specs: Sequence[FileSpec], workers: int) -> None:
    # largest first keeps both workers busy to the end
    ordered = sorted(specs, key=lambda s: -s.size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fn, ordered):
            pass


def generate(
    root: Path, total: int, seed: int = DEFAULT_SEED, *, workers: int | None = None
) -> DatasetPlan:
    """Write the dataset into ``root`` (which must be absent or empty)."""
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; remove it or pick another directory")
    plan = plan_dataset(total, seed)
    _model(seed)  # build the vocabulary once, before the threads race to it
    root.mkdir(parents=True, exist_ok=True)
    for d in plan.dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    _parallel(lambda s: _write_file(root, s, seed), plan.files, workers or os.cpu_count() or 2)
    undo = undo_path(root)
    if undo.exists():
        undo.unlink()
    return plan


def check_layout(root: Path, plan: DatasetPlan) -> None:
    """Raise if ``root`` does not hold this plan's files at their planned sizes."""
    for spec in plan.files:
        path = root / spec.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ValueError(
                f"{root} is not the dataset of size {plan.total} and seed {plan.seed}: "
                f"{spec.path} is missing"
            ) from None
        if size != spec.size:
            raise ValueError(
                f"{root} is not the dataset of size {plan.total} and seed {plan.seed}: "
                f"{spec.path} has {size} bytes, expected {spec.size}"
            )


# -- mutate and revert ------------------------------------------------------------------------


@dataclass(frozen=True)
class MutationPlan:
    edits: tuple[tuple[FileSpec, tuple[tuple[int, int], ...]], ...]  # file, (offset, length)...
    new_files: tuple[FileSpec, ...]

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, runs in self.edits for _, n in runs)

    @property
    def new_bytes(self) -> int:
        return sum(f.size for f in self.new_files)


@dataclass(frozen=True)
class MutationSummary:
    files_changed: int
    runs: int
    bytes_changed: int
    new_files: int
    new_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "files_changed": self.files_changed,
            "runs": self.runs,
            "bytes_changed": self.bytes_changed,
            "new_files": self.new_files,
            "new_bytes": self.new_bytes,
        }


def mutation_plan(plan: DatasetPlan) -> MutationPlan:
    """Which bytes change and which files appear: deterministic for the dataset's seed."""
    rng = _rng(plan.seed, _MUTATE)
    sizes = np.array([f.size for f in plan.files], dtype=np.float64)
    count = min(CHANGED_FILES, len(plan.files))
    chosen = sorted(rng.choice(len(plan.files), count, replace=False, p=sizes / sizes.sum()))
    budget = plan.total * CHANGE_SHARE
    chosen_bytes = float(sizes[chosen].sum())
    edits = []
    for i in chosen:
        spec = plan.files[i]
        share = min(spec.size // 2, max(64, round(budget * spec.size / chosen_bytes)))
        runs_n = max(1, round(share / ((RUN_MIN + RUN_MAX) / 2)))
        lengths = rng.uniform(0.6, 1.4, runs_n)
        lengths = np.maximum(1, (lengths / lengths.sum() * share).astype(np.int64))
        segment = spec.size // runs_n
        runs = []
        for k, length in enumerate(lengths):
            length = int(min(length, segment))
            start = k * segment + int(rng.integers(0, segment - length + 1))
            runs.append((start, length))
        edits.append((spec, tuple(runs)))

    new_total = max(NEW_FILES * MIN_SIZE, round(NEW_BYTES_PER_GIB * plan.total / GiB))
    weights = np.exp(rng.uniform(math.log(256 * KiB), math.log(4 * MiB), NEW_FILES))
    new_sizes = np.maximum(MIN_SIZE, (weights / weights.sum() * new_total).astype(np.int64))
    words = _words(plan.seed)
    dirs = ("", *plan.dirs)
    new_files = []
    for k, size in enumerate(new_sizes):
        style: Style = ("random", "log", "random", "json", "random")[k % 5]
        parent = dirs[int(rng.integers(0, len(dirs)))]
        name = f"new-{words[int(rng.integers(0, len(words)))]}-{k}{_EXTENSIONS[style][0]}"
        new_files.append(
            FileSpec(
                index=len(plan.files) + k,
                path=f"{parent}/{name}" if parent else name,
                size=int(size),
                style=style,
                mode=0o644,
                mtime=BASE_MTIME + 366 * 86400,
            )
        )
    return MutationPlan(edits=tuple(edits), new_files=tuple(new_files))


def undo_path(root: Path) -> Path:
    """Where ``mutate`` keeps the bytes it overwrote: beside the dataset, never inside it."""
    return root.with_name(root.name + ".undo")


def mutate(root: Path, plan: DatasetPlan) -> MutationSummary:
    """Apply the 1% change in place; refuses to apply it twice (``revert`` first)."""
    undo = undo_path(root)
    if undo.exists():
        raise ValueError(f"{root} is already mutated ({undo} exists); revert it first")
    check_layout(root, plan)
    change = mutation_plan(plan)
    header: list[dict[str, Any]] = []
    saved: list[bytes] = []
    for spec, runs in change.edits:  # save what will be overwritten before touching anything
        path = root / spec.path
        header.append({"path": spec.path, "runs": runs, "mtime_ns": path.stat().st_mtime_ns})
        with path.open("rb") as original:
            for offset, length in runs:
                original.seek(offset)
                saved.append(original.read(length))
    blob = json.dumps({"edits": header, "new": [n.path for n in change.new_files]}).encode()
    with undo.open("wb") as log:
        log.write(struct.pack(">Q", len(blob)))
        log.write(blob)
        log.writelines(saved)
        log.flush()
        os.fsync(log.fileno())
    for spec, runs in change.edits:
        rng = _rng(plan.seed, _MUTATE, spec.index + 1)
        with (root / spec.path).open("r+b") as data:
            for offset, length in runs:
                data.seek(offset)
                data.write(b"".join(_content(spec.style, length, rng, plan.seed)))
    for spec in change.new_files:
        path = root / spec.path
        with path.open("wb") as out:
            for block in _content(
                spec.style, spec.size, _rng(plan.seed, _NEW, spec.index), plan.seed
            ):
                out.write(block)
    return MutationSummary(
        files_changed=len(change.edits),
        runs=sum(len(r) for _, r in change.edits),
        bytes_changed=change.changed_bytes,
        new_files=len(change.new_files),
        new_bytes=change.new_bytes,
    )


def revert(root: Path) -> bool:
    """Undo ``mutate`` exactly (bytes and mtimes); False if there was nothing to undo."""
    undo = undo_path(root)
    if not undo.exists():
        return False
    with undo.open("rb") as f:
        (length,) = struct.unpack(">Q", f.read(8))
        header = json.loads(f.read(length))
        for edit in header["edits"]:
            path = root / edit["path"]
            with path.open("r+b") as target:
                for offset, size in edit["runs"]:
                    target.seek(offset)
                    target.write(f.read(size))
            os.utime(path, ns=(edit["mtime_ns"], edit["mtime_ns"]))
    for rel in header["new"]:
        (root / rel).unlink(missing_ok=True)
    undo.unlink()
    return True


# -- describe ---------------------------------------------------------------------------------


def describe(plan: DatasetPlan) -> dict[str, Any]:
    """Facts about the dataset and its change, for reports."""
    sizes = sorted(f.size for f in plan.files)
    text = sum(f.size for f in plan.files if f.kind == "text")
    by_style: dict[str, int] = {}
    for f in plan.files:
        by_style[f.style] = by_style.get(f.style, 0) + f.size
    largest = sizes[-max(1, len(sizes) // 100) :]
    change = mutation_plan(plan)
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": plan.seed,
        "bytes": plan.total,
        "files": len(plan.files),
        "dirs": len(plan.dirs),
        "min_size": sizes[0],
        "median_size": int(statistics.median(sizes)),
        "max_size": sizes[-1],
        "largest_1pct_share": round(sum(largest) / plan.total, 3),
        "text_share": round(text / plan.total, 3),
        "bytes_by_style": by_style,
        "change": {
            "files_changed": len(change.edits),
            "runs": sum(len(r) for _, r in change.edits),
            "bytes_changed": change.changed_bytes,
            "new_files": len(change.new_files),
            "new_bytes": change.new_bytes,
        },
    }


def summary_line(plan: DatasetPlan) -> str:
    d = describe(plan)
    c = d["change"]
    return (
        f"{format_size(d['bytes'])} ({d['bytes'] / 1e6:,.0f} MB) in {d['files']:,} files, "
        f"{d['dirs']} directories, {format_size(d['min_size'])} to {format_size(d['max_size'])}, "
        f"median {format_size(d['median_size'])}; {1 - d['text_share']:.0%} random bytes, "
        f"{d['text_share']:.0%} text (logs, prose, NDJSON); seed {d['seed']}. "
        f"Change: {c['bytes_changed'] / 1e6:.1f} MB overwritten in place in {c['runs']} runs "
        f"across {c['files_changed']} files, plus {c['new_files']} new files "
        f"({c['new_bytes'] / 1e6:.1f} MB)."
    )


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dataset.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("generate", "write the dataset into DIR (absent or empty)"),
        ("mutate", "apply the 1%% change in place (keeps DIR.undo beside DIR)"),
        ("revert", "undo the change exactly, using DIR.undo"),
        ("describe", "print the dataset's facts as JSON"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name != "describe":
            p.add_argument("dir", type=Path)
        p.add_argument("--size", default="1GiB", type=parse_size, help="default 1GiB")
        p.add_argument("--seed", default=DEFAULT_SEED, type=int, help=f"default {DEFAULT_SEED}")
    args = parser.parse_args(argv)
    plan = plan_dataset(args.size, args.seed)
    started = time.perf_counter()
    try:
        if args.command == "describe":
            print(json.dumps(describe(plan), indent=2))
            return 0
        root: Path = args.dir
        if args.command == "generate":
            free = shutil.disk_usage(root.parent if not root.exists() else root).free
            if free < plan.total * 1.1:
                print(
                    f"dataset.py: {root}: needs {plan.total / 1e9:.1f} GB, "
                    f"{free / 1e9:.1f} GB free",
                    file=sys.stderr,
                )
                return 1
            generate(root, args.size, args.seed)
            print(summary_line(plan))
        elif args.command == "mutate":
            summary = mutate(root, plan)
            print(json.dumps(summary.as_dict()))
        elif not revert(root):
            print(
                f"dataset.py: {root}: nothing to revert ({undo_path(root)} is absent)",
                file=sys.stderr,
            )
            return 1
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"dataset.py: {exc}", file=sys.stderr)
        return 1
    print(f"{args.command}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
