"""The tagger: gives a region's untagged instances the site's default policy tag.

One pass over a region (:func:`tag_region`):

- an instance without the policy tag gets ``site.default_policy`` written as its tag;
- an explicit tag is never overwritten, unless ``site.overwrite_tags`` is set, and then only
  with the default policy (an instance tagged ``none`` is always left alone: opting out wins);
- every instance's resulting tags are checked with :func:`resolve_policy`, and a malformed
  value is reported with the instance and the reason, never raised;
- a partial policy tag (``1-``, ``-7``, ``1``) is reported as *completed*, with the whole
  value it completed to from the site's default policy, and left as written: the scheduler
  completes it the same way on every pass, so a later change of the default applies to it
  (docs/policies.md says why it is not rewritten);
- a failure to write one instance's tags is reported and the pass goes on.

A second pass over an unchanged region tags nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from regionvault.core.durations import quote_value
from regionvault.core.errors import PolicyError, RegionVaultError
from regionvault.core.policy import NONE, check_site_policies, resolve_policy

if TYPE_CHECKING:
    from regionvault.core.config import SiteConfig
    from regionvault.core.interfaces import Compute
    from regionvault.core.types import Instance

__all__ = ["Completed", "InstanceNote", "TagReport", "Tagged", "tag_region"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceNote:
    """Why an instance was skipped, or what is wrong with it."""

    instance_id: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.instance_id} ({self.name}): {self.reason}"


@dataclass(frozen=True)
class Tagged:
    """An instance whose policy tag the tagger wrote."""

    instance_id: str
    name: str
    value: str
    #: the value it replaced (with ``overwrite_tags``), None when the tag was absent
    previous: str | None = None

    def __str__(self) -> str:
        change = f"{self.previous!r} -> " if self.previous is not None else ""
        return f"{self.instance_id} ({self.name}): {change}{self.value!r}"


@dataclass(frozen=True)
class Completed:
    """An instance whose partial policy tag the site's default policy completes (the tag is
    left as written)."""

    instance_id: str
    name: str
    #: the tag as written (``"1-"``)
    value: str
    #: the whole value it completed to (``"1-7"``)
    completed: str
    #: the side taken from the default: ``"frequency"`` or ``"retention"``
    part: str
    #: the site's default policy it came from
    default: str

    def __str__(self) -> str:
        return (
            f"{self.instance_id} ({self.name}): {self.value} -> {self.completed} "
            f"({self.part} from default_policy {quote_value(self.default)})"
        )


@dataclass(frozen=True)
class TagReport:
    """What one pass of the tagger did in one region.

    An instance is counted once: in ``tagged``, ``skipped`` (left as it was, with a valid
    policy), ``completed`` (left as it was, a partial policy tag the default completes),
    ``malformed`` (left as it was, its tags do not make a valid policy) or ``failed``
    (writing its tag failed). The one exception is an instance the tagger tagged whose tags
    still do not make a valid policy (a bad ``backup-copy-to`` next to the tag it just wrote):
    it is in ``tagged`` and in ``malformed``, since both happened.
    """

    region: str
    tag_key: str
    tagged: tuple[Tagged, ...] = ()
    skipped: tuple[InstanceNote, ...] = ()
    malformed: tuple[InstanceNote, ...] = ()
    failed: tuple[InstanceNote, ...] = ()
    completed: tuple[Completed, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.malformed and not self.failed

    def summary(self) -> str:
        # "completed N" only when there are any, so that the line stays as it was otherwise
        completed = f"completed {len(self.completed)}, " if self.completed else ""
        return (
            f"{self.region}: tagged {len(self.tagged)}, skipped {len(self.skipped)}, "
            f"{completed}malformed {len(self.malformed)}, failed {len(self.failed)}"
        )


def _label(instance: Instance) -> str:
    return instance.name or instance.id


def tag_region(compute: Compute, site: SiteConfig, *, page_size: int = 100) -> TagReport:
    """Tag every instance of ``compute``'s region that has no policy tag with the site's
    default policy; see the module documentation for the rules.

    A site whose own default policy is invalid raises :class:`ConfigError` before anything is
    tagged: that is the site's error, not an instance's.
    """
    check_site_policies(site)
    key, default = site.tag_key, site.default_policy
    tagged: list[Tagged] = []
    skipped: list[InstanceNote] = []
    malformed: list[InstanceNote] = []
    failed: list[InstanceNote] = []
    completed: list[Completed] = []

    # Listed in full before any tag is written, so that writes cannot disturb pagination.
    instances = list(compute.list_instances(page_size=page_size))
    for instance in instances:
        current = instance.tags.get(key)
        label = _label(instance)
        skip: InstanceNote | None = None
        if current == NONE:
            skip = InstanceNote(instance.id, label, f"opted out ({key}={NONE})")
        elif current == default:
            skip = InstanceNote(instance.id, label, "has the default policy")
        elif current is not None and not site.overwrite_tags:
            skip = InstanceNote(instance.id, label, f"explicit {key}={quote_value(current)}")
        else:
            try:
                tags = compute.set_tags(instance.id, {key: default})
            except RegionVaultError as exc:
                log.warning("tagging %s in %s failed: %s", instance.id, compute.region, exc)
                failed.append(InstanceNote(instance.id, label, f"setting {key} failed: {exc}"))
                continue
            instance = replace(instance, tags=tags)
            tagged.append(Tagged(instance.id, label, default, current))
        try:
            policy = resolve_policy(instance, site)
        except PolicyError as exc:
            malformed.append(InstanceNote(instance.id, label, exc.message))
            continue  # left as it was, and malformed: counted there alone
        if skip is not None and policy is not None and policy.completed is not None:
            part = policy.completed_part or ""
            completed.append(
                Completed(instance.id, label, policy.source, policy.completed, part, default)
            )
        elif skip is not None:
            skipped.append(skip)
    return TagReport(
        region=compute.region,
        tag_key=key,
        tagged=tuple(tagged),
        skipped=tuple(skipped),
        malformed=tuple(malformed),
        failed=tuple(failed),
        completed=tuple(completed),
    )
