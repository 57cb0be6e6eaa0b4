"""The download job against a local HTTP server with hostile cases, through the Jobs service and real
Celery workers on a real Redis: exact outputs, SSRF refusal, kills mid-job, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import metric_value, scrape
from test_jobs_helpers import (  # noqa: F401 - fixtures
    Site,
    Worker,
    jobs_server,
    namespace,
    png,
    redirect,
    redis_url,
    run_cli,
    stub,
    wait_job,
)
from training.shapes import generate
from vision.jobs.download import parse_url_list, validate
from vision.jobs.fetch import FetchError, FetchPolicy, fetch, parse_allow, refusal
from vision.v1 import jobs_pb2

LOOPBACK = "127.0.0.0/8"
REFUSED = (
    "; private, loopback and link-local addresses are not fetched (the worker's operator can allow them: "
    "vision worker --allow-private-addresses)"
)


def sha_name(data: bytes, ext: str = "png") -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"images/{digest[:2]}/{digest}.{ext}"


# -- in-process: the building blocks -------------------------------------------------------------------


def test_refused_addresses_and_the_operator_allowlist():
    for address, kind in [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-global"),
    ]:
        assert refusal(address, ()) is not None and kind in refusal(address, ()), address
    assert refusal("8.8.8.8", ()) is None and refusal("2606:4700::1111", ()) is None
    assert refusal("127.0.0.9", parse_allow(LOOPBACK)) is None
    assert refusal("10.0.0.1", parse_allow(LOOPBACK)) == "10.0.0.1, a private address"
    assert (
        parse_allow("1") == "all"
        and parse_allow("") == ()
        and refusal("10.0.0.1", parse_allow("all")) is None
    )
    with pytest.raises(ValueError):
        parse_allow("not-a-network")


def test_url_list_format():
    entries, rejects = parse_url_list(
        "# comment\n\nhttp://a/1.jpg\t3:1 5:0.8\nhttp://a/2.jpg\nhttp://a/3.jpg  7 2:1\nhttp://a/4.jpg\tx:1\n"
    )
    assert [(e.line, e.url, e.labels) for e in entries] == [
        (3, "http://a/1.jpg", "3:1 5:0.8"),
        (4, "http://a/2.jpg", ""),
        (5, "http://a/3.jpg", "7 2:1"),
    ]
    assert rejects == [(6, "http://a/4.jpg", "bad label 'x:1' (expected idx or idx:confidence)")]


def test_decimal_and_hex_spellings_of_loopback_are_refused_before_any_connection():
    site = Site()
    try:
        site.files["/a.png"] = (png(Image.new("RGB", (16, 16))), "image/png")
        for host in ("127.0.0.1", "2130706433", "0x7f.0.0.1", "127.1"):
            with pytest.raises(FetchError) as info:
                fetch(f"http://{host}:{site.port}/a.png", FetchPolicy())
            assert info.value.reason == f"refused: {host} resolves to 127.0.0.1, a loopback address" + REFUSED
        assert site.hits == {}
        assert (
            fetch(site.url("/a.png"), FetchPolicy(allow_private=parse_allow(LOOPBACK))).data
            == site.files["/a.png"][0]
        )
    finally:
        site.close()


def test_validation_decodes_fully_and_converts_to_rgb():
    rgba = Image.new("RGBA", (20, 12), (255, 0, 0, 128))
    data, ext, width, height = validate(png(rgba), 1 << 20, 10**6)
    assert (ext, width, height) == ("png", 20, 12) and Image.open(io.BytesIO(data)).mode == "RGB"
    rgb = png(Image.new("RGB", (20, 12), (0, 255, 0)))
    assert validate(rgb, 1 << 20, 10**6)[0] == rgb  # already RGB: kept byte for byte
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    with pytest.raises(FetchError, match="^undecodable JPEG: corrupt or truncated JPEG data"):
        validate(buf.getvalue()[: len(buf.getvalue()) // 2], 1 << 20, 10**6)


# -- through the Jobs service and a real worker ----------------------------------------------------------


@pytest.fixture(scope="module")
def site():
    site = Site()
    yield site
    site.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, namespace):
    server = jobs_server(tmp_path_factory.mktemp("jobs"), namespace)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory, namespace):
    w = Worker(
        tmp_path_factory.mktemp("worker") / "worker.log",
        namespace,
        "--queues",
        "download",
        "--allow-private-addresses",
        LOOPBACK,
        "--concurrency",
        "2",
    ).wait_ready(("download",))
    yield w
    w.stop()


def _stall(req) -> None:
    req.send_response(200)
    req.send_header("Content-Type", "image/png")
    req.send_header("Content-Length", "5000")
    req.end_headers()
    req.wfile.write(b"\x89PNG\r\n\x1a\n")
    req.wfile.flush()
    time.sleep(4)


def _hostile_site(site: Site) -> tuple[list[str], list[bytes], list[tuple[str, str]]]:
    """(URL list lines, bytes of the expected images in order, expected invalid (url, reason) in order)."""
    samples = generate(7, seed=11)
    images = [s.png() for s in samples]
    for i, body in enumerate(images):
        site.files[f"/img/{i}.png"] = (body, "image/png")
    site.files["/dup.png"] = (images[0], "image/png")
    rgba = Image.fromarray(
        np.dstack(
            [
                np.asarray(samples[6].image),
                np.full((samples[6].image.height, samples[6].image.width), 200, np.uint8),
            ]
        )
    )
    site.files["/rgba.png"] = (png(rgba), "image/png")
    buf = io.BytesIO()
    samples[1].image.save(buf, format="JPEG", quality=90)
    site.files["/truncated.jpg"] = (buf.getvalue()[: len(buf.getvalue()) // 2], "image/jpeg")
    site.files["/html.jpg"] = (b"<!DOCTYPE html><html><body>not an image</body></html>", "image/jpeg")
    site.files["/page"] = (b"<html>hello</html>", "text/html; charset=utf-8")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    big = png(noise)
    site.files["/big.png"] = (big, "image/png")
    site.handlers["/stall.png"] = _stall
    site.handlers["/loop"] = redirect("/loop2")
    site.handlers["/loop2"] = redirect("/loop")
    site.handlers["/redirect-ok"] = redirect("/img/5.png")
    site.handlers["/to-private"] = redirect("http://10.255.255.1/secret.png")
    site.handlers["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    u = site.url
    lines = [
        f"{u('/img/0.png')}\t0:1 3:1",
        f"{u('/img/1.png')}\t1:1",
        f"{u('/missing.png')}\t2:1",
        f"{u('/stall.png')}\t2:1",
        f"{u('/truncated.jpg')}\t1:1",
        f"{u('/html.jpg')}\t0:1",
        f"{u('/big.png')}\t4:1",
        f"{u('/loop')}\t0:1",
        f"{u('/to-private')}\t0:1",
        f"{u('/to-metadata')}\t0:1",
        f"{u('/dup.png')}\t0:1 3:1",
        f"{u('/img/1.png')}\t1:1",
        f"{u('/page')}",
        f"ftp://127.0.0.1:{site.port}/img/2.png\t2:1",
        f"{u('/img/2.png')}\tcat",
        f"{u('/redirect-ok')}\t2:1 5:1",
        f"{u('/img/3.png')}",
        f"{u('/rgba.png')}\t5:0.9",
    ]
    rgb = Image.open(io.BytesIO(site.files["/rgba.png"][0])).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgb.size, (255, 255, 255, 255)), rgb).convert("RGB")
    expected_images = [images[0], images[1], images[5], images[3], png(flat)]
    invalid = [
        (u("/missing.png"), "HTTP 404 Not Found"),
        (u("/stall.png"), "timeout: no complete response within 1.5 s"),
        (u("/truncated.jpg"), "undecodable JPEG: corrupt or truncated JPEG data"),
        (u("/html.jpg"), "not an image: content starts with '<!DOCTYPE html><html><bo'"),
        (u("/big.png"), f"too large: Content-Length {len(big)} bytes is over the 60000-byte limit"),
        (u("/loop"), "too many redirects (more than 3)"),
        (u("/to-private"), "refused: 10.255.255.1 resolves to 10.255.255.1, a private address" + REFUSED),
        (
            u("/to-metadata"),
            "refused: 169.254.169.254 resolves to 169.254.169.254, a link-local address" + REFUSED,
        ),
        (u("/dup.png"), f"duplicate of {u('/img/0.png')} (same content)"),
        (u("/img/1.png"), "duplicate URL (line 2)"),
        (u("/page"), "content type 'text/html' is not an image"),
        (
            f"ftp://127.0.0.1:{site.port}/img/2.png",
            "unsupported scheme 'ftp': only http and https are fetched",
        ),
        (u("/img/2.png"), "bad label 'cat' (expected idx or idx:confidence)"),
    ]
    return lines, expected_images, invalid


def test_hostile_server_outputs_and_invalid_list_are_exact(site, service, worker, tmp_path):
    lines, expected, invalid = _hostile_site(site)
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    submitted = run_cli(
        "jobs",
        "--target",
        service.address,
        "submit-download",
        "--urls",
        str(tmp_path / "urls.txt"),
        "--out",
        str(out),
        "--timeout-s",
        "1.5",
        "--retries",
        "0",
        "--max-bytes",
        "60000",
        "--max-redirects",
        "3",
        "--concurrency",
        "4",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    waited = run_cli("jobs", "--target", service.address, "wait", job_id)
    assert waited.returncode == 0, waited.stdout + waited.stderr + worker.log()
    labels = ["0:1 3:1", "1:1", "2:1 5:1", "", "5:0.9"]
    want = [
        f"{sha_name(body)}\t{lbl}" if lbl else sha_name(body)
        for body, lbl in zip(expected, labels, strict=True)
    ]
    assert (out / "images.txt").read_text().splitlines() == want
    got_invalid = [tuple(line.split("\t", 1)) for line in (out / "invalid.txt").read_text().splitlines()]
    assert [u for u, _ in got_invalid] == [u for u, _ in invalid]
    for (url, reason), (_, want_reason) in zip(got_invalid, invalid, strict=True):
        assert reason.startswith(want_reason), (url, reason, want_reason)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert files == sorted(sha_name(b) for b in expected), (
        "exactly the valid images, duplicates once, nothing partial"
    )
    for name in files:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() in name
        assert Image.open(out / name).convert("RGB").size[0] >= 64
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["urls"], summary["images"], summary["invalid"]) == (18, 5, 13)
    assert summary["reasons"]["refused"] == 2 and summary["limits"]["allow_private_addresses"] == LOOPBACK
    assert not (out / ".incoming").exists()
    assert site.hits.get("/loop", 0) + site.hits.get("/loop2", 0) == 4  # the first request and 3 redirects
    job = stub(service.address).GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=10)
    assert (job.state, job.result["images"], job.result["invalid"], job.done, job.total) == (
        jobs_pb2.JOB_STATE_SUCCEEDED,
        "5",
        "13",
        18,
        18,
    )
    # The worker's Prometheus endpoint covers its pool processes (multiprocess mode).
    text = scrape(worker.metrics_url)
    assert metric_value(text, "vision_jobs_finished_total", kind="download", state="succeeded") >= 1
    assert metric_value(text, "vision_download_urls_total", outcome="refused") >= 2
    assert metric_value(text, "vision_download_urls_total", outcome="ok") >= 5
    assert metric_value(text, "vision_job_duration_seconds_count", kind="download") >= 1
    assert metric_value(text, "vision_download_bytes_total") > 0


def test_a_worker_without_the_operator_flag_refuses_every_loopback_url(
    site, tmp_path_factory, namespace, tmp_path
):
    ns = namespace + "s"
    server = jobs_server(tmp_path_factory.mktemp("strict"), ns)
    strict = Worker(tmp_path / "strict.log", ns, "--queues", "download").wait_ready(("download",))
    try:
        site.files["/ok.png"] = (png(Image.new("RGB", (32, 32), (1, 2, 3))), "image/png")
        before = dict(site.hits)
        urls = [
            site.url("/ok.png"),
            f"http://localhost:{site.port}/ok.png",
            f"http://2130706433:{site.port}/ok.png",
        ]
        jobs = stub(server.address)
        job = jobs.SubmitDownload(
            jobs_pb2.SubmitDownloadRequest(urls="\n".join(urls).encode(), out_dir=str(tmp_path / "o")),
            timeout=10,
        ).job
        job = wait_job(jobs, job.id, 120)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result["images"] == "0"
        reasons = [line.split("\t", 1) for line in (tmp_path / "o" / "invalid.txt").read_text().splitlines()]
        assert [u for u, _ in reasons] == urls
        for _url, reason in reasons:
            assert (
                reason.startswith("refused: ")
                and "a loopback address" in reason
                and "--allow-private-addresses" in reason
            )
        assert site.hits == before, "nothing reached the server"
    finally:
        strict.stop()
        server.stop()


def _slow_set(site: Site, n: int, prefix: str) -> list[bytes]:
    bodies = [s.png() for s in generate(n, seed=21)]
    for i, body in enumerate(bodies):
        site.files[f"/{prefix}/{i}.png"] = (body, "image/png")
    return bodies


def _complete_files_only(out: Path) -> list[str]:
    names = []
    for p in (out / "images").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert hashlib.sha256(data).hexdigest() in p.name, f"partial or foreign file {p}"
            Image.open(io.BytesIO(data)).load()
            names.append(p.name)
    return names


def test_pool_process_killed_mid_job_is_redelivered_and_resumes_then_a_rerun_skips_everything(
    site, service, worker, tmp_path
):
    bodies = _slow_set(site, 24, "slow")
    urls = "\n".join(f"{site.url(f'/slow/{i}.png')}\t{i % 6}:1" for i in range(24)).encode()
    out = tmp_path / "out"
    jobs = stub(service.address)
    request = jobs_pb2.SubmitDownloadRequest(
        urls=urls, out_dir=str(out), options=jobs_pb2.DownloadOptions(concurrency=2)
    )
    site.delay_s = 0.25
    try:
        job = jobs.SubmitDownload(request, timeout=10).job
        job = wait_job(jobs, job.id, 120, until=lambda j: j.done >= 6)
        pid = int(job.worker.rsplit(" ", 1)[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert len(_complete_files_only(out)) >= 5, "images written before the kill are complete"
        resumed = wait_job(
            jobs,
            job.id,
            120,
            until=lambda j: (
                j.attempt >= 2
                and j.state == jobs_pb2.JOB_STATE_RUNNING
                or j.state == jobs_pb2.JOB_STATE_SUCCEEDED
            ),
        )
        recovery = time.monotonic() - killed_at
        final = wait_job(jobs, job.id, 120)
    finally:
        site.delay_s = 0.0
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final
    assert final.attempt == 2 and recovery < 30, (final.attempt, recovery, resumed)
    want = [f"{sha_name(b)}\t{i % 6}:1" for i, b in enumerate(bodies)]
    assert (out / "images.txt").read_text().splitlines() == want
    assert (out / "invalid.txt").read_text() == ""
    assert sorted(_complete_files_only(out)) == sorted(Path(sha_name(b)).name for b in bodies)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] >= 5, summary
    fetched = sum(site.hits.get(f"/slow/{i}.png", 0) for i in range(24))
    assert fetched < 24 + 4, "the rerun fetched again only what was in flight at the kill"
    print(f"\nrecovery after SIGKILL of the pool process: {recovery:.2f} s")

    # A rerun over the same folder (a new job) fetches nothing and writes the same lists.
    hits = dict(site.hits)
    again = wait_job(jobs, jobs.SubmitDownload(request, timeout=10).job.id, 60)
    assert again.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert site.hits == hits and (out / "images.txt").read_text().splitlines() == want
    assert json.loads((out / "summary.json").read_text())["skipped_already_done"] == 24


def test_a_lost_worker_node_is_redelivered_after_the_visibility_timeout(
    site, tmp_path_factory, namespace, tmp_path
):
    ns = namespace + "n"
    server = jobs_server(tmp_path_factory.mktemp("node"), ns)
    args = ("--queues", "download", "--allow-private-addresses", LOOPBACK, "--visibility-timeout-s", "3")
    first = Worker(tmp_path / "w1.log", ns, *args).wait_ready(("download",))
    second = None
    bodies = _slow_set(site, 16, "node")
    urls = "\n".join(site.url(f"/node/{i}.png") for i in range(16)).encode()
    jobs = stub(server.address)
    site.delay_s = 0.25
    try:
        job = jobs.SubmitDownload(
            jobs_pb2.SubmitDownloadRequest(
                urls=urls, out_dir=str(tmp_path / "o"), options=jobs_pb2.DownloadOptions(concurrency=2)
            ),
            timeout=10,
        ).job
        wait_job(jobs, job.id, 60, until=lambda j: j.done >= 4)
        first.kill_all()  # supervisor, node and pool processes at once: nothing acknowledges or requeues
        killed_at = time.monotonic()
        lost = wait_job(jobs, job.id, 60, until=lambda j: j.state == jobs_pb2.JOB_STATE_QUEUED)
        assert "worker lost" in lost.message
        second = Worker(tmp_path / "w2.log", ns, *args).wait_ready(("download",))
        final = wait_job(jobs, job.id, 120)
        recovery = time.monotonic() - killed_at
    finally:
        site.delay_s = 0.0
        if second is not None:
            second.stop()
        first.stop()
        server.stop()
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED and final.attempt >= 2, final
    assert (tmp_path / "o" / "images.txt").read_text().splitlines() == [sha_name(b) for b in bodies]
    print(f"\nrecovery after losing the whole worker node (visibility timeout 3 s): {recovery:.2f} s")
