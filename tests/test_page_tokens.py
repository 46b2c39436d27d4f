"""The page tokens of cloud listings whose pages the providers cut again (EC2, ARM): one codec
in core, opaque to callers, refused with one line when forged or damaged."""

from __future__ import annotations

import base64

import pytest
from regionvault.core.types import InstancePage


@pytest.mark.parametrize(("cloud", "skip"), [(None, 0), (None, 7), ("abc/==?&", 250)])
def test_a_token_round_trips(cloud: str | None, skip: int) -> None:
    token = InstancePage.token(cloud, skip)
    assert token.isascii() and " " not in token
    assert InstancePage.parse_token(token) == (cloud, skip)


def test_no_token_is_the_first_page() -> None:
    assert InstancePage.parse_token(None) == (None, 0)
    assert InstancePage.parse_token("") == (None, 0)


@pytest.mark.parametrize(
    "token",
    [
        "nonsense",
        "rv1.!!!",
        InstancePage.token(None, 0)[:-3],
        "rv1." + "eyJ0IjogMSwgInMiOiAwfQ==",  # {"t": 1, "s": 0}: not a string
        "rv1." + base64.urlsafe_b64encode(b'{"t":null,"s":-1}').decode(),  # skip -1
    ],
)
def test_a_forged_or_damaged_token_is_refused_naming_it(token: str) -> None:
    with pytest.raises(ValueError, match="bad page token"):
        InstancePage.parse_token(token)
