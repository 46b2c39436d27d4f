"""Commands that protect a recovery point, or let it go: ``lock`` (a WORM lock until a time),
``hold`` (a legal hold), ``release`` (lifts a legal hold; a governance lock only with
``--bypass-governance``, the administrator's act) and ``forget`` (deletes a point's manifest,
refused while it is locked or held). POINT is an id, or a unique prefix of at least 6
characters, as ``restore`` and ``points`` take it; ``--region`` when it is ambiguous."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from regionvault.core.cli.options import json_option
from regionvault.core.cli.output import print_json
from regionvault.core.cli.root import CliState, ExpectedError, pass_state

if TYPE_CHECKING:
    from regionvault.core.repository import Repository
    from regionvault.core.types import RecoveryPoint

__all__ = ["forget", "hold", "lock", "release"]

_REGION = click.option(
    "--region", "-r", metavar="REGION", help="The region whose vault holds POINT (if ambiguous)."
)


def _state_of(repo: Repository, point: RecoveryPoint) -> dict[str, Any]:
    info = repo.point_object(point.id)
    now = datetime.now(UTC)
    locked = info.retain_until is not None and info.retain_until > now
    return {
        "point": point.id,
        "region": point.region,
        "retain_until": info.retain_until.isoformat() if locked and info.retain_until else None,
        "mode": info.retention_mode.value if locked and info.retention_mode else None,
        "legal_hold": info.legal_hold,
    }


def _say(out: dict[str, Any]) -> str:
    parts = []
    if out["retain_until"]:
        parts.append(f"locked until {out['retain_until']} ({out['mode']})")
    if out["legal_hold"]:
        parts.append("legal hold on")
    return f"{out['point']} in {out['region']}: " + (", ".join(parts) or "not protected")


def _parse_until(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time (like 2027-01-31 or 2027-01-31T12:00:00Z)",
            param_hint="--until",
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse_for(text: str) -> timedelta:
    from regionvault.core.durations import DurationError, parse_tag_duration

    try:
        return parse_tag_duration(text, "lock duration")
    except DurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None


@click.command()
@click.argument("point")
@click.option(
    "--until", "until_text", metavar="TIME", help="Lock until this time (ISO 8601, UTC if no zone)."
)
@click.option(
    "--for", "for_text", metavar="DURATION", help="Lock for this long from now (30d, 12h, 4w)."
)
@click.option(
    "--mode",
    type=click.Choice(["governance", "compliance"]),
    default="governance",
    show_default=True,
    help="governance: an administrator may lift it (release --bypass-governance); "
    "compliance: nobody may shorten or lift it, ever.",
)
@_REGION
@json_option
@pass_state
def lock(
    state: CliState,
    point: str,
    until_text: str | None,
    for_text: str | None,
    mode: str,
    region: str | None,
    as_json: bool,
) -> None:
    """WORM-lock recovery point POINT (every pack and index object it uses, then its
    manifest) until --until TIME or --for DURATION. A lock is only ever extended: a shorter
    one than the point carries, or governance over compliance, is refused."""
    if (until_text is None) == (for_text is None):
        raise click.UsageError("give one of --until TIME or --for DURATION")
    from regionvault.core.types import RetentionMode

    if until_text is not None:
        until = _parse_until(until_text)
    else:  # whole seconds, rounded up: never shorter than asked
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        until += _parse_for(for_text or "")
    engine = state.engine()
    found, report = engine.lock_point(point, until, RetentionMode(mode), region=region)
    repo = engine.repository(found.region, create=False)
    out = {**_state_of(repo, found), "objects_changed": len(report.locked)}
    if as_json:
        print_json(out)
    else:
        click.echo(_say(out))


@click.command()
@click.argument("point")
@_REGION
@json_option
@pass_state
def hold(state: CliState, point: str, region: str | None, as_json: bool) -> None:
    """Place a legal hold on recovery point POINT (every object it uses, then its manifest):
    nothing of it can be deleted until ``release`` lifts the hold."""
    engine = state.engine()
    found, report = engine.hold_point(point, region=region)
    repo = engine.repository(found.region, create=False)
    out = {**_state_of(repo, found), "objects_changed": len(report.locked)}
    if as_json:
        print_json(out)
    else:
        click.echo(_say(out))


@click.command()
@click.argument("point")
@click.option(
    "--bypass-governance",
    is_flag=True,
    help="Also lift a governance lock: the administrator's act (a compliance lock is never "
    "lifted).",
)
@_REGION
@json_option
@pass_state
def release(
    state: CliState, point: str, bypass_governance: bool, region: str | None, as_json: bool
) -> None:
    """Lift the legal hold of recovery point POINT; with --bypass-governance, its governance
    lock too. A compliance lock is refused, naming its date. Objects POINT shares with other
    protected points keep what those need."""
    engine = state.engine()
    found, report = engine.release_point(point, region=region, bypass_governance=bypass_governance)
    repo = engine.repository(found.region, create=False)
    out = {
        **_state_of(repo, found),
        "objects_released": len(report.released),
        "objects_kept_for_other_points": len(report.kept),
    }
    if as_json:
        print_json(out)
    else:
        click.echo(_say(out))


@click.command()
@click.argument("points", metavar="POINT...", nargs=-1, required=True)
@_REGION
@click.option(
    "--dry-run",
    "-n",
    is_flag=True,
    help="Say whether the points would be forgotten (or refused, and why); change nothing.",
)
@json_option
@pass_state
def forget(
    state: CliState, points: tuple[str, ...], region: str | None, dry_run: bool, as_json: bool
) -> None:
    """Forget recovery points POINT... (their data goes at the next prune): all or none.
    Refused, forgetting none, while a WORM lock or legal hold protects any of them. With
    --dry-run, say so and change nothing (exit 1 when it would be refused, as the real run
    would)."""
    from regionvault.core.errors import RetentionLocked
    from regionvault.core.repository import forget_refusal

    engine = state.engine()
    found: dict[str, RecoveryPoint] = {}
    for ref in points:
        p = engine.find_point(ref, region)
        found.setdefault(p.id, p)  # a point named twice is forgotten once
    chosen = list(found.values())
    by_region: dict[str, list[RecoveryPoint]] = {}
    for p in chosen:
        by_region.setdefault(p.region, []).append(p)
    # all or none: every refusal is known before anything is deleted (Engine.forget is all
    # or none within a region, and checks again)
    for name, group in by_region.items():
        repo = engine.repository(name, create=False)
        for p in group:
            refusal = forget_refusal(repo, p.id)
            if refusal is not None:
                verb = "would not be forgotten" if dry_run else "cannot be forgotten"
                rest = f" (nor the {len(chosen) - 1} other(s) named)" if len(chosen) > 1 else ""
                raise ExpectedError(f"point {p.id} in {p.region} {verb}: {refusal}{rest}")
    if not dry_run:
        for name, group in by_region.items():
            try:
                engine.forget(name, [p.id for p in group])
            except RetentionLocked as exc:  # protected since it was checked
                raise ExpectedError(
                    f"points {', '.join(p.id[:8] for p in group)} in {name} cannot be "
                    f"forgotten: {exc.reason}"
                ) from None
    key = "would_forget" if dry_run else "forgotten"
    rows = [
        {key: p.id, "region": p.region, **({"dry_run": True} if dry_run else {})} for p in chosen
    ]
    if as_json:
        print_json(rows[0] if len(points) == 1 else rows)
        return
    for p in chosen:
        if dry_run:
            click.echo(f"would forget {p.id} in {p.region} (dry run: nothing changed)")
        else:
            click.echo(f"forgot {p.id} in {p.region}")
