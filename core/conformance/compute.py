"""The Compute suite: listing with pagination and tag filters, tags written and read back,
captures of every declared kind, restore sinks and launch, terminate."""

from __future__ import annotations

from pathlib import Path

import pytest
from regionvault.core.conformance.checks import (
    check_capture_holds,
    check_listing_matches,
    expect_refusal,
    expect_unsupported,
    fail,
    payload,
    require,
    require_kind,
    require_not,
    sink_size,
    who,
    write_sink,
)
from regionvault.core.conformance.fixtures import InstanceFactory, SuiteBase
from regionvault.core.conformance.support import RUN_TAG
from regionvault.core.errors import InstanceNotFound, RegionVaultError
from regionvault.core.interfaces import Compute, RestoreSink
from regionvault.core.types import CaptureKind, Instance, LaunchSpec, Tags

__all__ = ["ComputeSuite"]

KINDS = pytest.mark.parametrize("kind", list(CaptureKind), ids=[k.value for k in CaptureKind])
#: instances made for the pagination test, and the page size it lists them with
PAGED = 5
PAGE_SIZE = 2


def _ids(compute: Compute, filters: dict[str, str | None]) -> set[str]:
    listed = list(compute.list_instances(tag_filters=filters, page_size=PAGE_SIZE))
    check_listing_matches(compute, filters, listed)
    return {instance.id for instance in listed}


class ComputeSuite(SuiteBase):
    """Fixtures: ``compute_a`` (the Compute of region A) and ``make_instance`` (an
    :class:`~regionvault.core.conformance.fixtures.InstanceFactory` for region A). Every test
    instance carries the tag ``rv-conformance=<uid>``, and the tests list only those."""

    # listing -------------------------------------------------------------------------

    def test_list_pages_through_every_instance_once(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str
    ) -> None:
        made = {make_instance(f"page{i}", tags={"paged": "yes"}).id for i in range(PAGED)}
        make_instance("not-paged")  # matches the run tag alone: must not be listed
        filters: dict[str, str | None] = {RUN_TAG: uid, "paged": "yes"}
        seen: list[str] = []
        token: str | None = None
        for _ in range(4 * PAGED):  # bounded: PAGED instances need at most PAGED pages
            page = compute_a.list_instances_page(
                tag_filters=filters, page_token=token, page_size=PAGE_SIZE
            )
            if len(page.instances) > PAGE_SIZE:
                fail(
                    f"{who(compute_a)} returned a page of {len(page.instances)} instances for "
                    f"page_size={PAGE_SIZE}"
                )
            check_listing_matches(compute_a, filters, page.instances)
            seen.extend(instance.id for instance in page.instances)
            token = page.next_token
            if token is None:
                break
        else:
            fail(f"{who(compute_a)} kept returning a next_token after {4 * PAGED} pages")
        twice = sorted({i for i in seen if seen.count(i) > 1})
        assert not twice, f"{who(compute_a)} listed {twice} on more than one page"
        assert set(seen) == made, (
            f"{who(compute_a)}: paging with page_size={PAGE_SIZE} listed {sorted(set(seen))}, "
            f"expected the {PAGED} instances {sorted(made)}"
        )
        for instance in compute_a.list_instances(tag_filters=filters, page_size=PAGE_SIZE):
            assert instance.region == compute_a.region, (
                f"{who(compute_a)} lists {instance.id} as an instance of {instance.region}"
            )

    def test_list_filters_by_tag_value_and_by_key(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str
    ) -> None:
        db1 = make_instance("db1", tags={"role": "db", "tier": "gold"}).id
        db2 = make_instance("db2", tags={"role": "db"}).id
        web = make_instance("web", tags={"role": "web", "tier": "silver"}).id
        bare = make_instance("bare").id
        cases: list[tuple[dict[str, str | None], set[str]]] = [
            ({}, {db1, db2, web, bare}),
            ({"role": "db"}, {db1, db2}),
            ({"tier": None}, {db1, web}),
            ({"role": "db", "tier": None}, {db1}),
            ({"role": None}, {db1, db2, web}),
            ({"role": "cache"}, set()),
        ]
        for extra, want in cases:
            filters = {RUN_TAG: uid, **extra}
            got = _ids(compute_a, filters)
            assert got == want, (
                f"{who(compute_a)}: listing with tag filter {filters} returned "
                f"{sorted(got)}, expected {sorted(want)}"
            )

    def test_get_unknown_instance_raises_instance_not_found(self, compute_a: Compute) -> None:
        expect_refusal(
            lambda: compute_a.get_instance("i-0123456789abcdef0"),
            InstanceNotFound,
            broken=f"{who(compute_a)} returned an instance for an id that does not exist",
            asked=f"{who(compute_a)}, asked for an unknown instance,",
        )

    # tags ----------------------------------------------------------------------------

    def test_set_tags_and_read_them_back(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str
    ) -> None:
        instance = make_instance("tagged", tags={"keep": "1", "role": "web"})
        make_instance("bystander", tags={"role": "web"})
        after = compute_a.set_tags(instance.id, {"role": "db", "backup": "1-7"})
        want = {RUN_TAG: uid, "keep": "1", "role": "db", "backup": "1-7"}
        assert dict(after) == want, (
            f"{who(compute_a)}.set_tags returned {dict(after)}, expected {want} (added and "
            "overwritten, others kept)"
        )
        read = compute_a.get_instance(instance.id).tags
        assert dict(read) == want, f"{who(compute_a)}: get_instance shows tags {dict(read)}"
        filters: dict[str, str | None] = {RUN_TAG: uid, "role": "db"}
        listed = list(compute_a.list_instances(tag_filters=filters))
        check_listing_matches(compute_a, filters, listed)
        assert [i.id for i in listed] == [instance.id], (
            f"{who(compute_a)}: after set_tags, filtering by the new tag lists "
            f"{[i.id for i in listed]}"
        )
        assert dict(listed[0].tags) == want, f"{who(compute_a)}: the listing shows stale tags"

    def test_remove_tags(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str
    ) -> None:
        instance = make_instance("untagged", tags={"a": "1", "b": "2"})
        after = compute_a.remove_tags(instance.id, ["a", "never-there"])
        want = {RUN_TAG: uid, "b": "2"}
        assert dict(after) == want, f"{who(compute_a)}.remove_tags left {dict(after)}"
        assert dict(compute_a.get_instance(instance.id).tags) == want
        assert _ids(compute_a, {RUN_TAG: uid, "a": None}) == set(), (
            f"{who(compute_a)} still lists {instance.id} by a tag key it removed"
        )

    # capture -------------------------------------------------------------------------

    @KINDS
    def test_capture_holds_the_instance_data(
        self, compute_a: Compute, make_instance: InstanceFactory, kind: CaptureKind
    ) -> None:
        require_kind(compute_a, kind)
        data = payload(f"capture-{kind.value}")
        instance = make_instance(f"capture-{kind.value}", data=data)
        if kind not in instance.capture_kinds:
            pytest.skip(f"the test instance {instance.id} offers no {kind.value} capture")
        with compute_a.capture(instance.id, kind=kind) as capture:
            assert capture.kind is kind, (
                f"{who(compute_a)}.capture(kind={kind.value}) returned a {capture.kind} capture"
            )
            assert capture.instance.id == instance.id
            check_capture_holds(capture, data, f"the {kind.value} capture of {instance.id}")

    @KINDS
    def test_capture_of_an_undeclared_kind_is_refused(
        self, compute_a: Compute, make_instance: InstanceFactory, kind: CaptureKind
    ) -> None:
        if kind in compute_a.capabilities.capture_kinds:
            pytest.skip(
                f"provider {compute_a.provider} declares capture kind {kind.value!r} (this test "
                "checks the refusal of an undeclared kind)"
            )
        instance = make_instance(f"no-{kind.value}")
        expect_unsupported(
            compute_a,
            f"capture(kind={kind.value})",
            lambda: compute_a.capture(instance.id, kind=kind),
        )

    # restore and launch --------------------------------------------------------------

    @KINDS
    def test_launch_from_restored_data(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str, kind: CaptureKind
    ) -> None:
        require(compute_a, "launch")
        require_kind(compute_a, kind)
        data = payload(f"launch-{kind.value}")
        source = make_instance(f"source-{kind.value}", data=data)
        tags = Tags({RUN_TAG: uid, "restored-from": source.id})
        spec = LaunchSpec(
            name=f"{uid}-launched-{kind.value}",
            tags=tags,
            function=source.function,
            source=source,
        )
        sink = compute_a.open_restore_sink(spec, kind, size=sink_size(kind, data))
        assert sink.kind is kind, (
            f"{who(compute_a)}.open_restore_sink({kind.value}) made a {sink.kind} sink"
        )
        write_sink(sink, data)
        launched = make_instance.adopt(compute_a.launch(spec, sink))
        assert launched.id != source.id, f"{who(compute_a)}.launch returned the source instance"
        assert launched.name == spec.name and dict(launched.tags) == dict(tags), (
            f"{who(compute_a)}.launch made {launched.name!r} tagged {dict(launched.tags)}, "
            f"expected {spec.name!r} tagged {dict(tags)}"
        )
        listed = _ids(compute_a, {RUN_TAG: uid, "restored-from": source.id})
        assert listed == {launched.id}, (
            f"{who(compute_a)}: the launched instance {launched.id} is not listed ({listed})"
        )
        with compute_a.capture(launched.id, kind=kind) as capture:
            check_capture_holds(
                capture, data, f"the instance {launched.id} launched from restored data"
            )

    @KINDS
    def test_a_discarded_sink_cannot_be_launched(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str, kind: CaptureKind
    ) -> None:
        """The engine discards the sink of a failed restore or launch
        (``RestoreSink.discard``): discarding twice is harmless, and the sink is then refused
        by launch with a RegionVaultError, making no instance. Skipped for sinks that keep
        the default discard (they hold nothing of their own)."""
        require(compute_a, "launch")
        require_kind(compute_a, kind)
        data = payload(f"discard-{kind.value}")
        tags = Tags({RUN_TAG: uid, "discarded": "yes"})
        spec = LaunchSpec(name=f"{uid}-discarded-{kind.value}", tags=tags)
        sink = compute_a.open_restore_sink(spec, kind, size=sink_size(kind, data))
        if type(sink).discard is RestoreSink.discard:
            sink.discard()
            pytest.skip(
                f"{who(compute_a)}: {type(sink).__name__} keeps the default discard (nothing "
                "of its own to remove)"
            )
        write_sink(sink, data)
        sink.discard()
        sink.discard()
        launched: list[Instance] = []
        try:
            expect_refusal(
                lambda: launched.append(compute_a.launch(spec, sink)),
                RegionVaultError,
                broken=f"{who(compute_a)}.launch started an instance from a discarded sink",
                asked=f"{who(compute_a)}, asked to launch from a discarded sink,",
            )
        finally:
            for instance in launched:
                make_instance.adopt(instance)
        listed = _ids(compute_a, {RUN_TAG: uid, "discarded": "yes"})
        assert listed == set(), (
            f"{who(compute_a)} lists {sorted(listed)} after a launch from a discarded sink"
        )

    def test_undeclared_launch_is_refused(self, compute_a: Compute, uid: str) -> None:
        require_not(compute_a, "launch")
        kinds = sorted(compute_a.capabilities.capture_kinds) or [CaptureKind.FILES]
        spec = LaunchSpec(name=f"{uid}-never", tags=Tags({RUN_TAG: uid}))
        expect_unsupported(
            compute_a, "open_restore_sink", lambda: compute_a.open_restore_sink(spec, kinds[0])
        )

    def test_undeclared_register_instance_is_refused(
        self, compute_a: Compute, uid: str, tmp_path: Path
    ) -> None:
        require_not(compute_a, "register_instance")
        expect_unsupported(
            compute_a,
            "register_instance",
            lambda: compute_a.register_instance(f"{uid}-adopted", tmp_path),
        )

    # terminate -----------------------------------------------------------------------

    def test_terminated_instance_leaves_the_listings(
        self, compute_a: Compute, make_instance: InstanceFactory, uid: str
    ) -> None:
        keep = make_instance("kept").id
        gone = make_instance("terminated").id
        compute_a.terminate(gone)
        listed = _ids(compute_a, {RUN_TAG: uid})
        assert gone not in listed, f"{who(compute_a)} still lists {gone} after terminate"
        assert keep in listed, f"{who(compute_a)}: terminating {gone} also removed {keep}"
        try:
            state = compute_a.get_instance(gone).state
        except InstanceNotFound:
            return
        assert state not in ("running", "pending"), (
            f"{who(compute_a)}: {gone} is {state!r} after terminate"
        )
