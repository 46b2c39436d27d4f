"""The libcloud Vault and Transit on moto's S3, Azurite and the Swift fake, beyond the
conformance suite (test_libcloud_wire.py has what the stores are more lenient in): a store
configured without if-absent puts does not claim them and refuses them rather than racing;
concurrent puts from many threads are signed right (Azurite checks every signature); the
inbox sits beside the vault without showing in its listings; the driver's errors are named.
"""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from libcloud_world import build_region
from regionvault.core.errors import (
    ObjectExists,
    ObjectNotFound,
    TransientError,
    UnsupportedOperation,
    VaultError,
)

MiB = 1 << 20


def test_without_conditional_puts_the_vault_claims_none_and_refuses_them(
    make_vault: Callable[..., Any],
) -> None:
    vault = make_vault(conditional_put=False)
    assert vault.capabilities.conditional_put is False
    # the data plane reads the vault id first, and it is made if-absent: refused, not raced
    with pytest.raises(UnsupportedOperation, match="conditional_put = false"):
        _ = vault.vault_id
    with pytest.raises(UnsupportedOperation, match="conditional_put = false"):
        vault.put("locks/a", b"x", if_absent=True)
    assert not vault.exists("locks/a"), "a refused if-absent put wrote the object"
    vault.put("locks/a", b"plain put still works")
    assert vault.get("locks/a") == b"plain put still works"


def test_if_absent_put_over_a_taken_name_leaves_it(make_vault: Callable[..., Any]) -> None:
    vault = make_vault()
    vault.put("config", b"first", if_absent=True)
    with pytest.raises(ObjectExists):
        vault.put("config", b"second", if_absent=True)
    assert vault.get("config") == b"first"


def test_many_threads_put_and_read_with_their_own_signed_requests(
    make_vault: Callable[..., Any],
) -> None:
    vault = make_vault()
    errors: list[BaseException] = []
    drivers: set[int] = set()

    def worker(i: int) -> None:
        try:
            # libcloud's connection signs from the request it keeps on itself: one per thread
            drivers.add(id(vault._store.driver))
            for j in range(5):
                name = f"t/{i:02d}/{j}"
                vault.put(name, name.encode() * 100)
                assert vault.get(name, offset=1, length=3) == (name.encode() * 100)[1:4]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(drivers) == 8, "threads shared a libcloud driver"
    del threads
    gc.collect()
    assert len(vault._store._drivers) <= 1, "finished threads' drivers were kept"
    assert len(list(vault.list("t/"))) == 40


def test_vault_prefix_and_inbox_share_a_container_apart(store: dict[str, Any]) -> None:
    provider, dest = build_region({**store, "prefix": "vault/"})
    _, source = build_region({**store, "prefix": "vault/"}, name="libcloud:core")
    vault = provider.vault(dest.for_service("vault"))
    transit = provider.transit(source.for_service("vault"), dest.for_service("vault"))
    try:
        vault.put("packs/p", b"in the vault")
        transit.send("packs/p", b"in the inbox")
        assert [i.name for i in vault.list()] == ["packs/p"]
        assert vault.get("packs/p") == b"in the vault"
        assert list(transit.inbox()) == ["packs/p"]
        assert transit.receive("packs/p") == b"in the inbox"
        assert vault.vault_id.startswith("libcloud-")
        transit.discard("packs/p")
        assert not transit.has("packs/p")
    finally:
        vault.close()
        transit.close()


def test_a_missing_container_without_create_is_named(make_vault: Callable[..., Any]) -> None:
    vault = make_vault(create=False, container="rv-never-made")
    with pytest.raises(VaultError, match="rv-never-made does not exist"):
        vault.get("x")


def test_wrong_credentials_are_named(
    make_vault: Callable[..., Any], store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if store["driver"] == "s3":
        pytest.skip("moto's S3 takes any key (it checks no signature)")
    monkeypatch.setenv("RV_LC_UNIT_SECRET", "d3Jvbmcga2V5")
    vault = make_vault()
    with pytest.raises(VaultError, match="RV_LC_UNIT_KEY/RV_LC_UNIT_SECRET"):
        vault.head("x")


def test_a_missing_object_is_object_not_found(make_vault: Callable[..., Any]) -> None:
    vault = make_vault()
    for call in (lambda: vault.get("nope"), lambda: vault.head("nope")):
        with pytest.raises(ObjectNotFound):
            call()
    with pytest.raises(ObjectNotFound):
        vault.get("nope", offset=5, length=5)
    vault.delete("nope")


def test_a_store_down_is_transient_a_wrong_host_is_not(
    make_vault: Callable[..., Any], store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.providers.libcloud.testing import free_port

    # the resolver answers for .invalid here: no DNS query leaves the machine
    resolve = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".invalid"):
            asked.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    if store["driver"] == "openstack_swift":
        down = make_vault(auth_url=f"http://127.0.0.1:{free_port()}/identity", timeout=5)
        wrong = make_vault(auth_url="https://no-such-store.invalid/identity", timeout=5)
        says = "check auth_url"
    else:
        down = make_vault(port=free_port(), timeout=5)
        wrong = make_vault(host="no-such-store.invalid", timeout=5)
        says = "check host, port and secure"
    with pytest.raises(TransientError):
        down.head("x")
    with pytest.raises(VaultError, match=says) as raised:
        wrong.head("x")
    assert not isinstance(raised.value, TransientError)
    assert asked and set(asked) == {"no-such-store.invalid"}


def test_a_killed_streamed_upload_is_a_stale_temporary_on_s3(
    make_vault: Callable[..., Any], store: dict[str, Any]
) -> None:
    from datetime import timedelta

    vault = make_vault()
    assert list(vault.stale_temporaries(timedelta(0))) == []
    if store["driver"] != "s3":
        return  # Azure's: test_libcloud_wire.py; Swift's puts leave nothing
    # what a writer killed between its parts leaves: an initiated multipart upload
    driver = vault._store.driver
    driver._initiate_multipart(vault._store.container(), "vault/packs/killed")
    # moto reports every upload as initiated on 2010-11-10: a cutoff before that keeps it
    assert list(vault.stale_temporaries(timedelta(days=365 * 30))) == [], "cutoff ignored"
    (stale,) = list(vault.stale_temporaries(timedelta(0)))
    assert stale.name == "packs/killed" and stale.size is None
    assert "packs/killed" not in [i.name for i in vault.list()]
    vault.remove_temporary(stale)
    assert list(vault.stale_temporaries(timedelta(0))) == []
    vault.remove_temporary(stale)  # gone already is not an error
