"""The offline `vision` commands, which neither run nor call a server: export-triton, sample-photos and
quantize. `add_commands` adds their parsers to the `vision` command line; each parser's `func` runs the
command and returns its exit status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The offline commands, in the order `vision --help` lists them."""
    export = sub.add_parser(
        "export-triton",
        help="export a registry model to ONNX inside a Triton model repository",
        description="Writes <repository>/<name>/config.pbtxt and <repository>/<name>/<version>/model.onnx "
        "(ONNX opset 17, dynamic batch axis, input 'images' FP32 3xHxW, output 'logits').",
    )
    export.add_argument(
        "--model", required=True, metavar="SPEC", help="architecture name or key=value spec, as `vision serve --model`"
    )
    export.add_argument("--repository", type=Path, required=True, help="Triton model repository directory")
    export.add_argument(
        "--weights", type=Path,
        help="weights file; overrides the spec's weights= key (default: the spec's, else bundled weights, if any)",
    )
    export.add_argument(
        "--version", help="integer version folder; overrides the spec's version= key (default: the spec's, else 1)"
    )
    export.add_argument(
        "--flavour",
        choices=["cpu-python", "gpu-onnxruntime"],
        default="cpu-python",
        help="gpu-onnxruntime: Triton's onnxruntime backend on KIND_GPU (production); cpu-python: the python "
        "backend running the same ONNX file with onnxruntime on KIND_CPU (what the local Triton here can run)",
    )
    export.add_argument(
        "--max-batch-size", type=int, default=16, help="config.pbtxt max_batch_size: largest batch Triton forms (default 16)"
    )
    export.add_argument(
        "--preferred-batch-sizes", default="4,8,16", help="dynamic_batching preferred sizes (default 4,8,16)"
    )
    export.add_argument(
        "--max-queue-delay-us", type=int, default=2000, help="dynamic_batching max queue delay (default 2000)"
    )
    export.add_argument("--instances", type=int, default=1, help="instance_group count (default 1)")
    export.add_argument("--tensorrt", action="store_true", help="gpu flavour: add the TensorRT accelerator (FP16)")
    export.set_defaults(func=_export_triton)

    photos_cmd = sub.add_parser(
        "sample-photos",
        help="write augmented real photos (scikit-image, matplotlib) for calibration or a held-out set",
        description="Random crops, flips and colour changes of the sample photos that ship with scikit-image and "
        "matplotlib. The calibration and held-out splits never share a source photo; the same seed writes the same files.",
    )
    photos_cmd.add_argument("--split", choices=["calibration", "held-out"], required=True)
    photos_cmd.add_argument("--count", type=int, default=96, help="images to write (default 96)")
    photos_cmd.add_argument("--out", type=Path, required=True, help="folder to write JPEG files into")
    photos_cmd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    photos_cmd.set_defaults(func=_sample_photos)

    quant = sub.add_parser(
        "quantize",
        help="write an int8 ONNX model (ONNX Runtime static quantization) and report its agreement and speed",
        description="Calibrates activation ranges by running the model's own preprocessing over --calibration, "
        "writes a QDQ int8 model (per-channel int8 weights, uint8 activations), then reports top-1 agreement, "
        "top-5 overlap and mean KL divergence against the float model on --held-out, and the forward speed of both. "
        "Serve the result with `vision serve --model arch=ARCH,name=NAME,onnx=FILE`. See docs/int8.md.",
    )
    quant.add_argument("--model", required=True, metavar="SPEC", help="model spec, as `vision serve --model` takes it")
    quant.add_argument(
        "--calibration", type=Path, required=True, help="folder of calibration images (about 100 is plenty)"
    )
    quant.add_argument("--out", type=Path, required=True, help="int8 ONNX file to write")
    quant.add_argument(
        "--held-out", type=Path, help="folder of images for the agreement report (none shared with --calibration)"
    )
    quant.add_argument(
        "--method", choices=["minmax", "entropy", "percentile"], default="minmax",
        help="activation range calibration (default minmax: as good as the others here, and fastest; docs/int8.md)",
    )
    quant.add_argument(
        "--exclude", default="stem,head", metavar="NODES",
        help="comma-separated nodes kept in float: 'stem' (first conv), 'head' (classifier) or node names "
        "(default stem,head; '' quantizes everything)",
    )
    quant.add_argument("--batch-size", type=int, default=8, help="calibration and speed-test batch (default 8)")
    quant.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the report (default 2)")
    quant.add_argument(
        "--speed-seconds", type=float, default=3.0, help="seconds per speed round, 0 to skip (default 3)"
    )
    quant.add_argument("--json", action="store_true", help="print the report as JSON")
    quant.set_defaults(func=_quantize)


def _export_triton(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vision.config.settings import ModelConfig
    from vision.core.errors import ConfigurationError
    from vision.triton.export import export_to_triton

    try:
        config = ModelConfig.parse_spec(args.model)
        if args.weights:
            config = config.model_copy(update={"weights": args.weights})
        if args.version:
            config = config.model_copy(update={"version": args.version})
        path = export_to_triton(
            config,
            args.repository,
            flavour=args.flavour,
            max_batch_size=args.max_batch_size,
            preferred_batch_sizes=tuple(int(x) for x in args.preferred_batch_sizes.split(",") if x),
            max_queue_delay_us=args.max_queue_delay_us,
            instances=args.instances,
            tensorrt=args.tensorrt,
        )
    except (ValidationError, ConfigurationError) as exc:
        print(f"vision export-triton: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _sample_photos(args: argparse.Namespace) -> int:
    from vision.media.photos import write_set

    try:
        written = write_set(args.split, args.count, args.out, seed=args.seed)
    except OSError as exc:
        print(f"vision sample-photos: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} {args.split} images to {args.out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from vision.config.settings import ModelConfig
    from vision.core.errors import ConfigurationError
    from vision.tools.quantize import QuantizeOptions, format_report, quantize_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = ModelConfig.parse_spec(args.model)
        if config.registry:
            raise ConfigurationError("--model takes a model spec (arch=..., onnx=...), not a registry URI")
        exclude = tuple(x.strip() for x in (args.exclude or "").split(",") if x.strip())
        options = QuantizeOptions(method=args.method, exclude=exclude, batch_size=args.batch_size)
        report = quantize_model(config, args.calibration, args.out, options=options, held_out_dir=args.held_out,
                                threads=args.threads, speed_seconds=args.speed_seconds)
    except (ConfigurationError, ValueError) as exc:
        print(f"vision quantize: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0
