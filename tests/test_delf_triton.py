"""DELF behind a real Triton (nvidia-pytriton's tritonserver 2.51), as production runs it: the DELF ResNet-50
exported with dynamic height and width (`vision export-triton`), pyramid levels sent as requests batched by
shape, and the same keypoints and descriptors as the in-process engine (ONNX Runtime) on a real photo."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest

from conftest import ServerProcess, encode, photo
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tritonserver binary is Linux-only")

SPEC = "arch=delf_resnet50,weights=random,delf_score_threshold=0,name=delf"


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    from vision.triton import TritonProcess, setup_runtime

    root = tmp_path_factory.mktemp("delf-triton")
    runtime = setup_runtime()
    repository = root / "model_repository"
    repository.mkdir()
    export = subprocess.run(
        [sys.executable, "-m", "vision.cli", "export-triton", "--model", SPEC, "--repository", str(repository),
         "--max-batch-size", "8", "--preferred-batch-sizes", "2,4,8"],
        capture_output=True, text=True, timeout=300,
    )
    assert export.returncode == 0, export.stderr
    config = (repository / "delf" / "config.pbtxt").read_text()
    assert '"attention"' in config and '"layer3"' in config and "-1" in config  # dynamic height and width
    triton = TritonProcess(repository, runtime=runtime, log_path=root / "triton.log").start()
    remote = ServerProcess(
        ["--services", "delf", "--backend", "triton", "--triton-url", triton.grpc_address, "--model", SPEC],
        root / "serve-triton.log",
    )
    local = ServerProcess(["--services", "delf", "--model", SPEC], root / "serve-local.log")
    stacks = {"triton": triton, "remote": remote.wait_ready(), "local": local.wait_ready()}
    yield stacks
    remote.stop()
    local.stop()
    triton.stop()


def _extract(address: str, *contents: bytes) -> delf_pb2.DelfExtractResponse:
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
        return delf_pb2_grpc.DelfStub(channel).Extract(
            delf_pb2.DelfExtractRequest(
                images=[common_pb2.Image(id=str(i), content=c) for i, c in enumerate(contents)],
                options=delf_pb2.DelfExtractOptions(max_image_side=384),
            ),
            timeout=300,
        )


def test_triton_and_the_in_process_engine_give_the_same_features(stacks):
    left = encode(photo("motorcycle_left.png"), "JPEG", quality=92)
    right = encode(photo("motorcycle_right.png"), "JPEG", quality=92)
    remote = _extract(stacks["remote"].address, left, right)
    local = _extract(stacks["local"].address, left, right)
    assert remote.model.name == local.model.name == "delf"
    for r, l in zip(remote.results, local.results, strict=True):
        a, b = r.features, l.features
        assert len(a.keypoints) == len(b.keypoints) == 1000 and a.descriptor_dim == b.descriptor_dim == 1024
        points_a = np.array([(k.x, k.y, k.scale) for k in a.keypoints])
        points_b = np.array([(k.x, k.y, k.scale) for k in b.keypoints])
        scores_a = np.array([k.score for k in a.keypoints])
        scores_b = np.array([k.score for k in b.keypoints])
        # Same keypoints in the same order, scores and descriptors within 1e-4. (Ties in score could swap
        # two keypoints; none happen on this photo.)
        np.testing.assert_array_equal(points_a, points_b)
        assert np.abs(scores_a - scores_b).max() <= 1e-4
        da = np.frombuffer(a.descriptors, "<f4").reshape(-1, 1024)
        db = np.frombuffer(b.descriptors, "<f4").reshape(-1, 1024)
        assert np.abs(da - db).max() <= 1e-4


def test_pyramid_levels_reach_triton_batched_by_shape(stacks):
    """Two images of one size: each of the 7 levels is one Triton request holding both images."""
    before = stacks["triton"].admin.model_stats("delf")
    image = encode(photo("coffee.png"), "JPEG", quality=92)
    response = _extract(stacks["remote"].address, image, image)
    after = stacks["triton"].admin.model_stats("delf")
    assert [len(r.features.keypoints) for r in response.results] == [1000, 1000]

    requests = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    assert (requests, inferences) == (7, 14)
