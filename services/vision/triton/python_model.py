"""Triton python-backend model that runs `model.onnx` (next to this file) with ONNX Runtime on the CPU.

Copied by vision.triton.repository as `<model>/<version>/model.py` for the "cpu-python" flavour. It runs
inside Triton's python stub, i.e. the system Python with the Triton venv's packages (numpy 1.26,
onnxruntime), so it imports nothing from the `vision` package and works with numpy 1.x and 2.x.

- initialize: reads the model config (JSON in args["model_config"]), opens an InferenceSession
  (CPUExecutionProvider; threads from the config parameter "intra_op_thread_count", the key Triton's
  onnxruntime backend uses too) and checks the config's inputs/outputs against the graph: names, element
  types, ranks and static dims. The python backend does not validate dims itself, so without this a wrong
  config.pbtxt would load and fail (or silently misbehave) at the first request; with it, the load fails
  and Triton reports why.
- execute: Triton's dynamic batcher hands over several requests at once. Their inputs are concatenated
  along the batch axis and run in ONE forward pass, and the outputs are split back: one response per
  request, in order. A malformed request gets its own error response (INVALID_ARG) and does not join the
  batch; if a joint forward pass fails anyway, its requests are re-run one by one so that a failure belongs
  only to the request that caused it. Requests with different shapes on variable (-1) dims are batched
  separately, per shape.
"""

import json
import os
import sys


def _use_triton_site_packages() -> None:
    """Put the Triton venv's site-packages first on sys.path (the stub ignores PYTHONPATH and venvs)."""
    candidates = []
    env = os.environ.get("VISION_TRITON_SITE_PACKAGES")
    if env:
        candidates.append(env)
    # Fallback: the stub puts the python backend's directory on sys.path; with nvidia-pytriton it lies at
    # <site-packages>/pytriton/tritonserver/backends/python.
    suffix = os.path.join("pytriton", "tritonserver", "backends", "python")
    for entry in list(sys.path):
        entry = entry.rstrip(os.sep)
        if entry.endswith(suffix):
            candidates.append(entry[: -len(suffix)].rstrip(os.sep))
    for path in reversed(candidates):
        if os.path.isdir(path):
            if path in sys.path:
                sys.path.remove(path)
            sys.path.insert(0, path)


_use_triton_site_packages()

import numpy as np
import triton_python_backend_utils as pb_utils

# Triton data type -> ONNX Runtime type string.
_ORT_TYPES = {
    "TYPE_BOOL": "tensor(bool)",
    "TYPE_UINT8": "tensor(uint8)",
    "TYPE_UINT16": "tensor(uint16)",
    "TYPE_UINT32": "tensor(uint32)",
    "TYPE_UINT64": "tensor(uint64)",
    "TYPE_INT8": "tensor(int8)",
    "TYPE_INT16": "tensor(int16)",
    "TYPE_INT32": "tensor(int32)",
    "TYPE_INT64": "tensor(int64)",
    "TYPE_FP16": "tensor(float16)",
    "TYPE_FP32": "tensor(float)",
    "TYPE_FP64": "tensor(double)",
    "TYPE_STRING": "tensor(string)",
}


class BadRequest(Exception):
    """A request this model cannot run; reported to that request only, as INVALID_ARG."""


class _Tensor:
    """One configured input or output, with the graph's static dims (None where the graph's dim is free)."""

    def __init__(self, name, data_type, dims, graph_dims):
        self.name = name
        self.data_type = data_type
        self.dtype = np.dtype(pb_utils.triton_string_to_numpy(data_type))
        self.dims = dims
        self.graph_dims = graph_dims


def _static(dim):
    return dim if isinstance(dim, int) and dim > 0 else None


def _fmt(dims):
    return "[" + ", ".join("?" if d is None or d == -1 else str(d) for d in dims) + "]"


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.model_config = config = json.loads(args["model_config"])
        self.model_name = args.get("model_name") or config.get("name", "model")
        here = os.path.dirname(os.path.abspath(__file__))
        if args.get("model_repository") and args.get("model_version"):
            here = os.path.join(args["model_repository"], args["model_version"])
        self.onnx_path = os.path.join(here, "model.onnx")
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.batching = self.max_batch_size > 0
        params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        threads = int(params.get("intra_op_thread_count") or 0)

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.onnx_path, sess_options=options, providers=["CPUExecutionProvider"]
        )

        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = {o.name: o for o in self.session.get_outputs()}
        problems = []
        self.inputs = self._check("input", config.get("input") or [], graph_inputs, problems)
        self.outputs = self._check("output", config.get("output") or [], graph_outputs, problems)
        unfed = sorted(set(graph_inputs) - {t.name for t in self.inputs})
        if unfed:
            problems.append(f"graph inputs {unfed} are not in the config (all must be fed)")
        if problems:
            raise ValueError(
                f"model {self.model_name!r}: config.pbtxt does not match {self.onnx_path}: "
                + "; ".join(problems)
            )
        self.output_names = [t.name for t in self.outputs]
        self.executions = 0  # forward passes, for debugging
        _log(
            f"{self.model_name}: loaded {self.onnx_path} (max_batch_size {self.max_batch_size}, "
            f"intra-op threads {threads or 'default'}, onnxruntime {ort.__version__}, numpy {np.__version__})"
        )

    def _check(self, kind, configured, graph, problems):
        tensors = []
        for entry in configured:
            name = entry["name"]
            data_type = entry.get("data_type", "TYPE_FP32")
            dims = [int(d) for d in entry.get("dims", [])]
            node = graph.get(name)
            if node is None:
                problems.append(f"{kind} {name!r} is not in the graph ({kind}s: {sorted(graph)})")
                continue
            want_type = _ORT_TYPES.get(data_type)
            if want_type != node.type:
                problems.append(f"{kind} {name!r} is {data_type} in the config but {node.type} in the graph")
            shape = list(node.shape or [])
            full = ([-1] if self.batching else []) + dims
            if len(shape) != len(full):
                problems.append(
                    f"{kind} {name!r} has dims {dims} (rank {len(full)} with the batch axis) in the config but "
                    f"shape {_fmt(map(_static, shape))} (rank {len(shape)}) in the graph"
                )
                continue
            graph_dims = [_static(d) for d in shape]
            if self.batching and graph_dims[0] is not None:
                problems.append(
                    f"{kind} {name!r}: the graph's batch axis is fixed to {graph_dims[0]} but the config batches "
                    f"(max_batch_size {self.max_batch_size}); export with a dynamic batch axis"
                )
            start = 1 if self.batching else 0
            for axis, (want, have) in enumerate(zip(full[start:], graph_dims[start:]), start):
                if want != -1 and have is not None and want != have:
                    problems.append(
                        f"{kind} {name!r} has dims {dims} in the config but {_fmt(graph_dims[start:])} in the graph "
                        f"(axis {axis}: {want} vs {have})"
                    )
                    break
            tensors.append(_Tensor(name, data_type, dims, graph_dims))
        return tensors

    # -- requests
    def _read(self, request):
        feeds = {}
        batch = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise BadRequest(f"input {spec.name!r} is missing")
            array = tensor.as_numpy()
            if array.dtype != spec.dtype:
                raise BadRequest(f"input {spec.name!r} is {array.dtype}, the model takes {spec.dtype}")
            if array.ndim != len(spec.graph_dims):
                raise BadRequest(
                    f"input {spec.name!r} has shape {list(array.shape)}, the model takes {_fmt(spec.graph_dims)}"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.graph_dims)):
                if want is not None and got != want and not (self.batching and axis == 0):
                    raise BadRequest(
                        f"input {spec.name!r} has shape {list(array.shape)}, the model takes {_fmt(spec.graph_dims)}"
                    )
            if self.batching:
                if array.shape[0] < 1:
                    raise BadRequest(f"input {spec.name!r} has an empty batch")
                if batch is not None and array.shape[0] != batch:
                    raise BadRequest(f"inputs disagree on the batch size ({batch} vs {array.shape[0]})")
                batch = array.shape[0]
            feeds[spec.name] = np.ascontiguousarray(array)
        return feeds

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            try:
                feeds = self._read(request)
            except BadRequest as exc:
                responses[index] = _error(f"{self.model_name}: {exc}", invalid=True)
                continue
            if self.batching:
                key = tuple((name, array.shape[1:]) for name, array in feeds.items())
            else:
                key = ("request", index)
            groups.setdefault(key, []).append((index, feeds))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members, responses):
        if len(members) == 1:
            index, feeds = members[0]
            try:
                outputs = self._forward(feeds)
            except Exception as exc:  # noqa: BLE001 - reported to the request that caused it
                invalid = type(exc).__name__ in ("InvalidArgument", "BadRequest")
                responses[index] = _error(f"{self.model_name}: inference failed: {exc}", invalid=invalid)
                return
            responses[index] = self._respond(outputs)
            return
        batch = {name: np.concatenate([feeds[name] for _, feeds in members]) for name in members[0][1]}
        try:
            outputs = self._forward(batch)
        except Exception:  # noqa: BLE001 - find the culprit: run each request alone
            for member in members:
                self._run([member], responses)
            return
        offset = 0
        for index, feeds in members:
            n = len(next(iter(feeds.values())))
            responses[index] = self._respond({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n

    def _forward(self, feeds):
        results = self.session.run(self.output_names, feeds)
        self.executions += 1
        outputs = {}
        n = len(next(iter(feeds.values()))) if self.batching else None
        for spec, array in zip(self.outputs, results):
            array = np.asarray(array)
            if n is not None and (array.ndim == 0 or array.shape[0] != n):
                raise RuntimeError(
                    f"output {spec.name!r} has shape {list(array.shape)}, expected batch {n} first"
                )
            outputs[spec.name] = array.astype(spec.dtype, copy=False)
        return outputs

    def _respond(self, outputs):
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in outputs.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self):
        self.session = None


def _error(message, invalid):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _log(message):
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        try:
            logger.log_info(message)
        except Exception as exc:  # noqa: BLE001 - outside Triton (tests) the logger has no server
            print(f"{message} (Triton logger unavailable: {exc})", file=sys.stderr, flush=True)
        return
    print(message, file=sys.stderr, flush=True)
