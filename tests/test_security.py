"""TLS, mutual TLS and authorization through real `vision serve` processes, real handshakes and the real CLI.

Certificates are made per session by trustme (a throwaway CA). Two servers: `tls` (server certificate only,
bearer tokens from a file) and `mtls` (client certificates required, an allow-list), each hosting
Classification and Jobs; the Jobs submissions are only queued (no worker here), which is all authorization
needs.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import trustme
from conftest import ServerProcess, classify_request, metric_value, scrape
from test_jobs_helpers import namespace, redis_url  # noqa: F401
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vision.client.channel import Endpoint, open_channel
from vision.core.errors import ConfigurationError
from vision.v1 import classification_pb2_grpc, jobs_pb2, jobs_pb2_grpc

OLD_TOKEN = "old-token-0123456789abcdef"
NEW_TOKEN = "new-token-fedcba9876543210"
COFFEE = 967


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(cert: trustme.LeafCert, folder: Path, stem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def replace(path: Path, data: bytes) -> None:
    """As cert-manager's kubelet update does: the new file appears whole, under the same name."""
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


class Certs:
    def __init__(self, ca: trustme.CA, root: Path) -> None:
        self.root = root
        self.ca_path = root / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.server_cert, self.server_key = write_pair(ca.issue_cert("localhost", "127.0.0.1"), root, "server")
        self.submitter = write_pair(ca.issue_cert("submitter", common_name="submitter"), root, "submitter")
        self.reader = write_pair(ca.issue_cert("reader", common_name="reader"), root, "reader")
        stranger_ca = trustme.CA()
        self.stranger_ca_path = root / "stranger-ca.pem"
        stranger_ca.cert_pem.write_to_path(str(self.stranger_ca_path))
        self.stranger = write_pair(stranger_ca.issue_cert("submitter", common_name="submitter"), root, "stranger")

    def endpoint(self, address: str, *, client: tuple[Path, Path] | None = None, token: str | None = None,
                 ca: Path | None = None) -> Endpoint:
        cert, key = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
        return Endpoint(address, (ca or self.ca_path).read_bytes(), cert, key, True, "localhost", token)


@pytest.fixture(scope="module")
def certs(ca, tmp_path_factory) -> Certs:
    return Certs(ca, tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# who holds it, then the token\nci-bot {OLD_TOKEN}\n")
    return path


def _serve(args: list[str], log: Path, namespace: str) -> ServerProcess:
    proc = ServerProcess(
        ["--services", "classification,jobs", "--jobs-namespace", namespace, "--model", "efficientnet_lite0",
         "--log-level", "INFO", *args],
        log,
    )
    return proc.wait_ready()


@pytest.fixture(scope="module")
def tls_server(certs, tokens, namespace, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("tls-server")
    # The server reads its own copies, so the rotation test can replace them.
    cert, key = root / "tls.crt", root / "tls.key"
    cert.write_bytes(certs.server_cert.read_bytes())
    key.write_bytes(certs.server_key.read_bytes())
    proc = _serve(["--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens),
                   "--health-port", "0"], root / "serve.log", namespace)
    proc.cert, proc.key = cert, key  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mtls_server(certs, namespace, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("mtls-server")
    proc = _serve(["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                   "--tls-client-ca", str(certs.ca_path), "--auth-allow", "submitter,someone-else"],
                  root / "serve.log", namespace)
    yield proc
    proc.stop()


def classify(target: Endpoint | str, image: bytes) -> int:
    with open_channel(target) as channel:
        reply = classification_pb2_grpc.ClassificationStub(channel).Classify(classify_request(image, top_k=1), timeout=30)
    return reply.results[0].predictions[0].index


def submit(target: Endpoint | str, out: Path) -> jobs_pb2.SubmitJobResponse:
    with open_channel(target) as channel:
        return jobs_pb2_grpc.JobsStub(channel).SubmitDownload(
            jobs_pb2.SubmitDownloadRequest(urls=b"http://127.0.0.1:9/a.jpg\n", out_dir=str(out)), timeout=30
        )


def rpc_error(fn, *args) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------


def test_a_tls_port_refuses_plaintext_and_a_client_trusting_another_ca(tls_server, certs, photos):
    err = rpc_error(classify, tls_server.address, photos["coffee.jpg"])
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    err = rpc_error(classify, certs.endpoint(tls_server.address, ca=certs.stranger_ca_path), photos["coffee.jpg"])
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # The right CA: the embedded default answers, and the server kept serving after the failed handshakes.
    assert classify(certs.endpoint(tls_server.address), photos["coffee.jpg"]) == COFFEE


def test_the_health_port_is_plaintext_and_serves_health_only(tls_server, photos):
    health = re.search(r"plaintext health on (\S+)", tls_server.announced)
    assert health, "the server did not announce its health port"
    with grpc.insecure_channel(health.group(1)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vision.v1.Jobs"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        err = rpc_error(
            classification_pb2_grpc.ClassificationStub(channel).Classify, classify_request(photos["coffee.jpg"]))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_a_strangers(mtls_server, certs, photos):
    for endpoint in (certs.endpoint(mtls_server.address), certs.endpoint(mtls_server.address, client=certs.stranger)):
        err = rpc_error(classify, endpoint, photos["coffee.jpg"])
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert classify(certs.endpoint(mtls_server.address, client=certs.reader), photos["coffee.jpg"]) == COFFEE


# --------------------------------------------------------------------------------------
# Authorization
# --------------------------------------------------------------------------------------


def test_a_certificate_off_the_allow_list_reads_but_may_not_submit(mtls_server, certs, photos, tmp_path):
    reader = certs.endpoint(mtls_server.address, client=certs.reader)
    assert classify(reader, photos["coffee.jpg"]) == COFFEE
    err = rpc_error(submit, reader, tmp_path)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'reader'" in err.details()
    job = submit(certs.endpoint(mtls_server.address, client=certs.submitter), tmp_path).job
    assert job.id and job.state == jobs_pb2.JOB_STATE_QUEUED
    # Reading a job is open to the reader; cancelling it is not.
    with open_channel(reader) as channel:
        jobs = jobs_pb2_grpc.JobsStub(channel)
        assert jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id), timeout=10).id == job.id
        err = rpc_error(jobs.CancelJob, jobs_pb2.CancelJobRequest(id=job.id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    text = scrape(mtls_server.metrics_url)
    assert metric_value(text, "vision_auth_refusals_total", service="vision.v1.Jobs", method="SubmitDownload",
                        reason="not_allowed") == 1
    assert re.search(rf"vision\.audit: identity=submitter via=certificate rpc=/vision\.v1\.Jobs/SubmitDownload "
                     rf"job={job.id} .*outcome=OK", mtls_server.log())


def test_a_bearer_token_is_needed_to_submit_and_cancel(tls_server, certs, photos, tmp_path):
    anonymous = certs.endpoint(tls_server.address)
    err = rpc_error(submit, anonymous, tmp_path)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.details()
    wrong = certs.endpoint(tls_server.address, token="not-a-token-but-long-enough")
    err = rpc_error(submit, wrong, tmp_path)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "the bearer token is not valid"
    assert OLD_TOKEN not in err.details() and "ci-bot" not in err.details()
    job = submit(certs.endpoint(tls_server.address, token=OLD_TOKEN), tmp_path).job
    with open_channel(anonymous) as channel:
        err = rpc_error(jobs_pb2_grpc.JobsStub(channel).CancelJob, jobs_pb2.CancelJobRequest(id=job.id))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(certs.endpoint(tls_server.address, token=OLD_TOKEN)) as channel:
        cancelled = jobs_pb2_grpc.JobsStub(channel).CancelJob(jobs_pb2.CancelJobRequest(id=job.id), timeout=10)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    # Read-only RPCs need no token, and the refusals left the server serving.
    assert classify(anonymous, photos["coffee.jpg"]) == COFFEE
    text = scrape(tls_server.metrics_url)
    refusals = {r: metric_value(text, "vision_auth_refusals_total", service="vision.v1.Jobs", method=m, reason=r)
                for m, r in (("SubmitDownload", "no_credentials"), ("SubmitDownload", "invalid_token"))}
    assert refusals == {"no_credentials": 1, "invalid_token": 1}
    assert metric_value(text, "vision_requests_total", service="vision.v1.Jobs", method="CancelJob",
                        code="UNAUTHENTICATED") == 1
    log = tls_server.log()
    assert f"identity=ci-bot via=token rpc=/vision.v1.Jobs/SubmitDownload job={job.id}" in log
    assert f"identity=ci-bot via=token rpc=/vision.v1.Jobs/CancelJob job={job.id}" in log
    assert OLD_TOKEN not in log


def test_tokens_rotate_without_a_restart(tls_server, certs, tokens, tmp_path):
    old, new = (certs.endpoint(tls_server.address, token=t) for t in (OLD_TOKEN, NEW_TOKEN))
    original = tokens.read_text()
    try:
        replace(tokens, f"ci-bot {OLD_TOKEN}\nci-bot-2 {NEW_TOKEN}\n".encode())
        assert submit(old, tmp_path).job.id and submit(new, tmp_path).job.id
        replace(tokens, f"ci-bot-2 {NEW_TOKEN}\n".encode())
        assert submit(new, tmp_path).job.id
        assert rpc_error(submit, old, tmp_path).code() == grpc.StatusCode.UNAUTHENTICATED
        # A rotation that leaves no valid token (an empty file) is refused: the tokens before stay in force.
        replace(tokens, b"")
        assert submit(new, tmp_path).job.id
        assert "stay in force" in tls_server.log()
    finally:
        replace(tokens, original.encode())


# --------------------------------------------------------------------------------------
# Certificate rotation under load
# --------------------------------------------------------------------------------------


def presented_serial(address: str, ca: Path) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_certificates_rotate_under_load_with_no_failed_request(tls_server, certs, ca, photos):
    before = presented_serial(tls_server.address, certs.ca_path)
    fresh = ca.issue_cert("localhost", "127.0.0.1")
    from cryptography import x509

    fresh_serial = x509.load_pem_x509_certificate(fresh.cert_chain_pems[0].bytes()).serial_number
    assert fresh_serial != before
    stop, answers, failures = threading.Event(), [], []

    def client() -> None:
        # Each client opens new connections as it goes, so handshakes happen across the rotation.
        while not stop.is_set():
            try:
                answers.append(classify(certs.endpoint(tls_server.address), photos["coffee.jpg"]))
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 8:
            time.sleep(0.05)
        # Half a rotation first: a new certificate beside the old key. Handshakes go on with the old pair.
        replace(tls_server.cert, fresh.cert_chain_pems[0].bytes())
        counted = len(answers)
        while len(answers) < counted + 8:
            time.sleep(0.05)
        assert presented_serial(tls_server.address, certs.ca_path) == before
        replace(tls_server.key, fresh.private_key_pem.bytes())
        counted = len(answers)
        while len(answers) < counted + 8:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert set(answers) == {COFFEE}
    assert presented_serial(tls_server.address, certs.ca_path) == fresh_serial
    assert "do not load yet" in tls_server.log() and "re-read" in tls_server.log()


# --------------------------------------------------------------------------------------
# The CLI, start-up refusals, the client's own refusals
# --------------------------------------------------------------------------------------


def vision(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=120)


def test_the_cli_speaks_tls_and_sends_its_token(tls_server, certs, tokens, photos, tmp_path):
    image = tmp_path / "coffee.jpg"
    image.write_bytes(photos["coffee.jpg"])
    tls = ["--target", tls_server.address, "--tls-ca", str(certs.ca_path), "--tls-server-name", "localhost"]
    done = vision("classify", *tls, "--top-k", "1", "--json", str(image))
    assert done.returncode == 0, done.stderr
    assert '"index": 967' in done.stdout
    done = vision("jobs", *tls, "submit-download", "--urls-path", "/nonexistent/urls.txt", "--out", str(tmp_path))
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr
    done = vision("jobs", *tls, "--token-file", str(tokens), "submit-download", "--urls-path", "/nonexistent/urls.txt",
                  "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    done = vision("classify", "--target", tls_server.address, "--tls-ca", str(tmp_path / "missing.pem"), str(image))
    assert done.returncode == 2 and "cannot read CA" in done.stderr and "Traceback" not in done.stderr


def test_a_job_api_off_loopback_without_authorization_does_not_start(tmp_path, redis_url):  # noqa: F811
    done = vision("serve", "--services", "jobs", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0",
                  "--redis-url", redis_url)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--auth-tokens" in done.stderr and "--auth-open" in done.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tls-cert", "/x.crt"], "tls_cert and tls_key go together"),
        (["--tls-client-ca", "/ca.pem"], "needs tls_cert"),
        (["--auth-allow", "someone"], "set tls_client_ca"),
    ],
)
def test_security_flags_that_do_not_fit_together_are_refused(args, fragment):
    done = vision("serve", "--port", "0", *args)
    assert done.returncode == 2 and fragment in done.stderr


def test_unreadable_certificates_stop_start_up_with_one_line(tmp_path, certs):
    done = vision("serve", "--port", "0", "--metrics-port", "0", "--tls-cert", str(certs.server_cert),
                  "--tls-key", str(certs.reader[1]))
    assert done.returncode == 1 and "TLS certificate" in done.stderr and "Traceback" not in done.stderr


def test_a_token_travels_in_plaintext_to_loopback_only(tokens, namespace, tmp_path):  # noqa: F811
    server = ServerProcess(["--services", "jobs", "--jobs-namespace", namespace, "--auth-tokens", str(tokens)],
                           tmp_path / "serve.log").wait_ready()
    try:
        assert rpc_error(submit, server.address, tmp_path).code() == grpc.StatusCode.UNAUTHENTICATED
        assert submit(Endpoint(server.address, token=OLD_TOKEN), tmp_path).job.id
    finally:
        server.stop()
    # To another host the client refuses before sending anything.
    with pytest.raises(ConfigurationError, match="plaintext"):
        open_channel(Endpoint("192.0.2.1:50051", token=OLD_TOKEN))



def test_the_documented_certificates_and_commands_work(namespace, tmp_path):  # noqa: F811
    """docs/security.md's OpenSSL block, run verbatim, makes certificates a real server accepts; its grpcurl
    lines, with the address of that server, list, check health and reach CancelJob with the token (NOT_FOUND:
    past authorization) and without it (UNAUTHENTICATED)."""
    from chart_tools import ROOT, tool
    from test_grpcurl import ADDRESS, documented_commands, shell_blocks

    (block,) = [b for b in shell_blocks((ROOT / "docs" / "security.md").read_text()) if b.lstrip().startswith("mkdir -p tls")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grpcurl").symlink_to(tool("grpcurl"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=env, check=True, timeout=120, capture_output=True)
    tls = tmp_path / "tls"
    server = ServerProcess(
        ["--services", "jobs", "--jobs-namespace", namespace, "--tls-cert", str(tls / "server.crt"),
         "--tls-key", str(tls / "server.key"), "--auth-tokens", str(tls / "tokens")],
        tmp_path / "serve.log",
    ).wait_ready()
    try:
        commands = documented_commands(tls=True)
        assert len(commands) >= 3, commands

        def run(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["bash", "-c", ADDRESS.sub(server.address, command)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60)

        for command in commands:
            done = run(command)
            if command.endswith(" list"):
                assert done.returncode == 0 and "vision.v1.Jobs" in done.stdout, done.stderr
            elif "Health/Check" in command:
                assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
            elif command.endswith("/CancelJob"):
                assert "NotFound" in done.stderr, done.stderr
                anonymous = run(re.sub(r'-H "authorization: [^"]*" ', "", command))
                assert "Unauthenticated" in anonymous.stderr, anonymous.stderr
            else:
                raise AssertionError(f"no check for {command}")
    finally:
        server.stop()
