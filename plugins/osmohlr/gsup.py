"""A GSUP client: asks osmo-hlr for authentication vectors as an MSC or SGSN does.

GSUP (Osmocom's Generic Subscriber Update Protocol, the MAP of an Osmocom core) runs over the
IPA multiplex on TCP 4222. On connect, osmo-hlr asks the peer who it is (IPA CCM ``ID_GET``);
the client answers with its unit id and names (``ID_RESP``), then sends GSUP messages in
IPA's Osmocom extension (protocol 0xEE, extension 0x05). This client sends
``SendAuthInfo`` requests and reads their results: the vectors osmo-hlr computes from the
subscriber's keys (Milenage for a 3G subscriber: RAND, AUTN, RES, CK, IK, and the 2G SRES and
Kc derived from them). Each request advances the subscriber's SQN in osmo-hlr's database, as
any MSC's would. Every read is bounded by the client's timeout.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from regionvault.core.errors import RegionVaultError
from regionvault.plugins.osmohlr.connection import Connection
from regionvault.plugins.osmohlr.layout import GSUP_PORT
from regionvault.plugins.osmohlr.vty import check_imsi

__all__ = ["AuthTuple", "Gsup", "GsupError"]

_IPA_CCM, _IPA_OSMO, _EXT_GSUP = 0xFE, 0xEE, 0x05
_CCM_PING, _CCM_PONG, _CCM_ID_GET, _CCM_ID_RESP = 0x00, 0x01, 0x04, 0x05
_TAG_SERNR, _TAG_UNITNAME, _TAG_UNIT = 0x00, 0x01, 0x08

_SAI_REQUEST, _SAI_ERROR, _SAI_RESULT = 0x08, 0x09, 0x0A
_IE_IMSI, _IE_CAUSE, _IE_AUTH_TUPLE = 0x01, 0x02, 0x03
_TUPLE_FIELDS = {0x20: "rand", 0x21: "sres", 0x22: "kc", 0x23: "ik", 0x24: "ck", 0x25: "autn"}
_TUPLE_RES = 0x27
#: the GMM causes osmo-hlr answers a SendAuthInfo with (3GPP TS 24.008, 10.5.5.14)
_CAUSES = {
    2: "IMSI unknown in HLR",
    3: "illegal MS",
    6: "illegal ME",
    7: "GPRS services not allowed",
    8: "GPRS and non-GPRS services not allowed",
    17: "network failure",
    22: "congestion",
    111: "protocol error, unspecified",
}


class GsupError(RegionVaultError):
    """osmo-hlr answered a GSUP request with an error, out of the expected form, or not in
    time."""


@dataclass(frozen=True)
class AuthTuple:
    """One authentication vector (for a 2G-only subscriber, ``ik``, ``ck``, ``autn`` and
    ``res`` are None)."""

    rand: bytes
    sres: bytes
    kc: bytes
    ik: bytes | None = None
    ck: bytes | None = None
    autn: bytes | None = None
    res: bytes | None = None

    def __repr__(self) -> str:  # key material stays out of logs and reprs
        return f"AuthTuple(rand={self.rand.hex()}, ...)"


def _bcd(digits: str) -> bytes:
    """TBCD: two digits a byte, the first in the low nibble, an odd count padded with F."""
    if len(digits) % 2:
        digits += "F"
    return bytes(int(digits[i + 1], 16) << 4 | int(digits[i], 16) for i in range(0, len(digits), 2))


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    items, at = [], 0
    while at < len(data):
        if at + 2 > len(data) or at + 2 + data[at + 1] > len(data):
            raise ValueError("a truncated information element")
        tag, length = data[at], data[at + 1]
        items.append((tag, data[at + 2 : at + 2 + length]))
        at += 2 + length
    return items


class Gsup(Connection):
    """One GSUP connection to an osmo-hlr, as the peer ``name`` (an MSC's or SGSN's name in
    osmo-hlr's log): ``with Gsup("127.0.0.2") as gsup: gsup.send_auth_info(imsi)``."""

    protocol = "GSUP"
    error = GsupError

    def __init__(
        self,
        address: str,
        port: int = GSUP_PORT,
        *,
        name: str = "regionvault",
        timeout: float = 2.0,
    ) -> None:
        if not name.isprintable() or not name or len(name) > 64:
            raise GsupError(f"GSUP peer name {name!r} must be 1 to 64 printable characters")
        self.name = name
        self._buffer = b""
        super().__init__(address, port, timeout=timeout)
        try:
            self._identify(time.monotonic() + timeout)
        except BaseException:
            self.close()
            raise

    def _identify(self, deadline: float) -> None:
        """Answer osmo-hlr's ``ID_GET``: it drops GSUP messages of a peer not identified."""
        while True:
            proto, payload = self._frame(deadline)
            if proto == _IPA_CCM and payload[:1] == bytes([_CCM_ID_GET]):
                self._send(_IPA_CCM, self._identity())
                return
            if proto == _IPA_CCM and payload[:1] == bytes([_CCM_PING]):
                self._send(_IPA_CCM, bytes([_CCM_PONG]))

    def _send(self, proto: int, payload: bytes) -> None:
        self._sock.sendall(struct.pack(">HB", len(payload), proto) + payload)

    def _identity(self) -> bytes:
        def tag(kind: int, value: str) -> bytes:
            raw = value.encode("utf-8") + b"\0"
            return struct.pack(">HB", len(raw) + 1, kind) + raw

        return (
            bytes([_CCM_ID_RESP])
            + tag(_TAG_UNIT, "0/0/0")
            + tag(_TAG_SERNR, self.name)
            + tag(_TAG_UNITNAME, self.name)
        )

    def _frame(self, deadline: float) -> tuple[int, bytes]:
        """The next IPA frame ``(protocol, payload)``."""
        while True:
            if len(self._buffer) >= 3:
                (length,) = struct.unpack(">H", self._buffer[:2])
                if len(self._buffer) >= 3 + length:
                    proto, payload = self._buffer[2], self._buffer[3 : 3 + length]
                    self._buffer = self._buffer[3 + length :]
                    return proto, payload
            self._buffer += self._recv(deadline, "answer")

    def _gsup(self, deadline: float) -> bytes:
        """The next GSUP message, answering osmo-hlr's CCM requests on the way."""
        while True:
            proto, payload = self._frame(deadline)
            if proto == _IPA_CCM and payload[:1] == bytes([_CCM_ID_GET]):
                self._send(_IPA_CCM, self._identity())
            elif proto == _IPA_CCM and payload[:1] == bytes([_CCM_PING]):
                self._send(_IPA_CCM, bytes([_CCM_PONG]))
            elif proto == _IPA_OSMO and payload[:1] == bytes([_EXT_GSUP]):
                return payload[1:]

    def send_auth_info(self, imsi: str) -> list[AuthTuple]:
        """The authentication vectors osmo-hlr gives for ``imsi`` (5 in osmo-hlr 1.5). An
        unknown subscriber, or one without keys, raises :class:`GsupError` with osmo-hlr's
        cause (``IMSI unknown in HLR``)."""
        check_imsi(imsi)
        encoded = _bcd(imsi)
        request = bytes([_SAI_REQUEST, _IE_IMSI, len(encoded)]) + encoded
        deadline = time.monotonic() + self.timeout
        self._send(_IPA_OSMO, bytes([_EXT_GSUP]) + request)
        while True:
            message = self._gsup(deadline)
            try:
                items = _tlvs(message[1:])
            except ValueError as exc:
                raise GsupError(f"{self._where()}: SendAuthInfo for {imsi}: {exc}") from None
            if dict(items).get(_IE_IMSI) != encoded:
                continue  # another subscriber's answer (a request this client gave up on)
            if message[0] == _SAI_ERROR:
                cause = dict(items).get(_IE_CAUSE, b"")
                code = cause[0] if cause else None
                what = _CAUSES.get(code, f"cause {code}") if code is not None else "no cause"
                raise GsupError(f"{self._where()}: SendAuthInfo for {imsi}: {what}")
            if message[0] != _SAI_RESULT:
                raise GsupError(
                    f"{self._where()}: SendAuthInfo for {imsi}: unexpected message type "
                    f"0x{message[0]:02x}"
                )
            return [self._tuple(imsi, value) for tag, value in items if tag == _IE_AUTH_TUPLE]

    def _tuple(self, imsi: str, data: bytes) -> AuthTuple:
        try:
            items = dict(_tlvs(data))
        except ValueError as exc:
            raise GsupError(f"{self._where()}: an auth tuple for {imsi}: {exc}") from None
        fields = {name: items.get(tag) for tag, name in _TUPLE_FIELDS.items()}
        rand, sres, kc = fields.pop("rand"), fields.pop("sres"), fields.pop("kc")
        if rand is None or sres is None or kc is None:
            raise GsupError(f"{self._where()}: an auth tuple for {imsi} lacks RAND, SRES or Kc")
        return AuthTuple(rand, sres, kc, res=items.get(_TUPLE_RES), **fields)
