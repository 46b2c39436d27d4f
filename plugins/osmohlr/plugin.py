"""Health check for osmo-hlr instances (entry point ``osmohlr``): a VTY query, over
osmo-hlr's own protocol, for a subscriber its database is known to hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionvault.core.plugins import hookimpl
from regionvault.plugins.osmohlr.layout import ENDPOINT_FILE, hostname_for

if TYPE_CHECKING:
    from regionvault.core.types import Instance

__all__ = ["MARKER", "Endpoint", "endpoint", "healthy"]

#: what an instance's function names when it runs osmo-hlr through this plugin's launcher
MARKER = "regionvault.plugins.osmohlr"


@dataclass(frozen=True)
class Endpoint:
    """Where an instance's osmo-hlr serves (``run/osmohlr.json``)."""

    address: str
    gsup_port: int
    vty_port: int
    hostname: str
    probe_imsi: str | None


def endpoint(instance: Instance) -> Endpoint | None:
    """The endpoint this instance's own launcher wrote, or None (not up yet). A restored data
    directory carries the original's file until the new launcher rewrites it: a file naming
    another instance's hostname is not this instance's."""
    data_dir = instance.extra.get("data_dir")
    if not data_dir:
        return None
    try:
        info: dict[str, Any] = json.loads((Path(data_dir) / ENDPOINT_FILE).read_text("utf-8"))
        found = Endpoint(
            address=str(info["address"]),
            gsup_port=int(info["gsup_port"]),
            vty_port=int(info["vty_port"]),
            hostname=str(info["hostname"]),
            probe_imsi=None if info.get("probe_imsi") is None else str(info["probe_imsi"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if found.hostname == hostname_for(instance.id) else None


def healthy(where: Endpoint, *, timeout: float = 1.0) -> bool:
    """Whether osmo-hlr at ``where`` is the instance's own (its running configuration names
    its hostname) and answers a subscriber query: the probe subscriber must be found; with
    no probe (an empty database) any answer of the database will do."""
    from regionvault.plugins.osmohlr.vty import Vty, VtyError  # sockets: at first check only

    try:
        with Vty(where.address, where.vty_port, timeout=timeout) as vty:
            vty.enable()
            if vty.hostname() != where.hostname:
                return False
            if where.probe_imsi is None:
                vty.show_subscriber("001010000000000")  # found or not: the database answered
                return True
            return vty.show_subscriber(where.probe_imsi) is not None
    except (OSError, VtyError):
        return False


@hookimpl
def regionvault_health_check(region: str, instance: Instance) -> bool | None:
    if not instance.function or MARKER not in instance.function:
        return None
    where = endpoint(instance)
    return where is not None and healthy(where)
