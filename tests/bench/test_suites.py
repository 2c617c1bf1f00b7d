"""The quantize / hadamard / qmatmul / loss suites: peers do the same work as lowbit, and each suite
runs end to end on tiny shapes with one sample per case."""
import pytest
import torch

import lowbit
from lowbit.bench import hadamard, harness, loss, qmatmul, quantize, suite
from lowbit.bench.harness import Limits
from lowbit.bench.suite import Context


@pytest.fixture
def tiny_ctx(tmp_path, monkeypatch):
    monkeypatch.setattr(Context, "timer_kw", property(lambda self: dict(warmup=0, min_runs=1, min_time=0.0)))
    return Context(device="cpu", machine="m", backend=None, shapes=["tiny"], tokens=128, quick=True, out=tmp_path,
                   limits=Limits({"copy_GB/s": 10.0, "fp32_mm_TFLOP/s": 0.1}), console=lambda s: None)


@pytest.mark.parametrize("block", [None, "row", (1, 128), (128, 128)])
def test_torch_fp8_peer_does_the_same_work(block):
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    peer = quantize.torch_fp8_peer("fp8_e4m3", block, "nearest", None)(x)()
    q = lowbit.quantize(x, "fp8_e4m3", block=block)
    assert torch.equal(peer.view(torch.uint8), q.data.view(torch.uint8))


def test_quantize_peer_status():
    assert quantize.torchao_peer("nvfp4", None, "stochastic", None) == harness.NOT_APPLICABLE
    assert quantize.torchao_peer("fp8_e4m3", None, "nearest", None) in (harness.NOT_APPLICABLE, harness.ABSENT)
    assert quantize.torch_fp8_peer("mxfp4", None, "nearest", None) == harness.NOT_APPLICABLE


@pytest.mark.parametrize("b", [16, 64])
def test_hadamard_torch_peer_is_the_same_transform(b):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    signs = hadamard.signs_of(b, 7, "cpu")
    assert set(signs.tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(hadamard.torch_peer(x, b, signs)(), lowbit.hadamard(x, b, seed=7),
                               atol=1e-5, rtol=1e-5)
    assert hadamard.fht_peer(x, b, signs) in (harness.ABSENT, harness.NOT_APPLICABLE)
    assert hadamard.blocks_for(768) == [16, 256] and hadamard.blocks_for(4096) == [16, 4096]


def test_qmatmul_scaled_mm_peer_matches_lowbit_fp8():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    f = qmatmul.scaled_mm_peer("fp8_e4m3", a, b)
    assert qmatmul.scaled_mm_peer("mxfp4", a, b) == harness.NOT_APPLICABLE
    if isinstance(f, str):
        pytest.skip(f"torch._scaled_mm on CPU: {f}")
    ref = lowbit.qmatmul(lowbit.quantize(a, "fp8_e4m3"), lowbit.quantize(b, "fp8_e4m3"))
    torch.testing.assert_close(f(), ref, atol=1e-3, rtol=1e-4)


def test_suites_run_on_tiny_shapes(tiny_ctx):
    from lowbit.bench.shapes import MODELS
    assert [s.name for s in MODELS["tiny"].linears(8)] == ["q_proj", "gate_up_proj", "down_proj"]  # same shapes once
    for mod, n in ((quantize, 2 * len(quantize.configs())), (hadamard, 2 * 2), (qmatmul, 3 * len(qmatmul.FORMATS)),
                   (loss, len(loss.OBJECTIVES))):
        rows = mod.run(tiny_ctx)
        assert len(rows) == n, mod.__name__
        recs = [suite.record(r, mod, tiny_ctx, mod.__name__) for r in rows]
        for rec in recs:
            assert rec["p50_ms"] > 0 and rec["ratio_to_limit"] > 0
            for peer in mod.PEERS:
                v = rec[f"speedup_vs_{peer}"]
                assert isinstance(v, float) or v in (harness.ABSENT, harness.NOT_APPLICABLE) or v.startswith(
                    ("n/a", "skipped")), (peer, v)
    tiny_ctx.tokens = 96  # not a multiple of the 128-row FP8 block: that case is recorded as not run
    skipped = [r for r in quantize.run(tiny_ctx) if r.timing is None]
    assert {r.case for r in skipped} == {"fp8_e4m3 128x128 nearest"} and "not divisible" in skipped[0].note
    loss_rec = suite.record(loss.run(tiny_ctx)[0], loss, tiny_ctx, "loss")
    assert loss_rec["peak_mib"] < loss_rec["peak_unfused_mib"]  # the fused loss never holds the logits
