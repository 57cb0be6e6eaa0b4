"""A Triton model repository: config.pbtxt through Triton's ModelConfig protobuf, atomic writes, and the
version lifecycle (publish a version next to the ones in use, retire one).

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/model.py      (cpu-python flavour only: vision/triton/python_model.py)

Two flavours of the same model.onnx:
- "gpu-onnxruntime" (production): Triton's onnxruntime backend on KIND_GPU, optionally with ONNX Runtime's
  TensorRT execution provider (`optimization.execution_accelerators.gpu_execution_accelerator`).
- "cpu-python" (here, and CI): Triton's python backend; model.py runs model.onnx with onnxruntime on the
  CPU, concatenating the requests Triton's dynamic batcher hands it into one forward pass.

Versions. Triton's default version policy (`latest { num_versions: 1 }`) serves only the newest version, so
publishing version 2 would unload version 1 while services pinned to it still send traffic. Every config
written here names its versions explicitly (`version_policy { specific { versions: [...] } }`):
`add_version` appends one and `retire_version` removes one, and Triton changes only when told to load
(explicit model control), so a version is served from the load after it was added until the load after it
was retired. All versions of a model share one config.pbtxt, so they share its inputs and outputs: a
version whose outputs differ (another head width) is another model name.

Atomicity: Triton must never see half a model. Everything is written in a staging directory first, then
moved in with rename(2): a new model appears whole (`<name>/` at once); a new version of an existing model
appears whole (`<version>/` at once) and only then its config.pbtxt is replaced (os.replace); a retired
version leaves the policy first and its folder is renamed out before it is deleted. The staging directory
must be OUTSIDE the repository, because `--load-model=*` takes every directory at the repository root for a
model, hidden ones included, and on the same filesystem (rename across filesystems is a copy).
Default: `<repository parent>/.<repository name>.staging/`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vision.core import files
from vision.core.files import sha256_file

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from vision.triton.admin import TritonAdmin

Flavour = Literal["cpu-python", "gpu-onnxruntime"]
FLAVOURS: tuple[str, ...] = ("cpu-python", "gpu-onnxruntime")
PYTHON_MODEL = Path(__file__).with_name("python_model.py")
CONFIG = "config.pbtxt"

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
        if not self.name or not self.name.isprintable():
            raise ValueError(f"tensor name {self.name!r} is empty or has control characters")
        if self.dtype not in TRITON_TO_ONNX:
            raise ValueError(
                f"tensor {self.name!r}: data type {self.dtype!r} is not one of {sorted(TRITON_TO_ONNX)}"
            )
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(
                f"tensor {self.name!r}: dims {self.dims} must be non-empty, each > 0 or -1 (variable)"
            )


def _pb() -> object:
    # tritonclient ships Triton's model_config.proto compiled; importing it lazily keeps `vision.triton`
    # importable for `vision triton --setup-only` before anything else is used.
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def build_config(
    name: str,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    flavour: Flavour,
    max_batch_size: int,
    versions: Sequence[int],
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 0,
    instances: int = 1,
    tensorrt: bool = False,
    tensorrt_precision: Literal["FP16", "FP32", "INT8"] = "FP16",
    tensorrt_workspace_bytes: int = 1 << 30,
    tensorrt_cache_dir: str | None = None,
    intra_op_threads: int | None = None,
    gpus: Sequence[int] | None = None,
) -> ModelConfig:
    """The model's inference.ModelConfig, serving exactly `versions` (an explicit version policy)."""
    mc = _pb()
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
    _check_versions(versions)

    config = mc.ModelConfig(  # type: ignore[attr-defined]
        name=name,
        backend="python" if flavour == "cpu-python" else "onnxruntime",
        max_batch_size=max_batch_size,
    )
    config.version_policy.specific.versions.extend(sorted(set(int(v) for v in versions)))
    for tensors, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            tensors.add(name=spec.name, data_type=mc.DataType.Value(spec.dtype), dims=list(spec.dims))  # type: ignore[attr-defined]
    if max_batch_size > 0:
        batching = config.dynamic_batching
        batching.SetInParent()  # present even when every field keeps its default: it turns batching on
        batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
        batching.max_queue_delay_microseconds = max_queue_delay_us
    group = config.instance_group.add(count=instances)
    if flavour == "cpu-python":
        group.kind = mc.ModelInstanceGroup.KIND_CPU  # type: ignore[attr-defined]
    else:
        group.kind = mc.ModelInstanceGroup.KIND_GPU  # type: ignore[attr-defined]
        group.gpus.extend(gpus or ())
    if intra_op_threads is not None:
        # The key Triton's onnxruntime backend reads; model.py reads it too, so one knob serves both flavours.
        config.parameters["intra_op_thread_count"].string_value = str(intra_op_threads)
    if tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = tensorrt_precision
        accelerator.parameters["max_workspace_size_bytes"] = str(tensorrt_workspace_bytes)
        if tensorrt_cache_dir:
            accelerator.parameters["trt_engine_cache_enable"] = "1"
            accelerator.parameters["trt_engine_cache_path"] = tensorrt_cache_dir
    return config


def config_text(config: ModelConfig, comment: str = "") -> str:
    """config.pbtxt text: protobuf text format of `config`, after an optional `# comment` line."""
    from google.protobuf import text_format

    if "\n" in comment:
        raise ValueError(f"a config comment is one line: {comment!r}")
    header = f"# {comment}\n" if comment else ""
    return header + text_format.MessageToString(config)


def render_config(name: str, *, comment: str = "", **options: object) -> str:
    """config.pbtxt text for `build_config(name, **options)`."""
    return config_text(build_config(name, **options), comment)  # type: ignore[arg-type]


def read_config(model_dir: Path) -> ModelConfig:
    """The model's config.pbtxt, parsed (ValueError naming the file when it is not valid text format)."""
    from google.protobuf import text_format

    path = Path(model_dir) / CONFIG
    try:
        return text_format.Parse(path.read_text(), _pb().ModelConfig())  # type: ignore[attr-defined]
    except text_format.ParseError as exc:
        raise ValueError(f"{path} is not a valid Triton model config: {exc}") from None


def version_dirs(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def served_versions(model_dir: Path, config: ModelConfig | None = None) -> list[int]:
    """The versions Triton serves for this model after its next load, as its version policy says."""
    config = config if config is not None else read_config(model_dir)
    present = version_dirs(model_dir)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "specific":
        return sorted(set(policy.specific.versions))
    if choice == "all":
        return present
    # Triton's default policy, `latest` with one version, for configs written by hand or before policies.
    latest = policy.latest.num_versions if choice == "latest" else 1
    return present[-max(latest, 1) :]


def tensor_specs(config: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a parsed config."""
    mc = _pb()

    def specs(tensors: object) -> list[TensorSpec]:
        return [TensorSpec(t.name, mc.DataType.Name(t.data_type), tuple(t.dims)) for t in tensors]  # type: ignore[attr-defined]

    return specs(config.input), specs(config.output)


def _check_versions(versions: Sequence[int]) -> None:
    if not versions:
        raise ValueError("a model serves at least one version")
    bad = [v for v in versions if int(v) < 1]
    if bad:
        raise ValueError(f"versions are positive integers, got {bad}")


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
    """Write `onnx_path` as version `version` of model `name` in `repository` with a config built from the
    arguments; returns `<repository>/<name>`.

    A new model serves just this version. For an existing model the config.pbtxt is rewritten for the whole
    model (all versions share it) and its version policy keeps the versions it named, plus this one. Triton
    takes the change up at its next load of the model (`TritonAdmin.load_model`, or `add_version` with an
    admin). `validate` checks the specs against the ONNX graph first (needs `onnx`). An existing version is
    only replaced with `overwrite=True` (Triton's load of that version would briefly find it missing;
    versions are meant to be immutable).
    """
    repository = Path(repository)
    onnx_path = Path(onnx_path)
    _check_name(name)
    _check_versions([version])
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    if validate:
        check_onnx(onnx_path, inputs, outputs, max_batch_size)
    model_dir = repository / name
    versions = {int(version)}
    if (model_dir / CONFIG).is_file():
        versions.update(served_versions(model_dir))
    config = build_config(
        name,
        inputs=inputs,
        outputs=outputs,
        flavour=flavour,
        max_batch_size=max_batch_size,
        versions=sorted(versions),
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        tensorrt=tensorrt,
        tensorrt_precision=tensorrt_precision,
        tensorrt_cache_dir=tensorrt_cache_dir,
        intra_op_threads=intra_op_threads,
        gpus=gpus,
    )
    return _publish(repository, name, int(version), onnx_path, config, overwrite=overwrite, staging_dir=staging_dir)


def add_version(
    repository: Path,
    name: str,
    version: int,
    onnx_path: Path,
    *,
    admin: TritonAdmin | None = None,
    validate: bool = True,
    staging_dir: Path | None = None,
    timeout_s: float = 300.0,
) -> Path:
    """Publish `onnx_path` as a new version of the existing model `name`, next to the versions it serves.

    The model's config.pbtxt stays as it is except that `version` is appended to its version policy, so the
    graph must have the config's inputs and outputs (checked first when `validate`; needs `onnx`). With an
    `admin`, Triton then reloads the model and this returns once `version` is ready; the versions served
    before stay loaded and keep answering throughout (Triton swaps each reloaded version in only when its new
    instance is ready). If Triton refuses the new version, the policy and the folder are rolled back, Triton
    keeps serving what it served, and TritonModelLoadError carries Triton's reason. Without an admin, Triton
    takes the version up at its next load of the model (or its next start). Returns `<repository>/<name>`.
    """
    repository = Path(repository)
    _check_name(name)
    _check_versions([version])
    model_dir = repository / name
    if not (model_dir / CONFIG).is_file():
        raise FileNotFoundError(f"model {name!r} has no {model_dir / CONFIG}; create it with write_model")
    if (model_dir / str(version)).exists():
        raise FileExistsError(f"{model_dir / str(version)} exists; versions are immutable")
    config = read_config(model_dir)
    if validate:
        inputs, outputs = tensor_specs(config)
        check_onnx(Path(onnx_path), inputs, outputs, config.max_batch_size)
    before = served_versions(model_dir, config)
    config.version_policy.specific.versions[:] = sorted({*before, int(version)})
    _publish(repository, name, int(version), Path(onnx_path), config, overwrite=False, staging_dir=staging_dir)
    if admin is None:
        return model_dir
    from vision.triton.errors import TritonModelLoadError

    try:
        admin.load_model(name)
        admin.wait_for_model(name, version, timeout=timeout_s)
    except TritonModelLoadError:
        # Triton kept what it had loaded; make the repository say so again, so a restart loads the same.
        _retire_files(repository, name, int(version), before, staging_dir, comment=f"version {version} refused")
        raise
    return model_dir


def retire_version(
    repository: Path,
    name: str,
    version: int,
    *,
    admin: TritonAdmin | None = None,
    staging_dir: Path | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Stop serving `version` of model `name` and delete its folder; the other versions keep serving.

    Order: the version leaves the config's version policy (atomic replace); with an `admin`, Triton reloads
    the model, which unloads this version while the others keep answering, and this waits until it is no
    longer ready; then its folder is renamed out of the repository (atomic) and deleted. Without an admin
    the folder is deleted at once, which is only safe while no Triton serves the repository (Triton's
    python stub has the files open, but a load would find the version gone). Retiring a version that is
    neither in the policy nor on disk does nothing; retiring the last served version is refused (unload or
    remove the model instead).
    """
    repository = Path(repository)
    _check_name(name)
    model_dir = repository / name
    served = served_versions(model_dir)
    if int(version) not in served and not (model_dir / str(version)).exists():
        return
    remaining = [v for v in served if v != int(version)]
    if not remaining:
        raise ValueError(f"version {version} is the only version of {name!r}; unload or remove the model instead")
    staging_root = _staging_root(repository, staging_dir)
    config = read_config(model_dir)
    config.version_policy.specific.versions[:] = remaining
    with _stage(staging_root, f"{name}-retire-{version}-") as stage:
        with files.atomic_write(model_dir / CONFIG, "w", tmp_dir=stage) as fh:
            fh.write(config_text(config, f"written by vision.triton.repository; version {version} retired"))
    if admin is not None:
        admin.load_model(name)
        admin.wait_for_model(name, version, ready=False, timeout=timeout_s)
    _remove_version_dir(model_dir, int(version), staging_root)


def _retire_files(
    repository: Path, name: str, version: int, keep: Sequence[int], staging_dir: Path | None, *, comment: str
) -> None:
    model_dir = repository / name
    staging_root = _staging_root(repository, staging_dir)
    config = read_config(model_dir)
    config.version_policy.specific.versions[:] = sorted(keep)
    with _stage(staging_root, f"{name}-rollback-{version}-") as stage:
        with files.atomic_write(model_dir / CONFIG, "w", tmp_dir=stage) as fh:
            fh.write(config_text(config, f"written by vision.triton.repository; {comment}"))
    _remove_version_dir(model_dir, version, staging_root)


def _remove_version_dir(model_dir: Path, version: int, staging_root: Path) -> None:
    folder = model_dir / str(version)
    if not folder.exists():
        return
    # Renamed out first: Triton never sees a half-deleted version, and a crash leaves only staging debris.
    graveyard = Path(tempfile.mkdtemp(prefix=f"{model_dir.name}-{version}-retired-", dir=staging_root))
    os.rename(folder, graveyard / str(version))
    files.fsync_dir(model_dir)
    shutil.rmtree(graveyard, ignore_errors=True)


def _staging_root(repository: Path, staging_dir: Path | None) -> Path:
    root = Path(staging_dir) if staging_dir is not None else repository.parent / f".{repository.name}.staging"
    if root.resolve().is_relative_to(repository.resolve()):
        raise ValueError(f"staging_dir {root} must lie outside the repository (Triton would load it)")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _stage(staging_root: Path, prefix: str) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=staging_root))
    try:
        yield stage
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise OSError(
                exc.errno,
                f"staging dir {staging_root} is on another filesystem than the repository; "
                "pass staging_dir= on the repository's filesystem (outside the repository)",
            ) from exc
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(
    repository: Path,
    name: str,
    version: int,
    onnx_path: Path,
    config: ModelConfig,
    *,
    overwrite: bool,
    staging_dir: Path | None,
) -> Path:
    repository.mkdir(parents=True, exist_ok=True)
    staging_root = _staging_root(repository, staging_dir)
    comment = f"written by vision.triton.repository; version {version} = {onnx_path.name} sha256 {sha256_file(onnx_path)}"
    with _stage(staging_root, f"{name}-{version}-") as stage:
        vdir = stage / str(version)
        vdir.mkdir()
        _copy(onnx_path, vdir / "model.onnx")
        if config.backend == "python":
            _copy(PYTHON_MODEL, vdir / "model.py")
        _write(stage / CONFIG, config_text(config, comment))
        files.fsync_dir(vdir)
        files.fsync_dir(stage)
        target = repository / name
        if not target.exists():
            try:
                # Not files.replace: a model someone else created meanwhile is added to, never replaced.
                os.rename(stage, target)  # the whole model appears at once
                files.fsync_dir(repository)
                return target
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Someone created it meanwhile: add our version to theirs below.
        vtarget = target / str(version)
        if vtarget.exists() and not overwrite:
            raise FileExistsError(f"{vtarget} exists; versions are immutable (overwrite=True replaces it)")
        # The replaced version, if any, is moved aside into the stage (outside the repository) and deleted.
        files.replace(vdir, vtarget)  # the version appears at once ...
        files.replace(stage / CONFIG, target / CONFIG)  # ... then the config that serves it
        return target


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def _write(path: Path, text: str) -> None:
    # A plain write into the private stage: the renames that follow are what make it atomic.
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
