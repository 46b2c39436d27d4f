"""Keyrings: run data keys re-wrapped under a newer master key (docs/format.md, sections 2
and 10, "Rotate keys"); ``_rotate`` writes them.

A pack's header carries its run data key wrapped under the master key that was current when
the run wrote it, and packs are never rewritten. A rotation therefore does not touch them: it
gathers every run's data key once into a ``keyring/<generation>`` object sealed under a fresh
data key of the new master key (envelope encryption again, with the KeyService's two calls
only), and rewrites the config under the new master key. Readers take a pack's run key from
the newest keyring when it holds the run, else unwrap the pack's own wrapped key; so once
both are done, the old master key can be disabled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from regionvault.core.errors import (
    IntegrityError,
    KeyAccessDenied,
    ObjectNotFound,
    RegionVaultError,
)
from regionvault.core.interfaces import KeyService, Vault
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt

__all__ = ["Keyring", "generations", "keyring_context", "newest_keyring", "read_keyring"]


@dataclass(frozen=True)
class Keyring:
    """One keyring object, opened: which master key it was made under and its run keys."""

    generation: int
    key_id: str
    created_at: datetime
    #: run id (16 bytes) -> that run's plaintext data key (kept out of repr: secrets)
    runs: dict[bytes, bytes] = field(repr=False)


def keyring_context(vault_id: str, repository_id: str, generation: int) -> dict[str, str]:
    return {
        "vault": vault_id,
        "kind": "keyring",
        "repository": repository_id,
        "generation": str(generation),
    }


def generations(vault: Vault) -> list[int]:
    """The keyring generations present in the vault, oldest first."""
    found = (fmt.parse_keyring_name(info.name) for info in vault.list(fmt.KEYRING_PREFIX))
    return sorted(g for g in found if g is not None)


def read_keyring(vault: Vault, keys: KeyService, repository_id: str, generation: int) -> Keyring:
    """Open ``keyring/<generation>``: one unwrap. :class:`IntegrityError` naming it when it
    does not authenticate or parse (or its key does not unwrap), :class:`ObjectNotFound`
    when absent."""
    name = fmt.keyring_name(generation)
    data = vault.get(name)
    header = fmt.EnvelopeHeader.parse(name, data, fmt.ObjectKind.KEYRING)
    if header.key_source != fmt.KEY_SOURCE_WRAPPED or not header.wrapped_key:
        raise IntegrityError(name, "keyring carries no wrapped key")
    context = keyring_context(vault.vault_id, repository_id, generation)
    try:
        secret = keys.unwrap(header.wrapped_key, context)
    except KeyAccessDenied as exc:
        raise IntegrityError(
            name, f"its key does not unwrap with this region's key service ({exc.message})"
        ) from None
    body = _crypto.open_sealed(
        vault_id=vault.vault_id, name=name, data=data, header=header, secret=secret
    )
    try:
        doc = json.loads(body)
        if int(doc["generation"]) != generation:
            raise IntegrityError(name, f"says generation {doc['generation']}, not {generation}")
        runs: dict[bytes, bytes] = {}
        for run_hex, key_hex in doc["runs"].items():
            run_id, key = bytes.fromhex(run_hex), bytes.fromhex(key_hex)
            if len(run_id) != fmt.ID_SIZE or len(key) != _crypto.KEY_SIZE:
                raise IntegrityError(name, f"run {run_hex!r} has an id or key of the wrong length")
            runs[run_id] = key
        return Keyring(
            generation=generation,
            key_id=str(doc["key_id"]),
            created_at=datetime.fromisoformat(doc["created_at"]),
            runs=runs,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(name, f"keyring is malformed ({exc})") from None


def newest_keyring(vault: Vault, keys: KeyService, repository_id: str) -> Keyring | None:
    """The newest keyring, or None when the repository has none. A newer one that a
    concurrent rotation deleted meanwhile is looked for again (bounded)."""
    for _attempt in range(5):
        found = generations(vault)
        if not found:
            return None
        try:
            return read_keyring(vault, keys, repository_id, found[-1])
        except ObjectNotFound:
            continue
    raise RegionVaultError("the keyring objects kept changing while they were read")
