"""Public op surface: quantize, quantize_dual, dequantize, cast / stochastic_round, hadamard, qmatmul.

This layer checks arguments (every bad input is a ValueError/TypeError naming the argument),
moves the quantization axis last, flattens to the 2-D `[R, K]` view backends work on, and
calls the `lowbit::*` custom ops (so `torch.compile` traces them). The numerics are defined in
the `lowbit.backends.ref` package (the executable spec).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _ops, backends
from .formats import ELEMENT_OF_DTYPE, FORMATS, INT4_TOPK, Format, get_format
from .qtensor import QTensor

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ROUNDINGS = ("nearest", "stochastic")
HADAMARD_MIN, HADAMARD_MAX = 16, 32768
SCALE_MODES = {"fp8": ("exact", "floor", "rceil"), "mx": ("floor", "rceil"), "nvfp4": ("exact",), "int4": ("exact",)}


def _check_float(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_INPUTS:
        raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, float16, float64), got {x.dtype}")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")


def _check_seed(seed, allow_none: bool = False) -> int:
    if seed is None and allow_none:
        return -1
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2^63), got {seed!r}")
    return seed


def _norm_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an int in [{-ndim}, {ndim}) for a {ndim}-D tensor, got {axis!r}")
    return axis % ndim


def _check_hadamard_block(block, K: int, name: str = "hadamard") -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < HADAMARD_MIN or block > HADAMARD_MAX \
            or block & (block - 1):
        raise ValueError(f"{name}: expected a power of two in [{HADAMARD_MIN}, {HADAMARD_MAX}], got {block!r}")
    if block > K or K % block:
        raise ValueError(f"{name}: block {block} must divide the transformed dimension, which has size {K}")
    return block


def _to_2d(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """[..., K at axis, ...] -> contiguous [R, K] with K last, and `inner` (see ref.element_index)."""
    inner = math.prod(x.shape[axis + 1:])
    xm = x.movedim(axis, -1)
    K = xm.shape[-1]
    R = xm.numel() // K if K else math.prod(xm.shape[:-1])
    return xm.reshape(R, K).contiguous(), inner


def _normalize_block(fmt: Format, block, R: int, K: int) -> tuple[int, int]:
    """The (br, bk) tile over the [R, K] view; checks divisibility."""
    if fmt.kind == "fp8":
        if block is None:
            br, bk = R, K
        elif block == "row":
            br, bk = 1, K
        elif isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block) \
                and (block[0] == 1 or block[0] == block[1]):
            br, bk = block
        else:
            raise ValueError(f"block: {fmt.name} accepts None (tensor-wise), 'row', (1, n) or (n, n), got {block!r}")
    elif fmt.kind == "int4":
        block = fmt.block if block is None else block
        least = INT4_TOPK if fmt.elem.signed else 1  # int4_act keeps INT4_TOPK values of every group
        if not (isinstance(block, (tuple, list)) and len(block) == 2 and block[0] == 1 and isinstance(block[1], int)
                and not isinstance(block[1], bool) and block[1] >= least):
            raise ValueError(f"block: {fmt.name} accepts (1, g), groups of g >= {least} along the quantized dim, "
                             f"got {block!r}")
        br, bk = block
    else:
        allowed = [fmt.block] + ([(16, 16)] if fmt.kind == "nvfp4" else [])
        if block is None:
            block = fmt.block
        if not isinstance(block, (tuple, list)) or tuple(block) not in allowed:
            raise ValueError(f"block: {fmt.name} accepts {' or '.join(map(str, allowed))}, got {block!r}")
        br, bk = block
    if bk and K % bk:
        raise ValueError(f"block: the quantized dimension has size {K}, not divisible by the block size {bk} ({fmt.name})")
    if br and R % br:
        raise ValueError(f"block: the other dimensions hold {R} rows, not divisible by the block height {br} ({fmt.name})")
    return br, bk


def _check_global_amax(amax: torch.Tensor, x: torch.Tensor) -> None:
    """check=True: a given amax must be finite and cover the data (else blocks saturate silently)."""
    value = float(amax)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"global_amax: expected a finite amax >= 0, got {value} (check=True)")
    data_amax = float(x.detach().abs().amax()) if x.numel() else 0.0
    if value < data_amax:
        raise ValueError(f"global_amax: {value:g} is below the data's amax {data_amax:g}, so blocks would saturate "
                         "(check=True); pass an amax that covers x, e.g. x.abs().amax()")


def quantize(x: torch.Tensor, fmt, *, block=None, axis: int = -1, rounding: str = "nearest", seed: int = 0,
             scale_mode: str | None = None, global_amax=None, hadamard: int | None = None,
             backend: str | None = None, check: bool = False) -> QTensor:
    """Quantize `x` along `axis` into `fmt` (see `lowbit.backends.ref` for the exact rules).

    block: FP8: None (tensor-wise), "row", (1, 128) or (128, 128) (any (1, n) / (n, n) that divides);
           MX: (1, 32); NVFP4: (1, 16) (default) or (16, 16); INT4: (1, g), groups of g along `axis` (256 default).
    scale_mode: MX "floor" (default, OCP) or "rceil"; FP8 "exact" (default) or a power of two, "floor" / "rceil".
    global_amax: NVFP4 only: replaces amax(x) in the per-tensor scale (e.g. a delayed or all-reduced amax);
           a Python number must be finite and > 0, a tensor >= 0 (a negative one is refused on the CPU;
           on a GPU, where reading it would wait for the device, it gives NaN scales).
    hadamard: apply the random Hadamard transform of this block along `axis` first (signs from `seed`).
    check: raise on NaN/Inf in `x` instead of encoding them as NaN scales, and on a `global_amax` that is
           NaN/Inf or below amax(x) (reading a tensor amax back costs a host sync, so only here).
    """
    _check_float(x)
    fmt = get_format(fmt)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a 0-d tensor")
    axis = _norm_axis(axis, x.dim())
    _check_rounding(rounding)
    seed = _check_seed(seed)
    if scale_mode is None:
        scale_mode = SCALE_MODES[fmt.kind][0]
    if scale_mode not in SCALE_MODES[fmt.kind]:
        raise ValueError(f"scale_mode: {fmt.name} accepts {SCALE_MODES[fmt.kind]}, got {scale_mode!r}")
    if global_amax is not None:
        if fmt.kind != "nvfp4":
            raise ValueError(f"global_amax: only NVFP4 has a per-tensor amax; got fmt={fmt.name}")
        given = global_amax  # a Python number is checked on the host for free; a tensor only under check=True
        if isinstance(given, numbers.Real) and not (math.isfinite(given) and given > 0):
            raise ValueError(f"global_amax: expected a finite amax > 0, got {given!r}")
        global_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(())
        if check:
            _check_global_amax(global_amax, x)
        elif global_amax.device.type == "cpu":  # read where that is free (a traced check would break the graph)
            if not torch.compiler.is_compiling() and bool(global_amax < 0):
                raise ValueError(f"global_amax: expected a non-negative amax, got {float(global_amax)}")
        else:  # reading it would wait for the device: a negative amax gives NaN scales, never wrong values
            global_amax = torch.where(global_amax < 0, float("nan"), global_amax)
    if check and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf (check=True)")
    K = x.shape[axis]
    if hadamard is not None and fmt.kind == "int4":
        raise ValueError(f"hadamard: {fmt.name} has no Hadamard transform (Stable-SPAM's INT4 uses none)")
    if hadamard is not None:
        hadamard = _check_hadamard_block(hadamard, K)
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    x2, inner = _to_2d(x, axis)
    R = x2.shape[0]
    br, bk = _normalize_block(fmt, block, R, K)
    tensorwise = fmt.kind == "fp8" and block is None
    moved = x.movedim(axis, -1).shape
    data_shape = moved[:-1] + (K // 2 if fmt.packed else K,)
    if fmt.packed and K % 2:
        raise ValueError(f"x: FP4 packs two elements per byte, so the quantized dimension must be even, got {K}")
    if x.numel() == 0:
        return _empty_qtensor(x, fmt, data_shape, axis, (br, bk), R, K, tensorwise)
    name = backends.requested(backend)
    data, scale, gs = _ops.quantize(x2, fmt.name, [br, bk], rounding, seed, scale_mode, global_amax,
                                    hadamard or 0, inner, name)
    if tensorwise:
        scale = scale.reshape(())
    return QTensor(data.reshape(data_shape), scale, gs if fmt.kind == "nvfp4" else None, fmt, x.shape, axis, (br, bk))


def _empty_qtensor(x, fmt, data_shape, axis, block, R, K, tensorwise):
    data = torch.empty(data_shape, dtype=fmt.data_dtype, device=x.device)
    br, bk = block
    nr, nk = (R // br if br else 0), (K // bk if bk else 0)
    zero_scale = {"fp8": 1.0, "mx": 0, "nvfp4": 2.0**-6, "int4": 0.0}[fmt.kind]
    record = (fmt.scale_fields,) if fmt.scale_fields else ()
    scale = torch.full(() if tensorwise else (nr, nk) + record, zero_scale, dtype=torch.float32, device=x.device)
    scale = scale.to(fmt.scale_dtype)
    gs = torch.ones((), dtype=torch.float32, device=x.device) if fmt.kind == "nvfp4" else None
    return QTensor(data, scale, gs, fmt, x.shape, axis, block)


class QuantizeSpec(NamedTuple):
    """One layout of `quantize_dual`: `quantize`'s arguments, plus `pad`, a multiple that x's
    rows (dim 0, the tokens) are zero-padded to before this layout is quantized."""

    fmt: object
    block: object = None
    rounding: str = "nearest"
    seed: int = 0
    scale_mode: str | None = None
    hadamard: int | None = None
    pad: int = 1


def _layout(spec, name: str, T: int, K: int, transposed: bool):
    """(spec, LayoutSpec, fp8 tensor-wise?) for one layout of `quantize_dual`, checked as `quantize` checks."""
    if isinstance(spec, dict):
        spec = QuantizeSpec(**spec)
    if not isinstance(spec, QuantizeSpec):
        raise TypeError(f"{name}: expected a lowbit.QuantizeSpec, got {type(spec).__name__}")
    try:
        fmt = get_format(spec.fmt)
        if fmt.kind == "int4":
            raise ValueError(f"fmt: {fmt.name} is quantized along one dim only; use lowbit.quantize")
        _check_rounding(spec.rounding)
        seed = _check_seed(spec.seed)
        if isinstance(spec.pad, bool) or not isinstance(spec.pad, int) or spec.pad < 1:
            raise ValueError(f"pad: expected a positive int, got {spec.pad!r}")
        rows = -(-T // spec.pad) * spec.pad
        R, Kq = (K, rows) if transposed else (rows, K)
        scale_mode = SCALE_MODES[fmt.kind][0] if spec.scale_mode is None else spec.scale_mode
        if scale_mode not in SCALE_MODES[fmt.kind]:
            raise ValueError(f"scale_mode: {fmt.name} accepts {SCALE_MODES[fmt.kind]}, got {scale_mode!r}")
        h = 0 if spec.hadamard is None else _check_hadamard_block(spec.hadamard, Kq)
        block = _normalize_block(fmt, spec.block, R, Kq)
        if fmt.packed and Kq % 2:
            raise ValueError(f"x: FP4 packs two elements per byte, so the quantized dimension must be even, got {Kq}")
    except ValueError as e:
        raise ValueError(f"{name}.{e}") from None
    tensorwise = fmt.kind == "fp8" and spec.block is None
    return spec, _ops.LayoutSpec(fmt, block, spec.rounding, seed, scale_mode, h, rows), tensorwise


def quantize_dual(x: torch.Tensor, rowwise: QuantizeSpec, colwise: QuantizeSpec, *, backend: str | None = None,
                  check: bool = False) -> tuple[QTensor, QTensor]:
    """Both GEMM layouts of a 2-D x [T, K] (T tokens) in one op (Triton: two reads of x, no transpose).

    Exactly `(quantize(pad_rows(x, rowwise.pad), ...rowwise), quantize(pad_rows(x, colwise.pad).T, ...colwise))`,
    each quantized along its last dim: the first [T', K] along K, the second [K, T''] along the
    tokens (its rounding bits indexed in that padded transpose; see `lowbit.backends.ref.quantize_dual`).
    rowwise / colwise: `QuantizeSpec`s (or mappings of their fields); there is no `global_amax`.
    """
    _check_float(x)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [tokens, features], got shape {tuple(x.shape)}")
    T, K = x.shape
    layouts = (_layout(rowwise, "rowwise", T, K, False), _layout(colwise, "colwise", T, K, True))
    if check and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf (check=True)")
    if x.numel() == 0:  # the definition itself: `quantize` owns the empty-tensor rules
        out = []
        for i, (spec, lay, _) in enumerate(layouts):
            xp = torch.nn.functional.pad(x, (0, 0, 0, lay.rows - T))
            out.append(quantize(xp.t() if i else xp, spec.fmt, block=spec.block, rounding=spec.rounding,
                                seed=spec.seed, scale_mode=spec.scale_mode, hadamard=spec.hadamard, backend=backend))
        return out[0], out[1]
    (_, row, row_tw), (_, col, col_tw) = layouts
    x = (x.to(torch.float32) if x.dtype == torch.float64 else x).contiguous()
    parts = _ops.quantize_dual(x, row.fmt.name, list(row.block), row.rounding, row.seed, row.scale_mode, row.hadamard,
                               row.rows, col.fmt.name, list(col.block), col.rounding, col.seed, col.scale_mode,
                               col.hadamard, col.rows, backends.requested(backend))
    out = []
    for (data, scale, gs), lay, tensorwise, shape in ((parts[:3], row, row_tw, (row.rows, K)),
                                                       (parts[3:], col, col_tw, (K, col.rows))):
        out.append(QTensor(data, scale.reshape(()) if tensorwise else scale,
                           gs if lay.fmt.kind == "nvfp4" else None, lay.fmt, shape, 1, lay.block))
    return out[0], out[1]


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> torch.Tensor:
    """Decode a QTensor to `dtype` in its original layout."""
    if not isinstance(q, QTensor):
        raise TypeError(f"q: expected a lowbit QTensor, got {type(q).__name__}")
    return q.dequantize(dtype, backend=backend)


def cast(x: torch.Tensor, dtype: torch.dtype, *, rounding: str = "nearest", seed: int = 0,
         backend: str | None = None) -> torch.Tensor:
    """Unscaled, saturating cast of `x` to bf16 / fp16 / float8_e4m3fn / float8_e5m2."""
    _check_float(x)
    if dtype not in ELEMENT_OF_DTYPE:
        raise TypeError(f"dtype: expected one of {list(ELEMENT_OF_DTYPE)}, got {dtype!r}")
    _check_rounding(rounding)
    seed = _check_seed(seed)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    name = backends.requested(backend)
    return _ops.cast(x.to(torch.float32).contiguous(), dtype, rounding, seed, name)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int = 0, *, backend: str | None = None) -> torch.Tensor:
    """Stochastically round `x` to `dtype` with the Philox bits of (seed, flat element index)."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        raise ValueError(f"dtype: stochastic rounding needs a narrower target than fp32 (bf16, fp16, fp8), got {dtype}")
    return cast(x, dtype, rounding="stochastic", seed=seed, backend=backend)


def hadamard(x: torch.Tensor, block: int, *, seed: int | None = None, axis: int = -1, inverse: bool = False,
             backend: str | None = None) -> torch.Tensor:
    """Random Hadamard transform of consecutive 1 x `block` slices along `axis` (orthonormal).

    `seed=None` is the plain Sylvester transform; `inverse=True` undoes the transform with the same seed.
    Computed in fp32 (fp64 inputs in fp64); returned in x.dtype.
    """
    _check_float(x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a 0-d tensor")
    axis = _norm_axis(axis, x.dim())
    _check_hadamard_block(block, x.shape[axis], name="block")
    seed = _check_seed(seed, allow_none=True)
    if x.numel() == 0:
        return x.clone()
    x2, _ = _to_2d(x, axis)
    name = backends.requested(backend)
    y = _ops.hadamard(x2, block, seed, bool(inverse), name)
    return y.to(x.dtype).reshape(x.movedim(axis, -1).shape).movedim(-1, axis)


def _check_operand(q, name: str) -> None:
    if not isinstance(q, QTensor):
        raise TypeError(f"{name}: expected a lowbit QTensor (use lowbit.quantize), got {type(q).__name__}")
    if len(q.shape) != 2 or q.axis != 1:
        raise ValueError(f"{name}: expected a 2-D QTensor quantized along its last dim (K), got shape "
                         f"{tuple(q.shape)} quantized along axis {q.axis}; quantize with axis=-1 or use .t()")


def qmatmul(a: QTensor, b: QTensor, *, out_dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
    """`a @ b.T` for a [M, K] and b [N, K], both quantized along K; fp32 accumulation."""
    _check_operand(a, "a")
    _check_operand(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b: reduction dims differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (expected [N, {a.shape[1]}])")
    if a.data.device != b.data.device:
        raise ValueError(f"b: on {b.data.device}, but a is on {a.data.device}")
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype: expected a floating-point torch.dtype, got {out_dtype!r}")
    M, N, K = a.shape[0], b.shape[0], a.shape[1]
    if M * N * K == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=a.data.device)
    pa, pb = a.parts(), b.parts()
    name = backends.requested(backend)
    return _ops.qmatmul(pa.data, pa.scale, pa.global_scale, a.fmt.name, list(a.block),
                        pb.data, pb.scale, pb.global_scale, b.fmt.name, list(b.block), K, out_dtype, name)


__all__ = ["quantize", "quantize_dual", "QuantizeSpec", "dequantize", "cast", "stochastic_round", "hadamard",
           "qmatmul", "FORMATS"]
