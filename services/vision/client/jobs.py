"""`vision jobs ...`: submit and follow jobs through the Jobs service (`vision serve --services jobs`).

    vision jobs submit-download --urls urls.txt --out /data/set1          # prints the job id last
    vision jobs submit-finetune --task tagging --data /data/set1 --base efficientnet_lite0 \\
        --name shapes --promote-to staging --labels /data/labels.txt --epochs 6
    vision jobs status ID        vision jobs list        vision jobs cancel ID
    vision jobs watch ID         # a progress bar until the job ends
    vision jobs wait ID          # blocks; exit 0 when the job succeeded, 1 when it failed or was cancelled

Paths (--out, --data, --labels, ...) are sent as absolute paths: the workers read and write them, so in a
cluster they name a shared volume. `--urls FILE` sends the list itself; `--urls-path PATH` names a list
already on the workers' filesystem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision.client.channel import add_connection_flags

PROG = "vision jobs"
EXIT_FAILED = 1
EXIT_CANCELLED = 3


def _abs(value: str) -> str:
    return str(Path(value).expanduser().absolute())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_connection_flags(parser, what="Jobs service")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each RPC in seconds (default 30)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser(
        "submit-download",
        help="download the images of a URL list (Tencent ML-Images format)",
        description="URL list: one `URL<TAB>idx:conf idx:conf ...` per line (labels optional). Output: "
        "OUT/images/, images.txt (name<TAB>labels), invalid.txt (URL<TAB>reason), summary.json. "
        "Submitting again with the same --out resumes.",
    )
    source = dl.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--urls", type=Path, metavar="FILE", help="the URL list (sent with the request, up to 16 MiB)"
    )
    source.add_argument("--urls-path", metavar="PATH", help="a URL list on the workers' filesystem")
    dl.add_argument("--out", required=True, help="output folder on the workers' filesystem")
    dl.add_argument("--concurrency", type=int, help="fetches at once (default 16)")
    dl.add_argument("--timeout-s", type=float, help="deadline per fetch attempt in seconds (default 15)")
    dl.add_argument("--retries", type=int, help="retries of transient failures (default 2)")
    dl.add_argument("--max-bytes", type=int, help="largest image in bytes (default 20 MiB)")
    dl.add_argument("--max-redirects", type=int, help="redirects followed (default 5)")
    dl.add_argument("--max-pixels", type=int, help="largest image in pixels (default 40 M)")
    dl.set_defaults(func=_submit_download)

    ft = sub.add_parser(
        "submit-finetune",
        help="fine-tune a model and register its best checkpoint",
        description="Trains on the workers (queue `train`), logs an MLflow run, and registers the best "
        "checkpoint as a new version of --name (golden outputs, lineage); --promote-to then points "
        "an alias at it, and services following that alias switch to it.",
    )
    ft.add_argument("--task", required=True, choices=["tagging", "classification", "retrieval", "delf"])
    ft.add_argument(
        "--data",
        required=True,
        help="a download job's folder (or its images.txt), a folder per class, or a NUS-WIDE-style JSON",
    )
    ft.add_argument(
        "--base",
        required=True,
        metavar="MODEL_OR_URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model spec (efficientnet_lite0, arch=...,weights=...)",
    )
    ft.add_argument("--name", required=True, help="registered model name of the result")
    ft.add_argument(
        "--promote-to", default="", metavar="ALIAS", help="point this alias at the new version (e.g. staging)"
    )
    ft.add_argument("--labels", help="label names (index<TAB>name file) when the data has none")
    for flag, kind, text in (
        ("--epochs", int, "epochs in all (tagging/classification 6, retrieval 4)"),
        ("--batch-size", int, "batch size (32)"),
        ("--lr", float, "Adam learning rate (1e-4 for tagging, as Tencent ML-Images; 1e-3 for a new head)"),
        ("--seed", int, "random seed (0): the same seed, data and base give the same run"),
        ("--val-fraction", float, "validation share (0.2)"),
        ("--workers", int, "DataLoader worker processes (2)"),
        ("--head-epochs", int, "classification: stage-1 epochs, backbone frozen (half)"),
        ("--sgd-lr", float, "classification stage 2: SGD learning rate (1e-3)"),
        ("--center-loss", float, "classification: center-loss weight (off)"),
        ("--center-lr", float, "classification: learning rate of the centers (0.5)"),
        ("--pseudo-threshold", float, "classification: confidence for pseudo labels (0.9)"),
        ("--pseudo-epochs", int, "classification: epochs on labelled + pseudo-labelled images (2)"),
    ):
        ft.add_argument(flag, type=kind, help=text)
    ft.add_argument(
        "--pos-weight", action="store_true", help="tagging: weight positives by negatives/positives per label"
    )
    ft.add_argument(
        "--trainable",
        choices=["all", "head", "last"],
        help="what trains (tagging: last = head + last blocks)",
    )
    ft.add_argument("--preset", help="preprocessing preset of the new version (default: the base's)")
    ft.add_argument("--unlabeled", help="classification: folder of unlabelled images for pseudo-labelling")
    ft.add_argument("--eval-data", help="retrieval: held-out retrieval set (Oxford format: jpg/ + gt/)")
    ft.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when the worker has one)")
    ft.set_defaults(func=_submit_finetune)

    status = sub.add_parser("status", help="one job: state, progress, metrics, result")
    status.add_argument("id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    ls = sub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--kind", choices=["download", "finetune"])
    ls.add_argument(
        "--state",
        action="append",
        default=[],
        choices=["queued", "running", "retrying", "cancelling", "succeeded", "failed", "cancelled"],
    )
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    cancel = sub.add_parser("cancel", help="stop a job (a running one stops at its next batch)")
    cancel.add_argument("id")
    cancel.set_defaults(func=_cancel)

    watch = sub.add_parser("watch", help="follow a job with a progress bar until it ends")
    watch.add_argument("id")
    watch.set_defaults(func=_watch)

    wait = sub.add_parser(
        "wait", help="block until a job ends: exit 0 if it succeeded, 1 if it failed, 3 if cancelled"
    )
    wait.add_argument("id")
    wait.add_argument("--max-wait", type=float, help="give up after this many seconds (exit 4)")
    wait.set_defaults(func=_wait)
    return parser


def _stub(args: argparse.Namespace):  # noqa: ANN202
    from vision.client.channel import open_channel
    from vision.v1 import jobs_pb2_grpc

    channel = open_channel(args.target)
    return channel, jobs_pb2_grpc.JobsStub(channel)


def _state(job: Any) -> str:
    from vision.v1 import jobs_pb2

    return jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()


def _kind(job: Any) -> str:
    from vision.v1 import jobs_pb2

    return jobs_pb2.JobKind.Name(job.kind).removeprefix("JOB_KIND_").lower()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def describe(job: Any) -> list[str]:
    lines = [
        f"job {job.id}  {_kind(job)}  {_state(job).upper()}"
        + (f"  attempt {job.attempt}" if job.attempt > 1 else "")
    ]
    if job.message:
        lines.append(f"  {job.message}")
    lines.append(
        f"  submitted {_when(job.submitted_at)}  started {_when(job.started_at)}  finished {_when(job.finished_at)}"
    )
    if job.worker:
        lines.append(f"  worker {job.worker}")
    if job.total:
        epoch = f"epoch {job.epoch}/{job.epochs}, " if job.epochs else ""
        lines.append(f"  progress {epoch}{job.done}/{job.total} {job.unit}")
    if job.metrics:
        lines.append("  metrics " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(job.metrics.items())))
    for key, value in sorted(job.params.items()):
        lines.append(f"  param  {key}: {value}")
    for key, value in sorted(job.result.items()):
        lines.append(f"  result {key}: {value}")
    return lines


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    channel, stub = _stub(args)
    with channel:
        return getattr(stub, method)(request, timeout=args.timeout)


def _submit_download(args: argparse.Namespace) -> int:
    from vision.v1 import jobs_pb2

    request = jobs_pb2.SubmitDownloadRequest(out_dir=_abs(args.out))
    if args.urls is not None:
        try:
            request.urls = args.urls.read_bytes()
        except OSError as exc:
            print(f"{PROG} submit-download: cannot read {args.urls}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        request.urls_path = _abs(args.urls_path)
    for name in ("concurrency", "timeout_s", "retries", "max_bytes", "max_redirects", "max_pixels"):
        value = getattr(args, name)
        if value is not None:
            setattr(request.options, name, value)
    job = _call(args, "SubmitDownload", request).job
    print(f"queued download job (out {request.out_dir})")
    print(job.id)
    return 0


def _submit_finetune(args: argparse.Namespace) -> int:
    from vision.v1 import jobs_pb2

    options = jobs_pb2.FinetuneOptions()
    for name in (
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "val_fraction",
        "workers",
        "head_epochs",
        "sgd_lr",
        "center_loss",
        "center_lr",
        "pseudo_threshold",
        "pseudo_epochs",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if args.pos_weight:
        options.pos_weight = True
    for name in ("trainable", "preset", "device"):
        if getattr(args, name):
            setattr(options, name, getattr(args, name))
    for name in ("labels", "unlabeled", "eval_data"):
        if getattr(args, name):
            setattr(options, name, _abs(getattr(args, name)))
    base = args.base
    if "=" not in base and not base.startswith("models:/") and Path(base).suffix in (".pt", ".pth"):
        print(f"{PROG} submit-finetune: --base takes a model spec: arch=NAME,weights={base}", file=sys.stderr)
        return 2
    request = jobs_pb2.SubmitFinetuneRequest(
        task=args.task,
        data=_abs(args.data),
        base=base,
        name=args.name,
        promote_to=args.promote_to,
        options=options,
    )
    job = _call(args, "SubmitFinetune", request).job
    print(
        f"queued {args.task} fine-tune of {base} -> {args.name}"
        + (f" (promote to {args.promote_to})" if args.promote_to else "")
    )
    print(job.id)
    return 0


def _as_dict(job: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job, preserving_proto_field_name=True)


def _status(args: argparse.Namespace) -> int:
    from vision.v1 import jobs_pb2

    job = _call(args, "GetJob", jobs_pb2.GetJobRequest(id=args.id))
    print(json.dumps(_as_dict(job), indent=2) if args.json else "\n".join(describe(job)))
    return 0


def _list(args: argparse.Namespace) -> int:
    from vision.v1 import jobs_pb2

    request = jobs_pb2.ListJobsRequest(
        limit=args.limit, states=[jobs_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in args.state]
    )
    if args.kind:
        request.kind = jobs_pb2.JobKind.Value(f"JOB_KIND_{args.kind.upper()}")
    jobs = _call(args, "ListJobs", request).jobs
    if args.json:
        print(json.dumps([_as_dict(j) for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs")
    for j in jobs:
        progress = f"{j.done}/{j.total} {j.unit}" if j.total else ""
        target = j.params.get("name") or j.params.get("out_dir", "")
        print(f"{j.id}  {_when(j.submitted_at)}  {_kind(j):8}  {_state(j):10}  {progress:18}  {target}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from vision.v1 import jobs_pb2

    job = _call(args, "CancelJob", jobs_pb2.CancelJobRequest(id=args.id))
    print(f"job {job.id}: {_state(job)}" + (f" ({job.message})" if job.message else ""))
    return 0


def _exit_code(job: Any) -> int:
    state = _state(job)
    return 0 if state == "succeeded" else EXIT_CANCELLED if state == "cancelled" else EXIT_FAILED


def _events(args: argparse.Namespace, deadline: float | None = None):  # noqa: ANN202 - iterator of JobEvent, reconnecting
    """WatchJob events; a dropped stream (the service restarted) is re-opened: the job lives in Redis.
    With a `deadline` (time.monotonic()), TimeoutError once it passes: the service sends events only when the
    job changes, so a quiet job would otherwise keep the stream open past any deadline."""
    import grpc

    from vision.v1 import jobs_pb2

    failures = 0
    while True:
        channel, stub = _stub(args)
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        try:
            with channel:
                for event in stub.WatchJob(jobs_pb2.WatchJobRequest(id=args.id), timeout=timeout):
                    failures = 0
                    yield event
                    if event.final:
                        return
        except grpc.RpcError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError from None
            if (
                exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                or failures >= 30
            ):  # type: ignore[attr-defined]
                raise
            failures += 1
            time.sleep(min(5.0, 0.5 * failures))


def _wait(args: argparse.Namespace) -> int:
    deadline = None if args.max_wait is None else time.monotonic() + args.max_wait
    last = "queued or running"
    try:
        for event in _events(args, deadline):
            last = _state(event.job)
            if not event.final:
                continue
            job = event.job
            print(f"job {job.id}: {_state(job)}" + (f": {job.message}" if job.message else ""))
            for key, value in sorted(job.result.items()):
                print(f"  {key}: {value}")
            return _exit_code(job)
    except TimeoutError:
        print(f"job {args.id}: still {last} after {args.max_wait:g} s", file=sys.stderr)
        return 4
    return EXIT_FAILED


def _watch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bar = None
    last_epoch = -1
    job = None
    try:
        for event in _events(args):
            job = event.job
            if job.epochs and job.epoch != last_epoch and bar is not None:
                bar.close()
                bar = None
            if bar is None and job.total:
                last_epoch = job.epoch
                label = f"epoch {job.epoch}/{job.epochs}" if job.epochs else _kind(job)
                bar = tqdm(
                    total=job.total, unit=f" {job.unit}" if job.unit else "it", desc=label, dynamic_ncols=True
                )
            if bar is not None:
                if job.total != bar.total:
                    bar.total = job.total
                bar.n = min(job.done, job.total)
                shown = {k: f"{v:.3g}" for k, v in sorted(job.metrics.items())[:4]}
                bar.set_postfix(state=_state(job), **shown, refresh=False)
                bar.refresh()
            elif not event.final:
                print(
                    f"job {job.id}: {_state(job)}" + (f" ({job.message})" if job.message else ""),
                    file=sys.stderr,
                )
    finally:
        if bar is not None:
            bar.close()
    if job is None:
        return EXIT_FAILED
    print("\n".join(describe(job)))
    return _exit_code(job)


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    from vision.client.channel import resolve_target

    args = build_parser().parse_args(argv)
    if not resolve_target(args, f"{PROG} {args.command}"):
        return 2
    try:
        return int(args.func(args))
    except grpc.RpcError as exc:
        print(f"{PROG} {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        return 130
