"""A client of osmo-hlr's VTY (its telnet command line, TCP port 4258): provisioning and
queries of subscribers, in osmo-hlr's own commands.

The VTY is line-oriented: each command line is echoed, followed by its output and the next
prompt (``OsmoHLR> `` in the view node, ``OsmoHLR# `` once enabled). Messages start with
``% ``. Every read is bounded by the client's timeout, so a server that stops answering is
an error, never a hang. K and OPc are sent but never put in an error message.
"""

from __future__ import annotations

import re
import time

from regionvault.core.errors import RegionVaultError
from regionvault.plugins.osmohlr.connection import Connection
from regionvault.plugins.osmohlr.layout import VTY_PORT

__all__ = ["Vty", "VtyError", "check_imsi"]

#: a prompt at the end of what the server sent: a name, a node in brackets, ``>`` or ``#``
_PROMPT = re.compile(rb"(?:^|\n)[\w.-]+(?:\([\w-]+\))?[>#] $")
#: telnet negotiation the server sends first (IAC WILL/WONT/DO/DONT x, IAC SB ... IAC SE)
_TELNET = re.compile(rb"\xff[\xfb-\xfe].|\xff\xfa.*?\xff\xf0|\xff[\xf0-\xfa]", re.DOTALL)
_IMSI = re.compile(r"[0-9]{6,15}")
_MSISDN = re.compile(r"[0-9]{1,15}")
_KEY = re.compile(r"[0-9a-fA-F]{32}")
#: the most a reply may hold: a bound on memory, not a limit any command here reaches
_MAX_REPLY = 64 << 20


class VtyError(RegionVaultError):
    """osmo-hlr's VTY refused a command, answered out of the expected form, or not in time."""


def check_imsi(imsi: str) -> str:
    """``imsi`` when it is 6 to 15 digits, else a :class:`VtyError` naming it."""
    if not isinstance(imsi, str) or not _IMSI.fullmatch(imsi):
        raise VtyError(f"IMSI {imsi!r} must be 6 to 15 digits")
    return imsi


class Vty(Connection):
    """One VTY session with an osmo-hlr: ``with Vty("127.0.0.2") as vty: vty.enable() ...``."""

    protocol = "VTY"
    error = VtyError

    def __init__(self, address: str, port: int = VTY_PORT, *, timeout: float = 2.0) -> None:
        super().__init__(address, port, timeout=timeout)
        try:
            self._read_reply()  # the banner, up to the first prompt
        except BaseException:
            self.close()
            raise

    def _read_reply(self) -> str:
        deadline = time.monotonic() + self.timeout
        raw = b""
        while True:
            text = _TELNET.sub(b"", raw)
            if _PROMPT.search(text):
                return text.decode("utf-8", errors="replace")
            raw += self._recv(deadline, "prompt")
            if len(raw) > _MAX_REPLY:
                raise VtyError(f"{self._where()}: a reply longer than {_MAX_REPLY} bytes")

    def command(self, line: str) -> str:
        """Run one command line; its output (without the echo and the prompt). Errors name
        the command by its words, never quoting a line that holds keys."""
        if "\n" in line or "\r" in line:
            raise VtyError("a VTY command is one line: it holds a line break")
        self._sock.sendall(line.encode("utf-8") + b"\n")
        reply = self._read_reply()
        lines = reply.replace("\r", "").split("\n")
        if lines and lines[0].strip() == line.strip():
            lines = lines[1:]
        # the last line is the prompt
        return "\n".join(lines[:-1]).strip("\n")

    def _fail(self, what: str, output: str, hide: tuple[str, ...] = ()) -> VtyError:
        message = next((ln for ln in output.splitlines() if ln.startswith("%")), output.strip())
        message = " ".join(message.split())  # one line
        for secret in hide:  # key material osmo-hlr might quote back
            message = re.sub(re.escape(secret), "<hidden>", message, flags=re.IGNORECASE)
        return VtyError(f"{self._where()}: {what}: {message or 'no answer'}")

    def enable(self) -> None:
        """Enter the enable node, where subscribers are provisioned."""
        output = self.command("enable")
        if output.strip():
            raise self._fail("enable", output)

    def hostname(self) -> str | None:
        """The ``hostname`` of the running configuration (enable node)."""
        output = self.command("show running-config")
        for ln in output.splitlines():
            if ln.startswith("hostname "):
                return ln.split(None, 1)[1].strip()
        if "Current configuration" not in output:
            raise self._fail("show running-config", output)
        return None

    def show_subscriber(self, imsi: str) -> dict[str, str] | None:
        """The subscriber ``imsi`` as osmo-hlr shows it (``ID``, ``IMSI``, ``MSISDN``, ...),
        or None when it has none. Key material (the lines after ``3G auth``) is left out."""
        check_imsi(imsi)
        output = self.command(f"show subscriber imsi {imsi}")
        if output.startswith("% No subscriber"):
            return None
        fields: dict[str, str] = {}
        for ln in output.splitlines():
            key, sep, value = ln.strip().partition(": ")
            if not sep or "=" in key or key in fields:
                continue
            fields[key] = value.strip()
            if key in ("2G auth", "3G auth"):
                break  # what follows is key material
        if fields.get("IMSI") != imsi:
            raise self._fail(f"show subscriber imsi {imsi}", output)
        return fields

    def create_subscriber(
        self,
        imsi: str,
        *,
        msisdn: str | None = None,
        k: str | None = None,
        opc: str | None = None,
    ) -> None:
        """Create the subscriber ``imsi``, then set its MSISDN and its Milenage K and OPc
        (each a separate, committed change in osmo-hlr). Returns once osmo-hlr said each was
        done; raises :class:`VtyError` with osmo-hlr's message otherwise."""
        check_imsi(imsi)
        if msisdn is not None and not _MSISDN.fullmatch(msisdn):
            raise VtyError(f"MSISDN {msisdn!r} of {imsi} must be 1 to 15 digits")
        if (k is None) != (opc is None):
            raise VtyError(f"subscriber {imsi}: give both K and OPc, or neither")
        if k is not None and opc is not None and not (_KEY.fullmatch(k) and _KEY.fullmatch(opc)):
            raise VtyError(f"subscriber {imsi}: K and OPc must be 32 hex digits each")
        output = self.command(f"subscriber imsi {imsi} create")
        if not output.startswith("% Created subscriber"):
            raise self._fail(f"subscriber imsi {imsi} create", output)
        if msisdn is not None:
            output = self.command(f"subscriber imsi {imsi} update msisdn {msisdn}")
            if not output.startswith("% Updated subscriber"):
                raise self._fail(f"subscriber imsi {imsi} update msisdn", output)
        if k is not None and opc is not None:
            output = self.command(f"subscriber imsi {imsi} update aud3g milenage k {k} opc {opc}")
            if output.strip():  # silent on success
                raise self._fail(f"subscriber imsi {imsi} update aud3g", output, (k, opc))

    def subscribers(self) -> list[tuple[str, str | None]]:
        """Every subscriber as ``(imsi, msisdn or None)``, in osmo-hlr's order (its ids)."""
        output = self.command("show subscribers all")
        rows: list[tuple[str, str | None]] = []
        shown: int | None = None
        for ln in output.splitlines():
            parts = ln.split()
            if len(parts) >= 3 and parts[0].isdigit():
                msisdn = None if parts[1] in ("", "-------------", "none") else parts[1]
                rows.append((parts[2], msisdn))
            elif ln.strip().startswith("Subscribers Shown:"):
                shown = int(ln.split(":", 1)[1])
            elif ln.startswith(("% No subscribers", "% No matching subscriber")):
                shown = 0
        if shown is None or shown != len(rows):
            raise self._fail("show subscribers all", output)
        return rows
