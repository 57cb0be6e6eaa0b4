"""`vision`: the server and its command-line clients.

    vision serve                         # embedded default: all services on 127.0.0.1:50051
    vision classify coffee.jpg --top-k 5 # client: classify images through a running server
    vision models                        # client: list served models
    vision loadtest --help               # closed-loop load generator and raw-model baseline
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
    from vision.settings import ServeSettings

    for name, field in ServeSettings.model_fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        env = "VISION_" + name.upper()
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env {env}; default {default}]"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        kind = {int: int, float: float}.get(field.annotation, str)  # type: ignore[call-overload]
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="Serve a model (repeatable): an architecture name, or key=value pairs, e.g. "
        "'arch=resnet50,weights=/w/r50.pt,version=2,labels=/w/labels.txt,name=r50'. Keys: arch, name, version, "
        "weights, labels, preset, num_classes, task. [env VISION_MODELS as a JSON list; default efficientnet_lite0]",
    )


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vision.errors import ConfigurationError
    from vision.settings import ModelConfig, ServeSettings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "models") and v is not None}
    try:
        if args.models:
            overrides["models"] = [ModelConfig.parse_spec(spec) for spec in args.models]
        settings = ServeSettings(**overrides)
    except (ValidationError, ConfigurationError) as exc:
        print(f"vision serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vision.server import Endpoints, serve

    def announce(endpoints: Endpoints) -> None:
        names = ", ".join(f"{m.served_name}:{m.version}" for m in settings.models)
        print(f"vision serve: gRPC listening on {endpoints.grpc_address} (models: {names})", flush=True)
        print(f"vision serve: metrics at {endpoints.metrics_url}", flush=True)

    try:
        asyncio.run(serve(settings, on_ready=announce))
    except ConfigurationError as exc:
        print(f"vision serve: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vision serve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_images(paths: Sequence[Path]) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in paths]


def _rpc_error(exc: Exception, target: str) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"error from {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    raise exc


def _classify(args: argparse.Namespace) -> int:
    import grpc

    from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2

    request = classification_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name=args.model or "", version=args.version or ""),
        images=[common_pb2.Image(id=name, content=data) for name, data in _read_images(args.images)],
        top_k=args.top_k,
    )
    with grpc.insecure_channel(args.target, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        try:
            response = stub.Classify(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            return _rpc_error(exc, args.target)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(response), indent=2))
        return 0
    print(f"model {response.model.name} version {response.model.version}")
    for result in response.results:
        print(result.image_id)
        for rank, pred in enumerate(result.predictions, 1):
            print(f"  {rank}. {pred.score:.4f}  {pred.index:5d}  {pred.label}")
    return 0


def _models(args: argparse.Namespace) -> int:
    import grpc

    from vision.v1 import classification_pb2_grpc, common_pb2

    with grpc.insecure_channel(args.target) as channel:
        try:
            response = classification_pb2_grpc.ClassificationStub(channel).ListModels(
                common_pb2.ListModelsRequest(), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _rpc_error(exc, args.target)
    for m in response.models:
        p = m.preprocessing
        print(
            f"{m.name}:{m.version}  arch={m.architecture} task={m.task} labels={m.num_labels} backend={m.backend} "
            f"preset={p.preset}({p.resize_shorter}->{p.crop_size}) sha256={m.weights_sha256[:12] or '-'}"
        )
    return 0


def _loadtest(argv: list[str]) -> int:
    from loadtest.__main__ import main as loadtest_main

    return loadtest_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (all services, one process)")
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

    models = client("models", "list the models a running server serves")
    models.set_defaults(func=_models)

    sub.add_parser("loadtest", help="load generator; `vision loadtest --help` for its options", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        return _loadtest(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
