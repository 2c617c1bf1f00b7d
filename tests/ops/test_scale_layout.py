"""Scale layouts for the block-scaled GEMMs: against the explicit index formula, by round trip,
and against torchao's `to_blocked` where torchao is installed."""
import pytest
import torch

from lowbit.backends import scale_layout as L

SHAPES = [(1, 1), (1, 4), (5, 3), (32, 4), (127, 5), (128, 4), (129, 8), (256, 2), (300, 9), (64, 33)]


def _formula(r: int, c: int, cols: int) -> int:
    """The docstring formula, written out for one element."""
    col_tiles = -(-cols // 4)
    return ((r // 128) * col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_swizzle_matches_the_index_formula_element_by_element(rows, cols):
    s = torch.arange(1, rows * cols + 1, dtype=torch.int32).reshape(rows, cols)
    flat = L.swizzle(s)
    assert flat.dim() == 1 and flat.numel() == L.swizzled_numel(rows, cols)
    assert flat.numel() == -(-rows // 128) * 128 * -(-cols // 4) * 4
    seen = torch.zeros(flat.numel(), dtype=torch.bool)
    for r in range(rows):
        for c in range(cols):
            i = _formula(r, c, cols)
            assert int(flat[i]) == int(s[r, c]), (r, c, i)
            seen[i] = True
    assert torch.equal(L.swizzle_index(rows, cols), torch.tensor(
        [[_formula(r, c, cols) for c in range(cols)] for r in range(rows)]))
    assert bool((flat[~seen] == 0).all())  # padding is zero


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.float32])
def test_round_trip_keeps_dtype_and_values(rows, cols, dtype):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    raw = torch.randint(0, 127, (rows, cols), generator=g, dtype=torch.uint8)
    s = raw.to(torch.float32) if dtype == torch.float32 else raw.view(dtype)
    flat = L.swizzle(s)
    assert flat.dtype == dtype and flat.is_contiguous()
    back = L.unswizzle(flat, rows, cols)
    assert back.dtype == dtype and back.shape == (rows, cols)
    as_bits = (lambda t: t) if dtype == torch.float32 else (lambda t: t.view(torch.uint8))
    assert torch.equal(as_bits(back), as_bits(s))


def test_unswizzle_rejects_a_wrong_size():
    with pytest.raises(ValueError, match="512 elements"):
        L.unswizzle(torch.zeros(100, dtype=torch.uint8), 3, 2)
    with pytest.raises(ValueError, match="rows, cols"):
        L.swizzle(torch.zeros(4, dtype=torch.uint8))


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_swizzle_matches_torchao_to_blocked(rows, cols):
    utils = pytest.importorskip("torchao.prototype.mx_formats.utils")
    g = torch.Generator().manual_seed(rows + 7 * cols)
    s = torch.randint(0, 255, (rows, cols), generator=g, dtype=torch.uint8)
    assert torch.equal(L.swizzle(s), utils.to_blocked(s))
    if hasattr(utils, "from_blocked"):
        assert torch.equal(utils.from_blocked(L.swizzle(s), rows, cols), s)


def test_expand_rows_turns_tiles_into_rows():
    s = torch.arange(6.0).reshape(2, 3)
    e = L.expand_rows(s, 16)
    assert e.shape == (32, 3)
    for r in range(32):
        assert torch.equal(e[r], s[r // 16])
    assert L.expand_rows(s, 1) is s


@pytest.mark.parametrize("R,nk", [(1, 1), (16, 3), (256, 4), (48, 1)])
def test_outer_major_is_the_1x128_layout(R, nk):
    s = torch.randn(R, nk)
    o = L.outer_major(s)
    assert torch.equal(o, s) and o.shape == (R, nk)
    # PyTorch's BlockWise1x128 check: stride(0) == 1 and stride(1) == R (or a single column)
    assert o.stride(0) == 1 and (o.stride(1) == R or nk == 1)


@pytest.mark.parametrize("nr,nk", [(1, 1), (2, 3), (4, 4), (3, 9)])
def test_tiles_128x128_is_the_padded_transposed_layout(nr, nk):
    s = torch.randn(nr, nk)
    t = L.tiles_128x128(s)
    L4 = -(-nk // 4) * 4
    assert t.shape == (L4, nr) and t.dtype == s.dtype
    # PyTorch's BlockWise128x128 check: shape [round_up(K/128, 4), N/128], strides (1, L4)
    assert t.stride(0) == 1 and (t.stride(1) == L4 or nr == 1)
    for i in range(nr):
        for j in range(L4):
            assert float(t[j, i]) == (float(s[i, j]) if j < nk else 0.0)
