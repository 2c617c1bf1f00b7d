"""Loading a trained model back: a run dir, a lowbit checkpoint dir, or an HF export dir.

lowbit checkpoints are read with ``torch.load(weights_only=True)``; the architecture comes from the
checkpoint's own config.yaml, the tokenizer from its tokenizer/ folder.
"""
from __future__ import annotations

import os

import torch

from . import checkpoint as C
from . import config as cfgmod, corpus, tokenizer as tk
from .model import build


def resolve(path: str) -> tuple[str, str]:
    """("lowbit", checkpoint dir) or ("hf", export dir) for a run dir / checkpoint dir / HF dir."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint or directory: {path!r}")
    if os.path.isfile(os.path.join(path, "model.pt")) and os.path.isfile(os.path.join(path, "trainer.pt")):
        return "lowbit", path
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    newest = C.latest(path)
    if newest is not None:
        return "lowbit", newest
    raise FileNotFoundError(f"{path!r} holds no complete lowbit checkpoint (checkpoints/step_*/trainer.pt), "
                            "no model.pt + trainer.pt and no HF config.json")


def checkpoint_config(ckpt: str) -> cfgmod.Config:
    return cfgmod.load([os.path.join(ckpt, "config.yaml")])


def load(path: str, *, need_tokenizer: bool = True):
    """(unconverted HF model with the trained weights, tokenizer). The caller applies its own recipe.

    With ``need_tokenizer=False`` an HF export without a tokenizer loads with tokenizer None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional and slow to import: only when loading

    kind, where = resolve(path)
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True)
        try:
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        except Exception:  # an export without a tokenizer (e.g. the random base model of a seer smoke run)
            if need_tokenizer:
                raise
            tok = None
        return model, tok
    saved = checkpoint_config(where)
    saved.quant.recipe, saved.quant.smooth_swiglu = "bf16", False
    tok = AutoTokenizer.from_pretrained(os.path.join(where, "tokenizer"), local_files_only=True)
    model = build(saved, len(tok), special_ids(tok))
    sd = torch.load(os.path.join(where, "model.pt"), weights_only=True)
    model.load_state_dict(sd)
    return model, tok


def special_ids(tok) -> dict:
    return tk.special_ids(tok)


def default_tokenizer(cfg):
    """SFT / alignment without init_from: data.tokenizer, else the BPE of the embedded corpus."""
    if cfg.data.tokenizer is not None:
        return tk.load_user(cfg.data.tokenizer)

    class _Stdlib:  # the pretraining data settings of the embedded corpus
        tokenizer, vocab_size, cache_dir = None, cfg.data.vocab_size, cfg.data.cache_dir
    fp = f"stdlib-{corpus.stdlib_fingerprint(cfg.data.max_corpus_mb)}-{cfg.data.val_fraction}"
    return tk.get(_Stdlib, lambda: corpus.stdlib_split(cfg.data.val_fraction, cfg.data.max_corpus_mb)[0], fp)
