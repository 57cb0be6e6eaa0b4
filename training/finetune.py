"""The one trainer of fine-tune jobs: tagging, classification and retrieval on the shared builder registry.

    run_finetune_job(run)   the Celery task's body (vision.runners.job_tasks): options from the job, progress and
                            cancel through `run`, the result registered in the model registry

Common to every task:
- **Model**: `--base` is a registry URI (its package is downloaded and verified: architecture, weights,
  preset) or a model spec (`efficientnet_lite0`: the bundled ImageNet weights; `arch=...,weights=FILE`).
  When the base head has another width than the data's labels, every tensor but the head is carried over
  and the head starts from a seeded random initialisation.
- **Data**: training.data (download-job image lists, folder per class, NUS-WIDE JSON; a folder holding a
  `dataset.json` or `images.txt` is read as that file), a seeded split, DataLoader worker processes, the
  model's preprocessing preset (as serving applies it) plus augmentation. A set with nothing to tell apart
  (every image with the same labels, or one class) fails the job before training.
- **Best epoch**: by the task's score on the validation split (below), ties to the lower validation loss
  (`selection_key`): on easy data several epochs reach a perfect score, and of those the lower loss is the
  more confident fit. No score depends on thresholds calibrated on that same split.
- **Reproducibility**: every random choice derives from the seed and the epoch (split, initialisation,
  order, augmentation, dropout), so a run repeats exactly, and a resumed run continues as it would have.
- **Checkpoints**: after every epoch, `<work>/checkpoints/last.pt` (model, optimizer, stage, history, best,
  MLflow run id) is written atomically; the best epoch's weights go to `best.pt`. A redelivered job loads
  `last.pt` and continues with the next epoch: it ends with the same epoch count. `cancel` is checked
  before every batch.
- **MLflow**: one run per job (kept across redeliveries): params, per-epoch metrics (step = epoch),
  `curves.png`, `history.json` and the calibration, in the experiment `vision-finetune` of the registry's
  store. At the end the best checkpoint is registered (vision.registry) with golden outputs recorded on
  validation images and lineage (job id, base model, data fingerprint), and optionally promoted.
- **Device**: CUDA when present (or `--device`), with pinned memory; CPU otherwise (channels_last).

Per task:
- **tagging**: multi-label head, sigmoid + BCEWithLogitsLoss (optionally positive-weighted per label, as
  Tencent ML-Images trains sparse labels), Adam (lr 1e-4 by default), flip / colour jitter / affine. Every
  epoch: the multi-label metrics of vision.evaluation.tagging at 0.5 and at per-label thresholds
  calibrated on the validation split (best_f1_thresholds). The best checkpoint by validation mAP, which
  ranks scores and needs no threshold (what multi-label benchmarks report); F1 at thresholds fitted to
  that same split is optimistic and ties at 1.0 on easy sets. The version is registered with the best
  epoch's thresholds.
- **classification**: staged as the dog-breed recipe: (1) backbone frozen, new head, Adam; (2) the last
  blocks unfrozen, SGD with momentum 0.9 at a low learning rate, light augmentation; optional center loss
  (its centers with their own learning rate); optional pseudo-labelling (an unlabelled folder labelled
  by the current model above a confidence, then more epochs on the union). Top-1 / top-5 every epoch;
  best by top-1.
- **retrieval**: a classifier over instance classes trains the backbone; the model is scored every epoch by
  the Features evaluator (vision.evaluation.retrieval: Oxford AP of the L2-normalised `embedding`, the
  Features service's `center` recipe) on a held-out retrieval set: `--eval-data` (Oxford format), else a
  fifth of the classes never trained on (one query per class against the rest). mAP before (the base)
  and after are reported; the best epoch by mAP is registered as a feature extractor (labels=none).
- **delf**: handed to training.delf.run_job: DELF's two stages run on their own step functions (they fit
  no single-model Trainer), with this module's MLflow, checkpoint and registration helpers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vision.core import metrics as prom
from vision.core import tracing
from vision.jobs.runtime import JobFailed

from training.common import (
    Base,
    atomic_save,
    family,
    log_metrics,
    pick_device,
    register_version,
    registry_store,
    resolve_base,
    start_mlflow_run,
)
from training.data import ImageDataset, LabelledSet, check_learnable, load_data, split, unlabeled_images

if TYPE_CHECKING:
    import torch
    from vision.jobs.runtime import JobRun

log = logging.getLogger(__name__)

HEADS = {"efficientnet": ("classifier.",), "resnet": ("fc.",)}
# The validation metric each task's best epoch is chosen by (a key of its history entries); see selection_key.
SELECTED_BY = {"tagging": "mAP", "classification": "top1", "retrieval": "retrieval_map"}
LAST_BLOCKS = {"efficientnet": ("blocks.5.", "blocks.6.", "conv_head.", "bn2."), "resnet": ("layer4.",)}


@dataclass
class Options:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2
    workers: int = 2
    pos_weight: bool = False
    trainable: str = "last"
    head_epochs: int = 0
    sgd_lr: float = 1e-3
    center_loss: float = 0.0
    center_lr: float = 0.5
    unlabeled: str = ""
    pseudo_threshold: float = 0.9
    pseudo_epochs: int = 2
    eval_data: str = ""
    device: str = ""
    preset: str = ""
    labels: str = ""

    @classmethod
    def for_task(cls, task: str, given: dict[str, Any]) -> "Options":
        defaults: dict[str, Any] = {
            "tagging": {"epochs": 6, "lr": 1e-4, "trainable": "last"},
            "classification": {"epochs": 6, "lr": 1e-3, "trainable": "head"},
            "retrieval": {"epochs": 4, "lr": 1e-4, "trainable": "last"},
        }[task]
        known = {f.name for f in fields(cls)}
        values = {**defaults, **{k: v for k, v in given.items() if k in known}}
        options = cls(**values)
        if task == "classification" and not options.head_epochs:
            options.head_epochs = max(1, options.epochs // 2)
        return options


def build_model(base: Base, num_classes: int) -> "torch.nn.Module":
    """The base's weights under a head of `num_classes` (0: no head); a new head starts seeded-random."""
    from vision.core.errors import ConfigurationError
    from vision.models import create_model

    try:
        source = create_model(base.arch, num_classes=base.num_classes, weights=base.weights, pretrained=False)
    except ConfigurationError as exc:
        raise JobFailed(f"base weights: {exc}") from None
    if base.num_classes == num_classes:
        return source
    target = create_model(base.arch, num_classes=num_classes, pretrained=False)
    wanted = target.state_dict()
    carried = {k: v for k, v in source.state_dict().items() if k in wanted and wanted[k].shape == v.shape}
    target.load_state_dict(carried, strict=False)
    log.info(
        "base %s: %d of %d tensors carried over, new head of %d",
        base.description,
        len(carried),
        len(wanted),
        num_classes,
    )
    return target


def set_trainable(model: "torch.nn.Module", arch: str, which: str) -> int:
    fam = family(arch)
    prefixes = HEADS[fam] + (LAST_BLOCKS[fam] if which == "last" else ())
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad = which == "all" or name.startswith(prefixes)
        count += param.numel() if param.requires_grad else 0
    return count


def selection_key(task: str, scores: dict[str, float]) -> tuple[float, float]:
    """What an epoch's validation `scores` (a history entry) rank by: the task's SELECTED_BY metric, then the
    lower validation loss. The best epoch is the one with the greatest key; the earlier on a full tie. A NaN
    (a diverged epoch) ranks lowest, so it never holds the place of a later finite one."""
    metric, loss = float(scores[SELECTED_BY[task]]), float(scores["val_loss"])
    return (metric if math.isfinite(metric) else -math.inf, -loss if math.isfinite(loss) else -math.inf)


@dataclass
class Checkpoint:
    epoch: int = 0  # last finished epoch
    stage: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_finetune_job(run: "JobRun") -> dict[str, Any]:
    """The Celery task's body: DELF's two stages go to training.delf (they fit no single-model Trainer),
    every other task to this module's Trainer."""
    if run.params["task"] == "delf":
        from training import delf

        return delf.run_job(run)
    return run_trainer_job(run)


def run_trainer_job(run: "JobRun") -> dict[str, Any]:
    import torch
    from vision.core.cpus import available_cpus
    from vision.jobs.settings import check_path

    params, settings = run.params, run.settings
    task = params["task"]
    options = Options.for_task(task, params.get("options") or {})
    torch.set_num_threads(settings.threads or available_cpus())
    data_path = check_path(settings, params["data"], "data")
    labels_file = check_path(settings, options.labels, "labels") if options.labels else None
    data = load_data(data_path, task=task, labels_file=labels_file)
    check_learnable(data, task)
    store = registry_store(settings)
    work = run.work_dir
    base = resolve_base(params["base"], store, work)
    trainer = Trainer(
        run, task, options, base, data, store, work, pick_device(options.device or settings.device)
    )
    return trainer.fit()


class Trainer:
    def __init__(
        self,
        run: "JobRun",
        task: str,
        options: Options,
        base: Base,
        data: LabelledSet,
        store: Any,
        work: Path,
        device: "torch.device",
    ) -> None:
        from vision.media.imaging import get_preset

        self.run, self.task, self.options, self.base, self.data, self.store = (
            run,
            task,
            options,
            base,
            data,
            store,
        )
        self.work, self.device = work, device
        self.preset = get_preset(options.preset or base.preset)
        self.multilabel = task == "tagging"
        self.ckpt_path = work / "checkpoints" / "last.pt"
        self.best_path = work / "checkpoints" / "best.pt"
        self.labels = data.labels
        self.pseudo: list[tuple[Path, tuple[int, ...]]] = []
        items = list(data.items)
        if task == "retrieval":
            train_items, self.retrieval_set = self._hold_out_classes(items)
        else:
            train_items, self.retrieval_set = items, None
        tr, va = split(len(train_items), options.val_fraction, options.seed)
        self.train_items = [train_items[i] for i in tr]
        self.val_items = [train_items[i] for i in va]
        if not self.train_items or not self.val_items:
            raise JobFailed(f"{data.source}: {len(items)} images are too few to train and validate on")
        self.num_outputs = len(self.labels)
        self.total_epochs = options.epochs + (
            options.pseudo_epochs if task == "classification" and options.unlabeled else 0
        )

    # -- data
    def _hold_out_classes(self, items: list[tuple[Path, tuple[int, ...]]]) -> tuple[list[Any], Any]:
        """Retrieval: train on most classes; a fifth (at least two) of those with 2+ images are the retrieval
        set, never trained on (or --eval-data, an Oxford-format set)."""
        from vision.evaluation.retrieval import GroundTruth, Query, load_ground_truth

        if self.options.eval_data:
            root = Path(self.options.eval_data)
            gt = load_ground_truth(root / "gt")
            images = {p.stem: p for p in sorted((root / "jpg").iterdir()) if p.is_file()}
            return items, (gt, images)
        by_class: dict[int, list[Path]] = {}
        for path, (label,) in items:
            by_class.setdefault(label, []).append(path)
        candidates = [c for c, paths in sorted(by_class.items()) if len(paths) >= 2]
        rng = np.random.default_rng(self.options.seed)
        held = (
            set(rng.permutation(candidates)[: max(2, len(candidates) // 5)].tolist())
            if len(candidates) >= 3
            else set()
        )
        if not held:
            raise JobFailed("retrieval needs at least 3 classes with 2+ images each (or --eval-data)")
        queries, images = [], {}
        for c in sorted(held):
            paths = by_class[c]
            for p in paths:
                images[f"{c}-{p.stem}"] = p
            queries.append(
                Query(
                    f"{c}-{paths[0].stem}",
                    None,
                    {"oxford": (frozenset(f"{c}-{p.stem}" for p in paths[1:]), frozenset())},
                )
            )
        database = tuple(sorted(set(images) - {q.name for q in queries}))
        gt = GroundTruth(database=database, queries=tuple(queries), settings=("oxford",))
        keep = sorted(set(by_class) - held)
        remap = {old: new for new, old in enumerate(keep)}
        self.labels = tuple(self.data.labels[c] for c in keep)
        return [(p, (remap[c],)) for p, (c,) in items if c in remap], (gt, images)

    def _loader(self, items: list[Any], *, train: bool, augment: str, epoch: int = 0) -> Any:
        import torch

        dataset = ImageDataset(
            items, self.num_outputs, self.preset, multilabel=self.multilabel, augment=augment
        )
        generator = torch.Generator()
        generator.manual_seed(self.options.seed * 100_003 + epoch)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.options.batch_size,
            shuffle=train,
            drop_last=train and len(items) > self.options.batch_size,
            num_workers=self.options.workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_worker,
            persistent_workers=False,
        )

    # -- stages
    def stage(self, epoch: int) -> tuple[str, str, str]:
        """(stage name, trainable, augmentation) of `epoch` (1-based)."""
        o = self.options
        if self.task == "classification":
            if epoch <= o.head_epochs:
                return "head", "head", "full"
            return ("pseudo" if epoch > o.epochs else "finetune"), "last", "light"
        return "train", o.trainable, "full"

    def _optimizers(self, model: Any, stage: str, centers: Any) -> list[Any]:
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        o = self.options
        if self.task == "classification" and stage in ("finetune", "pseudo"):
            opts = [torch.optim.SGD(params, lr=o.sgd_lr, momentum=0.9)]
        else:
            opts = [torch.optim.Adam(params, lr=o.lr)]
        if centers is not None:
            opts.append(torch.optim.SGD([centers], lr=o.center_lr))
        return opts

    # -- the run
    def fit(self) -> dict[str, Any]:
        import torch
        from vision.models import EMBEDDING, get_architecture, with_outputs

        o, run = self.options, self.run
        model = build_model(self.base, self.num_outputs)
        entry = get_architecture(self.base.arch)
        centers = None
        if self.task == "classification" and o.center_loss > 0:
            centers = torch.nn.Parameter(torch.zeros(self.num_outputs, entry.defaults.embedding_dim))
        ckpt = Checkpoint()
        opt_state = None
        if self.ckpt_path.is_file():
            saved = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            if centers is not None and "centers" in saved:
                centers.data.copy_(saved["centers"])
            ckpt = Checkpoint(**saved["state"])
            opt_state = saved.get("optimizers")
            log.info("job %s: resuming after epoch %d of %d", run.job_id, ckpt.epoch, self.total_epochs)
        if ckpt.extra.get("pseudo"):
            self.pseudo = [(Path(p), tuple(lbl)) for p, lbl in ckpt.extra["pseudo"]]
        client = self.store.client
        if not ckpt.run_id:
            ckpt.run_id = self._start_mlflow(client)
        model.to(self.device)
        if self.device.type == "cpu":
            model.to(memory_format=torch.channels_last)
        tapped = with_outputs(self.base.arch, model, self.num_outputs)
        emb_index = entry.signature(self.num_outputs).outputs.index(EMBEDDING)
        if centers is not None:
            centers = torch.nn.Parameter(centers.detach().to(self.device))
        if self.task == "retrieval" and "map_before" not in ckpt.extra:
            run.progress(message="scoring the base model on the retrieval set", force=True)
            ckpt.extra["map_before"] = self._retrieval_map(tapped, emb_index)
            self._log(client, ckpt.run_id, {"retrieval_map": ckpt.extra["map_before"]}, 0)
        loss_fn = self._loss(torch)
        stage_now = ""
        optimizers: list[Any] = []
        for epoch in range(ckpt.epoch + 1, self.total_epochs + 1):
            stage, trainable, augment = self.stage(epoch)
            if stage == "pseudo" and not self.pseudo:
                self.pseudo = self._pseudo_label(tapped)
                ckpt.extra["pseudo"] = [[str(p), list(lbl)] for p, lbl in self.pseudo]
            if stage != stage_now:
                set_trainable(model, self.base.arch, trainable)
                optimizers = self._optimizers(model, stage, centers)
                if opt_state is not None and ckpt.stage == stage:
                    for opt, state in zip(optimizers, opt_state, strict=False):
                        opt.load_state_dict(state)
                opt_state = None
                stage_now = stage
            with tracing.span("epoch", {"vision.epoch": epoch, "vision.epochs": self.total_epochs, "vision.stage": stage}):
                torch.manual_seed(o.seed * 7919 + epoch)
                started = time.monotonic()
                train_loss, images = self._train_epoch(
                    tapped, emb_index, model, optimizers, loss_fn, centers, epoch, augment
                )
                train_seconds = time.monotonic() - started
                run.progress(message=f"epoch {epoch}: validating", force=True)
                scores = self._validate(tapped, emb_index, loss_fn)
                scores.update(
                    train_loss=train_loss, train_images_per_s=images / train_seconds if train_seconds else 0.0
                )
                epoch_seconds = time.monotonic() - started
                prom.TRAIN_EPOCH_SECONDS.labels(task=self.task).observe(epoch_seconds)
                # Training time so far, over every attempt (what "time to micro-F1 >= 0.9" is read from).
                ckpt.extra["elapsed_s"] = ckpt.extra.get("elapsed_s", 0.0) + epoch_seconds
                scores.update(epoch_s=epoch_seconds, elapsed_s=ckpt.extra["elapsed_s"])
                thresholds = scores.pop("_thresholds", None)
                ckpt.history.append({"epoch": epoch, **scores})
                best = next((h for h in ckpt.history if h["epoch"] == ckpt.best_epoch), None)
                if best is None or selection_key(self.task, scores) > selection_key(self.task, best):
                    ckpt.best_score, ckpt.best_epoch = scores[SELECTED_BY[self.task]], epoch
                    atomic_save({"state_dict": _cpu_state(model), "thresholds": thresholds}, self.best_path)
                ckpt.epoch, ckpt.stage = epoch, stage
                self._log(client, ckpt.run_id, scores, epoch)
                state = {
                    "model": _cpu_state(model),
                    "state": asdict(ckpt),
                    "optimizers": [opt.state_dict() for opt in optimizers],
                }
                if centers is not None:
                    state["centers"] = centers.detach().cpu()
                atomic_save(state, self.ckpt_path)
                shown = {k: v for k, v in scores.items() if isinstance(v, float)}
                run.progress(
                    epoch=epoch,
                    epochs=self.total_epochs,
                    metrics=shown,
                    force=True,
                    message=f"epoch {epoch}/{self.total_epochs} done ({stage}); best epoch {ckpt.best_epoch}",
                )
        return self._finish(client, ckpt)

    def _loss(self, torch: Any) -> Any:
        if not self.multilabel:
            return torch.nn.CrossEntropyLoss()
        weight = None
        if self.options.pos_weight:
            y = np.zeros((len(self.train_items), self.num_outputs))
            for row, (_, labels) in enumerate(self.train_items):
                y[row, list(labels)] = 1
            pos = y.sum(axis=0)
            weight = torch.tensor(
                np.clip((len(y) - pos) / np.maximum(pos, 1), 1.0, 100.0),
                dtype=torch.float32,
                device=self.device,
            )
        return torch.nn.BCEWithLogitsLoss(pos_weight=weight)

    def _forward(self, tapped: Any, emb_index: int, x: Any) -> tuple[Any, Any]:
        from vision.models import LOGITS

        outputs = tapped(x)
        names = tapped.names
        return outputs[names.index(LOGITS)], outputs[emb_index]

    def _to(self, x: Any) -> Any:
        import torch

        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def _train_epoch(
        self,
        tapped: Any,
        emb_index: int,
        model: Any,
        optimizers: list[Any],
        loss_fn: Any,
        centers: Any,
        epoch: int,
        augment: str,
    ) -> tuple[float, int]:
        run = self.run
        items = self.train_items + (self.pseudo if self.stage(epoch)[0] == "pseudo" else [])
        loader = self._loader(items, train=True, augment=augment, epoch=epoch)
        model.train()
        total, seen, running = len(loader), 0, 0.0
        run.progress(
            epoch=epoch,
            epochs=self.total_epochs,
            done=0,
            total=total,
            unit="batches",
            message=f"epoch {epoch}/{self.total_epochs}",
            force=True,
        )
        for index, (x, y) in enumerate(loader, 1):
            run.check_cancel()
            x, y = self._to(x), y.to(self.device, non_blocking=True)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            logits, embedding = self._forward(tapped, emb_index, x)
            loss = loss_fn(logits, y)
            if centers is not None:
                loss = (
                    loss + self.options.center_loss * 0.5 * ((embedding - centers[y]) ** 2).sum(dim=1).mean()
                )
            loss.backward()
            for opt in optimizers:
                opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise JobFailed(
                    f"the loss became {value} at epoch {epoch} batch {index}; lower the learning rate"
                )
            running += value * len(x)
            seen += len(x)
            prom.TRAIN_IMAGES.labels(task=self.task).inc(len(x))
            run.progress(done=index, metrics={"loss": running / seen})
        run.check_cancel()
        return running / max(1, seen), seen

    def _predict(
        self, tapped: Any, emb_index: int, items: list[Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, embeddings, targets) of `items` without augmentation."""
        import torch

        loader = self._loader(items, train=False, augment="none")
        tapped.eval()
        logits, embeddings, targets = [], [], []
        with torch.no_grad():
            for x, y in loader:
                self.run.check_cancel()
                lg, em = self._forward(tapped, emb_index, self._to(x))
                logits.append(lg.float().cpu().numpy())
                embeddings.append(em.float().cpu().numpy())
                targets.append(y.numpy())
        return np.concatenate(logits), np.concatenate(embeddings), np.concatenate(targets)

    def _validate(self, tapped: Any, emb_index: int, loss_fn: Any) -> dict[str, Any]:
        import torch

        logits, embeddings, y = self._predict(tapped, emb_index, self.val_items)
        val_loss = float(
            loss_fn(torch.from_numpy(logits).to(self.device), torch.from_numpy(y).to(self.device))
        )
        if self.multilabel:
            from vision.evaluation.tagging import best_f1_thresholds, evaluate

            scores = 1 / (1 + np.exp(-logits))
            at_half = evaluate(y, scores)
            calibration = best_f1_thresholds(y, scores)
            calibrated = evaluate(y, scores, thresholds=calibration.thresholds)
            evaluated = calibrated.support > 0
            macro = float(calibrated.f1[evaluated].mean()) if evaluated.any() else 0.0
            return {
                "val_loss": val_loss,
                "micro_f1": at_half.OF1,
                # A validation split without positives gives no per-label F1: 0, not a NaN that would
                # poison best-checkpoint selection and the MLflow curves.
                "macro_f1": float(at_half.f1[at_half.support > 0].mean()) if (at_half.support > 0).any() else 0.0,
                "micro_f1_calibrated": calibrated.OF1,
                "macro_f1_calibrated": macro,
                "mAP": at_half.mAP or 0.0,
                "CF1": at_half.CF1,
                "samples_f1": at_half.samples_f1,
                "_thresholds": calibration.as_dict(),
            }
        order = np.argsort(-logits, axis=1)
        k = min(5, logits.shape[1])
        top1 = float((order[:, 0] == y).mean())
        top5 = float((order[:, :k] == y[:, None]).any(axis=1).mean())
        result = {"val_loss": val_loss, "top1": top1, f"top{k}": top5}
        if self.task == "retrieval":
            result["retrieval_map"] = self._retrieval_map(tapped, emb_index)
        return result

    def _retrieval_map(self, tapped: Any, emb_index: int) -> float:
        from vision.evaluation.retrieval import evaluate
        from vision.tasks.features import l2_normalize

        gt, images = self.retrieval_set
        names = list(gt.database) or sorted(images)
        query_names = [q.name for q in gt.queries]
        wanted = names + query_names
        items = [(images[n], (0,)) for n in wanted]
        multilabel, self.multilabel = self.multilabel, False
        try:
            _, embeddings, _ = self._predict(tapped, emb_index, items)
        finally:
            self.multilabel = multilabel
        vectors = l2_normalize(embeddings)
        report = evaluate(gt, names, vectors[: len(names)], vectors[len(names) :])
        return float(report.scores[gt.settings[0]]["mAP"])

    def _pseudo_label(self, tapped: Any) -> list[tuple[Path, tuple[int, ...]]]:
        from vision.models import EMBEDDING, get_architecture

        paths = unlabeled_images(Path(self.options.unlabeled))
        emb_index = get_architecture(self.base.arch).signature(self.num_outputs).outputs.index(EMBEDDING)
        self.run.progress(message=f"pseudo-labelling {len(paths)} unlabelled images", force=True)
        logits, _, _ = self._predict(tapped, emb_index, [(p, (0,)) for p in paths])
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        keep = probs.max(axis=1) >= self.options.pseudo_threshold
        chosen = [(p, (int(c),)) for p, c, k in zip(paths, probs.argmax(axis=1), keep, strict=True) if k]
        log.info(
            "pseudo-labelling: %d of %d images above %.2f",
            len(chosen),
            len(paths),
            self.options.pseudo_threshold,
        )
        return chosen

    # -- MLflow and the registry
    def _start_mlflow(self, client: Any) -> str:
        params = {
            "task": self.task,
            "base": self.base.description,
            "arch": self.base.arch,
            "name": self.run.params["name"],
            "data": self.data.source,
            "n_train": len(self.train_items),
            "n_val": len(self.val_items),
            "labels": len(self.labels),
            "preset": self.preset.name,
            "device": str(self.device),
            **{k: v for k, v in asdict(self.options).items() if v not in ("", None)},
        }
        return start_mlflow_run(self.store, self.run, self.task, params)

    def _log(self, client: Any, run_id: str, scores: dict[str, Any], epoch: int) -> None:
        log_metrics(client, run_id, scores, epoch)

    def _finish(self, client: Any, ckpt: Checkpoint) -> dict[str, Any]:
        import torch

        from training.curves import plot

        run = self.run
        run.progress(
            message=f"registering epoch {ckpt.best_epoch} (the best) as a new version of {run.params['name']}",
            force=True,
        )
        out = self.work / "result"
        out.mkdir(exist_ok=True)
        curves = {
            k: [h.get(k, float("nan")) for h in ckpt.history]
            for k in sorted(
                {k for h in ckpt.history for k in h} - {"epoch", "train_images_per_s", "epoch_s", "elapsed_s"}
            )
        }
        plot(
            out / "curves.png",
            curves,
            title=f"{self.task} fine-tune of {self.base.description} ({run.job_id[:8]})",
        )
        (out / "history.json").write_text(json.dumps(ckpt.history, indent=1) + "\n")
        best = torch.load(self.best_path, map_location="cpu", weights_only=True)
        weights = out / "weights.pt"
        labels_file = out / "labels.txt"
        labels_file.write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(self.labels)))
        spec: dict[str, Any] = {"arch": self.base.arch, "weights": weights, "preset": self.preset.name}
        if self.task == "retrieval":
            from vision.models import create_model

            extractor = create_model(self.base.arch, num_classes=0, pretrained=False)
            wanted = extractor.state_dict()
            extractor.load_state_dict(
                {k: v for k, v in best["state_dict"].items() if k in wanted and wanted[k].shape == v.shape}
            )
            torch.save(extractor.state_dict(), weights)
            spec["labels"] = "none"
        else:
            torch.save(best["state_dict"], weights)
            spec.update(labels=str(labels_file), task="multilabel" if self.multilabel else "classification")
            if self.multilabel and best.get("thresholds"):
                thresholds = out / "thresholds.json"
                thresholds.write_text(
                    json.dumps(
                        {**best["thresholds"], "metadata": {"job_id": run.job_id, "epoch": ckpt.best_epoch}}
                    )
                    + "\n"
                )
                spec["thresholds"] = thresholds
        try:
            for path in (
                out / "curves.png",
                out / "history.json",
                *(p for p in [out / "thresholds.json"] if p.is_file()),
            ):
                client.log_artifact(ckpt.run_id, str(path), "training")
        except Exception as exc:
            log.warning("MLflow: could not upload the curves: %s", exc)
        best_scores = next(h for h in ckpt.history if h["epoch"] == ckpt.best_epoch)
        golden = [(p.name, p.read_bytes()) for p, _ in self.val_items[:4]]
        with tracing.span("registry.register", {"vision.model": run.params["name"], "vision.epoch": ckpt.best_epoch}):
            version = register_version(
                self.store,
                run.params["name"],
                spec,
                run_id=ckpt.run_id,
                golden=golden,
                lineage={
                    "job_id": run.job_id,
                    "base_model": self.base.description,
                    "dataset_fingerprint": self.data.fingerprint(),
                },
                description=f"{self.task} fine-tune of {self.base.description} on {self.data.source}, epoch {ckpt.best_epoch} of "
                f"{self.total_epochs}",
                promote_to=run.params.get("promote_to") or "",
            )
        try:
            client.set_terminated(ckpt.run_id)
        except Exception:
            pass
        result = {
            "registered_model": run.params["name"],
            "registered_version": version,
            "run_id": ckpt.run_id,
            "best_epoch": str(ckpt.best_epoch),
            "epochs": str(self.total_epochs),
            "curves": str(out / "curves.png"),
            "train_images": str(len(self.train_items)),
            "val_images": str(len(self.val_items)),
        }
        if run.params.get("promote_to"):
            result["promoted_to"] = run.params["promote_to"]
        for key, value in best_scores.items():
            if key != "epoch":
                result[f"best_{key}"] = f"{value:.4f}"
        if self.task == "retrieval":
            result["retrieval_map_before"] = f"{ckpt.extra['map_before']:.2f}"
            result["retrieval_map_after"] = f"{best_scores['retrieval_map']:.2f}"
        run.progress(metrics={k: v for k, v in best_scores.items() if k != "epoch"}, force=True)
        return result


def _cpu_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _seed_worker(worker_id: int) -> None:
    import random

    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
