"""Safe / harmful prompt separation of a model (`lowbit eval --separation`, ``align.separation_data``).

The data is JSONL, one prompt per line: ``{"prompt": "...", "label": "safe"}`` or ``"harmful"``
(``"aligned"`` / ``"unaligned"`` are synonyms). Each prompt is wrapped as a user turn by the model's chat
template when it has one, and `lowbit.objectives.prompt_separation` measures how far apart the two sets
lie in the hidden states (Bhattacharyya distance of the 2-D PCA projection, silhouette, and a
permutation test), as in the KLDO paper (Haldar et al., arXiv:2502.00657).
"""
from __future__ import annotations

import torch

from ..objectives import prompt_separation
from .corpus import DataError, jsonl

LABELS = {"safe": True, "aligned": True, "harmful": False, "unaligned": False}
MIN_PER_SIDE = 3  # the 2-D projection's covariance needs more points than dimensions on each side
FORMAT = ('JSONL, one object per line: {"prompt": "...", "label": "safe" | "harmful"} '
          '("aligned" / "unaligned" also accepted); at least 3 prompts of each label')


def read_prompts(path: str) -> tuple[list[str], list[str]]:
    """(safe prompts, harmful prompts) of a separation file; errors name the file, the line and the key."""
    safe, harmful = [], []
    for n, rec in jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object; the format is {FORMAT}")
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f"{where}: prompt: expected a non-empty string")
        label = rec.get("label")
        if label not in LABELS:
            raise DataError(f"{where}: label: expected one of {', '.join(map(repr, LABELS))}, got {label!r}")
        (safe if LABELS[label] else harmful).append(rec["prompt"])
    if len(safe) < MIN_PER_SIDE or len(harmful) < MIN_PER_SIDE:
        raise DataError(f"{path}: need at least {MIN_PER_SIDE} safe and {MIN_PER_SIDE} harmful prompts, found "
                        f"{len(safe)} and {len(harmful)}; the format is {FORMAT}")
    return safe, harmful


def measure(model, tok, path: str, layer: int = -1) -> dict:
    """`prompt_separation` of the prompts in ``path`` at hidden ``layer``, plus the prompt counts and file.

    Neutral to the caller's RNG (quantized layers draw rounding seeds from it), so measuring before and
    after alignment does not change what the run trains."""
    safe, harmful = read_prompts(path)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            result = prompt_separation(model, tok, safe, harmful, layer=layer)
        except ValueError as e:  # e.g. a layer out of range, or prompts whose states span one dimension
            raise DataError(f"separation of {path}: {e}") from None
    return {"data": path, **result}


def brief(res: dict) -> str:
    """One line: distance, silhouette, p-value."""
    return (f"Bhattacharyya distance {res['bhattacharyya_distance']:.4g}, silhouette {res['silhouette']:.3f}, "
            f"p = {res['p_value']:.3g} ({'significant' if res['significant'] else 'not significant'}) "
            f"at layer {res['layer']}, {res['n_aligned']} safe / {res['n_unaligned']} harmful prompts")


def for_run(model, tok, cfg, when: str, say) -> dict | None:
    """The separation of ``align.separation_data`` for an align run (None otherwise), announced by ``say``."""
    if cfg.task != "align" or not cfg.align.separation_data:
        return None
    res = measure(model, tok, cfg.align.separation_data, cfg.align.separation_layer)
    say(f"separation ({when} model): {brief(res)}")
    return res
