"""The copy handshake, as jobs that each need one region's credentials alone.

:class:`CopyFlow` runs the copy phases (``copy-offer``, ``copy-request``, ``copy-send``,
``copy-commit``) and a region's own ``copy-receipt``, each building only its own region's
repository (vault and keys), the other region's Sealer and the two Transits, all from
configuration. For a region's own tick it also reads what the region's inbox holds (names
only), turns that into the jobs of its side of every copy, and finds the offers due; for a
whole-site tick, the copies due. The protocol itself (payloads, notices, receipts, copy
records) is the data plane's: docs/copy.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from regionvault.core.errors import (
    IntegrityError,
    PayloadWaiting,
    PolicyError,
    RegionVaultError,
    TransitError,
)
from regionvault.core.pipeline.jobs import (
    COPY_COMMIT,
    COPY_OFFER,
    COPY_RECEIPT,
    COPY_REQUEST,
    COPY_SEND,
    Handler,
    Job,
    copy_phase_job,
    copy_receipt_job,
)
from regionvault.core.policy import parse_copy_to, resolve_policy
from regionvault.core.repository import (
    CommitReport,
    CopyReceipt,
    CopyReceiver,
    CopySender,
    CopyTracker,
    EventAction,
    SentNotice,
    offer_name,
    open_receipt,
    open_sent_notice,
    receipt_name,
    seal_receipt,
    seal_sent_notice,
    sent_name,
)
from regionvault.core.types import RecoveryPoint

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine, PointsView
    from regionvault.core.pipeline.reports import TickReport

__all__ = ["CopyFlow"]

log = logging.getLogger(__name__)

_Half = TypeVar("_Half", CopySender, CopyReceiver)


class CopyFlow:
    """The copy handshake of ``engine``'s site, one job at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handlers(self) -> dict[str, Handler]:
        """The handler of each copy-phase job kind, and of ``copy-receipt``."""
        return {
            COPY_OFFER: self.offer,
            COPY_REQUEST: self.request,
            COPY_SEND: self.send,
            COPY_COMMIT: self.commit,
            COPY_RECEIPT: self.receipt,
        }

    # The copy phases: each builds only its own region's repository (vault and keys), plus
    # the other region's Sealer and the Transits, all from configuration.

    def _phase(self, job: Job, *, source_side: bool) -> tuple[str, str, str]:
        """``(point id, source, destination)`` of a copy-phase job, whose region must be
        the side that runs it."""
        try:
            point_id = str(job.payload["recovery_point"])
            source = self.engine.region(str(job.payload["source"])).name
            destination = self.engine.region(str(job.payload["destination"])).name
        except KeyError as exc:
            raise RegionVaultError(f"job {job.key}: payload lacks {exc.args[0]!r}") from None
        runs_in = source if source_side else destination
        if job.region is None or self.engine.region(job.region).name != runs_in:
            raise RegionVaultError(
                f"job {job.key}: a {job.kind} job runs in {runs_in}, not in {job.region}"
            )
        return point_id, source, destination

    @staticmethod
    @contextlib.contextmanager
    def _links_closed(half: _Half) -> Iterator[_Half]:
        """Use ``half``, then close the Transits built for it (a job builds its own)."""
        try:
            yield half
        finally:
            for transit in (half.forward, half.backward):
                try:
                    transit.close()
                except Exception as exc:
                    log.warning("closing %r failed: %s", transit, exc)

    def allowed(
        self,
        source: str,
        destination: str,
        point: Callable[[], RecoveryPoint | None] | None = None,
    ) -> str | None:
        """Why this site copies from ``source`` to ``destination`` (None: it does not): a
        replication pair from ``source`` to ``destination``, or the copy-to tag of the point
        (``point()``, looked at only without a pair; None from it: the destination holds the
        copy already) naming ``destination``. Jobs reach a worker through a store every
        region writes, so each copy phase asks its own site (docs/jobs.md, "Who may ask for
        a copy")."""
        cfg = self.engine.site.config
        src = cfg.region(source).id
        dst = cfg.region(destination).id
        if dst in cfg.destinations_of(src):
            return "replication pair"
        if point is None:
            return None
        seen = point()
        if seen is None:
            return "held already"
        value = seen.tags.get(cfg.copy_to_tag_key)
        if value is None:
            return None
        try:
            named = parse_copy_to(value, home=src, site=cfg)
        except PolicyError:
            return None
        return "copy-to tag" if dst in named else None

    def check_allowed(
        self,
        job: Job,
        source: str,
        destination: str,
        point: Callable[[], RecoveryPoint | None] | None = None,
    ) -> None:
        """:meth:`allowed`, or a permanent failure of ``job`` naming the pair."""
        if self.allowed(source, destination, point) is None:
            raise RegionVaultError(
                f"job {job.key}: refused: this site copies nothing from {source} to "
                f"{destination} (no replication pair, and the point's copy-to tag does not "
                "name it)"
            )

    def _source_point(self, point_id: str, source: str) -> Callable[[], RecoveryPoint | None]:
        return lambda: self.engine.find_point(point_id, source)

    @staticmethod
    def _offered(receiver: CopyReceiver, point_id: str) -> Callable[[], RecoveryPoint | None]:
        def offered() -> RecoveryPoint | None:
            # a copy held already adds nothing: it is answered as it is
            if receiver.existing(point_id) is not None:
                return None
            return receiver.offered_point(point_id)

        return offered

    def offer(self, job: Job) -> Any:
        point_id, source, destination = self._phase(job, source_side=True)
        self.check_allowed(job, source, destination, self._source_point(point_id, source))
        with self._links_closed(self.engine.copy_sender(source, destination)) as sender:
            sent = sender.offer(point_id)
            if job.payload.get("track"):
                # a region's own tick: remember when, so that it waits for the receipt
                CopyTracker(sender.repository).mark_offered(
                    destination, point_id, self.engine.clock()
                )
        return {"offer": offer_name(point_id), "bytes_sent": sent}

    def request(self, job: Job) -> Any:
        point_id, source, destination = self._phase(job, source_side=False)
        with self._links_closed(self.engine.copy_receiver(source, destination)) as receiver:
            self.check_allowed(job, source, destination, self._offered(receiver, point_id))
            if job.payload.get("receipt"):
                found = self._answer_with_receipt(receiver, point_id)
                if found is not None:
                    return {
                        "existing": found.id,
                        "chunks_total": 0,
                        "chunks_requested": 0,
                        "leftovers": 0,
                        "bytes_sent": 0,
                        "receipt": True,
                    }
            report = receiver.request(point_id, source)
        return {
            "existing": report.existing.id if report.existing is not None else None,
            "chunks_total": report.chunks_total,
            "chunks_requested": report.chunks_requested,
            "leftovers": report.leftovers,
            "bytes_sent": report.bytes_sent,
        }

    def send(self, job: Job) -> Any:
        point_id, source, destination = self._phase(job, source_side=True)
        self.check_allowed(job, source, destination, self._source_point(point_id, source))
        notified = False
        with self._links_closed(self.engine.copy_sender(source, destination)) as sender:
            report = sender.send(point_id)
            if job.payload.get("notify") and report.requested:
                # a region's own tick: tell the destination every batch has landed, and how
                # long to keep the copy (the source's policy says)
                point = self.engine.find_point(point_id, source)
                notice = SentNotice(
                    point_id,
                    source,
                    destination,
                    self.engine.copy_expiry(point, destination, None),
                    report.batches,
                    report.chunks_sent,
                )
                sender.forward.send(
                    sent_name(point_id), seal_sent_notice(sender.seal_to_destination, notice)
                )
                notified = True
        result = {
            "requested": report.requested,
            "chunks_sent": report.chunks_sent,
            "batches": report.batches,
            "bytes_sent": report.bytes_sent,
        }
        if job.payload.get("notify"):
            result["notified"] = notified
        return result

    def commit(self, job: Job) -> Any:
        point_id, source, destination = self._phase(job, source_side=False)
        if job.payload.get("notice"):
            return self._commit_on_notice(job, point_id, source, destination)
        if "expires_at" not in job.payload:
            raise RegionVaultError(f"job {job.key}: payload lacks 'expires_at' (null: keep)")
        expiry = job.payload["expires_at"]
        try:
            expires_at = None if expiry is None else datetime.fromisoformat(str(expiry))
        except ValueError:
            raise RegionVaultError(
                f"job {job.key}: expires_at {expiry!r} is not an ISO 8601 time"
            ) from None
        if expires_at is not None and expires_at.utcoffset() is None:
            raise RegionVaultError(f"job {job.key}: expires_at {expiry!r} has no time zone")
        with self._links_closed(self.engine.copy_receiver(source, destination)) as receiver:
            self.check_allowed(job, source, destination, self._offered(receiver, point_id))
            report = receiver.commit(point_id, source, expires_at)
        self._after_commit(source, destination, report)
        return {
            "copy": report.point.id,
            "existing": report.existing,
            "batches_ingested": report.batches_ingested,
        }

    def _after_commit(self, source: str, destination: str, report: CommitReport) -> None:
        # a phased copy's result is its commit's report: the bytes crossed in other jobs
        # (copy-request, copy-send), whose outcomes carry them
        if not report.existing and report.source is not None:
            self.engine.record_event(
                destination, EventAction.COPY, report.point, role="destination", source=source,
                destination=destination, source_point=report.source.id, phased=True,
                batches_ingested=report.batches_ingested,
            )  # fmt: skip
            self.engine.notify(
                "regionvault_after_copy",
                f"the copy of {report.source.id} from {source} to {destination}",
                source_region=source,
                region=destination,
                source=report.source,
                copy=report.point,
                result=report,
            )
        # the copy carries its own lock, from its own commit: a failure fails the job
        repo = self.engine.repository(destination)
        self.engine.apply_policy_lock(repo, report.point)

    # A region's own tick adds three small steps to the phases (docs/copy.md, "Receipts"):
    # the source's copy-send ends with a sealed *sent notice*; the destination commits on it
    # and answers with a sealed *receipt*, as it does an offer for a point it holds already;
    # the source's copy-receipt takes the receipt in and records it in its own vault.

    def _answer_with_receipt(self, receiver: CopyReceiver, point_id: str) -> RecoveryPoint | None:
        """When the destination holds the copy already: send the source a receipt, then drop
        what is left in the inbox for the point (a crash in between leaves the offer or the
        notice, and the next tick answers again). Returns the copy, or None."""
        found = receiver.existing(point_id)
        if found is None:
            return None
        receipt = CopyReceipt.of(receiver.source, point_id, found)
        # a receipt of an earlier answer may still wait for the source, and this sender may
        # only create (as on Cloud Storage): it says the same, so it stands
        with contextlib.suppress(PayloadWaiting):
            receiver.backward.send(
                receipt_name(point_id), seal_receipt(receiver.seal_to_source, receipt)
            )
        receiver.tidy(point_id)
        return found

    def _commit_on_notice(self, job: Job, point_id: str, source: str, destination: str) -> Any:
        with self._links_closed(self.engine.copy_receiver(source, destination)) as receiver:
            found = self._answer_with_receipt(receiver, point_id)
            if found is not None:
                self.engine.apply_policy_lock(receiver.repository, found)
                return {"copy": found.id, "existing": True, "batches_ingested": 0, "receipt": True}
            self.check_allowed(job, source, destination, self._offered(receiver, point_id))
            inbox = receiver.forward
            notice_name = sent_name(point_id)
            try:
                sealed = inbox.receive(notice_name)
            except TransitError:
                if inbox.has(notice_name):
                    raise
                raise RegionVaultError(
                    f"job {job.key}: no sent notice for {point_id} in {destination}'s inbox",
                    region=destination,
                ) from None
            try:
                notice = open_sent_notice(
                    receiver.repository.keys,
                    point_id,
                    sealed,
                    source=source,
                    destination=destination,
                )
            except IntegrityError:
                inbox.discard(notice_name)  # damaged: the next tick asks again
                raise
            if not inbox.has(offer_name(point_id)):
                inbox.discard(notice_name)
                raise RegionVaultError(
                    f"job {job.key}: a sent notice for {point_id} but no offer in "
                    f"{destination}'s inbox; the notice is dropped (the source offers again)",
                    region=destination,
                )
            try:
                report = receiver.commit(point_id, source, notice.expires_at)
            except RegionVaultError as exc:
                if "has not arrived" in str(exc):
                    # a chunk was collected, or a damaged batch dropped, since the request:
                    # without the notice, the next tick requests what is missing again
                    inbox.discard(notice_name)
                raise
            receipt = CopyReceipt.of(source, point_id, report.point)
            receiver.backward.send(
                receipt_name(point_id), seal_receipt(receiver.seal_to_source, receipt)
            )
            inbox.discard(notice_name)
        self._after_commit(source, destination, report)
        return {
            "copy": report.point.id,
            "existing": report.existing,
            "batches_ingested": report.batches_ingested,
            "receipt": True,
        }

    def receipt(self, job: Job) -> Any:
        point_id, source, destination = self._phase(job, source_side=True)
        repo = self.engine.repository(source, create=False)
        name = receipt_name(point_id)
        transit = self.engine.site.transit(destination, source)
        try:
            try:
                sealed = transit.receive(name)
            except TransitError:
                if transit.has(name):
                    raise
                return {"copy": None, "recorded": False}  # taken in already
            try:
                receipt = open_receipt(
                    repo.keys, point_id, sealed, source=source, destination=destination
                )
            except IntegrityError as exc:
                # a damaged receipt: the point is offered again after the grace period, and
                # the destination, holding the copy, answers with a new receipt
                log.warning("discarding a damaged receipt from %s: %s", destination, exc)
                transit.discard(name)
                return {"copy": None, "recorded": False, "discarded": str(exc)}
            recorded = CopyTracker(repo).record(receipt)
            transit.discard(name)
        finally:
            try:
                transit.close()
            except Exception as exc:
                log.warning("closing %r failed: %s", transit, exc)
        return {"copy": receipt.copy, "recorded": recorded}

    # What a tick copies: for a region's own tick, from what its inbox holds and the offers
    # due; for a whole-site tick, every copy a destination does not hold yet.

    def inbox(self, region: str, report: TickReport) -> dict[str, dict[str, set[str]]]:
        """What ``region``'s inbox holds from each other region: ``{peer: {point id:
        {"offer", "request", "sent", "receipt", "batch"}}}`` (names only: nothing opened)."""
        found: dict[str, dict[str, set[str]]] = {}
        for peer in self.engine.site.regions:
            if peer.name == region:
                continue
            try:
                transit = self.engine.site.transit(peer.name, region)
                try:
                    names = list(transit.inbox("copy/"))
                finally:
                    transit.close()
            except RegionVaultError as exc:
                report.problems.append(f"{region}: inbox from {peer.name}: {exc}")
                continue
            for name in names:
                parts = name.split("/")
                if len(parts) != 3 or not parts[1]:
                    continue
                what = "batch" if parts[2].startswith("batch-") else parts[2]
                found.setdefault(peer.name, {}).setdefault(parts[1], set()).add(what)
        return found

    def inbox_jobs(
        self, region: str, slot: datetime, report: TickReport
    ) -> tuple[list[Job], list[Job]]:
        """The jobs of ``region``'s side of every copy its inbox holds something of, in two
        rounds: first what closes a copy (a receipt: ``copy-receipt``; a sent notice:
        ``copy-commit``, answered with a receipt), then what moves one on (an offer:
        ``copy-request``, or a receipt when ``region`` holds the copy already; a request:
        ``copy-send``, then a sent notice)."""
        first: list[Job] = []
        then: list[Job] = []
        for peer, points in self.inbox(region, report).items():
            for point_id, what in sorted(points.items()):
                if "receipt" in what:
                    first.append(copy_receipt_job(region, point_id, peer, slot=slot))
                if "sent" in what:
                    first.append(
                        copy_phase_job(
                            COPY_COMMIT,
                            region,
                            point_id,
                            peer,
                            slot=slot,
                            payload={"notice": True, "receipt": True},
                        )
                    )
                elif "offer" in what:
                    then.append(
                        copy_phase_job(
                            COPY_REQUEST,
                            region,
                            point_id,
                            peer,
                            slot=slot,
                            payload={"receipt": True},
                        )
                    )
                if "request" in what:
                    then.append(
                        copy_phase_job(
                            COPY_SEND, region, point_id, peer, slot=slot, payload={"notify": True}
                        )
                    )
        return first, then

    def offer_jobs(
        self, region: str, slot: datetime, report: TickReport, view: PointsView | None = None
    ) -> list[Job]:
        """``copy-offer`` jobs for :meth:`offers_due`, each tracked: it records when it
        offered, so that ``region`` waits ``copy_grace`` for the receipt."""
        return [
            copy_phase_job(COPY_OFFER, region, point.id, dest, slot=slot, payload={"track": True})
            for point, dest in self.offers_due(report, report.at, view)
        ]

    def offers_due(
        self, report: TickReport, now: datetime, view: PointsView | None = None
    ) -> list[tuple[RecoveryPoint, str]]:
        """``(point, destination)`` for the newest point of each instance of the tick's
        region and each region its policy copies to, unless the region's vault holds a
        receipt for it or it was offered less than ``copy_grace`` ago. The points are
        ``view``'s (by default a new :meth:`Engine.points_view`: one listing per region)."""
        view = view or self.engine.points_view()
        due: list[tuple[RecoveryPoint, str]] = []
        tracker: CopyTracker | None = None
        for schedule in report.schedule:
            instances = [d.instance for d in schedule.due] + [n.instance for n in schedule.not_due]
            for instance in instances:
                try:
                    policy = resolve_policy(instance, self.engine.site.config)
                    point = view.newest_point(instance)
                    if policy is None or point is None:
                        continue
                    if tracker is None:
                        tracker = CopyTracker(self.engine.repository(point.region, create=False))
                    for ref in policy.copy_to:
                        dest = self.engine.region(str(ref)).name
                        if dest == point.region or tracker.receipt(dest, point.id) is not None:
                            continue
                        offered = tracker.offered_at(dest, point.id)
                        if offered is None or now - offered >= self.engine.copy_grace:
                            due.append((point, dest))
                except RegionVaultError as exc:
                    report.problems.append(f"{instance.id}: copy: {exc}")
        return due

    def copies_due(
        self, report: TickReport, view: PointsView | None = None
    ) -> list[tuple[RecoveryPoint, str]]:
        """``(point, destination)`` for every destination of every instance's newest point
        that the destination does not hold yet (new points, and copies an earlier tick did
        not finish). The points are ``view``'s (by default a new :meth:`Engine.points_view`,
        taken now: it sees the backups of the tick so far), one listing per region."""
        view = view or self.engine.points_view()
        due: list[tuple[RecoveryPoint, str]] = []
        for schedule in report.schedule:
            instances = [d.instance for d in schedule.due] + [n.instance for n in schedule.not_due]
            for instance in instances:
                try:
                    policy = resolve_policy(instance, self.engine.site.config)
                    point = view.newest_point(instance)
                except RegionVaultError as exc:
                    report.problems.append(f"{instance.id}: copy: {exc}")
                    continue
                if policy is None or point is None:
                    continue
                for dest in policy.copy_to:
                    held = {
                        p.lineage.source_recovery_point
                        for p in view.points(str(dest), instance.id)
                        if p.lineage is not None
                    }
                    if point.id not in held:
                        due.append((point, self.engine.region(str(dest)).name))
        return due
