"""Retrieval with DELF re-ranking: the Features evaluator's ranking, its top K re-ranked by DELF inliers.

    python -m loadtest.delf_rerank --bench ./rbench --recipe center --recipe gem --scales 1,0.7071,0.5
    python -m loadtest.delf_rerank --bench ./rbench --target 127.0.0.1:50051 --top 100

The benchmark is the Features one (`python -m loadtest.retrieval_bench`; written to --bench if missing).
Through one server (started on free loopback ports, or --target): the Features service ranks the database
for each (bounding-box cropped) query with each --recipe, exactly as `vision eval-retrieval` does; the Delf
service extracts every database image and query once; then each query's top --top candidates are re-ranked
by the number of RANSAC inliers between the query and the candidate (ties keep the global order), as the
reference's `detect_to_retrieve/image_reranking.py` (`RerankByGeometricVerification`) does; its matching
there uses a descriptor distance of 0.9 and a 10-px RANSAC threshold (the defaults here; the Match RPC's
are `match_images.py`'s 0.8 and 20 px). Each candidate is fitted onto the query, as the reference's
`MatchFeatures`. Prints mAP (Oxford AP, the evaluator's `average_precision`) and mP@k (revisitop's protocol:
k lowered to the last positive's rank) before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from vision.client.delf import Options as DelfOptions
from vision.client.delf import extract_features
from vision.client.features import RecipeOptions, cropped
from vision.client.features import extract as features_extract
from vision.evaluation.retrieval import TOP_K, evaluate_ranked, load_ground_truth, rank
from vision.media.imaging import image_files
from vision.tasks.delf_match import RERANK_OPTIONS, MatchOptions, rerank_rankings

from loadtest.harness import SpawnedServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.delf_rerank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, required=True, help="the generated benchmark's folder (written if missing)")
    parser.add_argument("--target", help="running server hosting Features and Delf (default: start one)")
    parser.add_argument("--recipe", action="append", help="Features recipe(s) to re-rank (default: center)")
    parser.add_argument("--scales", default="", help="Features scales for pooled recipes, comma-separated")
    parser.add_argument("--delf-model", default="", help="Delf model (default: the server's default)")
    parser.add_argument("--top", type=int, default=100, help="re-rank this many candidates per query (default 100)")
    parser.add_argument("--max-descriptor-distance", type=float, default=RERANK_OPTIONS.max_descriptor_distance,
                        help=f"putative match bound (default {RERANK_OPTIONS.max_descriptor_distance})")
    parser.add_argument("--residual-threshold", type=float, default=RERANK_OPTIONS.residual_threshold,
                        help=f"RANSAC inlier threshold in px (default {RERANK_OPTIONS.residual_threshold:g})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (args.bench / "gt").is_dir():
        from loadtest.retrieval_bench import generate

        generate(args.bench)
    gt = load_ground_truth(args.bench / "gt")
    files = image_files(args.bench / "jpg")
    query_files = [args.bench / "queries" / f"{q.name}.jpg" for q in gt.queries]
    names = np.asarray([p.stem for p in files], dtype=object)
    server = None
    if args.target:
        target = args.target
    else:
        server = SpawnedServer(["--services", "features,delf"])
        target = server.target
    results: dict[str, object] = {}
    try:
        started = time.perf_counter()
        delf = DelfOptions(model=args.delf_model)
        # Every database image once (the shortlists of all recipes together cover most of them).
        database_delf, _ = extract_features(target, [p.read_bytes() for p in files], delf, timeout=600.0)
        query_delf, _ = extract_features(
            target, [cropped(p, q.bbox) for p, q in zip(query_files, gt.queries, strict=True)], delf, timeout=600.0
        )
        by_name = dict(zip(names.tolist(), database_delf, strict=True))
        extract_s = time.perf_counter() - started
        keypoints = [len(f) for f in database_delf]
        scales = tuple(float(s) for s in args.scales.split(",") if s)
        matching = MatchOptions(max_descriptor_distance=args.max_descriptor_distance, residual_threshold=args.residual_threshold)
        for recipe in args.recipe or ["center"]:
            options = RecipeOptions(recipe=recipe, scales=scales if recipe not in ("center", "ten_crop") else ())
            database, _ = features_extract(target, files, options)
            queries, _ = features_extract(target, query_files, options, boxes=[q.bbox for q in gt.queries])
            order = rank(database, queries)
            before = [names[row].tolist() for row in order]
            started = time.perf_counter()
            after = rerank_rankings(before, query_delf, by_name, args.top, matching)
            match_s = time.perf_counter() - started
            results[recipe] = {
                "before": evaluate_ranked(gt, before).scores, "after": evaluate_ranked(gt, after).scores,
                "matching": {"max_descriptor_distance": args.max_descriptor_distance, "residual_threshold": args.residual_threshold},
                "matches": len(order) * min(args.top, len(files)), "match_seconds": round(match_s, 1),
            }
        results["delf"] = {"database_images": len(files), "queries": len(gt.queries), "extract_seconds": round(extract_s, 1),
                           "database_keypoints_median": float(np.median(keypoints)),
                           "database_images_without_keypoints": int(sum(k == 0 for k in keypoints))}
    except grpc.RpcError as exc:
        print(f"loadtest.delf_rerank: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    finally:
        if server is not None:
            server.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{len(files)} database images, {len(gt.queries)} queries; DELF top {args.top} re-ranked by inliers")
    for recipe, r in results.items():
        if recipe == "delf":
            continue
        for setting in r["before"]:  # type: ignore[index]
            b, a = r["before"][setting], r["after"][setting]  # type: ignore[index]
            print(f"  {recipe:10} {setting}: mAP {b['mAP']:.1f} -> {a['mAP']:.1f} ({a['mAP'] - b['mAP']:+.1f}); "
                  + "; ".join(f"mP@{k} {b[f'mP@{k}']:.1f} -> {a[f'mP@{k}']:.1f}" for k in TOP_K))
    print(f"  DELF: {results['delf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
