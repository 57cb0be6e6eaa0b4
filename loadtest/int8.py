"""INT8 vs fp32, in one run: the calibration sweep, the forward pass, and the two services side by side.

    python -m loadtest.int8 --work /tmp/int8              # sweep + forward + end to end (about 8 minutes here)
    python -m loadtest.int8 --work /tmp/int8 --skip-sweep # only the chosen setting, forward and end to end

1. Sets: `vision.media.photos` writes the calibration and held-out images (no source photo shared).
2. Sweep: every calibration method with and without the stem and classifier kept in float; each row gives
   held-out agreement, the same on the images fp32 is confident about, and the forward img/s.
3. Forward: fp32 and int8 at batch 8 on the same threads, alternated over rounds; median ratio.
4. Stages: decode + preprocess per image against the int8 and fp32 forward per image: what bounds the
   service once the model is 2x faster.
5. End to end: one `vision serve` hosting both models; closed-loop clients on each in turn, over rounds;
   median ratio of img/s at the given concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from vision.backends.onnx_backend import open_session
from vision.config.settings import ModelConfig, ServeSettings
from vision.evaluation.agreement import agreement
from vision.media import photos
from vision.media.imaging import image_files, load_image
from vision.serving.loading import cached_onnx, model_card
from vision.tools import quantize as q

from loadtest.harness import SpawnedServer, service_run

CHOSEN = ("minmax", ("stem", "head"))


def _sets(work: Path, calibration: int, held_out: int) -> tuple[list[Path], list[Path]]:
    sets = {}
    for split, count in (("calibration", calibration), ("held-out", held_out)):
        folder = work / split
        if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != count:
            photos.write_set(split, count, folder)  # type: ignore[arg-type]
        sets[split] = image_files(folder)
    return sets["calibration"], sets["held-out"]


def _sweep(fp32: Path, card, calib: list[Path], held: list[Path], work: Path, threads: int) -> list[dict]:  # noqa: ANN001
    from scipy.special import softmax

    batches = list(q.preprocessed(held, card.preset, 32))
    reference = q.logits_of(open_session(fp32, threads=threads), batches)
    sure = softmax(reference.astype(np.float64), axis=1).max(axis=1) >= q.CONFIDENT
    floor = agreement(reference, q.logits_of(open_session(fp32, threads=threads), list(q.preprocessed(held, card.preset, 32, read=q.reencoded_jpeg))))
    print(f"noise floor (fp32 vs itself after a JPEG q{q.NOISE_FLOOR_JPEG_QUALITY} re-encode): {floor.summary()}")
    print(f"fp32 is confident (top-1 p >= {q.CONFIDENT}) on {int(sure.sum())} of {len(held)} held-out images")
    probe = np.concatenate(batches)[:8]
    fp32_speed = q.forward_speed(open_session(fp32, threads=threads), probe, seconds=2.0)
    rows = []
    print(f"{'method':<11}{'float nodes':<14}{'top-1':>8}{'top-5':>8}{'KL':>8}{'top-1 conf.':>13}{'img/s':>8}{'x fp32':>8}")
    for method in q.METHODS:
        for exclude in ((), ("stem", "head")):
            out = work / f"sweep-{method}-{'-'.join(exclude) or 'none'}.onnx"
            q.quantize(fp32, out, calib, card.preset, q.QuantizeOptions(method=method, exclude=exclude))
            session = open_session(out, threads=threads)
            candidate = q.logits_of(session, batches)
            overall, confident = agreement(reference, candidate), agreement(reference[sure], candidate[sure])
            speed = q.forward_speed(session, probe, seconds=2.0)
            row = {"method": method, "exclude": list(exclude), "top1": overall.top1_agreement, "top5": overall.top5_overlap,
                   "kl": overall.mean_kl, "top1_confident": confident.top1_agreement, "img_s": speed, "x_fp32": speed / fp32_speed}
            rows.append(row)
            print(f"{method:<11}{','.join(exclude) or '-':<14}{row['top1']:>8.2%}{row['top5']:>8.2%}{row['kl']:>8.4f}"
                  f"{row['top1_confident']:>13.2%}{speed:>8.0f}{row['x_fp32']:>8.2f}", flush=True)
    return rows


def _forward(fp32: Path, int8: Path, probe: np.ndarray, threads: int, rounds: int) -> dict:
    sessions = {"fp32": open_session(fp32, threads=threads), "int8": open_session(int8, threads=threads)}
    speeds: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(rounds):  # alternated, so drift on a shared machine hits both alike
        for name, session in sessions.items():
            speeds[name].append(q.forward_speed(session, probe, seconds=3.0, rounds=1))
    ratios = [i / f for i, f in zip(speeds["int8"], speeds["fp32"], strict=True)]
    print(f"forward batch {probe.shape[0]}, {threads} threads: fp32 {statistics.median(speeds['fp32']):.0f} img/s, "
          f"int8 {statistics.median(speeds['int8']):.0f} img/s, int8/fp32 median {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return {"fp32_img_s": speeds["fp32"], "int8_img_s": speeds["int8"], "ratio_median": statistics.median(ratios)}


def _stages(image: bytes, card, fp32: Path, int8: Path, threads: int) -> dict:  # noqa: ANN001
    def per_image_ms(fn, n: int) -> float:  # noqa: ANN001
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - started) / n * 1000

    decode = per_image_ms(lambda: load_image(image, card.preset), 60)
    batch = np.stack([load_image(image, card.preset)] * 8)
    forward = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        session = open_session(path, threads=threads)
        forward[name] = per_image_ms(lambda s=session: s.run(["logits"], {"images": batch}), 20) / 8
    print(f"per image: decode + preprocess {decode:.2f} ms (one core), forward fp32 {forward['fp32']:.2f} ms, "
          f"int8 {forward['int8']:.2f} ms ({threads} threads, batch 8)")
    return {"decode_preprocess_ms": decode, "forward_ms": forward}


def _end_to_end(int8: Path, image: bytes, concurrency: int, duration: float, rounds: int, threads: int) -> dict:
    server = SpawnedServer(["--threads", str(threads), "--services", "classification",
                            "--model", "efficientnet_lite0", "--model", f"arch=efficientnet_lite0,name=lite_int8,onnx={int8}"])
    runs: dict[str, list[float]] = {"efficientnet_lite0": [], "lite_int8": []}
    p50: dict[str, list[float]] = {"efficientnet_lite0": [], "lite_int8": []}
    try:
        for _ in range(rounds):
            for model in runs:
                result = asyncio.run(service_run(server.target, image, concurrency, duration, 2.0, 1, model))
                if result.errors:
                    raise SystemExit(f"errors from {model}: {result.errors}")
                runs[model].append(result.images_per_second)
                p50[model].append(result.p50_ms)
    finally:
        server.close()
    ratios = [i / f for i, f in zip(runs["lite_int8"], runs["efficientnet_lite0"], strict=True)]
    print(f"service at {concurrency} clients: fp32 {statistics.median(runs['efficientnet_lite0']):.0f} img/s "
          f"(p50 {statistics.median(p50['efficientnet_lite0']):.1f} ms), int8 {statistics.median(runs['lite_int8']):.0f} img/s "
          f"(p50 {statistics.median(p50['lite_int8']):.1f} ms), int8/fp32 median {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return {"img_s": runs, "p50_ms": p50, "ratio_median": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.int8", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the image sets and models (reused between runs)")
    parser.add_argument("--calibration", type=int, default=96, help="calibration images (default 96)")
    parser.add_argument("--held-out", type=int, default=500, help="held-out images (default 500)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds for the ratios (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients for the end-to-end run (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per end-to-end run (default 10)")
    parser.add_argument("--skip-sweep", action="store_true", help="only the chosen setting (minmax, stem and head in float)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(arch="efficientnet_lite0")
    settings = ServeSettings(models=[config])
    card, weights = model_card(config, settings)
    fp32 = cached_onnx(config, settings, card, weights)
    calib, held = _sets(args.work, args.calibration, args.held_out)
    print(f"{len(calib)} calibration and {len(held)} held-out images under {args.work}")
    results: dict = {}
    if not args.skip_sweep:
        results["sweep"] = _sweep(fp32, card, calib, held, args.work, args.threads)
    int8 = args.work / "lite0-int8.onnx"
    method, exclude = CHOSEN
    q.quantize(fp32, int8, calib, card.preset, q.QuantizeOptions(method=method, exclude=exclude))  # type: ignore[arg-type]
    probe = next(q.preprocessed(held[:8], card.preset, 8))
    results["forward"] = _forward(fp32, int8, probe, args.threads, args.rounds)
    # The photo the main load test sends (coffee.png as JPEG q92, 600x400): the same decode cost.
    import skimage.data
    from PIL import Image

    image = photos.jpeg_bytes(Image.fromarray(skimage.data.coffee()), quality=92)
    results["stages"] = _stages(image, card, fp32, int8, args.threads)
    results["end_to_end"] = _end_to_end(int8, image, args.concurrency, args.duration, args.rounds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
