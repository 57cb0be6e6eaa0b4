"""What an ONNX file computes in (fp32, fp16, or int8 for a quantized graph), read from the graph itself."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vision.core.errors import ConfigurationError

Precision = Literal["fp32", "fp16", "int8"]
# Ops only a quantized graph has: QDQ pairs, or the QOperator format's integer kernels.
_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def precision_of(onnx_path: Path) -> Precision:
    """What an ONNX file computes in: int8 when it holds quantization ops, fp16 when its input is half."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for files that are not models
        raise ConfigurationError(f"{onnx_path} is not a readable ONNX model: {exc}") from None
    if any(node.op_type in _INT8_OPS for node in model.graph.node):
        return "int8"
    inputs = model.graph.input
    if inputs and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"
