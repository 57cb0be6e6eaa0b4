"""The Celery tasks: `vision.jobs.download` and `vision.jobs.finetune`, each taking only the job id.

Every delivery of a job runs the same steps, so redelivery after a crash is safe:
1. a job that has ended (its record says so) is not run again; a job cancelled while queued never starts;
2. the job lease is taken (vision.jobs.runtime.Lease): a second delivery while a runner is alive waits;
3. `attempt` is counted (a job whose worker was lost `MAX_DELIVERIES` times fails), and the job code runs: it resumes from what an earlier attempt left (a download
   skips the URLs it has journaled, a fine-tune loads its latest checkpoint);
4. the outcome is recorded: SUCCESS with the result, FAILURE with the message, REVOKED for a cancel.
Transient errors (vision.jobs.runtime.TransientError, Redis/connection errors) are retried with
exponential backoff, at most `MAX_RETRIES` times; everything else fails the job at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vision.config.jobs import DOWNLOAD_TASK, FINETUNE_TASK
from vision.core import metrics

if TYPE_CHECKING:
    from celery import Celery, Task

    from vision.jobs.runtime import JobRun

log = logging.getLogger(__name__)

MAX_RETRIES = 4
# Deliveries of one job (redeliveries after a lost worker included) before it is failed.
MAX_DELIVERIES = 5
BACKOFF_S = (5, 15, 45, 120)
WAIT_FOR_LEASE_S = 2.0


def register(app: "Celery") -> None:
    @app.task(name=DOWNLOAD_TASK, bind=True, max_retries=MAX_RETRIES)
    def download(self: "Task", job_id: str) -> dict[str, Any]:
        from vision.jobs.download import run_download_job

        return _run(self, job_id, "download", run_download_job)

    @app.task(name=FINETUNE_TASK, bind=True, max_retries=MAX_RETRIES)
    def finetune(self: "Task", job_id: str) -> dict[str, Any]:
        from training.finetune import run_finetune_job

        return _run(self, job_id, "finetune", run_finetune_job)


def worker_settings(app: "Celery") -> Any:
    settings = getattr(app.conf, "vision_worker", None)
    if settings is None:
        from vision.jobs.settings import WorkerSettings

        settings = WorkerSettings()
        app.conf.vision_worker = settings
    return settings


def _run(task: "Task", job_id: str, kind: str, body: Callable[["JobRun"], dict[str, Any]]) -> dict[str, Any]:
    import redis
    from celery.exceptions import Ignore, TaskRevokedError

    from vision.jobs.runtime import JobCancelled, JobFailed, JobRun, Lease, TransientError
    from vision.jobs.store import CANCELLED, FAILED, SUCCEEDED, JobStore

    config = task.app.conf.vision_jobs
    store = JobStore(config, app=task.app)
    key = store.key(job_id)
    record = store.redis.hgetall(key)
    if not record:
        log.warning("job %s: no record (expired or never submitted); dropping its message", job_id)
        raise Ignore()
    if record.get("final"):
        log.info("job %s already ended (%s); dropping a late delivery", job_id, record["final"])
        raise Ignore()
    params = json.loads(record.get("params") or "{}")
    if record.get("cancel") == "1" and not record.get("started_at"):
        _finish(store, job_id, kind, CANCELLED, "cancelled before it started", {}, started=None)
        task.backend.store_result(job_id, TaskRevokedError("cancelled before it started"), "REVOKED")
        raise Ignore()

    lease = Lease(store.redis, store.key(job_id, "lease"))
    waited = False
    while not lease.acquire():
        if not waited:
            log.warning("job %s: another runner holds it (a second delivery); waiting for it to end", job_id)
            waited = True
        time.sleep(WAIT_FOR_LEASE_S)
        if store.redis.hget(key, "final"):
            raise Ignore()
    worker = f"{task.request.hostname or socket.gethostname()} pid {os.getpid()}"
    started = time.time()
    attempt = int(store.redis.hincrby(key, "attempt", 1))
    store.redis.hsetnx(key, "started_at", repr(started))
    if attempt > MAX_DELIVERIES:
        # A job that takes its worker down every time (out of memory, a crashing library) must not loop forever.
        lease.release()
        message = f"the worker was lost {attempt - 1} times running this job (out of memory?); giving up"
        _finish(
            store, job_id, kind, FAILED, message, json.loads(record.get("progress") or "{}"), started=None
        )
        task.backend.mark_as_failure(job_id, RuntimeError(message))
        raise Ignore()
    store.redis.hset(key, "worker", worker)
    settings = worker_settings(task.app)
    run = JobRun(store, task, job_id, kind, params, attempt=attempt, worker=worker, settings=settings)
    run.lease = lease
    running = metrics.JOBS_RUNNING.labels(kind=kind)
    running.inc()
    log.info("job %s (%s) attempt %d on %s", job_id, kind, attempt, worker)
    try:
        previous = json.loads(record.get("progress") or "{}")
        run.snapshot.update({k: v for k, v in previous.items() if k in run.snapshot})
        run.progress(
            message=f"started (attempt {attempt})"
            if attempt == 1
            else f"resumed after a lost worker (attempt {attempt})",
            force=True,
        )
        run.check_cancel()
        result = body(run)
        run.progress(result=result, message="done", force=True)
        _finish(store, job_id, kind, SUCCEEDED, "done", run.snapshot, started=started)
        return run.snapshot
    except JobCancelled:
        message = f"cancelled at {_where(run)}"
        run.progress(message=message, force=True)
        _finish(store, job_id, kind, CANCELLED, message, run.snapshot, started=started)
        task.backend.store_result(job_id, TaskRevokedError(message), "REVOKED")
        raise Ignore() from None
    except JobFailed as exc:
        _finish(store, job_id, kind, FAILED, str(exc), run.snapshot, started=started)
        raise
    except (TransientError, ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError) as exc:
        retries = task.request.retries or 0
        if retries >= MAX_RETRIES:
            _finish(
                store,
                job_id,
                kind,
                FAILED,
                f"gave up after {retries + 1} attempts: {exc}",
                run.snapshot,
                started=started,
            )
            raise
        countdown = BACKOFF_S[min(retries, len(BACKOFF_S) - 1)]
        log.warning("job %s: transient error, retrying in %ds: %s", job_id, countdown, exc)
        store.redis.hset(key, "message", f"retrying in {countdown}s after: {exc}")
        raise task.retry(exc=exc, countdown=countdown) from None
    except Ignore:
        raise
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _finish(store, job_id, kind, FAILED, f"{type(exc).__name__}: {exc}", run.snapshot, started=started)
        raise
    finally:
        running.dec()
        run.ended()
        lease.release()


def _where(run: "JobRun") -> str:
    s = run.snapshot
    if s.get("epochs"):
        return f"epoch {s['epoch']}/{s['epochs']}, {s.get('done', 0)}/{s.get('total', 0)} {s.get('unit', '')}".rstrip()
    return f"{s.get('done', 0)}/{s.get('total', 0)} {s.get('unit', '')}".rstrip()


def _finish(
    store: Any,
    job_id: str,
    kind: str,
    state: str,
    message: str,
    snapshot: dict[str, Any],
    *,
    started: float | None,
) -> None:
    now = time.time()
    key = store.key(job_id)
    if not store.redis.hsetnx(key, "final", state):
        return
    store.redis.hset(
        key,
        mapping={
            "finished_at": repr(now),
            "message": message,
            "progress": json.dumps({**snapshot, "message": message}),
        },
    )
    store.expire(job_id)
    metrics.JOBS_FINISHED.labels(kind=kind, state=state.lower()).inc()
    if started is not None:
        metrics.JOB_DURATION.labels(kind=kind, state=state.lower()).observe(now - started)
