from vision.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TagRequest(_message.Message):
    __slots__ = ("model", "images", "threshold", "max_tags", "min_score")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_TAGS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSelector
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    threshold: float
    max_tags: int
    min_score: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., threshold: _Optional[float] = ..., max_tags: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class Tag(_message.Message):
    __slots__ = ("index", "label", "wnid", "score", "from_hierarchy", "depth")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WNID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FROM_HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    wnid: str
    score: float
    from_hierarchy: bool
    depth: int
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., wnid: _Optional[str] = ..., score: _Optional[float] = ..., from_hierarchy: _Optional[bool] = ..., depth: _Optional[int] = ...) -> None: ...

class ImageTags(_message.Message):
    __slots__ = ("image_id", "tags")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    def __init__(self, image_id: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ("model", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    results: _containers.RepeatedCompositeFieldContainer[ImageTags]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ImageTags, _Mapping]]] = ...) -> None: ...
