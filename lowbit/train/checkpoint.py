"""Atomic, verifiable, resumable checkpoints and the HF export.

A checkpoint ``<run>/checkpoints/step_00000100/`` holds

- ``model.pt``      the full model state_dict (rank 0; gathered under ZeRO-3)
- ``optimizer.pt``  the optimizer state_dict, Stable-SPAM statistics included (plain PyTorch engine)
- ``deepspeed/``    the DeepSpeed engine's own checkpoint (model/optimizer partitions of every rank)
- ``trainer.pt``    step, data position, scheduler, bad-step count, loss average, task state
- ``rng/rank<r>.pt`` the RNG states (torch, CUDA, Python, NumPy) of every rank
- ``ema/rank<r>.pt`` with ``train.ema``: the weight average, each rank's shard (`lowbit.train.ema`)
- ``config.yaml``, ``tokenizer/``
- ``MANIFEST.json`` every other file with its size and SHA-256, written last

It is written into ``.tmp-step_...``; when every rank has finished, rank 0 hashes and fsyncs every
file, writes the manifest (temp file, fsync, rename) and renames the folder. A crash mid-write
therefore never leaves a ``step_*`` folder, and `verify` proves a checkpoint whole before it is used.
Every file loads through `load_file` (``torch.load(weights_only=True)``), which names the file when
it is missing, damaged or asks to run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from ..errors import CheckpointError
from . import dist as D
from .loading import load_file, torch_error  # noqa: F401  (load_file: re-exported, the one loader)
from .model import hf_copy

_STEP = re.compile(r"^step_(\d{8})$")
MANIFEST = "MANIFEST.json"
# what every checkpoint holds whatever the engine; the manifest must list them
REQUIRED = ("model.pt", "trainer.pt", "config.yaml")


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def steps(root: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step_*`` folder under root (whole or not), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP.match(n)))


def complete(root: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints under root whose write finished (a manifest), oldest first."""
    return [(s, p) for s, p in steps(root) if os.path.isfile(os.path.join(p, MANIFEST))]


def latest(run_dir: str) -> str | None:
    found = complete(ckpt_root(run_dir))
    return found[-1][1] if found else None


# ---- manifest ------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to a temporary name, fsync, rename over `path`: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _sha256(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), folder) for f in sorted(files)]
    return [f for f in out if f != MANIFEST]


def write_manifest(folder: str, step: int) -> None:
    """Hash and fsync every file of `folder` (all ranks' files), then write the manifest atomically."""
    files = {}
    for rel in _files(folder):
        with open(os.path.join(folder, rel), "rb") as f:
            digest = _sha256(f)
            os.fsync(f.fileno())  # files of other ranks too: durable before the manifest vouches for them
            files[rel] = {"size": os.fstat(f.fileno()).st_size, "sha256": digest}
    for d, _, _ in os.walk(folder):
        _fsync_dir(d)
    manifest = {"format": 1, "step": step, "files": files}
    atomic_write(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())


def verify(ckpt: str) -> list[str]:
    """What is wrong with checkpoint folder `ckpt` (empty when every file matches its manifest)."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        return [f"no {MANIFEST} (its write was interrupted, or it was not written by this version of lowbit)"]
    try:
        with open(path, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        entries = [(rel, int(m["size"]), str(m["sha256"])) for rel, m in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{MANIFEST}: damaged ({type(e).__name__}: {e})"]
    problems = [f"{r}: not in the manifest" for r in REQUIRED if r not in files]
    for rel, size, digest in entries:
        full = os.path.normpath(os.path.join(ckpt, rel))
        if os.path.isabs(rel) or not full.startswith(os.path.normpath(ckpt) + os.sep):
            problems.append(f"{MANIFEST}: names a file outside the checkpoint ({rel!r})")
        elif not os.path.isfile(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, expected {size} (truncated or replaced)")
        else:
            with open(full, "rb") as f:
                if _sha256(f) != digest:
                    problems.append(f"{rel}: checksum mismatch (changed after it was written)")
    return problems


def newest_intact(run_dir: str, warn) -> tuple[str | None, list[str]]:
    """(newest checkpoint of the run that verifies, or None; the newer damaged ones). Each damaged one
    passed over is reported through `warn`."""
    damaged = []
    for _, path in reversed(steps(ckpt_root(run_dir))):
        problems = verify(path)
        if not problems:
            return path, damaged
        damaged.append(path)
        warn(f"checkpoint {path}: " + "; ".join(problems) + "; trying the one before it")
    return None, damaged


# ---- loading -------------------------------------------------------------------------------------
def load_hf(where: str, need_tokenizer: bool = True):
    """(model, tokenizer or None) of an HF export dir; a damaged export raises CheckpointError naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional and slow to import: only when loading

    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True)
    except Exception as e:  # transformers / safetensors raise many types for a damaged export
        raise torch_error(where, e) from None
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as e:  # an export without a tokenizer (e.g. the random base model of a seer smoke run)
        if need_tokenizer:
            raise CheckpointError(f"{where}: no loadable tokenizer ({type(e).__name__})") from None
        tok = None
    return model, tok


def load_trainer(ckpt: str) -> dict:
    return load_file(os.path.join(ckpt, "trainer.pt"))


# ---- RNG -----------------------------------------------------------------------------------------
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


# ---- save / restore ------------------------------------------------------------------------------
def _replace_dir(src: str, dst: str) -> None:
    """Rename folder src over dst; an existing dst is moved away first and removed only afterwards."""
    trash = None
    if os.path.exists(dst):
        trash = os.path.join(os.path.dirname(dst), ".replaced-" + os.path.basename(dst))
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(dst) or ".")
    if trash:
        shutil.rmtree(trash, ignore_errors=True)


def save(run_dir: str, step: int, *, env: D.Env, engine, trainer_state: dict, tokenizer, config_yaml: str,
         keep: int, ema=None) -> str:
    """Write checkpoint `step` of the `dist` step adapter `engine` (collective); returns its folder. `ema`
    (a `lowbit.train.ema.EMA`, or None) writes its shard of every rank into the same folder."""
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
    if ema is not None:
        ema.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{env.rank}.pt"))
    if env.main:
        torch.save(sd, os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    D.barrier(env)
    if env.main:
        write_manifest(tmp, step)  # last: vouches for what every rank wrote
        _replace_dir(tmp, final)  # the same step saved again (e.g. the end of a resumed run) replaces it
        for _, old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(env)
    return final


def restore(ckpt: str, *, env: D.Env, engine) -> dict:
    """Load model, optimizer, schedule (through the step adapter `engine`) and this rank's RNG; returns
    the trainer state."""
    state = load_trainer(ckpt)
    engine.load(ckpt, state)
    rng_file = os.path.join(ckpt, "rng", f"rank{env.rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(load_file(rng_file))
    return state


def export_hf(out_dir: str, model, state_dict: dict, tokenizer) -> str:
    """save_pretrained of a plain `transformers` model with the trained weights, plus the tokenizer."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_copy(model, state_dict).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for d, _, files in os.walk(tmp):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                os.fsync(fh.fileno())
    _replace_dir(tmp, out_dir)
    return out_dir
