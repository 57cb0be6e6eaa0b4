"""The `vision` commands that talk to a running server: classify, tag, eval-tags, features, eval-retrieval,
fit-whitening, the DELF commands (vision.client.delf) and models. `add_commands` adds their parsers to the
`vision` command line; each parser's `func` runs the command and returns its exit status."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vision.client.channel import Target, add_connection_flags


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The client commands, in the order `vision --help` lists them."""

    def client(name: str, help_text: str, timeout: float = 30.0) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        add_connection_flags(p)
        p.add_argument("--timeout", type=float, default=timeout, help=f"RPC deadline in seconds (default {timeout:.0f})")
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
    eval_retrieval.add_argument(
        "--images", type=Path, required=True, help="database image folder (files named <name>.jpg)"
    )
    eval_retrieval.add_argument(
        "--gt", type=Path, required=True,
        help="Oxford ground-truth folder (*_query/good/ok/junk.txt) or Revisited gnd .pkl/.json",
    )
    eval_retrieval.add_argument("--queries", type=Path, help="query image folder (default: --images)")
    eval_retrieval.add_argument(
        "--no-crop", action="store_true", help="send whole query images, ignoring their bounding boxes"
    )
    eval_retrieval.add_argument(
        "--rerank", type=int, default=0, metavar="N",
        help="also re-rank each query's top N (e.g. 100) by DELF RANSAC inliers through the server's Delf service "
        "and report the scores after (default 0: off)",
    )
    eval_retrieval.add_argument(
        "--delf-model", default="", metavar="NAME", help="Delf model for --rerank (default: the server's default)"
    )
    _recipe_options(eval_retrieval)
    eval_retrieval.set_defaults(func=_features_command)

    fit = client("fit-whitening", "fit a descriptor whitening on a folder of images through a running server")
    fit.add_argument(
        "--images", type=Path, required=True, help="images to fit on (hundreds or more for a stable PCA)"
    )
    fit.add_argument(
        "--out", type=Path, required=True,
        help="whitening file to write (<name>.npz; serve it with whitenings=FOLDER)",
    )
    fit.add_argument(
        "--pairs", type=Path,
        help="matching pairs (name<TAB>name per line): Radenović et al.'s learned whitening",
    )
    fit.add_argument("--whitening-dim", type=int, help="keep this many dimensions (default: all)")
    _recipe_options(fit)
    fit.set_defaults(func=_features_command)

    from vision.client.delf import add_commands as add_delf_commands

    add_delf_commands(client)

    models = client("models", "list the models a running server serves")
    models.set_defaults(func=_models)


# --------------------------------------------------------------------------------------
# Shared by the commands
# --------------------------------------------------------------------------------------


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


def _rpc_error(exc: Exception, target: Target) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"error from {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    raise exc


def _unary(args: argparse.Namespace, stub_class: type, method: str, request: object) -> object | None:
    """One RPC to `args.target` with `args.timeout`; None (after printing the status) when it fails."""
    import grpc

    from vision.client.channel import open_channel

    with open_channel(args.target) as channel:
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


# --------------------------------------------------------------------------------------
# classify, tag, eval-tags, models
# --------------------------------------------------------------------------------------


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


def _tag_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, help="one threshold for every label, in [0, 1] (default: the model's)")
    parser.add_argument("--max-tags", type=int, help="at most this many tags per image (default: no limit)")
    parser.add_argument("--min-score", type=float, help="drop tags scoring below this, in [0, 1]")
    parser.add_argument("--model", help="model name (default: the server's default tagging model)")
    parser.add_argument("--version", help="model version (default: newest)")


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
DATASET is one of
  a folder with one subfolder per label, ROOT/<label>/<image>: an image's true labels are the folders it
  appears in (identical files in several folders are one sample);
  a NUS-WIDE-style JSON file {"labels": [...], "samples": [{"image": PATH, "labels": [NAME or INDEX, ...]}]}
  with image paths relative to the JSON file;
  a download job's images.txt.
A folder holding a dataset.json or an images.txt is read as that file.
Labels match tags by WordNet id (n02121808) or name (case-insensitive); tags outside the dataset's labels
are ignored. Each batch is sent twice: once as given (--threshold/--min-score/--max-tags; unset = the
model's own thresholds) for the predicted tags, once with threshold 0 for every label's score (AP/mAP).
Metrics (vision.evaluation.tagging): per-label P/R/F1, CP/CR/CF1 over labels with positives, OP/OR/OF1, samples-F1, mAP.
"""


def _eval_tags(args: argparse.Namespace) -> int:
    import grpc
    import numpy as np

    from vision.client.channel import open_channel
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
    with open_channel(args.target) as channel:
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

    from vision.client.channel import open_channel
    from vision.v1 import classification_pb2_grpc, common_pb2, delf_pb2_grpc, tagging_pb2_grpc

    served: dict[tuple[str, str], tuple[common_pb2.ModelInfo, list[str]]] = {}
    with open_channel(args.target) as channel:
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
        try:  # Delf's ListModels wraps each ModelInfo with how the model extracts keypoints
            delf_models = delf_pb2_grpc.DelfStub(channel).ListModels(
                common_pb2.ListModelsRequest(), timeout=args.timeout
            ).models
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


# --------------------------------------------------------------------------------------
# features, eval-retrieval, fit-whitening (vision.client.features)
# --------------------------------------------------------------------------------------


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


def _options(args: argparse.Namespace):  # noqa: ANN202 - vision.client.features.RecipeOptions
    from vision.client.features import RecipeOptions

    scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    return RecipeOptions(args.recipe, args.layer, args.gem_p, scales, args.whitening, args.dim, args.model, args.version)


def _features_command(args: argparse.Namespace) -> int:
    """features / eval-retrieval / fit-whitening: errors from the server or the files end the command cleanly."""
    import grpc
    import numpy as np

    from vision.client import features as fc
    from vision.core.errors import ConfigurationError

    try:
        if args.command == "features":
            vectors, response = fc.extract(args.target, args.images, _options(args), batch_size=args.batch_size, timeout=args.timeout)
            if args.out:
                np.save(args.out, vectors)
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
    except BrokenPipeError:
        raise  # an OSError, but of our own output: `vision.cli.main` ends the command quietly
    except (OSError, ConfigurationError, ValueError, KeyError) as exc:
        print(f"vision {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
