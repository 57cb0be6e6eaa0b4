"""A registered version's files ("the package"), built at registration and checked after every download.

    card.json           what the version is: architecture, task, head width, preset, named outputs,
                        input geometry, labels, published metrics, the versions of the tools that built it
    spec.json           the model spec to serve it with (file keys point at files of the package)
    weights.pt          the weights as a plain state dict (loaded with weights_only=True)
    model.onnx          the ONNX export with every output of the signature (parity-checked against torch)
    labels/<file>       the label vocabulary, when it is a file (`imagenet` and `none` are names, not files)
    hierarchy/<file>    the tag hierarchy, when it is a file
    thresholds/<file>   per-label tagging thresholds, when the spec has them
    whitenings/         descriptor whitenings (PCA, <name>.npz), when the spec has them (Features service)
    extra/<name>        further artifacts named at registration (whitening/PCA matrices, ...)
    golden/             golden images, the outputs recorded on them, and golden.json (vision.registry.golden)
    manifest.json       sha256 and size of every file above

The sha256 of every file is also written into the model version's tags (`vision.sha256.<path>`), in the
registry database; a download is verified against those tags, so a file changed in the artifact store
(or a manifest changed with it) is caught.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision.core.errors import ConfigurationError
from vision.core.files import sha256_file
from vision.evaluation.agreement import MIN_TOP1_AGREEMENT
from vision.registry.golden import DEFAULT_TOLERANCE, Golden, prepare_images, record, run_onnx
from vision.tasks.tagging import tagger_of

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
CARD = "card.json"
SPEC = "spec.json"
WEIGHTS = "weights.pt"
ONNX = "model.onnx"
# Keyword values of spec keys that are names, not files.
_KEYWORDS = {"labels": {"imagenet", "none"}, "hierarchy": {"wordnet", "none"}}
# Spec keys that describe the version (stored); the others (name, version, backend, weights, onnx,
# triton_model) are how or where one process serves it.
_STORED_KEYS = ("arch", "labels", "preset", "num_classes", "task", "hierarchy", "thresholds", "whitenings")
# Spec keys that name a folder (copied whole) rather than a file.
_FOLDER_KEYS = ("whitenings",)


class ArtifactCorrupted(ConfigurationError):
    """A downloaded file is missing or its sha256 differs from the one recorded at registration."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("artifacts do not match their recorded sha256: " + "; ".join(self.problems[:4]))


@dataclass(frozen=True)
class Package:
    root: Path
    # Relative path -> sha256, every file of the package except the manifest itself.
    files: dict[str, str]
    card: dict[str, Any]
    spec: dict[str, Any]


def build(
    config: Any,
    out: Path,
    *,
    golden_images: Sequence[tuple[str, bytes]] | None = None,
    expect_like: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_agreement: float | None = None,
    extra: Mapping[str, Path] | None = None,
    settings: Any = None,
) -> Package:
    """Write the package of `config` (a vision.config.settings.ModelConfig) into the empty folder `out`.

    Golden outputs are recorded on `golden_images` (default: scikit-image's photos) with the version's own
    export, unless `expect_like` names the package folder of another version: then that version's golden
    set is copied, and this version must answer like it (a re-export, an engine or precision change).
    A version in another precision than that one (an int8 export of a float model) is held to top-1
    agreement with it (`min_agreement`, default 0.99) instead of the output tolerance; it needs `expect_like`.
    """
    from vision.config.settings import RANDOM_WEIGHTS, ServeSettings
    from vision.registry import golden as golden_mod
    from vision.serving.loading import model_card

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ConfigurationError(f"package folder {out} is not empty")
    if config.backend == "triton":
        config = config.model_copy(update={"backend": None})
    settings = settings or ServeSettings(backend="onnxruntime", models=[config])
    settings = settings.model_copy(update={"backend": "onnxruntime"})
    card, weights = model_card(config, settings)

    spec: dict[str, Any] = {}
    for key in _STORED_KEYS:
        value = getattr(config, key)
        if value is None:
            continue
        if key in _KEYWORDS and str(value) in _KEYWORDS[key] or key in ("arch", "preset", "num_classes", "task"):
            spec[key] = value
            continue
        src = Path(value)
        if key in _FOLDER_KEYS:
            if not src.is_dir():
                raise ConfigurationError(f"{key} folder {src} does not exist")
            shutil.copytree(src, out / key)
            spec[key] = key
            continue
        if not src.is_file():
            raise ConfigurationError(f"{key} file {src} does not exist")
        dst = out / key / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        spec[key] = f"{key}/{src.name}"
    spec.setdefault("num_classes", card.signature.num_classes or None)
    if spec["num_classes"] is None:
        del spec["num_classes"]

    if config.onnx is not None and not Path(config.onnx).is_file():
        raise ConfigurationError(f"onnx file {config.onnx} does not exist")
    _save_weights(config, card, weights, out / WEIGHTS, export_to=None if config.onnx is not None else out / ONNX)
    if config.onnx is not None:
        shutil.copyfile(config.onnx, out / ONNX)

    for name, path in (extra or {}).items():
        if not name or "/" in name or name.startswith("."):
            raise ConfigurationError(f"extra artifact name {name!r}: one plain file name")
        if not Path(path).is_file():
            raise ConfigurationError(f"extra artifact {name}: {path} does not exist")
        (out / "extra").mkdir(exist_ok=True)
        shutil.copyfile(path, out / "extra" / name)

    if expect_like is not None:
        golden = Golden.load(expect_like)
        reference = json.loads((expect_like / CARD).read_text())
        golden.reference = f"{reference.get('registered_name', '?')}/{reference.get('registered_version', '?')}"
        if card.precision != reference.get("precision", "fp32"):
            golden.min_top1_agreement = MIN_TOP1_AGREEMENT if min_agreement is None else min_agreement
    elif card.precision != "fp32":
        raise ConfigurationError(
            f"a {card.precision} model is registered against its float version, whose golden outputs it must agree "
            "with: give --expect-like VERSION"
        )
    else:
        images = prepare_images(golden_images if golden_images is not None else golden_mod.default_images())
        golden = record(images, run_onnx(out / ONNX, images, card), card, tolerance=tolerance)
    golden.tolerance = tolerance if expect_like is None else golden.tolerance
    golden.save(out)

    card_doc = _card(card, config.weights == RANDOM_WEIGHTS, golden)
    (out / CARD).write_text(json.dumps(card_doc, indent=2) + "\n")
    (out / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    files = {rel: sha256_file(out / rel) for rel in _walk(out) if rel != MANIFEST}
    manifest = {"format": FORMAT, "files": {rel: {"sha256": sha, "bytes": (out / rel).stat().st_size} for rel, sha in files.items()}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Package(out, files, card_doc, spec)


def _walk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _save_weights(config: Any, card: Any, weights: Path | None, dst: Path, *, export_to: Path | None) -> None:
    """The weights as the module's own state dict: checkpoint wrappers, `module.` prefixes and foreign key
    names are resolved once here, so serving loads it strictly. With `export_to`, the same module is also
    exported to ONNX with every output of the signature (built once for both)."""
    from vision.backends.torch_backend import run_on_torch_thread
    from vision.models import create_model, with_outputs
    from vision.models.export import export_onnx

    def save() -> None:
        import torch

        n = card.signature.num_classes
        module = create_model(config.arch, num_classes=n, weights=weights, pretrained=False)
        torch.save(module.state_dict(), dst)
        if export_to is not None:
            export_onnx(with_outputs(config.arch, module, n), export_to, signature=card.signature)

    # On the process's torch thread, like every torch call here (see vision.backends.torch_backend).
    run_on_torch_thread(save)


def _card(card: Any, random_weights: bool, golden: Golden) -> dict[str, Any]:
    import vision

    signature = card.signature
    crop = signature.geometry.crop_size
    tools: dict[str, str] = {"python": platform.python_version(), "vision": getattr(vision, "__version__", "")}
    for module in ("torch", "onnxruntime", "onnx"):
        try:
            tools[module] = __import__(module).__version__
        except ImportError:
            pass
    preset = card.preset
    return {
        "architecture": card.architecture,
        "task": card.task,
        "num_classes": signature.num_classes,
        "num_labels": card.num_labels,
        "can_tag": tagger_of(card) is not None,
        "precision": card.precision,
        "preset": {
            "name": preset.name, "resize_shorter": preset.resize_shorter, "crop_size": preset.crop_size,
            "mean": list(preset.mean), "std": list(preset.std), "channel_order": preset.channel_order,
        },
        "outputs": [
            {"name": name, "shape": list(signature.output_shape(name, crop, crop)),
             **({"stride": signature.layer(name).stride} if signature.is_map(name) else {})}
            for name in signature.outputs
        ],
        "input_geometry": {"crop_size": crop, "variable": signature.geometry.variable, "max_side": signature.geometry.max_side},
        "random_weights": random_weights,
        "metrics": dict(card.metrics),
        "golden": {"images": len(golden.images), "reference": golden.reference, "tolerance": golden.tolerance,
                   "top1": golden.top1, "min_top1_agreement": golden.min_top1_agreement},
        "tools": tools,
    }


def verify(root: Path, expected: Mapping[str, str]) -> list[str]:
    """Problems of the files under `root` against `expected` (path -> sha256, from the version's tags)."""
    if not expected:
        return ["the version records no sha256 (not registered by `vision registry register`)"]
    problems = []
    for rel, sha in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        got = sha256_file(path)
        if got != sha:
            problems.append(f"{rel} has sha256 {got[:12]}..., recorded {sha[:12]}...")
    return problems


def load(root: Path, expected: Mapping[str, str]) -> Package:
    """The verified package under `root` (ArtifactCorrupted when a file does not match)."""
    problems = verify(root, expected)
    if problems:
        raise ArtifactCorrupted(problems)
    try:
        card = json.loads((root / CARD).read_text())
        spec = json.loads((root / SPEC).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactCorrupted([f"card or spec unreadable: {exc}"]) from None
    return Package(root, dict(expected), card, spec)


def serving_config(package: Package, *, name: str, version: str, base: Any) -> Any:
    """The ModelConfig that serves `package` as `name` version `version`; `base` (the `models:/...` entry)
    contributes how this process serves it (backend, triton_model)."""
    from vision.config.settings import ModelConfig

    fields: dict[str, Any] = {}
    for key, value in package.spec.items():
        is_file = key not in ("arch", "preset", "num_classes", "task") and not (key in _KEYWORDS and value in _KEYWORDS[key])
        fields[key] = str(package.root / value) if is_file else value
    return ModelConfig(
        **fields,
        name=name,
        version=version,
        weights=package.root / WEIGHTS,
        onnx=package.root / ONNX,
        backend=base.backend,
        triton_model=base.triton_model,
    )
