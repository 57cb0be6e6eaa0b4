from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("id", "content")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    content: bytes
    def __init__(self, id: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class ModelSelector(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("preset", "resize_shorter", "crop_size", "mean", "std", "channel_order")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SHORTER_FIELD_NUMBER: _ClassVar[int]
    CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    preset: str
    resize_shorter: int
    crop_size: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channel_order: str
    def __init__(self, preset: _Optional[str] = ..., resize_shorter: _Optional[int] = ..., crop_size: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channel_order: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "num_labels", "preprocessing", "backend", "weights_sha256", "task", "num_tag_labels", "random_weights", "outputs", "input_geometry", "metrics", "registry", "precision")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_TAG_LABELS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    num_labels: int
    preprocessing: Preprocessing
    backend: str
    weights_sha256: str
    task: str
    num_tag_labels: int
    random_weights: bool
    outputs: _containers.RepeatedCompositeFieldContainer[OutputInfo]
    input_geometry: InputGeometry
    metrics: _containers.ScalarMap[str, float]
    registry: RegistryStatus
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., num_labels: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., backend: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., task: _Optional[str] = ..., num_tag_labels: _Optional[int] = ..., random_weights: _Optional[bool] = ..., outputs: _Optional[_Iterable[_Union[OutputInfo, _Mapping]]] = ..., input_geometry: _Optional[_Union[InputGeometry, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., registry: _Optional[_Union[RegistryStatus, _Mapping]] = ..., precision: _Optional[str] = ...) -> None: ...

class RegistryStatus(_message.Message):
    __slots__ = ("uri", "alias", "alias_version", "serving_version", "refused_version", "refused_check", "refused_reason", "checked_at", "error", "run_id")
    URI_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSED_CHECK_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    uri: str
    alias: str
    alias_version: str
    serving_version: str
    refused_version: str
    refused_check: str
    refused_reason: str
    checked_at: float
    error: str
    run_id: str
    def __init__(self, uri: _Optional[str] = ..., alias: _Optional[str] = ..., alias_version: _Optional[str] = ..., serving_version: _Optional[str] = ..., refused_version: _Optional[str] = ..., refused_check: _Optional[str] = ..., refused_reason: _Optional[str] = ..., checked_at: _Optional[float] = ..., error: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class OutputInfo(_message.Message):
    __slots__ = ("name", "channels", "stride")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    stride: int
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class InputGeometry(_message.Message):
    __slots__ = ("crop_size", "variable", "max_side")
    CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    crop_size: int
    variable: bool
    max_side: int
    def __init__(self, crop_size: _Optional[int] = ..., variable: _Optional[bool] = ..., max_side: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
