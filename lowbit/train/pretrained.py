"""Loading a trained model back: a run dir, a lowbit checkpoint dir, or an HF export dir.

Files are read through `checkpoint.load_file` / `checkpoint.load_hf` (``torch.load(weights_only=True)``,
errors name the file); the architecture comes from the checkpoint's own config.yaml, the tokenizer
from its tokenizer/ folder.
"""
from __future__ import annotations

import os

from ..errors import CheckpointError
from . import checkpoint as C
from . import config as cfgmod, corpus, ema as E, tokenizer as tk
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
    raise FileNotFoundError(f"{path!r} holds no complete lowbit checkpoint (checkpoints/step_*/MANIFEST.json), "
                            "no model.pt + trainer.pt and no HF config.json")


def checkpoint_config(ckpt: str) -> cfgmod.Config:
    return cfgmod.load([os.path.join(ckpt, "config.yaml")])


def load(path: str, *, need_tokenizer: bool = True, ema: bool = False):
    """(unconverted HF model with the trained weights, tokenizer). The caller applies its own recipe.

    With ``need_tokenizer=False`` an HF export without a tokenizer loads with tokenizer None. With
    ``ema=True`` a lowbit checkpoint (or run dir) gives its EMA weights (``train.ema``) instead of the
    raw ones; an HF export holds one set of weights (the run's ``hf-ema/`` is the EMA one)."""
    from transformers import AutoTokenizer  # optional and slow to import: only when loading

    kind, where = resolve(path)
    if kind == "hf" and ema:
        raise CheckpointError(f"{where}: an HF export holds one set of weights; for the EMA weights load the "
                              "run's hf-ema/ export, or a lowbit checkpoint / run dir trained with train.ema")
    if kind == "hf":
        model, tok = C.load_hf(where, need_tokenizer)
        if tok is not None and tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # GPT-2-style tokenizers have none; padding carries label -100 anyway
        return model, tok
    saved = checkpoint_config(where)
    saved.quant.recipe, saved.quant.smooth_swiglu = "bf16", False
    tok = AutoTokenizer.from_pretrained(os.path.join(where, "tokenizer"), local_files_only=True)
    model = _skeleton(where, saved, tok)
    model.load_state_dict(C.load_file(os.path.join(where, "model.pt")))
    if ema:
        model.load_state_dict(E.overlay(model, model.state_dict(), E.assemble(where)[0]))
    return model, tok


def _skeleton(ckpt: str, saved: cfgmod.Config, tok):
    """An untrained model of the checkpoint's architecture. The run that built the model from scratch holds
    it (lowbit's Llama, by its model.* keys); a run started from an HF model has that model's config.json,
    found by following model.init_from through earlier runs, else in the run's own hf/ export."""
    from transformers import AutoConfig, AutoModelForCausalLM  # optional and slow to import: only when loading

    src, hops, root = saved.model.init_from, 0, saved
    while src and hops < 32:
        hops += 1
        if not os.path.exists(src):
            export = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "hf")
            if os.path.isfile(os.path.join(export, "config.json")):
                src = export
                continue
            break  # the source is gone: assume lowbit's Llama, as the checkpoint's model.* keys describe
        kind, where = resolve(src)
        if kind == "hf":
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where, local_files_only=True))
        root = checkpoint_config(where)
        src = root.model.init_from
    root.quant.recipe, root.quant.smooth_swiglu = "bf16", False
    return build(root, len(tok), special_ids(tok))


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
