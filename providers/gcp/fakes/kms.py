"""A wire-level fake of Cloud KMS: a gRPC server on 127.0.0.1 speaking
``google.cloud.kms.v1.KeyManagementService`` with the request and response types' own
serializers, so that the unmodified ``KeyManagementServiceClient`` reaches it through
``KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(address))``.

What it does like Cloud KMS: key rings, symmetric ENCRYPT_DECRYPT keys (AES-256-GCM, the
additional authenticated data bound to the ciphertext, which names its version), ASYMMETRIC
DECRYPT keys (RSA_DECRYPT_OAEP_3072_SHA256: GetPublicKey with its PEM's CRC32C,
AsymmetricDecrypt), versions (create, make primary, disable, enable, destroy), the CRC32C
integrity fields checked on requests and filled in answers, and the status codes of the real
service: an unknown resource is NOT_FOUND, a ciphertext this key cannot open (another key's,
altered bytes, other additional data) INVALID_ARGUMENT, a version that is not ENABLED
FAILED_PRECONDITION, a name already taken ALREADY_EXISTS.

What it does not: IAM (every caller may do everything, unless a test calls
:meth:`KmsFake.restrict`), protection levels other than SOFTWARE, other algorithms, import
jobs, key rotation schedules, destruction after a delay (a destroyed version is
DESTROY_SCHEDULED and unusable at once, and cannot be restored). Material lives in memory.

Test hooks (not on the wire): :meth:`KmsFake.fail` answers the next calls of a method with a
status code, :meth:`KmsFake.corrupt` flips a bit of an answer's data without fixing its
CRC32C, :meth:`KmsFake.stall` delays answers, :meth:`KmsFake.restrict` refuses every method
but some with PERMISSION_DENIED, :attr:`KmsFake.requests` holds every request as received.

``python -m regionvault.providers.gcp.fakes.kms --port P`` serves one until SIGTERM or
SIGINT and prints its address (``127.0.0.1:P``) as its first line.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import google_crc32c
import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1 import types

__all__ = ["SERVICE", "KmsFake", "Recorded", "main"]

SERVICE = "google.cloud.kms.v1.KeyManagementService"

_Version = types.CryptoKeyVersion
_State = _Version.CryptoKeyVersionState
_Algorithm = _Version.CryptoKeyVersionAlgorithm
_Purpose = types.CryptoKey.CryptoKeyPurpose
_SOFTWARE = types.ProtectionLevel.SOFTWARE

_RING = re.compile(
    r"^projects/([a-z][a-z0-9-]{4,28}[a-z0-9])/locations/([a-z0-9-]+)/keyRings/[\w-]{1,63}$"
)
_ID = re.compile(r"^[\w-]{1,63}$")
_TAG = 16  # the version's id inside a symmetric ciphertext
_NONCE = 12
_LIMIT = 64 * 1024  # Cloud KMS's limit on plaintext and additional authenticated data
_RSA_BITS = 3072
#: Cloud KMS's default delay between DestroyCryptoKeyVersion and the material's destruction
_DESTROY_DELAY = timedelta(days=30)


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _not_found(name: str) -> _Refused:
    return _Refused(grpc.StatusCode.NOT_FOUND, f"{name} not found.")


@dataclass
class _KeyVersion:
    number: int
    algorithm: int
    state: int
    created: datetime
    #: the AES-256 key (symmetric) or the RSA private key; None once destroyed
    material: bytes | rsa.RSAPrivateKey | None
    tag: bytes = field(default_factory=lambda: os.urandom(_TAG))
    destroy_time: datetime | None = None
    #: answers to GetCryptoKeyVersion/GetPublicKey left before a pending version is ENABLED
    pending: int = 0


@dataclass
class _Key:
    name: str
    purpose: int
    algorithm: int
    created: datetime
    labels: dict[str, str]
    versions: list[_KeyVersion] = field(default_factory=list)
    primary: int | None = None

    def version_name(self, version: _KeyVersion) -> str:
        return f"{self.name}/cryptoKeyVersions/{version.number}"


@dataclass
class Recorded:
    """One call as the fake received it (the request already deserialized)."""

    method: str
    request: Any
    code: grpc.StatusCode = grpc.StatusCode.OK


@dataclass
class _Fault:
    method: str
    times: int
    code: grpc.StatusCode | None = None
    message: str = ""
    corrupt: bool = False
    stall: float = 0.0


class KmsFake:
    """One fake Cloud KMS (every project and location) on 127.0.0.1.

    ``pending_polls``: a new asymmetric version stays PENDING_GENERATION for that many
    GetCryptoKeyVersion or GetPublicKey calls on it, as real asymmetric versions are generated
    asynchronously (0: ENABLED at once).
    """

    def __init__(self, *, port: int = 0, pending_polls: int = 0, workers: int = 8) -> None:
        self._port = port
        self.pending_polls = pending_polls
        self._workers = workers
        self._lock = threading.Lock()
        self._rings: dict[str, datetime] = {}
        self._keys: dict[str, _Key] = {}
        self._faults: list[_Fault] = []
        self._allowed: frozenset[str] | None = None
        self._server: grpc.Server | None = None
        self._address: str | None = None
        #: every call received, in order
        self.requests: list[Recorded] = []

    # ------------------------------------------------------------------ life

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` (a ``kms_endpoint``)."""
        if self._address is None:
            raise RuntimeError("the KMS fake is not started")
        return self._address

    def start(self) -> str:
        if self._server is not None:
            return self.address
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="kms-fake"),
            # never share a port with another server (Linux allows it by default for gRPC)
            options=[("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((self._handler(),))
        port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        server.start()
        self._server = server
        self._address = f"127.0.0.1:{port}"
        return self._address

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(timeout=10)

    def __enter__(self) -> KmsFake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks

    def fail(
        self, method: str, code: grpc.StatusCode, *, times: int = 1, message: str = ""
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with ``code``."""
        with self._lock:
            self._faults.append(
                _Fault(method, times, code=code, message=message or f"injected {code.name}")
            )

    def corrupt(self, method: str, *, times: int = 1) -> None:
        """Flip one bit of the data the next ``times`` answers of ``method`` carry
        (ciphertext, plaintext or PEM), leaving their CRC32C as it was."""
        with self._lock:
            self._faults.append(_Fault(method, times, corrupt=True))

    def stall(self, method: str, seconds: float, *, times: int = 1) -> None:
        """Wait ``seconds`` before answering the next ``times`` calls of ``method``."""
        with self._lock:
            self._faults.append(_Fault(method, times, stall=seconds))

    def restrict(self, allowed: Iterable[str] | None) -> None:
        """Refuse every method but ``allowed`` with PERMISSION_DENIED (None: allow all)."""
        with self._lock:
            self._allowed = None if allowed is None else frozenset(allowed)

    def clear(self) -> None:
        """Drop the faults and the restriction (not the keys)."""
        with self._lock:
            self._faults.clear()
            self._allowed = None

    def methods(self) -> list[str]:
        """The methods called so far, in order."""
        with self._lock:
            return [r.method for r in self.requests]

    def versions(self, key: str) -> list[tuple[str, str]]:
        """``(version name, state name)`` of every version of the key named ``key``."""
        with self._lock:
            found = self._keys.get(key)
            if found is None:
                raise KeyError(key)
            return [(found.version_name(v), _State(v.state).name) for v in found.versions]

    # ------------------------------------------------------------------ plumbing

    def _handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Callable[[Any], Any], type[Any], type[Any]]] = {
            "GetKeyRing": (self._get_key_ring, types.GetKeyRingRequest, types.KeyRing),
            "CreateKeyRing": (self._create_key_ring, types.CreateKeyRingRequest, types.KeyRing),
            "GetCryptoKey": (self._get_crypto_key, types.GetCryptoKeyRequest, types.CryptoKey),
            "CreateCryptoKey": (
                self._create_crypto_key,
                types.CreateCryptoKeyRequest,
                types.CryptoKey,
            ),
            "GetCryptoKeyVersion": (
                self._get_version,
                types.GetCryptoKeyVersionRequest,
                types.CryptoKeyVersion,
            ),
            "ListCryptoKeyVersions": (
                self._list_versions,
                types.ListCryptoKeyVersionsRequest,
                types.ListCryptoKeyVersionsResponse,
            ),
            "CreateCryptoKeyVersion": (
                self._create_version,
                types.CreateCryptoKeyVersionRequest,
                types.CryptoKeyVersion,
            ),
            "UpdateCryptoKeyVersion": (
                self._update_version,
                types.UpdateCryptoKeyVersionRequest,
                types.CryptoKeyVersion,
            ),
            "UpdateCryptoKeyPrimaryVersion": (
                self._update_primary,
                types.UpdateCryptoKeyPrimaryVersionRequest,
                types.CryptoKey,
            ),
            "DestroyCryptoKeyVersion": (
                self._destroy_version,
                types.DestroyCryptoKeyVersionRequest,
                types.CryptoKeyVersion,
            ),
            "Encrypt": (self._encrypt, types.EncryptRequest, types.EncryptResponse),
            "Decrypt": (self._decrypt, types.DecryptRequest, types.DecryptResponse),
            "GetPublicKey": (self._get_public_key, types.GetPublicKeyRequest, types.PublicKey),
            "AsymmetricDecrypt": (
                self._asymmetric_decrypt,
                types.AsymmetricDecryptRequest,
                types.AsymmetricDecryptResponse,
            ),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._serve(name, method, response),
                request_deserializer=request.deserialize,
                response_serializer=response.serialize,
            )
            for name, (method, request, response) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _serve(
        self, name: str, method: Callable[[Any], Any], response_type: type[Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def serve(request: Any, context: grpc.ServicerContext) -> Any:
            recorded = Recorded(name, request)
            with self._lock:
                self.requests.append(recorded)
                fault = self._take_fault(name)
                allowed = self._allowed
            if fault is not None and fault.stall:
                time.sleep(fault.stall)
            try:
                if fault is not None and fault.code is not None:
                    raise _Refused(fault.code, fault.message)
                if allowed is not None and name not in allowed:
                    raise _Refused(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"Permission denied for {name} on resource "
                        f"'{getattr(request, 'name', '') or getattr(request, 'parent', '')}' "
                        "(or it may not exist).",
                    )
                with self._lock:
                    answer = method(request)
            except _Refused as refused:
                recorded.code = refused.code
                context.abort(refused.code, refused.message)
            if fault is not None and fault.corrupt:
                _flip(answer)
            return answer

        return serve

    def _take_fault(self, method: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method and fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------------ lookups

    def _key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise _not_found(name)
        return key

    def _version(self, name: str) -> tuple[_Key, _KeyVersion]:
        parent, sep, number = name.rpartition("/cryptoKeyVersions/")
        if not sep or not number.isdigit():
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name!r} is not a CryptoKeyVersion name."
            )
        key = self._key(parent)
        index = int(number) - 1
        if not 0 <= index < len(key.versions):
            raise _not_found(name)
        return key, key.versions[index]

    def _poll(self, version: _KeyVersion) -> None:
        if version.state == _State.PENDING_GENERATION:
            version.pending -= 1
            if version.pending <= 0:
                version.state = _State.ENABLED

    @staticmethod
    def _enabled(key: _Key, version: _KeyVersion) -> None:
        if version.state != _State.ENABLED or version.material is None:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.version_name(version)} is not enabled, current state is: "
                f"{_State(version.state).name}.",
            )

    @staticmethod
    def _purpose(key: _Key, purpose: int, method: str) -> None:
        if key.purpose != purpose:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.name} has purpose {_Purpose(key.purpose).name}; {method} needs "
                f"{_Purpose(purpose).name}.",
            )

    @staticmethod
    def _check_crc(request: Any, data_field: str, crc_field: str) -> bool:
        """INVALID_ARGUMENT when the request's CRC32C field does not match its data; True
        when the field was sent (the answer says it was verified)."""
        pb = type(request).pb(request)
        if not pb.HasField(crc_field):
            return False
        if getattr(request, crc_field) != crc32c(getattr(request, data_field)):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {crc_field} did not match the data in field {data_field}.",
            )
        return True

    def _version_message(self, key: _Key, version: _KeyVersion) -> types.CryptoKeyVersion:
        return types.CryptoKeyVersion(
            name=key.version_name(version),
            state=version.state,
            protection_level=_SOFTWARE,
            algorithm=version.algorithm,
            create_time=version.created,
            generate_time=version.created,
            destroy_time=version.destroy_time,
        )

    def _key_message(self, key: _Key) -> types.CryptoKey:
        message = types.CryptoKey(
            name=key.name,
            purpose=key.purpose,
            create_time=key.created,
            labels=key.labels,
            version_template=types.CryptoKeyVersionTemplate(
                protection_level=_SOFTWARE, algorithm=key.algorithm
            ),
            destroy_scheduled_duration=_DESTROY_DELAY,
        )
        if key.primary is not None:
            message.primary = self._version_message(key, key.versions[key.primary - 1])
        return message

    def _new_version(self, key: _Key) -> _KeyVersion:
        now = datetime.now(UTC)
        material: bytes | rsa.RSAPrivateKey
        if key.purpose == _Purpose.ENCRYPT_DECRYPT:
            material = AESGCM.generate_key(bit_length=256)
            state, pending = _State.ENABLED, 0
        else:
            material = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
            pending = self.pending_polls
            state = _State.PENDING_GENERATION if pending > 0 else _State.ENABLED
        version = _KeyVersion(
            len(key.versions) + 1, key.algorithm, state, now, material, pending=pending
        )
        key.versions.append(version)
        return version

    # ------------------------------------------------------------------ key rings and keys

    def _get_key_ring(self, request: types.GetKeyRingRequest) -> types.KeyRing:
        created = self._rings.get(request.name)
        if created is None:
            raise _not_found(request.name)
        return types.KeyRing(name=request.name, create_time=created)

    def _create_key_ring(self, request: types.CreateKeyRingRequest) -> types.KeyRing:
        name = f"{request.parent}/keyRings/{request.key_ring_id}"
        if not _RING.match(name):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{name!r} is not a KeyRing name.")
        if name in self._rings:
            raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
        self._rings[name] = datetime.now(UTC)
        return types.KeyRing(name=name, create_time=self._rings[name])

    def _get_crypto_key(self, request: types.GetCryptoKeyRequest) -> types.CryptoKey:
        return self._key_message(self._key(request.name))

    def _create_crypto_key(self, request: types.CreateCryptoKeyRequest) -> types.CryptoKey:
        if request.parent not in self._rings:
            raise _not_found(request.parent)
        if not _ID.match(request.crypto_key_id):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.crypto_key_id!r} is not a CryptoKey id.",
            )
        name = f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        if name in self._keys:
            raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        asked = request.crypto_key
        purpose = asked.purpose
        algorithm: int = asked.version_template.algorithm
        if purpose == _Purpose.ENCRYPT_DECRYPT:
            algorithm = algorithm or _Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
            supported = _Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
        elif purpose == _Purpose.ASYMMETRIC_DECRYPT:
            supported = _Algorithm.RSA_DECRYPT_OAEP_3072_SHA256
        else:
            raise _Refused(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the KMS fake makes ENCRYPT_DECRYPT and ASYMMETRIC_DECRYPT keys, not "
                f"{_Purpose(purpose).name}.",
            )
        if algorithm != supported:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the KMS fake supports {_Algorithm(supported).name} for "
                f"{_Purpose(purpose).name}, not {_Algorithm(algorithm).name}.",
            )
        level = asked.version_template.protection_level
        if level not in (types.ProtectionLevel.PROTECTION_LEVEL_UNSPECIFIED, _SOFTWARE):
            raise _Refused(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the KMS fake has no {types.ProtectionLevel(level).name} protection level.",
            )
        key = _Key(name, purpose, algorithm, datetime.now(UTC), dict(asked.labels))
        if not request.skip_initial_version_creation:
            self._new_version(key)
            if purpose == _Purpose.ENCRYPT_DECRYPT:
                key.primary = 1
        self._keys[name] = key
        return self._key_message(key)

    # ------------------------------------------------------------------ versions

    def _get_version(self, request: types.GetCryptoKeyVersionRequest) -> types.CryptoKeyVersion:
        key, version = self._version(request.name)
        self._poll(version)
        return self._version_message(key, version)

    def _list_versions(
        self, request: types.ListCryptoKeyVersionsRequest
    ) -> types.ListCryptoKeyVersionsResponse:
        key = self._key(request.parent)
        wanted: int | None = None
        if request.filter:
            match = re.fullmatch(r"\s*state\s*=\s*([A-Z_]+)\s*", request.filter)
            if match is None or match.group(1) not in _State.__members__:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the KMS fake filters on state=<STATE> only, not {request.filter!r}.",
                )
            wanted = int(getattr(_State, match.group(1)))
        versions = [v for v in key.versions if wanted is None or v.state == wanted]
        start = int(request.page_token) if request.page_token.isdigit() else 0
        size = request.page_size or 1000
        page = versions[start : start + size]
        token = str(start + size) if start + size < len(versions) else ""
        return types.ListCryptoKeyVersionsResponse(
            crypto_key_versions=[self._version_message(key, v) for v in page],
            next_page_token=token,
            total_size=len(versions),
        )

    def _create_version(
        self, request: types.CreateCryptoKeyVersionRequest
    ) -> types.CryptoKeyVersion:
        key = self._key(request.parent)
        version = self._new_version(key)
        return self._version_message(key, version)

    def _update_version(
        self, request: types.UpdateCryptoKeyVersionRequest
    ) -> types.CryptoKeyVersion:
        key, version = self._version(request.crypto_key_version.name)
        paths = list(request.update_mask.paths)
        if paths != ["state"]:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the KMS fake updates the state only, not {paths}.",
            )
        state = request.crypto_key_version.state
        if state not in (_State.ENABLED, _State.DISABLED) or version.state not in (
            _State.ENABLED,
            _State.DISABLED,
        ):
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.version_name(version)} cannot go from {_State(version.state).name} to "
                f"{_State(state).name}.",
            )
        version.state = state
        return self._version_message(key, version)

    def _update_primary(
        self, request: types.UpdateCryptoKeyPrimaryVersionRequest
    ) -> types.CryptoKey:
        key = self._key(request.name)
        self._purpose(key, _Purpose.ENCRYPT_DECRYPT, "UpdateCryptoKeyPrimaryVersion")
        if not request.crypto_key_version_id.isdigit():
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.crypto_key_version_id!r} is not a CryptoKeyVersion id.",
            )
        _key, version = self._version(
            f"{key.name}/cryptoKeyVersions/{request.crypto_key_version_id}"
        )
        self._enabled(key, version)
        key.primary = version.number
        return self._key_message(key)

    def _destroy_version(
        self, request: types.DestroyCryptoKeyVersionRequest
    ) -> types.CryptoKeyVersion:
        key, version = self._version(request.name)
        if version.state not in (_State.ENABLED, _State.DISABLED):
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.version_name(version)} cannot be destroyed in state "
                f"{_State(version.state).name}.",
            )
        version.state = _State.DESTROY_SCHEDULED
        version.destroy_time = datetime.now(UTC) + _DESTROY_DELAY
        version.material = None  # unusable at once; the fake cannot restore it
        return self._version_message(key, version)

    # ------------------------------------------------------------------ cryptography

    def _encrypt(self, request: types.EncryptRequest) -> types.EncryptResponse:
        if "/cryptoKeyVersions/" in request.name:
            key, version = self._version(request.name)
        else:
            key = self._key(request.name)
            self._purpose(key, _Purpose.ENCRYPT_DECRYPT, "Encrypt")
            if key.primary is None:
                raise _Refused(
                    grpc.StatusCode.FAILED_PRECONDITION, f"{key.name} has no primary version."
                )
            version = key.versions[key.primary - 1]
        self._purpose(key, _Purpose.ENCRYPT_DECRYPT, "Encrypt")
        self._enabled(key, version)
        if len(request.plaintext) > _LIMIT or len(request.additional_authenticated_data) > _LIMIT:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "The plaintext or additional authenticated data is too large.",
            )
        verified_plaintext = self._check_crc(request, "plaintext", "plaintext_crc32c")
        verified_aad = self._check_crc(
            request, "additional_authenticated_data", "additional_authenticated_data_crc32c"
        )
        assert isinstance(version.material, bytes)
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(version.material).encrypt(
            nonce, request.plaintext, version.tag + request.additional_authenticated_data
        )
        ciphertext = version.tag + nonce + sealed
        return types.EncryptResponse(
            name=key.version_name(version),
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext),
            verified_plaintext_crc32c=verified_plaintext,
            verified_additional_authenticated_data_crc32c=verified_aad,
            protection_level=_SOFTWARE,
        )

    def _decrypt(self, request: types.DecryptRequest) -> types.DecryptResponse:
        if "/cryptoKeyVersions/" in request.name:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Decrypt takes a CryptoKey name, not the version {request.name}.",
            )
        key = self._key(request.name)
        self._purpose(key, _Purpose.ENCRYPT_DECRYPT, "Decrypt")
        self._check_crc(request, "ciphertext", "ciphertext_crc32c")
        self._check_crc(
            request, "additional_authenticated_data", "additional_authenticated_data_crc32c"
        )
        invalid = _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
        )
        blob = request.ciphertext
        version = next((v for v in key.versions if blob[:_TAG] == v.tag), None)
        if version is None or len(blob) < _TAG + _NONCE + 16:
            raise invalid
        self._enabled(key, version)
        assert isinstance(version.material, bytes)
        try:
            plaintext = AESGCM(version.material).decrypt(
                blob[_TAG : _TAG + _NONCE],
                blob[_TAG + _NONCE :],
                version.tag + request.additional_authenticated_data,
            )
        except InvalidTag:
            raise invalid from None
        return types.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            used_primary=version.number == key.primary,
            protection_level=_SOFTWARE,
        )

    def _get_public_key(self, request: types.GetPublicKeyRequest) -> types.PublicKey:
        key, version = self._version(request.name)
        self._purpose(key, _Purpose.ASYMMETRIC_DECRYPT, "GetPublicKey")
        self._poll(version)
        self._enabled(key, version)
        assert isinstance(version.material, rsa.RSAPrivateKey)
        pem = (
            version.material.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )
        return types.PublicKey(
            name=key.version_name(version),
            pem=pem,
            pem_crc32c=crc32c(pem.encode("ascii")),
            algorithm=version.algorithm,
            protection_level=_SOFTWARE,
        )

    def _asymmetric_decrypt(
        self, request: types.AsymmetricDecryptRequest
    ) -> types.AsymmetricDecryptResponse:
        key, version = self._version(request.name)
        self._purpose(key, _Purpose.ASYMMETRIC_DECRYPT, "AsymmetricDecrypt")
        self._enabled(key, version)
        verified = self._check_crc(request, "ciphertext", "ciphertext_crc32c")
        assert isinstance(version.material, rsa.RSAPrivateKey)
        try:
            plaintext = version.material.decrypt(
                request.ciphertext,
                padding.OAEP(
                    mgf=padding.MGF1(algorithm=hashes.SHA256()),
                    algorithm=hashes.SHA256(),
                    label=None,
                ),
            )
        except ValueError:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
            ) from None
        return types.AsymmetricDecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext),
            verified_ciphertext_crc32c=verified,
            protection_level=_SOFTWARE,
        )


def _flip(answer: Any) -> None:
    """Flip the last bit of the data an answer carries, leaving its CRC32C."""
    for name in ("ciphertext", "plaintext"):
        if name in type(answer).meta.fields and getattr(answer, name):
            data = bytearray(getattr(answer, name))
            data[-1] ^= 1
            setattr(answer, name, bytes(data))
            return
    if isinstance(answer, types.PublicKey) and answer.pem:
        # a character inside the base64 body, so the PEM still parses as text
        pem = answer.pem
        at = pem.index("\n") + 5
        answer.pem = pem[:at] + ("A" if pem[at] != "A" else "B") + pem[at + 1 :]


def main(argv: list[str] | None = None) -> int:
    """Serve a KMS fake until SIGTERM or SIGINT; print its address as the first line."""
    parser = argparse.ArgumentParser(
        prog="python -m regionvault.providers.gcp.fakes.kms",
        description="A fake Cloud KMS (gRPC) on 127.0.0.1, for tests.",
    )
    parser.add_argument("--port", type=int, default=0, help="port (0: any free one)")
    parser.add_argument(
        "--pending-polls",
        type=int,
        default=0,
        help="polls a new asymmetric version stays PENDING_GENERATION",
    )
    args = parser.parse_args(argv)
    done = threading.Event()

    def finish(_signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    with KmsFake(port=args.port, pending_polls=args.pending_polls) as fake:
        print(fake.address, flush=True)
        while not done.wait(3600):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
