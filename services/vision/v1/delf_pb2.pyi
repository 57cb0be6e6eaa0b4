from vision.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DelfExtractOptions(_message.Message):
    __slots__ = ("scales", "max_keypoints", "score_threshold", "max_image_side", "nms_iou", "skip_pca")
    SCALES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    NMS_IOU_FIELD_NUMBER: _ClassVar[int]
    SKIP_PCA_FIELD_NUMBER: _ClassVar[int]
    scales: _containers.RepeatedScalarFieldContainer[float]
    max_keypoints: int
    score_threshold: float
    max_image_side: int
    nms_iou: float
    skip_pca: bool
    def __init__(self, scales: _Optional[_Iterable[float]] = ..., max_keypoints: _Optional[int] = ..., score_threshold: _Optional[float] = ..., max_image_side: _Optional[int] = ..., nms_iou: _Optional[float] = ..., skip_pca: _Optional[bool] = ...) -> None: ...

class DelfExtractRequest(_message.Message):
    __slots__ = ("model", "images", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSelector
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    options: DelfExtractOptions
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., options: _Optional[_Union[DelfExtractOptions, _Mapping]] = ...) -> None: ...

class DelfKeypoint(_message.Message):
    __slots__ = ("x", "y", "scale", "score")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    scale: float
    score: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., scale: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class DelfFeatures(_message.Message):
    __slots__ = ("image_width", "image_height", "keypoints", "descriptor_dim", "descriptors", "model")
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_DIM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    image_width: int
    image_height: int
    keypoints: _containers.RepeatedCompositeFieldContainer[DelfKeypoint]
    descriptor_dim: int
    descriptors: bytes
    model: _common_pb2.ModelInfo
    def __init__(self, image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., keypoints: _Optional[_Iterable[_Union[DelfKeypoint, _Mapping]]] = ..., descriptor_dim: _Optional[int] = ..., descriptors: _Optional[bytes] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class DelfExtractResult(_message.Message):
    __slots__ = ("image_id", "features")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    features: DelfFeatures
    def __init__(self, image_id: _Optional[str] = ..., features: _Optional[_Union[DelfFeatures, _Mapping]] = ...) -> None: ...

class DelfExtractResponse(_message.Message):
    __slots__ = ("model", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    results: _containers.RepeatedCompositeFieldContainer[DelfExtractResult]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., results: _Optional[_Iterable[_Union[DelfExtractResult, _Mapping]]] = ...) -> None: ...

class DelfMatchInput(_message.Message):
    __slots__ = ("image", "features")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    features: DelfFeatures
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., features: _Optional[_Union[DelfFeatures, _Mapping]] = ...) -> None: ...

class DelfMatchOptions(_message.Message):
    __slots__ = ("max_descriptor_distance", "residual_threshold", "max_trials")
    MAX_DESCRIPTOR_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    max_descriptor_distance: float
    residual_threshold: float
    max_trials: int
    def __init__(self, max_descriptor_distance: _Optional[float] = ..., residual_threshold: _Optional[float] = ..., max_trials: _Optional[int] = ...) -> None: ...

class DelfMatchRequest(_message.Message):
    __slots__ = ("model", "a", "b", "extract_options", "options", "return_features")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    EXTRACT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSelector
    a: DelfMatchInput
    b: DelfMatchInput
    extract_options: DelfExtractOptions
    options: DelfMatchOptions
    return_features: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., a: _Optional[_Union[DelfMatchInput, _Mapping]] = ..., b: _Optional[_Union[DelfMatchInput, _Mapping]] = ..., extract_options: _Optional[_Union[DelfExtractOptions, _Mapping]] = ..., options: _Optional[_Union[DelfMatchOptions, _Mapping]] = ..., return_features: _Optional[bool] = ...) -> None: ...

class DelfCorrespondence(_message.Message):
    __slots__ = ("a", "b", "a_x", "a_y", "b_x", "b_y")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    A_X_FIELD_NUMBER: _ClassVar[int]
    A_Y_FIELD_NUMBER: _ClassVar[int]
    B_X_FIELD_NUMBER: _ClassVar[int]
    B_Y_FIELD_NUMBER: _ClassVar[int]
    a: int
    b: int
    a_x: float
    a_y: float
    b_x: float
    b_y: float
    def __init__(self, a: _Optional[int] = ..., b: _Optional[int] = ..., a_x: _Optional[float] = ..., a_y: _Optional[float] = ..., b_x: _Optional[float] = ..., b_y: _Optional[float] = ...) -> None: ...

class DelfMatchResponse(_message.Message):
    __slots__ = ("model", "inliers", "putative_matches", "keypoints_a", "keypoints_b", "correspondences", "transform", "features_a", "features_b")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    PUTATIVE_MATCHES_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_A_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_B_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    FEATURES_A_FIELD_NUMBER: _ClassVar[int]
    FEATURES_B_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    inliers: int
    putative_matches: int
    keypoints_a: int
    keypoints_b: int
    correspondences: _containers.RepeatedCompositeFieldContainer[DelfCorrespondence]
    transform: _containers.RepeatedScalarFieldContainer[float]
    features_a: DelfFeatures
    features_b: DelfFeatures
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., inliers: _Optional[int] = ..., putative_matches: _Optional[int] = ..., keypoints_a: _Optional[int] = ..., keypoints_b: _Optional[int] = ..., correspondences: _Optional[_Iterable[_Union[DelfCorrespondence, _Mapping]]] = ..., transform: _Optional[_Iterable[float]] = ..., features_a: _Optional[_Union[DelfFeatures, _Mapping]] = ..., features_b: _Optional[_Union[DelfFeatures, _Mapping]] = ...) -> None: ...

class DelfModelInfo(_message.Message):
    __slots__ = ("model", "layer", "stride", "receptive_field", "padding", "scoring", "score_threshold", "max_image_side", "descriptor_dim", "pca_dim", "pca_whitening")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_DIM_FIELD_NUMBER: _ClassVar[int]
    PCA_DIM_FIELD_NUMBER: _ClassVar[int]
    PCA_WHITENING_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    layer: str
    stride: int
    receptive_field: int
    padding: int
    scoring: str
    score_threshold: float
    max_image_side: int
    descriptor_dim: int
    pca_dim: int
    pca_whitening: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., layer: _Optional[str] = ..., stride: _Optional[int] = ..., receptive_field: _Optional[int] = ..., padding: _Optional[int] = ..., scoring: _Optional[str] = ..., score_threshold: _Optional[float] = ..., max_image_side: _Optional[int] = ..., descriptor_dim: _Optional[int] = ..., pca_dim: _Optional[int] = ..., pca_whitening: _Optional[bool] = ...) -> None: ...

class DelfListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[DelfModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[DelfModelInfo, _Mapping]]] = ...) -> None: ...
