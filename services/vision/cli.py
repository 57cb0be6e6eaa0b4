"""`vision`: the server and its command-line clients.

    vision serve                         # embedded default: all services on 127.0.0.1:50051
    vision classify coffee.jpg --top-k 5 # client: classify images through a running server
    vision features coffee.jpg --recipe gem          # client: global descriptors (Features service)
    vision eval-retrieval --images DB --gt GT --recipe rmac  # client: retrieval mAP (Oxford/Revisited)
    vision fit-whitening --images DIR --out w/pca.npz        # client: fit a descriptor whitening
    vision delf-extract a.jpg --show 5                   # client: DELF keypoints + descriptors (Delf service)
    vision delf-match a.jpg b.jpg --out matches.png      # client: RANSAC-verified DELF matches, drawn (alias: match)
    vision fit-delf-pca --images DIR --out pca.npz       # client: fit the DELF descriptor PCA (40-d)
    vision tag coffee.jpg                # client: tag images (multi-label + hierarchy) through a running server
    vision eval-tags DATASET             # client: multi-label metrics of the Tagging service on labelled images
    vision models                        # client: list served models
    vision sample-photos --split held-out --count 500 --out held-out/   # augmented real photos, known split
    vision quantize --model efficientnet_lite0 --calibration DIR --held-out DIR --out int8.onnx  # int8 + report
    vision export-triton --model efficientnet_lite0 --repository repo  # ONNX model + config.pbtxt for Triton
    vision triton --repository repo      # local tritonserver on 127.0.0.1 (sets its runtime up on first use)
    vision loadtest --help               # closed-loop load generator and raw-model baseline
    vision registry --help               # model registry (MLflow): register, promote, rollback, show ...
    vision jobs --help                   # jobs: submit-download / submit-finetune, status, list, cancel, watch, wait
    vision worker --queues download,train  # Celery worker for the jobs (Redis at 127.0.0.1:6379)
    vision serve --model models:/lite@production   # serve a registry alias and follow it
    vision serve --runner ray              # the same services on Ray Serve (gRPC proxy, @serve.batch; docs/ray.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeSettings field, so flags, env vars and validation share one definition."""
    from vision.config.settings import ModelConfig, ServeSettings

    for name, field in ServeSettings.model_fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        env = "VISION_" + name.upper()
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env {env}; default {default}]"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {int: int, float: float}.get(field.annotation, str)  # type: ignore[call-overload]
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="Serve a model (repeatable): an architecture name, or key=value pairs, e.g. "
        "'arch=resnet50,weights=/w/r50.pt,version=2,labels=/w/labels.txt,name=r50'. "
        f"Keys: {', '.join(ModelConfig.model_fields)} (see docs/tagging.md for the tagging ones). "
        "Or a model registry URI: models:/NAME@ALIAS serves the version the alias points to and follows it "
        "(--registry-* flags; docs/registry.md), models:/NAME/VERSION pins one. "
        "[env VISION_MODELS as a JSON list; default efficientnet_lite0]",
    )


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vision.config.settings import ModelConfig, ServeSettings
    from vision.core.errors import ConfigurationError

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "models") and v is not None}
    try:
        if args.models:
            overrides["models"] = [ModelConfig.parse_spec(spec) for spec in args.models]
        settings = ServeSettings(**overrides)
    except (ValidationError, ConfigurationError) as exc:
        print(f"vision serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vision.runners.server import Endpoints, serve

    def announce(endpoints: Endpoints) -> None:
        names = ", ".join(m.registry or f"{m.served_name}:{m.version}" for m in settings.models)
        if settings.services == ["jobs"]:
            names = "none: jobs only"
        print(f"vision serve: gRPC listening on {endpoints.grpc_address} (models: {names})", flush=True)
        print(f"vision serve: metrics at {endpoints.metrics_url}", flush=True)

    try:
        if settings.runner == "ray":
            from vision.runners.ray.runner import run as run_on_ray

            run_on_ray(settings, on_ready=announce)
        else:
            asyncio.run(serve(settings, on_ready=announce))
    except ConfigurationError as exc:
        print(f"vision serve: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vision serve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_images(command: str, paths: Sequence[Path]) -> list[tuple[str, bytes]] | None:
    """(name, bytes) per path; None (after printing `vision COMMAND: cannot read PATH: reason`) if one fails."""
    images = []
    for p in paths:
        try:
            images.append((str(p), p.read_bytes()))
        except OSError as exc:
            print(f"vision {command}: cannot read {p}: {exc.strerror or exc}", file=sys.stderr)
            return None
    return images


def _rpc_error(exc: Exception, target: str) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"error from {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    raise exc


def _unary(args: argparse.Namespace, stub_class: type, method: str, request: object) -> object | None:
    """One RPC to `args.target` with `args.timeout`; None (after printing the status) when it fails."""
    import grpc

    with grpc.insecure_channel(args.target, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        try:
            return getattr(stub_class(channel), method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            _rpc_error(exc, args.target)
            return None


def _printed_json(args: argparse.Namespace, response: object) -> bool:
    if not getattr(args, "json", False):
        return False
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(response), indent=2))  # type: ignore[arg-type]
    return True


def _classify(args: argparse.Namespace) -> int:
    from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

    images = _read_images("classify", args.images)
    if images is None:
        return 2
    request = classification_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name=args.model or "", version=args.version or ""),
        images=[common_pb2.Image(id=name, content=data) for name, data in images],
        top_k=args.top_k,
    )
    response = _unary(args, classification_pb2_grpc.ClassificationStub, "Classify", request)
    if response is None or _printed_json(args, response):
        return 0 if response is not None else 1
    print(f"model {response.model.name} version {response.model.version}")
    for result in response.results:
        print(result.image_id)
        for rank, pred in enumerate(result.predictions, 1):
            print(f"  {rank}. {pred.score:.4f}  {pred.index:5d}  {pred.label}")
    return 0


def _tag_request(args: argparse.Namespace, images: Sequence[tuple[str, bytes]], *, scores_only: bool = False):  # noqa: ANN202
    from vision.v1 import common_pb2, tagging_pb2

    request = tagging_pb2.TagRequest(
        model=common_pb2.ModelSelector(name=args.model or "", version=args.version or ""),
        images=[common_pb2.Image(id=name, content=data) for name, data in images],
    )
    if scores_only:
        request.threshold = 0.0  # every label with its score
        return request
    for field in ("threshold", "max_tags", "min_score"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    return request


def _tag(args: argparse.Namespace) -> int:
    from vision.v1 import tagging_pb2_grpc

    images = _read_images("tag", args.images)
    if images is None:
        return 2
    request = _tag_request(args, images)
    response = _unary(args, tagging_pb2_grpc.TaggingStub, "Tag", request)
    if response is None or _printed_json(args, response):
        return 0 if response is not None else 1
    print(f"model {response.model.name} version {response.model.version}")
    for result in response.results:
        print(f"{result.image_id}: {len(result.tags)} tags")
        for t in result.tags:
            source = "hierarchy" if t.from_hierarchy else "model"
            print(f"  {t.score:.4f}  {t.index:5d}  {t.wnid or '-':9}  {source:9}  {t.label}")
    return 0


EVAL_TAGS_HELP = """\
DATASET is either
  a folder with one subfolder per label, ROOT/<label>/<image>: an image's true labels are the folders it
  appears in (identical files in several folders are one sample), or
  a NUS-WIDE-style JSON file {"labels": [...], "samples": [{"image": PATH, "labels": [NAME or INDEX, ...]}]}
  with image paths relative to the JSON file.
Labels match tags by WordNet id (n02121808) or name (case-insensitive); tags outside the dataset's labels
are ignored. Each batch is sent twice: once as given (--threshold/--min-score/--max-tags; unset = the
model's own thresholds) for the predicted tags, once with threshold 0 for every label's score (AP/mAP).
Metrics (vision.evaluation.tagging): per-label P/R/F1, CP/CR/CF1 over labels with positives, OP/OR/OF1, samples-F1, mAP.
"""


def _eval_tags(args: argparse.Namespace) -> int:
    import grpc
    import numpy as np

    from vision.evaluation.tagging import evaluate
    from vision.labels.datasets import DatasetError, LabelMatcher, load_tag_dataset
    from vision.v1 import tagging_pb2_grpc

    try:
        dataset = load_tag_dataset(args.dataset)
    except DatasetError as exc:
        print(f"vision eval-tags: {exc}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("vision eval-tags: --batch-size must be at least 1", file=sys.stderr)
        return 2
    n, n_labels = len(dataset.samples), len(dataset.labels)
    scores = np.zeros((n, n_labels), dtype=np.float64)
    predicted = np.zeros((n, n_labels), dtype=bool)
    matcher = LabelMatcher(dataset.labels)
    model = None
    with grpc.insecure_channel(args.target, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        stub = tagging_pb2_grpc.TaggingStub(channel)
        for start in range(0, n, args.batch_size):
            batch = dataset.samples[start : start + args.batch_size]
            images = [(str(s.path), s.path.read_bytes()) for s in batch]
            try:
                decided = stub.Tag(_tag_request(args, images), timeout=args.timeout)
                scored = stub.Tag(_tag_request(args, images, scores_only=True), timeout=args.timeout)
            except grpc.RpcError as exc:
                return _rpc_error(exc, args.target)
            model = decided.model
            for offset, (d, sc) in enumerate(zip(decided.results, scored.results, strict=True)):
                matcher.fill(predicted[start + offset], d.tags, scores=False)
                matcher.fill(scores[start + offset], sc.tags, scores=True)
    for col in sorted(set(range(n_labels)) - matcher.seen):
        print(f"vision eval-tags: warning: label {dataset.labels[col]!r} matches no tag of the model", file=sys.stderr)
    report = evaluate(dataset.truth(), scores, y_pred=predicted, label_names=dataset.labels)
    assert model is not None
    if args.json:
        print(json.dumps({"model": {"name": model.name, "version": model.version}, "dataset": dataset.source,
                          **report.as_dict()}, indent=2))
        return 0
    print(f"model {model.name} version {model.version}; dataset {dataset.source}")
    print(f"{report.n_samples} images, {report.n_labels} labels ({report.n_labels_evaluated} with positives)")
    print(f"CP {report.CP:.4f}  CR {report.CR:.4f}  CF1 {report.CF1:.4f}")
    print(f"OP {report.OP:.4f}  OR {report.OR:.4f}  OF1 {report.OF1:.4f}")
    print(f"samples-F1 {report.samples_f1:.4f}  mAP {report.mAP:.4f}")
    width = max(len(name) for name in dataset.labels)
    print(f"  {'label':{width}}  support  predicted  TP  precision  recall  F1      AP")
    for entry in report.as_dict()["per_label"]:
        ap = "-" if entry["average_precision"] is None else f"{entry['average_precision']:.4f}"
        print(
            f"  {entry['name']:{width}}  {entry['support']:7d}  {entry['n_predicted']:9d}  {entry['true_positives']:2d}"
            f"  {entry['precision']:9.4f}  {entry['recall']:6.4f}  {entry['f1']:.4f}  {ap}"
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    import grpc

    from vision.v1 import classification_pb2_grpc, common_pb2, tagging_pb2_grpc

    served: dict[tuple[str, str], tuple[common_pb2.ModelInfo, list[str]]] = {}
    with grpc.insecure_channel(args.target) as channel:
        for service, stub in (
            ("classification", classification_pb2_grpc.ClassificationStub(channel)),
            ("tagging", tagging_pb2_grpc.TaggingStub(channel)),
        ):
            try:
                response = stub.ListModels(common_pb2.ListModelsRequest(), timeout=args.timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]  # not hosted here
                    continue
                return _rpc_error(exc, args.target)
            for m in response.models:
                served.setdefault((m.name, m.version), (m, []))[1].append(service)
        from vision.v1 import delf_pb2_grpc

        try:  # Delf's ListModels wraps each ModelInfo with how the model extracts keypoints
            delf_models = delf_pb2_grpc.DelfStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=args.timeout).models
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                return _rpc_error(exc, args.target)
            delf_models = []
        for d in delf_models:
            served.setdefault((d.model.name, d.model.version), (d.model, []))[1].append(f"delf({d.layer},{d.scoring})")
    for m, services in served.values():
        p = m.preprocessing
        tags = f" tag_labels={m.num_tag_labels}" if m.num_tag_labels else ""
        weights = "RANDOM" if m.random_weights else (m.weights_sha256[:12] or "-")
        outputs = ",".join(o.name for o in m.outputs)
        print(
            f"{m.name}:{m.version}  arch={m.architecture} task={m.task} labels={m.num_labels}{tags} backend={m.backend} "
            f"precision={m.precision or 'fp32'} "
            f"preset={p.preset}({p.resize_shorter}->{p.crop_size}) sha256={weights} outputs={outputs} "
            f"services={','.join(services)}"
        )
        if m.HasField("registry"):
            r = m.registry
            line = f"  registry {r.uri}: serving {r.serving_version}" + (f", alias at {r.alias_version}" if r.alias else "")
            if r.refused_version:
                line += f"; REFUSED version {r.refused_version} ({r.refused_check}): {r.refused_reason}"
            if r.error:
                line += f"; registry error: {r.error}"
            print(line)
    return 0


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
    except (OSError, FileNotFoundError) as exc:
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


def _triton(argv: list[str]) -> int:
    from vision.triton.cli import main as triton_main

    return int(triton_main(argv) or 0)


def _loadtest(argv: list[str]) -> int:
    from loadtest.__main__ import main as loadtest_main

    return loadtest_main(argv)


def _tag_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, help="one threshold for every label, in [0, 1] (default: the model's)")
    parser.add_argument("--max-tags", type=int, help="at most this many tags per image (default: no limit)")
    parser.add_argument("--min-score", type=float, help="drop tags scoring below this, in [0, 1]")
    parser.add_argument("--model", help="model name (default: the server's default tagging model)")
    parser.add_argument("--version", help="model version (default: newest)")


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="center", help="center, ten_crop, spoc, avg, mac, gem, rmac, crow (default center)")
    parser.add_argument("--layer", default="", help="pooled recipes: feature map to pool (default: the model's last)")
    parser.add_argument("--gem-p", type=float, help="gem: the exponent (default 3)")
    parser.add_argument("--scales", default="", help="pooled recipes: comma-separated scales, e.g. 1,0.707,0.5 (default 1)")
    parser.add_argument("--whitening", default="", help="a whitening stored with the model (default none)")
    parser.add_argument("--dim", type=int, help="with --whitening: output dimension")
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--version", default="", help="model version (default: the model's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")


def _options(args: argparse.Namespace):  # noqa: ANN202 - features_client.RecipeOptions
    from vision.client.features import RecipeOptions

    scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    return RecipeOptions(args.recipe, args.layer, args.gem_p, scales, args.whitening, args.dim, args.model, args.version)


def _features_command(args: argparse.Namespace) -> int:
    """features / eval-retrieval / fit-whitening: errors from the server or the files end the command cleanly."""
    import grpc

    from vision.client import features as fc
    from vision.core.errors import ConfigurationError

    try:
        if args.command == "features":
            vectors, response = fc.extract(args.target, args.images, _options(args), batch_size=args.batch_size, timeout=args.timeout)
            if args.out:
                np_save(args.out, vectors)
            print(f"model {response.model.name} version {response.model.version} recipe {response.recipe.name} dim {response.dim}")
            for path, vector in zip(args.images, vectors, strict=True):
                head = " ".join(f"{v:+.4f}" for v in vector[:6])
                print(f"{path}: {head} ...")
        elif args.command == "eval-retrieval":
            from vision.client.delf import Options as DelfOptions

            result = fc.eval_retrieval(
                args.target, args.images, args.gt, _options(args), queries=args.queries,
                crop_queries=not args.no_crop, batch_size=args.batch_size, timeout=args.timeout,
                rerank=args.rerank, delf=DelfOptions(model=args.delf_model),
            )
            print(fc.dump(result))
        else:
            result = fc.fit_whitening(
                args.target, args.images, args.out, _options(args), pairs=args.pairs, dim=args.whitening_dim,
                batch_size=args.batch_size, timeout=args.timeout,
            )
            print(fc.dump(result))
    except grpc.RpcError as exc:
        return _rpc_error(exc, args.target)
    except (OSError, ConfigurationError, ValueError, KeyError) as exc:
        print(f"vision {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def np_save(path: Path, vectors: object) -> None:
    import numpy as np

    np.save(path, vectors)


def _add_delf_commands(client) -> None:  # noqa: ANN001 - build_parser's `client` factory
    """delf-extract, delf-match (alias match), fit-delf-pca: clients of the Delf service (vision.client.delf)."""
    from vision.client.delf import EXTRACT_HELP, FIT_PCA_HELP, MATCH_HELP, add_extract_options, run

    extract = client("delf-extract", "DELF keypoints and descriptors of images through a running server")
    extract.description = EXTRACT_HELP
    extract.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, GIF)")
    extract.add_argument("--show", type=int, default=5, help="print the best N keypoints per image (default 5)")
    extract.add_argument("--save", type=Path, metavar="DIR", help="write DIR/<name>.delf.npz per image (delf-match reads them)")
    extract.add_argument("--json", action="store_true", help="print the response as JSON")
    add_extract_options(extract)
    extract.set_defaults(func=run)

    for name, help_text in (
        ("delf-match", "match two images with DELF + RANSAC through a running server (alias: match)"),
        ("match", "same as delf-match"),
    ):
        match = client(name, help_text)
        match.description = MATCH_HELP
        match.add_argument("a", type=Path, help="image file, or features saved by delf-extract --save (*.delf.npz)")
        match.add_argument("b", type=Path, help="the other side, likewise")
        match.add_argument("--out", type=Path, help="draw both images side by side with a line per inlier (PNG)")
        match.add_argument("--json", action="store_true", help="print the response as JSON")
        add_extract_options(match)
        match.set_defaults(func=run)

    fit = client("fit-delf-pca", "fit the DELF descriptor PCA on a folder of images through a running server")
    fit.formatter_class = argparse.RawDescriptionHelpFormatter
    fit.epilog = FIT_PCA_HELP
    fit.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    fit.add_argument("--out", type=Path, required=True, help="PCA file to write (.npz; serve it with delf_pca=FILE)")
    fit.add_argument("--dim", type=int, default=40, help="dimensions kept (default 40, the reference's)")
    fit.add_argument("--whiten", action="store_true", help="divide by the axes' standard deviations (default off)")
    fit.add_argument("--batch-size", type=int, default=4, help="images per Extract request (default 4)")
    fit.add_argument("--max-images", type=int, help="use at most this many images")
    add_extract_options(fit)
    fit.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the gRPC server (all services, one process; --runner ray: a Ray Serve application, docs/ray.md)",
    )
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
        p.add_argument("--timeout", type=float, default=30.0, help="RPC deadline in seconds (default 30)")
        return p

    classify = client("classify", "classify images with a running server")
    classify.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, GIF)")
    classify.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    classify.add_argument("--model", help="model name (default: the server's default)")
    classify.add_argument("--version", help="model version (default: newest)")
    classify.add_argument("--json", action="store_true", help="print the response as JSON")
    classify.set_defaults(func=_classify)

    tag = client("tag", "tag images with a running server (multi-label, with a label hierarchy)")
    tag.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, GIF)")
    _tag_options(tag)
    tag.add_argument("--json", action="store_true", help="print the response as JSON")
    tag.set_defaults(func=_tag)

    eval_tags = client("eval-tags", "multi-label metrics of a running server's Tagging service on labelled images")
    eval_tags.formatter_class = argparse.RawDescriptionHelpFormatter
    eval_tags.epilog = EVAL_TAGS_HELP
    eval_tags.add_argument("dataset", type=Path, help="label folder or NUS-WIDE-style JSON (see below)")
    _tag_options(eval_tags)
    eval_tags.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    eval_tags.add_argument("--json", action="store_true", help="print the report (with per-label metrics) as JSON")
    eval_tags.set_defaults(func=_eval_tags)

    features = client("features", "global descriptors of images through a running server's Features service")
    features.add_argument("images", nargs="+", type=Path, help="image files")
    _recipe_options(features)
    features.add_argument("--out", type=Path, help="also save the (n, dim) float32 array here (.npy)")
    features.set_defaults(func=_features_command)

    eval_retrieval = client(
        "eval-retrieval",
        "retrieval mAP / mP@k of a recipe through a running server (Oxford, Paris or Revisited ground truth)",
    )
    eval_retrieval.add_argument("--images", type=Path, required=True, help="database image folder (files named <name>.jpg)")
    eval_retrieval.add_argument("--gt", type=Path, required=True, help="Oxford ground-truth folder (*_query/good/ok/junk.txt) or Revisited gnd .pkl/.json")
    eval_retrieval.add_argument("--queries", type=Path, help="query image folder (default: --images)")
    eval_retrieval.add_argument("--no-crop", action="store_true", help="send whole query images, ignoring their bounding boxes")
    eval_retrieval.add_argument(
        "--rerank", type=int, default=0, metavar="N",
        help="also re-rank each query's top N (e.g. 100) by DELF RANSAC inliers through the server's Delf service "
        "and report the scores after (default 0: off)",
    )
    eval_retrieval.add_argument("--delf-model", default="", metavar="NAME", help="Delf model for --rerank (default: the server's default)")
    _recipe_options(eval_retrieval)
    eval_retrieval.set_defaults(func=_features_command)

    fit = client("fit-whitening", "fit a descriptor whitening on a folder of images through a running server")
    fit.add_argument("--images", type=Path, required=True, help="images to fit on (hundreds or more for a stable PCA)")
    fit.add_argument("--out", type=Path, required=True, help="whitening file to write (<name>.npz; serve it with whitenings=FOLDER)")
    fit.add_argument("--pairs", type=Path, help="matching pairs (name<TAB>name per line): Radenović et al.'s learned whitening")
    fit.add_argument("--whitening-dim", type=int, help="keep this many dimensions (default: all)")
    _recipe_options(fit)
    fit.set_defaults(func=_features_command)

    _add_delf_commands(client)

    models = client("models", "list the models a running server serves")
    models.set_defaults(func=_models)

    export = sub.add_parser(
        "export-triton",
        help="export a registry model to ONNX inside a Triton model repository",
        description="Writes <repository>/<name>/config.pbtxt and <repository>/<name>/<version>/model.onnx "
        "(ONNX opset 17, dynamic batch axis, input 'images' FP32 3xHxW, output 'logits').",
    )
    export.add_argument("--model", required=True, metavar="SPEC", help="architecture name or key=value spec, as `vision serve --model`")
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
    export.add_argument("--preferred-batch-sizes", default="4,8,16", help="dynamic_batching preferred sizes (default 4,8,16)")
    export.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic_batching max queue delay (default 2000)")
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
    quant.add_argument("--calibration", type=Path, required=True, help="folder of calibration images (about 100 is plenty)")
    quant.add_argument("--out", type=Path, required=True, help="int8 ONNX file to write")
    quant.add_argument("--held-out", type=Path, help="folder of images for the agreement report (none shared with --calibration)")
    quant.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                       help="activation range calibration (default minmax: as good as the others here, and fastest; docs/int8.md)")
    quant.add_argument("--exclude", default="stem,head", metavar="NODES",
                       help="comma-separated nodes kept in float: 'stem' (first conv), 'head' (classifier) or node names "
                       "(default stem,head; '' quantizes everything)")
    quant.add_argument("--batch-size", type=int, default=8, help="calibration and speed-test batch (default 8)")
    quant.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the report (default 2)")
    quant.add_argument("--speed-seconds", type=float, default=3.0, help="seconds per speed round, 0 to skip (default 3)")
    quant.add_argument("--json", action="store_true", help="print the report as JSON")
    quant.set_defaults(func=_quantize)

    sub.add_parser("triton", help="run the local Triton server; `vision triton --help`", add_help=False)
    sub.add_parser("loadtest", help="load generator; `vision loadtest --help` for its options", add_help=False)
    sub.add_parser("registry", help="model registry (MLflow): register, list, show, promote, rollback, verify, "
                   "delete-version; `vision registry --help`", add_help=False)
    sub.add_parser("jobs", help="download and fine-tune jobs through the Jobs service: submit-download, "
                   "submit-finetune, status, list, cancel, watch, wait; `vision jobs --help`", add_help=False)
    sub.add_parser("worker", help="Celery worker for the job queues (download, train); `vision worker --help`",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        return _loadtest(argv[1:])
    if argv[:1] == ["registry"]:
        from vision.registry.cli import main as registry_main

        return registry_main(argv[1:])
    if argv[:1] == ["jobs"]:
        from vision.client.jobs import main as jobs_main

        return jobs_main(argv[1:])
    if argv[:1] == ["worker"]:
        from vision.runners.worker import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["triton"]:
        return _triton(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
