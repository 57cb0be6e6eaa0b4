"""What a running job uses on a worker: a lease (one runner per job), progress, cancel checks.

- **Lease.** a redis-py Lock on `<ns>:job:<id>:lease`, its token `host:pid:random`, with a 30 s TTL that a
  thread renews every 10 s.
  A second delivery of a job whose runner is alive (the visibility timeout passed while it ran) waits for
  the lease instead of running the job twice; a runner whose process died on this host is detected at
  once (its pid is gone), one on another host when its lease expires.
- **Progress** goes into Celery's task meta (state `PROGRESS`), at most every 0.5 s unless forced.
- **Cancel** is cooperative: `check_cancel()` reads the job's cancel flag, and job code calls it between
  batches (every URL of a download, every batch of a fine-tune), so a job stops within one batch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from vision.core import metrics
from vision.jobs.store import lease_holder_gone, lease_token

if TYPE_CHECKING:
    import redis
    from celery import Task

    from vision.jobs.store import JobStore

log = logging.getLogger(__name__)

LEASE_TTL_S = 30.0
PROGRESS_INTERVAL_S = 0.5


class JobCancelled(Exception):
    """Raised by `check_cancel` when the job was asked to stop."""


class JobFailed(Exception):
    """A permanent failure: bad input, a file that does not exist. Not retried; the message is the caller's."""


class TransientError(Exception):
    """Worth retrying after a backoff: the registry, Redis or a network share is briefly unavailable."""


class Lease:
    """One runner per job: a `redis.lock.Lock` on `key` whose token names its holder (`host:pid:random`),
    renewed by a thread while the job runs. Beyond the Lock: a holder that died on this host is taken over
    at once (its pid is gone), and `lost` is set when a renewal finds the lock taken over (job code checks
    it between batches through `JobRun.check_cancel`)."""

    def __init__(self, client: "redis.Redis", key: str, ttl_s: float = LEASE_TTL_S) -> None:
        from redis.lock import Lock

        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.token = lease_token()
        self.lost = threading.Event()
        # Not thread-local: the renewal thread extends the lock the job's thread took.
        self._lock = Lock(client, key, timeout=ttl_s, thread_local=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lease without waiting; False while another live runner holds it."""
        if self._lock.acquire(blocking=False, token=self.token) or (
            self._take_over_dead_holder() and self._lock.acquire(blocking=False, token=self.token)
        ):
            self._start()
            return True
        return False

    def _take_over_dead_holder(self) -> bool:
        """Free the lease if its holder is a process of this host that is gone; True if it was freed."""
        from redis.exceptions import LockNotOwnedError
        from redis.lock import Lock

        holder = self.client.get(self.key) or ""
        if isinstance(holder, bytes):
            holder = holder.decode(errors="replace")
        if not lease_holder_gone(holder):
            return False
        log.warning("job lease %s: its holder (%s, on this host) is gone; taking over", self.key, holder)
        try:
            # Deletes the key only while it still holds the dead runner's token.
            Lock(self.client, self.key, thread_local=False).do_release(holder)
        except LockNotOwnedError:
            pass  # it expired, or another runner freed it first: the acquire that follows decides
        return True

    def _start(self) -> None:
        from redis.exceptions import LockError, LockNotOwnedError

        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self._lock.reacquire()
                except LockNotOwnedError:
                    if self._stop.is_set():  # released while this renewal was on its way
                        return
                    log.error("job lease %s was lost (taken over after a stall?)", self.key)
                    self.lost.set()
                    return
                except LockError:  # released meanwhile
                    return
                except Exception as exc:  # Redis briefly away: keep trying until the TTL would pass
                    log.warning("renewing job lease %s failed: %s", self.key, exc)

        self._thread = threading.Thread(target=renew, name="job-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lease up (a lease already lost or expired, or Redis away, is left to expire by itself)."""
        self._stop.set()
        try:
            self._lock.release()
        except Exception:
            pass


class JobRun:
    """The running job as job code sees it: its parameters, where to keep files, progress and cancel."""

    def __init__(
        self,
        store: "JobStore",
        task: "Task",
        job_id: str,
        kind: str,
        params: dict[str, Any],
        *,
        attempt: int,
        worker: str,
        settings: Any,
    ) -> None:
        self.store = store
        self.task = task
        self.job_id = job_id
        self.kind = kind
        self.params = params
        self.attempt = attempt
        self.worker = worker
        self.settings = settings
        self.lease: Lease | None = None
        self.snapshot: dict[str, Any] = {
            "done": 0,
            "total": 0,
            "unit": "",
            "epoch": 0,
            "epochs": 0,
            "metrics": {},
            "message": "",
            "result": {},
        }
        self._last_write = 0.0
        self._gauge = metrics.JOB_PROGRESS.labels(kind=kind)

    def progress(self, *, force: bool = False, **fields: Any) -> None:
        """Update any of done, total, unit, epoch, epochs, metrics (merged), message, result (merged)."""
        for key, value in fields.items():
            if value is None:
                continue
            if key in ("metrics", "result"):
                self.snapshot[key] = {**self.snapshot[key], **value}
            else:
                self.snapshot[key] = value
        total = self.snapshot["total"]
        if total:
            self._gauge.set(min(1.0, self.snapshot["done"] / total))
        now = time.monotonic()
        if force or now - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_write = now
            try:
                self.task.update_state(task_id=self.job_id, state="PROGRESS", meta=self.snapshot)
                self.store.redis.hset(self.store.key(self.job_id), "progress", json.dumps(self.snapshot))
            except Exception as exc:  # Redis briefly away: the work goes on, progress catches up later
                log.warning("job %s: progress not written (%s)", self.job_id, exc)

    def ended(self) -> None:
        """The attempt is over, whatever its outcome: the progress gauge no longer counts it."""
        self._gauge.set(0)

    def check_cancel(self) -> None:
        try:
            cancel = self.store.redis.hget(self.store.key(self.job_id), "cancel")
        except Exception as exc:  # Redis briefly away: keep working (the lease TTL bounds how long)
            log.warning("job %s: cannot read the cancel flag (%s)", self.job_id, exc)
            cancel = None
        if cancel == "1":
            raise JobCancelled("cancelled by request")
        if self.lease is not None and self.lease.lost.is_set():
            raise TransientError("the job's lease was lost (another runner took the job over)")

    @property
    def work_dir(self) -> Any:
        """A folder of this job's own (checkpoints, MLflow files), kept across redeliveries."""
        from pathlib import Path

        path = Path(self.settings.jobs_work_dir) / self.job_id
        path.mkdir(parents=True, exist_ok=True)
        return path
