"""Fine-tune jobs end to end on generated data, through the Jobs service, real Celery workers, a real
Redis, a real MLflow registry and a running Tagging service that follows the promoted alias:

download (local HTTP) -> fine-tune (tagging) -> registered with golden outputs -> promoted -> the running
service tags new images with the new version; a SIGKILLed training worker resumes from its checkpoint;
cancel stops within one batch; classification (stages, center loss, pseudo labels) and retrieval (mAP
before/after) register too. Numbers printed here are docs/benchmarks.md's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess
from PIL import Image
from test_jobs_helpers import Site, Worker, jobs_server, namespace, redis_url, run_cli, stub, wait_job  # noqa: F401
from vision.v1 import common_pb2, jobs_pb2, tagging_pb2, tagging_pb2_grpc

from training.finetune import selection_key
from training.shapes import LABELS, generate, url_line, write_dataset, write_labels

N_TRAIN, N_HELD_OUT = 320, 64
SMALL = "torchvision_128"


@pytest.fixture(scope="module")
def env(tmp_path_factory, namespace):  # noqa: F811 (the fixture imported above)
    """Registry, Jobs service, one worker for both queues (allowed to fetch from 127.0.0.0/8)."""
    root = tmp_path_factory.mktemp("training")
    registry = f"sqlite:///{root / 'registry' / 'registry.db'}"
    artifacts = str(root / "registry" / "artifacts")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    worker = Worker(
        root / "worker.log",
        namespace,
        "--queues",
        "download,train",
        "--allow-private-addresses",
        "127.0.0.0/8",
        "--registry-uri",
        registry,
        "--registry-artifact-root",
        artifacts,
        "--work-dir",
        str(root / "work"),
    ).wait_ready()
    server = jobs_server(root, namespace)
    labels = write_labels(root / "labels.txt")
    # Version 1 of `shapes`: a placeholder (seeded random weights, the same 6 labels) the Tagging service
    # serves until a fine-tune is promoted.
    registered = run_cli(
        "registry",
        "--registry-uri",
        registry,
        "--artifact-root",
        artifacts,
        "register",
        "shapes",
        "--model",
        f"arch=efficientnet_lite0,weights=random,labels={labels},task=multilabel,preset={SMALL}",
        "--promote",
        "staging",
    )
    assert registered.returncode == 0, registered.stderr
    yield {
        "root": root,
        "registry": registry,
        "artifacts": artifacts,
        "worker": worker,
        "server": server,
        "jobs": stub(server.address),
        "labels": labels,
    }
    server.stop()
    worker.stop()


@pytest.fixture(scope="module")
def downloaded(env):
    """The generated training set served over HTTP and downloaded by a download job."""
    site = Site()
    samples = generate(N_TRAIN, seed=0)
    lines = []
    for s in samples:
        site.files[f"/shapes/{s.name}"] = (s.png(), "image/png")
        lines.append(url_line(site.url(f"/shapes/{s.name}"), s.labels))
    urls = env["root"] / "urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    out = env["root"] / "shapes-set"
    started = time.monotonic()
    submitted = run_cli(
        "jobs", "--target", env["server"].address, "submit-download", "--urls", str(urls), "--out", str(out)
    )
    assert submitted.returncode == 0, submitted.stderr
    job = wait_job(env["jobs"], submitted.stdout.split()[-1], 300)
    seconds = time.monotonic() - started
    site.close()
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result["images"] == str(N_TRAIN), job
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"\ndownload: {N_TRAIN} images in {summary['seconds']:.2f} s inside the job = {summary['images_per_s']:.0f} img/s "
        f"({seconds:.1f} s submit to done)"
    )
    return out


def _finetune(env, *args: str) -> str:
    submitted = run_cli("jobs", "--target", env["server"].address, "submit-finetune", *args)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return submitted.stdout.split()[-1]


def _history(job: jobs_pb2.Job) -> list[dict]:
    return json.loads((Path(job.result["curves"]).parent / "history.json").read_text())


def _micro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    from vision.evaluation.tagging import evaluate

    return evaluate(truth, y_pred=predicted).OF1


# A hang guard as long as the job's own wait (900 s): on a loaded 2-core machine the 5 epochs alone take minutes.
@pytest.mark.timeout(900)
def test_download_finetune_register_promote_and_the_running_service_tags_with_the_new_version(
    env, downloaded
):
    registry, artifacts = env["registry"], env["artifacts"]
    tagging = ServerProcess(
        [
            "--services",
            "tagging",
            "--model",
            "models:/shapes@staging",
            "--registry-uri",
            registry,
            "--registry-artifact-root",
            artifacts,
            "--registry-poll-s",
            "1",
            "--registry-cache",
            str(env["root"] / "cache"),
        ],
        env["root"] / "tagging.log",
    ).wait_ready()
    try:
        stub_ = tagging_pb2_grpc.TaggingStub(__import__("grpc").insecure_channel(tagging.address))
        held_out = generate(N_HELD_OUT, seed=99, prefix="new")
        request = tagging_pb2.TagRequest(
            images=[common_pb2.Image(id=s.name, content=s.png()) for s in held_out]
        )
        assert stub_.Tag(request, timeout=60).model.version == "1"

        started = time.monotonic()
        job_id = _finetune(
            env,
            "--task",
            "tagging",
            "--data",
            str(downloaded),
            "--base",
            "efficientnet_lite0",
            "--name",
            "shapes",
            "--promote-to",
            "staging",
            "--labels",
            str(env["labels"]),
            "--preset",
            SMALL,
            "--lr",
            "1e-3",
            "--epochs",
            "5",
            "--seed",
            "0",
        )
        waited = run_cli("jobs", "--target", env["server"].address, "wait", job_id, timeout=900)
        job_seconds = time.monotonic() - started
        assert waited.returncode == 0, waited.stdout + waited.stderr + env["worker"].log()[-5000:]
        job = env["jobs"].GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=10)
        assert job.result["registered_version"] == "2" and job.result["promoted_to"] == "staging"
        assert job.epoch == 5 and job.epochs == 5 and job.attempt == 1

        # The running service follows the alias: version 2 answers without a restart.
        deadline = time.monotonic() + 120
        while (response := stub_.Tag(request, timeout=60)).model.version != "2":
            assert time.monotonic() < deadline, tagging.log()[-3000:]
            time.sleep(0.5)
        switched = time.monotonic() - started - job_seconds
        truth = np.zeros((len(held_out), len(LABELS)), dtype=bool)
        predicted = np.zeros_like(truth)
        for row, (sample, result) in enumerate(zip(held_out, response.results, strict=True)):
            assert result.image_id == sample.name
            truth[row, list(sample.labels)] = True
            predicted[row, [t.index for t in result.tags]] = True
        f1 = _micro_f1(truth, predicted)
        assert f1 >= 0.9, f"micro-F1 on new images through the service: {f1:.3f}"
        assert {t.label for t in response.results[0].tags} <= set(LABELS)

        history = _history(job)
        assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
        reached = next((h for h in history if h["micro_f1"] >= 0.9), None)
        reached_text = (
            f"epoch {reached['epoch']}, {reached['elapsed_s']:.0f} s of training" if reached else "never"
        )
        ips = [h["train_images_per_s"] for h in history]
        print(
            f"\ntagging fine-tune (efficientnet_lite0, {SMALL}): {job_seconds:.1f} s submit to registered+promoted; "
            f"train {np.median(ips):.1f} img/s (median of epochs {', '.join(f'{v:.1f}' for v in ips)}); "
            f"val micro-F1 per epoch {[round(h['micro_f1'], 3) for h in history]} (>= 0.9 first at {reached_text}); "
            f"held-out micro-F1 through the service {f1:.3f}; the service switched {switched:.1f} s after the job ended"
        )

        # The registered version: lineage, golden outputs, MLflow run with per-epoch curves and the PNG.
        from vision.registry.store import RegistryStore

        store = RegistryStore(registry, artifacts)
        info = store.version("shapes", "2")
        assert info.lineage["job_id"] == job_id and info.lineage["base_model"] == "efficientnet_lite0"
        assert info.lineage["dataset_fingerprint"].startswith("sha256:") and "staging" in info.aliases
        assert info.run_id == job.result["run_id"]
        lineage = store.lineage(info)
        assert lineage["curves"]["micro_f1"] == 5 and lineage["params"]["task"] == "tagging"
        files = {a.path for a in store.client.list_artifacts(info.run_id, "training")}
        assert {"training/curves.png", "training/history.json", "training/thresholds.json"} <= files
        package = store.download("shapes", "2", env["root"] / "v2")
        assert package.card["task"] == "multilabel" and package.card["num_classes"] == 6
        assert package.card["preset"]["name"] == SMALL and package.spec["thresholds"].startswith(
            "thresholds/"
        )
        assert package.card["golden"]["images"] == 4
    finally:
        tagging.stop()


def test_a_training_worker_killed_mid_epoch_resumes_from_its_checkpoint(env, downloaded):
    job_id = _finetune(
        env,
        "--task",
        "tagging",
        "--data",
        str(downloaded),
        "--base",
        "models:/shapes/1",
        "--name",
        "shapes-kill",
        "--labels",
        str(env["labels"]),
        "--trainable",
        "head",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
    )
    jobs = env["jobs"]
    job = wait_job(jobs, job_id, 600, until=lambda j: j.epoch == 2 and j.done >= 3 or j.state in (5, 6, 7))
    assert job.state == jobs_pb2.JOB_STATE_RUNNING, job
    pid = int(job.worker.rsplit(" ", 1)[1])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    lost = wait_job(jobs, job_id, 60, until=lambda j: j.attempt >= 2 or "worker lost" in j.message)
    wait_job(jobs, job_id, 60, until=lambda j: j.attempt >= 2)
    redelivered = time.monotonic() - killed
    wait_job(
        jobs,
        job_id,
        120,
        # The resumed run announces epoch 2 afresh (message "epoch 2/3", done from 0), then counts batches.
        until=lambda j: j.attempt >= 2 and j.message.startswith("epoch 2/3") and j.done >= 1,
    )
    recovery = time.monotonic() - killed
    final = wait_job(jobs, job_id, 600)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final
    assert final.attempt == 2 and final.epochs == 3 and final.result["epochs"] == "3"
    history = _history(final)
    assert [h["epoch"] for h in history] == [1, 2, 3], "epoch 1 came from the checkpoint, 2 and 3 ran again"
    assert "resuming after epoch 1 of 3" in env["worker"].log()
    assert final.result["registered_version"] == "1" and final.result["run_id"]
    print(
        f"\ntraining worker SIGKILL mid-epoch 2: redelivered (attempt 2 running) {redelivered:.1f} s after the kill, "
        f"training again (first batch of epoch 2 done, after imports, model and checkpoint load) {recovery:.1f} s after; "
        f"lost-state seen: {lost.message!r}"
    )


def test_cancel_stops_a_running_fine_tune_within_one_batch(env, downloaded):
    job_id = _finetune(
        env,
        "--task",
        "tagging",
        "--data",
        str(downloaded),
        "--base",
        "models:/shapes/1",
        "--name",
        "shapes-cancel",
        "--labels",
        str(env["labels"]),
        "--trainable",
        "last",
        "--epochs",
        "5",
        "--batch-size",
        "32",
    )
    # Batches of 32 take longer than the 0.5 s between progress writes, so `done` below is at most one behind.
    jobs = env["jobs"]
    job = wait_job(jobs, job_id, 600, until=lambda j: j.done >= 2 and j.unit == "batches")
    at_cancel = job.done
    started = time.monotonic()
    assert (
        jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job_id), timeout=10).state
        == jobs_pb2.JOB_STATE_CANCELLING
    )
    final = wait_job(jobs, job_id, 60)
    seconds = time.monotonic() - started
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED, final
    assert final.epoch == 1 and final.done <= at_cancel + 2, (at_cancel, final.done)
    assert final.message.startswith("cancelled at epoch 1/5")
    print(
        f"\ncancel: stopped {seconds:.2f} s after the request, {final.done - at_cancel} batch(es) after the progress seen"
    )


def _subset(downloaded: Path, folder: Path, n: int) -> Path:
    """The first `n` images of the downloaded set as an image list of their own (absolute names)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (downloaded / "images.txt").read_text().splitlines()[:n]
    path = folder / "images.txt"
    path.write_text(
        "".join(f"{downloaded / name}\t{labels}\n" for name, labels in (line.split("\t") for line in lines))
    )
    return path


def test_the_same_seed_gives_the_same_run(env, downloaded, tmp_path):
    data = _subset(downloaded, tmp_path / "subset", 48)
    runs = []
    for name in ("repro-a", "repro-b"):
        job_id = _finetune(
            env,
            "--task",
            "tagging",
            "--data",
            str(data),
            "--base",
            "models:/shapes/1",
            "--name",
            name,
            "--labels",
            str(env["labels"]),
            "--trainable",
            "head",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--seed",
            "3",
            "--lr",
            "1e-3",
        )
        runs.append(wait_job(env["jobs"], job_id, 600))
    assert all(r.state == jobs_pb2.JOB_STATE_SUCCEEDED for r in runs), runs
    first, second = (_history(r) for r in runs)
    timing = ("train_images_per_s", "epoch_s", "elapsed_s")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in first]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in second]
    from vision.registry.store import RegistryStore

    store = RegistryStore(env["registry"], env["artifacts"])
    a, b = store.version("repro-a", "1"), store.version("repro-b", "1")
    assert a.sha256["weights.pt"] == b.sha256["weights.pt"], (
        "the same seed, data and base give the same weights"
    )


def test_a_generated_folder_trains_its_labels_and_keeps_the_epoch_by_map_then_loss(env, tmp_path):
    """As docs/jobs.md has a new user do: `python -m training.shapes DIR`, then `--data DIR`."""
    write_dataset(tmp_path / "shapes", generate(48, seed=11))
    job_id = _finetune(
        env, "--task", "tagging", "--data", str(tmp_path / "shapes"), "--base", "models:/shapes/1",
        "--name", "shapes-folder", "--trainable", "head", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
    )
    final = wait_job(env["jobs"], job_id, 600)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.message + env["worker"].log()[-4000:]
    result = Path(final.result["curves"]).parent
    assert (result / "labels.txt").read_text() == "".join(f"{i}\t{n}\n" for i, n in enumerate(LABELS))
    assert json.loads((result / "thresholds.json").read_text())["metadata"]["epoch"] == int(final.result["best_epoch"])
    history = _history(final)
    assert int(final.result["best_epoch"]) == max(history, key=lambda h: selection_key("tagging", h))["epoch"]
    from vision.registry.store import RegistryStore

    package = RegistryStore(env["registry"], env["artifacts"]).download(
        "shapes-folder", final.result["registered_version"], tmp_path / "pkg"
    )
    assert package.card["num_classes"] == len(LABELS)


def test_a_folder_read_as_one_label_on_every_image_fails_the_job_and_registers_nothing(env, tmp_path):
    (write_dataset(tmp_path / "shapes", generate(20, seed=12))).unlink()  # DIR/images/ without its dataset.json
    job_id = _finetune(
        env, "--task", "tagging", "--data", str(tmp_path / "shapes"), "--base", "models:/shapes/1",
        "--name", "shapes-one-label", "--promote-to", "staging", "--epochs", "1",
    )
    final = wait_job(env["jobs"], job_id, 120)
    assert final.state == jobs_pb2.JOB_STATE_FAILED and final.attempt == 1, final
    assert f"read {tmp_path / 'shapes'} as a folder per label: 1 label 'images' on all 20 images" in final.message
    assert "dataset.json" in final.message
    from vision.registry.store import RegistryStore

    assert RegistryStore(env["registry"], env["artifacts"]).versions("shapes-one-label") == []


def _single_shape(samples: list) -> list:
    return [s for s in samples if len(set(s.labels) & {0, 1, 2}) == 1]


def test_classification_runs_its_stages_with_center_loss_and_pseudo_labels(env, tmp_path):
    data = tmp_path / "classes"
    samples = _single_shape(generate(260, seed=5))[:120]
    for s in samples:
        kind = LABELS[[i for i in s.labels if i < 3][0]]
        (data / kind).mkdir(parents=True, exist_ok=True)
        s.image.save(data / kind / s.name)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for s in _single_shape(generate(60, seed=6))[:20]:
        s.image.save(unlabeled / s.name)
    job_id = _finetune(
        env,
        "--task",
        "classification",
        "--data",
        str(data),
        "--base",
        "efficientnet_lite0",
        "--name",
        "shape-kind",
        "--preset",
        SMALL,
        "--epochs",
        "2",
        "--head-epochs",
        "1",
        "--center-loss",
        "0.01",
        "--unlabeled",
        str(unlabeled),
        "--pseudo-threshold",
        "0.4",
        "--pseudo-epochs",
        "1",
    )
    final = wait_job(env["jobs"], job_id, 900)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.message + env["worker"].log()[-4000:]
    history = _history(final)
    assert [h["epoch"] for h in history] == [1, 2, 3] and final.epochs == 3
    assert {"top1", "top3", "val_loss"} <= set(history[0])
    from vision.registry.store import RegistryStore

    package = RegistryStore(env["registry"], env["artifacts"]).download(
        "shape-kind", final.result["registered_version"], tmp_path / "pkg"
    )
    assert package.card["task"] == "classification" and package.card["num_classes"] == 3
    ips = [round(h["train_images_per_s"], 1) for h in history]
    print(
        f"\nclassification fine-tune: top-1 per epoch {[round(h['top1'], 3) for h in history]}; train img/s {ips}"
    )


def _instances(root: Path, classes: int = 10, per_class: int = 6) -> None:
    rng = np.random.default_rng(7)
    bases = generate(classes, seed=8, prefix="inst")
    for c, sample in enumerate(bases):
        folder = root / f"object{c:02d}"
        folder.mkdir(parents=True)
        img = sample.image.resize((96, 96))
        for k in range(per_class):
            crop = int(rng.integers(0, 14))
            view = img.crop(
                (crop, crop, 96 - int(rng.integers(0, 14)), 96 - int(rng.integers(0, 14)))
            ).resize((96, 96))
            if k % 2:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arr = np.clip(
                np.asarray(view, dtype=np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 6, (96, 96, 3)),
                0,
                255,
            )
            Image.fromarray(arr.astype(np.uint8)).save(folder / f"{k}.png")


def test_retrieval_reports_map_before_and_after_and_registers_a_feature_extractor(env, tmp_path):
    _instances(tmp_path / "instances")
    job_id = _finetune(
        env,
        "--task",
        "retrieval",
        "--data",
        str(tmp_path / "instances"),
        "--base",
        "efficientnet_lite0",
        "--name",
        "shapes-retrieval",
        "--preset",
        SMALL,
        "--epochs",
        "2",
        "--lr",
        "1e-4",
    )
    final = wait_job(env["jobs"], job_id, 900)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.message + env["worker"].log()[-4000:]
    before, after = float(final.result["retrieval_map_before"]), float(final.result["retrieval_map_after"])
    assert 0 < before <= 100 and 0 < after <= 100
    from vision.registry.store import RegistryStore

    store = RegistryStore(env["registry"], env["artifacts"])
    info = store.version("shapes-retrieval", final.result["registered_version"])
    package = store.download("shapes-retrieval", info.version, tmp_path / "pkg")
    assert package.card["num_classes"] == 0 and package.card["task"] == "features"
    assert [o["name"] for o in package.card["outputs"]][0] == "embedding"
    assert store.lineage(info)["curves"]["retrieval_map"] == 3  # before (step 0) and each epoch
    ips = [round(h["train_images_per_s"], 1) for h in _history(final)]
    print(f"\nretrieval fine-tune: held-out mAP before {before:.1f}, after {after:.1f}; train img/s {ips}")


def test_delf_trains_both_stages_as_a_job_and_registers_an_extractor(env, tmp_path):
    from training.delf import make_demo_dataset

    make_demo_dataset(tmp_path / "demo", classes=2, per_class=4, size=96, pattern=24)
    job_id = _finetune(
        env, "--task", "delf", "--data", str(tmp_path / "demo"), "--base", "arch=delf_resnet50,weights=random",
        "--name", "delf-demo", "--epochs", "2", "--batch-size", "8", "--lr", "1e-4",
    )
    final = wait_job(env["jobs"], job_id, 600)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.message + env["worker"].log()[-4000:]
    assert final.epoch == 2 and final.epochs == 2
    assert (final.result["epochs"], final.result["stage1_epochs"], final.result["train_images"]) == ("2", "1", "8")
    history = json.loads(Path(final.result["metrics"]).read_text())["history"]
    assert [(h["stage"], h["epoch"]) for h in history] == [(1, 1), (2, 1)]
    assert all(np.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in history)
    assert float(final.result["stage2_loss"]) == pytest.approx(history[1]["loss"], abs=1e-4)
    assert "stage2_loss" in final.metrics and Path(final.result["checkpoint"]).is_file()
    from vision.registry.store import RegistryStore

    store = RegistryStore(env["registry"], env["artifacts"])
    info = store.version("delf-demo", final.result["registered_version"])
    package = store.download("delf-demo", info.version, tmp_path / "pkg")
    assert package.spec["arch"] == "delf_resnet50" and package.card["num_classes"] == 0
    assert [o["name"] for o in package.card["outputs"]] == ["embedding", "attention", "layer3"]
    # Per-epoch metrics in the job's MLflow run, step = the job's epoch over both stages.
    client = store.client
    steps = [m.step for m in client.get_metric_history(final.result["run_id"], "loss")]
    assert sorted(steps) == [1, 2]


@pytest.mark.slow
def test_the_resnext50_multilabel_path(env, downloaded, tmp_path):
    """The issue's default tagging architecture, on a small slice: one epoch, head only, 128-px inputs."""
    data = _subset(downloaded, tmp_path / "subset", 48)
    job_id = _finetune(
        env,
        "--task",
        "tagging",
        "--data",
        str(data),
        "--base",
        f"arch=resnext50_32x4d_multilabel,weights=random,labels={env['labels']}",
        "--name",
        "shapes-resnext",
        "--labels",
        str(env["labels"]),
        "--preset",
        SMALL,
        "--epochs",
        "1",
        "--trainable",
        "head",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
    )
    final = wait_job(env["jobs"], job_id, 1200)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.message + env["worker"].log()[-4000:]
    assert final.result["registered_version"] == "1"
    print(
        f"\nresnext50_32x4d_multilabel: train {float(final.result['best_train_images_per_s']):.1f} img/s (head only, 128 px)"
    )
