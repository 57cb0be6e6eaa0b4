"""Full ranking of a database for retrieval mAP: numpy matrix product + argsort vs faiss IndexFlatIP.

    python -m loadtest.ranking --database 100000 --dim 1280 --queries 70

mAP needs every database item ranked for every query, so faiss is asked for k = N neighbours. The
evaluator (vision.evaluation.retrieval.rank) uses whichever measured faster here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from vision.evaluation.retrieval import rank
from vision.tasks.features import l2_normalize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ranking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=70, help="Oxford5k and Paris6k have 55 and 55, Revisited 70")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    database = l2_normalize(rng.standard_normal((args.database, args.dim)).astype(np.float32))
    queries = l2_normalize(rng.standard_normal((args.queries, args.dim)).astype(np.float32))
    timings: dict[str, list[float]] = {"numpy": []}
    order = None
    for _ in range(args.repeats):
        started = time.perf_counter()
        order = rank(database, queries)
        timings["numpy"].append(time.perf_counter() - started)
    try:
        import faiss
    except ImportError:
        print("faiss is not installed (pip install faiss-cpu): numpy only")
    else:
        timings["faiss"] = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            index = faiss.IndexFlatIP(args.dim)
            index.add(database)
            _, neighbours = index.search(queries, args.database)
            timings["faiss"].append(time.perf_counter() - started)
        agree = float((neighbours[:, :100] == order[:, :100]).mean())  # type: ignore[index]
        print(f"top-100 agreement numpy vs faiss: {agree:.4f}")
    for name, values in timings.items():
        print(f"{name:>6}: median {statistics.median(values):.3f} s for {args.queries} queries x {args.database} x {args.dim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
