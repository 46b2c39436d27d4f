"""Helpers the suites share: capability gates, expected refusals, test data, and reading and
writing captures and restore sinks. Failures say which service of which region broke which
promise, so that a provider author reads the cause in the one-line summary."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn, TypeVar

import pytest
from regionvault.core.conformance.support import IMAGE_ALIGNMENT, tar_image, write_tree
from regionvault.core.errors import UnsupportedOperation
from regionvault.core.interfaces import (
    BlockCapture,
    BlockSink,
    Capture,
    Compute,
    FileCapture,
    FileSink,
    KeyService,
    RestoreSink,
    Service,
    Transit,
    Vault,
)
from regionvault.core.names import MAX_NAME_BYTES, MAX_SEGMENT_BYTES, TEMP_PREFIX
from regionvault.core.types import CaptureKind, FileKind, Instance

__all__ = [
    "IMAGE_ALIGNMENT",
    "bad_names",
    "check_capture_holds",
    "check_listing_matches",
    "expect_refusal",
    "expect_unsupported",
    "fail",
    "payload",
    "require",
    "require_kind",
    "require_not",
    "sink_size",
    "tar_image",
    "unusual_names",
    "who",
    "write_sink",
]

E = TypeVar("E", bound=BaseException)


def fail(message: str) -> NoReturn:
    """Fail the test with ``message`` alone (no traceback into the suite's helpers)."""
    pytest.fail(message, pytrace=False)


def who(service: Service) -> str:
    """``Vault of region aws:us-east-1``: the service and where it runs, for messages."""
    if isinstance(service, Transit):
        return f"Transit from {service.source} into {service.region}"
    for kind in (Compute, KeyService, Vault):
        if isinstance(service, kind):
            return f"{kind.__name__} of region {service.region}"
    return f"{type(service).__name__} of region {service.region}"


# --------------------------------------------------------------------------- capability gates


def require(service: Service, capability: str) -> None:
    """Skip the test unless the service's provider declares ``capability``."""
    if not getattr(service.capabilities, capability):
        pytest.skip(
            f"provider {service.provider} does not declare Capabilities.{capability} "
            f"(region {service.region})"
        )


def require_not(service: Service, capability: str) -> None:
    """Skip the test when the provider declares ``capability`` (tests of the refusal)."""
    if getattr(service.capabilities, capability):
        pytest.skip(
            f"provider {service.provider} declares Capabilities.{capability} (this test checks "
            "the refusal where it is not declared)"
        )


def require_kind(service: Service, kind: CaptureKind) -> None:
    if kind not in service.capabilities.capture_kinds:
        pytest.skip(
            f"provider {service.provider} does not declare capture kind {kind.value!r} "
            f"(Capabilities.capture_kinds of region {service.region})"
        )


# --------------------------------------------------------------------------- refusals


def expect_refusal(action: Callable[[], object], error: type[E], *, broken: str, asked: str) -> E:
    """Run ``action``, which must raise ``error``. If it returns, fail with ``broken`` (what
    is wrong); if it raises something else, fail naming ``asked`` (what was asked) and the
    error it raised instead."""
    try:
        action()
    except error as exc:
        return exc
    except Exception as exc:
        fail(f"{asked} raised {type(exc).__name__} ({exc}); it must raise {error.__name__}")
    fail(broken)


def expect_unsupported(service: Service, operation: str, action: Callable[[], object]) -> None:
    """An operation the provider does not declare raises UnsupportedOperation (a named error,
    never a bare NotImplementedError or a silent success)."""
    expect_refusal(
        action,
        UnsupportedOperation,
        broken=(
            f"{who(service)} performed {operation} although its provider does not declare it "
            "in its Capabilities: declare the capability or raise UnsupportedOperation"
        ),
        asked=f"{who(service)}, asked for the undeclared {operation},",
    )


# --------------------------------------------------------------------------- test data


def payload(seed: str) -> dict[str, bytes]:
    """A small instance data set (relative path -> bytes), the same for the same seed."""
    rng = random.Random(seed)
    return {
        "hello.txt": f"hello from the regionvault conformance suite ({seed})\n".encode(),
        "state/sessions.bin": rng.randbytes(48 * 1024),
        "state/subscribers.db": rng.randbytes(5000),
    }


def sink_size(kind: CaptureKind, data: Mapping[str, bytes]) -> int | None:
    return len(tar_image(data)) if kind is CaptureKind.BLOCKS else None


def write_sink(sink: RestoreSink, data: Mapping[str, bytes]) -> None:
    """Restore ``data`` into ``sink`` as the engine would: files into a file sink, a tar image
    in whole blocks into a block sink (then commit)."""
    if isinstance(sink, FileSink):
        write_tree(sink.root, data)
    elif isinstance(sink, BlockSink):
        image = tar_image(data)
        size, block = sink.size, sink.block_size
        if block <= 0 or size < len(image):
            fail(
                f"open_restore_sink made a block sink of {size} bytes in blocks of {block} for "
                f"an image of {len(image)} bytes"
            )
        for offset in range(0, len(image), block):
            piece = image[offset : offset + block]
            sink.write(offset, piece + bytes(block - len(piece)))
        sink.commit()
    else:
        fail(f"open_restore_sink returned a {type(sink).__name__}, not a FileSink or BlockSink")


# --------------------------------------------------------------------------- captures


def _file_contents(capture: FileCapture, label: str) -> dict[str, bytes]:
    entries = list(capture.entries())
    again = [e.path for e in capture.entries()]
    if [e.path for e in entries] != again:
        fail(f"{label}: entries() listed a different order the second time")
    seen: set[str] = set()
    out: dict[str, bytes] = {}
    for entry in entries:
        parts = entry.path.split("/")
        if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            fail(f"{label}: entry path {entry.path!r} is not a plain relative path")
        parent = entry.path.rpartition("/")[0]
        if parent and parent not in seen:
            fail(f"{label}: entry {entry.path!r} comes before its directory {parent!r}")
        seen.add(entry.path)
        if entry.kind is FileKind.FILE:
            with capture.open(entry) as f:
                content = f.read()
            if len(content) != entry.size:
                fail(
                    f"{label}: {entry.path!r} read {len(content)} bytes, its entry says "
                    f"{entry.size}"
                )
            out[entry.path] = content
    totals = capture.totals()
    counted = (len(out), sum(len(content) for content in out.values()))
    if totals is not None and tuple(totals) != counted:
        fail(
            f"{label} (region {capture.instance.region}): totals() says {tuple(totals)}, its "
            f"entries hold {counted[0]} regular files of {counted[1]} bytes"
        )
    return out


def _block_runs(capture: BlockCapture, label: str) -> list[bytes]:
    """The written ranges of a block capture, adjacent blocks joined."""
    runs: list[bytearray] = []
    end = -1
    for offset, data in capture.blocks():
        if offset < 0 or offset % capture.block_size:
            fail(f"{label}: block at offset {offset} is not aligned to {capture.block_size}")
        if offset < end:
            fail(f"{label}: blocks are not in ascending offset order (offset {offset})")
        if offset + len(data) > capture.size:
            fail(f"{label}: block at {offset} runs past the disk's {capture.size} bytes")
        if offset == end and runs:
            runs[-1] += data
        else:
            runs.append(bytearray(data))
        end = offset + len(data)
    return [bytes(r) for r in runs]


def check_capture_holds(capture: Capture, expected: Mapping[str, bytes], label: str) -> None:
    """The capture holds every file of ``expected`` with its exact bytes (for a block
    capture: each file's bytes somewhere, contiguous, in the written blocks)."""
    if isinstance(capture, FileCapture):
        got = _file_contents(capture, label)
        for path, content in expected.items():
            if path not in got:
                fail(f"{label} lacks the file {path!r} (it holds {sorted(got)})")
            if got[path] != content:
                fail(
                    f"{label} holds other bytes for {path!r} ({len(got[path])} bytes, "
                    f"expected {len(content)})"
                )
    elif isinstance(capture, BlockCapture):
        runs = _block_runs(capture, label)
        for path, content in expected.items():
            if content and not any(content in run for run in runs):
                fail(f"{label}: the bytes of {path!r} appear nowhere in its blocks")
    else:
        fail(f"{label} is a {type(capture).__name__}, not a FileCapture or BlockCapture")


# --------------------------------------------------------------------------- listings


def check_listing_matches(
    compute: Compute, filters: Mapping[str, str | None], instances: Iterable[Instance]
) -> None:
    """Every listed instance matches ``filters``."""
    for instance in instances:
        if not instance.tags.matches(filters):
            fail(
                f"{who(compute)} ignored tag filter {dict(filters)}: it listed {instance.id} "
                f"({instance.name}) whose tags are {dict(instance.tags)}"
            )


# --------------------------------------------------------------------------- names


def bad_names(prefix: str) -> list[str]:
    """Names :func:`regionvault.core.names.name_problem` refuses, one per clause of the rule."""
    return [
        f"{prefix}a//b",
        f"{prefix}a/../b",
        f"{prefix}./a",
        f"{prefix}trailing/",
        f"/{prefix}absolute",
        f"{prefix}tab\there",
        f"{prefix}nul\0",
        f"{prefix}" + "s" * (MAX_SEGMENT_BYTES + 1),
        f"{prefix}" + "d/" * (MAX_NAME_BYTES // 2) + "x",
        f"{prefix}x/{TEMP_PREFIX}y",
    ]


def unusual_names(prefix: str) -> list[str]:
    """Valid names a careless backend might mangle: blanks, non-ASCII, dots inside segments."""
    return [f"{prefix}with blanks", f"{prefix}ünïcødé/ø", f"{prefix}dots/.hidden/a..b"]
