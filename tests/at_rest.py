"""What the end-to-end tests of every cloud record and scan to show that nothing secret or
plain is at rest (imported by tests/azure and tests/gcp):

- :func:`record` wraps a provider's KeyService, Sealer and Transit for one test so that every
  plaintext key they hand out, open or seal is kept by the region that handled it, and every
  inbox payload is kept as it lay in the inbox just before its destination discarded it;
- :func:`wrapped_keys` finds the wrapped data keys a vault's objects carry (docs/format.md);
- :func:`leaks` scans stored bytes for needles (marker runs of the disks, the keys raw, in
  hex and in base64);
- :func:`disk_pieces`, :func:`image_of` and :func:`marker_runs` make the test disks and the
  runs of their bytes that must be found nowhere at rest.
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from regionvault.core.interfaces import KeyService, Sealer, Transit, Vault
from regionvault.core.repository import open_payload
from regionvault.core.types import DataKey

__all__ = [
    "DISK",
    "InboxObject",
    "Recorded",
    "WrappedKey",
    "disk_pieces",
    "image_of",
    "leaks",
    "marker_runs",
    "open_inbox_object",
    "payload_kind",
    "record",
    "wrapped_keys",
]


@dataclass(frozen=True)
class InboxObject:
    """One payload as it lay in an inbox just before its destination discarded it (a copy
    discards every payload it took in)."""

    container: str
    name: str
    source: str
    destination: str
    data: bytes


@dataclass
class Recorded:
    """Every plaintext key a provider handed out, opened or sealed, by the region whose
    KeyService or Sealer handled it; and every inbox payload."""

    keys: dict[str, set[bytes]] = field(default_factory=dict)
    inbox: list[InboxObject] = field(default_factory=list)

    def add(self, region: str, key: bytes) -> None:
        self.keys.setdefault(region, set()).add(bytes(key))

    def every_key(self) -> set[bytes]:
        return set().union(*self.keys.values()) if self.keys else set()

    def needles(self) -> dict[str, bytes]:
        """Each key raw, in hex and in base64: none may be found at rest."""
        out: dict[str, bytes] = {}
        for n, key in enumerate(sorted(self.every_key())):
            out[f"key {n} (raw)"] = key
            out[f"key {n} (hex)"] = key.hex().encode()
            out[f"key {n} (base64)"] = base64.b64encode(key)
        return out


def record(
    monkeypatch: pytest.MonkeyPatch,
    *,
    keys: type[KeyService],
    sealer: type[Sealer],
    transit: type[Transit],
    read_inbox: Callable[[Any, str], tuple[str, bytes]],
) -> Recorded:
    """Wrap the provider's KeyService, Sealer and Transit classes for the test so that what
    they handle is recorded (:class:`Recorded`). ``read_inbox(transit, name)`` gives the
    inbox's container (bucket) and the payload's bytes as they lie there."""
    recorded = Recorded()
    generate, unwrap = keys.generate_data_key, keys.unwrap
    seal, sealer_seal = keys.seal, sealer.seal
    discard = transit.discard

    def recording_generate(self: KeyService, context: Any) -> DataKey:
        key = generate(self, context)
        recorded.add(self.region, key.plaintext)
        return key

    def recording_unwrap(self: KeyService, wrapped: bytes, context: Any) -> bytes:
        plain = unwrap(self, wrapped, context)
        recorded.add(self.region, plain)
        return plain

    def recording_seal(self: KeyService, secret: bytes, context: Any) -> bytes:
        recorded.add(self.region, secret)
        return seal(self, secret, context)

    def recording_sealer_seal(self: Sealer, secret: bytes, context: Any) -> bytes:
        recorded.add("sealer", secret)
        return sealer_seal(self, secret, context)

    def recording_discard(self: Transit, name: str) -> None:
        container, data = read_inbox(self, name)
        recorded.inbox.append(InboxObject(container, name, self.source, self.region, data))
        discard(self, name)

    monkeypatch.setattr(keys, "generate_data_key", recording_generate)
    monkeypatch.setattr(keys, "unwrap", recording_unwrap)
    monkeypatch.setattr(keys, "seal", recording_seal)
    monkeypatch.setattr(sealer, "seal", recording_sealer_seal)
    monkeypatch.setattr(transit, "discard", recording_discard)
    return recorded


def payload_kind(name: str) -> str:
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


def open_inbox_object(keys: KeyService, item: InboxObject) -> bytes:
    return open_payload(
        keys,
        item.name,
        item.data,
        kind=payload_kind(item.name),
        source=item.source,
        destination=item.destination,
    )


# docs/format.md sections 3 and 5: the cleartext headers of sealed objects and packs
_ENVELOPE = struct.Struct(">4sBBBB32s32sH")
_PACK = struct.Struct(">4sB3s16s32s32sH")


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped by a region's KeyService, as one vault object carries it, with the
    encryption context the format binds it to."""

    object_name: str
    wrapped: bytes
    context: dict[str, str]


def wrapped_keys(vault: Vault, *, repository_id: str) -> list[WrappedKey]:
    """Every wrapped data key in ``vault``'s objects: the config's, each keyring's and each
    pack's run key. Every other object is sealed under the repository's master key (inside
    the config)."""
    out: list[WrappedKey] = []
    for info in vault.list(""):
        if info.name.startswith(".regionvault/"):
            continue  # the vault's random id, not data
        data = vault.get(info.name)
        if data[:4] == b"RVPK":
            *_, run_id, _salt, _commitment, w = _PACK.unpack_from(data)
            context = {
                "vault": vault.vault_id,
                "kind": "pack",
                "repository": repository_id,
                "run": run_id.hex(),
            }
            out.append(WrappedKey(info.name, data[_PACK.size : _PACK.size + w], context))
            continue
        assert data[:4] == b"RVLT", f"{info.name} is neither a sealed object nor a pack"
        _magic, _version, kind, source, _flags, _salt, _commitment, w = _ENVELOPE.unpack_from(data)
        if info.name == "config":
            assert (kind, source, w > 0) == (1, 1, True), f"{info.name}: not a wrapped-key config"
            context = {
                "vault": vault.vault_id,
                "kind": "config",
                "purpose": "regionvault-repository",
            }
            out.append(WrappedKey(info.name, data[_ENVELOPE.size : _ENVELOPE.size + w], context))
        elif kind == 8:  # a keyring (format 4): its data key is wrapped like the config's
            assert (source, w > 0) == (1, True), f"{info.name}: not a wrapped-key keyring"
            context = {
                "vault": vault.vault_id,
                "kind": "keyring",
                "repository": repository_id,
                "generation": str(int(info.name.rsplit("/", 1)[-1], 16)),
            }
            out.append(WrappedKey(info.name, data[_ENVELOPE.size : _ENVELOPE.size + w], context))
        else:
            assert (source, w) == (0, 0), f"{info.name}: expected a master-key object"
    return out


def leaks(scanned: Mapping[str, bytes], needles: Mapping[str, bytes]) -> list[str]:
    return [
        f"{what} in {where}"
        for where, data in scanned.items()
        for what, needle in needles.items()
        if needle in data
    ]


# --------------------------------------------------------------------------- test disks

MiB = 1024 * 1024
#: the end-to-end tests' disk data: a whole number of MiB, above Azure's 20 MiB upload minimum
DISK = 24 * MiB
RUN = 64


def _log_text(rng: random.Random, n: int, size: int) -> bytes:
    lines = (
        f"{n:04d} vcu[{rng.randrange(64)}]: ue {rng.getrandbits(40):010x} handover cell "
        f"{rng.randrange(4096)} e2e-marker-{rng.getrandbits(64):016x}\n".encode()
        for _ in range(size // 60 + 1)
    )
    return b"".join(lines)[:size]


def disk_pieces(seed: int, size: int = DISK) -> dict[int, bytes]:
    """A disk's first ``size`` bytes as offset -> 1 MiB piece, holes (never written) left
    out: random, log text, half-zero and repeated MiBs."""
    rng = random.Random(seed)
    pieces: dict[int, bytes] = {}
    earlier: list[bytes] = []
    for n in range(size // MiB):
        kind = n % 6
        if kind in (0, 1):
            data = rng.randbytes(MiB)
            earlier.append(data)
        elif kind == 2:
            data = _log_text(rng, n, MiB)
        elif kind == 3:
            continue
        elif kind == 4:
            data = rng.randbytes(MiB // 2) + bytes(MiB // 2)
        else:
            data = earlier[rng.randrange(len(earlier))]
        pieces[n * MiB] = data
    return pieces


def image_of(pieces: Mapping[int, bytes], size: int = DISK) -> bytearray:
    image = bytearray(size)
    for offset, data in pieces.items():
        image[offset : offset + len(data)] = data
    return image


def marker_runs(image: bytes | bytearray, size: int = DISK) -> dict[str, bytes]:
    """Distinctive 64-byte runs of the disk at offsets that differ from MiB to MiB."""
    runs: dict[str, bytes] = {}
    for n in range(size // MiB):
        for offset in (n * MiB, n * MiB + (n * 7919 + 4096) % (MiB // 2 - RUN)):
            run = bytes(image[offset : offset + RUN])
            if run.count(0) < RUN // 2:
                runs[f"offset {offset}"] = run
    return runs
