"""Client-side tools of the Features service: extract descriptors of image files through a running server,
evaluate retrieval on a ground truth, fit a whitening. Everything goes through the gRPC service, so the
numbers describe what clients get."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vision.api.codec import decode_descriptor
from vision.client.channel import Target, open_channel
from vision.media.imaging import image_files
from vision.v1 import common_pb2, features_pb2, features_pb2_grpc

if TYPE_CHECKING:
    from vision.client.delf import Options as DelfOptions


@dataclass(frozen=True)
class RecipeOptions:
    recipe: str = "center"
    layer: str = ""
    gem_p: float | None = None
    scales: tuple[float, ...] = ()
    whitening: str = ""
    dim: int | None = None
    model: str = ""
    version: str = ""


def cropped(path: Path, bbox: tuple[float, float, float, float] | None) -> bytes:
    """The file's bytes, or the bounding-box crop re-encoded losslessly (the protocols crop queries)."""
    if bbox is None:
        return path.read_bytes()
    from PIL import Image

    with Image.open(path) as img:
        box = tuple(int(round(v)) for v in bbox)
        crop = img.convert("RGB").crop(box)  # type: ignore[arg-type]
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    return buf.getvalue()


def extract(
    target: Target,
    files: Sequence[Path],
    options: RecipeOptions,
    *,
    boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
    batch_size: int = 16,
    timeout: float = 120.0,
) -> tuple[np.ndarray, features_pb2.ExtractResponse]:
    """(n, dim) descriptors of `files` in order, and the last response (model, recipe)."""
    vectors: list[np.ndarray] = []
    response = features_pb2.ExtractResponse()
    with open_channel(target) as channel:
        stub = features_pb2_grpc.FeaturesStub(channel)
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            chunk_boxes = boxes[start : start + batch_size] if boxes is not None else [None] * len(chunk)
            request = features_pb2.ExtractRequest(
                model=common_pb2.ModelSelector(name=options.model, version=options.version),
                images=[common_pb2.Image(id=p.name, content=cropped(p, b)) for p, b in zip(chunk, chunk_boxes, strict=True)],
                recipe=options.recipe,
                layer=options.layer,
                scales=options.scales,
                whitening=options.whitening,
            )
            if options.gem_p is not None:
                request.gem_p = options.gem_p
            if options.dim is not None:
                request.dim = options.dim
            response = stub.Extract(request, timeout=timeout)
            vectors.extend(decode_descriptor(d) for d in response.descriptors)
    return np.stack(vectors), response


def eval_retrieval(
    target: Target, images: Path, gt_path: Path, options: RecipeOptions, *, queries: Path | None = None,
    crop_queries: bool = True, batch_size: int = 16, timeout: float = 120.0,
    rerank: int = 0, delf: "DelfOptions | None" = None,
) -> dict[str, object]:
    """Extract the database and the queries through the service, rank, and score with the protocol.

    With `rerank` N > 0, each query's top N are then re-ranked by DELF inliers (vision.tasks.delf_match
    `rerank_rankings`) with features from the same server's Delf service (`delf` selects the model and the
    extraction options), and the scores after re-ranking are reported beside those before."""
    from vision.evaluation.retrieval import evaluate_ranked, load_ground_truth, rank

    if rerank < 0:
        raise ValueError(f"--rerank must be 0 (off) or the number of candidates to re-rank, got {rerank}")
    gt = load_ground_truth(gt_path)
    files = image_files(images)
    by_stem = {p.stem: p for p in files}
    if gt.database:
        missing = [n for n in gt.database if n not in by_stem]
        if missing:
            raise FileNotFoundError(f"{len(missing)} database images of the ground truth are not in {images}, e.g. {missing[:3]}")
        files = [by_stem[n] for n in gt.database]
    query_folder = queries or images
    query_by_stem: dict[str, Path] = {}
    for p in image_files(query_folder):
        query_by_stem.setdefault(p.stem, p)  # the first in sorted order, for names with several suffixes
    query_files = []
    for q in gt.queries:
        found = query_by_stem.get(q.name)
        if found is None:
            raise FileNotFoundError(f"query image {q.name!r} is not in {query_folder}")
        query_files.append(found)
    boxes = [q.bbox if crop_queries else None for q in gt.queries]
    if rerank:
        from vision.client.delf import Options as DelfOptions
        from vision.client.delf import extract_features

        delf = delf or DelfOptions()
        # The queries' DELF features first: a bad DELF model or option fails before the Features pass.
        started = time.perf_counter()
        query_delf, delf_model = extract_features(
            target, [cropped(p, b) for p, b in zip(query_files, boxes, strict=True)], delf, timeout=timeout
        )
        delf_seconds = time.perf_counter() - started
    database, response = extract(target, files, options, batch_size=batch_size, timeout=timeout)
    query_vectors, _ = extract(target, query_files, options, boxes=boxes, batch_size=batch_size, timeout=timeout)
    names = np.asarray([p.stem for p in files], dtype=object)
    ranked = [names[row].tolist() for row in rank(database, query_vectors)]
    result: dict[str, object] = {
        "model": {"name": response.model.name, "version": response.model.version},
        "recipe": {"name": response.recipe.name, "layer": response.recipe.layer, "gem_p": response.recipe.gem_p,
                   "scales": list(response.recipe.scales), "whitening": response.recipe.whitening, "dim": response.dim},
        "database_images": len(files),
        "queries": len(query_files),
        "scores": evaluate_ranked(gt, ranked).scores,
    }
    if rerank:
        from vision.tasks.delf_match import RERANK_OPTIONS, rerank_rankings

        # Only the images some query's shortlist holds, each extracted once however many shortlists hold it.
        shortlisted = sorted({name for row in ranked for name in row[:rerank]})
        path_of = {p.stem: p for p in files}
        started = time.perf_counter()
        found, _ = extract_features(target, [path_of[n].read_bytes() for n in shortlisted], delf, timeout=timeout)
        delf_seconds += time.perf_counter() - started
        started = time.perf_counter()
        reranked = rerank_rankings(ranked, query_delf, dict(zip(shortlisted, found, strict=True)), rerank)
        match_seconds = time.perf_counter() - started
        after = evaluate_ranked(gt, reranked).scores
        before = result["scores"]
        result["rerank"] = {
            "top": rerank,
            "delf_model": {"name": delf_model.name, "version": delf_model.version},
            "matching": {"max_descriptor_distance": RERANK_OPTIONS.max_descriptor_distance,
                         "residual_threshold": RERANK_OPTIONS.residual_threshold},
            "database_images_extracted": len(shortlisted),
            "extract_seconds": round(delf_seconds, 2),
            "match_seconds": round(match_seconds, 2),
            "scores": after,
            "mAP_change": {s: round(after[s]["mAP"] - before[s]["mAP"], 2) for s in after},  # type: ignore[index]
        }
    return result


def fit_whitening(
    target: Target, images: Path, out: Path, options: RecipeOptions, *, pairs: Path | None = None, dim: int | None = None,
    batch_size: int = 16, timeout: float = 120.0,
) -> dict[str, object]:
    """Fit a whitening on the descriptors of every image of `images` (PCA, or Radenović et al.'s learned
    whitening when `pairs` lists matching image names, one `name<TAB>name` per line) and save it."""
    from vision.tasks.features import fit_learned_whitening, fit_pca_whitening

    files = image_files(images)
    descriptors, response = extract(target, files, options, batch_size=batch_size, timeout=timeout)
    if pairs is not None:
        index = {p.stem: i for i, p in enumerate(files)}
        matched = []
        for line in pairs.read_text().splitlines():
            if line.strip():
                a, b = line.split()[:2]
                matched.append((index[Path(a).stem], index[Path(b).stem]))
        whitening = fit_learned_whitening(out.stem, descriptors, matched, dim)
    else:
        whitening = fit_pca_whitening(out.stem, descriptors, dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    whitening.save(out.with_suffix(".npz"))
    return {"whitening": str(out.with_suffix(".npz")), "kind": whitening.kind, "input_dim": whitening.input_dim,
            "dim": whitening.max_dim, "images": len(files), "recipe": response.recipe.name}


def dump(result: dict[str, object]) -> str:
    return json.dumps(result, indent=2)
