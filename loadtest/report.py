"""PNG plots of open-loop runs, one line per mode: throughput vs offered rate, latency CDF, latency over time."""

from __future__ import annotations

from pathlib import Path

from loadtest.openloop import OpenLoopResult, knee


def plot(runs: dict[str, list[OpenLoopResult]], out_dir: Path, *, title: str = "") -> list[Path]:
    """Three PNGs in `out_dir`; the CDF and timeline use each mode's knee run (its last run when there is no
    knee), so modes are compared where each still keeps up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for mode, results in runs.items():
        ordered = sorted(results, key=lambda r: r.offered_rps)
        xs = [r.offered_rps for r in ordered]
        ax.plot(xs, [r.achieved_rps for r in ordered], marker="o", label=mode)
        top = max(top, *xs)
    ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="offered = achieved")
    ax.set_xlabel("offered rate (requests/s, open loop)")
    ax.set_ylabel("answered OK (requests/s)")
    ax.set_title(title or "Throughput vs offered rate")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "throughput_vs_offered.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, results in runs.items():
        chosen = _chosen(results)
        if chosen is None or not chosen.cdf:
            continue
        ax.plot([ms for _, ms in chosen.cdf], [p for p, _ in chosen.cdf], marker=".", label=f"{mode} @ {chosen.offered_rps:g}/s")
    ax.set_xscale("log")
    ax.set_xlabel("latency from intended send (ms, log)")
    ax.set_ylabel("percentile")
    ax.set_title("Latency CDF at each mode's knee")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(_save(fig, out_dir / "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, results in runs.items():
        chosen = _chosen(results)
        if chosen is None or not chosen.timeline:
            continue
        ax.plot([t for t, _ in chosen.timeline], [ms for _, ms in chosen.timeline], ".", markersize=2,
                label=f"{mode} @ {chosen.offered_rps:g}/s")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the measured window")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title("Latency over time at each mode's knee")
    ax.grid(alpha=0.3, which="both")
    ax.legend(markerscale=6)
    paths.append(_save(fig, out_dir / "latency_over_time.png"))
    return paths


def _chosen(results: list[OpenLoopResult]) -> OpenLoopResult | None:
    return knee(results) or (max(results, key=lambda r: r.offered_rps) if results else None)


def _save(fig, path: Path) -> Path:  # noqa: ANN001 - matplotlib Figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_summary(rows: list[dict], out_path: Path, *, title: str = "") -> Path:
    """A bar per mode (img/s, from `loadtest.modes.summary_rows`), ONNX Runtime and torch modes in two colours,
    each bar labelled with its ratio to its own engine's raw baseline and to TorchServe: the closed-loop
    comparison as one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("images_per_second")]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(shown) + 1.5))
    names = [f"{r['mode']} (batch {r['batch']})" if "batch" in r else r["mode"] for r in shown]
    values = [r["images_per_second"] for r in shown]
    colours = ["tab:orange" if r["engine"] == "torch" else "tab:blue" for r in shown]
    ax.barh(names[::-1], values[::-1], color=colours[::-1])
    for y, r in enumerate(shown[::-1]):
        notes = []
        if r.get("ratio_to_raw") is not None and "batch" not in r:
            notes.append(f"{r['ratio_to_raw']:.2f}× raw")
        if r.get("vs_torchserve") is not None and r["mode"] != "torchserve":
            notes.append(f"{r['vs_torchserve']:.2f}× TorchServe")
        ax.text(r["images_per_second"], y, f" {r['images_per_second']:.1f}  " + ", ".join(notes), va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("images/s (blue: ONNX Runtime, orange: torch)")
    ax.set_title(title or "Every mode, same model and payload")
    ax.grid(alpha=0.3, axis="x")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out_path)
