"""INT8 models: ONNX Runtime static quantization, calibrated with the model's own preprocessing, and a
report of how far the int8 answers are from the float ones before anything serves them.

    vision quantize --model efficientnet_lite0 --calibration calib/ --held-out held-out/ --out lite0-int8.onnx
    vision serve --model efficientnet_lite0 --model arch=efficientnet_lite0,name=lite_int8,onnx=lite0-int8.onnx

The format is QDQ (QuantizeLinear/DequantizeLinear pairs around float ops, which ONNX Runtime fuses into
int8 kernels on the CPU and TensorRT reads as explicit quantization on GPUs): int8 weights per output
channel, uint8 activations. u8 activations x s8 weights is the pair VNNI's VPDPBUSD multiplies natively, so
no `reduce_range` is needed on these CPUs; on AVX2-only CPUs without VNNI that pair can saturate, and
`reduce_range` (7-bit weights) is the documented remedy.

Calibration runs the float model over a folder of images decoded and preprocessed exactly as the services
do (`vision.media.imaging.load_image`), records activation ranges (minmax: the observed range; entropy: the range
minimising KL divergence of the quantized histogram; percentile: the 99.999th percentile), and writes the
scales into the graph. Sensitive nodes can stay in float: `--exclude stem,head` keeps the first convolution
and the classifier, or name any node of the graph.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vision.core.errors import ConfigurationError
from vision.core.files import atomic_path
from vision.evaluation.agreement import MIN_TOP1_AGREEMENT, MIN_TOP5_OVERLAP, Agreement, agreement
from vision.models.signature import LOGITS

if TYPE_CHECKING:
    from vision.media.imaging import Preset

log = logging.getLogger(__name__)

Method = Literal["minmax", "entropy", "percentile"]
METHODS: tuple[Method, ...] = ("minmax", "entropy", "percentile")
# Written into the model's metadata, so a served model says how it was made.
META_PREFIX = "vision.quantization."
# Named groups of sensitive nodes `--exclude` accepts besides node names.
EXCLUDE_GROUPS = ("stem", "head")


def _images_in(folder: Path) -> list[Path]:
    """The images directly inside `folder`, sorted (what calibration and the held-out report read); a
    ConfigurationError when there are none."""
    from vision.media.imaging import IMAGE_SUFFIXES, image_files

    try:
        files = image_files(folder)
    except NotADirectoryError:
        raise ConfigurationError(f"image folder {folder} does not exist") from None
    if not files:
        raise ConfigurationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def preprocessed(
    files: Sequence[Path], preset: "Preset", batch_size: int = 8, read: Callable[[Path], bytes] = Path.read_bytes
) -> Iterator[np.ndarray]:
    """Batches of images decoded and preprocessed as the services do (centre view); `read` gives each
    file's encoded bytes."""
    from vision.core.errors import InvalidImage
    from vision.media.imaging import load_image

    batch: list[np.ndarray] = []
    for path in files:
        try:
            batch.append(load_image(read(path), preset))
        except (OSError, InvalidImage) as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over a folder of images (duck-typed: the base class
    lives in onnxruntime.quantization, imported only when quantizing)."""

    def __init__(self, files: Sequence[Path], preset: "Preset", input_name: str, batch_size: int) -> None:
        self._files, self._preset, self._input_name, self._batch_size = list(files), preset, input_name, batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:
        self._batches = preprocessed(self._files, self._preset, self._batch_size)


def resolve_exclusions(model: Any, requested: Sequence[str]) -> list[str]:  # model: onnx.ModelProto
    """Node names for `--exclude`: `stem` (the first convolution), `head` (the nodes from the pooled
    embedding to the logits: the classifier), or node names of the graph."""
    nodes = list(model.graph.node)
    by_name = {node.name: node for node in nodes}
    producer = {out: node for node in nodes for out in node.output}
    chosen: list[str] = []
    for item in requested:
        if item == "stem":
            first_conv = next((n for n in nodes if n.op_type == "Conv"), None)
            if first_conv is None:
                raise ConfigurationError("--exclude stem: the graph has no Conv node")
            chosen.append(first_conv.name)
        elif item == "head":
            chosen.extend(_head_nodes(producer))
        elif item in by_name:
            chosen.append(item)
        else:
            sample = ", ".join(sorted(by_name)[:6])
            raise ConfigurationError(f"--exclude {item!r}: no such node (groups: {', '.join(EXCLUDE_GROUPS)}; nodes like {sample}, ...)")
    return list(dict.fromkeys(chosen))


def _head_nodes(producer: dict[str, Any]) -> list[str]:
    # Walk back from the logits output through the nodes that only reshape, to the matrix product.
    node = producer.get(LOGITS)
    names: list[str] = []
    while node is not None:
        names.append(node.name)
        if node.op_type in ("Gemm", "MatMul", "Conv"):
            return names
        node = producer.get(node.input[0]) if node.input else None
    raise ConfigurationError("--exclude head: the graph has no classifier producing 'logits' (a feature extractor?)")


@dataclass(frozen=True)
class QuantizeOptions:
    method: Method = "minmax"
    exclude: tuple[str, ...] = ()
    per_channel: bool = True
    # 7-bit weights: the remedy for u8 x s8 saturation on CPUs without VNNI (not needed here).
    reduce_range: bool = False
    batch_size: int = 8
    percentile: float = 99.999


def quantize(fp32_path: Path, out: Path, calibration: Sequence[Path], preset: "Preset", options: QuantizeOptions = QuantizeOptions()) -> list[str]:
    """Write the int8 model of `fp32_path` to `out` (atomically); returns the nodes kept in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if options.method not in METHODS:
        raise ConfigurationError(f"calibration method {options.method!r}: choose one of {', '.join(METHODS)}")
    if not calibration:
        raise ConfigurationError("calibration needs at least one image")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vision-quantize-") as tmp:
        # Shape inference and graph folding first, as ONNX Runtime recommends: quantization needs every
        # tensor's shape, and folded nodes are not quantized twice.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        graph = onnx.load(str(pre))
        excluded = resolve_exclusions(graph, options.exclude)
        reader = _CalibrationReader(calibration, preset, graph.graph.input[0].name, options.batch_size)
        quantized = Path(tmp) / "int8.onnx"
        started = time.monotonic()
        # The histogram calibrators print progress to stdout, which must stay clean for `--json`.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(pre),
                str(quantized),
                reader,  # type: ignore[arg-type]
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[options.method],
                nodes_to_exclude=excluded,
                extra_options={"CalibPercentile": options.percentile} if options.method == "percentile" else {},
            )
        log.info("calibrated on %d images with %s in %.1fs", len(calibration), options.method, time.monotonic() - started)
        model = onnx.load(str(quantized))
        meta = {"method": options.method, "calibration_images": str(len(calibration)), "excluded": ",".join(excluded),
                "per_channel": str(options.per_channel), "source": fp32_path.name}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = META_PREFIX + key, value
        with atomic_path(out) as staged:
            onnx.save(model, str(staged))
    return excluded


def logits_of(session: Any, batches: Sequence[np.ndarray]) -> np.ndarray:
    """The logits output of an ONNX Runtime session over preprocessed batches."""
    input_name = session.get_inputs()[0].name
    return np.concatenate([session.run([LOGITS], {input_name: batch})[0] for batch in batches])


def forward_speed(session: Any, batch: np.ndarray, *, seconds: float = 3.0, rounds: int = 3) -> float:
    """Median img/s of `rounds` timed loops of the forward pass alone (after a warm-up run)."""
    input_name = session.get_inputs()[0].name
    session.run([LOGITS], {input_name: batch})
    rates = []
    for _ in range(rounds):
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            session.run([LOGITS], {input_name: batch})
            done += batch.shape[0]
        rates.append(done / elapsed)
    return float(np.median(rates))


# fp32 top-1 probability above which an image counts as one the float model is sure of.
CONFIDENT = 0.5
# The re-encode that measures how fragile the float model's own answers are on a set (the noise floor).
NOISE_FLOOR_JPEG_QUALITY = 85


@dataclass
class Report:
    """What `vision quantize` measured."""

    source: str
    out: Path
    method: str
    calibration_images: int
    excluded: list[str]
    seconds: float
    # On the held-out images (None without --held-out): all of them, those fp32 is confident on, and fp32
    # against itself after an invisible JPEG re-encode.
    held_out: Agreement | None = None
    confident: Agreement | None = None
    noise_floor: Agreement | None = None
    fp32_img_s: float | None = None
    int8_img_s: float | None = None
    batch_size: int = 8
    threads: int = 1

    def as_dict(self) -> dict[str, Any]:
        def agreement_dict(a: Agreement | None) -> dict[str, Any] | None:
            return None if a is None else {"images": a.images, "top1_agreement": a.top1_agreement, "top5_overlap": a.top5_overlap,
                                           "mean_kl": a.mean_kl, "changed": [list(c) for c in a.changed]}

        return {
            "source": self.source, "out": str(self.out), "method": self.method, "calibration_images": self.calibration_images,
            "excluded": self.excluded, "seconds": self.seconds, "held_out": agreement_dict(self.held_out),
            "confident": agreement_dict(self.confident), "noise_floor": agreement_dict(self.noise_floor),
            "forward": {"batch_size": self.batch_size, "threads": self.threads, "fp32_img_s": self.fp32_img_s,
                        "int8_img_s": self.int8_img_s},
        }


def reencoded_jpeg(path: Path) -> bytes:
    """The image at `path` saved again as JPEG at NOISE_FLOOR_JPEG_QUALITY (a change nobody can see)."""
    from PIL import Image

    from vision.media.photos import jpeg_bytes

    with Image.open(path) as img:
        return jpeg_bytes(img.convert("RGB"), quality=NOISE_FLOOR_JPEG_QUALITY)


def quantize_model(
    config: Any,  # vision.config.settings.ModelConfig
    calibration_dir: Path,
    out: Path,
    *,
    options: QuantizeOptions = QuantizeOptions(),
    held_out_dir: Path | None = None,
    threads: int = 1,
    speed_seconds: float = 3.0,
) -> Report:
    """Quantize the model of a spec (its `onnx=` file, else its cached export) and measure the result."""
    from vision.backends.onnx_backend import open_session
    from vision.config.settings import ServeSettings
    from vision.serving.loading import cached_onnx, model_card

    settings = ServeSettings(backend="onnxruntime", models=[config], threads=threads)
    card, weights = model_card(config, settings)
    if card.precision != "fp32":
        raise ConfigurationError(f"{config.onnx} is already {card.precision}: quantize its float model")
    if card.task == "features" or "logits" not in card.signature.outputs:
        raise ConfigurationError(f"model {card.name!r} has no classifier head: the agreement report needs logits")
    source = Path(config.onnx) if config.onnx is not None else cached_onnx(config, settings, card, weights)
    calibration = _images_in(calibration_dir)
    held_out = _images_in(held_out_dir) if held_out_dir is not None else []
    if held_out and {p.resolve() for p in held_out} & {p.resolve() for p in calibration}:
        raise ConfigurationError("the held-out folder shares images with the calibration folder")
    started = time.monotonic()
    excluded = quantize(source, out, calibration, card.preset, options)
    report = Report(source=str(source), out=out, method=options.method, calibration_images=len(calibration),
                    excluded=excluded, seconds=time.monotonic() - started, batch_size=options.batch_size, threads=threads)
    fp32, int8 = open_session(source, threads=threads), open_session(out, threads=threads)
    if held_out:
        from scipy.special import softmax

        batches = list(preprocessed(held_out, card.preset, 32))
        names = [p.name for p in held_out]
        reference, candidate = logits_of(fp32, batches), logits_of(int8, batches)
        report.held_out = agreement(reference, candidate, names)
        sure = softmax(reference.astype(np.float64), axis=1).max(axis=1) >= CONFIDENT
        if sure.any():
            report.confident = agreement(reference[sure], candidate[sure], [n for n, s in zip(names, sure, strict=True) if s])
        report.noise_floor = agreement(reference, logits_of(fp32, list(preprocessed(held_out, card.preset, 32, read=reencoded_jpeg))), names)
    if speed_seconds > 0:
        probe = next(preprocessed((calibration * options.batch_size)[: options.batch_size], card.preset, options.batch_size))
        report.fp32_img_s = forward_speed(fp32, probe, seconds=speed_seconds)
        report.int8_img_s = forward_speed(int8, probe, seconds=speed_seconds)
    return report


def format_report(report: Report) -> str:
    lines = [
        f"wrote {report.out}: int8 QDQ ({report.method}, {report.calibration_images} calibration images) in {report.seconds:.1f}s",
        f"  kept in float: {', '.join(report.excluded) or 'nothing'}",
    ]
    if report.held_out is not None:
        lines.append(f"held-out, {report.held_out.images} images: {report.held_out.summary()}")
        if report.confident is not None:
            lines.append(f"  where fp32's top-1 probability >= {CONFIDENT:g} ({report.confident.images} images): {report.confident.summary()}")
        if report.noise_floor is not None:
            lines.append(f"  noise floor, fp32 vs itself after a JPEG q{NOISE_FLOOR_JPEG_QUALITY} re-encode: {report.noise_floor.summary()}")
        if not report.held_out.passes():
            lines.append(f"  below the serving targets (top-1 >= {MIN_TOP1_AGREEMENT:.0%}, top-5 >= {MIN_TOP5_OVERLAP:.0%}); "
                         "compare with the noise floor before refusing it")
    if report.fp32_img_s and report.int8_img_s:
        lines.append(f"forward, batch {report.batch_size}, {report.threads} threads: fp32 {report.fp32_img_s:.0f} img/s, "
                     f"int8 {report.int8_img_s:.0f} img/s ({report.int8_img_s / report.fp32_img_s:.2f}x)")
    return "\n".join(lines)
