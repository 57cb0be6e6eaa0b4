from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_DOWNLOAD: _ClassVar[JobKind]
    JOB_KIND_FINETUNE: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_RETRYING: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_DOWNLOAD: JobKind
JOB_KIND_FINETUNE: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_RETRYING: JobState
JOB_STATE_CANCELLING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class DownloadOptions(_message.Message):
    __slots__ = ("concurrency", "timeout_s", "retries", "max_bytes", "max_redirects", "max_pixels")
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    concurrency: int
    timeout_s: float
    retries: int
    max_bytes: int
    max_redirects: int
    max_pixels: int
    def __init__(self, concurrency: _Optional[int] = ..., timeout_s: _Optional[float] = ..., retries: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_redirects: _Optional[int] = ..., max_pixels: _Optional[int] = ...) -> None: ...

class SubmitDownloadRequest(_message.Message):
    __slots__ = ("urls", "urls_path", "out_dir", "options")
    URLS_FIELD_NUMBER: _ClassVar[int]
    URLS_PATH_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    urls: bytes
    urls_path: str
    out_dir: str
    options: DownloadOptions
    def __init__(self, urls: _Optional[bytes] = ..., urls_path: _Optional[str] = ..., out_dir: _Optional[str] = ..., options: _Optional[_Union[DownloadOptions, _Mapping]] = ...) -> None: ...

class FinetuneOptions(_message.Message):
    __slots__ = ("epochs", "batch_size", "lr", "seed", "val_fraction", "workers", "labels", "preset", "pos_weight", "trainable", "head_epochs", "sgd_lr", "center_loss", "center_lr", "unlabeled", "pseudo_threshold", "pseudo_epochs", "eval_data", "device")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    POS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    HEAD_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SGD_LR_FIELD_NUMBER: _ClassVar[int]
    CENTER_LOSS_FIELD_NUMBER: _ClassVar[int]
    CENTER_LR_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    val_fraction: float
    workers: int
    labels: str
    preset: str
    pos_weight: bool
    trainable: str
    head_epochs: int
    sgd_lr: float
    center_loss: float
    center_lr: float
    unlabeled: str
    pseudo_threshold: float
    pseudo_epochs: int
    eval_data: str
    device: str
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., val_fraction: _Optional[float] = ..., workers: _Optional[int] = ..., labels: _Optional[str] = ..., preset: _Optional[str] = ..., pos_weight: _Optional[bool] = ..., trainable: _Optional[str] = ..., head_epochs: _Optional[int] = ..., sgd_lr: _Optional[float] = ..., center_loss: _Optional[float] = ..., center_lr: _Optional[float] = ..., unlabeled: _Optional[str] = ..., pseudo_threshold: _Optional[float] = ..., pseudo_epochs: _Optional[int] = ..., eval_data: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class SubmitFinetuneRequest(_message.Message):
    __slots__ = ("task", "data", "base", "name", "promote_to", "options")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_TO_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    task: str
    data: str
    base: str
    name: str
    promote_to: str
    options: FinetuneOptions
    def __init__(self, task: _Optional[str] = ..., data: _Optional[str] = ..., base: _Optional[str] = ..., name: _Optional[str] = ..., promote_to: _Optional[str] = ..., options: _Optional[_Union[FinetuneOptions, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "kind", "states")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    limit: int
    kind: JobKind
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, limit: _Optional[int] = ..., kind: _Optional[_Union[JobKind, str]] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "message", "submitted_at", "started_at", "finished_at", "done", "total", "unit", "epoch", "epochs", "metrics", "attempt", "worker", "params", "result", "cancel_requested")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResultEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    state: JobState
    message: str
    submitted_at: float
    started_at: float
    finished_at: float
    done: int
    total: int
    unit: str
    epoch: int
    epochs: int
    metrics: _containers.ScalarMap[str, float]
    attempt: int
    worker: str
    params: _containers.ScalarMap[str, str]
    result: _containers.ScalarMap[str, str]
    cancel_requested: bool
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., submitted_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., unit: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., attempt: _Optional[int] = ..., worker: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., result: _Optional[_Mapping[str, str]] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "final")
    JOB_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    job: Job
    final: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., final: _Optional[bool] = ...) -> None: ...
