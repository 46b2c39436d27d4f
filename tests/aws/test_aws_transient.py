"""Transient AWS failures: the real boto3 client, over a real HTTP connection to a small
server on 127.0.0.1 that answers as S3, KMS and EC2 do when they throttle, fail (5xx) or do
not answer, meets :class:`TransientError`; what is not transient keeps its own error; and the
executor retries a job that met one, with backoff, until it succeeds or its attempts run out.

botocore's own retries are set low (``sdk_retries = 0``), so each case costs a request or
two, not botocore's back-off.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aws_world import EAST, AwsWorld
from regionvault.core.errors import (
    KeyAccessDenied,
    KeyServiceError,
    RegionVaultError,
    TransientError,
    VaultError,
)
from regionvault.core.pipeline.executor import RetryPolicy, execute_job
from regionvault.core.pipeline.jobs import Job, JobHandlers, JobStatus
from regionvault.core.pipeline.ledger import JobLedger
from regionvault.providers.aws.testing import DUMMY_CREDENTIALS, free_port

pytest.importorskip("boto3", reason="the AWS tests need boto3: pip install -e '.[test]'")

BUCKET = "rv-transient"
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    target: str  # x-amz-target (KMS), '' for S3 and EC2


def s3_error(status: int, code: str, message: str) -> Reply:
    body = (
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>r1</RequestId></Error>"
    )
    return Reply(status, body.encode(), {"Content-Type": "application/xml"})


def s3_versioning() -> Reply:
    return Reply(
        200,
        f'<VersioningConfiguration xmlns="{S3_NS}"/>'.encode(),
        {"Content-Type": "application/xml"},
    )


def kms_error(status: int, code: str, message: str) -> Reply:
    body = f'{{"__type":"{code}","message":"{message}"}}'.encode()
    return Reply(status, body, {"Content-Type": "application/x-amz-json-1.1"})


def ec2_error(status: int, code: str, message: str) -> Reply:
    body = (
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        "</Errors><RequestID>r1</RequestID></Response>"
    )
    return Reply(status, body.encode(), {"Content-Type": "text/xml"})


class FakeAws:
    """An HTTP server on 127.0.0.1: every request is recorded and answered by ``answer``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answer: Callable[[Request], Reply] = lambda request: Reply(500)
        self.stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                request = Request(self.command, self.path, self.headers.get("X-Amz-Target", ""))
                fake.requests.append(request)
                reply = fake.answer(request)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and left: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()  # releases a handler that is holding back its answer
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAws]:
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    fake = FakeAws()
    try:
        yield fake
    finally:
        fake.close()


def world(endpoint: str, tmp_path: Path, **settings: Any) -> tuple[AwsWorld, Any]:
    """A region ``aws:us-east-1`` pointing at ``endpoint``: nothing created, one try per call
    unless ``settings`` say otherwise."""
    aws = AwsWorld(endpoint, tmp_path)
    region = aws.region(
        EAST,
        bucket=BUCKET,
        kms_key="alias/rv-transient",
        create=None,
        object_lock=None,
        **{"sdk_retries": 0, **settings},
    )
    return aws, region


def s3_answer(object_reply: Callable[[], Reply]) -> Callable[[Request], Reply]:
    """S3: the bucket is there (versioning off); object requests get ``object_reply()``."""

    def answer(request: Request) -> Reply:
        if request.path.endswith("?versioning"):
            return s3_versioning()
        return object_reply()

    return answer


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            s3_error(503, "SlowDown", "Please reduce your request rate."), id="503-SlowDown"
        ),
        pytest.param(s3_error(500, "InternalError", "We encountered an internal error."), id="500"),
        pytest.param(s3_error(429, "TooManyRequests", "Too many requests."), id="429"),
        pytest.param(Reply(502), id="502-no-body"),
        pytest.param(Reply(504), id="504-no-body"),
        pytest.param(
            s3_error(409, "OperationAborted", "A conflicting conditional operation is ..."),
            id="409-OperationAborted",
        ),
    ],
)
def test_s3_throttling_and_5xx_are_transient(
    fake_aws: FakeAws, tmp_path: Path, reply: Reply
) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    fake_aws.answer = s3_answer(lambda: reply)
    with pytest.raises(TransientError) as raised:
        vault.get("packs/ab/cd")
    error = raised.value
    assert not isinstance(error, VaultError)  # the one class, not a vault failure to report
    assert error.provider == "aws" and error.region == f"aws:{EAST}"
    assert f"cannot get 'packs/ab/cd' in bucket '{BUCKET}'" in str(error)
    assert [r.method for r in fake_aws.requests] == ["GET", "GET"]  # versioning, the object


def test_botocore_retries_first_as_often_as_set(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path, sdk_retries=1)
    vault = aws.track(aws.provider.vault(region))
    fake_aws.answer = s3_answer(
        lambda: s3_error(503, "SlowDown", "Please reduce your request rate.")
    )
    with pytest.raises(TransientError, match="SlowDown"):
        vault.put("index/ab", b"sealed bytes")
    puts = [r for r in fake_aws.requests if r.method == "PUT"]
    assert len(puts) == 2  # botocore's try and its one retry, then the TransientError


def test_a_retry_after_header_is_kept(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    slow = s3_error(503, "SlowDown", "Please reduce your request rate.")
    slow.headers["Retry-After"] = "7"
    fake_aws.answer = s3_answer(lambda: slow)
    with pytest.raises(TransientError) as raised:
        vault.get("config")
    assert raised.value.retry_after == 7.0


def test_kms_throttling_is_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    keys = aws.track(aws.provider.key_service(region))
    fake_aws.answer = lambda request: kms_error(400, "ThrottlingException", "Rate exceeded")
    with pytest.raises(TransientError, match="ThrottlingException: Rate exceeded"):
        keys.key_id  # noqa: B018 - DescribeKey
    assert fake_aws.requests[0].target == "TrentService.DescribeKey"


def test_kms_denial_is_not_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    keys = aws.track(aws.provider.key_service(region))
    fake_aws.answer = lambda request: kms_error(400, "AccessDeniedException", "not allowed")
    with pytest.raises(KeyAccessDenied) as raised:
        keys.key_id  # noqa: B018
    assert not isinstance(raised.value, TransientError)


def test_ec2_request_limit_is_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    compute = aws.track(aws.provider.compute(region))
    fake_aws.answer = lambda request: ec2_error(
        503, "RequestLimitExceeded", "Request limit exceeded."
    )
    with pytest.raises(TransientError, match="cannot list instances: RequestLimitExceeded"):
        compute.list_instances_page()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(s3_error(403, "AccessDenied", "Access Denied"), VaultError, id="403"),
        pytest.param(s3_error(400, "InvalidArgument", "bad"), VaultError, id="400"),
        # what an S3-compatible endpoint answers for a feature it lacks: waiting never helps
        pytest.param(
            s3_error(501, "NotImplemented", "A header you provided implies functionality ..."),
            VaultError,
            id="501",
        ),
        pytest.param(Reply(501), VaultError, id="501-no-body"),
        pytest.param(Reply(505), VaultError, id="505-no-body"),
    ],
)
def test_s3_refusals_are_not_transient(
    fake_aws: FakeAws, tmp_path: Path, reply: Reply, expected: type[RegionVaultError]
) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    fake_aws.answer = s3_answer(lambda: reply)
    with pytest.raises(expected) as raised:
        vault.get("config")
    assert not isinstance(raised.value, TransientError)


def test_a_kms_quota_is_not_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    # KMS's LimitExceededException is a resource quota (keys, aliases, grants), which
    # waiting does not clear; its throttling is ThrottlingException
    aws, region = world(fake_aws.endpoint, tmp_path)
    keys = aws.track(aws.provider.key_service(region))
    fake_aws.answer = lambda request: kms_error(400, "LimitExceededException", "too many aliases")
    with pytest.raises(KeyServiceError, match="LimitExceededException") as raised:
        keys.key_id  # noqa: B018
    assert not isinstance(raised.value, TransientError)


@pytest.mark.parametrize(
    "code",
    [
        # botocore's standard retry mode throttles on it for every service but KMS's quota
        "LimitExceededException",
        # CreateSnapshot of one volume asked for too fast
        "SnapshotCreationPerVolumeRateExceeded",
    ],
)
def test_ec2_rate_limits_are_transient(fake_aws: FakeAws, tmp_path: Path, code: str) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    compute = aws.track(aws.provider.compute(region))
    fake_aws.answer = lambda request: ec2_error(400, code, "slow down")
    with pytest.raises(TransientError, match=f"cannot list instances: {code}"):
        compute.list_instances_page()


def test_a_read_timeout_is_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path, read_timeout=1)
    compute = aws.track(aws.provider.compute(region))

    def silent(request: Request) -> Reply:
        fake_aws.stop.wait(30)  # answers only when the test ends, long after the timeout
        return ec2_error(500, "InternalError", "late")

    fake_aws.answer = silent
    with pytest.raises(TransientError, match="ReadTimeoutError"):
        compute.list_instances_page()


def test_no_listener_is_transient(fake_aws: FakeAws, tmp_path: Path) -> None:
    # a port on 127.0.0.1 that nothing listens on: the connection is refused
    aws, region = world(f"http://127.0.0.1:{free_port()}", tmp_path, connect_timeout=2)
    vault = aws.track(aws.provider.vault(region))
    with pytest.raises(TransientError, match="EndpointConnectionError"):
        vault.get("config")


def test_a_host_name_that_does_not_resolve_is_not_transient(
    fake_aws: FakeAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a mistyped region or endpoint: configuration, which waiting does not mend (and
    # botocore has retried it already); no DNS query leaves this machine
    host = "rv-nowhere.invalid"
    real = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == host:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    aws, region = world(f"http://{host}:9", tmp_path, connect_timeout=2)
    vault = aws.track(aws.provider.vault(region))
    with pytest.raises(VaultError, match="EndpointConnectionError") as raised:
        vault.get("config")
    assert not isinstance(raised.value, TransientError)


def test_a_resolver_that_does_not_answer_is_transient(
    fake_aws: FakeAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EAI_AGAIN: the resolver is down or unreachable for a moment (a restart outlasts
    # botocore's second of retries); unlike a name with no address, it may pass
    host = "rv-resolver-down.invalid"
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == host:
            asked.append(name)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    aws, region = world(f"http://{host}:9", tmp_path, connect_timeout=2)
    vault = aws.track(aws.provider.vault(region))
    with pytest.raises(TransientError, match="EndpointConnectionError"):
        vault.get("config")
    assert asked  # the failure came from the resolver, not from elsewhere


@pytest.mark.parametrize(
    ("errno", "transient"),
    [
        (socket.EAI_NONAME, False),
        (getattr(socket, "EAI_NODATA", socket.EAI_NONAME), False),
        (socket.EAI_AGAIN, True),
        (socket.EAI_FAIL, True),
    ],
)
def test_a_resolution_failure_is_classed_by_its_errno(errno: int, transient: bool) -> None:
    # as botocore and urllib3 wrap it: EndpointConnectionError(error=NameResolutionError)
    # whose reason (and cause) is the gaierror
    from botocore.exceptions import EndpointConnectionError
    from regionvault.providers.aws.errors import is_transient
    from urllib3.exceptions import NameResolutionError

    gai = socket.gaierror(errno, "resolver said so")
    try:
        raise NameResolutionError("rv.invalid", None, gai) from gai  # type: ignore[arg-type]
    except NameResolutionError as resolution:
        wrapped = EndpointConnectionError(endpoint_url="http://rv.invalid", error=resolution)
    assert is_transient(wrapped, service="s3") is transient


def test_key_service_errors_keep_their_class_when_not_transient(
    fake_aws: FakeAws, tmp_path: Path
) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    keys = aws.track(aws.provider.key_service(region))
    fake_aws.answer = lambda request: kms_error(400, "ValidationException", "bad request")
    with pytest.raises(KeyServiceError) as raised:
        keys.key_id  # noqa: B018
    assert not isinstance(raised.value, TransientError | KeyAccessDenied)


# --------------------------------------------------------------------------- the executor


def vault_job(vault: Any) -> tuple[Job, JobHandlers]:
    def read_config(job: Job) -> str:
        return bytes(vault.get("config")).decode()

    return Job("verify/aws:us-east-1/config", "verify", f"aws:{EAST}"), JobHandlers(
        {"verify": read_config}
    )


def test_the_executor_retries_a_throttled_job_until_it_succeeds(
    fake_aws: FakeAws, tmp_path: Path
) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    answers = iter([s3_error(503, "SlowDown", "Please reduce your request rate.")] * 2)
    fake_aws.answer = s3_answer(lambda: next(answers, Reply(200, b"repository config")))
    waits: list[float] = []
    job, handlers = vault_job(vault)
    ledger = JobLedger(tmp_path / "state")

    outcome = execute_job(
        job,
        handlers,
        ledger,
        retry=RetryPolicy(first_delay=2.0, sleep=waits.append, jitter=lambda: 1.0),
    )
    assert outcome.status is JobStatus.DONE, outcome.error
    assert outcome.result == "repository config"
    assert outcome.attempts == 3
    assert waits == [2.0, 4.0]  # exponential; full delay with the jitter drawn at 1.0
    recorded = ledger.record(job.key)
    assert recorded is not None and recorded.attempts == 3
    assert ledger.last_failure(job.key) is None


def test_a_job_still_throttled_after_its_attempts_fails_once(
    fake_aws: FakeAws, tmp_path: Path
) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    fake_aws.answer = s3_answer(
        lambda: s3_error(503, "SlowDown", "Please reduce your request rate.")
    )
    waits: list[float] = []
    job, handlers = vault_job(vault)
    ledger = JobLedger(tmp_path / "state")

    outcome = execute_job(job, handlers, ledger, retry=RetryPolicy(attempts=3, sleep=waits.append))
    assert outcome.status is JobStatus.FAILED
    assert outcome.attempts == 3 and len(waits) == 2
    assert outcome.error is not None and outcome.error.startswith("TransientError: [aws:us-east-1]")
    assert "SlowDown" in outcome.error
    assert ledger.record(job.key) is None  # not done: the next run tries again
    failure = ledger.last_failure(job.key)
    assert failure is not None and failure.attempts == 3
    object_gets = [r for r in fake_aws.requests if r.method == "GET" and "versioning" not in r.path]
    assert len(object_gets) == 3


def test_an_access_denied_job_is_not_retried(fake_aws: FakeAws, tmp_path: Path) -> None:
    aws, region = world(fake_aws.endpoint, tmp_path)
    vault = aws.track(aws.provider.vault(region))
    fake_aws.answer = s3_answer(lambda: s3_error(403, "AccessDenied", "Access Denied"))
    waits: list[float] = []
    job, handlers = vault_job(vault)

    outcome = execute_job(
        job, handlers, JobLedger(tmp_path / "state"), retry=RetryPolicy(sleep=waits.append)
    )
    assert outcome.status is JobStatus.FAILED and outcome.attempts == 1
    assert outcome.error is not None and outcome.error.startswith("VaultError:")
    assert waits == []


def test_every_code_botocore_calls_throttling_is_transient() -> None:
    from botocore.retries.standard import ThrottledRetryableChecker
    from regionvault.providers.aws.errors import THROTTLING_CODES

    botocore_codes = set(getattr(ThrottledRetryableChecker, "_THROTTLED_ERROR_CODES", []))
    assert botocore_codes, "botocore no longer lists its throttling codes there"
    assert botocore_codes <= THROTTLING_CODES
