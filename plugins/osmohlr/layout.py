"""Where an osmo-hlr instance keeps things in its data directory, and the ports it serves
(light to import: the plugin's health check needs it in every regionvault process)."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CONFIG_FILE",
    "CTRL_PORT",
    "DATABASE",
    "ENDPOINT_FILE",
    "GSUP_PORT",
    "VTY_PORT",
    "hostname_for",
]

#: the subscriber database (SQLite, WAL mode), relative to the data directory
DATABASE = Path("hlr.db")
#: the configuration osmo-hlr reads, written by the launcher at every start (its addresses
#: change from one launch to the next)
CONFIG_FILE = Path("osmo-hlr.cfg")
#: ``{"address": ..., "vty_port": ..., "gsup_port": ..., "ctrl_port": ..., "hostname": ...,
#: "probe_imsi": ..., "pid": ..., "hlr_pid": ...}``, rewritten at every start once osmo-hlr
#: answers on its VTY
ENDPOINT_FILE = Path("run") / "osmohlr.json"

#: osmo-hlr's own port numbers: GSUP and CTRL cannot be moved in osmo-hlr 1.5 (only their
#: address can), so two instances on one machine differ by loopback address, not by port
GSUP_PORT = 4222
VTY_PORT = 4258
CTRL_PORT = 4259


def hostname_for(instance_id: str) -> str:
    """The VTY hostname of the instance ``instance_id``: its running configuration names it,
    so a health check can tell this instance's osmo-hlr from another one (the original whose
    data was restored, still serving at the address a restored endpoint file names)."""
    return f"hlr-{instance_id}"
