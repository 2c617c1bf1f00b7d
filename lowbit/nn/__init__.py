"""Quantized training layers: recipes, LowBitLinear, and one-call model conversion."""
from .convert import ConversionSummary, convert, unconvert
from .dge import dge_derivative
from .functional import LowBitLinearFunction, lowbit_linear, quantize_weight
from .linear import LowBitLinear
from .recipe import OPERANDS, RECIPE_NAMES, RECIPES, Operand, Recipe, get_recipe, load_recipe
from .smooth_swiglu import SmoothSwiGLU

__all__ = [
    "LowBitLinear", "LowBitLinearFunction", "lowbit_linear", "quantize_weight", "convert", "unconvert",
    "ConversionSummary", "Recipe", "Operand", "RECIPES", "RECIPE_NAMES", "OPERANDS", "get_recipe", "load_recipe",
    "SmoothSwiGLU", "dge_derivative",
]
