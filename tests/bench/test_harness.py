"""bench/harness.py: timer statistics, ratios, CSV schema; and bench_quantize's peers and columns."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_quantize  # noqa: E402
import harness  # noqa: E402


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


def test_machine_limits_are_measured():
    t, gbps = harness.copy_bandwidth(1 << 20, min_runs=2, min_time=0.0)
    assert gbps > 0 and len(t.samples) >= 2
    t, tf = harness.fp32_gemm_throughput(64, min_runs=2, min_time=0.0)
    assert tf > 0


def test_machine_name_is_a_slug():
    name = harness.machine_name()
    assert name and name == harness.slug(name) and name.endswith("c")
    assert harness.slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"


def test_csv_schema_round_trip(tmp_path):
    rows = [dict(machine="m", op="quantize", format="nvfp4", p50_ms=1.23456, speedup_vs_torchao=harness.ABSENT)]
    path = harness.write_csv(tmp_path / "x.csv", bench_quantize.FIELDS, rows)
    back = harness.read_csv(path)
    assert list(back[0].keys()) == bench_quantize.FIELDS
    assert back[0]["p50_ms"] == "1.235" and back[0]["speedup_vs_torchao"] == "absent" and back[0]["gbps"] == ""
    with pytest.raises(ValueError):
        harness.write_csv(tmp_path / "y.csv", bench_quantize.FIELDS, [dict(not_a_column=1)])


def test_bench_columns_cover_the_report():
    for col in ("p20_ms", "p50_ms", "p80_ms", "gbps", "tflops", "ratio_to_limit", "limit_value",
                "torchao_p50_ms", "speedup_vs_torchao", "torch_p50_ms", "speedup_vs_torch"):
        assert col in bench_quantize.FIELDS


def test_peer_status():
    assert bench_quantize.torchao_peer("nvfp4", None, "stochastic", None) == harness.NOT_APPLICABLE
    assert bench_quantize.torchao_peer("fp8_e4m3", None, "nearest", None) in (harness.NOT_APPLICABLE, harness.ABSENT)
    assert bench_quantize.torch_fp8_peer("mxfp4", None, "nearest", None) == harness.NOT_APPLICABLE


@pytest.mark.parametrize("block", [None, "row", (1, 128), (128, 128)])
def test_torch_fp8_peer_does_the_same_work(block):
    """The torch peer computes the same codes as lowbit's FP8 quantize, so the ratio compares like with like."""
    import lowbit

    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    peer = bench_quantize.torch_fp8_peer("fp8_e4m3", block, "nearest", None)(x)()
    q = lowbit.quantize(x, "fp8_e4m3", block=block)
    assert torch.equal(peer.view(torch.uint8), q.data.view(torch.uint8))
