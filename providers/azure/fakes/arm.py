"""A wire-level fake of Azure Resource Manager for Microsoft.Compute, on HTTPS at 127.0.0.1.

The unmodified ``ComputeManagementClient`` talks to it through ``base_url`` and a
``connection_verify`` CA bundle; the unmodified ``ClientSecretCredential`` logs in at its token
endpoint (``authority`` pointed here, instance discovery off). What it serves:

- ``/<tenant>/v2.0/.well-known/openid-configuration`` and ``/<tenant>/oauth2/v2.0/token``;
- virtual machines (list in pages of :attr:`ArmFake.page_size` with ``nextLink``, get, put,
  patch, delete; ``$expand=instanceView`` on get and list and ``/instanceView``, whose
  ``PowerState/<state>`` status is the VM's power state; the actions ``start``, ``powerOff``
  and ``deallocate``) with an OS disk and data disks attached (``storageProfile.dataDisks``:
  LUNs 0-63, each an existing managed disk; answered as ARM shapes them, each disk with its
  ``name``, ``diskSizeGB`` and ``managedDisk.storageAccountType``; deleted with the VM when
  its ``deleteOption`` is ``Delete``), managed disks and snapshots (get, put, delete,
  ``beginGetAccess``, ``endGetAccess``);
- long-running operations with the status codes of the REST specification that the SDK
  checks: VM PUT 201 / disk and snapshot PUT 202, each with ``Azure-AsyncOperation``; DELETE
  202; POST actions 202 with ``Location`` (and ``Azure-AsyncOperation``); ``Retry-After: 0``.
  An operation answers ``InProgress`` to its first poll and ``Succeeded`` after, so the
  client's poller really polls.

Disk bytes are not kept here: every disk and snapshot is a page blob in an Azurite account,
and ``beginGetAccess`` answers with an Azurite SAS URL for it (read, or read-write for a disk
created for upload), so disk bytes travel over a real blob server. An incremental snapshot
copies the disk blob's written pages into a blob of its own.

Nothing here enforces what Azure enforces beyond the checks named in the code (attached disks
cannot be deleted, upload sizes are a whole number of MiB plus a 512-byte VHD footer).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from regionvault.providers.azure.fakes.entra import FakeAnswer, FakeTenant
from regionvault.providers.azure.fakes.tls import LocalCA

__all__ = ["ARM_RESOURCE", "ArmFake", "Injected", "seed_disk", "seed_vm"]

MiB = 1024 * 1024
#: the smallest upload disk Azure accepts: 20 MiB of data and the VHD footer
MIN_UPLOAD_BYTES = 20 * MiB + 512
#: snapshots of one snapshot family (one disk's) that may have a read SAS at a time
FAMILY_SAS_LIMIT = 5
_RG = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute"
_KINDS = {"virtualMachines": "vm", "disks": "disk", "snapshots": "snapshot"}
#: the audience of ARM tokens (the client asks for ``<this>/.default``)
ARM_RESOURCE = "https://management.azure.com"
#: the VM actions the fake serves and the power state each leaves the VM in
_POWER_ACTIONS = {"start": "running", "powerOff": "stopped", "deallocate": "deallocated"}


# --------------------------------------------------------------------------- state


@dataclass
class Injected:
    """A failure to answer instead of the real one: the next ``count`` requests whose method
    is ``method`` and whose path matches ``path`` get ``status`` with ARM error ``code``; or,
    with ``in_operation``, the request is accepted and its long-running operation fails."""

    method: str
    path: str
    status: int = 500
    code: str = "InternalServerError"
    count: int = 1
    in_operation: bool = False
    #: when set, the request's (URL-encoded) query must match it too
    query: str | None = None


@dataclass
class _Operation:
    id: str
    location: str
    polls: int = 0
    #: the operation's final (status, body) at its Location URL
    result: tuple[int, dict[str, Any] | None] = (200, None)
    error: dict[str, Any] | None = None
    then: Callable[[], None] | None = None
    done: bool = False


@dataclass
class _Resource:
    kind: str
    sub: str
    rg: str
    name: str
    body: dict[str, Any]
    blob: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        plural = {v: k for k, v in _KINDS.items()}[self.kind]
        return (
            f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Compute/"
            f"{plural}/{self.name}"
        )


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --------------------------------------------------------------------------- the fake


class ArmFake:
    """The fake ARM endpoint; disks live as page blobs in an Azurite account.

    ``blob_endpoint`` is the account's URL (``http://127.0.0.1:P/<account>``), ``account``
    and ``account_key`` its credentials (the fake signs SAS URLs with them).
    """

    def __init__(
        self,
        *,
        blob_endpoint: str,
        account: str,
        account_key: str,
        workdir: Path | None = None,
        container: str = "arm-fake-disks",
        page_size: int = 3,
        tenant: FakeTenant | None = None,
        ca: LocalCA | None = None,
    ) -> None:
        self.blob_endpoint = blob_endpoint.rstrip("/")
        self.account = account
        self.account_key = account_key
        self.container = container
        self.page_size = page_size
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rv-arm-fake-")
            workdir = Path(self._tmp.name)
        #: the Entra tenant whose tokens this fake accepts (shareable with the other fakes)
        self.entra = tenant or FakeTenant(workdir / "tenant")
        self.ca = ca or LocalCA.create(workdir / "tls", name="regionvault ARM fake")
        self.subscription = str(uuid.uuid4())
        self._lock = threading.RLock()
        self._resources: dict[str, _Resource] = {}
        self._operations: dict[str, _Operation] = {}
        self._injected: list[Injected] = []
        #: the power states a new VM's instance view shows, one per read of it, the last one
        #: kept (``["starting", "starting", "running"]``: a VM that takes two reads to run)
        self.start_states: list[str] = ["running"]
        #: every ARM request as (method, path, query string), tokens excluded
        self.requests: list[tuple[str, str, str]] = []
        #: every answer as (method, path, status), login included
        self.answers: list[tuple[str, str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_file

    @property
    def tenant(self) -> str:
        return self.entra.tenant_id

    @property
    def client_id(self) -> str:
        return self.entra.client_id

    @property
    def client_secret(self) -> str:
        return self.entra.secret_file().read_text(encoding="utf-8").strip()

    def start(self) -> ArmFake:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(
            self.blob_endpoint,
            credential={"account_name": self.account, "account_key": self.account_key},
        )
        self._container = service.get_container_client(self.container)
        with contextlib.suppress(Exception):
            self._container.create_container()
        fake = self

        class Handler(_Handler):
            arm = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = self.ca.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, name="rv-arm-fake", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ArmFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls

    def inject(self, failure: Injected) -> None:
        with self._lock:
            self._injected.append(failure)

    def resources(self, kind: str) -> list[dict[str, Any]]:
        """Bodies of every resource of ``kind`` (``vm``, ``disk``, ``snapshot``)."""
        with self._lock:
            return [
                json.loads(json.dumps(r.body)) for r in self._resources.values() if r.kind == kind
            ]

    def blob_client(self, resource_id: str) -> Any:
        """An account-key BlobClient for the page blob behind a disk or snapshot."""
        with self._lock:
            resource = self._resources[resource_id.lower()]
        return self._container.get_blob_client(str(resource.blob))

    def compute_settings(self, *, resource_group: str, location: str) -> dict[str, Any]:
        """site.toml settings of a region whose compute is this fake: the Compute's own
        (``AzureComputeSettings.from_region``) and a client-secret login at the fake's
        tenant (identity.py's keys: the secret in a file, ``authority`` and ``ca_file``)."""
        return {
            "subscription_id": self.subscription,
            "resource_group": resource_group,
            "location": location,
            "arm_endpoint": self.endpoint,
            "credential": "client-secret",
            "tenant_id": self.tenant,
            "client_id": self.client_id,
            "client_secret_file": str(self.entra.secret_file()),
            "authority": self.endpoint,
            "ca_file": str(self.ca_path),
        }

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for m, p, _q in self.requests if m == method and rx.search(p))

    # ------------------------------------------------------------------ helpers

    def _sas(self, blob: str, *, write: bool, seconds: int) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        token = generate_blob_sas(
            self.account,
            self.container,
            blob,
            account_key=self.account_key,
            permission=BlobSasPermissions(read=True, write=write),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(60, seconds)),
        )
        return f"{self.blob_endpoint}/{self.container}/{blob}?{token}"

    def _new_blob(self, size: int) -> str:
        name = f"{uuid.uuid4().hex}.vhd"
        self._container.get_blob_client(name).create_page_blob(size)
        return name

    def _copy_pages(self, source: str, size: int) -> str:
        """A new page blob holding the written pages of ``source`` (an incremental snapshot
        or a disk made from one)."""
        target = self._new_blob(size)
        src = self._container.get_blob_client(source)
        dst = self._container.get_blob_client(target)
        for page in src.list_page_ranges():
            if page.cleared:
                continue
            start, end = int(page.start or 0), int(page.end or 0) + 1
            for offset in range(start, end, 4 * MiB):
                length = min(4 * MiB, end - offset)
                data = src.download_blob(offset=offset, length=length).readall()
                dst.upload_page(data, offset=offset, length=length)
        return target

    def _operation(
        self,
        location: str,
        *,
        result: tuple[int, dict[str, Any] | None] = (200, None),
        then: Callable[[], None] | None = None,
        error: dict[str, Any] | None = None,
    ) -> _Operation:
        op = _Operation(str(uuid.uuid4()), location, result=result, then=then, error=error)
        with self._lock:
            self._operations[op.id] = op
        return op

    def _lro_headers(self, sub: str, op: _Operation, *, with_location: bool) -> dict[str, str]:
        base = (
            f"{self.endpoint}/subscriptions/{sub}/providers/Microsoft.Compute/locations/"
            f"{op.location}"
        )
        headers = {
            "Azure-AsyncOperation": f"{base}/operations/{op.id}?api-version=2026-04-01",
            "Retry-After": "0",
        }
        if with_location:
            headers["Location"] = f"{base}/operationResults/{op.id}?api-version=2026-04-01"
        return headers

    def _poll(self, op_id: str) -> _Operation:
        with self._lock:
            op = self._operations.get(op_id)
            if op is None:
                raise _Error(404, "NotFound", f"operation {op_id} not found")
            op.polls += 1
            if op.polls >= 2 and not op.done:
                op.done = True
                if op.then is not None and op.error is None:
                    op.then()
            return op

    def _take_injected(self, method: str, path: str, query: str = "") -> Injected | None:
        with self._lock:
            for failure in self._injected:
                if (
                    failure.method == method
                    and re.search(failure.path, path)
                    and (failure.query is None or re.search(failure.query, query))
                ):
                    failure.count -= 1
                    if failure.count <= 0:
                        self._injected.remove(failure)
                    return failure
        return None

    # ------------------------------------------------------------------ dispatch

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        parts = path.strip("/").split("/")
        if FakeTenant.is_login_path(parts):
            try:
                _op, _client, doc = self.entra.serve(method, parts, body, self.endpoint)
            except FakeAnswer as exc:
                oauth = {"error": exc.code, "error_description": exc.message}
                return exc.status, {}, json.dumps(oauth).encode()
            return 200, {}, json.dumps(doc).encode()
        challenge = {
            "WWW-Authenticate": f'Bearer authorization_uri="{self.endpoint}/{self.tenant}"'
        }
        try:
            self.entra.client_of(headers.get("Authorization"), ARM_RESOURCE, challenge)
        except FakeAnswer as exc:
            raise _Error(exc.status, "AuthenticationFailed", exc.message) from None
        with self._lock:
            self.requests.append((method, path, urllib.parse.urlencode(query, doseq=True)))
        injected = self._take_injected(method, path, urllib.parse.urlencode(query, doseq=True))
        if injected is not None and not injected.in_operation:
            raise _Error(injected.status, injected.code, f"injected {injected.code}")
        error = (
            {"code": injected.code, "message": f"injected {injected.code}"}
            if injected is not None
            else None
        )
        match = re.fullmatch(
            r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/"
            r"(?P<loc>[^/]+)/(?P<what>operations|operationResults)/(?P<op>[^/]+)",
            path,
        )
        if match and method == "GET":
            return self._operation_status(match["what"], match["op"])
        match = re.fullmatch(_RG + r"/(?P<type>virtualMachines|disks|snapshots)", path)
        if match and method == "GET":
            return self._list(match["sub"], match["rg"], _KINDS[match["type"]], query)
        match = re.fullmatch(
            _RG + r"/(?P<type>virtualMachines|disks|snapshots)/(?P<name>[^/]+)"
            r"(?:/(?P<action>beginGetAccess|endGetAccess|instanceView|start|powerOff|"
            r"deallocate))?",
            path,
        )
        if not match:
            raise _Error(404, "InvalidResourceType", f"no such path {path}")
        kind, sub, rg, name = _KINDS[match["type"]], match["sub"], match["rg"], match["name"]
        key = (path.rsplit("/", 1)[0] if match["action"] else path).lower()
        doc = json.loads(body) if body else {}
        if kind == "vm" and match["action"] == "instanceView" and method == "GET":
            return 200, {}, json.dumps(self._instance_view(key)).encode()
        if kind == "vm" and match["action"] in _POWER_ACTIONS and method == "POST":
            return self._power_action(key, sub, _POWER_ACTIONS[match["action"]], error)
        if match["action"] == "beginGetAccess" and method == "POST":
            return self._grant(key, sub, doc, error)
        if match["action"] == "endGetAccess" and method == "POST":
            return self._revoke(key, sub, error)
        if method == "GET":
            if kind == "vm" and query.get("$expand") == ["instanceView"]:
                return 200, {}, json.dumps(self._with_instance_view(key)).encode()
            return 200, {}, self._get(key).encode()
        if method == "PUT":
            return self._put(kind, sub, rg, name, key, doc, error)
        if method == "PATCH" and kind == "vm":
            return self._patch_vm(key, sub, doc, headers)
        if method == "DELETE":
            return self._delete(key, sub, error)
        raise _Error(405, "MethodNotAllowed", f"{method} {path}")

    # ------------------------------------------------------------------ power state

    def power_state(self, resource_id: str) -> str:
        """A VM's power state now (without consuming a step of :attr:`start_states`)."""
        with self._lock:
            vm = self._resources.get(resource_id.lower())
            if vm is None or vm.kind != "vm":
                raise KeyError(resource_id)
            return str(vm.extra.get("power", ["running"])[0])

    def set_power_state(self, resource_id: str, state: str) -> None:
        """Put a VM in power state ``state`` now (a test's shortcut for what Azure does)."""
        with self._lock:
            vm = self._resources.get(resource_id.lower())
            if vm is None or vm.kind != "vm":
                raise KeyError(resource_id)
            vm.extra["power"] = [state]

    def _instance_view(self, key: str) -> dict[str, Any]:
        """The VM's instance view as ARM shapes it; each read moves a new VM one step along
        its :attr:`start_states`."""
        with self._lock:
            vm = self._resources.get(key)
            if vm is None or vm.kind != "vm":
                raise _Error(404, "ResourceNotFound", f"virtual machine {key} not found")
            provisioning = str(vm.body.get("properties", {}).get("provisioningState", ""))
            steps = vm.extra.setdefault("power", ["starting"])
            power = steps.pop(0) if len(steps) > 1 else steps[0]
        statuses = [
            {
                "code": f"ProvisioningState/{provisioning.lower()}",
                "level": "Error" if provisioning == "Failed" else "Info",
                "displayStatus": f"Provisioning {provisioning.lower()}",
            }
        ]
        if provisioning != "Creating":
            statuses.append(
                {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}
            )
        return {"computerName": vm.name, "statuses": statuses}

    def _with_instance_view(self, key: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self._get(key))
        doc.setdefault("properties", {})["instanceView"] = self._instance_view(key)
        return doc

    def _power_action(
        self, key: str, sub: str, state: str, error: dict[str, Any] | None
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            vm = self._resources.get(key)
            if vm is None or vm.kind != "vm":
                raise _Error(404, "ResourceNotFound", f"virtual machine {key} not found")
            location = str(vm.body.get("location") or "")

        def finish() -> None:
            with self._lock:
                vm.extra["power"] = [state]

        op = self._operation(location, then=finish, error=error)
        return 202, self._lro_headers(sub, op, with_location=True), b""

    def _get(self, key: str) -> str:
        with self._lock:
            resource = self._resources.get(key)
            if resource is None:
                raise _Error(404, "ResourceNotFound", f"resource {key} not found")
            return json.dumps(resource.body)

    # ------------------------------------------------------------------ operations

    def _operation_status(self, what: str, op_id: str) -> tuple[int, dict[str, str], bytes]:
        op = self._poll(op_id)
        headers = {"Retry-After": "0"}
        if what == "operations":
            if not op.done:
                doc: dict[str, Any] = {"name": op.id, "status": "InProgress"}
            elif op.error is not None:
                doc = {"name": op.id, "status": "Failed", "error": op.error}
            else:
                doc = {"name": op.id, "status": "Succeeded"}
                if op.result[1] is not None:
                    doc["properties"] = {"output": op.result[1]}
            return 200, headers, json.dumps(doc).encode()
        if not op.done:
            return 202, {**headers, "Location": ""}, b""
        if op.error is not None:
            return 500, {}, json.dumps({"error": op.error}).encode()
        status, body = op.result
        return status, {}, (json.dumps(body).encode() if body is not None else b"")

    # ------------------------------------------------------------------ collections

    def _list(
        self, sub: str, rg: str, kind: str, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            found = sorted(
                (
                    r
                    for r in self._resources.values()
                    if r.kind == kind and r.sub == sub and r.rg.lower() == rg.lower()
                ),
                key=lambda r: r.name.lower(),
            )
            skip = int(query.get("$skiptoken", ["0"])[0] or 0)
            page = found[skip : skip + self.page_size]
            doc: dict[str, Any] = {"value": [json.loads(json.dumps(r.body)) for r in page]}
            if kind == "vm" and query.get("$expand") == ["instanceView"]:
                doc["value"] = [self._with_instance_view(r.id.lower()) for r in page]
        if skip + self.page_size < len(found):
            plural = {v: k for k, v in _KINDS.items()}[kind]
            doc["nextLink"] = (
                f"{self.endpoint}/subscriptions/{sub}/resourceGroups/{rg}/providers/"
                f"Microsoft.Compute/{plural}?api-version=2026-04-01"
                f"&$skiptoken={skip + self.page_size}"
            )
        return 200, {}, json.dumps(doc).encode()

    # ------------------------------------------------------------------ put

    def _put(
        self,
        kind: str,
        sub: str,
        rg: str,
        name: str,
        key: str,
        doc: dict[str, Any],
        error: dict[str, Any] | None,
    ) -> tuple[int, dict[str, str], bytes]:
        location = str(doc.get("location") or "")
        if not location:
            raise _Error(400, "LocationRequired", "the location property is required")
        props = dict(doc.get("properties") or {})
        with self._lock:
            existing = self._resources.get(key)
        if existing is not None and kind != "vm":
            raise _Error(409, "Conflict", f"{kind} {name} exists (the fake does not update)")
        resource = _Resource(kind, sub, rg, name, {})
        if kind == "disk":
            self._new_disk(resource, props)
        elif kind == "snapshot":
            self._new_snapshot(resource, props)
        else:
            self._new_vm(resource, props, existing, zones=list(doc.get("zones") or []))
        final = {
            "id": resource.id,
            "name": name,
            "type": f"Microsoft.Compute/{ {v: k for k, v in _KINDS.items()}[kind] }",
            "location": location,
            "tags": dict(doc.get("tags") or {}),
            **({"sku": doc["sku"]} if "sku" in doc else {}),
            **({"zones": list(doc["zones"])} if doc.get("zones") else {}),
            "properties": {**resource.body.get("properties", {}), "provisioningState": "Succeeded"},
        }
        if kind == "vm":
            final["etag"] = f'"{uuid.uuid4().hex}"'
        pending = json.loads(json.dumps(final))
        pending["properties"]["provisioningState"] = "Creating"
        resource.body = pending

        def finish() -> None:
            resource.body = final
            if kind == "vm":
                self._attach(resource)
                resource.extra["power"] = list(self.start_states) or ["running"]

        def fail() -> None:
            resource.body["properties"]["provisioningState"] = "Failed"

        with self._lock:
            self._resources[key] = resource
        op = self._operation(location, then=finish, error=error)
        if error is not None:
            op.then = None
            fail()
        status = 201 if kind == "vm" and existing is None else (200 if kind == "vm" else 202)
        headers = self._lro_headers(sub, op, with_location=False)
        return status, headers, json.dumps(resource.body).encode()

    def _new_disk(self, resource: _Resource, props: dict[str, Any]) -> None:
        creation = dict(props.get("creationData") or {})
        option = str(creation.get("createOption") or "")
        if option == "Upload":
            size = int(creation.get("uploadSizeBytes") or 0)
            if size < MIN_UPLOAD_BYTES or (size - 512) % MiB:
                raise _Error(
                    400,
                    "InvalidParameter",
                    f"uploadSizeBytes {size} must be at least {MIN_UPLOAD_BYTES} and a whole "
                    "number of MiB plus 512 bytes (the VHD footer)",
                )
            resource.blob = self._new_blob(size)
            resource.extra["size"] = size
            state, data_size = "ReadyToUpload", size - 512
        elif option in ("Copy", "Restore"):
            source = self._resources.get(str(creation.get("sourceResourceId") or "").lower())
            if source is None or source.blob is None:
                raise _Error(404, "NotFound", "the source of the copy was not found")
            size = int(source.extra["size"])
            resource.blob = self._copy_pages(source.blob, size)
            resource.extra["size"] = size
            state, data_size = "Unattached", size - 512
        elif option == "Empty":
            gib = int(props.get("diskSizeGB") or 0)
            if gib < 1:
                raise _Error(400, "InvalidParameter", "diskSizeGB is required for an empty disk")
            size = gib * 1024 * MiB + 512
            resource.blob = self._new_blob(size)
            resource.extra["size"] = size
            state, data_size = "Unattached", size - 512
        else:
            raise _Error(400, "InvalidParameter", f"createOption {option!r} is not faked")
        resource.body = {
            "properties": {
                **props,
                "diskSizeBytes": data_size,
                "diskSizeGB": -(-data_size // (1024 * MiB)),
                "diskState": state,
                "timeCreated": dt.datetime.now(dt.UTC).isoformat(),
                "uniqueId": str(uuid.uuid4()),
            }
        }

    def _new_snapshot(self, resource: _Resource, props: dict[str, Any]) -> None:
        creation = dict(props.get("creationData") or {})
        if creation.get("createOption") != "Copy":
            raise _Error(400, "InvalidParameter", "snapshots are faked for createOption Copy")
        source = self._resources.get(str(creation.get("sourceResourceId") or "").lower())
        if source is None or source.blob is None:
            raise _Error(404, "NotFound", "the snapshot's source disk was not found")
        if source.body.get("properties", {}).get("diskState") in ("ReadyToUpload", "ActiveUpload"):
            raise _Error(409, "OperationNotAllowed", "the disk is being uploaded")
        size = int(source.extra["size"])
        resource.blob = self._copy_pages(source.blob, size)
        resource.extra["size"] = size
        resource.body = {
            "properties": {
                **props,
                "diskSizeBytes": size - 512,
                "diskSizeGB": -(-(size - 512) // (1024 * MiB)),
                "incremental": bool(props.get("incremental")),
                "diskState": "Unattached",
                "timeCreated": dt.datetime.now(dt.UTC).isoformat(),
                "uniqueId": str(uuid.uuid4()),
            }
        }

    def _new_vm(
        self,
        resource: _Resource,
        props: dict[str, Any],
        existing: _Resource | None,
        *,
        zones: Sequence[str] = (),
    ) -> None:
        if existing is not None:
            raise _Error(409, "Conflict", f"virtual machine {resource.name} exists")
        size = (props.get("hardwareProfile") or {}).get("vmSize")
        if not size:
            raise _Error(400, "InvalidParameter", "hardwareProfile.vmSize is required")
        profile = dict(props.get("storageProfile") or {})
        os_disk = dict(profile.get("osDisk") or {})
        disk_id = str((os_disk.get("managedDisk") or {}).get("id") or "")
        if os_disk.get("createOption") != "Attach" or not disk_id:
            raise _Error(400, "InvalidParameter", "the fake attaches an existing OS disk only")
        data_disks = [dict(d) for d in profile.get("dataDisks") or []]
        luns = [d.get("lun") for d in data_disks]
        for lun, data_disk in zip(luns, data_disks, strict=True):
            if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= 63:
                raise _Error(400, "InvalidParameter", f"dataDisks: lun {lun!r} is not 0-63")
            if data_disk.get("createOption") != "Attach" or not (
                (data_disk.get("managedDisk") or {}).get("id")
            ):
                raise _Error(
                    400, "InvalidParameter", "the fake attaches existing managed data disks only"
                )
        if len(set(luns)) != len(luns):
            raise _Error(400, "InvalidParameter", f"dataDisks: duplicate LUNs in {luns}")
        data_disks.sort(key=lambda d: int(d["lun"]))
        ids = [disk_id.lower()] + [str(d["managedDisk"]["id"]).lower() for d in data_disks]
        if len(set(ids)) != len(ids):
            raise _Error(400, "InvalidParameter", "a disk is attached more than once")
        with self._lock:
            disks = [self._resources.get(i) for i in ids]
            for wanted, disk in zip(ids, disks, strict=True):
                if disk is None or disk.kind != "disk":
                    raise _Error(404, "NotFound", f"disk {wanted} not found")
                state = disk.body["properties"].get("diskState")
                if state != "Unattached":
                    raise _Error(409, "OperationNotAllowed", f"disk {disk.id} is {state}")
                if list(disk.body.get("zones") or []) != list(zones):
                    # Azure's rule: a zonal VM attaches disks of its zone, a regional VM
                    # regional disks
                    raise _Error(
                        400,
                        "BadRequest",
                        f"disk {disk.id} is in zones {disk.body.get('zones') or []}, the VM in "
                        f"{list(zones)}",
                    )
            for disk in disks:
                assert disk is not None
                disk.body["properties"]["diskState"] = "Reserved"
        resource.extra["os_disk"] = ids[0]
        resource.extra["data_disks"] = ids[1:]
        # as ARM answers: each disk named, with its size and the storage account type
        os_disk.update(self._disk_view(disks[0]))
        shown = [
            {"caching": "None", **d, **self._disk_view(disk)}
            for d, disk in zip(data_disks, disks[1:], strict=True)
        ]
        resource.body = {
            "properties": {
                **props,
                "storageProfile": {
                    **profile,
                    "osDisk": os_disk,
                    "dataDisks": shown,
                },
                "vmId": str(uuid.uuid4()),
                "timeCreated": dt.datetime.now(dt.UTC).isoformat(),
            }
        }

    @staticmethod
    def _disk_view(disk: _Resource | None) -> dict[str, Any]:
        assert disk is not None
        sku = (disk.body.get("sku") or {}).get("name") or "Standard_LRS"
        return {
            "name": disk.name,
            "diskSizeGB": disk.body["properties"].get("diskSizeGB"),
            "managedDisk": {"id": disk.id, "storageAccountType": sku},
        }

    def _attach(self, vm: _Resource) -> None:
        with self._lock:
            for key in [vm.extra["os_disk"], *vm.extra.get("data_disks", [])]:
                disk = self._resources.get(key)
                if disk is not None:
                    disk.body["properties"]["diskState"] = "Attached"
                    disk.body["managedBy"] = vm.id

    # ------------------------------------------------------------------ patch, delete

    def _patch_vm(
        self, key: str, sub: str, doc: dict[str, Any], headers: Any
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            vm = self._resources.get(key)
            if vm is None:
                raise _Error(404, "ResourceNotFound", f"virtual machine {key} not found")
            match = headers.get("If-Match")
            if match and match != "*" and match != vm.body.get("etag"):
                raise _Error(412, "PreconditionFailed", "the etag does not match")
            if "tags" in doc:
                vm.body["tags"] = dict(doc["tags"] or {})
            vm.body["etag"] = f'"{uuid.uuid4().hex}"'
            answer = json.dumps(vm.body)
            location = vm.body["location"]
        op = self._operation(location)
        return 200, self._lro_headers(sub, op, with_location=False), answer.encode()

    def _delete(
        self, key: str, sub: str, error: dict[str, Any] | None
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            resource = self._resources.get(key)
            if resource is None:
                return 204, {}, b""
            if resource.kind == "disk" and resource.body["properties"].get("diskState") in (
                "Attached",
                "Reserved",
            ):
                raise _Error(409, "OperationNotAllowed", f"disk {resource.name} is attached")
            if resource.kind in ("disk", "snapshot") and resource.body["properties"].get(
                "diskState"
            ) in ("ActiveSAS", "ActiveUpload", "ActiveSASFrozen"):
                raise _Error(
                    409, "OperationNotAllowed", f"{resource.kind} {resource.name} has an active SAS"
                )
            location = resource.body["location"]

        def finish() -> None:
            with self._lock:
                self._resources.pop(key, None)
                if resource.kind == "vm":
                    profile = resource.body["properties"]["storageProfile"]
                    attached = [
                        (resource.extra.get("os_disk", ""), profile["osDisk"]),
                        *zip(
                            resource.extra.get("data_disks", []),
                            sorted(profile.get("dataDisks") or [], key=lambda d: int(d["lun"])),
                            strict=False,
                        ),
                    ]
                    for disk_key, shown in attached:
                        disk = self._resources.get(disk_key)
                        if disk is None:
                            continue
                        disk.body["properties"]["diskState"] = "Unattached"
                        disk.body.pop("managedBy", None)
                        if shown.get("deleteOption") == "Delete":
                            self._resources.pop(disk.id.lower(), None)
                            self._delete_blob(disk.blob)
                else:
                    self._delete_blob(resource.blob)

        op = self._operation(location, then=finish, error=error, result=(200, None))
        return 202, self._lro_headers(sub, op, with_location=True), b""

    def _delete_blob(self, blob: str | None) -> None:
        if blob:
            with contextlib.suppress(Exception):
                self._container.get_blob_client(blob).delete_blob()

    # ------------------------------------------------------------------ access

    def _grant(
        self, key: str, sub: str, doc: dict[str, Any], error: dict[str, Any] | None
    ) -> tuple[int, dict[str, str], bytes]:
        access = str(doc.get("access") or "")
        seconds = int(doc.get("durationInSeconds") or 0)
        with self._lock:
            resource = self._resources.get(key)
            if resource is None or resource.kind == "vm":
                raise _Error(404, "ResourceNotFound", f"{key} not found")
            props = resource.body["properties"]
            state = props.get("diskState")
            if access == "Write":
                if state != "ReadyToUpload":
                    raise _Error(
                        409, "OperationNotAllowed", f"write access needs ReadyToUpload, not {state}"
                    )
                after = "ActiveUpload"
            elif access == "Read":
                if state not in ("Unattached", "ActiveSAS"):
                    raise _Error(409, "OperationNotAllowed", f"read access on a {state} disk")
                if resource.kind == "snapshot" and state != "ActiveSAS":
                    self._check_family_sas(resource)
                after = "ActiveSAS"
            else:
                raise _Error(400, "InvalidParameter", f"access {access!r}")
            sas = self._sas(str(resource.blob), write=access == "Write", seconds=seconds)
            location = resource.body["location"]

        def finish() -> None:
            with self._lock:
                props["diskState"] = after

        # the state changes when the operation succeeds (a failed grant opens no SAS)
        op = self._operation(location, result=(200, {"accessSAS": sas}), then=finish, error=error)
        return 202, self._lro_headers(sub, op, with_location=True), b""

    def _check_family_sas(self, snapshot: _Resource) -> None:
        """Azure generates SAS URIs for at most :data:`FAMILY_SAS_LIMIT` snapshots of one
        snapshot family (the snapshots of one disk) at any time (docs: incremental
        snapshots, restrictions): a grant past that is refused. Azure documents the limit,
        not its error code; the fake answers 409 ``OperationNotAllowed`` as for other
        disk-state conflicts."""
        source = str(snapshot.body["properties"].get("creationData", {}).get("sourceResourceId"))
        open_sas = [
            r.name
            for r in self._resources.values()
            if r.kind == "snapshot"
            and r is not snapshot
            and r.body["properties"].get("diskState") == "ActiveSAS"
            and str(r.body["properties"].get("creationData", {}).get("sourceResourceId")).lower()
            == source.lower()
        ]
        if len(open_sas) >= FAMILY_SAS_LIMIT:
            raise _Error(
                409,
                "OperationNotAllowed",
                f"SAS URIs can be generated for at most {FAMILY_SAS_LIMIT} snapshots of a "
                f"snapshot family at a time; {len(open_sas)} are open",
            )

    def _revoke(
        self, key: str, sub: str, error: dict[str, Any] | None
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            resource = self._resources.get(key)
            if resource is None or resource.kind == "vm":
                raise _Error(404, "ResourceNotFound", f"{key} not found")
            location = resource.body["location"]

        def finish() -> None:
            with self._lock:
                props = resource.body["properties"]
                if props.get("diskState") == "ActiveUpload":
                    props["diskState"] = "Unattached"
                    resource.extra["footer"] = self._footer(resource)
                elif props.get("diskState") == "ActiveSAS":
                    props["diskState"] = "Unattached"

        op = self._operation(location, then=finish, error=error)
        return 202, self._lro_headers(sub, op, with_location=True), b""

    def _footer(self, resource: _Resource) -> bytes:
        size = int(resource.extra["size"])
        blob = self._container.get_blob_client(str(resource.blob))
        return bytes(blob.download_blob(offset=size - 512, length=512).readall())

    def footer(self, resource_id: str) -> bytes:
        """The last 512 bytes of an uploaded disk as they were when its upload ended."""
        with self._lock:
            return bytes(self._resources[resource_id.lower()].extra.get("footer", b""))


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    arm: ArmFake
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`ArmFake.requests` instead."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        try:
            status, headers, payload = self.arm.handle(
                self.command, parsed.path, query, self.headers, body
            )
        except _Error as exc:
            status, headers = exc.status, {}
            payload = json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode()
            if exc.status == 401:
                headers["WWW-Authenticate"] = (
                    f'Bearer authorization_uri="{self.arm.endpoint}/{self.arm.tenant}"'
                )
        except Exception as exc:  # a bug in the fake: say so to the client
            status, headers = 500, {}
            payload = json.dumps(
                {"error": {"code": "FakeBug", "message": f"{type(exc).__name__}: {exc}"}}
            ).encode()
        with self.arm._lock:
            self.arm.answers.append((self.command, parsed.path, status))
        self.send_response(status)
        for key, value in headers.items():
            if value:
                self.send_header(key, value)
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        if payload or status not in (204,):
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _answer


# --------------------------------------------------------------------------- seeding


def seed_disk(
    client: Any,
    resource_group: str,
    location: str,
    name: str,
    image: bytes | dict[int, bytes],
    *,
    size: int | None = None,
    blob_client_kwargs: dict[str, Any] | None = None,
    zones: Sequence[str] = (),
) -> str:
    """A managed disk holding ``image`` (bytes from offset 0, or offset -> bytes, the ranges
    in between never written), made through the plain SDK as on real Azure: a disk created
    for upload, a write SAS, the pages and the fixed-VHD footer, the SAS revoked. ``client``
    is a ComputeManagementClient. Returns the disk's resource id."""
    from azure.mgmt.compute import models
    from azure.storage.blob import BlobClient
    from regionvault.providers.azure.compute import vhd_footer

    pieces = {0: image} if isinstance(image, bytes) else dict(image)
    end = max((o + len(d) for o, d in pieces.items()), default=0)
    data_size = max(20 * MiB, -(-(size or end) // MiB) * MiB)
    body: dict[str, Any] = {
        "location": location,
        "properties": {
            "creationData": {"createOption": "Upload", "uploadSizeBytes": data_size + 512},
            "osType": "Linux",
        },
    }
    if zones:
        body["zones"] = list(zones)
    disk = client.disks.begin_create_or_update(resource_group, name, models.Disk(body)).result()
    sas = client.disks.begin_grant_access(
        resource_group, name, {"access": "Write", "durationInSeconds": 3600}
    ).result()["accessSAS"]
    with BlobClient.from_blob_url(sas, **(blob_client_kwargs or {})) as blob:
        for offset, data in sorted(pieces.items()):
            padded = data + bytes(-len(data) % 512)
            for start in range(0, len(padded), 4 * MiB):
                piece = padded[start : start + 4 * MiB]
                blob.upload_page(piece, offset=offset + start, length=len(piece))
        blob.upload_page(vhd_footer(data_size), offset=data_size, length=512)
    client.disks.begin_revoke_access(resource_group, name).result()
    return str(disk["id"])


def seed_vm(
    client: Any,
    resource_group: str,
    location: str,
    name: str,
    *,
    tags: dict[str, str] | None = None,
    image: bytes | dict[int, bytes] = b"",
    vm_size: str = "Standard_D2s_v5",
    subnet_id: str | None = None,
    data_disks: Sequence[bytes | dict[int, bytes]] = (),
    zones: Sequence[str] = (),
) -> str:
    """A VM (a test instance) whose OS disk holds ``image`` and whose data disks (LUN 0,
    1, ...) hold ``data_disks``, made through the plain SDK (:func:`seed_disk` per disk, then
    a VM attaching them); returns the VM's resource id."""
    from azure.mgmt.compute import models

    disk_id = seed_disk(
        client,
        resource_group,
        location,
        f"{name}-os-{uuid.uuid4().hex[:6]}",
        image or {0: b"boot"},
        zones=zones,
    )
    data_ids = [
        seed_disk(
            client,
            resource_group,
            location,
            f"{name}-lun{lun}-{uuid.uuid4().hex[:6]}",
            data,
            zones=zones,
        )
        for lun, data in enumerate(data_disks)
    ]
    properties: dict[str, Any] = {
        "hardwareProfile": {"vmSize": vm_size},
        "storageProfile": {
            "osDisk": {
                "osType": "Linux",
                "createOption": "Attach",
                "managedDisk": {"id": disk_id},
                "deleteOption": "Delete",
            },
            "dataDisks": [
                {
                    "lun": lun,
                    "createOption": "Attach",
                    "managedDisk": {"id": data_id},
                    "deleteOption": "Delete",
                }
                for lun, data_id in enumerate(data_ids)
            ],
        },
    }
    if subnet_id:
        properties["networkProfile"] = {
            "networkApiVersion": "2020-11-01",
            "networkInterfaceConfigurations": [
                {
                    "name": f"{name}-nic",
                    "properties": {
                        "primary": True,
                        "deleteOption": "Delete",
                        "ipConfigurations": [
                            {"name": "ipconfig1", "properties": {"subnet": {"id": subnet_id}}}
                        ],
                    },
                }
            ],
        }
    body = {"location": location, "tags": dict(tags or {}), "properties": properties}
    if zones:
        body["zones"] = list(zones)
    vm = client.virtual_machines.begin_create_or_update(
        resource_group, name, models.VirtualMachine(body)
    ).result()
    return str(vm["id"])
