"""Options and arguments several commands share: ``--json``, ``--tag KEY=VALUE``, and an
instance named by id or name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from regionvault.core.types import Instance, Tags

if TYPE_CHECKING:
    from regionvault.core.site import Site

__all__ = ["json_option", "parse_tag_options", "resolve_instance", "tags_callback"]

F = TypeVar("F", bound=Callable[..., Any])


def json_option(func: F) -> F:
    """The ``--json`` flag of listing and reporting commands (passed as ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def parse_tag_options(values: Iterable[str], *, param_hint: str = "--tag") -> dict[str, str]:
    """``["k=v", ...]`` as a dict; :class:`click.BadParameter` naming a malformed value."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip() or key != key.strip():
            raise click.BadParameter(
                f"{value!r} is not KEY=VALUE (a non-empty key without surrounding spaces)",
                param_hint=param_hint,
            )
        if key in out:
            raise click.BadParameter(f"tag key {key!r} given twice", param_hint=param_hint)
        out[key] = val
    return out


def tags_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Tags:
    """A click callback: a repeated ``KEY=VALUE`` option as :class:`Tags`."""
    return Tags(parse_tag_options(value))


def resolve_instance(site: Site, ref: str, region: str | None = None) -> Instance:
    """The instance ``ref`` names (an id or a unique name); see :meth:`Site.find_instance`."""
    return site.find_instance(ref, region=region)
