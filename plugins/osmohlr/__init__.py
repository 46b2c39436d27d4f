"""Osmocom's HLR (Debian's ``osmo-hlr``) as a network function of the local provider.

osmo-hlr is the subscriber database of a 2G/3G mobile core: SQLite on disk (``hlr.db``, WAL
mode), GSUP (TCP 4222) towards the MSC and SGSN, and a VTY (TCP 4258) to provision and query
subscribers. This plugin gives it to regionvault:

- :mod:`.launcher` (``python -m regionvault.plugins.osmohlr``): the instance's function; it
  runs osmo-hlr on a free loopback address with its configuration and database in the
  instance's data directory;
- :mod:`.plugin`: the health check, a VTY query for a subscriber the database holds;
- :mod:`.vty`: a VTY client (provisioning and queries);
- :mod:`.gsup`: a GSUP client (``SendAuthInfo``, as an MSC or SGSN asks); both clients
  read with deadlines (:mod:`.connection`);
- :mod:`.package`: finding and installing Debian's package;
- :mod:`.demo`: the demo's network function when osmo-hlr is installed.

A backup takes the database consistently with the built-in ``sqlite`` hook
(``backup-hook=sqlite``). docs/osmohlr.md is the user's description.
"""

from __future__ import annotations

from regionvault.plugins.osmohlr.layout import (
    CONFIG_FILE,
    CTRL_PORT,
    DATABASE,
    ENDPOINT_FILE,
    GSUP_PORT,
    VTY_PORT,
    hostname_for,
)

__all__ = [
    "CONFIG_FILE",
    "CTRL_PORT",
    "DATABASE",
    "ENDPOINT_FILE",
    "GSUP_PORT",
    "VTY_PORT",
    "hostname_for",
]
