"""DELF training: both stages on a small generated dataset (a class pattern pasted at a random place on
noise) move the attention toward the pattern; the checkpoints serve through the registry's loading code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.delf import FolderDataset, TrainConfig, attention_map, load_image, main, make_demo_dataset, train
from vision.models import create_model, get_architecture
from vision.models.delf import Delf

SIZE, PATTERN = 256, 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("delf-training")
    make_demo_dataset(root / "train", per_class=6, size=SIZE, pattern=PATTERN, seed=0)
    held_out = make_demo_dataset(root / "held", per_class=4, size=SIZE, pattern=PATTERN, seed=100)
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        result = train(
            TrainConfig(root / "train", root / "run", image_size=SIZE, batch_size=8, stage1_epochs=1, stage2_epochs=30,
                        optimizer="adam", stage1_lr=1e-4, stage2_lr=3e-3, augment=False, seed=0),
            on_epoch=history.append,
        )
    return {"root": root, "result": result, "held_out": held_out, "history": history}


def _attention_near_pattern(model: Delf, held_out) -> tuple[float, float]:
    """Over held-out images: (mean of the attention-weighted distance from cells to the pattern centre,
    relative to the unweighted one: < 1 = attention nearer the pattern; median of the mean attention on
    cells centred inside the pattern over the mean elsewhere)."""
    distances, ratios = [], []
    for path, _, (x, y) in held_out:
        scores = attention_map(model, load_image(path, SIZE))
        rows, cols = np.mgrid[0 : scores.shape[0], 0 : scores.shape[1]] * 16  # receptive centres: 16 i
        distance = np.hypot(cols - (x + PATTERN / 2), rows - (y + PATTERN / 2))
        distances.append((scores * distance).sum() / scores.sum() / distance.mean())
        inside = (cols >= x) & (cols < x + PATTERN) & (rows >= y) & (rows < y + PATTERN)
        ratios.append(scores[inside].mean() / scores[~inside].mean())
    return float(np.mean(distances)), float(np.median(ratios))


def test_two_stages_move_the_attention_toward_the_pattern(run):
    files = run["result"].files
    before = create_model("delf_resnet50", num_classes=2, weights=files["stage1"])  # attention still untrained
    after = create_model("delf_resnet50", num_classes=2, weights=files["model"])
    distance_before, ratio_before = _attention_near_pattern(before, run["held_out"])
    distance_after, ratio_after = _attention_near_pattern(after, run["held_out"])
    assert distance_before == pytest.approx(1.0, abs=0.02) and ratio_before == pytest.approx(1.0, abs=0.1)
    assert distance_after < 0.85 and ratio_after > 2.0, (distance_after, ratio_after)
    stage2 = [h for h in run["history"] if h["stage"] == 2]
    assert stage2[-1]["loss"] < stage2[0]["loss"] and stage2[-1]["accuracy"] == 1.0


def test_the_run_writes_servable_checkpoints_labels_and_metrics(run):
    import json

    from vision.labels.names import resolve_labels

    files = run["result"].files
    assert set(files) == {"stage1", "model", "delf", "labels", "metrics"}
    assert resolve_labels(files["labels"]) == ("class0", "class1")
    metrics = json.loads(open(files["metrics"]).read())
    assert [h["stage"] for h in metrics["history"]] == [1] + [2] * 30 and metrics["classes"] == ["class0", "class1"]
    # The extractor checkpoint is what `arch=delf_resnet50,weights=delf.pt` serves (no classifier).
    extractor = create_model("delf_resnet50", weights=files["delf"])
    full = create_model("delf_resnet50", num_classes=2, weights=files["model"])
    assert get_architecture("delf_resnet50").defaults.num_classes == 0 and extractor.classifier is None
    x = torch.from_numpy(load_image(run["held_out"][0][0], SIZE)[None])
    with torch.inference_mode():
        torch.testing.assert_close(extractor.local_features(x)[1], full.local_features(x)[1])


def test_demo_data_command_and_bad_datasets(tmp_path, capsys):
    assert main(["--demo-data", str(tmp_path / "demo")]) == 0
    dataset = FolderDataset.scan(tmp_path / "demo")
    assert dataset.classes == ("class0", "class1") and len(dataset.samples) == 24
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert main(["--data", str(tmp_path / "one"), "--out", str(tmp_path / "run")]) == 2
    assert "at least two class folders" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2


def test_a_checkpointed_run_interrupted_in_stage_2_resumes_where_it_stopped(tmp_path):
    # The Jobs trainer's resume (training.delf.run_job): a redelivered job finds the last epoch's checkpoint.
    make_demo_dataset(tmp_path / "data", classes=2, per_class=3, size=64, pattern=16, seed=0)

    def config(out: str) -> TrainConfig:
        return TrainConfig(tmp_path / "data", tmp_path / out, image_size=64, batch_size=6, stage1_epochs=1,
                           stage2_epochs=2, optimizer="adam", stage1_lr=1e-4, stage2_lr=3e-3, seed=0)

    class Killed(Exception):
        pass

    def die_after_stage2_epoch1(entry: dict) -> None:
        if (entry["stage"], entry["epoch"]) == (2, 1):
            raise Killed

    with torch.random.fork_rng(devices=[]):
        straight = train(config("straight"))
        checkpoint = tmp_path / "resumed" / "last.pt"
        with pytest.raises(Killed):
            train(config("resumed"), on_epoch=die_after_stage2_epoch1, checkpoint=checkpoint)
        epochs_run: list[tuple[int, int]] = []
        resumed = train(config("resumed"), on_epoch=lambda e: epochs_run.append((e["stage"], e["epoch"])),
                        checkpoint=checkpoint)
    assert epochs_run == [(2, 2)]  # only the epoch that was left
    assert [(h["stage"], h["epoch"]) for h in resumed.history] == [(1, 1), (2, 1), (2, 2)]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history], rtol=1e-5)
    a = torch.load(straight.files["delf"], weights_only=False)["state_dict"]
    b = torch.load(resumed.files["delf"], weights_only=False)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
