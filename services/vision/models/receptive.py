"""Receptive fields of a model's feature maps, derived from its graph.

For a feature map, cell i (along one axis) sees the input pixels [stride·i − padding, stride·i − padding +
size − 1]: its receptive box. DELF places a keypoint at the centre of that box (tensorflow/models
research/delf `feature_extractor.CalculateReceptiveBoxes` / `CalculateKeypointCenters`), so every declared
layer carries (size, stride, padding) as facts (`vision.models.signature.FeatureLayer`). They are declared
in the zoo, which must not import torch (Triton hosts read them), and this module derives them from the
graph so a test can hold the declarations to the truth for every registered architecture.

Derivation (the closed form of Araujo, Norris and Sim, "Computing receptive fields of convolutional neural
networks", Distill 2019): the model's `with_outputs` module is traced with torch.fx; walking the graph in
order, a convolution or pooling of kernel k (dilation d), stride s and padding p turns (size r, jump j,
start a) into (r + d(k − 1)j, j·s, a − p·j). Elementwise ops pass the box through; where branches meet
(a residual add) the union of their boxes is taken; a globally pooled tensor (squeeze-excitation gates,
the pooled embedding) has no local box and does not widen the boxes it meets. Any other op that changes
the spatial size is refused rather than guessed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn


@dataclass(frozen=True)
class ReceptiveField:
    """One axis (every registry architecture is symmetric in height and width)."""

    size: int
    stride: int
    # Distance from the input's first pixel back to the start of cell 0's receptive box.
    padding: int


@dataclass(frozen=True)
class _Box:
    size: int
    jump: int
    start: int


# Shared by every tensor whose spatial extent was pooled away.
_GLOBAL = None


class UnsupportedGraph(ValueError):
    """The graph has an op whose effect on receptive fields is not known here."""


def _pair(value: Any) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise UnsupportedGraph(f"asymmetric kernel/stride/padding {value}")
        return int(value[0])
    return int(value)


def _window(box: _Box, kernel: int, stride: int, padding: int, dilation: int = 1) -> _Box:
    return _Box(box.size + dilation * (kernel - 1) * box.jump, box.jump * stride, box.start - padding * box.jump)


def _conv_like(module: nn.Module, box: _Box) -> _Box:
    kernel = _pair(module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):  # "same" (stride 1 only in torch) or "valid"
        padding = dilation * (kernel - 1) // 2 if padding == "same" else 0
    stride = module.stride if module.stride is not None else module.kernel_size
    return _window(box, kernel, _pair(stride), _pair(padding), dilation)


_WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Ops on one tensor that keep every cell where it is.
_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.LeakyReLU, nn.Tanh, nn.Flatten,
)
_COMBINE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.cat}
# Functional ops that move or resample cells: refused (their parameters are not reliably in the graph).
_SPATIAL_FUNCTIONS = {
    "conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "pad", "interpolate", "upsample", "pixel_shuffle",
    "unfold", "fold", "grid_sample", "roll", "unsqueeze", "view", "reshape", "permute", "transpose",
}


def _union(boxes: list[_Box]) -> _Box | None:
    local = [b for b in boxes if b is not _GLOBAL]
    if not local:
        return _GLOBAL
    jumps = {b.jump for b in local}
    if len(jumps) != 1:
        raise UnsupportedGraph(f"branches of different strides meet: {sorted(jumps)}")
    start = min(b.start for b in local)
    end = max(b.start + b.size for b in local)
    return _Box(end - start, local[0].jump, start)


def _is_global_reduction(node: fx.Node) -> bool:
    """mean/amax/sum over the spatial axes, as pooling heads and squeeze-excitation write it."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in ("mean", "amax", "sum", "max", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return False
    if name.startswith("adaptive"):
        return True
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return {2, 3} <= {d % 4 if isinstance(d, int) else d for d in dims}


def receptive_fields(module: nn.Module, names: tuple[str, ...]) -> dict[str, ReceptiveField]:
    """Receptive field of each output of `module` (a `with_outputs` module returning the tuple `names`)
    that is a feature map; vector outputs (logits, embedding) are left out."""
    graph = fx.symbolic_trace(module).graph
    modules = dict(module.named_modules())
    boxes: dict[fx.Node, _Box | None] = {}
    output_node = None
    for node in graph.nodes:
        tensor_inputs = [a for a in node.all_input_nodes if a in boxes]
        if node.op == "placeholder":
            boxes[node] = _Box(1, 1, 0)
        elif node.op == "get_attr":
            boxes[node] = _GLOBAL
        elif node.op == "output":
            output_node = node
        elif node.op == "call_module":
            sub = modules[str(node.target)]
            (source,) = tensor_inputs
            box = boxes[source]
            if box is _GLOBAL or isinstance(sub, _GLOBAL_POOLS) or isinstance(sub, nn.Linear):
                boxes[node] = _GLOBAL
            elif isinstance(sub, _WINDOWED):
                boxes[node] = _conv_like(sub, box)
            elif isinstance(sub, _POINTWISE_MODULES):
                boxes[node] = box
            else:
                raise UnsupportedGraph(f"module {node.target} ({type(sub).__name__}): unknown receptive-field effect")
        elif node.op in ("call_function", "call_method"):
            if _is_global_reduction(node):
                boxes[node] = _GLOBAL
            elif node.target in _COMBINE or node.target in ("add", "mul", "add_", "mul_"):
                boxes[node] = _union([boxes[a] for a in tensor_inputs])
            else:
                name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
                local = [a for a in tensor_inputs if boxes[a] is not _GLOBAL]
                if not local:
                    boxes[node] = _GLOBAL
                elif name in _SPATIAL_FUNCTIONS or len(local) > 1:
                    raise UnsupportedGraph(f"{node.op} {name or node.target}: unknown receptive-field effect")
                else:
                    # Pointwise functions of one local tensor and parameters (relu, softplus, batch_norm with
                    # its buffers, getitem of a tuple, flatten, contiguous, float ...).
                    boxes[node] = boxes[local[0]]
    assert output_node is not None
    (returned,) = output_node.args
    returned = returned if isinstance(returned, (tuple, list)) else (returned,)
    if len(returned) != len(names):
        raise UnsupportedGraph(f"module returns {len(returned)} outputs, expected {len(names)} ({names})")
    found = {}
    for name, node in zip(names, returned, strict=True):
        box = boxes[node]
        if box is not _GLOBAL:
            found[name] = ReceptiveField(size=box.size, stride=box.jump, padding=-box.start)
    return found


def architecture_receptive_fields(arch: str) -> dict[str, ReceptiveField]:
    """Derived receptive fields of every feature-map output of a registry architecture (no head)."""
    from vision.models import create_model, get_architecture, with_outputs

    module = with_outputs(arch, create_model(arch, num_classes=0, pretrained=False), 0)
    return receptive_fields(module, get_architecture(arch).signature(0).outputs)
