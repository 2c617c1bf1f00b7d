#!/usr/bin/env python3
"""No host synchronisation inside a training step: the `sync` stage of scripts/gpu_check.py.

    python scripts/gpu_sync_check.py --out FILE.jsonl [--dry] [--seconds S]

For every recipe (lowbit.nn.RECIPE_NAMES) and each optimizer the train loop builds (adamw, its
default, and stable_spam, lowbit's fused one; spam and classp on bf16 only): a tiny Llama from
configs/pretrain/tiny.yaml, built by lowbit.train (model.build applies the recipe, optim.build the
optimizer), two warm-up steps (kernels compile, optimizer state appears), then one full step -
forward, the loop's nll loss, backward, optimizer step, zero_grad - under
torch.cuda.set_sync_debug_mode("error"). The first
synchronising operation raises; its message and the innermost lowbit frame of its traceback are
recorded, and any sync is a failure. The step is then run once more under the "warn" mode, which
lists every synchronising operation reached from Python code (not only the first) by its innermost
lowbit frame, or its torch / transformers frame where lowbit has none, with a count. With --dry (no
CUDA) the same steps run on the CPU without the debug mode: the code path only (on the CPU,
tests/optim/test_stable_spam_device.py and tests/objectives/test_device_only.py check that the
optimizer step and the losses read no tensor back to the host).

One JSON record per line, written as each run ends (a run cut short by the time limit still leaves
the others): recipe, optim, status (PASS | SYNC | ERROR | NOT RUN), message, frame, syncs (SYNC), seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ("adamw", "stable_spam")
OTHER_OPTIMIZERS = ("spam", "classp")  # lowbit's others, on the bf16 recipe only (the step is the same)
# The tiny config cut to two blocks (nvfp4 keeps the last 15 % of them in high precision): reduction dims of 256 and 512 so that every recipe quantizes every
# layer (int4's activation groups are 256 wide), and 4 x 32 = 128 tokens per step, a multiple of the
# 128-row blocks of the gradient GEMMs.
MODEL = ["model.hidden_size=256", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=512",
         "data.seq_len=32"]
BATCH, VOCAB, WARMUP = 4, 512, 2
SYNC_MARK = "synchronizing CUDA operation"  # what set_sync_debug_mode("error") raises


def lowbit_frame(tb) -> str:
    """The innermost traceback frame inside the lowbit package, as 'lowbit/x.py:LINE in func'."""
    return innermost(traceback.extract_tb(tb))


def innermost(frames) -> str:
    """The innermost of `frames` inside the lowbit package, else the innermost one of all (a sync of
    torch or transformers itself), as 'path:LINE in func'."""
    import lowbit

    pkg = os.path.dirname(os.path.abspath(lowbit.__file__))
    inside = [f for f in frames if os.path.abspath(f.filename).startswith(pkg + os.sep)]
    if not inside:
        if not frames:
            return "no Python frame"
        f = frames[-1]
        where = f.filename.split("site-packages" + os.sep)[-1]
        return f"not lowbit: {where}:{f.lineno} in {f.name}"
    f = inside[-1]
    return f"{os.path.relpath(f.filename, os.path.dirname(pkg))}:{f.lineno} in {f.name}"


def every_sync(step) -> list[dict]:
    """Run `step` under set_sync_debug_mode("warn"), which reports each synchronising operation as a
    warning instead of stopping at the first; -> [{frame, count}] in the order first seen."""
    import torch

    seen: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_MARK in str(message):
            frame = innermost(traceback.extract_stack()[:-1])
            seen[frame] = seen.get(frame, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [{"frame": f, "count": n} for f, n in seen.items()]


def one(recipe: str, optim: str, device: str, guard: bool) -> dict:
    import torch

    from lowbit.objectives import sft_loss
    from lowbit.train import config, model as model_mod, optim as optim_mod

    cfg = config.load([os.path.join(ROOT, "configs", "pretrain", "tiny.yaml")],
                      MODEL + [f"quant.recipe={recipe}", f"optim.name={optim}"])
    model = model_mod.build(cfg, VOCAB, {}).to(device)
    opt = optim_mod.build(model.parameters(), cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, cfg.data.seq_len), generator=g).to(device)

    def step():  # the loop's step for one micro-batch: forward, nll loss, backward, step, zero_grad
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        sft_loss(logits, ids[:, 1:], objective="nll").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    if not guard:
        step()
        return {"status": "PASS"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        if SYNC_MARK not in str(exc):
            raise
        out = {"status": "SYNC", "message": str(exc).splitlines()[0], "frame": lowbit_frame(exc.__traceback__)}
    else:
        out = None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if out is None:
        return {"status": "PASS"}
    # the first sync stopped the step: one more step lists all of them (those after it too)
    opt.zero_grad(set_to_none=True)
    out["syncs"] = every_sync(step)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON lines, one per (recipe, optimizer)")
    p.add_argument("--dry", action="store_true", help="on the CPU, without the sync debug mode")
    p.add_argument("--seconds", type=float, default=1e9, help="start no run after this many seconds")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    import lowbit.nn as lnn

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_sync_check: torch sees no CUDA device (use --dry on a machine without one)")
    deadline = time.monotonic() + args.seconds
    with open(args.out, "w") as out:
        for recipe in lnn.RECIPE_NAMES:
            for optim in OPTIMIZERS + (OTHER_OPTIMIZERS if recipe == "bf16" else ()):
                rec = {"recipe": recipe, "optim": optim}
                start = time.monotonic()
                if start > deadline:
                    rec.update(status="NOT RUN", message="the stage's time ran out")
                else:
                    try:
                        rec.update(one(recipe, optim, device, guard=not args.dry))
                    except Exception as exc:  # noqa: BLE001  (one broken run must not hide the others)
                        rec.update(status="ERROR", message=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                   frame=lowbit_frame(exc.__traceback__))
                rec["seconds"] = round(time.monotonic() - start, 2)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(f"[sync] {recipe} {optim}: {rec['status']} {rec.get('message', '')} {rec.get('frame', '')}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
