"""The Vault suite: atomic and if-absent puts, ranged gets, listing by prefix, deletes, and
WORM retention and legal holds where the provider declares them (security invariant 5)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from regionvault.core.conformance.checks import (
    bad_names,
    expect_refusal,
    expect_unsupported,
    fail,
    require,
    require_not,
    unusual_names,
    who,
)
from regionvault.core.conformance.fixtures import SuiteBase
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
    RetentionLocked,
    VaultError,
)
from regionvault.core.interfaces import Vault
from regionvault.core.names import name_problem
from regionvault.core.types import RetentionMode

__all__ = ["VaultSuite"]

#: size of the object overwritten while a reader polls it, and how many versions are written
ATOMIC_SIZE = 2 << 20
ATOMIC_VERSIONS = 8
#: threads racing to create one name with an if-absent put, and how many names they race for
RACERS = 8
RACES = 4
#: retention set by the tests: long enough to outlast the test, short enough to expire soon
LOCK_FOR = timedelta(seconds=30)


def _racer_data(racer: int) -> bytes:
    return f"racer {racer} ".encode() * 1000


def _race_if_absent(vault: Vault, name: str) -> tuple[list[int], list[str]]:
    """:data:`RACERS` threads put ``name`` if absent at once: (winners, unexpected errors)."""
    barrier = threading.Barrier(RACERS)
    won: list[int] = []
    other: list[str] = []

    def racer(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            vault.put(name, _racer_data(i), if_absent=True)
            won.append(i)
        except ObjectExists:
            pass
        except Exception as exc:
            other.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return won, other


class VaultSuite(SuiteBase):
    """Fixtures: ``vault_a`` and ``vault_b`` (Vaults of regions A and B). The tests write
    only under ``conformance/<uid>/`` and delete what they wrote (objects under a compliance
    lock stay until it expires, at most :data:`LOCK_FOR`)."""

    @pytest.fixture
    def prefix(self, vault_a: Vault, uid: str) -> Iterator[str]:
        """The test's own part of the vault, emptied after the test."""
        prefix = f"conformance/{uid}/"
        yield prefix
        for info in list(vault_a.list(prefix)):
            with contextlib.suppress(RegionVaultError):
                if info.legal_hold:
                    vault_a.set_legal_hold(info.name, False)
                vault_a.delete(info.name, bypass_governance=True)

    # put / get / head ----------------------------------------------------------------

    def test_put_get_head_round_trip(self, vault_a: Vault, prefix: str) -> None:
        name, data = f"{prefix}round-trip", os.urandom(100_000)
        info = vault_a.put(name, data)
        assert (info.name, info.size) == (name, len(data)), (
            f"{who(vault_a)}.put returned {info.name!r} of {info.size} bytes for {name!r} of "
            f"{len(data)} bytes"
        )
        assert vault_a.get(name) == data, f"{who(vault_a)}.get did not return what put stored"
        assert vault_a.head(name).size == len(data)
        assert vault_a.exists(name)
        vault_a.put(f"{prefix}empty", b"")
        assert vault_a.get(f"{prefix}empty") == b"", f"{who(vault_a)} mangled an empty object"

    def test_put_overwrites(self, vault_a: Vault, prefix: str) -> None:
        name = f"{prefix}overwritten"
        vault_a.put(name, b"first version, the longer one")
        vault_a.put(name, b"second")
        assert vault_a.get(name) == b"second", f"{who(vault_a)}: a put did not replace the object"
        assert vault_a.head(name).size == len(b"second")

    def test_missing_object_raises_object_not_found(self, vault_a: Vault, prefix: str) -> None:
        name = f"{prefix}never-written"
        for call in (lambda: vault_a.get(name), lambda: vault_a.head(name)):
            expect_refusal(
                call,
                ObjectNotFound,
                broken=f"{who(vault_a)} answered for an object that was never written",
                asked=f"{who(vault_a)}, asked for a missing object,",
            )
        assert not vault_a.exists(name)

    def test_put_is_atomic_for_concurrent_readers(self, vault_a: Vault, prefix: str) -> None:
        """A reader polling an object while it is overwritten again and again sees only whole
        versions: never a short object, a mix of two, or no object at all."""
        name = f"{prefix}atomic"
        versions = [bytes([v]) * ATOMIC_SIZE for v in range(1, ATOMIC_VERSIONS + 1)]
        vault_a.put(name, versions[0])
        done, first_read = threading.Event(), threading.Event()
        torn: list[str] = []
        reads = 0

        def reader() -> None:
            nonlocal reads
            try:
                while not done.is_set() and reads < 100_000 and not torn:
                    try:
                        data = vault_a.get(name)
                    except ObjectNotFound:
                        torn.append("the object was missing")
                        return
                    reads += 1
                    first_read.set()
                    if len(data) != ATOMIC_SIZE or data.count(data[:1]) != ATOMIC_SIZE:
                        kinds = len(set(data[::4096]))
                        torn.append(
                            f"it read {len(data)} bytes mixing {kinds} byte values, not one "
                            f"whole version of {ATOMIC_SIZE} bytes"
                        )
            except Exception as exc:
                torn.append(f"the reader failed: {type(exc).__name__}: {exc}")
            finally:
                first_read.set()

        thread = threading.Thread(target=reader, name="conformance-reader", daemon=True)
        thread.start()
        try:
            first_read.wait(timeout=60)
            for version in versions[1:]:
                vault_a.put(name, version)
                if torn:
                    break
        finally:
            done.set()
            thread.join(timeout=60)
        if torn:
            fail(
                f"{who(vault_a)}: put is not atomic: a concurrent reader of {name!r} saw a "
                f"partial object ({torn[0]})"
            )
        assert vault_a.get(name) == versions[-1], f"{who(vault_a)} lost the last overwrite"

    # names ---------------------------------------------------------------------------

    def test_names_follow_the_one_rule(self, vault_a: Vault, prefix: str) -> None:
        # regionvault.core.names is the rule for every vault: what it refuses is refused with
        # VaultError, and unusual names it accepts are stored as they are
        for bad in bad_names(prefix):
            problem = name_problem(bad)
            assert problem is not None, f"the suite's bad name {bad!r} is valid"
            expect_refusal(
                functools.partial(vault_a.put, bad, b"x"),
                VaultError,
                broken=f"{who(vault_a)} stored an object under {bad!r}, a name that {problem}",
                asked=f"{who(vault_a)}, asked to put {bad!r} (a name that {problem}),",
            )
        for good in unusual_names(prefix):
            assert name_problem(good) is None, f"the suite's unusual name {good!r} is invalid"
            vault_a.put(good, good.encode())
            assert vault_a.get(good) == good.encode(), (
                f"{who(vault_a)}: the object {good!r} did not read back as written"
            )
        listed = {info.name for info in vault_a.list(prefix)}
        missing = [n for n in unusual_names(prefix) if n not in listed]
        assert not missing, f"{who(vault_a)}.list({prefix!r}) does not show {missing}"

    # if-absent -----------------------------------------------------------------------

    def test_if_absent_put_refuses_a_taken_name(self, vault_a: Vault, prefix: str) -> None:
        require(vault_a, "conditional_put")
        name = f"{prefix}if-absent"
        vault_a.put(name, b"first", if_absent=True)
        expect_refusal(
            lambda: vault_a.put(name, b"second", if_absent=True),
            ObjectExists,
            broken=f"{who(vault_a)}: an if-absent put replaced the existing object {name!r}",
            asked=f"{who(vault_a)}, asked for an if-absent put over an existing object,",
        )
        assert vault_a.get(name) == b"first", (
            f"{who(vault_a)}: a refused if-absent put still changed the object"
        )

    def test_if_absent_race_has_exactly_one_winner(self, vault_a: Vault, prefix: str) -> None:
        require(vault_a, "conditional_put")
        for race in range(RACES):
            name = f"{prefix}race-{race}"
            won, other = _race_if_absent(vault_a, name)
            if other:
                fail(f"{who(vault_a)}: a racing if-absent put of {name!r} failed: {other[0]}")
            if len(won) != 1:
                fail(
                    f"{who(vault_a)}: {len(won)} of {RACERS} racing if-absent puts of {name!r} "
                    "succeeded; exactly one must win"
                )
            assert vault_a.get(name) == _racer_data(won[0]), (
                f"{who(vault_a)}: {name!r} does not hold the winning racer's data"
            )

    # ranged get ----------------------------------------------------------------------

    def test_ranged_get(self, vault_a: Vault, prefix: str) -> None:
        require(vault_a, "ranged_get")
        name, data = f"{prefix}ranged", os.urandom(300_000)
        vault_a.put(name, data)
        for offset, length in ((0, 1), (1, 10), (65_536, 70_000), (299_990, 10), (123, None)):
            end = None if length is None else offset + length
            got = vault_a.get(name, offset=offset, length=length)
            assert got == data[offset:end], (
                f"{who(vault_a)}.get(offset={offset}, length={length}) returned {len(got)} "
                f"bytes that are not bytes [{offset}:{end}] of the object"
            )
        tail = vault_a.get(name, offset=299_000, length=5000)
        assert tail == data[299_000:], (
            f"{who(vault_a)}: a range running past the end returned {len(tail)} bytes, not the "
            "object's last 1000"
        )

    # list ----------------------------------------------------------------------------

    def test_list_by_prefix_in_name_order(self, vault_a: Vault, prefix: str) -> None:
        base = f"{prefix}list"
        names = [
            f"{base}/a",
            f"{base}/b-x",
            f"{base}/b/1",
            f"{base}/b/2",
            f"{base}/b2",
            f"{base}/c",
            f"{base}er",  # shares the string prefix "list" but not the folder "list/"
        ]
        for i, name in enumerate(reversed(names)):
            vault_a.put(name, b"x" * (i + 1))
        sizes = {name: len(names) - i for i, name in enumerate(names)}
        cases = {
            f"{base}/": names[:-1],
            f"{base}/b": [f"{base}/b-x", f"{base}/b/1", f"{base}/b/2", f"{base}/b2"],
            f"{base}/b/": [f"{base}/b/1", f"{base}/b/2"],
            base: names,
            f"{base}/zzz": [],
        }
        for want_prefix, want in cases.items():
            listed = list(vault_a.list(want_prefix))
            got = [info.name for info in listed]
            assert got == sorted(want), (
                f"{who(vault_a)}.list({want_prefix!r}) returned {got}, expected {sorted(want)} "
                "(every name starting with the prefix, in name order)"
            )
            for info in listed:
                assert info.size == sizes[info.name], (
                    f"{who(vault_a)}.list reports {info.size} bytes for {info.name!r}, which "
                    f"holds {sizes[info.name]}"
                )

    # delete --------------------------------------------------------------------------

    def test_delete(self, vault_a: Vault, prefix: str) -> None:
        name = f"{prefix}deleted"
        vault_a.put(name, b"soon gone")
        vault_a.delete(name)
        assert not vault_a.exists(name), f"{who(vault_a)}: {name!r} still exists after delete"
        assert name not in [i.name for i in vault_a.list(prefix)], (
            f"{who(vault_a)}: {name!r} is still listed after delete"
        )
        expect_refusal(
            lambda: vault_a.get(name),
            ObjectNotFound,
            broken=f"{who(vault_a)} still returns {name!r} after delete",
            asked=f"{who(vault_a)}, asked for a deleted object,",
        )
        vault_a.delete(name)  # deleting what is absent is not an error

    def test_vault_ids_are_stable_and_differ_between_regions(
        self, vault_a: Vault, vault_b: Vault
    ) -> None:
        assert vault_a.vault_id == vault_a.vault_id, f"{who(vault_a)}: vault_id changes"
        assert vault_a.vault_id != vault_b.vault_id, (
            f"the vaults of regions {vault_a.region} and {vault_b.region} have the same id "
            f"{vault_a.vault_id!r}; the data plane binds objects to their vault by it"
        )

    # WORM retention and legal hold ---------------------------------------------------

    def test_governance_retention_refuses_early_delete(self, vault_a: Vault, prefix: str) -> None:
        require(vault_a, "worm_lock")
        name = f"{prefix}governance"
        vault_a.put(name, b"kept")
        until = datetime.now(UTC) + LOCK_FOR
        info = vault_a.set_retention(name, until, RetentionMode.GOVERNANCE)
        assert info.retain_until is not None and info.retain_until >= until.replace(
            microsecond=0
        ), f"{who(vault_a)}.set_retention reports retain_until={info.retain_until}"
        head = vault_a.head(name)
        assert head.retention_mode is RetentionMode.GOVERNANCE, (
            f"{who(vault_a)}.head reports retention mode {head.retention_mode}, not governance"
        )
        expect_refusal(
            lambda: vault_a.delete(name),
            RetentionLocked,
            broken=(
                f"{who(vault_a)} deleted {name!r} under a governance retention lock without "
                "bypass_governance: WORM retention is not enforced"
            ),
            asked=f"{who(vault_a)}, asked to delete a governance-locked object,",
        )
        assert vault_a.get(name) == b"kept", f"{who(vault_a)}: a refused delete changed {name!r}"
        vault_a.delete(name, bypass_governance=True)
        assert not vault_a.exists(name), (
            f"{who(vault_a)}: delete(bypass_governance=True) left a governance-locked object"
        )

    def test_compliance_retention_refuses_delete_and_shortening(
        self, vault_a: Vault, prefix: str
    ) -> None:
        require(vault_a, "worm_lock")
        name = f"{prefix}compliance"
        vault_a.put(name, b"kept for good")
        until = datetime.now(UTC) + LOCK_FOR
        vault_a.set_retention(name, until, RetentionMode.COMPLIANCE)
        for bypass in (False, True):
            expect_refusal(
                functools.partial(vault_a.delete, name, bypass_governance=bypass),
                RetentionLocked,
                broken=(
                    f"{who(vault_a)} deleted {name!r} under a compliance retention lock "
                    f"(bypass_governance={bypass}): WORM retention is not enforced"
                ),
                asked=f"{who(vault_a)}, asked to delete a compliance-locked object,",
            )
        expect_refusal(
            lambda: vault_a.set_retention(
                name, until - timedelta(seconds=20), RetentionMode.COMPLIANCE
            ),
            RetentionLocked,
            broken=f"{who(vault_a)} shortened a compliance retention lock on {name!r}",
            asked=f"{who(vault_a)}, asked to shorten a compliance lock,",
        )
        expect_refusal(
            lambda: vault_a.set_retention(
                name, until, RetentionMode.GOVERNANCE, bypass_governance=True
            ),
            RetentionLocked,
            broken=f"{who(vault_a)} turned a compliance retention lock on {name!r} into governance",
            asked=f"{who(vault_a)}, asked to weaken a compliance lock to governance,",
        )
        longer = vault_a.set_retention(name, until + timedelta(seconds=5))
        assert longer.retain_until is not None and longer.retain_until > until, (
            f"{who(vault_a)} did not extend a compliance lock (retain_until={longer.retain_until})"
        )
        assert vault_a.get(name) == b"kept for good"

    def test_legal_hold_refuses_delete_until_lifted(self, vault_a: Vault, prefix: str) -> None:
        require(vault_a, "legal_hold")
        name = f"{prefix}held"
        vault_a.put(name, b"evidence")
        assert vault_a.set_legal_hold(name, True).legal_hold, (
            f"{who(vault_a)}.set_legal_hold(True) reports no hold"
        )
        assert vault_a.head(name).legal_hold, f"{who(vault_a)}.head does not show the hold"
        for bypass in (False, True):
            expect_refusal(
                functools.partial(vault_a.delete, name, bypass_governance=bypass),
                RetentionLocked,
                broken=(
                    f"{who(vault_a)} deleted {name!r} under a legal hold "
                    f"(bypass_governance={bypass}): legal holds are not enforced"
                ),
                asked=f"{who(vault_a)}, asked to delete an object under legal hold,",
            )
        assert not vault_a.set_legal_hold(name, False).legal_hold
        vault_a.delete(name)
        assert not vault_a.exists(name), f"{who(vault_a)}: the delete after lifting a hold failed"

    def test_undeclared_retention_is_refused(self, vault_a: Vault, prefix: str) -> None:
        require_not(vault_a, "worm_lock")
        name = f"{prefix}no-worm"
        vault_a.put(name, b"x")
        until = datetime.now(UTC) + LOCK_FOR
        expect_unsupported(vault_a, "set_retention", lambda: vault_a.set_retention(name, until))

    def test_undeclared_legal_hold_is_refused(self, vault_a: Vault, prefix: str) -> None:
        require_not(vault_a, "legal_hold")
        name = f"{prefix}no-hold"
        vault_a.put(name, b"x")
        expect_unsupported(vault_a, "set_legal_hold", lambda: vault_a.set_legal_hold(name, True))
