"""What both halves of a copy share: one repository, opened, and its shared copy lock; and
the checks that a half was given Transits running the right way."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from regionvault.core.errors import RegionVaultError

if TYPE_CHECKING:
    from regionvault.core.interfaces import Transit
    from regionvault.core.repository._locks import RepositoryLock
    from regionvault.core.repository._store import Store
    from regionvault.core.repository.repository import Repository

__all__ = ["CopyHalf", "in_inbox", "link_error"]


def link_error(role: str, here: str, transit: Transit, expected: str) -> RegionVaultError:
    return RegionVaultError(
        f"copy {role} in {here}: a Transit runs {transit.source} -> {transit.region}, "
        f"expected {expected}",
        region=here,
    )


def in_inbox(transit: Transit, name: str) -> bool:
    """Whether ``name`` waits in ``transit``'s inbox, asked the receiving side's way (a
    listing, with the receiver's own credentials)."""
    return name in set(transit.inbox(name))


class CopyHalf:
    """One half of a copy: one repository, and its shared copy lock while it works.

    The halves are the one place the copy protocol touches the :class:`Repository` facade's
    internals: they open its store (:attr:`store`) and take its shared lock (:meth:`locked`);
    everything below them works on the opened store."""

    _operation = "copy"

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.region = repository.region
        self._held: RepositoryLock | None = None

    @property
    def store(self) -> Store:
        """This half's repository, opened (on first use)."""
        return self.repository._ensure_open()

    @contextlib.contextmanager
    def locked(self) -> Iterator[RepositoryLock]:
        """Hold this half's repository under a shared lock (a prune there waits, since it
        takes the exclusive one). Calls made while it is held, from any thread, run under it
        instead of taking another."""
        if self._held is not None:
            yield self._held
            return
        with self.repository._lock(exclusive=False, operation=self._operation) as held:
            self._held = held
            try:
                yield held
            finally:
                self._held = None
