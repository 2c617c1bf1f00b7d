"""Recipes: which precision each operand of a Linear layer's three GEMMs runs in.

A Linear layer computes three GEMMs, each reducing over a different dimension:
  fprop  y  = x  @ W^T    reduces over in_features   operands: fprop_input (x),   fprop_weight (W)
  dgrad  dx = dy @ W      reduces over out_features  operands: dgrad_grad (dy),   dgrad_weight (W)
  wgrad  dW = dy^T @ x    reduces over tokens        operands: wgrad_grad (dy),   wgrad_input (x)
Each operand is quantized along its GEMM's reduction dimension (so x and W are each quantized
twice when the two GEMMs that read them need different axes, as Transformer Engine does; a
tensor-wise or square-tile quantization is reused transposed instead). An operand of `None`
keeps that GEMM in high precision; both operands of one GEMM are quantized or neither is.

Recipes are frozen dataclasses; the built-in ones are in `RECIPES` and in `configs/recipes/*.yaml`
(kept identical by a test). `get_recipe(name_or_path)` returns one; `dataclasses.replace` derives
variants (e.g. NVFP4 without the Hadamard transform).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..formats import get_format
from ..ops import HADAMARD_MAX, HADAMARD_MIN, ROUNDINGS

OPERANDS = ("fprop_input", "fprop_weight", "dgrad_grad", "dgrad_weight", "wgrad_grad", "wgrad_input")
GEMMS = {"fprop": ("fprop_input", "fprop_weight"), "dgrad": ("dgrad_grad", "dgrad_weight"),
         "wgrad": ("wgrad_grad", "wgrad_input")}
ESTIMATORS = ("ste", "dge")
BACKWARD_OPERANDS = ("original", "dequantized")


@dataclass(frozen=True)
class Operand:
    """How one GEMM operand is quantized (arguments of `lowbit.quantize`).

    block: None (FP8: one scale per tensor; MX/NVFP4: the format's default 1 x n), "row", or
           (rows, cols) over the operand laid out [other dim, reduction dim].
    hadamard: random Hadamard transform block along the reduction dim (both operands of a GEMM
              must use the same block so the transforms cancel in the product).
    """

    fmt: str
    block: tuple[int, int] | str | None = None
    rounding: str = "nearest"
    hadamard: int | None = None
    scale_mode: str | None = None

    def __post_init__(self):
        get_format(self.fmt)  # raises with the list of known formats
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        if self.block is not None and self.block != "row" and not (
                isinstance(self.block, tuple) and len(self.block) == 2 and all(isinstance(b, int) and b > 0 for b in self.block)):
            raise ValueError(f"block: expected None, 'row' or a pair of positive ints, got {self.block!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {self.rounding!r}")
        h = self.hadamard
        if h is not None and self.format.kind == "int4":
            raise ValueError(f"hadamard: {self.fmt} has no Hadamard transform")
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < HADAMARD_MIN or h > HADAMARD_MAX
                              or h & (h - 1)):
            raise ValueError(f"hadamard: expected None or a power of two in [{HADAMARD_MIN}, {HADAMARD_MAX}], got {h!r}")

    @property
    def format(self):
        return get_format(self.fmt)

    def tile(self) -> tuple[int | None, int | None]:
        """(rows, cols) of one scale block; None means the whole dimension."""
        if self.block is None:
            b = self.format.block
            return (None, None) if b is None else b
        if self.block == "row":
            return (1, None)
        return self.block

    @property
    def tensorwise(self) -> bool:
        return self.tile() == (None, None)

    @property
    def square(self) -> bool:
        """Transposing the quantized tensor gives the same quantization (tensor-wise or n x n tiles)."""
        r, c = self.tile()
        return r == c

    def reduction_multiple(self) -> int:
        """What the reduction dim must be a multiple of (block width, Hadamard block, FP4 byte packing)."""
        m = self.tile()[1] or 1
        if self.hadamard:
            m = math.lcm(m, self.hadamard)
        if self.format.packed:
            m = math.lcm(m, 2)
        return m

    def rows_multiple(self) -> int:
        return self.tile()[0] or 1


@dataclass(frozen=True)
class Recipe:
    """Per-operand precision of a Linear layer's fprop, dgrad and wgrad, plus layer-level rules.

    weight_estimator: "ste" (straight-through) or "dge" (the FP4 paper's differentiable gradient
        estimator: dW is multiplied by the derivative of a smooth approximation of the weight's
        quantization function, |2t/d - 1|^(1/k - 1) / k clipped at `dge_clip`, where t is the
        scaled weight's offset inside its quantization interval of width d).
    activation_clamp_quantile: clamp the fprop input to its [1-q, q] quantiles before quantizing;
        with `clamp_compensation` the clipped residual (sparse) is multiplied in high precision and
        added back.
    keep_last_fraction: the last ceil(fraction * n_blocks) transformer blocks stay in high precision
        at `convert` time (NVFP4 keeps 15 %); keep_lm_head keeps the output head.
    backward_operands: what a dgrad / wgrad GEMM kept in high precision reads: "original" (W and x
        as given) or "dequantized" (W^ and x^ as fprop quantized them, dx = dy W^ and dW = dy^T x^,
        as Stable-SPAM's INT4 code does; x is then saved quantized for backward).
    """

    name: str
    description: str = ""
    fprop_input: Operand | None = None
    fprop_weight: Operand | None = None
    dgrad_grad: Operand | None = None
    dgrad_weight: Operand | None = None
    wgrad_grad: Operand | None = None
    wgrad_input: Operand | None = None
    weight_estimator: str = "ste"
    dge_k: float = 5.0
    dge_clip: float = 3.0
    activation_clamp_quantile: float | None = None
    clamp_compensation: bool = True
    keep_last_fraction: float = 0.0
    keep_lm_head: bool = True
    backward_operands: str = "original"

    def __post_init__(self):
        for name in OPERANDS:
            v = getattr(self, name)
            if isinstance(v, dict):
                try:
                    object.__setattr__(self, name, Operand(**v))
                except TypeError as e:
                    raise ValueError(f"{name}: {e}") from None
            elif v is not None and not isinstance(v, Operand):
                raise TypeError(f"{name}: expected an Operand, a mapping or None, got {type(v).__name__}")
        for gemm, (a, b) in GEMMS.items():
            oa, ob = getattr(self, a), getattr(self, b)
            if (oa is None) != (ob is None):
                raise ValueError(f"{a if oa is None else b}: the {gemm} GEMM quantizes one operand but not the other; "
                                 f"set both {a} and {b}, or neither")
            if oa is not None and oa.hadamard != ob.hadamard:
                raise ValueError(f"{b}.hadamard: must equal {a}.hadamard ({oa.hadamard}) so the transforms cancel in "
                                 f"the {gemm} product, got {ob.hadamard}")
        if self.weight_estimator not in ESTIMATORS:
            raise ValueError(f"weight_estimator: expected one of {ESTIMATORS}, got {self.weight_estimator!r}")
        if self.weight_estimator == "dge":
            if self.fprop_weight is None or self.fprop_weight.format.elem.name != "e2m1":
                raise ValueError("weight_estimator: 'dge' is defined for FP4 (E2M1) weights; fprop_weight must be "
                                 "an MXFP4 or NVFP4 operand")
            if not self.dge_k > 1:
                raise ValueError(f"dge_k: expected a sharpness > 1, got {self.dge_k}")
            if not self.dge_clip > 0:
                raise ValueError(f"dge_clip: expected a positive derivative bound, got {self.dge_clip}")
        q = self.activation_clamp_quantile
        if q is not None and not 0.5 < q < 1:
            raise ValueError(f"activation_clamp_quantile: expected a quantile in (0.5, 1), got {q}")
        if q is not None and self.fprop_input is None:
            raise ValueError("activation_clamp_quantile: needs a quantized fprop_input")
        if not 0 <= self.keep_last_fraction <= 1:
            raise ValueError(f"keep_last_fraction: expected a fraction in [0, 1], got {self.keep_last_fraction}")
        if self.backward_operands not in BACKWARD_OPERANDS:
            raise ValueError(f"backward_operands: expected one of {BACKWARD_OPERANDS}, got {self.backward_operands!r}")
        if self.backward_operands == "dequantized" and self.fprop_input is None:
            raise ValueError("backward_operands: 'dequantized' reads fprop's quantized x and W; fprop_input and "
                             "fprop_weight must be quantized")
        for name in OPERANDS:
            op = getattr(self, name)
            if op is not None and op.format.kind == "int4" and name not in GEMMS["fprop"]:
                raise ValueError(f"{name}: {op.fmt} groups lie along in_features; INT4 quantizes fprop's x and W only")

    @property
    def quantizes(self) -> bool:
        return any(getattr(self, n) is not None for n in OPERANDS)

    def gemm(self, name: str) -> tuple[Operand | None, Operand | None]:
        a, b = GEMMS[name]
        return getattr(self, a), getattr(self, b)

    def shape_problem(self, in_features: int, out_features: int) -> str | None:
        """Why a Linear of this shape cannot run this recipe (None if it can).

        Feature dims must divide every block and Hadamard block along them; the token dim is
        zero-padded at run time instead.
        """
        # (operand, size of its reduction dim, size of its other dim or None for tokens)
        dims = {"fprop_input": (in_features, None), "fprop_weight": (in_features, out_features),
                "dgrad_grad": (out_features, None), "dgrad_weight": (out_features, in_features),
                "wgrad_grad": (None, out_features), "wgrad_input": (None, in_features)}
        for name, (red, other) in dims.items():
            op = getattr(self, name)
            if op is None:
                continue
            if red is not None and red % op.reduction_multiple():
                return (f"{name}: {op.fmt} {op.tile()} needs the reduction dim ({red}) to be a multiple of "
                        f"{op.reduction_multiple()}")
            if other is not None and other % op.rows_multiple():
                return f"{name}: {op.fmt} {op.tile()} needs the other dim ({other}) to be a multiple of {op.rows_multiple()}"
        return None

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Operand):
                v = {k: (list(x) if isinstance(x, tuple) else x) for k, x in dataclasses.asdict(v).items()
                     if x != getattr(Operand, k, None) or k == "fmt"}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise TypeError(f"recipe: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"recipe: unknown key(s) {unknown}; expected some of {sorted(known)}")
        if "name" not in d:
            raise ValueError("recipe: missing key 'name'")
        return cls(**d)


def _fp8(elem: str, block=None, **kw) -> Operand:
    return Operand("fp8_" + elem, block, **kw)


E4, E5 = "e4m3", "e5m2"
SR = "stochastic"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("bf16", "No quantization: nn.Linear in the module's dtype (fp32 on CPU, bf16 under autocast)."),
    Recipe("fp8-tensorwise", "E4M3 activations and weights, E5M2 gradients, one just-in-time amax scale per tensor.",
           _fp8(E4), _fp8(E4), _fp8(E5), _fp8(E4), _fp8(E5), _fp8(E4)),
    Recipe("fp8-rowwise", "E4M3 everywhere, one scale per row along each GEMM's reduction dim (torchao's rowwise).",
           _fp8(E4, "row"), _fp8(E4, "row"), _fp8(E4, "row"), _fp8(E4, "row"), _fp8(E4, "row"), _fp8(E4, "row")),
    Recipe("fp8-blockwise", "DeepSeek-V3: E4M3, 1x128 activation and gradient tiles, 128x128 weight blocks, fp32 scales.",
           _fp8(E4, (1, 128)), _fp8(E4, (128, 128)), _fp8(E4, (1, 128)), _fp8(E4, (128, 128)),
           _fp8(E4, (1, 128)), _fp8(E4, (1, 128))),
    Recipe("mxfp8", "OCP MXFP8: E4M3 elements, E8M0 scale per 1x32 block along each GEMM's reduction dim.",
           *(Operand("mxfp8"),) * 6),
    Recipe("mxfp4", "OCP MXFP4: E2M1 elements, E8M0 scale per 1x32 block along each GEMM's reduction dim, "
           "round-to-nearest.", *(Operand("mxfp4"),) * 6),
    Recipe("nvfp4", "NVIDIA's NVFP4 pretraining recipe: 1x16 activation/gradient blocks, 16x16 weight blocks, "
           "RHT-16 on both wgrad operands, stochastic rounding on gradients, the last 15 % of blocks in high precision.",
           Operand("nvfp4", (1, 16)), Operand("nvfp4", (16, 16)),
           Operand("nvfp4", (1, 16), SR), Operand("nvfp4", (16, 16)),
           Operand("nvfp4", (1, 16), SR, hadamard=16), Operand("nvfp4", (1, 16), hadamard=16),
           keep_last_fraction=0.15),
    Recipe("fp4-dge", "FP4 training with a differentiable gradient estimator (k=5, clip 3) for weights and 0.99-quantile "
           "activation clamping with sparse high-precision compensation; FP4 (NVFP4 blocks) forward GEMM, FP8 "
           "backward GEMMs (E4M3 operands, E5M2 gradients, row scales).",
           Operand("nvfp4", (1, 16)), Operand("nvfp4", (16, 16)),
           _fp8(E5, "row"), _fp8(E4, "row"), _fp8(E5, "row"), _fp8(E4, "row"),
           weight_estimator="dge", activation_clamp_quantile=0.99),
    Recipe("int4", "Stable-SPAM's INT4 set-up: weights asymmetric uint4 with a zero point per group of 256 along "
           "in_features, activations symmetric int4 per group of 256 with the 2 largest |x| kept exact and stochastic "
           "rounding; fprop on the dequantized x^ and W^, dgrad (dy W^) and wgrad (dy^T x^) in high precision. The "
           "activation group is the one the official code runs (its launch script's 64 is never read).",
           Operand("int4_act", (1, 256), SR), Operand("int4_weight", (1, 256)),
           backward_operands="dequantized"),
)}
RECIPE_NAMES = tuple(RECIPES)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe from a YAML file (keys are Recipe fields; operands are mappings of Operand fields)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe: no such file {os.fspath(path)!r}")
    with open(path) as f:
        d = yaml.safe_load(f)
    try:
        return Recipe.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


def get_recipe(recipe: str | Recipe | os.PathLike) -> Recipe:
    """A Recipe, a built-in recipe name, or a path to a recipe YAML file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in RECIPES:
        return RECIPES[recipe]
    if isinstance(recipe, (str, os.PathLike)) and os.fspath(recipe).endswith((".yaml", ".yml")):
        return load_recipe(recipe)
    raise ValueError(f"recipe: unknown recipe {recipe!r}; expected one of {list(RECIPE_NAMES)} or a path to a .yaml file")


__all__ = ["Operand", "Recipe", "RECIPES", "RECIPE_NAMES", "get_recipe", "load_recipe", "OPERANDS", "GEMMS"]
