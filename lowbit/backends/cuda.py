"""CUDA backend: the kernels of `lowbit._C_cuda` (csrc/cuda/*.cu), bit-exact with `ref.py`.

quantize / dequantize / cast / hadamard run lowbit's own kernels and give the same bits as the
reference on every format, rounding, block and input dtype. qmatmul multiplies FP8 tensor-wise
and row-wise operands with `torch._scaled_mm` (cuBLASLt FP8 GEMM, fp32 accumulation) on GPUs that
have FP8 tensor cores (compute capability 8.9 and newer); every other case dequantizes both
operands with the kernels here and multiplies in fp32 with `torch.mm`. The GEMM is the one op
whose result depends on the accumulation order, so it matches `ref.qmatmul` to within fp32
rounding of a K-term sum, not bit for bit.

Importing this module never needs a GPU or the compiled extension: `unavailable()` then says why.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from ..formats import Format

try:
    _C = importlib.import_module("lowbit._C_cuda")
    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # not built (CPU-only torch, no nvcc) or built for another torch
    _C = None
    _IMPORT_ERROR = exc

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CAST_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
_SCALED_MM_FAILED: set[tuple] = set()


def devices() -> tuple[str, ...]:
    return ("cuda",)


def unavailable() -> str | None:
    if _C is None:
        return (f"the CUDA extension lowbit._C_cuda is not built ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); "
                "`pip install` builds it when torch has CUDA and nvcc is found")
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _seed64(seed: int) -> int:
    """The Philox key as the signed int64 the extension takes (the same 64 bits ref.py uses)."""
    s = int(seed) % 2**64
    return s - 2**64 if s >= 2**63 else s


def _float_input(x: torch.Tensor) -> torch.Tensor:
    """fp32 / bf16 / fp16 go to the kernels as they are; other floats are made fp32 first, as ref does."""
    return x if x.dtype in _INPUT_DTYPES else x.to(torch.float32)


def quantize(x, fmt: Format, block, rounding, seed, scale_mode, global_amax, hadamard_block, inner):
    br, bk = block
    if global_amax is not None:
        global_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(1)
    return _C.quantize(_float_input(x), fmt.kind, fmt.elem.name, int(br), int(bk), rounding, _seed64(seed),
                       scale_mode, global_amax, int(hadamard_block or 0), int(inner))


def dequantize(data, scale, global_scale, fmt: Format, block, K: int, dtype: torch.dtype) -> torch.Tensor:
    br, bk = block
    name = _OUT_NAMES.get(dtype, "float32")
    out = _C.dequantize(data, scale, global_scale.to(torch.float32), fmt.kind, fmt.elem.name, int(br), int(bk),
                        int(K), name)
    return out if out.dtype == dtype else out.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed: int) -> torch.Tensor:
    if dtype not in _CAST_NAMES:
        raise TypeError(f"dtype: expected one of {list(_CAST_NAMES)}, got {dtype!r}")
    return _C.cast(_float_input(x), _CAST_NAMES[dtype], rounding, _seed64(seed))


def hadamard(x: torch.Tensor, block: int, seed: int | None, inverse: bool) -> torch.Tensor:
    if seed is not None and seed >= 2**63:
        raise ValueError(f"seed: expected an int below 2^63 or None, got {seed}")
    return _C.hadamard(_float_input(x), int(block), -1 if seed is None or seed < 0 else int(seed), bool(inverse))


# ----------------------------------------------------------------------------- GEMM
def _fp8_layout(p, rows: int) -> str | None:
    """'tensor' or 'row' for FP8 operands _scaled_mm takes as they are, else None."""
    if p.fmt.kind != "fp8":
        return None
    if p.scale.numel() == 1 and tuple(p.block) == (rows, p.K):
        return "tensor"
    if tuple(p.block) == (1, p.K):
        return "row"
    return None


def _scaled_mm_plan(a, b, out_dtype: torch.dtype) -> str | None:
    M, N, K = a.data.shape[0], b.data.shape[0], a.K
    if not hasattr(torch, "_scaled_mm") or M % 16 or N % 16 or K % 16:
        return None
    if torch.cuda.get_device_capability(a.data.device) < (8, 9):
        return None
    la, lb = _fp8_layout(a, M), _fp8_layout(b, N)
    if la is None or la != lb:
        return None
    if a.fmt.elem.name == "e5m2" and b.fmt.elem.name == "e5m2":  # cuBLASLt has no E5M2 x E5M2 GEMM
        return None
    if la == "tensor" and out_dtype in _OUT_NAMES:
        return "tensor"
    if la == "row" and out_dtype == torch.bfloat16 and a.fmt.elem.name == "e4m3" and b.fmt.elem.name == "e4m3":
        return "row"
    return None


def _scaled_mm(a, b, out_dtype: torch.dtype, plan: str) -> torch.Tensor:
    M, N = a.data.shape[0], b.data.shape[0]
    if plan == "tensor":
        sa = a.scale.reshape(()).to(torch.float32)
        sb = b.scale.reshape(()).to(torch.float32)
    else:
        sa = a.scale.reshape(M, 1).to(torch.float32).contiguous()
        sb = b.scale.reshape(1, N).to(torch.float32).contiguous()
    # b.data is [N, K] row-major, so its transpose is the column-major [K, N] operand cuBLASLt wants.
    return torch._scaled_mm(a.data.contiguous(), b.data.contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=out_dtype, use_fast_accum=False)


def qmatmul(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] and b [N, K] as `lowbit.qtensor.QParts` -> a @ b.T with fp32 accumulation."""
    plan = _scaled_mm_plan(a, b, out_dtype)
    key = (plan, a.fmt.name, b.fmt.name, out_dtype, a.data.device)
    if plan is not None and key not in _SCALED_MM_FAILED:
        try:
            return _scaled_mm(a, b, out_dtype, plan)
        except RuntimeError as exc:  # a cuBLASLt build without this FP8 combination: use the exact path
            _SCALED_MM_FAILED.add(key)
            warnings.warn(f"lowbit cuda qmatmul: torch._scaled_mm rejected {key[:4]} ({exc}); "
                          "dequantizing to fp32 instead", RuntimeWarning, stacklevel=2)
    A = dequantize(*a, torch.float32)
    B = dequantize(*b, torch.float32)
    return torch.mm(A, B.t()).to(out_dtype)


# Stable-SPAM step kernels (csrc/cuda/optim.cu), used by lowbit.optim.kernels; bit-exact with its spec.
if _C is not None and hasattr(_C, "optim_adam_step"):
    def optim_grad_stats(grads):
        return _C.optim_grad_stats(grads)

    def optim_clip_stats(grads, mh, r):
        return _C.optim_clip_stats(grads, mh, r)

    def optim_adam_step(params, grads, ms, vs, scalars):
        _C.optim_adam_step(params, grads, ms, vs, scalars)
