"""A run directory belongs to one run.

`claim` runs before any model or data is built (rank 0 does the work, every rank gets the outcome):

- a lock (``<run dir>/.lowbit.lock``, an flock held for the run's life) stops a second run on the same
  directory, naming the holder; the kernel drops the flock of a dead process, so its stale lock is
  reclaimed (with a message);
- ``run.resume=never`` on a directory that holds a run refuses, unless ``run.overwrite=true``, which
  moves the old run aside to ``<dir>.old-<time>`` (nothing is deleted);
- ``run.resume=auto`` takes the newest checkpoint whose manifest verifies and says which damaged ones
  it passed over; a checkpoint given by path must verify;
- the run directory and its checkpoints folder are writable, model.init_from / align.reference hold a
  whole checkpoint or export, the tokenizer files exist, and a resumed checkpoint was written with the
  same model shape and optimizer.

`check_disk` runs once the model and optimizer exist: the free disk must hold two checkpoints.
``lowbit verify RUN_DIR`` (`main`) checks every checkpoint of a run against its manifest.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time

from ..errors import CheckpointError, RunDirError, UserError
from ..optim.state import state_bytes_per_param
from . import checkpoint as C
from . import config as cfgmod, dist as D, pretrained

LOCK = ".lowbit.lock"
# besides checkpoints/: what a run leaves
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "hf", "hf-ema")
# keys a checkpoint must share with the run that resumes it: the tensors' shapes and the optimizer state
SAME_ON_RESUME = ("task", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
                  "model.intermediate_size", "model.tie_embeddings", "model.dtype", "model.init_from",
                  "data.tokenizer", "optim.name", "optim.state_dtype")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def warn(text: str) -> None:
    print(f"lowbit: {text}", file=sys.stderr, flush=True)


# ---- the lock ------------------------------------------------------------------------------------
class Lock:
    """An exclusive flock on ``<dir>/.lowbit.lock``; the file says who holds it (host, pid, start time)."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path, self.fd = run_dir, os.path.join(run_dir, LOCK), None

    def acquire(self) -> "Lock":
        for _ in range(5):  # a holder that is finishing may unlink the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirError(f"run.dir {self.run_dir!r} is in use by another run ({holder}); wait for it to "
                                  "finish, or give this run another run.dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if os.fstat(fd).st_size:
                warn(f"run.dir {self.run_dir!r}: reclaimed the lock of a run that ended without releasing it "
                     f"({_holder(fd)})")
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunDirError(f"run.dir {self.run_dir!r}: could not take its lock {self.path!r} (it keeps changing)")

    def release(self, path: str | None = None) -> None:
        """Unlock and remove the lock file (at `path` where the directory was moved)."""
        if self.fd is None:
            return
        try:
            os.unlink(path or self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


# ---- claim: lock, resume or refuse, checks ------------------------------------------------------
def on_main(env: D.Env, fn):
    """fn() on rank 0, its result on every rank; an error there stops every rank (none waits forever)."""
    err, out = None, None
    if env.main:
        try:
            out = fn()
        except Exception as e:  # re-raised below, after the other ranks have been told
            err = e
    msg, out = D.broadcast(env, (None if err is None else str(err), out))
    if err is not None:
        raise err
    if msg is not None:
        raise RunDirError(f"rank 0 stopped: {msg}")
    return out


def claim(cfg, run_dir: str, env: D.Env) -> tuple[Lock | None, str | None]:
    """(the lock, held on rank 0; the checkpoint to resume from or None)."""
    box = {}

    def work():
        writable(run_dir)
        box["lock"] = Lock(run_dir).acquire()
        try:
            ckpt = _choose(cfg, run_dir, box)
            writable(C.ckpt_root(run_dir))
            for leftover in os.listdir(C.ckpt_root(run_dir)):
                if leftover.startswith(".tmp-step_") or leftover.startswith(".replaced-step_"):
                    shutil.rmtree(os.path.join(C.ckpt_root(run_dir), leftover), ignore_errors=True)
                    warn(f"removed {leftover}: a checkpoint write that was interrupted")
            check_sources(cfg)
            if ckpt is not None:
                check_same_run(cfg, ckpt)
            return ckpt
        except BaseException:
            box["lock"].release()
            raise

    ckpt = on_main(env, work)
    return box.get("lock"), ckpt


def writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunDirError(f"run.dir: cannot write to {path!r} ({e.strerror}); choose a writable run.dir") from None


def holds_run(run_dir: str) -> bool:
    root = C.ckpt_root(run_dir)
    return any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES) or (
        os.path.isdir(root) and any(not n.startswith(".lowbit-probe-") for n in os.listdir(root)))


def _choose(cfg, run_dir: str, box: dict) -> str | None:
    """The checkpoint to resume from (None: start fresh), after refusing or moving aside an old run."""
    resume = cfg.run.resume
    if resume == "never":
        if holds_run(run_dir):
            if not cfg.run.overwrite:
                raise RunDirError(
                    f"run.dir {run_dir!r} holds a run, and run.resume=never would mix a new one into it; continue "
                    "it with run.resume=auto, start fresh in another run.dir, or add run.overwrite=true to move "
                    f"it aside to {os.path.normpath(run_dir)}.old-<time>")
            _move_aside(run_dir, box)
        return None
    if resume == "auto" or os.path.isdir(C.ckpt_root(resume)):
        where = run_dir if resume == "auto" else resume
        ckpt, damaged = C.newest_intact(where, warn)
        if ckpt is None and damaged:
            raise CheckpointError(
                f"run.resume={resume}: no intact checkpoint in {C.ckpt_root(where)!r} ({damaged[0]}: "
                + "; ".join(C.verify(damaged[0])) + "); start over with run.resume=never run.overwrite=true "
                "(the run is moved aside)")
        if damaged and resume == "auto":
            # renamed, not deleted: kept for inspection, and no longer counted as this run's checkpoints
            # (pruning, `latest`, model.init_from would otherwise still see them)
            for path in damaged:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                aside = os.path.join(os.path.dirname(path), f"damaged-{os.path.basename(path)}-{stamp}")
                os.rename(path, aside)
                warn(f"moved the damaged checkpoint to {aside}")
        if damaged:
            warn(f"resuming from {ckpt}, the newest intact checkpoint")
        return ckpt
    problems = C.verify(resume)
    if problems:
        raise CheckpointError(f"run.resume: {resume}: " + "; ".join(problems))
    return resume


def _move_aside(run_dir: str, box: dict) -> None:
    src = os.path.abspath(run_dir)
    dst = base = f"{src}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(dst):
        dst, n = f"{base}-{n}", n + 1
    try:
        os.rename(src, dst)  # the lock file moves with it, still held: no run can slip in
        os.makedirs(src)
    except OSError as e:
        raise RunDirError(f"run.overwrite: cannot move {run_dir!r} aside to {dst!r} ({e.strerror})") from None
    old, box["lock"] = box["lock"], Lock(run_dir).acquire()
    old.release(os.path.join(dst, LOCK))
    warn(f"run.overwrite: moved the previous run in {run_dir!r} to {dst!r}")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    if dotted in ("model.init_from", "data.tokenizer") and cfg is not None:
        return os.path.realpath(cfg)  # the same file, however the path was written
    return cfg


def check_same_run(cfg, ckpt: str) -> None:
    """A resumed checkpoint was written with this model shape and optimizer; a new recipe gets a note."""
    try:
        saved = cfgmod.structured(cfgmod.Config, [os.path.join(ckpt, "config.yaml")])
    except cfgmod.ConfigError as e:
        raise CheckpointError(f"run.resume: {ckpt}: its config.yaml does not load ({e})") from None
    keys = list(SAME_ON_RESUME)
    if cfg.data.tokenizer is None and cfg.model.init_from is None:
        keys.append("data.vocab_size")  # the trained BPE's size sets the embedding's
    diff = [f"{k} {_get(saved, k)!r} -> {_get(cfg, k)!r}" for k in keys if _get(saved, k) != _get(cfg, k)]
    if diff:
        raise CheckpointError(f"run.resume: {ckpt} was written with another model shape or optimizer ("
                              + ", ".join(diff) + "); resume with the same values, or start this run in another "
                              "run.dir")
    if saved.quant.recipe != cfg.quant.recipe:
        warn(f"note: resuming {ckpt}, trained with quant.recipe={saved.quant.recipe}, with "
             f"quant.recipe={cfg.quant.recipe}")


def check_sources(cfg) -> None:
    """model.init_from and align.reference hold a whole checkpoint or export; the tokenizer files exist."""
    for key, path in (("model.init_from", cfg.model.init_from), ("align.reference", cfg.align.reference)):
        if path is not None and (key == "model.init_from" or cfg.task == "align"):
            check_source(key, path)
    if cfg.model.init_from_ema and cfg.model.init_from is not None:
        kind, where = pretrained.resolve(cfg.model.init_from)
        if kind == "hf" or not os.path.isdir(os.path.join(where, "ema")):
            raise CheckpointError(f"model.init_from_ema: {where!r} holds no EMA weights (ema/rank*.pt of a run "
                                  "trained with train.ema); an hf-ema/ export is loaded as model.init_from without "
                                  "the flag")
    tok = cfg.data.tokenizer
    if tok is not None and os.path.isdir(tok) and not any(os.path.isfile(os.path.join(tok, f))
                                                          for f in TOKENIZER_FILES):
        raise UserError(f"data.tokenizer: {tok!r} holds none of {list(TOKENIZER_FILES)}")


def check_source(key: str, path: str) -> None:
    try:
        kind, where = pretrained.resolve(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{key}: {e}") from None
    if kind == "hf":
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(where)):
            raise CheckpointError(f"{key}: {where!r} has config.json but no weights (*.safetensors / *.bin)")
        return
    newest = os.path.normpath(where) != os.path.normpath(path)  # a run dir: resolve picked its newest checkpoint
    if newest or os.path.isfile(os.path.join(where, C.MANIFEST)):  # (a hand-made folder may have no manifest)
        problems = C.verify(where)
        if problems:
            better = C.newest_intact(path, lambda s: None)[0] if newest else None
            hint = f"; the newest intact one is {better!r}" if better else ""
            raise CheckpointError(f"{key}: {where}: " + "; ".join(problems) + hint)
    tdir = os.path.join(where, "tokenizer")
    if not any(os.path.isfile(os.path.join(tdir, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(f"{key}: {where!r} has no tokenizer ({tdir}/tokenizer.json)")


def check_disk(run_dir: str, model, cfg) -> None:
    """The free disk holds two checkpoints (the newest is kept until the next one is whole)."""
    seen, n, param_bytes = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            numel = getattr(p, "ds_numel", p.numel())
            n, param_bytes = n + numel, param_bytes + numel * p.element_size()
    per_param = state_bytes_per_param(cfg.optim.state_dtype if cfg.optim.name in ("stable_spam", "spam") else "fp32")
    need = 2 * (param_bytes + n * per_param)
    free = shutil.disk_usage(C.ckpt_root(run_dir)).free
    if free < need:
        raise RunDirError(f"run.dir: {free / 1e9:.2f} GB free on {os.path.abspath(run_dir)!r}, but two checkpoints of "
                          f"{n / 1e6:.1f}M parameters and their optimizer state need about {need / 1e9:.2f} GB; "
                          "free space or choose another run.dir")


# ---- lowbit verify -------------------------------------------------------------------------------
def _size(folder: str) -> str:
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    return f"{total / 1e6:.1f} MB"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit verify", description="check every checkpoint of a run (each file's "
                                "size and SHA-256 against the checkpoint's MANIFEST.json)")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="a run dir (or one checkpoint folder)")
    args = p.parse_args(argv)
    bad = 0
    for path in args.paths:
        if os.path.isfile(os.path.join(path, C.MANIFEST)) or C._STEP.match(os.path.basename(path.rstrip("/"))):
            folders = [path]
        else:
            if not os.path.isdir(path):
                raise UserError(f"{path!r}: no such run directory")
            folders = [f for _, f in C.steps(C.ckpt_root(path))]
            root = C.ckpt_root(path)
            for n in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                if n.startswith(".tmp-step_"):
                    print(f"unfinished  {os.path.join(root, n)}  (an interrupted write; never used)")
                elif n.startswith("damaged-step_"):
                    print(f"set aside   {os.path.join(root, n)}  (found damaged by a resume; never used)")
            if not folders:
                raise UserError(f"{path!r}: no checkpoints (expected {root}/step_*)")
        for f in folders:
            problems = C.verify(f)
            bad += bool(problems)
            print(f"DAMAGED     {f}: " + "; ".join(problems) if problems else f"ok          {f}  ({_size(f)})")
    print(f"{bad} damaged checkpoint(s)" if bad else "every checkpoint is intact")
    return 1 if bad else 0
