"""quantize_dual: the rowwise and colwise quantizations of x [T, K] from two reads of x, no transpose.

Each program owns a [TR, TK] tile of x (TR tokens, TK features), loaded once per pass, and keeps
two values per element: `vr` (x, or its Hadamard transform along K) for the rowwise layout and
`vc` (x, or its transform along the tokens) for the colwise one; both transforms run in registers,
in the ref order, on the zero-filled tile (so tokens past T are the zero padding of the definition).

Pass 1 (`_amax_kernel`) reduces |vr| and |vc| over the parts of the tile that share a scale block
and folds them into both layouts' block amaxes (and NVFP4 tensor amaxes) with an integer atomic
max: blocks along the tokens span many tiles (a colwise 1 x 16 block is 16 tile rows; a tensor or
"row" block spans the whole token dim), so no single program sees a whole block. Then
`_quantize._scale_kernel` turns each layout's amaxes into scales. Pass 2 (`_encode_kernel`)
reloads the tile, recomputes vr / vc, and writes the rowwise codes at [t, k] and the colwise codes
at [k, t] (the tile transposed in registers), with their own factors and Philox indices
(t * K + k and k * T'' + t, T'' the colwise padded token count).

Memory traffic per element of x (s bytes: 2 for bf16, 4 for fp32), codes and scales aside:
fused, 2 s (two reads). Two `quantize` calls: the rowwise one reads x twice (2 s); the colwise one
materializes the padded transpose (2 s) and reads it twice (2 s): 6 s in all. With the colwise
Hadamard transform of the NVFP4 recipe, the transform reads the transpose and writes fp32, which
both passes read: 5 s + 12 bytes (22 for bf16, against 4 fused).

Shapes the tile plan cannot cover (a block side that is neither a power of two nor the whole
dim, a Hadamard block over MAX_H, Hadamard blocks on both layouts whose product exceeds TILE)
run the definition: the `_quantize` kernels once per layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ref.quantize_dual import two_layouts
from . import _quantize
from ._hadamard import norm as hadamard_norm
from ._rounding import ELEMENT_CODES, as_kernel_input, fdiv_rn, hadamard_negative, load_fp32, random_bits, round_to_code

TILE = 2048  # elements per program, as the single-layout encode kernel
WARPS = 8  # two layouts per element: 4 warps spill registers on sm_90 (NVFP4 with SR on both sides)
MAX_SIDE = 64  # tile side without a Hadamard block asking for more
MAX_H = 128


@triton.jit
def _rht_axis0(y, seed, norm, H: tl.constexpr, LOG_H: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """Random Hadamard transform of each aligned run of H entries along axis 0 of an [A, B] tile.

    The butterfly stages h = 1 .. H/2 pair entries within aligned runs of 2h, so running them over
    the whole axis transforms every run of H separately; signs s_j with j the position in the run.
    """
    y = y * tl.where(hadamard_negative(seed, tl.arange(0, A) % H), -1.0, 1.0)[:, None]
    for stage in tl.static_range(LOG_H):  # h = 2^stage pairs y[j] with y[j + h]
        t = tl.permute(tl.reshape(y, (A >> (stage + 1), 2, 1 << stage, B)), (0, 2, 3, 1))
        a, c = tl.split(t)
        t = tl.permute(tl.join(a + c, a - c), (0, 3, 1, 2))
        y = tl.reshape(t, (A, B))
    return y * norm


@triton.jit
def _load_tile(x_ptr, r0, c0, T, K, seed_r, seed_c, norm_r, norm_c, HR: tl.constexpr, LOG_HR: tl.constexpr,
               HC: tl.constexpr, LOG_HC: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr, TK: tl.constexpr):
    """(vr, vc): the tile as each layout quantizes it (both from one load)."""
    rows = r0 + tl.arange(0, TR)
    cols = c0 + tl.arange(0, TK)
    x = load_fp32(x_ptr, rows[:, None] * K + cols[None, :], (rows < T)[:, None] & (cols < K)[None, :], BF16)
    vr = x
    if HR > 0:
        vr = tl.trans(_rht_axis0(tl.trans(x), seed_r, norm_r, HR, LOG_HR, TK, TR))
    vc = x
    if HC > 0:
        vc = _rht_axis0(x, seed_c, norm_c, HC, LOG_HC, TR, TK)
    return vr, vc


@triton.jit
def _fold_amax(v, amax_ptr, r0, c0, dr, dc, sr, sc, ext_r, ext_c, n_blocks, GR: tl.constexpr, GC: tl.constexpr,
               A: tl.constexpr, B: tl.constexpr, TOTAL: tl.constexpr):
    """Fold max |v| of each GR x GC group of the tile into its block (r // dr) * sr + (c // dc) * sc.

    The host picks GR, GC so that a group never straddles two blocks; entries past the layout's
    extent are zeros (padding), so they can share a group with real ones.
    """
    a = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # for non-negative floats, integer order is value order
    m = tl.max(tl.max(tl.reshape(a, (A // GR, GR, B // GC, GC)), axis=3), axis=1)
    gr = r0 + tl.arange(0, A // GR) * GR
    gc = c0 + tl.arange(0, B // GC) * GC
    mask = (gr < ext_r)[:, None] & (gc < ext_c)[None, :]
    tl.atomic_max(amax_ptr + (gr // dr)[:, None] * sr + (gc // dc)[None, :] * sc, m, mask=mask)
    if TOTAL:
        tl.atomic_max(amax_ptr + n_blocks, tl.max(tl.max(m, axis=1), axis=0))


@triton.jit
def _tile_origin(K, TR: tl.constexpr, TK: tl.constexpr):
    """(first row, first column) of this program's tile: the tiles are flattened onto grid axis 0,
    whose limit is 2^31 - 1 (axes 1 and 2 stop at 65535)."""
    n_cols = tl.cdiv(K, TK)
    p = tl.program_id(0).to(tl.int64)
    return (p // n_cols) * TR, (p % n_cols) * TK


@triton.jit
def _amax_kernel(x_ptr, amax_r, amax_c, T, K, Tr, Tc, br, bk, nbk_r, cbr, cbk, nbk_c, n_r, n_c, seed_r, seed_c,
                 norm_r, norm_c, GR_R: tl.constexpr, GK_R: tl.constexpr, GR_C: tl.constexpr, GK_C: tl.constexpr,
                 HR: tl.constexpr, LOG_HR: tl.constexpr, HC: tl.constexpr, LOG_HC: tl.constexpr,
                 TOTAL_R: tl.constexpr, TOTAL_C: tl.constexpr, BF16: tl.constexpr, TR: tl.constexpr,
                 TK: tl.constexpr):
    r0, c0 = _tile_origin(K, TR, TK)
    vr, vc = _load_tile(x_ptr, r0, c0, T, K, seed_r, seed_c, norm_r, norm_c, HR, LOG_HR, HC, LOG_HC, BF16, TR, TK)
    # rowwise block of (t, k): (t // br) * nbk_r + k // bk; colwise block: (k // cbr) * nbk_c + t // cbk
    _fold_amax(vr, amax_r, r0, c0, br, bk, nbk_r, 1, Tr, K, n_r, GR_R, GK_R, TR, TK, TOTAL_R)
    _fold_amax(vc, amax_c, r0, c0, cbk, cbr, 1, nbk_c, Tc, K, n_c, GR_C, GK_C, TR, TK, TOTAL_C)


@triton.jit
def _encode(v, rr, c0, R, C, dr, dc, nbc, factor_ptr, gs_ptr, out_ptr, seed, KIND: tl.constexpr,
            STOCHASTIC: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
            INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr, PACKED: tl.constexpr,
            A: tl.constexpr, B: tl.constexpr):
    """Codes of an [A, B] tile of one layout's [R, C] tensor (rows rr, columns c0 ..): as `_quantize._encode_kernel`."""
    cc = c0 + tl.arange(0, B)
    mask = (rr < R)[:, None] & (cc < C)[None, :]
    f = tl.load(factor_ptr + (rr // dr)[:, None] * nbc + (cc // dc)[None, :], mask=mask, other=1.0)
    if KIND == 0:
        scaled = fdiv_rn(v, f)
    elif KIND == 1:
        scaled = v * f
    else:
        scaled = fdiv_rn(v * tl.load(gs_ptr), f)
    rbits = tl.zeros([A, B], dtype=tl.uint32)
    if STOCHASTIC:
        rbits = random_bits(seed, rr[:, None] * C + cc[None, :])
    code = round_to_code(scaled, rbits, STOCHASTIC, MBITS, BIAS, MAX_CODE, INF_CODE, NAN_CODE, SIGN_SHIFT)
    if PACKED:
        lo, hi = tl.split(tl.reshape(code, (A, B // 2, 2)))
        pc = c0 // 2 + tl.arange(0, B // 2)
        pmask = (rr < R)[:, None] & (pc < C // 2)[None, :]
        tl.store(out_ptr + rr[:, None] * (C // 2) + pc[None, :], (lo | (hi << 4)).to(tl.uint8), mask=pmask)
    else:
        tl.store(out_ptr + rr[:, None] * C + cc[None, :], code.to(tl.uint8), mask=mask)


@triton.jit
def _encode_kernel(x_ptr, f_r, f_c, gs_r, gs_c, out_r, out_c, T, K, Tr, Tc, br, bk, nbk_r, cbr, cbk, nbk_c,
                   seed_r, seed_c, norm_r, norm_c, HR: tl.constexpr, LOG_HR: tl.constexpr, HC: tl.constexpr,
                   LOG_HC: tl.constexpr, KIND_R: tl.constexpr, SR_R: tl.constexpr, MBITS_R: tl.constexpr,
                   BIAS_R: tl.constexpr, MAX_R: tl.constexpr, INF_R: tl.constexpr, NAN_R: tl.constexpr,
                   SHIFT_R: tl.constexpr, PACKED_R: tl.constexpr, KIND_C: tl.constexpr, SR_C: tl.constexpr,
                   MBITS_C: tl.constexpr, BIAS_C: tl.constexpr, MAX_C: tl.constexpr, INF_C: tl.constexpr,
                   NAN_C: tl.constexpr, SHIFT_C: tl.constexpr, PACKED_C: tl.constexpr, BF16: tl.constexpr,
                   TR: tl.constexpr, TK: tl.constexpr):
    r0, c0 = _tile_origin(K, TR, TK)
    vr, vc = _load_tile(x_ptr, r0, c0, T, K, seed_r, seed_c, norm_r, norm_c, HR, LOG_HR, HC, LOG_HC, BF16, TR, TK)
    _encode(vr, r0 + tl.arange(0, TR), c0, Tr, K, br, bk, nbk_r, f_r, gs_r, out_r, seed_r, KIND_R, SR_R, MBITS_R,
            BIAS_R, MAX_R, INF_R, NAN_R, SHIFT_R, PACKED_R, TR, TK)
    # the colwise tensor is [K, Tc]: the tile transposed, rows k, columns t
    _encode(tl.trans(vc), c0 + tl.arange(0, TK), r0, K, Tc, cbr, cbk, nbk_c, f_c, gs_c, out_c, seed_c, KIND_C, SR_C,
            MBITS_C, BIAS_C, MAX_C, INF_C, NAN_C, SHIFT_C, PACKED_C, TK, TR)


def _group(d: int, extent: int, side: int) -> int | None:
    """Group size along one tile side that stays inside one block of size d, or None if none does."""
    if d >= extent:  # one block along this dim (tensor-wise, "row")
        return side
    return min(d, side) if d & (d - 1) == 0 else None


def plan(T: int, K: int, row, col) -> tuple[int, int] | None:
    """(TR, TK) for the fused kernels, or None where the tile rules above cannot cover the layouts."""
    hr, hc = row.hadamard, col.hadamard
    if hr > MAX_H or hc > MAX_H:
        return None
    tk = max(min(triton.next_power_of_2(K), MAX_SIDE), hr, 2)
    tr = max(min(triton.next_power_of_2(max(row.rows, col.rows)), max(TILE // tk, 2)), hc, 2)
    tk = max(min(tk, TILE // tr), hr, 2)  # a tall Hadamard block narrows the tile
    if tr * tk > TILE:  # both sides held up by Hadamard blocks: more registers than a program has
        return None
    groups = (_group(row.block[0], row.rows, tr), _group(row.block[1], K, tk),
              _group(col.block[1], col.rows, tr), _group(col.block[0], K, tk))
    return None if None in groups else (tr, tk)


def _log2(n: int) -> int:
    return max(n.bit_length() - 1, 0)


def launch_plan(rows: int, K: int, tr: int, tk: int) -> tuple[int]:
    """The grid of both passes: every [tr, tk] tile of the (padded) [rows, K] source, on axis 0."""
    return (triton.cdiv(rows, tr) * triton.cdiv(K, tk),)


def quantize_dual(x: torch.Tensor, row, col) -> tuple[torch.Tensor, ...]:
    T, K = x.shape
    tiles = plan(T, K, row, col) if x.numel() else None
    if tiles is None:
        return two_layouts(_quantize.quantize, x, row, col)
    tr, tk = tiles
    dev = x.device
    xk, bf16 = as_kernel_input(x)
    Tr, Tc = row.rows, col.rows
    (br, bk), (cbr, cbk) = row.block, col.block
    nbk_r, nbk_c = K // bk, Tc // cbk
    n_r, n_c = Tr // br * nbk_r, K // cbr * nbk_c
    total_r, total_c = row.fmt.kind == "nvfp4", col.fmt.kind == "nvfp4"
    amax_r = torch.zeros(n_r + total_r, dtype=torch.int32, device=dev)
    amax_c = torch.zeros(n_c + total_c, dtype=torch.int32, device=dev)
    grid = launch_plan(max(Tr, Tc), K, tr, tk)
    hmeta = (row.hadamard, _log2(row.hadamard), col.hadamard, _log2(col.hadamard))
    norms = (hadamard_norm(row.hadamard) if row.hadamard else 1.0, hadamard_norm(col.hadamard) if col.hadamard else 1.0)
    _amax_kernel[grid](xk, amax_r, amax_c, T, K, Tr, Tc, br, bk, nbk_r, cbr, cbk, nbk_c, n_r, n_c, row.seed, col.seed,
                       *norms, _group(br, Tr, tr), _group(bk, K, tk), _group(cbk, Tc, tr), _group(cbr, K, tk),
                       *hmeta, total_r, total_c, bf16, tr, tk, num_warps=WARPS, enable_fp_fusion=False)
    outs = []
    for spec, amax, n, shape in ((row, amax_r, n_r, (Tr // br, nbk_r)), (col, amax_c, n_c, (K // cbr, nbk_c))):
        kind = _quantize.KIND[spec.fmt.kind]
        scale = torch.empty(shape, dtype=torch.float32 if kind == 0 else torch.uint8, device=dev)
        factor = torch.empty(n, dtype=torch.float32, device=dev)
        gs = torch.ones((), dtype=torch.float32, device=dev)
        _quantize._scale_kernel[(triton.cdiv(n, _quantize.SCALE_LANES),)](
            amax, amax, scale, factor, gs, n, kind, _quantize.SCALE_MODE[spec.scale_mode], spec.fmt.elem.max,
            spec.fmt.elem.emax, False, _quantize.SCALE_LANES, enable_fp_fusion=False)
        outs.append((scale, factor, gs))
    (scale_r, f_r, gs_r), (scale_c, f_c, gs_c) = outs
    data_r = torch.empty((Tr, K // 2 if row.fmt.packed else K), dtype=torch.uint8, device=dev)
    data_c = torch.empty((K, Tc // 2 if col.fmt.packed else Tc), dtype=torch.uint8, device=dev)
    meta = []
    for spec in (row, col):
        meta += [_quantize.KIND[spec.fmt.kind], spec.rounding == "stochastic", *ELEMENT_CODES[spec.fmt.elem.name],
                 spec.fmt.packed]
    _encode_kernel[grid](xk, f_r, f_c, gs_r, gs_c, data_r, data_c, T, K, Tr, Tc, br, bk, nbk_r, cbr, cbk, nbk_c,
                         row.seed, col.seed, *norms, *hmeta, *meta, bf16, tr, tk, num_warps=WARPS,
                         enable_fp_fusion=False)
    result = []
    for spec, data, scale, gs in ((row, data_r, scale_r, gs_r), (col, data_c, scale_c, gs_c)):
        if not spec.fmt.packed:
            data = data.view(spec.fmt.elem.torch_dtype)
        if spec.fmt.kind == "nvfp4":
            scale = scale.view(torch.float8_e4m3fn)
        result += [data, scale, gs]
    return tuple(result)
