"""The Celery app of the jobs, built from a JobsConfig.

Delivery is at-least-once and every task is idempotent, keyed by its job id (vision.runners.job_tasks):
- `task_acks_late`: a job's message is acknowledged only when the job has ended, so a job whose worker dies
  is delivered again;
- `task_reject_on_worker_lost`: when the pool process running a job dies (SIGKILL, the OOM killer) the
  worker puts the message back on its queue at once, and the next free worker resumes the job;
- a whole worker node that dies leaves its message unacknowledged in Redis: it becomes visible again after
  `visibility_timeout_s` (kombu's Redis transport), so that timeout must exceed the longest job, or a
  job still running would be delivered a second time (the job lease in vision.jobs.runtime then makes the
  second delivery wait instead of running twice);
- `worker_prefetch_multiplier=1`: a worker reserves one job per pool process, so a train worker (one pool
  process) never holds a second fine-tune that another worker could run.

`celery -A vision.jobs.app flower` (or `inspect`, `events`) works against the same Redis: the module-level
`app` is built from the environment (VISION_REDIS_URL, VISION_JOBS_NAMESPACE), as the workers are.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vision.config.jobs import DOWNLOAD, DOWNLOAD_TASK, FINETUNE_TASK, TRAIN, JobsConfig

if TYPE_CHECKING:
    from celery import Celery

def make_app(config: JobsConfig) -> "Celery":
    from celery import Celery

    app = Celery(
        f"{config.namespace}-jobs", broker=config.redis_url, backend=config.redis_url, set_as_current=False
    )
    transport = {
        # Every kombu key (queues, unacked messages, bindings) and result key under the namespace.
        "global_keyprefix": config.key_prefix,
        "visibility_timeout": config.visibility_timeout_s,
        # Sweep for messages of dead workers every 10 s (kombu scans only every Nth sweep by default).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 10,
    }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        result_expires=config.result_ttl_s,
        broker_transport_options=transport,
        result_backend_transport_options={
            "global_keyprefix": config.key_prefix,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_default_queue=config.queue(DOWNLOAD),
        task_routes={
            DOWNLOAD_TASK: {"queue": config.queue(DOWNLOAD)},
            FINETUNE_TASK: {"queue": config.queue(TRAIN)},
        },
        task_create_missing_queues=True,
        # Broadcasts (revoke, inspect) and events on exchanges of this namespace only.
        control_exchange=f"{config.namespace}.celery",
        event_exchange=f"{config.namespace}.celeryev",
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # A job that died mid-run must not be marked done: keep the message until it ends (see above).
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    # The config the tasks read. The tasks themselves are registered by the worker (vision.runners.job_tasks):
    # submitting, inspecting and cancelling go by task name and need none of the code a job runs.
    app.conf.vision_jobs = config
    return app


def config_from_env() -> JobsConfig:
    values: dict[str, Any] = {}
    for field, env in (
        ("redis_url", "VISION_REDIS_URL"),
        ("namespace", "VISION_JOBS_NAMESPACE"),
        ("visibility_timeout_s", "VISION_JOBS_VISIBILITY_TIMEOUT_S"),
        ("result_ttl_s", "VISION_JOBS_RESULT_TTL_S"),
    ):
        if os.environ.get(env):
            values[field] = os.environ[env]
    return JobsConfig(**values)


def __getattr__(name: str) -> Any:
    # `celery -A vision.jobs.app flower|inspect|events`: the app of the environment's configuration.
    if name in ("app", "celery"):
        return make_app(config_from_env())
    raise AttributeError(name)


__all__ = ["make_app", "config_from_env"]
