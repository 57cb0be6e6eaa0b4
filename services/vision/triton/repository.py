"""Write a Triton model repository entry for an exported ONNX file, atomically.

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/model.py      (cpu-python flavour only: vision/triton/python_model.py)

Two flavours of the same model.onnx:
- "gpu-onnxruntime" (production): Triton's onnxruntime backend on KIND_GPU, optionally with ONNX Runtime's
  TensorRT execution provider (`optimization.execution_accelerators.gpu_execution_accelerator`).
- "cpu-python" (here, and CI): Triton's python backend; model.py runs model.onnx with onnxruntime on the
  CPU, concatenating the requests Triton's dynamic batcher hands it into one forward pass.

Atomicity: Triton must never see half a model. Everything is written in a staging directory first, then
moved in with rename(2): a new model appears whole (`<name>/` at once); a new version of an existing model
appears whole (`<version>/` at once) and only then its config.pbtxt is replaced (os.replace). The staging
directory must be OUTSIDE the repository, because `--load-model=*` takes every directory at the repository
root for a model, hidden ones included, and on the same filesystem (rename across filesystems is a copy).
Default: `<repository parent>/.<repository name>.staging/`.

The config is plain text rendered here (no protobuf dependency); tests parse it with tritonclient's
ModelConfig protobuf to prove it is valid text format.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vision.files import sha256_file

Flavour = Literal["cpu-python", "gpu-onnxruntime"]
FLAVOURS: tuple[str, ...] = ("cpu-python", "gpu-onnxruntime")
PYTHON_MODEL = Path(__file__).with_name("python_model.py")

# Triton data type -> ONNX TensorProto element type (for checking a spec against the graph).
TRITON_TO_ONNX: dict[str, int] = {
    "TYPE_FP32": 1,
    "TYPE_UINT8": 2,
    "TYPE_INT8": 3,
    "TYPE_UINT16": 4,
    "TYPE_INT16": 5,
    "TYPE_INT32": 6,
    "TYPE_INT64": 7,
    "TYPE_STRING": 8,
    "TYPE_BOOL": 9,
    "TYPE_FP16": 10,
    "TYPE_FP64": 11,
    "TYPE_UINT32": 12,
    "TYPE_UINT64": 13,
    "TYPE_BF16": 16,
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `dims` exclude the batch dimension; -1 marks a variable dimension."""

    name: str
    dtype: str = "TYPE_FP32"
    dims: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if not self.name or any(c in self.name for c in '"\\\n'):
            raise ValueError(f"tensor name {self.name!r} is empty or has quotes, backslashes or newlines")
        if self.dtype not in TRITON_TO_ONNX:
            raise ValueError(
                f"tensor {self.name!r}: data type {self.dtype!r} is not one of {sorted(TRITON_TO_ONNX)}"
            )
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(
                f"tensor {self.name!r}: dims {self.dims} must be non-empty, each > 0 or -1 (variable)"
            )


def _tensor_block(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    return f'  {{\n    name: "{spec.name}"\n    data_type: {spec.dtype}\n    dims: [ {dims} ]\n  }}'


def render_config(
    name: str,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    flavour: Flavour,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    instances: int = 1,
    tensorrt: bool = False,
    tensorrt_precision: Literal["FP16", "FP32", "INT8"] = "FP16",
    tensorrt_workspace_bytes: int = 1 << 30,
    tensorrt_cache_dir: str | None = None,
    intra_op_threads: int | None = None,
    gpus: Sequence[int] | None = None,
    comment: str = "",
) -> str:
    """config.pbtxt text (protobuf text format of inference.ModelConfig)."""
    _check_name(name)
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r} is not one of {FLAVOURS}")
    if not inputs or not outputs:
        raise ValueError("a model needs at least one input and one output")
    names = [t.name for t in (*inputs, *outputs)]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names must be unique: {names}")
    if max_batch_size < 0:
        raise ValueError("max_batch_size must be >= 0 (0 = the model does not batch)")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max(max_batch_size, 0)]
    if bad:
        raise ValueError(f"preferred_batch_sizes {bad} must lie in 1..max_batch_size ({max_batch_size})")
    if max_queue_delay_us < 0:
        raise ValueError("max_queue_delay_us must be >= 0")
    if instances < 1:
        raise ValueError("instances must be >= 1")
    if tensorrt and flavour != "gpu-onnxruntime":
        raise ValueError(
            "tensorrt=True needs the gpu-onnxruntime flavour (TensorRT is a GPU execution provider)"
        )
    if intra_op_threads is not None and intra_op_threads < 0:
        raise ValueError("intra_op_threads must be >= 0 (0 = onnxruntime's default)")

    lines = [f"# {comment}"] if comment else []
    lines.append(f'name: "{name}"')
    lines.append('backend: "python"' if flavour == "cpu-python" else 'backend: "onnxruntime"')
    lines.append(f"max_batch_size: {max_batch_size}")
    lines.append("input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_block(t) for t in outputs) + "\n]")
    if max_batch_size > 0:
        block = ["dynamic_batching {"]
        if preferred_batch_sizes:
            block.append(
                f"  preferred_batch_size: [ {', '.join(str(b) for b in sorted(set(preferred_batch_sizes)))} ]"
            )
        block.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
        block.append("}")
        lines.append("\n".join(block))
    kind = "KIND_CPU" if flavour == "cpu-python" else "KIND_GPU"
    group = ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}"]
    if gpus and kind == "KIND_GPU":
        group.append(f"    gpus: [ {', '.join(str(g) for g in gpus)} ]")
    group += ["  }", "]"]
    lines.append("\n".join(group))
    if intra_op_threads is not None:
        # Same key as Triton's onnxruntime backend, so both flavours read one knob.
        lines.append(_parameter("intra_op_thread_count", str(intra_op_threads)))
    if tensorrt:
        params = [
            ("precision_mode", tensorrt_precision),
            ("max_workspace_size_bytes", str(tensorrt_workspace_bytes)),
        ]
        if tensorrt_cache_dir:
            params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", tensorrt_cache_dir)]
        rendered = "\n".join(f'        parameters {{ key: "{k}" value: "{_escape(v)}" }}' for k, v in params)
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [\n      {\n"
            f'        name : "tensorrt"\n{rendered}\n      }}\n    ]\n  }}\n}}'
        )
    return "\n".join(lines) + "\n"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{_escape(value)}" }}\n}}'


def _escape(value: str) -> str:
    if "\n" in value:
        raise ValueError(f"config values cannot contain newlines: {value!r}")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '_', '-', '.', not starting with '.' or '-'"
        )


def check_onnx(
    onnx_path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int
) -> None:
    """Raise ValueError when the specs disagree with the graph's names, element types or static dims.

    Uses the `onnx` package when installed (it is in the main venv); otherwise does nothing.
    """
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    external = [i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(
            f"{onnx_path} keeps weights in external files ({external[:3]}...); export a single file"
        )
    initializers = {i.name for i in graph.initializer}
    graph_inputs = {v.name: v for v in graph.input if v.name not in initializers}
    graph_outputs = {v.name: v for v in graph.output}
    problems: list[str] = []
    for kind, specs, available in (("input", inputs, graph_inputs), ("output", outputs, graph_outputs)):
        for spec in specs:
            value = available.get(spec.name)
            if value is None:
                problems.append(f"{kind} {spec.name!r} is not in the graph ({kind}s: {sorted(available)})")
                continue
            ttype = value.type.tensor_type
            if ttype.elem_type != TRITON_TO_ONNX[spec.dtype]:
                problems.append(
                    f"{kind} {spec.name!r}: config says {spec.dtype}, graph has ONNX element type {ttype.elem_type}"
                )
            graph_dims: list[int | None] = [
                d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim
            ]
            want = ([-1] if max_batch_size > 0 else []) + list(spec.dims)
            if len(graph_dims) != len(want):
                problems.append(
                    f"{kind} {spec.name!r}: rank {len(want)} in the config, {len(graph_dims)} in the graph"
                )
                continue
            if max_batch_size > 0 and graph_dims[0] is not None:
                problems.append(
                    f"{kind} {spec.name!r}: the graph's batch dimension is fixed to {graph_dims[0]}; export it dynamic"
                )
            for axis, (g, w) in enumerate(zip(graph_dims, want)):
                if g is not None and w != -1 and g != w and not (axis == 0 and max_batch_size > 0):
                    problems.append(
                        f"{kind} {spec.name!r}: axis {axis} is {w} in the config, {g} in the graph"
                    )
    if problems:
        raise ValueError(f"{onnx_path} does not match the Triton config: " + "; ".join(problems))


def write_model(
    repository: Path,
    name: str,
    version: int,
    onnx_path: Path,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    flavour: Flavour,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    instances: int = 1,
    tensorrt: bool = False,
    tensorrt_precision: Literal["FP16", "FP32", "INT8"] = "FP16",
    tensorrt_cache_dir: str | None = None,
    intra_op_threads: int | None = None,
    gpus: Sequence[int] | None = None,
    validate: bool = True,
    overwrite: bool = False,
    staging_dir: Path | None = None,
) -> Path:
    """Publish `onnx_path` as version `version` of model `name` in `repository`; returns `<repository>/<name>`.

    The config.pbtxt is (re)written for the whole model: all versions share it. `validate` checks the specs
    against the ONNX graph first (needs `onnx`). An existing version is only replaced with `overwrite=True`
    (Triton's load of that version would briefly find it missing; versions are meant to be immutable).
    """
    repository = Path(repository)
    onnx_path = Path(onnx_path)
    _check_name(name)
    if int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    if validate:
        check_onnx(onnx_path, inputs, outputs, max_batch_size)
    digest = sha256_file(onnx_path)
    config = render_config(
        name,
        inputs=inputs,
        outputs=outputs,
        flavour=flavour,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        tensorrt=tensorrt,
        tensorrt_precision=tensorrt_precision,
        tensorrt_cache_dir=tensorrt_cache_dir,
        intra_op_threads=intra_op_threads,
        gpus=gpus,
        comment=f"written by vision.triton.repository; version {version} = {onnx_path.name} sha256 {digest}",
    )
    repository.mkdir(parents=True, exist_ok=True)
    staging_root = (
        Path(staging_dir) if staging_dir is not None else repository.parent / f".{repository.name}.staging"
    )
    if staging_root.resolve().is_relative_to(repository.resolve()):
        raise ValueError(f"staging_dir {staging_root} must lie outside the repository (Triton would load it)")
    staging_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=staging_root))
    try:
        vdir = stage / str(version)
        vdir.mkdir()
        _copy(onnx_path, vdir / "model.onnx")
        if flavour == "cpu-python":
            _copy(PYTHON_MODEL, vdir / "model.py")
        _write(stage / "config.pbtxt", config)
        _fsync_dir(vdir)
        _fsync_dir(stage)
        target = repository / name
        try:
            if not target.exists():
                try:
                    os.rename(stage, target)  # the whole model appears at once
                    _fsync_dir(repository)
                    return target
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # Someone created it meanwhile: add our version to theirs below.
            vtarget = target / str(version)
            if vtarget.exists():
                if not overwrite:
                    raise FileExistsError(
                        f"{vtarget} exists; versions are immutable (overwrite=True replaces it)"
                    )
                os.rename(vtarget, stage / f"replaced-{version}")
            os.rename(vdir, vtarget)  # the version appears at once ...
            os.replace(stage / "config.pbtxt", target / "config.pbtxt")  # ... then its config
            _fsync_dir(target)
            return target
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise OSError(
                    exc.errno,
                    f"staging dir {staging_root} is on another filesystem than {repository}; "
                    "pass staging_dir= on the repository's filesystem (outside the repository)",
                ) from exc
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def _write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
