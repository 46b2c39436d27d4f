"""Key rotation that re-wraps (docs/format.md, section 10, "Rotate keys"): a new master key
becomes current, every run's data key goes into a new keyring under it, the config is
rewritten under it, older keyrings go; no pack is rewritten, so it costs a read of the index
and one KeyService call per run whose key no keyring holds yet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from regionvault.core.errors import ObjectExists, RegionVaultError
from regionvault.core.repository import _crypto, _keyring
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._locks import RepositoryLock
from regionvault.core.repository._store import Store, canonical_json, check_rotation_key

__all__ = ["RotationReport", "rotate_keys"]


@dataclass
class RotationReport:
    """What :meth:`Repository.rotate_keys` did."""

    region: str
    #: the master key the repository's config was wrapped under before (None: a config
    #: written before format 4 does not say, and a resumed rotation cannot know)
    old_key_id: str | None
    #: the master key every wrapped key of the repository now names
    new_key_id: str
    #: the keyring generation now current
    generation: int
    #: run data keys the keyring holds
    runs: int
    #: packs whose headers were read for their runs
    packs: int
    seconds: float
    #: an interrupted rotation was finished: no new master key was made this time
    resumed: bool
    #: older keyring generations deleted
    deleted: list[str]


def _write_keyring(store: Store, generation: int, runs: dict[bytes, bytes], expected: str) -> str:
    """Seal and put ``keyring/<generation>`` if absent, under exactly the master key
    ``expected`` (else "run again", nothing written); the id of that key."""
    name = fmt.keyring_name(generation)
    context = _keyring.keyring_context(store.vault_id, store.config.repository_id, generation)
    data_key = store.keys.generate_data_key(context)
    check_rotation_key(store.region, name, data_key.key_id, expected)
    body = {
        "generation": generation,
        "created_at": datetime.now(UTC).isoformat(),
        "key_id": data_key.key_id,
        "runs": {run.hex(): key.hex() for run, key in sorted(runs.items())},
    }
    sealed = _crypto.seal(
        vault_id=store.vault_id,
        kind=fmt.ObjectKind.KEYRING,
        name=name,
        body=canonical_json(body),
        secret=data_key.plaintext,
        key_source=fmt.KEY_SOURCE_WRAPPED,
        wrapped_key=data_key.wrapped,
    )
    try:
        store.vault.put(name, sealed, if_absent=True)
    except ObjectExists:
        raise RegionVaultError(
            f"{name} appeared while rotate-keys held the exclusive lock: another rotation ran "
            "without one",
            region=store.region,
        ) from None
    return data_key.key_id


def _gather_runs(
    store: Store,
    progress: Callable[[int, int], None] | None,
    known: dict[bytes, bytes] | None = None,
) -> tuple[dict[bytes, bytes], int]:
    """Every run's data key among the indexed packs (each distinct run unwrapped once, or
    taken from the newest keyring; runs in ``known`` are not looked up again), and how many
    packs there were."""
    state = store.load_index()
    packs = sorted(state.index.packs.items())
    runs: dict[bytes, bytes] = dict(known or {})
    for done, (pack_id, info) in enumerate(packs, 1):
        name = fmt.pack_name(pack_id)
        header = fmt.PackHeader.parse(name, info.header)
        if header.run_id not in runs:
            runs[header.run_id] = store.run_key(name, header)
        if progress is not None and (done % 256 == 0 or done == len(packs)):
            progress(done, len(packs))
    return runs, len(packs)


def rotate_keys(
    store: Store,
    *,
    lock: RepositoryLock,
    progress: Callable[[int, int], None] | None = None,
    step: Callable[[str], None] | None = None,
) -> RotationReport:
    """Make a new master key current and re-wrap the repository under it (under the
    exclusive ``lock``): keyring N+1 (if absent), then the config, then older keyrings
    deleted. Run again after a crash at any point, it finishes what was begun: a keyring
    made under the current key with the config or older keyrings still to do is finished
    without a new key; so is a current key newer than the one the config names (format 4
    configs name theirs). ``step`` (for tests) is told each step as it completes."""
    started = time.monotonic()
    config = store.read_config()
    if config.key_id is None:
        # a config written before format 4 names no key: re-wrap it first (under the current
        # key) so that a rotation killed after its new key was made is seen as one to finish
        # when run again, not begun a second time
        config = store.rewrap_config()
        if step is not None:
            step("named")
    present = _keyring.generations(store.vault)
    newest = (
        _keyring.read_keyring(store.vault, store.keys, config.repository_id, present[-1])
        if present
        else None
    )
    current = store.keys.key_id
    if (
        newest is not None
        and newest.key_id == current
        and (config.key_id != current or len(present) > 1)
    ):
        # a keyring under the current key exists: only the config and older keyrings remain
        resumed, old_key, new_key = True, config.key_id, current
        generation, runs, packs = newest.generation, len(newest.runs), 0
    else:
        # every run's key first (a damaged index stops the rotation before a key is made)
        ring, packs = _gather_runs(store, progress)
        if config.key_id is not None and config.key_id != current:
            # the key service's current key is newer than the repository's: an interrupted
            # rotation made it (or it was rotated outside); re-wrap under it
            resumed, old_key, new_key = True, config.key_id, current
        else:
            resumed, old_key = False, config.key_id or current
            new_key = store.keys.rotate()
            if step is not None:
                step("rotated")
            # runs added between the gathering and the rotation (none under the exclusive
            # lock, but an index written meanwhile is read again, cheaply)
            ring, packs = _gather_runs(store, None, ring)
        generation = (present[-1] if present else 0) + 1
        _write_keyring(store, generation, ring, new_key)
        runs = len(ring)
        store.adopt_keyring(_keyring.Keyring(generation, new_key, datetime.now(UTC), ring))
        if step is not None:
            step("keyring")
    lock.check()
    store.rewrap_config(expect_key_id=new_key)
    if step is not None:
        step("config")
    deleted: list[str] = []
    for older in present:
        if older < generation:
            name = fmt.keyring_name(older)
            store.vault.delete(name)
            deleted.append(name)
            if step is not None:
                step("deleted")
    return RotationReport(
        region=store.region,
        old_key_id=old_key,
        new_key_id=new_key,
        generation=generation,
        runs=runs,
        packs=packs,
        seconds=time.monotonic() - started,
        resumed=resumed,
        deleted=deleted,
    )
