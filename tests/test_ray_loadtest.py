"""The open-loop harness: arrivals, HDR percentiles, the knee, and the report's plots (a real local server)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("hdrh")

from loadtest.openloop import OpenLoopResult, knee, open_loop, parse_mix  # noqa: E402


def _result(rate: float, achieved: float, p99: float, errors: int = 0) -> OpenLoopResult:
    lat = {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p99.9": p99 * 1.2, "max": p99 * 1.5, "mean": p99 / 3}
    return OpenLoopResult("m", "poisson", rate, achieved, int(rate * 10), int(achieved * 10), 10.0, lat, {},
                          errors={"DEADLINE_EXCEEDED": errors} if errors else {}, cdf=[(50, p99 / 3), (99, p99)],
                          timeline=[(0.1, p99 / 3), (0.2, p99)])


def test_knee_is_the_last_rate_met():
    runs = [_result(10, 10, 40), _result(20, 19.8, 60), _result(40, 39, 110), _result(80, 50, 900)]  # 80: 62 % answered
    assert knee(runs).offered_rps == 40
    assert knee([_result(10, 10, 40), _result(20, 20, 130)]).offered_rps == 10  # p99 over 3x the lowest
    assert knee([_result(10, 10, 40), _result(20, 20, 50, errors=5)]).offered_rps == 10  # 2.5 % errors
    assert knee([_result(10, 5, 40)]) is None


def test_mix_is_validated():
    assert parse_mix("classify=70,tag=20,extract=10") == {"classify": 70, "tag": 20, "extract": 10}
    with pytest.raises(ValueError, match="unknown RPC"):
        parse_mix("classify=1,detect=2")


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest.report import plot

    runs = {"a": [_result(10, 10, 40), _result(20, 20, 60)], "b": [_result(10, 10, 50), _result(20, 12, 900)]}
    paths = plot(runs, tmp_path)
    assert [p.name for p in paths] == ["throughput_vs_offered.png", "latency_cdf.png", "latency_over_time.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_open_loop_against_a_real_server(server, photos):
    """A short constant-rate run with the three-RPC mix and per-request deadlines against `vision serve`."""
    result = asyncio.run(open_loop(
        server.address, photos["coffee.jpg"], rate=20, duration=2.0, warmup=0.5, arrivals="constant",
        mix={"classify": 7, "tag": 2, "extract": 1}, deadline_s=5.0, seed=1,
    ))
    assert result.sent == 40 and result.ok == 40 and not result.errors
    assert 15 <= result.achieved_rps <= 25
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["p99.9"] <= result.latency_ms["max"]
    assert set(result.latency_ms_by_rpc) == {"classify", "tag", "extract"}
    assert len(result.timeline) == 40 and result.cdf[-1][0] == 100
    tight = asyncio.run(open_loop(server.address, photos["coffee.jpg"], rate=5, duration=1.0, warmup=0.0,
                                  deadline_s=0.0005, arrivals="constant"))
    assert tight.errors.get("DEADLINE_EXCEEDED", 0) == tight.sent and tight.ok == 0


def test_closed_loop_cli_against_a_real_server(server, photos, tmp_path):
    """`python -m loadtest` (docs/benchmarks.md's benchmark) drives Classify with several images per request."""
    import json
    import subprocess
    import sys

    image = tmp_path / "coffee.jpg"
    image.write_bytes(photos["coffee.jpg"])
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--target", server.address, "--image", str(image), "--concurrency", "2",
         "--duration", "1", "--warmup", "0.2", "--images-per-request", "2", "--no-raw", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(out.read_text())["results"]
    assert run["mode"] == "service" and run["requests"] > 0 and run["errors"] == {}
    assert run["images_per_second"] == pytest.approx(run["requests"] * 2 / 1.0)
