"""`lowbit merge RUN_DIR --last N [--weights uniform|wsm] --out DIR`: average the last N checkpoints of a run.

The result is a lowbit checkpoint folder (``model.pt``, ``trainer.pt``, ``config.yaml``, ``tokenizer/``,
``merge.json``, ``MANIFEST.json``) with the HF export in ``DIR/hf``: `lowbit eval --checkpoint DIR`,
``model.init_from=DIR`` and ``from_pretrained(DIR/hf)`` all take it. It holds no optimizer state, so
it starts new runs but does not resume one.

Weights (checkpoints theta_0 .. theta_k, oldest first, at steps s_0 < ... < s_k):

* ``uniform``: c_j = 1 / (k + 1).
* ``wsm`` (Tian et al., 2025, "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for
  LLM Pre-training", arXiv 2507.17634): with a constant learning rate, theta_j = theta_0 - eta (d_1 +
  ... + d_j), d_i the update made between checkpoints i-1 and i. The merge sum_j c_j theta_j is then
  theta_0 - eta sum_i w_i d_i with w_i = c_i + ... + c_k: the run the merge stands for applied segment
  i at the fraction w_i of the learning rate. Any decay f (f(0) = 1, non-increasing, f(1) = 0) is
  emulated by w_i = f(u_i), ``u_i = (s_i - s_0) / (s_k - s_0 + h)`` (h = (s_k - s_0) / k, the mean
  checkpoint interval: the decay would reach 0 one interval after the last checkpoint), so

      c_j = w_j - w_{j+1}   (w_0 = 1, w_{k+1} = 0),

  non-negative and summing to 1 (the sum telescopes). ``--decay``: ``cosine`` (default, the decay of
  ``optim.schedule=cosine``) f(u) = (1 + cos(pi u)) / 2; ``1-sqrt`` f(u) = 1 - sqrt(u); ``linear``
  f(u) = 1 - u, which for evenly spaced checkpoints is exactly ``uniform``.

The average is taken in float64 and stored in each tensor's own dtype; tensors that are not floating
point (e.g. integer buffers) must be equal in every checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import torch

from ..errors import CheckpointError, UserError
from . import checkpoint as C
from . import pretrained

WEIGHTS = ("uniform", "wsm")
DECAYS = {
    "cosine": lambda u: (1.0 + math.cos(math.pi * u)) / 2.0,
    "1-sqrt": lambda u: 1.0 - math.sqrt(u),
    "linear": lambda u: 1.0 - u,
}


def wsm_coefficients(steps: list[int], decay: str = "cosine") -> list[float]:
    """WSM's merge coefficients c_0 .. c_k of checkpoints at `steps` (oldest first) for `decay`."""
    if decay not in DECAYS:
        raise UserError(f"--decay: expected one of {sorted(DECAYS)}, got {decay!r}")
    k = len(steps) - 1
    if k == 0:
        return [1.0]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise UserError(f"checkpoint steps must increase, got {steps}")
    f = DECAYS[decay]
    span = (steps[-1] - steps[0]) * (k + 1) / k
    w = [1.0] + [f((s - steps[0]) / span) for s in steps[1:]] + [0.0]
    return [w[j] - w[j + 1] for j in range(k + 1)]


def coefficients(steps: list[int], weights: str = "uniform", decay: str = "cosine") -> list[float]:
    if weights == "uniform":
        return [1.0 / len(steps)] * len(steps)
    if weights == "wsm":
        return wsm_coefficients(steps, decay)
    raise UserError(f"--weights: expected one of {list(WEIGHTS)}, got {weights!r}")


def average(state_dicts, coeffs: list[float]) -> dict:
    """sum_j coeffs[j] * state_dicts[j] per tensor (float64 accumulation, each tensor's dtype kept).
    `state_dicts` may be a generator: one state dict is held at a time besides the sum."""
    acc, ref, n = {}, None, 0
    for c, sd in zip(coeffs, state_dicts):
        n += 1
        if ref is None:
            ref = {k: (v.dtype, v.shape) for k, v in sd.items()}
        elif set(sd) != set(ref) or any(sd[k].shape != ref[k][1] for k in ref):
            diff = sorted(set(sd) ^ set(ref)) or [k for k in ref if sd[k].shape != ref[k][1]]
            raise CheckpointError(f"checkpoint {n} of the merge holds other tensors than the first ({diff[:4]}): "
                                  "not the same model")
        for k, v in sd.items():
            if v.is_floating_point():
                acc[k] = acc[k].add_(v.double(), alpha=c) if k in acc else v.double() * c
            elif k not in acc:
                acc[k] = v.clone()
            elif not torch.equal(acc[k], v):
                raise CheckpointError(f"{k}: a non-floating-point tensor differs between the checkpoints")
    if n != len(coeffs):
        raise ValueError(f"{len(coeffs)} coefficients for {n} state dicts")
    return {k: v.to(ref[k][0]) if ref[k][0].is_floating_point else v for k, v in acc.items()}


def last_checkpoints(run_dir: str, n: int) -> list[tuple[int, str]]:
    """(step, folder) of the newest `n` complete checkpoints of the run, oldest first; every one must verify."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir!r}: no such run directory")
    found = C.complete(C.ckpt_root(run_dir))
    if len(found) < n:
        listed = ", ".join(str(s) for s, _ in found) or "none"
        raise UserError(f"{run_dir!r} holds {len(found)} complete checkpoint(s) (steps: {listed}); --last {n} "
                        f"needs {n} (a run keeps train.keep_checkpoints of them: train with "
                        f"train.keep_checkpoints={n} or more and train.checkpoint_every set)")
    chosen = found[-n:]
    for _, path in chosen:
        problems = C.verify(path)
        if problems:
            raise CheckpointError(f"{path}: " + "; ".join(problems))
    return chosen


def merge(run_dir: str, last: int, out: str, weights: str = "uniform", decay: str = "cosine",
          overwrite: bool = False, export_hf: bool = True) -> dict:
    """Write the merge of the run's last `last` checkpoints to `out`; returns what merge.json holds."""
    if last < 1:
        raise UserError(f"--last: expected an int >= 1, got {last}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out!r} exists; choose another folder or pass --overwrite")
    root = os.path.abspath(C.ckpt_root(run_dir))
    if out == root or out.startswith(root + os.sep):
        raise UserError(f"--out {out!r} is inside the run's checkpoints folder, where a resume would take it "
                        "for a training checkpoint; choose a folder outside it")
    chosen = last_checkpoints(run_dir, last)
    steps = [s for s, _ in chosen]
    coeffs = coefficients(steps, weights, decay)
    merged = average((C.load_file(os.path.join(p, "model.pt"), map_location="cpu") for _, p in chosen), coeffs)

    newest = chosen[-1][1]
    info = {"run_dir": os.path.abspath(run_dir), "weights": weights, "decay": decay if weights == "wsm" else None,
            "checkpoints": [{"step": s, "path": os.path.abspath(p), "weight": c} for (s, p), c in zip(chosen, coeffs)]}
    tmp = os.path.join(os.path.dirname(out), ".tmp-merge-" + os.path.basename(out))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write(tmp, merged, info, newest, steps[-1], export_hf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    C._replace_dir(tmp, out)
    return info


def _write(tmp: str, merged: dict, info: dict, newest: str, step: int, export_hf: bool) -> None:
    torch.save(merged, os.path.join(tmp, "model.pt"))
    # a checkpoint's trainer state with no optimizer or data position: the loader sees the newest step
    torch.save({"step": step, "merged": info}, os.path.join(tmp, "trainer.pt"))
    shutil.copy2(os.path.join(newest, "config.yaml"), os.path.join(tmp, "config.yaml"))
    shutil.copytree(os.path.join(newest, "tokenizer"), os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "merge.json"), "w") as f:
        json.dump(info, f, indent=1)
    if export_hf:
        model, tok = pretrained.load(newest)
        C.export_hf(os.path.join(tmp, "hf"), model, merged, tok)
    C.write_manifest(tmp, step)  # last: vouches for every file above


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit merge", description="average the last N checkpoints of a run into a new "
                                "checkpoint folder with an HF export in DIR/hf (uniform weights, or WSM's weights "
                                "that emulate a learning-rate decay over the merged window)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--last", type=int, required=True, metavar="N", help="how many of the newest checkpoints")
    p.add_argument("--weights", choices=WEIGHTS, default="uniform")
    p.add_argument("--decay", choices=sorted(DECAYS), default="cosine", help="the decay --weights wsm emulates")
    p.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--no-hf", dest="export_hf", action="store_false", help="skip the HF export")
    args = p.parse_args(argv)
    info = merge(args.run_dir, args.last, args.out, args.weights, args.decay, args.overwrite, args.export_hf)
    for c in info["checkpoints"]:
        print(f"  step {c['step']:>8}  weight {c['weight']:.4f}  {c['path']}")
    print(f"merged {len(info['checkpoints'])} checkpoint(s) ({args.weights}"
          f"{', ' + args.decay if args.weights == 'wsm' else ''}) -> {os.path.abspath(args.out)}")
    return 0
