"""Bad inputs and hostile files: each is refused with one line that names the key or file, or handled.

Tables: the API (in-process), the CLI (a few subprocesses that stop before a model is built, run two
at a time, the rest through the same dispatcher in-process), the files of a checkpoint damaged in each
position, and the data-loss cases (a run directory reused, locked, or killed mid-checkpoint). One tiny
finished run is shared by every checkpoint case. What a run directory refuses before any work is
tabled in tests/train/test_rundir.py.
"""
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
from _train_helpers import REPO, SMALL, TINY, child_env  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import CheckpointError, UserError  # noqa: E402
from lowbit.cli import main as lowbit_main  # noqa: E402
from lowbit.nn import convert  # noqa: E402
from lowbit.optim import SPAM, StableSPAM  # noqa: E402
from lowbit.train import checkpoint as C, corpus, data as data_mod, load, rundir, run, tokenizer as tk  # noqa: E402

X = torch.linspace(-3, 3, 512).reshape(8, 64)
WEIGHTS = {"w": torch.arange(4096.0)}
STEP2, STEP4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


class Evil:
    """Pickles to a call of os.system: loading it must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncate(path):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


def garble(path):
    """Same size, different bytes in the middle (what bit rot or a bad copy leaves)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        f.write(bytes(random.Random(0).randrange(256) for _ in range(min(64, size - size // 2))))


class Ctx:
    """Files the cases use, under one module-scoped folder."""

    def __init__(self, root, run_dir, cache):
        self.root, self.run, self.cache = root, run_dir, cache

    def file(self, name, content):
        path = os.path.join(self.root, "files", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return path

    def copy_run(self, name):
        dst = os.path.join(self.root, "copies", name)
        shutil.copytree(self.run, dst)
        return dst

    def fresh(self):
        return os.path.join(self.root, "fresh", str(random.random()))

    def args(self, *overrides, run_dir=None):
        """Overrides of configs/pretrain/tiny.yaml: 4 tiny steps, checkpoints at steps 2 and 4."""
        return [*SMALL, "train.steps=4", "train.checkpoint_every=2", "run.export_hf=false",
                f"data.cache_dir={self.cache}", f"run.dir={run_dir or self.fresh()}", *overrides]

    def pretrain(self, *overrides, run_dir=None):
        return ["pretrain", "--config", TINY, *self.args(*overrides, run_dir=run_dir)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad-inputs"))
    c = Ctx(root, os.path.join(root, "tiny"), os.path.join(root, "cache"))
    run(load([TINY], c.args(run_dir=c.run)))  # the shared tiny finished run
    return c


# ---- the API ---------------------------------------------------------------------------------------
def _nvfp4(**kw):
    return lambda c: lowbit.quantize(X, "nvfp4", **kw)


def _warns(fn):
    def call(c):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fn()
    return call


def _docs(name, content):
    return lambda c: corpus.read_documents(c.file(name, content))


def _stable_spam():
    return StableSPAM([torch.nn.Parameter(torch.zeros(4))])


def _torch_file(c, name, obj, damage=lambda p: None):
    path = c.file(name, b"")
    torch.save(obj, path)
    damage(path)
    try:
        C.load_file(path)
    finally:
        assert not os.path.exists(os.path.join(c.root, "pwned")), "a hostile pickle ran code"


API = [  # (id, call(ctx), exception, substrings of its message)
    ("amax-nan", _nvfp4(global_amax=float("nan")), ValueError, ["global_amax", "nan"]),
    ("amax-inf", _nvfp4(global_amax=float("inf")), ValueError, ["global_amax", "inf"]),
    ("amax-minus-inf", _nvfp4(global_amax=-float("inf")), ValueError, ["global_amax"]),
    ("amax-zero", _nvfp4(global_amax=0.0), ValueError, ["global_amax", "> 0"]),
    ("amax-negative", _nvfp4(global_amax=-2.0), ValueError, ["global_amax"]),
    ("amax-negative-tensor", _nvfp4(global_amax=torch.tensor(-2.0)), ValueError, ["global_amax"]),
    ("amax-nan-tensor-check", _nvfp4(global_amax=torch.tensor(float("nan")), check=True), ValueError, ["global_amax"]),
    ("amax-inf-tensor-check", _nvfp4(global_amax=torch.tensor(float("inf")), check=True), ValueError, ["global_amax"]),
    ("amax-below-data-check", _nvfp4(global_amax=X.abs().amax() / 4, check=True), ValueError,
     ["below the data's amax"]),
    ("amax-number-below-data-check", _nvfp4(global_amax=float(X.abs().amax()) / 4, check=True), ValueError,
     ["below"]),
    ("convert-no-linear", _warns(lambda: convert(torch.nn.Sequential(torch.nn.ReLU()), "nvfp4")),
     UserWarning, ["converted no layer", "no nn.Linear"]),
    ("convert-all-kept", _warns(lambda: convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nvfp4", skip="*")),
     UserWarning, ["converted no layer", "kept"]),
    ("stable-spam-loads-adamw-state", lambda c: _stable_spam().load_state_dict(
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]).state_dict()), ValueError, ["gamma1", "theta"]),
    ("spam-loads-stable-spam-state", lambda c: SPAM([torch.nn.Parameter(torch.zeros(4))]).load_state_dict(
        _stable_spam().state_dict()), ValueError, ["SPAM"]),
    ("stable-spam-loads-a-model", lambda c: _stable_spam().load_state_dict({"weight": torch.zeros(4)}),
     ValueError, ["param_groups"]),
    ("load-hostile-pickle", lambda c: _torch_file(c, "hostile.pt", {"w": Evil(os.path.join(c.root, "pwned"))}),
     CheckpointError, ["hostile.pt", "refused", "posix.system"]),
    ("load-truncated", lambda c: _torch_file(c, "trunc.pt", WEIGHTS, truncate), CheckpointError,
     ["trunc.pt", "damaged"]),
    ("load-empty", lambda c: _torch_file(c, "empty.pt", WEIGHTS, lambda p: open(p, "wb").close()), CheckpointError,
     ["empty.pt"]),
    ("load-random-bytes", lambda c: C.load_file(c.file("noise.pt", random.Random(1).randbytes(4096))),
     CheckpointError, ["noise.pt", "damaged"]),
    ("load-missing", lambda c: C.load_file(os.path.join(c.root, "nope.pt")), CheckpointError, ["nope.pt", "missing"]),
    ("data-empty-file", _docs("empty.txt", ""), UserError, ["empty.txt", "no text"]),
    ("data-blank-file", _docs("blank.txt", "\n \n\t\n"), UserError, ["blank.txt"]),
    ("data-bad-json-line", _docs("bad.jsonl", '{"text": "a"}\n\n{"text": oops}\n'), UserError,
     ["bad.jsonl:3", "not valid JSON"]),
    ("data-missing-field", _docs("nofield.jsonl", '{"body": "a"}\n'), UserError,
     ["nofield.jsonl:1", "'text'"]),
    ("data-not-an-object", _docs("list.jsonl", '["text"]\n'), UserError, ["list.jsonl:1"]),
    ("data-field-not-string", _docs("num.jsonl", '{"text": 3}\n'), UserError, ["num.jsonl:1"]),
    ("data-binary-jsonl", _docs("bin.jsonl", b'{"text": "a"}\n\xff\xfe\x00\x81\n'), UserError,
     ["bin.jsonl:2", "UTF-8"]),
    ("data-random-bytes", _docs("noise.txt", random.Random(2).randbytes(20000)), UserError,
     ["noise.txt", "UTF-8"]),
    ("data-dir-without-text", lambda c: corpus.read_documents(os.path.dirname(c.file("d/x.bin", b"\0"))),
     UserError, ["no text"]),
    ("tokenizer-garbled-file", lambda c: tk.load_user(c.file("tok.json", "{not json")), UserError,
     ["data.tokenizer", "tok.json"]),
    ("tokenizer-dir-without-files", lambda c: tk.load_user(os.path.dirname(c.file("tokdir/readme.md", "x"))),
     UserError, ["data.tokenizer", "tokdir"]),
    ("optimizer-file-of-another-optimizer", lambda c: _stable_spam().load_state_dict(
        C.load_file(os.path.join(c.run, STEP4, "optimizer.pt"))), ValueError, ["gamma1"]),
]


@pytest.mark.parametrize("case", API, ids=[a[0] for a in API])
def test_api_refuses(case, ctx):
    _, call, exc, words = case
    with pytest.raises(exc) as err:
        call(ctx)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
    assert "weights_only" not in str(err.value)


def test_accepted_inputs_still_pass(ctx):
    """Near misses of the cases above pass: a covering amax, a tensor amax without check, a stray byte."""
    lowbit.quantize(X, "nvfp4", global_amax=X.abs().amax(), check=True)
    lowbit.quantize(X, "nvfp4", global_amax=X.abs().amax() / 4)  # without check=True: the caller's choice
    assert corpus.read_documents(ctx.file("latin.txt", b"plain text " * 400 + b"caf\xe9"))  # one stray Latin-1 byte


# ---- the token cache -------------------------------------------------------------------------------
class _FakeTok:
    """The part of a tokenizer the token cache reads: its size and a batch encoder."""
    eos_token_id = 0

    def __len__(self):
        return 16

    class backend_tokenizer:
        @staticmethod
        def encode_batch(docs, add_special_tokens=False):
            return [type("E", (), {"ids": [1, 2, 3]})() for _ in docs]


@pytest.mark.parametrize("bad,why", [
    (lambda p: np.save(p, np.arange(10, dtype=np.int64)), "int64"),
    (lambda p: np.save(p, np.array([1, 99], dtype=np.int32)), "token id 99"),
    (truncate, "does not load"),
], ids=["wrong-dtype", "id-beyond-vocab", "truncated"])
def test_token_cache_that_disagrees_is_rebuilt(bad, why, ctx, capsys):
    cfg = type("D", (), {"cache_dir": os.path.join(ctx.root, "tokcache")})
    good = data_mod._cached_stream(_FakeTok(), lambda: ["a", "b"], "k", cfg, "train")
    bad(os.path.join(cfg.cache_dir, "tokens-k-train.npy"))
    again = data_mod._cached_stream(_FakeTok(), lambda: ["a", "b"], "k", cfg, "train")
    assert (again == good).all()
    out = capsys.readouterr().out
    assert "tokens-k-train.npy" in out and why in out and "rebuilding" in out


# ---- checkpoints damaged in each position ------------------------------------------------------------
POSITIONS = ["model.pt", "optimizer.pt", "trainer.pt", "rng/rank0.pt", "config.yaml", "tokenizer/tokenizer.json",
             "MANIFEST.json"]


@pytest.mark.parametrize("damage", [truncate, garble, os.remove], ids=["truncated", "garbled", "missing"])
@pytest.mark.parametrize("rel", POSITIONS)
def test_damaged_checkpoint_is_named_and_passed_over(rel, damage, ctx):
    d = ctx.copy_run(f"{rel.replace('/', '-')}-{damage.__name__}")
    damage(os.path.join(d, STEP4, rel))
    problems = C.verify(os.path.join(d, STEP4))
    assert problems and (rel in " ".join(problems) or rel == "MANIFEST.json"), problems
    warned = []
    ckpt, damaged = C.newest_intact(d, warned.append)
    assert ckpt == os.path.join(d, STEP2) and len(damaged) == 1 and STEP4 in warned[0]
    assert rundir.main([d]) == 1  # lowbit verify


def test_trainer_file_that_verifies_but_asks_to_run_code(ctx):
    """A replaced file whose manifest was rewritten too still loads only as tensors."""
    d = ctx.copy_run("hostile-trainer")
    ck = os.path.join(d, STEP4)
    torch.save({"step": Evil(os.path.join(ctx.root, "pwned2"))}, os.path.join(ck, "trainer.pt"))
    C.write_manifest(ck, 4)
    with pytest.raises(CheckpointError, match="trainer.pt: refused"):
        C.load_trainer(ck)
    assert not os.path.exists(os.path.join(ctx.root, "pwned2"))


# ---- a run killed mid-checkpoint --------------------------------------------------------------------
def _claim(ctx, run_dir, *overrides):
    run_dir = run_dir or ctx.fresh()
    cfg = load([TINY], ctx.args(*overrides, run_dir=run_dir))
    lock, ckpt = rundir.claim(cfg, run_dir, rundir.D.Env(0, 1, 0, torch.device("cpu"), "torch", False))
    lock.release()
    return ckpt


# a run killed (SIGKILL) once every file of checkpoint 4 is written, before its manifest
KILLED_AT_STEP_4 = """
import os, signal, sys
import lowbit.train.checkpoint as C
from lowbit.train import load, run
real = C.write_manifest
C.write_manifest = lambda folder, step: os.kill(os.getpid(), signal.SIGKILL) if step == 4 else real(folder, step)
run(load([sys.argv[1]], sys.argv[2:]))
"""


def test_kill_9_during_a_checkpoint_write(ctx, capsys):
    """No step_4 appears, step 2 stays the newest intact checkpoint, the dead run's lock is reclaimed
    with a message naming it, and its half-written folder is removed."""
    d = os.path.join(ctx.root, "killed")
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_4, TINY, *ctx.args("train.steps=6", run_dir=d)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = os.path.join(d, "checkpoints")
    assert sorted(os.listdir(root)) == [".tmp-step_00000004", "step_00000002"]
    assert C.verify(os.path.join(root, "step_00000002")) == []
    with open(os.path.join(d, rundir.LOCK)) as f:
        dead = json.load(f)["pid"]
    assert _claim(ctx, d, "train.steps=6") == os.path.join(root, "step_00000002")
    err = capsys.readouterr().err
    assert f"without releasing it (host {socket.gethostname()}, pid {dead}, started" in err
    assert "removed .tmp-step_00000004" in err
    assert sorted(os.listdir(root)) == ["step_00000002"]


# ---- the CLI: one line, exit 2, no traceback --------------------------------------------------------
def _locked(c):
    d = c.copy_run("locked")
    c.held = rundir.Lock(d).acquire()
    return c.pretrain(run_dir=d)


def _hostile_checkpoint(c):
    d = os.path.join(c.copy_run("hostile-eval"), STEP4)
    os.remove(os.path.join(d, "MANIFEST.json"))  # a hand-made checkpoint folder: model.pt + trainer.pt
    torch.save({"w": Evil(os.path.join(c.root, "pwned3"))}, os.path.join(d, "model.pt"))
    return ["eval", "--checkpoint", d, "--batches", "1"]


def _damaged_resume(c):
    d = c.copy_run("explicit")
    garble(os.path.join(d, STEP4, "trainer.pt"))
    return c.pretrain(f"run.resume={d}/{STEP4}", run_dir=d)


# (id, argv(ctx), exit code, substrings of stderr, as a subprocess?) The subprocess cases stand for
# each kind of error; the others call the same dispatcher in-process (each process costs a torch import).
CLI = [
    ("unknown-key", lambda c: c.pretrain("train.stepz=3"), 2, ["train.stepz"], True),
    ("bad-value", lambda c: c.pretrain("optim.lr=-1"), 2, ["optim.lr"], False),
    ("overwrite-needs-never", lambda c: c.pretrain("run.overwrite=true"), 2, ["run.overwrite", "run.resume=never"],
     False),
    ("missing-config-file", lambda c: ["sft", "--config", "/no/such.yaml"], 2, ["/no/such.yaml"], False),
    ("empty-data-file", lambda c: c.pretrain(f"data.train={c.file('cli-empty.txt', '')}"), 2, ["cli-empty.txt"], True),
    ("malformed-jsonl", lambda c: c.pretrain("data.train=" + c.file("cli.jsonl", '{"text": "a"}\n{')), 2,
     ["cli.jsonl:2"], False),
    ("missing-field", lambda c: c.pretrain(f"data.train={c.file('cli2.jsonl', '{}')}"), 2, ["cli2.jsonl:1", "text"],
     False),
    ("random-bytes-data", lambda c: c.pretrain(f"data.train={c.file('cli.bin', random.Random(3).randbytes(9000))}"),
     2, ["cli.bin", "UTF-8"], False),
    ("garbled-tokenizer", lambda c: c.pretrain(f"data.tokenizer={c.file('cli-tok.json', 'garbage')}"), 2,
     ["data.tokenizer", "cli-tok.json"], False),
    ("unwritable-run-dir", lambda c: c.pretrain(run_dir="/sys/kernel/lowbit-cli"), 2, ["run.dir", "/sys/kernel"],
     False),
    ("resume-never-on-a-run", lambda c: c.pretrain("run.resume=never", run_dir=c.copy_run("cli-never")), 2,
     ["holds a run", "run.overwrite=true"], True),
    ("second-run-on-a-locked-dir", _locked, 2, ["in use by another run", f"pid {os.getpid()}"], True),
    ("damaged-explicit-resume", _damaged_resume, 2, ["trainer.pt", "checksum"], False),
    ("resume-other-optimizer", lambda c: c.pretrain("optim.name=stable_spam", run_dir=c.copy_run("cli-opt")), 2,
     ["optim.name"], False),
    ("eval-hostile-checkpoint", _hostile_checkpoint, 2, ["model.pt: refused"], False),
    ("verify-damaged-run", lambda c: (truncate(f"{c.copy_run('cli-verify')}/{STEP2}/trainer.pt"),
                                      ["verify", f"{c.root}/copies/cli-verify"])[1], 1, [], False),
    ("verify-no-such-dir", lambda c: ["verify", "/no/such/run"], 2, ["/no/such/run"], False),
]


@pytest.fixture(scope="module")
def cli_processes(ctx):
    """The subprocess cases (and --debug), two at a time: each is mostly interpreter start-up."""
    argvs = {case[0]: case[1](ctx) for case in CLI if case[4]}
    argvs["debug"] = ["--debug", *ctx.pretrain(run_dir="/sys/kernel/lowbit-debug")]
    cmd = [sys.executable, "-m", "lowbit"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(subprocess.run, cmd + a, cwd=REPO, env=child_env(), capture_output=True, text=True,
                                  timeout=300) for k, a in argvs.items()}
        results = {k: f.result() for k, f in futures.items()}
    ctx.held.release()
    return results


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_one_line(case, ctx, cli_processes, capsys):
    name, argv, code, words, sub = case
    if sub:
        p = cli_processes[name]
        rc, err, command = p.returncode, p.stderr, next(a for a in p.args[3:] if not a.startswith("-"))
    else:
        args = argv(ctx)
        rc, err, command = lowbit_main(args), capsys.readouterr().err, args[0]
    assert rc == code, err[-3000:]
    assert "Traceback" not in err and "weights_only" not in err, err[-3000:]
    if code == 2:
        assert any(ln.startswith(f"lowbit {command}: ") for ln in err.splitlines()), err[-1500:]
        for w in words:
            assert w in err, f"{w!r} not in {err[-1500:]!r}"


def test_cli_debug_shows_the_traceback(cli_processes, ctx):
    assert "Traceback" in cli_processes["debug"].stderr and "RunDirError" in cli_processes["debug"].stderr
    assert not os.path.exists(os.path.join(ctx.root, "pwned3"))
    with open(os.path.join(ctx.root, "copies", "cli-never", "metrics.jsonl")) as f:  # the refused run left it alone
        assert [json.loads(x)["step"] for x in f if '"train"' in x] == [1, 2, 3, 4]
