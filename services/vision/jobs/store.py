"""Job records in Redis, next to Celery's result backend: what the Jobs service reads and writes.

A job is one Celery task whose task id is the job id. Its state and progress are Celery's task meta in the
result backend (`PROGRESS` with the progress while it runs, then `SUCCESS` / `FAILURE` / `REVOKED`); this
module adds, under the namespace, what Celery does not keep for a job that has not started yet:

    <ns>:job:<id>        hash: kind, params (JSON), submitted_at, cancel flag, attempt, worker, started_at,
                         finished_at, final (the outcome once ended), message, progress (last snapshot)
    <ns>:job:<id>:lease  the runner that holds the job (vision.jobs.runtime), with a TTL it renews
    <ns>:job:<id>:urls   an inline URL list (zlib), until the download job has read it
    <ns>:jobs            sorted set of job ids by submit time (ListJobs)

Everything survives a restart of the Jobs service; finished jobs expire after `result_ttl_s`.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vision.config.jobs import JobsConfig
from vision.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    import redis
    from celery import Celery

DOWNLOAD, FINETUNE = "download", "finetune"
KINDS = (DOWNLOAD, FINETUNE)
# Job states as the Jobs service reports them (vision.v1.JobState without the prefix).
QUEUED, RUNNING, RETRYING, CANCELLING = "QUEUED", "RUNNING", "RETRYING", "CANCELLING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
MAX_INLINE_URLS = 16 * 1024 * 1024


@dataclass
class JobView:
    """One job as the service reports it (every field of vision.v1.Job)."""

    id: str
    kind: str
    state: str
    message: str = ""
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    done: int = 0
    total: int = 0
    unit: str = ""
    epoch: int = 0
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 0
    worker: str = ""
    params: dict[str, str] = field(default_factory=dict)
    result: dict[str, str] = field(default_factory=dict)
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def fingerprint(self) -> tuple[Any, ...]:
        """What a watcher compares to decide whether to send an event."""
        return (
            self.state,
            self.message,
            self.done,
            self.total,
            self.epoch,
            tuple(sorted(self.metrics.items())),
            self.attempt,
            self.worker,
            self.cancel_requested,
            tuple(sorted(self.result.items())),
        )


def redis_client(config: JobsConfig) -> "redis.Redis":
    import redis

    return redis.Redis.from_url(
        config.redis_url,
        socket_connect_timeout=3,
        socket_timeout=10,
        decode_responses=True,
        health_check_interval=10,
    )


class JobStore:
    """Submit, read, list and cancel jobs. Synchronous (redis-py); the servicer calls it on a thread."""

    def __init__(self, config: JobsConfig, app: "Celery | None" = None) -> None:
        self.config = config
        self.redis = redis_client(config)
        self._app = app

    @property
    def app(self) -> "Celery":
        if self._app is None:
            from vision.jobs.app import make_app

            self._app = make_app(self.config)
        return self._app

    # -- keys
    def key(self, job_id: str, suffix: str = "") -> str:
        return f"{self.config.namespace}:job:{job_id}" + (f":{suffix}" if suffix else "")

    @property
    def index_key(self) -> str:
        return f"{self.config.namespace}:jobs"

    def ping(self) -> None:
        """Raises Unavailable (with the reason) when Redis does not answer."""
        self._call(self.redis.ping)

    # -- service side
    def submit(self, kind: str, params: Mapping[str, Any], *, urls: bytes | None = None) -> JobView:
        import redis

        from vision.config.jobs import DOWNLOAD_TASK, FINETUNE_TASK

        if kind not in KINDS:
            raise InvalidArgument(f"unknown job kind {kind!r}")
        if urls is not None and len(urls) > MAX_INLINE_URLS:
            raise InvalidArgument(
                f"the URL list is {len(urls)} bytes, over the {MAX_INLINE_URLS}-byte limit of an inline list: put it "
                "on the workers' filesystem and send urls_path"
            )
        job_id = uuid.uuid4().hex
        now = time.time()
        record = {
            "kind": kind,
            "params": json.dumps(dict(params), sort_keys=True),
            "submitted_at": repr(now),
            "cancel": "0",
            "attempt": "0",
        }
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.key(job_id), mapping=record)
            pipe.zadd(self.index_key, {job_id: now})
            if urls is not None:
                pipe.set(self.key(job_id, "urls"), zlib.compress(urls).hex(), ex=self.config.result_ttl_s)
            pipe.execute()
            task = DOWNLOAD_TASK if kind == DOWNLOAD else FINETUNE_TASK
            self.app.send_task(task, args=[job_id], task_id=job_id)
        except (redis.RedisError, OSError) as exc:
            self._forget(job_id)
            raise Unavailable(
                f"cannot queue the job: Redis at {self.config.redacted_url()} is unreachable ({exc})"
            ) from None
        except Exception as exc:  # kombu raises its own OperationalError when the broker is down
            self._forget(job_id)
            raise Unavailable(f"cannot queue the job: {exc}") from None
        return self.get(job_id)

    def _forget(self, job_id: str) -> None:
        try:
            self.redis.delete(self.key(job_id), self.key(job_id, "urls"))
            self.redis.zrem(self.index_key, job_id)
        except Exception:  # Redis is down: nothing was written either
            pass

    def get(self, job_id: str) -> JobView:
        if not job_id or len(job_id) > 64 or not job_id.isalnum():
            raise NotFound(f"job {job_id!r} not found (job ids are 32 hex digits)")
        record = self._call(lambda: self.redis.hgetall(self.key(job_id)))
        if not record:
            raise NotFound(f"job {job_id} not found (unknown, or expired after {self.config.result_ttl_s} s)")
        return self._view(job_id, record, self._meta(job_id), self._lease_alive(job_id))

    def list(self, *, limit: int = 50, kind: str = "", states: Iterable[str] = ()) -> list[JobView]:
        wanted = set(states)
        out: list[JobView] = []
        start = 0
        while len(out) < limit:
            ids = self._call(lambda s=start: self.redis.zrevrange(self.index_key, s, s + 199))
            if not ids:
                break
            start += len(ids)
            for job_id in ids:
                try:
                    view = self.get(job_id)
                except NotFound:  # expired: drop it from the index too
                    self._call(lambda j=job_id: self.redis.zrem(self.index_key, j))
                    continue
                if (kind and view.kind != kind) or (wanted and view.state not in wanted):
                    continue
                out.append(view)
                if len(out) == limit:
                    break
        return out

    def cancel(self, job_id: str) -> JobView:
        view = self.get(job_id)
        if view.final:
            raise FailedPrecondition(
                f"job {job_id} has already ended ({view.state.lower()}); nothing to cancel"
            )
        self._call(lambda: self.redis.hset(self.key(job_id), "cancel", "1"))
        try:
            # Workers that already hold the message drop it (a queued job never starts); a running job sees the
            # cancel flag at its next batch boundary (vision.jobs.runtime).
            self.app.control.revoke(job_id)
        except Exception:  # the broadcast is a shortcut; the flag is what counts
            pass
        if view.state in (QUEUED, RETRYING) and not view.started_at:
            self._finish_unstarted(job_id)
        return self.get(job_id)

    def _finish_unstarted(self, job_id: str) -> None:
        """A queued job cancelled before any worker took it: record its end now (a worker that receives
        its message later sees the record and drops it)."""
        now = time.time()
        claimed = self._call(lambda: self.redis.hsetnx(self.key(job_id), "final", CANCELLED))
        if not claimed:
            return
        self._call(
            lambda: self.redis.hset(
                self.key(job_id), mapping={"finished_at": repr(now), "message": "cancelled before it started"}
            )
        )
        try:
            from celery.exceptions import TaskRevokedError

            self.app.backend.store_result(job_id, TaskRevokedError("cancelled before it started"), "REVOKED")
        except Exception:
            pass
        self.expire(job_id)

    def expire(self, job_id: str) -> None:
        ttl = self.config.result_ttl_s
        pipe = self.redis.pipeline()
        for suffix in ("", "urls", "lease"):
            pipe.expire(self.key(job_id, suffix), ttl)
        pipe.execute()

    def inline_urls(self, job_id: str) -> bytes | None:
        raw = self.redis.get(self.key(job_id, "urls"))
        return zlib.decompress(bytes.fromhex(raw)) if raw else None

    # -- reading
    def _call(self, fn: Any) -> Any:
        import redis

        try:
            return fn()
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(
                f"the jobs backend (Redis at {self.config.redacted_url()}) is unreachable: {exc}"
            ) from None

    def _meta(self, job_id: str) -> dict[str, Any]:
        """Celery's task meta as stored (exceptions left as their JSON description)."""
        backend = self.app.backend
        raw = self._call(lambda: backend.get(backend.get_key_for_task(job_id)))
        if not raw:
            return {}
        try:
            return dict(backend.decode(raw))
        except Exception:
            return {}

    def _lease_alive(self, job_id: str) -> bool:
        """A runner holds the job: its lease exists (renewed every 10 s, 30 s TTL) and, when it runs on this
        host, its process is alive (a SIGKILLed runner is seen at once, not after the TTL)."""
        holder = self._call(lambda: self.redis.get(self.key(job_id, "lease")))
        return bool(holder) and not lease_holder_gone(holder)

    @staticmethod
    def _view(job_id: str, record: dict[str, str], meta: dict[str, Any], lease_alive: bool) -> JobView:
        status = meta.get("status", "PENDING")
        result = meta.get("result")
        progress: dict[str, Any] = {}
        if record.get("progress"):
            progress = json.loads(record["progress"])
        if status in ("PROGRESS", "SUCCESS") and isinstance(result, dict):
            progress = {**progress, **result}
        cancel = record.get("cancel") == "1"
        final = record.get("final", "")
        message = str(progress.get("message", ""))
        if final:
            state = final
            message = record.get("message", message)
        elif status == "SUCCESS":
            state = SUCCEEDED
        elif status == "FAILURE":
            state, message = FAILED, _exception_message(result) or message
        elif status == "REVOKED":
            state = CANCELLED
        elif status == "RETRY":
            state, message = RETRYING, f"retrying after a transient error: {_exception_message(result)}"
        elif status in ("STARTED", "PROGRESS"):
            if lease_alive:
                state = CANCELLING if cancel else RUNNING
            else:
                # The runner is gone (its pool process or node died): the message is back in the queue or
                # will be after the visibility timeout, and the next delivery resumes the job.
                state = CANCELLING if cancel else QUEUED
                message = f"worker lost during attempt {record.get('attempt', '?')}; waiting for redelivery"
        else:
            state = CANCELLING if cancel and record.get("started_at") else QUEUED
        params = json.loads(record.get("params") or "{}")
        return JobView(
            id=job_id,
            kind=record.get("kind", ""),
            state=state,
            message=message,
            submitted_at=float(record.get("submitted_at") or 0),
            started_at=float(record.get("started_at") or 0),
            finished_at=float(record.get("finished_at") or 0),
            done=int(progress.get("done", 0)),
            total=int(progress.get("total", 0)),
            unit=str(progress.get("unit", "")),
            epoch=int(progress.get("epoch", 0)),
            epochs=int(progress.get("epochs", 0)),
            metrics={str(k): float(v) for k, v in (progress.get("metrics") or {}).items()},
            attempt=int(record.get("attempt") or 0),
            worker=record.get("worker", ""),
            params={k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()},
            result={
                k: v if isinstance(v, str) else json.dumps(v)
                for k, v in (progress.get("result") or {}).items()
            },
            cancel_requested=cancel,
        )


def lease_token() -> str:
    """A job lease's token: `host:pid:random`, so that anyone on the same host can tell a dead holder."""
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_holder_gone(token: str) -> bool:
    """True when the lease token names a process of this host that no longer exists: a SIGKILLed runner is
    seen at once, not after the lease's TTL. A holder on another host is never judged from here."""
    import os
    import socket

    host, _, rest = token.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _exception_message(result: Any) -> str:
    if isinstance(result, dict):
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(m) for m in message)
        kind = result.get("exc_type", "")
        return f"{kind}: {message}" if kind and kind not in ("JobFailed",) else str(message or "")
    return str(result or "")
