"""The labelled sets `vision eval-tags` reads (vision.labels.datasets), as fine-tune jobs read them: a folder
holding a `dataset.json` or a download job's `images.txt` is that file, any other folder is one per label."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vision.labels.datasets import DatasetError, load_tag_dataset, resolve_dataset

from training.shapes import LABELS, generate, write_dataset

N = 8


@pytest.fixture
def shapes(tmp_path) -> Path:
    write_dataset(tmp_path / "shapes", generate(N, seed=2))
    return tmp_path / "shapes"


def _truth(dataset) -> dict[str, set[str]]:
    return {s.path.name: {dataset.labels[i] for i in s.labels} for s in dataset.samples}


EXPECTED = {s.name: {LABELS[i] for i in s.labels} for s in generate(N, seed=2)}


def test_a_folder_holding_dataset_json_reads_the_json(shapes):
    assert resolve_dataset(shapes) == shapes / "dataset.json"
    dataset = load_tag_dataset(shapes)
    assert dataset == load_tag_dataset(shapes / "dataset.json")
    assert dataset.labels == LABELS and dataset.layout == "a NUS-WIDE JSON" and _truth(dataset) == EXPECTED


def test_a_download_jobs_folder_reads_its_images_txt(shapes):
    (shapes / "dataset.json").unlink()
    (shapes / "images.txt").write_text(
        "".join(f"images/{s.name}\t{' '.join(map(str, s.labels))}\n" for s in generate(N, seed=2))
    )
    dataset = load_tag_dataset(shapes)
    assert dataset.layout == "a download job's image list" and dataset.source == str(shapes / "images.txt")
    assert dataset.labels == LABELS and _truth(dataset) == EXPECTED  # names from the folder's labels.txt
    names = shapes.parent / "names.txt"
    names.write_text("".join(f"{i}\tL{i}\n" for i in range(len(LABELS))))
    assert load_tag_dataset(shapes, labels_file=names).labels == tuple(f"L{i}" for i in range(len(LABELS)))
    (shapes / "labels.txt").unlink()
    assert load_tag_dataset(shapes).labels[0] == "label0"


def test_an_image_list_with_missing_images_or_bad_labels_is_refused(shapes):
    listed = shapes / "images.txt"
    listed.write_text("images/img00000.png\t0\nimages/gone.png\t1\n")
    with pytest.raises(DatasetError, match=r"1 images of .*images\.txt are missing, e\.g\. .*gone\.png"):
        load_tag_dataset(listed)
    listed.write_text("images/img00000.png\t-1\n")
    with pytest.raises(DatasetError, match="line 1: label indices start at 0"):
        load_tag_dataset(listed)
    listed.write_text("images/img00000.png\t0:high\n")
    with pytest.raises(DatasetError, match="line 1: bad label '0:high'"):
        load_tag_dataset(listed)


def test_a_folder_holding_both_files_is_refused(shapes):
    (shapes / "images.txt").write_text("images/img00000.png\t0\n")
    with pytest.raises(DatasetError, match="holds both dataset.json and images.txt"):
        load_tag_dataset(shapes)


def test_any_other_folder_is_one_per_label(tmp_path):
    for s in generate(N, seed=2):
        for i in s.labels:
            (tmp_path / LABELS[i]).mkdir(exist_ok=True)
            s.image.save(tmp_path / LABELS[i] / s.name)
    (tmp_path / "notes.json").write_text("{}")  # only dataset.json names the set
    assert resolve_dataset(tmp_path) == tmp_path
    dataset = load_tag_dataset(tmp_path)
    assert dataset.layout == "a folder per label" and _truth(dataset) == EXPECTED


def test_eval_tags_on_a_generated_folder_scores_its_labels(server, shapes):
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "eval-tags", "--target", server.address, "--json", str(shapes)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["n_samples"], report["n_labels"]) == (N, len(LABELS))
    assert [e["name"] for e in report["per_label"]] == list(LABELS)
