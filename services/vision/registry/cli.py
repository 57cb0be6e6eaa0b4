"""`vision registry ...`: the model registry (MLflow) from the command line.

    vision registry register lite --model efficientnet_lite0          # version 1, golden outputs recorded
    vision registry register lite --model arch=efficientnet_lite0,weights=ft.pt --run-id RUN --job-id J
    vision registry list
    vision registry show lite [VERSION]
    vision registry promote lite 2 --alias production               # verified first (sha256 + golden gate)
    vision registry rollback lite --alias production                # back to where the alias was before
    vision registry verify lite 2                                   # download, sha256, gate on the ONNX export
    vision registry delete-version lite 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PROG = "vision registry"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--registry-uri", default=os.environ.get("VISION_REGISTRY_URI"),
        help="registry store: sqlite:///PATH.db, postgresql://USER@HOST:PORT/DB or an MLflow tracking server "
        "http(s)://HOST:PORT [env VISION_REGISTRY_URI; default "
        "a SQLite file under $XDG_DATA_HOME/vision-serving/registry]",
    )
    parser.add_argument(
        "--artifact-root", default=os.environ.get("VISION_REGISTRY_ARTIFACT_ROOT"),
        help="where new versions' files go: a path or any MLflow artifact URI [env VISION_REGISTRY_ARTIFACT_ROOT; "
        "default artifacts/ beside the SQLite file]",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser(
        "register", help="register a model spec as the next version of NAME (records golden outputs)",
        description="Packages the model (weights as a state dict, ONNX export with every output, labels, "
        "thresholds, hierarchy, whitenings, model card), records its outputs on golden images, logs it all to an "
        "MLflow run with the sha256 of every file, and creates the next version of NAME.",
    )
    reg.add_argument("name", help="registered model name (also the served name and the Triton model name)")
    reg.add_argument("--model", required=True, metavar="SPEC", help="model spec, as `vision serve --model` takes it")
    reg.add_argument("--golden", action="append", type=Path, metavar="IMAGE",
                     help="a golden image (repeatable; default: scikit-image's coffee, chelsea, rocket, motorcycle)")
    reg.add_argument("--expect-like", metavar="VERSION",
                     help="copy VERSION's golden set: this version must answer like it (a re-export, another precision)")
    reg.add_argument("--tolerance", type=float, help="gate tolerance on outputs, relative to their scale (default 1e-3)")
    reg.add_argument("--min-agreement", type=float, metavar="FRACTION",
                     help="a version in another precision than --expect-like's (an int8 export): the share of golden "
                     "images whose top-1 must equal the reference's (default 0.99, i.e. all of a small golden set)")
    reg.add_argument("--run-id", help="the MLflow run that produced the weights (lineage); default: a new run")
    reg.add_argument("--job-id", help="lineage: the training job id")
    reg.add_argument("--base-model", help="lineage: what was fine-tuned (e.g. models:/lite/1 or efficientnet_lite0)")
    reg.add_argument("--dataset-fingerprint", help="lineage: fingerprint of the training data")
    reg.add_argument("--description", default="", help="version description")
    reg.add_argument("--artifact", action="append", default=[], metavar="NAME=FILE", help="store FILE as extra/NAME too")
    reg.add_argument("--promote", metavar="ALIAS", help="then point ALIAS at the new version")
    reg.add_argument("--json", action="store_true", help="print the new version as JSON")
    reg.set_defaults(func=_register)

    ls = sub.add_parser("list", help="registered models with their aliases and latest version")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    show = sub.add_parser("show", help="a model's versions, or one version's card, files, golden set and lineage")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    promote = sub.add_parser("promote", help="point an alias at a version (services following it switch)")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True, help="e.g. production, staging")
    promote.add_argument("--no-verify", action="store_true",
                         help="skip the download, sha256 and golden check before moving the alias (services still run them)")
    promote.set_defaults(func=_promote)

    rollback = sub.add_parser("rollback", help="point an alias back at the version it held before its last move")
    rollback.add_argument("name")
    rollback.add_argument("--alias", required=True)
    rollback.set_defaults(func=_rollback)

    verify = sub.add_parser("verify", help="download a version, check every sha256 and run its golden gate on its ONNX export")
    verify.add_argument("name")
    verify.add_argument("version")
    verify.set_defaults(func=_verify)

    delete = sub.add_parser("delete-version", help="delete a version (refused while an alias points at it)")
    delete.add_argument("name")
    delete.add_argument("version")
    delete.add_argument("--force", action="store_true", help="delete it even when aliases point at it (they are removed)")
    delete.set_defaults(func=_delete)
    return parser


def _store(args: argparse.Namespace):  # noqa: ANN202 - RegistryStore
    from vision.registry.store import RegistryStore

    return RegistryStore(args.registry_uri, args.artifact_root)


def _register(args: argparse.Namespace) -> int:
    from vision.config.settings import ModelConfig

    config = ModelConfig.parse_spec(args.model)
    if config.registry:
        print(f"{PROG} register: --model takes a model spec (arch=..., weights=...), not a registry URI", file=sys.stderr)
        return 2
    golden = None
    if args.golden:
        golden = []
        for path in args.golden:
            try:
                golden.append((path.name, path.read_bytes()))
            except OSError as exc:
                print(f"{PROG} register: cannot read golden image {path}: {exc.strerror or exc}", file=sys.stderr)
                return 2
    extra = {}
    for item in args.artifact:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"{PROG} register: --artifact takes NAME=FILE, got {item!r}", file=sys.stderr)
            return 2
        extra[key] = Path(value)
    lineage = {k: v for k, v in (("job_id", args.job_id), ("base_model", args.base_model),
                                 ("dataset_fingerprint", args.dataset_fingerprint)) if v}
    started = time.monotonic()
    store = _store(args)
    info = store.register(
        args.name, config, golden_images=golden, expect_like=args.expect_like, tolerance=args.tolerance,
        min_agreement=args.min_agreement,
        run_id=args.run_id, description=args.description, lineage=lineage, extra=extra,
    )
    if args.promote:
        store.promote(args.name, info.version, args.promote)
        info = store.version(args.name, info.version)
    if args.json:
        print(json.dumps(_version_dict(info), indent=2))
    else:
        aliases = f" (alias {', '.join(info.aliases)})" if info.aliases else ""
        print(f"registered {info.name} version {info.version}{aliases} in {time.monotonic() - started:.1f}s; run {info.run_id}")
    return 0


def _version_dict(info) -> dict:  # noqa: ANN001
    return {
        "name": info.name, "version": info.version, "aliases": list(info.aliases), "run_id": info.run_id,
        "source": info.source, "created": _when(info.created_ms), "description": info.description,
        "lineage": info.lineage, "sha256": info.sha256,
    }


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def _list(args: argparse.Namespace) -> int:
    models = _store(args).models()
    if args.json:
        print(json.dumps([m.__dict__ for m in models], indent=2))
        return 0
    if not models:
        print("no registered models")
    for m in models:
        aliases = " ".join(f"@{a}={v}" for a, v in sorted(m.aliases.items())) or "-"
        print(f"{m.name}  versions={m.versions} latest={m.latest_version or '-'}  aliases: {aliases}")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.version is None:
        model = store.model(args.name)
        versions = store.versions(args.name)
        if args.json:
            print(json.dumps({**model.__dict__, "versions": [_version_dict(v) for v in versions],
                              "alias_history": {a: store.alias_history(args.name, a) for a in model.aliases}}, indent=2))
            return 0
        print(f"{model.name}: {model.versions} versions; aliases: "
              + (", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"))
        for v in versions:
            aliases = f"  @{','.join(v.aliases)}" if v.aliases else ""
            lineage = " ".join(f"{k}={val}" for k, val in v.lineage.items())
            print(f"  {v.version:>4}  {_when(v.created_ms)}  {v.tags.get('vision.arch', '?'):20} run={v.run_id[:12]}"
                  f"{aliases}  {lineage}".rstrip())
        return 0
    info = store.version(args.name, args.version)
    with tempfile.TemporaryDirectory(prefix="vision-show-") as tmp:
        from vision.registry.package import MANIFEST

        try:
            package = store.download(args.name, info.version, Path(tmp) / "v")
            card, problems = package.card, []
            manifest = json.loads((package.root / MANIFEST).read_text())["files"]
        except Exception as exc:  # show what the registry knows even when the files are damaged
            card, problems, manifest = {}, [str(exc)], {}
    lineage = store.lineage(info)
    if args.json:
        print(json.dumps({**_version_dict(info), "card": card, "files": manifest, "lineage": lineage,
                          "problems": problems}, indent=2))
        return 0
    print(f"{info.name} version {info.version}  created {_when(info.created_ms)}"
          + (f"  aliases: {', '.join(info.aliases)}" if info.aliases else ""))
    if info.description:
        print(f"  {info.description}")
    if card:
        outputs = ", ".join(f"{o['name']}{tuple(o['shape'])}" for o in card["outputs"])
        preset = card["preset"]
        print(f"  arch {card['architecture']}  task {card['task']}  labels {card['num_labels']}  preset "
              f"{preset['name']} ({preset['resize_shorter']}->{preset['crop_size']})"
              + ("  RANDOM WEIGHTS" if card.get("random_weights") else ""))
        print(f"  outputs: {outputs}")
        g = card["golden"]
        print(f"  golden: {g['images']} images, top-1 {g['top1']}, tolerance {g['tolerance']:g}, expected from {g['reference']}")
    print(f"  source: {info.source}")
    for rel, sha in sorted(info.sha256.items()):
        size = manifest.get(rel, {}).get("bytes")
        print(f"    {sha[:16]}  {size if size is not None else '?':>10}  {rel}")
    if lineage:
        print(f"  run {lineage.get('run_id')} ({lineage.get('run_name', '')}, {lineage.get('status', '')})")
        for key in ("job_id", "base_model", "dataset_fingerprint"):
            if key in lineage:
                print(f"    {key}: {lineage[key]}")
        params = {k: v for k, v in lineage.get("params", {}).items()}
        if params:
            print("    params: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
        if lineage.get("metrics"):
            print("    metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(lineage["metrics"].items())))
        if lineage.get("curves"):
            print("    curves: " + ", ".join(f"{k} ({n} points)" for k, n in sorted(lineage["curves"].items())))
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 1 if problems else 0


def verify_version(store, name: str, version: str) -> list[str]:  # noqa: ANN001
    """Download, sha256, and the golden gate on the version's ONNX export: problems (empty = passes)."""
    from vision.config.settings import ModelConfig, ServeSettings
    from vision.registry.golden import Golden, check_with_onnx
    from vision.registry.package import ONNX, ArtifactCorrupted, serving_config
    from vision.serving.loading import model_card

    with tempfile.TemporaryDirectory(prefix="vision-verify-") as tmp:
        try:
            package = store.download(name, version, Path(tmp) / "v")
        except ArtifactCorrupted as exc:
            return exc.problems
        config = serving_config(package, name=name, version=str(version), base=ModelConfig(arch="x", backend="onnxruntime"))
        card, _ = model_card(config, ServeSettings(backend="onnxruntime", models=[config]))
        return check_with_onnx(package.root / ONNX, Golden.load(package.root), card)


def _promote(args: argparse.Namespace) -> int:
    store = _store(args)
    version = store.version(args.name, args.version).version
    if not args.no_verify:
        problems = verify_version(store, args.name, version)
        if problems:
            print(f"{PROG} promote: {args.name} version {version} fails verification; alias {args.alias!r} not moved:",
                  file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
    before = store.promote(args.name, version, args.alias)
    print(f"{args.name}@{args.alias}: {before or '(new)'} -> {version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    before, after = _store(args).rollback(args.name, args.alias)
    print(f"{args.name}@{args.alias}: {before} -> {after} (rolled back)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args)
    version = store.version(args.name, args.version).version
    problems = verify_version(store, args.name, version)
    if problems:
        print(f"{args.name} version {version}: FAILS", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.name} version {version}: every sha256 matches and the golden outputs reproduce")
    return 0


def _delete(args: argparse.Namespace) -> int:
    store = _store(args)
    store.delete_version(args.name, args.version, force=args.force)
    print(f"deleted {args.name} version {args.version}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    from vision.core.errors import ConfigurationError, NotFound

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except NotFound as exc:
        print(f"{PROG} {args.command}: not found: {exc}", file=sys.stderr)
        return 1
    except ConfigurationError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"{PROG} {args.command}: invalid model spec:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
