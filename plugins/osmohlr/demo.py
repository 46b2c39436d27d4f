"""osmo-hlr as the demo's network function (``regionvault demo`` picks it when osmo-hlr is
installed: ``regionvault.plugins.samplenf.demo.pick_function``).

It has the members the demo asks of a function (``SampleFunction`` in samplenf's demo):
the launcher's command line, the ``backup-hook=sqlite`` tag (the database is copied with
SQLite's backup API while osmo-hlr runs), subscribers provisioned over the VTY with an MSISDN
and Milenage keys, and as its state the subscribers it serves (IMSI and MSISDN) and their
digest, read back over the VTY.
"""

from __future__ import annotations

import hashlib
import hmac
import shlex
import sys
from typing import TYPE_CHECKING

from regionvault.plugins.osmohlr.launcher import (
    OWNER_ENV,
    loopback_addresses,
    owner_value,
    ports_free,
)
from regionvault.plugins.osmohlr.layout import CTRL_PORT, GSUP_PORT, VTY_PORT
from regionvault.plugins.osmohlr.plugin import Endpoint, endpoint, healthy
from regionvault.plugins.osmohlr.vty import Vty

if TYPE_CHECKING:
    from regionvault.core.types import Instance

__all__ = ["OsmoHlrFunction", "demo_subscriber"]

#: the test network's MCC and MNC (001-01), as in the demo's sample function
_PLMN = "00101"


def demo_subscriber(i: int) -> tuple[str, str, str, str]:
    """The demo's ``i``-th subscriber: IMSI, MSISDN, K and OPc (made up, derived from ``i``:
    a demo's keys protect nothing)."""
    imsi = f"{_PLMN}{i:010d}"
    k = hmac.new(b"regionvault-demo-k", imsi.encode(), hashlib.sha256).hexdigest()[:32]
    opc = hmac.new(b"regionvault-demo-opc", imsi.encode(), hashlib.sha256).hexdigest()[:32]
    return imsi, f"4940{i:06d}", k, opc


class OsmoHlrFunction:
    """osmo-hlr, launched by ``python -m regionvault.plugins.osmohlr``."""

    label = "osmo-hlr, Osmocom's HLR (regionvault.plugins.osmohlr)"

    def __init__(self) -> None:
        # exec: the launcher is the instance's process, so a terminate waits for it (and it
        # for osmo-hlr) rather than for a shell that runs it. The demo owns its instances:
        # their launchers stop when this process is gone, even killed with SIGKILL
        self.function = (
            f"exec env {OWNER_ENV}={owner_value()} "
            f"{shlex.quote(sys.executable)} -m regionvault.plugins.osmohlr"
        )
        self.tags = {"backup-hook": "sqlite"}

    def ready(self, instance: Instance) -> Endpoint | None:
        where = endpoint(instance)
        return where if where is not None and healthy(where) else None

    def where(self, where: Endpoint) -> str:
        return f"{where.address} (GSUP {where.gsup_port}, VTY {where.vty_port})"

    def provision(self, where: Endpoint, count: int) -> None:
        with Vty(where.address, where.vty_port) as vty:
            vty.enable()
            for i in range(count):
                imsi, msisdn, k, opc = demo_subscriber(i)
                vty.create_subscriber(imsi, msisdn=msisdn, k=k, opc=opc)

    def state(self, where: Endpoint) -> tuple[int, str]:
        with Vty(where.address, where.vty_port, timeout=10.0) as vty:
            vty.enable()
            rows = vty.subscribers()
        canonical = "\n".join(f"{imsi} {msisdn or '-'}" for imsi, msisdn in sorted(rows))
        return len(rows), hashlib.sha256(canonical.encode()).hexdigest()


def ports_taken() -> str | None:
    """None when two loopback addresses have osmo-hlr's ports free (east's instance and
    west's), else the line saying so: the demo then runs the sample function."""
    free = 0
    for address in loopback_addresses():
        free += ports_free(address)
        if free >= 2:
            return None
    return (
        f"osmo-hlr is installed but ports {GSUP_PORT}/{VTY_PORT}/{CTRL_PORT} are taken "
        "on every loopback address but at most one"
    )
