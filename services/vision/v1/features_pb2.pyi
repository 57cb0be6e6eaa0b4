from vision.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractRequest(_message.Message):
    __slots__ = ("model", "images", "recipe", "layer", "gem_p", "scales", "whitening", "dim", "float16")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GEM_P_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    WHITENING_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSelector
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    recipe: str
    layer: str
    gem_p: float
    scales: _containers.RepeatedScalarFieldContainer[float]
    whitening: str
    dim: int
    float16: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., recipe: _Optional[str] = ..., layer: _Optional[str] = ..., gem_p: _Optional[float] = ..., scales: _Optional[_Iterable[float]] = ..., whitening: _Optional[str] = ..., dim: _Optional[int] = ..., float16: _Optional[bool] = ...) -> None: ...

class Recipe(_message.Message):
    __slots__ = ("name", "layer", "gem_p", "scales", "whitening", "dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GEM_P_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    WHITENING_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: str
    gem_p: float
    scales: _containers.RepeatedScalarFieldContainer[float]
    whitening: str
    dim: int
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[str] = ..., gem_p: _Optional[float] = ..., scales: _Optional[_Iterable[float]] = ..., whitening: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class Descriptor(_message.Message):
    __slots__ = ("image_id", "values", "values_f16")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUES_F16_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    values_f16: bytes
    def __init__(self, image_id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., values_f16: _Optional[bytes] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("model", "recipe", "dim", "descriptors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    recipe: Recipe
    dim: int
    descriptors: _containers.RepeatedCompositeFieldContainer[Descriptor]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., recipe: _Optional[_Union[Recipe, _Mapping]] = ..., dim: _Optional[int] = ..., descriptors: _Optional[_Iterable[_Union[Descriptor, _Mapping]]] = ...) -> None: ...

class FeatureModel(_message.Message):
    __slots__ = ("model", "recipes", "layers", "whitenings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECIPES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WHITENINGS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    recipes: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[str]
    whitenings: _containers.RepeatedCompositeFieldContainer[WhiteningInfo]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., recipes: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[str]] = ..., whitenings: _Optional[_Iterable[_Union[WhiteningInfo, _Mapping]]] = ...) -> None: ...

class WhiteningInfo(_message.Message):
    __slots__ = ("name", "kind", "input_dim", "max_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    input_dim: int
    max_dim: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., input_dim: _Optional[int] = ..., max_dim: _Optional[int] = ...) -> None: ...

class ListFeatureModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[FeatureModel]
    def __init__(self, models: _Optional[_Iterable[_Union[FeatureModel, _Mapping]]] = ...) -> None: ...
