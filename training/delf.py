"""DELF training: the paper's two stages on a folder-per-class dataset (Noh et al., ICCV 2017, section 4;
tensorflow/models research/delf `delf/python/training`).

1. **Descriptor fine-tuning**: the ResNet-50 trunk (up to layer3) and a linear classifier on its
   average-pooled features, cross-entropy on the landmark classes (`vision.models.delf.stage1_step`).
2. **Attention**: the trunk frozen, the attention head and a linear classifier on the attention-pooled
   features, cross-entropy again (`stage2_step`). The attention learns to weigh the cells that tell the
   classes apart, which is what makes its scores select good keypoints.

The step functions live with the model (`vision.models.delf`); this module holds the dataset, the loop,
checkpoints and metrics, so the jobs service's Celery trainer can drive the same steps.

    python -m training.delf --data DATA --out RUN        # DATA/<class>/<image>; writes RUN/...
    python -m training.delf --demo-data DATA             # writes a small generated dataset (see below)

RUN holds `stage1.pt` (trunk + stage-1 classifier), `model.pt` (the whole DELF module with its classifier:
serve with `arch=delf_resnet50,weights=RUN/model.pt,labels=RUN/labels.txt`), `delf.pt` (the extractor
without the classifier: `arch=delf_resnet50,weights=RUN/delf.pt`), `labels.txt` and `metrics.json` (loss
and accuracy per epoch and stage). Checkpoints are dicts with the weights under `state_dict`, which
`vision serve` reads directly.

The demo dataset: per class a distinct pattern (a coloured checkerboard of the class's own colours and
period) pasted at a random place on uniform noise, so only a small part of each image tells its class.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from vision.media.imaging import IMAGE_SUFFIXES, image_files
from vision.models import create_model, get_architecture
from vision.models.delf import (
    Delf,
    DescriptorClassifier,
    StepResult,
    frozen_features,
    load_backbone,
    stage1_parameters,
    stage1_step,
    stage2_parameters,
    stage2_step,
)

if TYPE_CHECKING:
    from vision.jobs.runtime import JobRun

log = logging.getLogger(__name__)

ARCH = "delf_resnet50"


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderDataset:
    """ROOT/<class>/<image>: classes sorted by folder name."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    @classmethod
    def scan(cls, root: Path) -> "FolderDataset":
        if not root.is_dir():
            raise ValueError(f"dataset {root} is not a folder")
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        samples = tuple(
            (path, label)
            for label, name in enumerate(classes)
            for path in image_files(root / name)
        )
        if len(classes) < 2:
            raise ValueError(f"dataset {root} needs at least two class folders, found {list(classes)}")
        if not samples:
            raise ValueError(f"dataset {root} has no images ({', '.join(IMAGE_SUFFIXES)})")
        return cls(root, classes, samples)


def load_image(path: Path, size: int, rng: random.Random | None = None) -> np.ndarray:
    """An image as the model's input: RGB, resized to size × size (with a random crop of 80-100 % of each
    side first when `rng` is given), normalised with the architecture's preset ((x − 128) / 128)."""
    from vision.media.imaging import get_preset

    with Image.open(path) as img:
        img = img.convert("RGB")
    if rng is not None:
        w, h = img.size
        cw, ch = round(w * rng.uniform(0.8, 1.0)), round(h * rng.uniform(0.8, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    return get_preset(get_architecture(ARCH).defaults.preset).normalise(np.asarray(img, dtype=np.uint8))


def batches(
    dataset: FolderDataset, size: int, batch_size: int, rng: random.Random, *, augment: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = list(range(len(dataset.samples)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [dataset.samples[i] for i in order[start : start + batch_size]]
        images = np.stack([load_image(path, size, rng if augment else None) for path, _ in chunk])
        out.append((torch.from_numpy(images), torch.tensor([label for _, label in chunk])))
    return out


def make_demo_dataset(
    root: Path, *, classes: int = 2, per_class: int = 12, size: int = 128, pattern: int = 32, seed: int = 0
) -> list[tuple[Path, int, tuple[int, int]]]:
    """Writes ROOT/class<k>/<i>.png: uniform noise with the class's pattern pasted at a random place.
    Returns (path, class, (x, y) of the pattern's top-left corner) per image."""
    rng = np.random.default_rng(seed)
    written = []
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        tile = demo_pattern(k, pattern)
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            x, y = (int(v) for v in rng.integers(0, size - pattern + 1, 2))
            image[y : y + pattern, x : x + pattern] = tile
            path = folder / f"{i:03d}.png"
            Image.fromarray(image).save(path)
            written.append((path, k, (x, y)))
    return written


def demo_pattern(k: int, side: int) -> np.ndarray:
    """Class k's pattern: a two-colour checkerboard, period and colours depending on k."""
    palette = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    period = 4 + 4 * (k % 3)
    yy, xx = np.mgrid[0:side, 0:side]
    cells = ((xx // period) + (yy // period)) % 2 == 0
    first, second = palette[k % len(palette)], palette[(k + 3) % len(palette)]
    return np.where(cells[..., None], np.array(first, np.uint8), np.array(second, np.uint8))


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    image_size: int = 224
    batch_size: int = 16
    stage1_epochs: int = 5
    stage2_epochs: int = 5
    # "sgd": SGD with momentum 0.9, as the reference trainer; "adam" converges in far fewer steps on small
    # datasets (the demo, tests).
    optimizer: str = "sgd"
    stage1_lr: float = 0.01
    stage2_lr: float = 0.01
    weight_decay: float = 1e-4
    # A torchvision ResNet-50 (or DELF) state dict for the trunk; None = random initialisation.
    backbone_weights: Path | None = None
    augment: bool = True
    seed: int = 0


@dataclass
class TrainResult:
    classes: tuple[str, ...]
    # Per epoch: {"stage": 1|2, "epoch": n, "loss": mean, "accuracy": train accuracy, "seconds": ...}.
    history: list[dict[str, float]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def _epoch(
    step: Callable[[torch.Tensor, torch.Tensor], StepResult],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[float, float]:
    """Mean loss and training accuracy (from each step's own forward pass) over one pass of `data`.
    `on_batch(index, total)` runs before each step (a job's cancel check and progress)."""
    results = []
    for index, (x, y) in enumerate(data):
        if on_batch is not None:
            on_batch(index, len(data))
        results.append(step(x, y))
    return float(np.mean([r.loss for r in results])), sum(r.correct for r in results) / sum(r.seen for r in results)


def _optimizer(kind: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be sgd or adam, got {kind!r}")


def _save(path: Path, module: torch.nn.Module, **meta: object) -> str:
    torch.save({"state_dict": module.state_dict(), "arch": ARCH, **meta}, path)
    return str(path)


def train(
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Both stages; files in `config.out`. Deterministic for a seed (one thread's worth of torch).

    With `checkpoint`, the state after every epoch (weights, both classifiers, the optimizer, the history and
    every random generator) is written there atomically, and a run that finds one continues after its last
    epoch, as the Jobs trainer resumes a redelivered job, with the same epoch count."""
    dataset = FolderDataset.scan(config.data)
    config.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    n_classes = len(dataset.classes)
    model = create_model(ARCH, num_classes=n_classes, pretrained=False)
    assert isinstance(model, Delf)
    if config.backbone_weights is not None:
        from vision.models.weights import read_state_dict

        load_backbone(model, read_state_dict(config.backbone_weights))
    head = DescriptorClassifier(n_classes)
    result = TrainResult(dataset.classes)
    opt1 = _optimizer(config.optimizer, stage1_parameters(model, head), config.stage1_lr, config.weight_decay)
    opt2 = _optimizer(config.optimizer, stage2_parameters(model), config.stage2_lr, config.weight_decay)
    done = (0, 0)  # (stage, epoch) finished before this run: a resumed job's checkpoint
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        opt1.load_state_dict(saved["opt1"])
        opt2.load_state_dict(saved["opt2"])
        result.history = saved["history"]
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        done = tuple(saved["done"])
        log.info("resuming after stage %d epoch %d", *done)

    def record(stage: int, epoch: int, loss: float, accuracy: float, started: float) -> None:
        entry = {"stage": stage, "epoch": epoch, "loss": loss, "accuracy": accuracy, "seconds": time.perf_counter() - started}
        result.history.append(entry)
        log.info("stage %d epoch %d: loss %.4f, train accuracy %.3f", stage, epoch, loss, accuracy)
        if checkpoint is not None:
            from training.common import atomic_save

            atomic_save({"model": model.state_dict(), "head": head.state_dict(), "opt1": opt1.state_dict(),
                         "opt2": opt2.state_dict(), "history": result.history, "rng": rng.getstate(),
                         "torch_rng": torch.get_rng_state(), "done": (stage, epoch)}, checkpoint)
        if on_epoch is not None:
            on_epoch(entry)

    # Stage 1: fine-tune the trunk through a classifier on its pooled features.
    for epoch in range(1, config.stage1_epochs + 1):
        if done >= (1, epoch):
            continue
        started = time.perf_counter()
        data = batches(dataset, config.image_size, config.batch_size, rng, augment=config.augment)
        loss, accuracy = _epoch(lambda x, y: stage1_step(model, head, x, y, opt1), data, on_batch)
        record(1, epoch, loss, accuracy, started)
    if done < (2, 1):  # a run resumed in stage 2 has moved the attention on: stage1.pt was written before
        result.files["stage1"] = _save(config.out / "stage1.pt", model, stage=1, head=head.state_dict(), classes=dataset.classes)

    # Stage 2: the trunk frozen; attention + classifier on attention-pooled features. Without augmentation
    # the trunk's features of every image are computed once.
    cached = None
    if not config.augment and config.stage2_epochs:
        cached = [(frozen_features(model, x), y) for x, y in batches(dataset, config.image_size, config.batch_size, rng, augment=False)]

    for epoch in range(1, config.stage2_epochs + 1):
        if done >= (2, epoch):
            continue
        started = time.perf_counter()
        if cached is not None:
            rng.shuffle(cached)
            data = cached
        else:
            data = [(frozen_features(model, x), y) for x, y in batches(dataset, config.image_size, config.batch_size, rng, augment=True)]
        loss, accuracy = _epoch(lambda f, y: stage2_step(model, None, y, opt2, features=f), data, on_batch)
        record(2, epoch, loss, accuracy, started)
    model.eval()
    result.files["model"] = _save(config.out / "model.pt", model, stage=2, classes=dataset.classes)
    extractor = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    torch.save({"state_dict": extractor, "arch": ARCH, "stage": 2}, config.out / "delf.pt")
    result.files["delf"] = str(config.out / "delf.pt")
    labels = config.out / "labels.txt"
    labels.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(dataset.classes)))
    result.files["labels"] = str(labels)
    metrics = config.out / "metrics.json"
    metrics.write_text(json.dumps({"config": {k: str(v) for k, v in asdict(config).items()}, "classes": dataset.classes,
                                   "history": result.history}, indent=2))
    result.files["metrics"] = str(metrics)
    return result


# --------------------------------------------------------------------------------------
# The Jobs trainer's `delf` task
# --------------------------------------------------------------------------------------

# Jobs give one learning rate (FinetuneOptions.lr) for stage 1; the attention head starts from nothing and
# needs a larger one (tests/test_delf_training.py: 1e-4 and 3e-3 with Adam).
STAGE2_LR_FACTOR = 30.0
JOB_IMAGE_SIZE = 224


def run_job(run: "JobRun") -> dict[str, Any]:
    """`vision jobs submit-finetune --task delf --base delf_resnet50 ...` (training.finetune dispatches here):
    both stages on the job's folder-per-class data with the jobs' plumbing: progress and cancel before every
    batch, a checkpoint after every epoch (a redelivered job resumes from it), per-epoch metrics in the job's
    MLflow run, then the extractor registered as the next version of the job's name (a feature extractor,
    `labels=none`: the Delf service serves it with its attention) with golden outputs and lineage.

    Options: `epochs` (both stages, default 4), `head_epochs` (stage 1's share, default half), `lr` (stage 1,
    Adam, default 1e-4; stage 2 gets STAGE2_LR_FACTOR times it), `batch_size` (16), `seed`."""
    from vision.core import metrics as prom
    from vision.core.cpus import available_cpus
    from vision.core.files import atomic_write
    from vision.jobs.runtime import JobFailed
    from vision.jobs.settings import check_path

    from training.common import (
        log_metrics,
        pick_device,
        register_version,
        registry_store,
        resolve_base,
        start_mlflow_run,
    )
    from training.data import load_data

    params, settings = run.params, run.settings
    given = params.get("options") or {}
    epochs = int(given.get("epochs", 4))
    stage1 = int(given.get("head_epochs") or max(1, epochs // 2))
    if not 1 <= stage1 < epochs:
        raise JobFailed(f"delf trains two stages: epochs ({epochs}) must exceed head_epochs (stage 1: {stage1})")
    device = pick_device(given.get("device") or settings.device)
    if device.type != "cpu":
        raise JobFailed("delf jobs train on the CPU (training.delf has no device placement yet)")
    torch.set_num_threads(settings.threads or available_cpus())
    data = check_path(settings, params["data"], "data")
    try:
        dataset = FolderDataset.scan(data)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None
    store = registry_store(settings)
    work = run.work_dir
    base = resolve_base(params["base"], store, work)
    if base.arch != ARCH:
        raise JobFailed(f"task delf trains {ARCH}; base {params['base']!r} is {base.arch}")
    lr = float(given.get("lr", 1e-4))
    config = TrainConfig(
        data, work / "result", image_size=JOB_IMAGE_SIZE, batch_size=int(given.get("batch_size", 16)),
        stage1_epochs=stage1, stage2_epochs=epochs - stage1, optimizer="adam", stage1_lr=lr,
        stage2_lr=lr * STAGE2_LR_FACTOR, backbone_weights=base.weights, seed=int(given.get("seed", 0)),
    )
    state_file = work / "checkpoints" / "mlflow.json"  # the run id, kept across redeliveries
    if state_file.is_file():
        run_id = json.loads(state_file.read_text())["run_id"]
    else:
        run_id = start_mlflow_run(store, run, "delf", {
            "task": "delf", "base": base.description, "arch": ARCH, "name": params["name"], "data": str(data),
            "n_train": len(dataset.samples), "labels": len(dataset.classes), "epochs": epochs,
            "stage1_epochs": stage1, "stage1_lr": lr, "stage2_lr": config.stage2_lr, "batch_size": config.batch_size,
            "image_size": config.image_size, "seed": config.seed,
        })
        state_file.parent.mkdir(parents=True, exist_ok=True)
        # What a redelivered job resumes from: a torn file would fail every later attempt.
        with atomic_write(state_file, "w") as fh:
            fh.write(json.dumps({"run_id": run_id}))
    client = store.client

    def on_batch(index: int, total: int) -> None:
        run.check_cancel()
        run.progress(done=index, total=total, unit="batches")

    def on_epoch(entry: dict[str, float]) -> None:
        epoch = int(entry["epoch"]) + (stage1 if entry["stage"] == 2 else 0)  # the job counts both stages
        prom.TRAIN_EPOCH_SECONDS.labels(task="delf").observe(entry["seconds"])
        prom.TRAIN_IMAGES.labels(task="delf").inc(len(dataset.samples))  # an epoch is one pass over the data
        scores = {"loss": entry["loss"], "accuracy": entry["accuracy"], "stage": entry["stage"], "epoch_s": entry["seconds"]}
        log_metrics(client, run_id, scores, epoch)
        run.progress(epoch=epoch, epochs=epochs, metrics={k: float(v) for k, v in scores.items()}, force=True,
                     message=f"epoch {epoch}/{epochs} done (stage {int(entry['stage'])})")

    trained = train(config, on_epoch=on_epoch, on_batch=on_batch, checkpoint=work / "checkpoints" / "last.pt")
    run.progress(message=f"registering the extractor as a new version of {params['name']}", force=True)
    try:
        client.log_artifact(run_id, trained.files["metrics"], "training")
    except Exception as exc:  # a record, not the training: as the other fine-tunes
        log.warning("MLflow: could not upload metrics.json: %s", exc)
    golden = [(path.name, path.read_bytes()) for path, _ in dataset.samples[:4]]
    version = register_version(
        store, params["name"], {"arch": ARCH, "weights": Path(trained.files["delf"]), "labels": "none"},
        run_id=run_id, golden=golden,
        lineage={"job_id": run.job_id, "base_model": base.description,
                 "dataset_fingerprint": load_data(data, task="classification").fingerprint()},
        description=f"DELF two-stage training of {base.description} on {data}, {stage1} + {epochs - stage1} epochs",
        promote_to=params.get("promote_to") or "",
    )
    try:
        client.set_terminated(run_id)
    except Exception:
        pass
    last = {stage: [h for h in trained.history if h["stage"] == stage][-1] for stage in (1, 2)}
    result = {
        "registered_model": params["name"], "registered_version": version, "run_id": run_id,
        "epochs": str(epochs), "stage1_epochs": str(stage1), "train_images": str(len(dataset.samples)),
        "metrics": trained.files["metrics"], "checkpoint": str(work / "checkpoints" / "last.pt"),
        **{f"stage{s}_{k}": f"{last[s][k]:.4f}" for s in (1, 2) for k in ("loss", "accuracy")},
    }
    if params.get("promote_to"):
        result["promoted_to"] = params["promote_to"]
    run.progress(metrics={f"stage{s}_{k}": float(last[s][k]) for s in (1, 2) for k in ("loss", "accuracy")}, force=True)
    return result


def attention_map(model: Delf, image: np.ndarray) -> np.ndarray:
    """(h, w) attention scores of one preprocessed (3, H, W) image."""
    model.eval()
    with torch.no_grad():
        _, scores = model.local_features(torch.from_numpy(image[None]))
    return scores[0, 0].numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.delf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset: a folder per class")
    parser.add_argument("--out", type=Path, help="run folder for checkpoints, labels and metrics")
    parser.add_argument("--demo-data", type=Path, metavar="DIR", help="write the generated demo dataset to DIR and exit")
    parser.add_argument("--image-size", type=int, default=224, help="training images are resized to this square (default 224)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="sgd (momentum 0.9, the reference's) or adam")
    parser.add_argument("--stage1-lr", type=float, default=0.01)
    parser.add_argument("--stage2-lr", type=float, default=0.01)
    parser.add_argument("--backbone-weights", type=Path, help="torchvision ResNet-50 state dict to start the trunk from")
    parser.add_argument("--no-augment", action="store_true", help="no random crops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.demo_data:
        written = make_demo_dataset(args.demo_data)
        print(f"wrote {len(written)} images to {args.demo_data}")
        return 0
    if not args.data or not args.out:
        parser.error("--data and --out are required (or --demo-data)")
    try:
        result = train(TrainConfig(
            args.data, args.out, args.image_size, args.batch_size, args.stage1_epochs, args.stage2_epochs,
            args.optimizer, args.stage1_lr, args.stage2_lr, backbone_weights=args.backbone_weights, augment=not args.no_augment,
            seed=args.seed,
        ))
    except (ValueError, OSError) as exc:
        print(f"training.delf: {exc}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    print(f"trained on {len(result.classes)} classes; final stage-2 train accuracy {last.get('accuracy', math.nan):.3f}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
