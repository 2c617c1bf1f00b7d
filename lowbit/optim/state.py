"""Low-precision storage of optimizer moments.

A moment lives in the optimizer's per-parameter state under its name (``exp_avg``,
``exp_avg_sq``) plus, for the scaled formats, a companion ``<name>_scale`` tensor, so
``state_dict()`` / ``load_state_dict()`` round-trip it unchanged. The optimizer does its
arithmetic in fp32 (fp64 for fp64 parameters): it ``load``s a moment, updates it, and
``store``s it back.

state_dtype
  ``"fp32"``  plain fp32 tensor, updated in place (no load / store copies).
  ``"bf16"``  bf16 tensor; each store is a stochastic rounding of the fp32 value with
              ``lowbit.stochastic_round`` and a seed that differs per step, tensor and moment,
              so the rounding error averages out over steps instead of biasing the moment.
  ``"fp8"``   first moment E4M3, second moment E5M2 (the split of "Scaling FP8 training to
              trillion-token LLMs": the second moment needs range more than precision), one fp32
              scale per 1 x 128 block of the flattened tensor (zero padded to the block), encoded
              by ``lowbit.quantize`` with round-to-nearest.
  ``"int8"``  block-wise dynamic quantization as in bitsandbytes' 8-bit optimizers: one fp32
              absmax per block of 256 elements, each element normalised by it and rounded to the
              nearest entry of a 256-entry "dynamic" code book (a decimal exponent of 10^-6..10^0
              followed by a linear fraction; signed for the first moment, unsigned for the second).

For fp32 parameters (and ZeRO flat partitions) StableSPAM does load, step and store in one native
pass (``kernels.lowprec_step``, csrc/cpu/optim_lowprec.cpp): block by block, in place, without an
fp32 copy of the moments, and bit for bit what the functions here give (NaN payloads aside).
bf16 / fp16 master weights, fp64 parameters, SPAM, ``use_backend("ref")`` and devices without
the kernel use `load_moments` / `store_moment`.
"""
from __future__ import annotations

import math

import torch

from ..formats import get_format
from ..ops import dequantize, quantize, stochastic_round
from ..qtensor import QTensor

STATE_DTYPES = ("fp32", "bf16", "fp8", "int8")
FP8_BLOCK = 128
INT8_BLOCK = 256
_FP8_FORMAT = {"exp_avg": "fp8_e4m3", "exp_avg_sq": "fp8_e5m2"}
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def check_state_dtype(state_dtype) -> str:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype: expected one of {STATE_DTYPES}, got {state_dtype!r}")
    return state_dtype


def state_bytes_per_param(state_dtype: str, n_moments: int = 2) -> float:
    """Bytes of moment storage per parameter element (scales included, padding excluded)."""
    check_state_dtype(state_dtype)
    per_moment = {
        "fp32": 4.0,
        "bf16": 2.0,
        "fp8": 1.0 + 4.0 / FP8_BLOCK,
        "int8": 1.0 + 4.0 / INT8_BLOCK,
    }[state_dtype]
    return n_moments * per_moment


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes actually held by tensors in ``optimizer.state`` (padding of the last block included)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# int8 dynamic code book
# ---------------------------------------------------------------------------------------------
def dynamic_codebook(signed: bool) -> torch.Tensor:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1] (unsigned).

    Decade i (i = 0..6) covers magnitudes 10^(i-6) * [0.1, 1]: its fraction part is the
    midpoints of a uniform split of [0.1, 1] into 2^i pieces (signed, each sign) or 2^(i+1)
    pieces (unsigned, which spends the sign bit on precision). 0 and 1 complete the 256.
    """
    values = [0.0, 1.0]
    for i in range(7):
        pieces = 2 ** i if signed else 2 ** (i + 1)
        edges = [0.1 + 0.9 * j / pieces for j in range(pieces + 1)]
        mids = [(edges[j] + edges[j + 1]) / 2 for j in range(pieces)]
        decade = 10.0 ** (i - 6)
        values += [decade * m for m in mids]
        if signed:
            values += [-decade * m for m in mids]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_CODEBOOKS: dict = {}


def _codebook(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (signed, str(device))
    if key not in _CODEBOOKS:
        code = dynamic_codebook(signed).to(device)
        _CODEBOOKS[key] = (code, (code[1:] + code[:-1]) / 2)
    return _CODEBOOKS[key]


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def int8_encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 codes [nblocks, 256], fp32 absmax [nblocks])."""
    xb = _blocks(x, INT8_BLOCK)
    absmax = xb.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code, mids = _codebook(signed, x.device)
    normed = (xb / safe[:, None]).clamp_(-1.0 if signed else 0.0, 1.0)
    idx = torch.bucketize(normed, mids)
    return idx.to(torch.uint8), absmax


def int8_books(device) -> list[torch.Tensor]:
    """[code book, midpoints] of the first moment, then of the second: the tables `int8_encode`
    and `int8_decode` use, for the fused native step."""
    return [*_codebook(_SIGNED["exp_avg"], device), *_codebook(_SIGNED["exp_avg_sq"], device)]


def int8_decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, shape) -> torch.Tensor:
    code, _ = _codebook(signed, codes.device)
    vals = code[codes.long()] * absmax[:, None]
    n = math.prod(shape)
    return vals.reshape(-1)[:n].reshape(shape)


# ---------------------------------------------------------------------------------------------
# fp8 per-block
# ---------------------------------------------------------------------------------------------
def fp8_encode(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize(_blocks(x, FP8_BLOCK), fmt, block=(1, FP8_BLOCK))
    return q.data, q.scale


def fp8_decode(data: torch.Tensor, scale: torch.Tensor, fmt: str, shape) -> torch.Tensor:
    q = QTensor(data, scale, None, get_format(fmt), data.shape, 1, (1, FP8_BLOCK))
    n = math.prod(shape)
    return dequantize(q).reshape(-1)[:n].reshape(shape)


# ---------------------------------------------------------------------------------------------
# the interface the optimizers use
# ---------------------------------------------------------------------------------------------
def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The optimizers compute in fp32, or in fp64 for fp64 parameters."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def init_moment(state: dict, name: str, param: torch.Tensor, state_dtype: str) -> None:
    """Zero moment. "fp32" state of an fp64 parameter is kept in fp64 (full precision)."""
    zeros = torch.zeros_like(param, dtype=compute_dtype(param), memory_format=torch.contiguous_format)
    if state_dtype == "fp32":
        state[name] = zeros
    elif state_dtype == "bf16":
        state[name] = zeros.to(torch.bfloat16)
    else:
        store_moment(state, name, zeros.float(), state_dtype, seed=0)


def load_moment(state: dict, name: str, shape, state_dtype: str) -> torch.Tensor:
    """The moment as fp32 of `shape`; for "fp32" the stored tensor itself (update it in place)."""
    if state_dtype == "fp32":
        return state[name]
    if state_dtype == "bf16":
        return state[name].to(torch.float32)
    if state_dtype == "fp8":
        return fp8_decode(state[name], state[name + "_scale"], _FP8_FORMAT[name], shape)
    return int8_decode(state[name], state[name + "_scale"], _SIGNED[name], shape)


def load_moments(state: dict, shape, state_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) as fp32 (the stored tensors themselves for "fp32").

    For the block-scaled formats an element whose second moment decodes to zero gets a zero
    first moment: exactly, v = 0 implies m = 0, but the second moment spans the square of the
    first one's dynamic range, so an element with a gradient ~1e-4 of its block's largest
    underflows in v (int8's smallest code is ~3e-7 of the block maximum) while m survives, and
    m / (sqrt(0) + eps) would be a huge step.
    """
    m = load_moment(state, "exp_avg", shape, state_dtype)
    v = load_moment(state, "exp_avg_sq", shape, state_dtype)
    if state_dtype in ("fp8", "int8"):
        m.masked_fill_(v == 0, 0.0)
    return m, v


def store_moment(state: dict, name: str, x: torch.Tensor, state_dtype: str, seed: int) -> None:
    if state_dtype == "fp32":
        if state.get(name) is not x:
            state[name] = x
    elif state_dtype == "bf16":
        state[name] = stochastic_round(x.contiguous(), torch.bfloat16, seed)
    elif state_dtype == "fp8":
        state[name], state[name + "_scale"] = fp8_encode(x, _FP8_FORMAT[name])
    else:
        state[name], state[name + "_scale"] = int8_encode(x, _SIGNED[name])


def store_moments(state: dict, m: torch.Tensor, v: torch.Tensor, state_dtype: str, seeds: tuple[int, int],
                  stepped: torch.Tensor | None = None) -> None:
    """Store both moments (`seeds`: their stochastic-rounding seeds). Where `stepped` (a 0-d bool) is
    given and false, the tensors stored before are kept bit for bit: a tensor that did not step does
    not go through a decode / encode round trip, and the flag is never read on the host."""
    kept = {} if stepped is None else {k: state[k] for k in _MOMENT_KEYS if k in state}
    store_moment(state, "exp_avg", m, state_dtype, seeds[0])
    store_moment(state, "exp_avg_sq", v, state_dtype, seeds[1])
    for k, old in kept.items():
        state[k] = select(stepped, state[k], old)


_MOMENT_KEYS = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")  # what store_moment writes


def select(flag: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` where the 0-d bool `flag` is set, else `old`, bit for bit in any dtype (float8 and bf16
    select on their bits), without reading `flag` on the host."""
    if new.dtype.is_floating_point and new.element_size() < 4:
        bits = {1: torch.uint8, 2: torch.int16}[new.element_size()]
        return torch.where(flag, new.view(bits), old.view(bits)).view(new.dtype)
    return torch.where(flag, new, old)


def stored_moments(state: dict, param: torch.Tensor, state_dtype: str):
    """(m, m_scale, v, v_scale) as stored for `param` (scales None for "bf16") when they have the
    layout `store_moment` gives them (dtype, size, contiguous, on param's device), else None:
    what the fused native step updates in place."""
    n = param.numel()
    if state_dtype == "bf16":
        want, block = {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}, None
    elif state_dtype == "fp8":
        want, block = {"exp_avg": torch.float8_e4m3fn, "exp_avg_sq": torch.float8_e5m2}, FP8_BLOCK
    elif state_dtype == "int8":
        want, block = {"exp_avg": torch.uint8, "exp_avg_sq": torch.uint8}, INT8_BLOCK
    else:
        return None
    nblk = -(-n // block) if block else 0
    out = []
    for name, dtype in want.items():
        t = state.get(name)
        if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_contiguous() and t.device == param.device
                and t.numel() == (nblk * block if block else n)):
            return None
        sc = None
        if block:
            sc = state.get(name + "_scale")
            if not (isinstance(sc, torch.Tensor) and sc.dtype == torch.float32 and sc.is_contiguous()
                    and sc.device == param.device and sc.numel() == nblk):
                return None
        out += [t, sc]
    return tuple(out)


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict) -> None:
    """A state_dict of another optimizer (e.g. AdamW's) would load, then fail at the first step on a
    hyper-parameter it lacks: refuse it here, naming the missing keys."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"state_dict: expected an optimizer state_dict with 'state' and 'param_groups', got "
                         f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
    for i, group in enumerate(state_dict["param_groups"]):
        missing = sorted(k for k in optimizer.defaults if k not in group)
        if missing:
            raise ValueError(f"state_dict: param_groups[{i}] lacks {name}'s keys {missing}; "
                             f"is it the state of another optimizer?")


class ExactStateLoad:
    """Mixin: ``load_state_dict`` keeps the stored dtypes of state tensors.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to the
    parameter's dtype, which would turn bf16 / float8 moments into fp32, round fp32 block scales
    to a bf16 parameter's dtype and fp64 statistics to fp32. The saved tensors, nested ones
    included, are put back as they were (moved to the parameter's device).
    """

    def load_state_dict(self, state_dict):
        check_state_dict(self, state_dict)
        saved = {pid: {k: v for k, v in st.items() if _holds_tensor(v)} for pid, st in state_dict["state"].items()}
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in saved.get(pid, {}).items():
                self.state[p][k] = _moved(v, p.device)


def _holds_tensor(v) -> bool:
    """A tensor, or a list / dict with one inside (e.g. the per-tensor statistics of a ZeRO partition)."""
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    return isinstance(v, (list, tuple)) and any(_holds_tensor(x) for x in v)


def _moved(v, device):
    """A copy of `v` with every tensor in it on `device`, dtypes kept."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, copy=True)
    if isinstance(v, dict):
        return {k: _moved(x, device) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_moved(x, device) for x in v)
    return v


def sr_seed(base_seed: int, step: int, index: int, stream: int) -> int:
    """A distinct stochastic-rounding seed per (step, tensor index, stream); streams 0 and 1
    are the two moments, 2 the parameter itself."""
    return ((base_seed * 1_000_003 + step) * 1_048_583 + 3 * index + stream) % (2 ** 63)


def round_param_(p: torch.Tensor, value: torch.Tensor, seed: int) -> None:
    """Write fp32 `value` into a bf16 / fp16 parameter with stochastic rounding."""
    p.copy_(stochastic_round(value.contiguous(), p.dtype, seed))
