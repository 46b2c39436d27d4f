"""GCP labels are the GCP provider's tags: the one rule every key and value must meet, checked
before anything is sent.

Compute Engine (and every GCP resource) takes a label key of 1-63 characters, a lower-case
letter first, then lower-case letters, digits, ``_`` and ``-``; a value of 0-63 of the same
characters (a value may start with any of them, or be empty); at most 64 labels on one
resource. GCP also accepts lower-case international letters; the provider keeps to ASCII so
that a tag set here reads back byte for byte everywhere (filters, other clouds' launches).

The policy tags (``1-7``, named policies, ``none``) fit; anything else the provider cannot
store as a label (``Name``, ``backup:daily``, ``Web Server``) is refused with one line naming
the tag and the rule, never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from regionvault.core.errors import ComputeError

__all__ = [
    "KEY_RULE",
    "MAX_LABELS",
    "VALUE_RULE",
    "LabelError",
    "check_key",
    "check_labels",
    "check_value",
    "is_label_key",
    "is_label_value",
]

_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
#: at most this many labels on one GCP resource
MAX_LABELS = 64
KEY_RULE = (
    "a GCP label key is 1-63 characters: a lower-case letter, then lower-case letters, "
    "digits, '_' or '-'"
)
VALUE_RULE = "a GCP label value is 0-63 characters, each a lower-case letter, a digit, '_' or '-'"


class LabelError(ComputeError, ValueError):
    """A tag the provider cannot store as a GCP label (the message names it and the rule)."""


def is_label_key(key: object) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and _VALUE.fullmatch(value) is not None


def check_key(key: object, *, region: str | None = None) -> str:
    """``key`` when it is a label key, else :class:`LabelError` naming it and the rule."""
    if not is_label_key(key):
        raise LabelError(
            f"tag key {key!r} is not a GCP label: {KEY_RULE}", provider="gcp", region=region
        )
    assert isinstance(key, str)
    return key


def check_value(key: str, value: object, *, region: str | None = None) -> str:
    """``value`` when it is a label value, else :class:`LabelError` naming the tag."""
    if not is_label_value(value):
        raise LabelError(
            f"tag {key}={value!r} is not a GCP label: {VALUE_RULE}", provider="gcp", region=region
        )
    assert isinstance(value, str)
    return value


def check_labels(tags: Mapping[str, str], *, region: str | None = None) -> dict[str, str]:
    """``tags`` as labels (a plain dict), every key and value checked; :class:`LabelError`
    names the first that is not a label, or the count when there are more than
    :data:`MAX_LABELS`."""
    labels = {
        check_key(k, region=region): check_value(k, v, region=region) for k, v in tags.items()
    }
    if len(labels) > MAX_LABELS:
        raise LabelError(
            f"{len(labels)} tags: a GCP resource holds at most {MAX_LABELS} labels",
            provider="gcp",
            region=region,
        )
    return labels
