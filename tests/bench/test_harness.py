"""lowbit.bench.harness: timer statistics, ratios, machine limits, CSV schema, result folders."""
import time
from pathlib import Path

import pytest

from lowbit.bench import harness


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert harness.percentile(xs, 0) == 1.0 and harness.percentile(xs, 100) == 5.0
    assert harness.percentile(xs, 50) == 3.0
    assert harness.percentile(xs, 20) == pytest.approx(1.8)  # position 0.8 between 1 and 2
    assert harness.percentile(xs, 80) == pytest.approx(4.2)
    assert harness.percentile([7.0], 20) == 7.0
    with pytest.raises(ValueError, match="samples"):
        harness.percentile([], 50)
    with pytest.raises(ValueError, match="q"):
        harness.percentile(xs, 101)


def test_timing_statistics_and_units():
    t = harness.Timing("x", [0.004, 0.001, 0.002, 0.003, 0.005])
    assert (t.p20, t.p50, t.p80) == (pytest.approx(0.0018), 0.003, pytest.approx(0.0042))
    assert t.gbps(3e6) == pytest.approx(1.0)  # 3 MB in 3 ms
    assert t.tflops(3e9) == pytest.approx(1.0)  # 3 GFLOP in 3 ms


def test_time_fn_runs_warmup_and_enough_samples():
    calls = []
    t = harness.time_fn(lambda: calls.append(time.sleep(0.002)), "sleep", warmup=2, min_runs=4, min_time=0.01)
    assert len(t.samples) >= 4 and len(calls) >= 2 + len(t.samples)
    assert all(s >= 0.0019 for s in t.samples)  # seconds per call, not per block
    assert t.p20 <= t.p50 <= t.p80
    with pytest.raises(ValueError, match="min_runs"):
        harness.time_fn(lambda: None, min_runs=0)


def test_ratio():
    assert harness.ratio(6.0, 3.0) == 2.0
    assert harness.ratio(None, 3.0) is None and harness.ratio(1.0, None) is None and harness.ratio(1.0, 0) is None
    assert harness.ratio(float("nan"), 1.0) is None


def test_machine_limits_are_measured():
    t, gbps = harness.copy_bandwidth(1 << 20, min_runs=2, min_time=0.0)
    assert gbps > 0 and len(t.samples) >= 2
    t, tf = harness.fp32_gemm_throughput(64, min_runs=2, min_time=0.0)
    assert tf > 0
    lim = harness.Limits.measure("cpu", quick=True, warmup=0, min_runs=1, min_time=0.0)
    assert set(lim.values) == {"copy_GB/s", "fp32_mm_TFLOP/s"} and all(v > 0 for v in lim.values.values())
    assert lim.values["copy_GB/s"] == lim.timings["copy_GB/s"].gbps(2 * (64 << 20))
    assert lim.get(None) is None and lim.get("peak_fp8_TFLOP/s") is None


def test_datasheet_lookup():
    assert harness.datasheet("NVIDIA H100 80GB HBM3")["peak_bf16_TFLOP/s"] == 989.0
    assert harness.datasheet("NVIDIA H100 PCIe")["peak_mem_GB/s"] == 2000.0
    assert harness.datasheet("NVIDIA H200")["peak_mem_GB/s"] == 4800.0
    assert harness.datasheet("Some Other GPU") == {}


def test_machine_name_is_a_slug():
    name = harness.machine_name()
    assert name and name == harness.slug(name) and name.endswith("c")
    assert harness.slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"


def test_results_dir(tmp_path, monkeypatch):
    assert harness.results_dir("m", tmp_path / "x") == tmp_path / "x" and (tmp_path / "x").is_dir()
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    assert harness.repo_root() == root
    monkeypatch.chdir(tmp_path)  # outside any checkout: the package's own checkout is found
    assert harness.repo_root() == root


def test_csv_round_trip_and_schema(tmp_path):
    fields = ["machine", "p50_ms", "gbps", "speedup_vs_torchao"]
    rows = [dict(machine="m", p50_ms=1.23456, speedup_vs_torchao=harness.ABSENT)]
    path = harness.write_csv(tmp_path / "x.csv", fields, rows)
    back = harness.read_csv(path)
    assert list(back[0].keys()) == fields
    assert back[0]["p50_ms"] == "1.235" and back[0]["speedup_vs_torchao"] == "absent" and back[0]["gbps"] == ""
    with pytest.raises(ValueError, match="not columns"):
        harness.write_csv(tmp_path / "y.csv", fields, [dict(not_a_column=1)])


def test_bar_chart_writes_png(tmp_path):
    note = harness.bar_chart(tmp_path / "c.png", "t", ["a", "b"], {"s": [0.5, None]}, "x", hline=1.0)
    assert note == "wrote c.png" and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
