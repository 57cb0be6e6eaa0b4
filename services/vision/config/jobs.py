"""Where jobs live: the Redis URL, the key namespace and the queue names, shared by the Jobs service, the
workers and the CLI so that all three agree.

Everything a deployment shares is in one namespace (default `vision`): Celery's queues (`vision.download`,
`vision.train`), kombu's bookkeeping and the result backend's keys are all prefixed with `vision:` in
Redis, so two deployments (or two test sessions) can share one Redis without seeing each other's jobs.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DOWNLOAD, TRAIN = "download", "train"
QUEUES = (DOWNLOAD, TRAIN)
# Celery task names: what the service submits and the worker registers. Names, not module paths: a job queued
# by one release must still be found by the next, wherever its code lives.
DOWNLOAD_TASK = "vision.jobs.download"
FINETUNE_TASK = "vision.jobs.finetune"
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class JobsConfig(BaseModel):
    """The shared part of the Jobs configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis for Celery's broker and result backend.")
    namespace: str = Field("vision", description="Prefix of every queue and Redis key of this deployment.")
    # How long an unacknowledged job may run before Redis hands it to another worker (see docs/jobs.md:
    # it must exceed the longest job; a lost pool process is redelivered at once regardless).
    visibility_timeout_s: int = Field(6 * 3600, ge=1, description="Broker visibility timeout.")
    # How long finished jobs (records, progress, results) are kept.
    result_ttl_s: int = Field(30 * 24 * 3600, ge=60, description="Lifetime of finished jobs' records.")

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("the Jobs backend is Redis: redis://HOST:PORT/DB, rediss://... or unix://PATH")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("namespace: 1-64 letters, digits, '_', '.', '-'")
        return value

    def queue(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    @property
    def key_prefix(self) -> str:
        return f"{self.namespace}:"

    def redacted_url(self) -> str:
        from vision.config.uri import redact

        return redact(self.redis_url)
