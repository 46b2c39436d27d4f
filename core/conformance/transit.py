"""The Transit suite: sealed payloads from A reach B's inbox whole and open only in B, bytes
moved are counted, and an interrupted copy can resume by asking what already arrived."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import pytest
from regionvault.core.conformance.checks import bad_names, expect_refusal, who
from regionvault.core.conformance.fixtures import SuiteBase
from regionvault.core.errors import KeyAccessDenied, RegionVaultError, TransitError
from regionvault.core.interfaces import KeyService, Sealer, Transit
from regionvault.core.names import name_problem

__all__ = ["TransitSuite"]


class TransitSuite(SuiteBase):
    """Fixtures: ``transit_ab`` (a Transit from region A into B's inbox), ``transit_ba`` (from
    B into A's), ``reopen_transit_ab`` (makes a new Transit from A into B, as after a
    restart), ``keys_a``, ``keys_b`` (the regions' KeyServices), ``sealer_b`` (B's seal-only
    handle)."""

    @pytest.fixture
    def inbox_prefix(self, transit_ab: Transit, uid: str) -> Iterator[str]:
        """The test's own payload names, discarded from B's inbox after the test."""
        prefix = f"conformance/{uid}/"
        yield prefix
        for name in list(transit_ab.inbox(prefix)):
            with contextlib.suppress(RegionVaultError):
                transit_ab.discard(name)

    def test_sealed_payload_reaches_b_and_opens_only_there(
        self,
        transit_ab: Transit,
        keys_a: KeyService,
        keys_b: KeyService,
        sealer_b: Sealer,
        inbox_prefix: str,
    ) -> None:
        name = f"{inbox_prefix}sealed-key"
        secret = os.urandom(32)
        context = {"purpose": "conformance transit", "payload": name}
        sealed = sealer_b.seal(secret, context)
        assert not transit_ab.has(name)
        transit_ab.send(name, sealed)
        assert name in list(transit_ab.inbox(inbox_prefix)), (
            f"{who(transit_ab)}: {name!r} sent from {transit_ab.source} is not in the inbox"
        )
        received = transit_ab.receive(name)
        assert received == sealed, (
            f"{who(transit_ab)} delivered {len(received)} bytes that differ from the "
            f"{len(sealed)} sent"
        )
        assert keys_b.unseal(received, context) == secret, (
            f"{who(keys_b)} could not open a payload sealed for it after transit"
        )
        expect_refusal(
            lambda: keys_a.unseal(received, context),
            KeyAccessDenied,
            broken=(
                f"KeyService of region {keys_a.region} unsealed a payload sealed for region "
                f"{keys_b.region}: key isolation is broken"
            ),
            asked=f"KeyService of region {keys_a.region}, asked to unseal B's payload,",
        )
        transit_ab.discard(name)
        assert not transit_ab.has(name), f"{who(transit_ab)}: {name!r} is still there after discard"
        assert name not in list(transit_ab.inbox(inbox_prefix))

    def test_payload_names_follow_the_one_rule(
        self, transit_ab: Transit, inbox_prefix: str
    ) -> None:
        # regionvault.core.names is the rule for payload names as for vault objects
        for bad in bad_names(inbox_prefix):
            problem = name_problem(bad)
            expect_refusal(
                functools.partial(transit_ab.send, bad, b"x"),
                TransitError,
                broken=f"{who(transit_ab)} delivered a payload {bad!r}, a name that {problem}",
                asked=f"{who(transit_ab)}, asked to send {bad!r} (a name that {problem}),",
            )

    def test_large_payload_arrives_whole(self, transit_ab: Transit, inbox_prefix: str) -> None:
        name, payload = f"{inbox_prefix}pack", os.urandom(3 << 20)
        transit_ab.send(name, payload)
        assert transit_ab.receive(name) == payload, (
            f"{who(transit_ab)} did not deliver a {len(payload)}-byte payload intact"
        )

    def test_bytes_sent_counts_payload_bytes(
        self, reopen_transit_ab: Callable[[], Transit], inbox_prefix: str
    ) -> None:
        transit = reopen_transit_ab()
        try:
            assert transit.bytes_sent == 0, (
                f"{who(transit)}: a new Transit reports {transit.bytes_sent} bytes sent"
            )
            sizes = (1, 1000, 65_537)
            for i, size in enumerate(sizes):
                transit.send(f"{inbox_prefix}counted-{i}", os.urandom(size))
            assert transit.bytes_sent == sum(sizes), (
                f"{who(transit)}: bytes_sent is {transit.bytes_sent} after sending payloads of "
                f"{sum(sizes)} bytes"
            )
        finally:
            transit.close()

    def test_resume_asks_what_already_arrived(
        self, transit_ab: Transit, reopen_transit_ab: Callable[[], Transit], inbox_prefix: str
    ) -> None:
        names = [f"{inbox_prefix}resume/{i:03d}" for i in range(3)]
        for name in names[:2]:
            transit_ab.send(name, name.encode())
        restarted = reopen_transit_ab()
        try:
            arrived = [name for name in names if restarted.has(name)]
            assert arrived == names[:2], (
                f"{who(restarted)}: after a restart has() reports {arrived} of {names}, but "
                f"{names[:2]} were sent; an interrupted copy cannot resume"
            )
            restarted.send(names[2], names[2].encode())
            assert restarted.bytes_sent == len(names[2]), (
                f"{who(restarted)}: the resumed transit counts {restarted.bytes_sent} bytes, "
                f"having sent {len(names[2])}"
            )
            listed = list(restarted.inbox(f"{inbox_prefix}resume/"))
            assert listed == names, (
                f"{who(restarted)}.inbox() lists {listed}, expected {names} in name order"
            )
            assert list(restarted.inbox(f"{inbox_prefix}resume/00")) == names, (
                f"{who(restarted)}.inbox() does not select by name prefix"
            )
            assert list(restarted.inbox(f"{inbox_prefix}resume/001")) == names[1:2]
        finally:
            restarted.close()

    def test_a_link_delivers_one_way(
        self, transit_ab: Transit, transit_ba: Transit, inbox_prefix: str
    ) -> None:
        name = f"{inbox_prefix}one-way"
        transit_ab.send(name, b"for B only")
        assert not transit_ba.has(name) and name not in list(transit_ba.inbox(inbox_prefix)), (
            f"a payload sent from {transit_ab.source} into {transit_ab.region}'s inbox shows up "
            f"in {transit_ba.region}'s inbox"
        )
