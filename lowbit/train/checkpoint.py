"""Atomic, resumable checkpoints and the HF export.

A checkpoint ``<run>/checkpoints/step_00000100/`` holds

- ``model.pt``      the full model state_dict (rank 0; gathered under ZeRO-3)
- ``optimizer.pt``  the optimizer state_dict, Stable-SPAM statistics included (plain PyTorch engine)
- ``deepspeed/``    the DeepSpeed engine's own checkpoint (model/optimizer partitions of every rank)
- ``trainer.pt``    step, data position, scheduler, bad-step count, loss average, task state
- ``rng/rank<r>.pt`` the RNG states (torch, CUDA, Python, NumPy) of every rank
- ``config.yaml``, ``tokenizer/``

Everything lowbit writes loads with ``torch.load(weights_only=True)``. It is written into
``.tmp-step_...`` and renamed when every rank has finished, so a crash mid-write never leaves a
half checkpoint under a ``step_*`` name; `latest()` only ever sees complete ones.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from . import dist as D
from .model import hf_copy

_STEP = re.compile(r"^step_(\d{8})$")


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer.pt")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest(run_dir: str) -> str | None:
    found = complete(ckpt_root(run_dir))
    return found[-1][1] if found else None


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(run_dir: str, step: int, *, env: D.Env, engine, trainer_state: dict, tokenizer, config_yaml: str,
         keep: int) -> str:
    """Write checkpoint `step` of the `dist` step adapter `engine` (collective); returns its folder."""
    root = ckpt_root(run_dir)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, ".tmp-" + name)
    if env.main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    D.barrier(env)
    sd = engine.model_state()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{env.rank}.pt"))
    if env.main:
        torch.save(sd, os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))  # last file: marks the content complete
    D.barrier(env)
    if env.main:
        if os.path.exists(final):  # the same step saved again (e.g. end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(env)
    return final


def load_trainer(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=True)


def restore(ckpt: str, *, env: D.Env, engine) -> dict:
    """Load model, optimizer, schedule (through the step adapter `engine`) and this rank's RNG; returns
    the trainer state."""
    state = load_trainer(ckpt)
    engine.load(ckpt, state)
    rng_file = os.path.join(ckpt, "rng", f"rank{env.rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def export_hf(out_dir: str, model, state_dict: dict, tokenizer) -> str:
    """save_pretrained of a plain `transformers` model with the trained weights, plus the tokenizer."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_copy(model, state_dict).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
