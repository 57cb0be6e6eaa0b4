"""The download job: a URL list (Tencent ML-Images format) in, a validated image set out.

Input, one line per image: `URL<TAB>idx:conf idx:conf ...` (labels optional; any whitespace separates),
or a plain list of URLs; blank lines and `#` comments are skipped.

Output folder:

    images/<aa>/<sha256>.<ext>   the images, named by the sha256 of their bytes (so equal content is one file)
    images.txt                   `images/<aa>/<sha256>.<ext><TAB>idx:conf ...`, one line per image, input order
    invalid.txt                  `URL<TAB>reason`, one line per URL that gave no new image, input order
    summary.json                 counts, reasons, bytes, time, images per second, the limits used
    .journal.jsonl               what each URL gave so far (resume); .incoming/ holds files being written

Every image is fetched under vision.jobs.fetch's rules, then decoded in full (a truncated or corrupt file is
refused) and converted to RGB: an RGB JPEG, PNG or WebP is kept byte for byte, anything else (CMYK, grey,
palette, alpha, 16-bit, GIF, BMP) is stored as the RGB PNG it decodes to. Duplicates (equal sha256) keep the
first URL in input order; the later ones are listed as invalid with `duplicate of <URL>`.

Writes are atomic: a file is written under `.incoming/`, fsynced and renamed into place, so a killed job
leaves no partial image (and a rerun clears `.incoming/`). Each finished URL is appended to the journal;
rerunning the job over the same folder skips every URL the journal says is done (images still on disk,
and permanent failures), and retries transient failures. The lists and the summary are rewritten from the
journal at the end, atomically.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vision.core import files, metrics
from vision.jobs.fetch import FetchError, FetchPolicy, fetch, networks_text, sniff

if TYPE_CHECKING:
    from vision.jobs.runtime import JobRun

log = logging.getLogger(__name__)

IMAGES_DIR, IMAGE_LIST, INVALID_LIST, SUMMARY = "images", "images.txt", "invalid.txt", "summary.json"
JOURNAL, INCOMING = ".journal.jsonl", ".incoming"
_LABEL = re.compile(r"^\d+(:(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)?$")
KEEP_AS_IS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class UrlEntry:
    line: int  # 1-based line of the URL list
    url: str
    labels: str  # "idx:conf idx:conf", normalised spacing; "" without labels


@dataclass(frozen=True)
class DownloadOptions:
    concurrency: int = 16
    policy: FetchPolicy = FetchPolicy()
    max_pixels: int = 40_000_000


def parse_url_list(text: str) -> tuple[list[UrlEntry], list[tuple[int, str, str]]]:
    """(entries, rejects): a reject is (line, the line's URL or text, reason)."""
    entries, rejects = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        url, *labels = line.split()
        bad = [t for t in labels if not _LABEL.match(t)]
        if bad:
            rejects.append((number, url, f"bad label {bad[0]!r} (expected idx or idx:confidence)"))
            continue
        entries.append(UrlEntry(number, url, " ".join(labels)))
    return entries, rejects


def validate(data: bytes, max_bytes: int, max_pixels: int) -> tuple[bytes, str, int, int]:
    """(bytes to store, extension, width, height) of a fully decoded image; FetchError with the reason."""
    from PIL import Image

    from vision.core.errors import InvalidImage
    from vision.media.imaging import DecodeLimits, decode_image

    kind = sniff(data)
    if kind is None:
        head = data[:24].decode("ascii", "replace").replace("\n", " ").replace("\r", " ")
        raise FetchError(f"not an image: content starts with {head!r}")
    try:
        img = decode_image(data, DecodeLimits(max_bytes=max_bytes, max_pixels=max_pixels))
    except InvalidImage as exc:
        raise FetchError(f"undecodable {kind}: {exc.reason}") from None
    header = Image.open(io.BytesIO(data))
    if header.format in KEEP_AS_IS and header.mode == "RGB":
        return data, EXTENSIONS[header.format], img.width, img.height
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png", img.width, img.height


class Journal:
    """Append-only record of finished URLs: one JSON object per line, fsynced (a torn last line is ignored)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                done[entry["url"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
        return done

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes, incoming: Path, *, sync_dir: bool = True) -> None:
    """Write `data` to `path` through a temporary file in `incoming` (same filesystem, cleared by a rerun)."""
    incoming.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path, tmp_dir=incoming, sync_dir=sync_dir) as fh:
        fh.write(data)


def download(
    entries: list[UrlEntry],
    rejects: list[tuple[int, str, str]],
    out: Path,
    options: DownloadOptions,
    run: "JobRun | None" = None,
) -> dict[str, Any]:
    """Download `entries` into `out` (resuming what a journal there records); returns the summary."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    incoming = out / INCOMING
    shutil.rmtree(
        incoming, ignore_errors=True
    )  # files of a killed run: never renamed into place, never valid
    journal = Journal(out / JOURNAL)
    done = journal.read()
    for url, entry in list(done.items()):
        if entry.get("ok") and not (out / entry["name"]).is_file():
            del done[url]  # the image went missing: fetch it again
        elif not entry.get("ok") and entry.get("transient"):
            del done[url]  # a timeout or a 5xx last time: try again
    seen: dict[str, int] = {}
    pending: list[UrlEntry] = []
    for e in entries:
        if e.url in seen or e.url in done:
            continue
        seen[e.url] = e.line
        pending.append(e)
    total = len(entries) + len(rejects)
    skipped = total - len(pending) - len(rejects)
    counter = {"done": skipped + len(rejects)}
    lock = threading.Lock()
    cancel = threading.Event()
    fetched_bytes = 0

    def report(force: bool = False) -> None:
        if run is not None:
            run.progress(
                done=counter["done"],
                total=total,
                unit="urls",
                message=f"{counter['done']}/{total} URLs ({skipped} done before)" if skipped else None,
                force=force,
            )

    def one(entry: UrlEntry) -> dict[str, Any]:
        nonlocal fetched_bytes
        if cancel.is_set():
            return {}
        record: dict[str, Any] = {"url": entry.url}
        try:
            got = fetch(entry.url, options.policy, cancelled=cancel.is_set)
            with lock:
                fetched_bytes += len(got.data)
            metrics.DOWNLOAD_BYTES.inc(len(got.data))
            data, ext, width, height = validate(got.data, options.policy.max_bytes, options.max_pixels)
            digest = hashlib.sha256(data).hexdigest()
            name = f"{IMAGES_DIR}/{digest[:2]}/{digest}.{ext}"
            path = out / name
            if not path.is_file():
                # No directory fsync per image: a rename lost in a crash only makes the rerun, which checks
                # every journaled image is on disk, fetch that image again.
                atomic_write(path, data, incoming, sync_dir=False)
            record.update(
                ok=True,
                name=name,
                sha256=digest,
                bytes=len(data),
                width=width,
                height=height,
                redirects=got.redirects,
            )
        except FetchError as exc:
            record.update(ok=False, reason=exc.reason, transient=exc.transient)
        journal.append(record)
        with lock:
            counter["done"] += 1
        return record

    report(force=True)
    if pending:
        with concurrent.futures.ThreadPoolExecutor(
            options.concurrency, thread_name_prefix="download"
        ) as pool:
            queue = iter(pending)
            in_flight: set[concurrent.futures.Future[dict[str, Any]]] = set()
            try:
                while True:
                    while len(in_flight) < options.concurrency * 2 and not cancel.is_set():
                        entry = next(queue, None)
                        if entry is None:
                            break
                        in_flight.add(pool.submit(one, entry))
                    if not in_flight:
                        break
                    finished, in_flight = concurrent.futures.wait(
                        in_flight, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for future in finished:
                        future.result()
                    report()
                    if run is not None:
                        run.check_cancel()
            except BaseException:
                cancel.set()
                for future in in_flight:
                    future.cancel()
                raise
    summary = finish(
        entries,
        rejects,
        out,
        journal.read(),
        options,
        seconds=time.monotonic() - started,
        fetched_bytes=fetched_bytes,
        skipped=skipped,
    )
    counter["done"] = total
    report(force=True)
    return summary


def finish(
    entries: list[UrlEntry],
    rejects: list[tuple[int, str, str]],
    out: Path,
    done: dict[str, dict[str, Any]],
    options: DownloadOptions,
    *,
    seconds: float,
    fetched_bytes: int,
    skipped: int,
) -> dict[str, Any]:
    """Write images.txt, invalid.txt and summary.json (atomically) from the journal, in input order."""
    incoming = out / INCOMING
    images: list[str] = []
    invalid: list[tuple[int, str, str]] = [(line, url, reason) for line, url, reason in rejects]
    owner: dict[str, str] = {}
    first_line: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    for e in entries:
        if e.url in first_line:
            invalid.append((e.line, e.url, f"duplicate URL (line {first_line[e.url]})"))
            reasons["duplicate URL"] += 1
            continue
        first_line[e.url] = e.line
        record = done.get(e.url)
        if record is None:
            invalid.append((e.line, e.url, "not attempted (the job was stopped)"))
            reasons["not attempted"] += 1
        elif not record.get("ok"):
            invalid.append((e.line, e.url, record["reason"]))
            reasons[_reason_kind(record["reason"])] += 1
        elif record["sha256"] in owner:
            invalid.append((e.line, e.url, f"duplicate of {owner[record['sha256']]} (same content)"))
            reasons["duplicate content"] += 1
        else:
            owner[record["sha256"]] = e.url
            images.append(f"{record['name']}\t{e.labels}" if e.labels else record["name"])
    for _ in rejects:
        reasons["bad label"] += 1
    invalid.sort()
    for kind, count in reasons.items():
        metrics.DOWNLOAD_URLS.labels(outcome=kind).inc(count)
    metrics.DOWNLOAD_URLS.labels(outcome="ok").inc(len(images))
    summary = {
        "urls": len(entries) + len(rejects),
        "images": len(images),
        "invalid": len(invalid),
        "reasons": dict(sorted(reasons.items())),
        "skipped_already_done": skipped,
        "bytes_fetched": fetched_bytes,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 2) if seconds > 0 else 0.0,
        "limits": {
            "concurrency": options.concurrency,
            "timeout_s": options.policy.timeout_s,
            "retries": options.policy.retries,
            "max_bytes": options.policy.max_bytes,
            "max_redirects": options.policy.max_redirects,
            "max_pixels": options.max_pixels,
            "allow_private_addresses": networks_text(options.policy.allow_private),
        },
    }
    atomic_write(out / IMAGE_LIST, "".join(f"{line}\n" for line in images).encode(), incoming)
    atomic_write(
        out / INVALID_LIST, "".join(f"{url}\t{reason}\n" for _, url, reason in invalid).encode(), incoming
    )
    atomic_write(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode(), incoming)
    shutil.rmtree(incoming, ignore_errors=True)
    return summary


def _reason_kind(reason: str) -> str:
    """A short class of a reason for the summary's histogram."""
    head = reason.split(":", 1)[0]
    for prefix in (
        "HTTP",
        "refused",
        "timeout",
        "too large",
        "too many redirects",
        "not an image",
        "undecodable",
        "content type",
        "truncated",
        "cannot resolve",
        "connection failed",
        "unsupported scheme",
    ):
        if reason.startswith(prefix):
            return head if prefix == "HTTP" else prefix
    return head[:40]


# -- the Celery side -------------------------------------------------------------------------------------


def options_from_params(params: dict[str, Any], allow_private: Any) -> DownloadOptions:
    o = params.get("options") or {}
    policy = FetchPolicy(
        timeout_s=float(o.get("timeout_s") or 15.0),
        retries=int(o.get("retries") if o.get("retries") is not None else 2),
        max_bytes=int(o.get("max_bytes") or 20 * 1024 * 1024),
        max_redirects=int(o.get("max_redirects") if o.get("max_redirects") is not None else 5),
        allow_private=allow_private,
    )
    return DownloadOptions(
        concurrency=int(o.get("concurrency") or 16),
        policy=policy,
        max_pixels=int(o.get("max_pixels") or 40_000_000),
    )


def run_download_job(run: "JobRun") -> dict[str, Any]:
    from vision.jobs.runtime import JobFailed
    from vision.jobs.settings import check_path

    params = run.params
    out = check_path(run.settings, params["out_dir"], "out_dir")
    if params.get("urls_path"):
        source = check_path(run.settings, params["urls_path"], "urls_path")
        try:
            text = source.read_text(errors="replace")
        except OSError as exc:
            raise JobFailed(f"cannot read the URL list {source}: {exc.strerror or exc}") from None
    else:
        raw = run.store.inline_urls(run.job_id)
        if raw is None:
            raise JobFailed("the job's inline URL list has expired from Redis; submit it again")
        text = raw.decode("utf-8", "replace")
    entries, rejects = parse_url_list(text)
    if not entries and not rejects:
        raise JobFailed("the URL list has no URLs")
    options = options_from_params(params, run.settings.allow_private())
    summary = download(entries, rejects, out, options, run)
    return {
        "out_dir": str(out),
        "images": str(summary["images"]),
        "invalid": str(summary["invalid"]),
        "image_list": str(out / IMAGE_LIST),
        "invalid_list": str(out / INVALID_LIST),
        "summary": str(out / SUMMARY),
        "images_per_s": str(summary["images_per_s"]),
    }
