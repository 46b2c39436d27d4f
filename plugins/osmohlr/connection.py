"""What the VTY and GSUP clients share: one TCP connection to an osmo-hlr port whose every
read is bounded by a deadline, so a server that stops answering is an error, never a hang."""

from __future__ import annotations

import socket
import time
from types import TracebackType
from typing import ClassVar, Self

from regionvault.core.errors import RegionVaultError

__all__ = ["Connection"]


class Connection:
    """A connection to ``address:port``; subclasses name their ``protocol`` and ``error``."""

    #: the protocol's name in error messages (``VTY``, ``GSUP``)
    protocol: ClassVar[str]
    #: the error raised on a timeout or a closed connection
    error: ClassVar[type[RegionVaultError]]

    def __init__(self, address: str, port: int, *, timeout: float) -> None:
        self.address, self.port, self.timeout = address, port, timeout
        self._sock = socket.create_connection((address, port), timeout=timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _where(self) -> str:
        return f"osmo-hlr {self.protocol} at {self.address}:{self.port}"

    def _recv(self, deadline: float, waiting_for: str) -> bytes:
        """The next bytes the server sends, before ``deadline`` (monotonic)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"{self._where()}: no {waiting_for} within {self.timeout:g}s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise self.error(f"{self._where()}: closed the connection")
            return data
