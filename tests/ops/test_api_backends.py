"""Backend selection: `backend=` keyword, `use_backend` context, the registry report."""
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import backends


def test_explicit_backend_and_context_agree():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    a = lowbit.quantize(x, "nvfp4", backend="ref")
    with lowbit.use_backend("ref"):
        assert backends.resolve("quantize", "cpu") == "ref"
        b = lowbit.quantize(x, "nvfp4")
        c = lowbit.quantize(x, "nvfp4", backend="ref")
    assert torch.equal(a.data, b.data) and torch.equal(a.data, c.data)


def test_context_restores_and_nests():
    before = backends.resolve("quantize", "cpu")
    with lowbit.use_backend("ref"):
        with lowbit.use_backend(None):
            assert backends.resolve("quantize", "cpu") == before
        assert backends.resolve("quantize", "cpu") == "ref"
    assert backends.resolve("quantize", "cpu") == before


def test_unavailable_backend_is_an_error_not_a_silent_fallback():
    reason = backends.why_unavailable("cuda", "quantize", "cpu")
    assert reason  # a CPU tensor is never served by the CUDA backend
    with pytest.raises(RuntimeError, match="cuda"):
        lowbit.quantize(torch.randn(4, 32), "mxfp8", backend="cuda")


def test_default_backend_is_native_when_built():
    chosen = backends.resolve("quantize", "cpu")
    if backends.why_unavailable("cpu", "quantize", "cpu") is None:
        assert chosen == "cpu"
    else:
        assert chosen == "ref"


def test_env_report_names_every_op():
    out = subprocess.run([sys.executable, "-m", "lowbit.env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for op in backends.OPS:
        assert f"{op}" in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if "->" in ln]
    assert len(lines) >= len(backends.OPS)
    for ln in lines:
        assert ln.split("->")[1].strip() in backends.NAMES
