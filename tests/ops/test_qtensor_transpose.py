"""QTensor.t() on square-block layouts equals quantizing the transpose (no requantization)."""
import pytest
import torch

import lowbit


@pytest.mark.parametrize("name,block,shape", [
    ("nvfp4", (16, 16), (32, 48)),
    ("fp8_e4m3", (128, 128), (256, 384)),
    ("fp8_e5m2", None, (64, 96)),
])
def test_transpose_equals_quantized_transpose(backend, name, block, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8)).bfloat16()
    q = lowbit.quantize(x, name, block=block, backend=backend)
    qt = q.t()
    ref = lowbit.quantize(x.t().contiguous(), name, block=block, backend=backend)
    assert qt.shape == ref.shape == (shape[1], shape[0])
    assert torch.equal(qt.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(qt.scale.reshape(-1).view(torch.uint8), ref.scale.reshape(-1).view(torch.uint8))
    if ref.global_scale is not None:
        assert torch.equal(qt.global_scale, ref.global_scale)
    assert torch.equal(qt.dequantize(), q.dequantize().t())


def test_transpose_refuses_non_square_blocks():
    q = lowbit.quantize(torch.randn(32, 32), "nvfp4")
    with pytest.raises(ValueError, match="square"):
        q.t()
