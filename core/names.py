"""The one rule for the names of Vault objects and Transit payloads.

A name is '/'-separated text that every provider can store as it is, so the data plane and
the copy protocol write the same names to any backend and a vault moves between providers
without renaming. The rule is the strictest of the backends': an S3 key's limit of 1024
UTF-8 bytes; a file system's 255 bytes for one path segment; no segment that a path or an
HTTP layer collapses ('', '.', '..'); no control character, which breaks listings and logs;
and no segment starting with :data:`TEMP_PREFIX`, which providers keep for their in-flight
files so that a listing can tell those from objects.
"""

from __future__ import annotations

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_SEGMENT_BYTES",
    "TEMP_PREFIX",
    "name_problem",
    "prefix_problem",
]

#: longest name, in UTF-8 bytes (S3's key limit)
MAX_NAME_BYTES = 1024
#: longest '/'-separated part of a name, in UTF-8 bytes (a file name's limit)
MAX_SEGMENT_BYTES = 255
#: providers' temporary objects and files start with this; never a name's segment
TEMP_PREFIX = ".rv-tmp-"


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an object or transit payload name, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains NUL"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("/"):
        return "starts with '/'"
    for segment in name.split("/"):
        if not segment:
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
        if segment.startswith(TEMP_PREFIX):
            return f"has a segment starting with the reserved prefix {TEMP_PREFIX!r}"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def prefix_problem(prefix: object) -> str | None:
    """Why ``prefix`` cannot select names in a listing, or None when it can: every complete
    segment (before the last '/') must be a valid segment; the rest is free."""
    if not isinstance(prefix, str):
        return f"must be a string, not {type(prefix).__name__}"
    if prefix.startswith("/") or "\x00" in prefix:
        return "starts with '/' or contains NUL"
    folder = prefix.rpartition("/")[0]
    return name_problem(folder) if folder else None
