"""Launching an instance from restored data: its name, waiting for it to be healthy, and
what a launch that failed before an instance existed leaves behind (nothing)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from regionvault.core.errors import (
    InstanceNotFound,
    RegionVaultError,
    TransientError,
    UnlaunchableKind,
)
from regionvault.core.interfaces import RestoreSink
from regionvault.core.types import Instance, RecoveryPoint

if TYPE_CHECKING:
    import pluggy
    from regionvault.core.interfaces import CloudHealth
    from regionvault.core.site import Region

__all__ = ["await_healthy", "check_launchable", "discard_sink", "ignored_facts", "launch_name"]

log = logging.getLogger(__name__)

#: the longest wait between two health checks of a launched instance, in seconds
_MAX_HEALTH_DELAY = 2.0
#: how long after the health wait begins a cloud may still say it knows no such instance
#: (EC2 is eventually consistent: InvalidInstanceID.NotFound right after RunInstances)
_NOT_FOUND_GRACE = 60.0


def check_launchable(region: Region, point: RecoveryPoint) -> None:
    """Refuse, before anything is made, a point whose kind ``region``'s compute cannot
    launch (a block image in a region that runs file trees, or the reverse): one error
    naming the region, its compute, the point and where the point came from."""
    compute = region.compute
    kinds = compute.capabilities.launchable_kinds()
    if point.kind in kinds:
        return
    origin = (
        f"copied from {point.lineage.source_region}"
        if point.lineage is not None
        else f"backed up in {point.region}"
    )
    launches = "+".join(sorted(str(k) for k in kinds)) or "nothing"
    raise UnlaunchableKind(
        f"region {region.name} ({compute.provider}) cannot launch {point.kind} point "
        f"{point.id} of {point.instance_id} ({origin}): its compute launches {launches}",
        provider=compute.provider,
        region=region.name,
    )


def ignored_facts(
    region: Region, facts: Mapping[str, object], point: RecoveryPoint | None = None
) -> tuple[str, ...]:
    """The not-carried line of launch facts the point records and ``region``'s compute does
    not apply (``Capabilities.launch_facts_of``: a point captured on AWS launched into
    another cloud or a local region), naming the members, never their values. With none
    recorded where the compute applies them and the ``point`` came from its own provider
    (a point made before its captures recorded them), that is said instead. () otherwise."""
    compute = region.compute
    applies = compute.capabilities.launch_facts_of
    if not facts:
        origin = point.lineage.source_region if point and point.lineage else None
        origin = origin or (point.region if point else None)
        if applies is not None and origin and origin.split(":", 1)[0] == compute.provider:
            return (
                "launch facts: the point records none (made before its capture recorded "
                "them): only its disks and the region's settings were applied",
            )
        return ()
    if applies is not None and applies in facts:
        return ()
    version = {k for k, v in facts.items() if isinstance(v, int) and not isinstance(v, bool)}
    writer = "+".join(sorted(version)) or "another provider"
    names = ", ".join(sorted(k for k in facts if k not in version))
    return (
        f"launch facts recorded by {writer} at capture ({names}): not applied by "
        f"{compute.provider}",
    )


def discard_sink(region: Region, sink: RestoreSink, error: BaseException) -> None:
    """Discard the sink of a restore or launch that failed with ``error``. If that fails
    too, ``error`` (what the caller sees) still wins: the leftover is logged and noted
    on it."""
    try:
        sink.discard()
    except Exception as exc:
        log.error("the restored data of a failed launch in %s stays behind: %s", region.name, exc)
        error.add_note(f"the restored data in {region.name} could not be discarded: {exc}")
    else:
        log.info("discarded the restored data of a failed launch in %s", region.name)


def launch_name(region: Region, point: RecoveryPoint, name: str | None) -> str:
    """``name``, refused before any data is restored when a live instance has it; else
    ``<instance>-<point id[:8]>``, with ``-2``, ``-3``... when a drill of the same point
    is still running."""
    taken = {
        i.name for i in region.compute.list_instances() if i.state not in ("terminated", "pending")
    }
    if name is not None:
        if name in taken:
            raise RegionVaultError(
                f"{region.name} already has an instance named {name!r}", region=region.name
            )
        return name
    base = f"{point.instance_name}-{point.id[:8]}"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def await_healthy(
    region: Region,
    instance: Instance,
    started: float,
    *,
    timeout: float,
    plugin_manager: pluggy.PluginManager,
) -> tuple[float | None, str | None]:
    """``(seconds from started to healthy, None)``, or ``(None, why)`` when the instance
    did not become healthy in time or its health check raised (the instance exists
    either way: this is reported, never raised). Healthy: the plugins' check passes (with
    no answer, the instance is running) and so do the cloud's own checks, where the
    compute has some (``Compute.cloud_health``: EC2's status checks).

    Every call is bounded by the deadline: one that has not answered by then counts as
    not healthy in time. A :class:`TransientError` (throttling), and for the first
    :data:`_NOT_FOUND_GRACE` seconds an :class:`InstanceNotFound` (a cloud that lists a
    new instance only after a while), is "not yet": the wait goes on. Any other error
    ends it."""
    begun = time.monotonic()
    deadline = begun + timeout
    # asked often at first (a local instance serves within a second), then less and less:
    # a cloud's describe calls are rate-limited, and its status checks take minutes
    delay = 0.05
    last_error: str | None = None
    while True:
        try:
            answered, got = _bounded(
                lambda: _cloud_view(region, instance.id), "cloud-health", deadline
            )
            if answered:
                assert isinstance(got, tuple)
                current: Instance = got[0]
                cloud: CloudHealth | None = got[1]
                answered, answer = _bounded_check(plugin_manager, region.name, current, deadline)
                if not answered:
                    log.warning("health check of %s in %s hung", instance.id, region.name)
                    return None, f"the health check did not answer within {timeout:g}s"
            else:
                log.warning("%s's cloud did not answer of %s in time", region.name, instance.id)
                return None, f"the cloud did not answer within {timeout:g}s"
        except (TransientError, InstanceNotFound) as exc:
            if isinstance(exc, InstanceNotFound) and time.monotonic() - begun > _NOT_FOUND_GRACE:
                log.warning("health check of %s in %s raised: %r", instance.id, region.name, exc)
                return None, f"health check raised {type(exc).__name__}: {exc}"
            log.info("health check of %s in %s, not yet: %s", instance.id, region.name, exc)
            last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                return None, f"not healthy after {timeout:g}s (last: {last_error})"
            time.sleep(max(0.01, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, _MAX_HEALTH_DELAY)
            continue
        except Exception as exc:
            log.warning("health check of %s in %s raised: %r", instance.id, region.name, exc)
            return None, f"health check raised {type(exc).__name__}: {exc}"
        plugin_said_no = answer is not None and not answer
        if answer is None:
            answer = current.state == "running"
        late = time.monotonic() > deadline
        if answer and (cloud is None or cloud.ok) and not late:
            return time.monotonic() - started, None
        if current.state == "terminated":
            return None, "the instance terminated"
        if time.monotonic() >= deadline:
            why = f"state {current.state}"
            if cloud is not None and not cloud.ok:
                why += f"; {cloud.detail or 'the cloud status checks fail'}"
            if plugin_said_no:
                why += "; the plugin's health check says not yet"
            if late and answer and (cloud is None or cloud.ok):
                why += "; healthy only after the deadline"
            return None, f"not healthy after {timeout:g}s ({why})"
        time.sleep(max(0.01, min(delay, deadline - time.monotonic())))
        delay = min(delay * 1.5, _MAX_HEALTH_DELAY)


def _cloud_view(region: Region, instance_id: str) -> tuple[Instance, CloudHealth | None]:
    current = region.compute.get_instance(instance_id)
    return current, region.compute.cloud_health(current)


def _bounded_check(
    plugin_manager: pluggy.PluginManager, region: str, instance: Instance, deadline: float
) -> tuple[bool, object]:
    """``(answered, answer)`` of ``regionvault_health_check``, waited for until
    ``deadline`` at most (:func:`_bounded`)."""
    return _bounded(
        lambda: plugin_manager.hook.regionvault_health_check(region=region, instance=instance),
        "check",
        deadline,
    )


def _bounded(call: Callable[[], object], what: str, deadline: float) -> tuple[bool, object]:
    """``(answered, answer)`` of ``call``, called in a daemon thread and waited for until
    ``deadline`` (monotonic; at least a tenth of a second, so that a zero timeout still
    asks once) at most: a call that hangs is left to itself (``answered`` False), the
    launch's health timeout bounds it. Its error is raised here."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # handed to the waiting thread
            box.append(_Raised(exc))

    # in the caller's context: the hook sees the job it runs for (core/pipeline/acting.py)
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(run,), name=f"regionvault-health-{what}", daemon=True
    )
    thread.start()
    thread.join(max(0.1, deadline - time.monotonic()))
    if not box:
        return False, None
    (answer,) = box
    if isinstance(answer, _Raised):
        raise answer.error
    return True, answer


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error
