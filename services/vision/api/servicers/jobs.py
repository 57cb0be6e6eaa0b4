"""vision.v1.Jobs: submit, read, list, cancel and watch jobs (vision.jobs.store does the work).

Hosted by `vision serve --services jobs`. Its health is Redis's: a probe thread pings Redis every second,
and the service is NOT_SERVING while Redis does not answer (the log says why, and every RPC answers
UNAVAILABLE with the reason); the model services of the same process are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from vision.api.rpc import rpc_method
from vision.config.jobs import JobsConfig
from vision.core.errors import InvalidArgument, Unavailable
from vision.jobs.store import DOWNLOAD, FINETUNE, JobStore, JobView
from vision.v1 import jobs_pb2, jobs_pb2_grpc

SERVICE = "vision.v1.Jobs"
log = logging.getLogger(__name__)

WATCH_POLL_S = 0.25
# delf: the DELF ResNet-50's two stages (training.delf.run_job), base delf_resnet50.
TASKS = ("tagging", "classification", "retrieval", "delf")
_KIND = {DOWNLOAD: jobs_pb2.JOB_KIND_DOWNLOAD, FINETUNE: jobs_pb2.JOB_KIND_FINETUNE}
_KIND_NAME = {v: k for k, v in _KIND.items()}


def job_message(view: JobView) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        id=view.id,
        kind=_KIND.get(view.kind, jobs_pb2.JOB_KIND_UNSPECIFIED),
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{view.state}"),
        message=view.message,
        submitted_at=view.submitted_at,
        started_at=view.started_at,
        finished_at=view.finished_at,
        done=view.done,
        total=view.total,
        unit=view.unit,
        epoch=view.epoch,
        epochs=view.epochs,
        attempt=view.attempt,
        worker=view.worker,
        cancel_requested=view.cancel_requested,
    )
    job.metrics.update({k: v for k, v in view.metrics.items() if math.isfinite(v)})
    job.params.update(view.params)
    job.result.update(view.result)
    return job


class RedisProbe:
    """Is Redis answering? Checked every `interval_s` on a daemon thread, so health never blocks the loop."""

    def __init__(self, store: JobStore, interval_s: float = 1.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self.ok = False
        self.reason = "not checked yet"
        self._thread = threading.Thread(target=self._run, name="jobs-redis-probe", daemon=True)
        self._check()
        self._thread.start()

    def _check(self) -> None:
        try:
            self.store.ping()
            ok, reason = True, ""
        except Unavailable as exc:
            ok, reason = False, str(exc)
        if ok != self.ok or (not ok and reason != self.reason):
            if ok:
                log.info(
                    "jobs: Redis at %s answers; the Jobs service is SERVING", self.store.config.redacted_url()
                )
            else:
                log.warning("jobs: NOT_SERVING: %s", reason)
        self.ok, self.reason = ok, reason

    def _run(self) -> None:
        while True:
            threading.Event().wait(self.interval_s)
            self._check()

    def __call__(self) -> bool:
        return self.ok


def _absolute(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if not Path(value).is_absolute():
        raise InvalidArgument(f"{what} {value!r} must be an absolute path on the workers' filesystem")
    return value


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise InvalidArgument(f"{name} {value:g} is out of range [{low:g}, {high:g}]")


def download_params(request: jobs_pb2.SubmitDownloadRequest) -> tuple[dict[str, Any], bytes | None]:
    source = request.WhichOneof("source")
    if source is None:
        raise InvalidArgument("give the URL list (urls) or a file on the workers (urls_path)")
    params: dict[str, Any] = {"out_dir": _absolute(request.out_dir, "out_dir")}
    urls = None
    if source == "urls":
        urls = request.urls
        try:
            text = urls.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("the URL list is not UTF-8 text") from None
        from vision.jobs.download import parse_url_list

        entries, rejects = parse_url_list(text)
        if not entries and not rejects:
            raise InvalidArgument("the URL list has no URLs")
        params["urls_inline"] = f"{len(entries) + len(rejects)} URLs"
    else:
        params["urls_path"] = _absolute(request.urls_path, "urls_path")
    o = request.options
    options: dict[str, Any] = {}
    for name, low, high in (
        ("concurrency", 1, 256),
        ("timeout_s", 0.1, 600),
        ("retries", 0, 10),
        ("max_bytes", 1024, 1 << 30),
        ("max_redirects", 0, 20),
        ("max_pixels", 64, 1e9),
    ):
        value = getattr(o, name)
        if value:
            _in_range(name, value, low, high)
            options[name] = value
    params["options"] = options
    return params, urls


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")


def finetune_params(request: jobs_pb2.SubmitFinetuneRequest) -> dict[str, Any]:
    if request.task not in TASKS:
        raise InvalidArgument(f"task {request.task!r}: use one of {', '.join(TASKS)}")
    if not request.base:
        raise InvalidArgument(
            "base is required: a registry URI (models:/NAME@ALIAS) or a model spec (efficientnet_lite0)"
        )
    from pydantic import ValidationError

    from vision.config.settings import ModelConfig
    from vision.core.errors import ConfigurationError

    try:
        ModelConfig.parse_spec(request.base)
    except (ValidationError, ConfigurationError) as exc:
        raise InvalidArgument(f"base {request.base!r}: {str(exc).splitlines()[0]}") from None
    if not _NAME.match(request.name):
        raise InvalidArgument(
            f"name {request.name!r}: 1-100 letters, digits, '_', '-', '.' (the registered model name)"
        )
    if request.promote_to:
        from vision.config.uri import check_alias

        try:
            check_alias(request.promote_to)
        except ConfigurationError as exc:
            raise InvalidArgument(str(exc)) from None
    o = request.options
    options: dict[str, Any] = {}
    limits = {
        "epochs": (1, 1000),
        "batch_size": (1, 4096),
        "lr": (1e-8, 10),
        "seed": (0, 2**31 - 1),
        "val_fraction": (0.01, 0.9),
        "workers": (0, 64),
        "head_epochs": (0, 1000),
        "sgd_lr": (1e-8, 10),
        "center_loss": (0, 100),
        "center_lr": (1e-8, 10),
        "pseudo_threshold": (0, 1),
        "pseudo_epochs": (0, 1000),
    }
    for name, (low, high) in limits.items():
        if o.HasField(name):
            value = getattr(o, name)
            _in_range(name, value, low, high)
            options[name] = value
    if o.HasField("pos_weight"):
        options["pos_weight"] = o.pos_weight
    if o.trainable and o.trainable not in ("all", "head", "last"):
        raise InvalidArgument(f"trainable {o.trainable!r}: all, head or last")
    for name in ("trainable", "preset", "device"):
        if getattr(o, name):
            options[name] = getattr(o, name)
    for name in ("labels", "unlabeled", "eval_data"):
        if getattr(o, name):
            options[name] = _absolute(getattr(o, name), name)
    return {
        "task": request.task,
        "data": _absolute(request.data, "data"),
        "base": request.base,
        "name": request.name,
        "promote_to": request.promote_to,
        "options": options,
    }


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, config: JobsConfig) -> None:
        self.store = JobStore(config)
        self.probe = RedisProbe(self.store)

    async def _store(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.probe.ok:
            # Fail fast with the probe's reason instead of waiting for a connect timeout per RPC.
            raise Unavailable(self.probe.reason)
        return await asyncio.to_thread(fn, *args, **kwargs)

    @rpc_method(SERVICE, "SubmitDownload")
    async def SubmitDownload(
        self, request: jobs_pb2.SubmitDownloadRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        # Off the event loop: an inline list may be tens of MB (up to --max-request-bytes), and parsing it
        # would stall every other RPC this process serves.
        params, urls = await asyncio.to_thread(download_params, request)
        view = await self._store(self.store.submit, DOWNLOAD, params, urls=urls)
        return jobs_pb2.SubmitJobResponse(job=job_message(view))

    @rpc_method(SERVICE, "SubmitFinetune")
    async def SubmitFinetune(
        self, request: jobs_pb2.SubmitFinetuneRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        params = finetune_params(request)
        view = await self._store(self.store.submit, FINETUNE, params)
        return jobs_pb2.SubmitJobResponse(job=job_message(view))

    @rpc_method(SERVICE, "GetJob")
    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return job_message(await self._store(self.store.get, request.id))

    @rpc_method(SERVICE, "ListJobs")
    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        limit = request.limit or 50
        _in_range("limit", limit, 1, 1000)
        states = [jobs_pb2.JobState.Name(s).removeprefix("JOB_STATE_") for s in request.states]
        views = await self._store(
            self.store.list, limit=limit, kind=_KIND_NAME.get(request.kind, ""), states=states
        )
        return jobs_pb2.ListJobsResponse(jobs=[job_message(v) for v in views])

    @rpc_method(SERVICE, "CancelJob")
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return job_message(await self._store(self.store.cancel, request.id))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        # A server stream: the unary error mapping (rpc_method) checks the job first, then events follow.
        view = await self._first(request, context)
        last = None
        while True:
            fingerprint = view.fingerprint()
            if fingerprint != last:
                last = fingerprint
                yield jobs_pb2.JobEvent(job=job_message(view), final=view.final)
            if view.final:
                return
            await asyncio.sleep(WATCH_POLL_S)
            try:
                view = await self._store(self.store.get, request.id)
            except Unavailable as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    @rpc_method(SERVICE, "WatchJob")
    async def _first(self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext) -> JobView:
        return await self._store(self.store.get, request.id)


def add_to_server(server: grpc.aio.Server, config: JobsConfig) -> RedisProbe:
    servicer = JobsServicer(config)
    jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    return servicer.probe
