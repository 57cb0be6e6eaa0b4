"""Fine-tune inputs without a worker: which layout a path is read as, the refusal of sets with nothing to
learn, and the rule that picks the best epoch. The jobs themselves run in test_training.py."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from vision.jobs.runtime import JobFailed

from training.data import check_learnable, load_data
from training.finetune import SELECTED_BY, selection_key
from training.shapes import LABELS, generate, write_dataset

N = 12


@pytest.fixture
def shapes(tmp_path) -> Path:
    """What `python -m training.shapes DIR` writes: DIR/images/, DIR/labels.txt, DIR/dataset.json."""
    write_dataset(tmp_path / "shapes", generate(N, seed=1))
    return tmp_path / "shapes"


def _labels_by_name(data) -> dict[str, set[str]]:
    return {path.name: {data.labels[i] for i in labels} for path, labels in data.items}


def test_a_folder_holding_dataset_json_is_read_as_that_json(shapes):
    from_folder = load_data(shapes, task="tagging")
    from_json = load_data(shapes / "dataset.json", task="tagging")
    assert from_folder == from_json and from_folder.labels == LABELS
    expected = {s.name: {LABELS[i] for i in s.labels} for s in generate(N, seed=1)}
    assert _labels_by_name(from_folder) == expected
    assert from_folder.source == str(shapes / "dataset.json") and from_folder.layout == "a NUS-WIDE JSON"
    check_learnable(from_folder, "tagging")


def test_a_folder_holding_a_download_jobs_images_txt_is_read_as_that_list(shapes):
    (shapes / "dataset.json").unlink()
    (shapes / "images.txt").write_text(
        "".join(f"images/{s.name}\t{' '.join(f'{i}:0.9' for i in s.labels)} 5:0.2\n" for s in generate(N, seed=1))
    )
    data = load_data(shapes, task="tagging")
    assert data.layout == "a download job's image list" and data.labels == LABELS  # from DIR/labels.txt
    # Label 5 ("blue") at confidence 0.2 counts for no image that does not show it.
    assert _labels_by_name(data) == {s.name: {LABELS[i] for i in s.labels} for s in generate(N, seed=1)}


def test_a_folder_holding_both_dataset_files_is_refused(shapes):
    (shapes / "images.txt").write_text("images/x.png\t0\n")
    with pytest.raises(JobFailed, match=r"holds both dataset\.json and images\.txt: give the one to read"):
        load_data(shapes, task="tagging")


def test_a_folder_of_images_in_one_subfolder_fails_a_tagging_job_saying_what_it_read(shapes):
    (shapes / "dataset.json").unlink()
    data = load_data(shapes, task="tagging")
    assert data.labels == ("images",) and data.layout == "a folder per label"
    with pytest.raises(JobFailed) as failed:
        check_learnable(data, "tagging")
    message = str(failed.value)
    assert message.startswith(f"read {shapes} as a folder per label: 1 label 'images' on all {N} images")
    assert "dataset.json" in message and "ROOT/<label>/<image>" in message


def test_a_json_with_the_same_labels_on_every_image_fails_a_tagging_job(tmp_path):
    path = write_dataset(tmp_path, [replace(s, labels=(0, 3)) for s in generate(N, seed=1)])
    with pytest.raises(JobFailed, match=rf"^read {path} as a NUS-WIDE JSON: 2 labels 'circle', 'red' on all {N} images"):
        check_learnable(load_data(path, task="tagging"), "tagging")


def test_an_image_list_with_no_label_above_half_fails_a_tagging_job(shapes):
    listed = shapes / "images.txt"
    listed.write_text("".join(f"images/{s.name}\t0:0.3\n" for s in generate(N, seed=1)))
    with pytest.raises(JobFailed, match=rf"as a download job's image list: no labels on any of its {N} images"):
        check_learnable(load_data(listed, task="tagging"), "tagging")


def test_a_folder_per_label_with_varied_labels_is_learnable(tmp_path):
    for s in generate(N, seed=1):
        for i in s.labels:
            (tmp_path / LABELS[i]).mkdir(exist_ok=True)
            s.image.save(tmp_path / LABELS[i] / s.name)
    data = load_data(tmp_path, task="tagging")
    check_learnable(data, "tagging")
    assert _labels_by_name(data) == {s.name: {LABELS[i] for i in s.labels} for s in generate(N, seed=1)}


def test_classification_with_one_class_fails_saying_what_it_read(tmp_path):
    (tmp_path / "circle").mkdir()
    (tmp_path / "square").mkdir()  # a class without images teaches nothing either
    for s in generate(4, seed=1):
        s.image.save(tmp_path / "circle" / s.name)
    with pytest.raises(
        JobFailed,
        match=rf"^read {tmp_path} as a folder per class: 1 class 'circle' for all 4 images; classification needs "
        "images of at least 2 classes",
    ):
        check_learnable(load_data(tmp_path, task="classification"), "classification")
    shutil.copy(tmp_path / "circle" / "img00000.png", tmp_path / "square" / "img00000.png")
    check_learnable(load_data(tmp_path, task="classification"), "classification")


def _best(task: str, history: list[dict]) -> int:
    """The epoch the trainer keeps: the first with the greatest selection key."""
    return max(history, key=lambda h: selection_key(task, h))["epoch"]


def test_the_best_tagging_epoch_is_by_map_then_lower_validation_loss_never_calibrated_f1():
    history = [
        # Epoch 1 is what the issue saw win: calibrated F1 1.0 on the split its thresholds were fitted to.
        {"epoch": 1, "mAP": 1.0, "val_loss": 0.40, "macro_f1_calibrated": 1.0, "macro_f1": 0.5},
        {"epoch": 2, "mAP": 1.0, "val_loss": 0.15, "macro_f1_calibrated": 1.0, "macro_f1": 0.9},
        {"epoch": 3, "mAP": 0.98, "val_loss": 0.05, "macro_f1_calibrated": 1.0, "macro_f1": 1.0},
    ]
    assert SELECTED_BY["tagging"] == "mAP"
    assert _best("tagging", history) == 2
    history[2]["mAP"] = 1.0
    assert _best("tagging", history) == 3
    tie = [{"epoch": 1, "mAP": 0.9, "val_loss": 0.2}, {"epoch": 2, "mAP": 0.9, "val_loss": 0.2}]
    assert _best("tagging", tie) == 1  # a full tie keeps the earlier epoch


def test_classification_and_retrieval_break_ties_by_validation_loss_too():
    assert _best("classification", [
        {"epoch": 1, "top1": 1.0, "val_loss": 0.3},
        {"epoch": 2, "top1": 1.0, "val_loss": 0.1},
        {"epoch": 3, "top1": 0.9, "val_loss": 0.01},
    ]) == 2
    assert _best("retrieval", [
        {"epoch": 1, "retrieval_map": 80.0, "val_loss": 0.3},
        {"epoch": 2, "retrieval_map": 85.0, "val_loss": 0.9},
    ]) == 2
