"""What a job worker is allowed and told: `vision worker`'s settings (flags or VISION_* variables), and the
path check every job applies to the paths it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vision.config.jobs import DEFAULT_REDIS_URL, QUEUES, JobsConfig


def _default_work_dir() -> Path:
    from vision.config.uri import data_dir

    return data_dir() / "jobs"


class WorkerSettings(BaseSettings):
    """Everything a worker needs; flags of `vision worker`, or environment variables VISION_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore")

    queues: Annotated[list[Literal["download", "train"]], NoDecode] = Field(
        default_factory=lambda: list(QUEUES), description="Queues to consume, comma-separated."
    )
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis: Celery broker and result backend.")
    jobs_namespace: str = Field(
        "vision", description="Prefix of the queues and Redis keys (one per deployment)."
    )
    jobs_visibility_timeout_s: int = Field(
        6 * 3600,
        ge=1,
        description="Seconds before an unacknowledged job of a lost worker node is delivered again; must exceed "
        "the longest job (see docs/jobs.md).",
    )
    jobs_result_ttl_s: int = Field(30 * 24 * 3600, ge=60, description="Lifetime of finished jobs' records.")
    concurrency: int = Field(
        2, ge=1, le=64, description="Download jobs at once per node (train nodes: always 1)."
    )
    download_allow_private_addresses: str = Field(
        "",
        description="Let download jobs fetch non-public addresses: 1/all, or comma-separated networks "
        "(127.0.0.0/8,...). Off by default (SSRF protection); only the operator can set it.",
    )
    jobs_work_dir: Path = Field(
        default_factory=_default_work_dir,
        description="Per-job folders (checkpoints, curves): shared by every train worker that may resume a job.",
    )
    jobs_data_root: Path | None = Field(
        None, description="When set, every path a job names (data, output, URL list) must lie under it."
    )
    registry_uri: str | None = Field(
        None, description="Model registry store (as vision registry --registry-uri)."
    )
    registry_artifact_root: str | None = Field(None, description="Registry artifact root.")
    device: str = Field(
        "", description="torch device of fine-tunes: cpu, cuda, cuda:1 (default: cuda if present)."
    )
    threads: int = Field(0, ge=0, description="torch threads of a fine-tune (0: the usable CPUs).")
    host: str = Field("127.0.0.1", description="Address of the /metrics endpoint.")
    metrics_port: int = Field(
        9465, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("queues", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [q.strip() for q in value.split(",") if q.strip()]
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"name each queue once: {', '.join(QUEUES)}")
        return value

    @field_validator("download_allow_private_addresses")
    @classmethod
    def _allow(cls, value: str) -> str:
        from vision.jobs.fetch import parse_allow

        parse_allow(value)
        return value

    def allow_private(self) -> Any:
        from vision.jobs.fetch import parse_allow

        return parse_allow(self.download_allow_private_addresses)

    def jobs_config(self) -> JobsConfig:
        return JobsConfig(
            redis_url=self.redis_url,
            namespace=self.jobs_namespace,
            visibility_timeout_s=self.jobs_visibility_timeout_s,
            result_ttl_s=self.jobs_result_ttl_s,
        )


def check_path(settings: WorkerSettings, value: str, what: str) -> Path:
    """`value` as an absolute path, refused (JobFailed) when outside the data root."""
    from vision.jobs.runtime import JobFailed

    path = Path(value).expanduser()
    if not path.is_absolute():
        raise JobFailed(f"{what} {value!r} must be an absolute path on the workers' filesystem")
    if settings.jobs_data_root is not None:
        root = Path(settings.jobs_data_root).resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise JobFailed(f"{what} {value!r} is outside the workers' data root {root}")
    return path
