"""train.ema: the moving average of the master weights (lowbit/train/ema.py).

- the update rule on known sequences, exact (dyadic values, so fp32 and the rational closed form agree);
- train.ema=0 / null is off and builds nothing; bad values fail naming train.ema;
- a run resumed from a checkpoint ends with the EMA of the uninterrupted run, bit for bit;
- <run.dir>/hf-ema loads with transformers and holds the checkpoint's EMA; lowbit checkpoints give
  their EMA weights to `pretrained.load(ema=True)` (lowbit eval --ema, model.init_from_ema);
- under DeepSpeed ZeRO 3 and 2 (2 CPU ranks) each rank keeps the EMA of its own partition, and the
  gathered EMA equals the one-process EMA of the same weights bit for bit (see that test).
"""
import math
import os
import shutil
import socket
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from _train_helpers import SMALL, TINY, losses

import lowbit.train.checkpoint as ckpt_mod
from lowbit.errors import CheckpointError
from lowbit.train import config as cfgmod, ema as ema_mod, load, pretrained, run

HERE = os.path.dirname(os.path.abspath(__file__))


class _One(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))


def _ema_of(values, decay, dtype=torch.float32, every=1):
    """Run an EMA over a parameter set to values[0], values[1], ... (values[0] the initial weights)."""
    m = _One(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with torch.no_grad():
        m.w.copy_(torch.tensor(values[0], dtype=dtype))
    ema = ema_mod.EMA(m, opt, decay, every)
    for step, v in enumerate(values[1:], 1):
        with torch.no_grad():
            m.w.copy_(torch.tensor(v, dtype=dtype))
        ema.update(step)
    return ema, ema.full_state()["w"]


def _closed_form(values, decay, steps):
    """decay^n * w_0 + sum_k (1 - decay) decay^(n-k) w_k over the updating steps, in exact rationals."""
    d = Fraction(decay)
    e = [Fraction(x) for x in values[0]]
    for k in steps:
        e = [d * a + (1 - d) * Fraction(x) for a, x in zip(e, values[k])]
    return [float(a) for a in e]


def test_update_rule_on_a_known_sequence():
    """decay 0.75 and integer / dyadic weights: every intermediate is a dyadic rational with < 24
    significant bits over 8 steps, so the fp32 lerp is exact and must equal the closed form exactly."""
    values = [[1.0, -2.0, 0.5]] + [[float(k), float(-k) / 4, 3.0 - k] for k in range(1, 9)]
    ema, got = _ema_of(values, 0.75)
    assert ema.updates == 8 and got.dtype == torch.float32
    assert got.tolist() == _closed_form(values, 0.75, range(1, 9))
    # every=3: only steps 3 and 6 average
    ema3, got3 = _ema_of(values, 0.75, every=3)
    assert ema3.updates == 2 and got3.tolist() == _closed_form(values, 0.75, [3, 6])
    # no bias correction: the EMA starts at the initial weights, a constant sequence stays put
    _, const = _ema_of([[0.3, -7.0, 1e-3]] * 5, 0.999)
    assert const.tolist() == torch.tensor([0.3, -7.0, 1e-3]).tolist()


def test_bf16_parameters_average_in_fp32():
    """bf16 weights 1 and 2 (exact in bf16): the EMA 1 + 2^-2 + ... is kept in fp32, where bf16 (8
    significant bits) would round it: after 9 steps of decay 0.5 it is 2 - 2^-9, not representable in bf16."""
    values = [[1.0] * 3] + [[2.0] * 3] * 9
    _, got = _ema_of(values, 0.5, dtype=torch.bfloat16)
    assert got.tolist() == [2.0 - 2.0 ** -9] * 3
    assert torch.tensor(2.0 - 2.0 ** -9).bfloat16().float().item() != 2.0 - 2.0 ** -9


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "nan", "2"])
def test_bad_decay_is_refused_naming_the_key(bad):
    with pytest.raises(cfgmod.ConfigError) as e:
        load([TINY], [f"train.ema={bad}"])
    line = [x for x in str(e.value).splitlines() if "train.ema" in x]
    assert len(line) == 1 and "expected a decay in [0, 1)" in line[0]
    with pytest.raises(cfgmod.ConfigError, match="train.ema_every: expected an int >= 1"):
        load([TINY], ["train.ema=0.9", "train.ema_every=0"])
    with pytest.raises(cfgmod.ConfigError, match="model.init_from_ema"):
        load([TINY], ["model.init_from_ema=true"])


@pytest.mark.parametrize("off", ["0.0", "null"])
def test_ema_off_builds_nothing(tmp_path, cache_dir, monkeypatch, off):
    """train.ema=0 and null: no EMA object (no memory, no update), no ema/ in checkpoints, no hf-ema/."""
    class Refuse:
        def __init__(self, *a, **k):
            raise AssertionError("an EMA was built with train.ema off")
    monkeypatch.setattr(ema_mod, "EMA", Refuse)
    out = run(load([TINY], SMALL + ["train.steps=2", f"train.ema={off}", f"run.dir={tmp_path}",
                                    f"data.cache_dir={cache_dir}"]))
    assert out["status"] == "completed" and out["hf_ema_export"] is None and out["ema"] is None
    assert not os.path.exists(tmp_path / "hf-ema") and os.path.isdir(tmp_path / "hf")
    assert not os.path.exists(os.path.join(out["checkpoint"], "ema"))


STEPS = 6


def _ema_args(run_dir, cache_dir):
    return SMALL + [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=5",
                    "train.ema=0.8", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("ema-ref")
    return run(load([TINY], _ema_args(d, cache_dir))), str(d)


def _ema_file(run_dir, step):
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "ema", "rank0.pt"), weights_only=True)


def test_resume_ends_with_the_uninterrupted_ema(ref_run, tmp_path, cache_dir, monkeypatch):
    """The run dies while writing its last checkpoint, resumes from step 4 and trains steps 5-6 again:
    its final EMA (shards, update count) and hf-ema export equal the uninterrupted run's bit for bit."""
    ref_summary, ref = ref_run
    cut = str(tmp_path / "cut")
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("trainer.pt") and f".tmp-step_{STEPS:08d}" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(load([TINY], _ema_args(cut, cache_dir)))
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert ckpt_mod.latest(cut).endswith("step_00000004")
    out = run(load([TINY], _ema_args(cut, cache_dir)))
    assert out["resumed_from_step"] == 4 and losses(cut) == losses(ref)

    a, b = _ema_file(ref, STEPS), _ema_file(cut, STEPS)
    assert a["updates"] == b["updates"] == STEPS and a["table"] == b["table"]
    for x, y in zip(a["shards"], b["shards"]):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    # the EMA moved away from both the weights it started from and the final weights
    raw = torch.load(os.path.join(ref, "checkpoints", f"step_{STEPS:08d}", "model.pt"), weights_only=True)
    full = ema_mod.assemble(os.path.join(ref, "checkpoints", f"step_{STEPS:08d}"))[0]
    assert all(not torch.equal(full[n], raw[n].float()) for n in full)
    assert any(not torch.equal(x, y) for x, y in zip(_ema_file(ref, 2)["shards"], a["shards"]))
    from safetensors.torch import load_file
    ea, eb = load_file(os.path.join(ref, "hf-ema", "model.safetensors")), \
        load_file(os.path.join(cut, "hf-ema", "model.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_hf_ema_export_loads_and_holds_the_ema(ref_run):
    """hf-ema/ is a plain transformers model whose every parameter is the checkpoint's EMA (fp32 model,
    so equal bits; the tied LM head carries the embedding's EMA); hf/ keeps the raw weights.
    pretrained.load(ema=True) of the checkpoint gives the same weights; of an HF export it refuses."""
    from transformers import AutoModelForCausalLM

    summary, ref = ref_run
    assert summary["hf_ema_export"] == os.path.abspath(os.path.join(ref, "hf-ema")) and summary["ema"] == 0.8
    ckpt = os.path.join(ref, "checkpoints", f"step_{STEPS:08d}")
    full, head = ema_mod.assemble(ckpt)
    assert head["decay"] == 0.8 and head["updates"] == STEPS and not head["sharded"]
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ref, "hf-ema"), local_files_only=True)
    raw = AutoModelForCausalLM.from_pretrained(os.path.join(ref, "hf"), local_files_only=True)
    sd, rsd = hf.state_dict(), raw.state_dict()
    assert set(full) <= set(sd)
    for n, t in full.items():
        assert sd[n].dtype == torch.float32 and torch.equal(sd[n], t), n
        assert not torch.equal(rsd[n], t), n
    if hf.config.tie_word_embeddings:
        assert torch.equal(sd["lm_head.weight"], full["model.embed_tokens.weight"])

    for where in (ckpt, ref):  # the checkpoint folder, and the run dir (its newest checkpoint)
        model, _ = pretrained.load(where, ema=True)
        msd = model.state_dict()
        assert all(torch.equal(msd[n], t) for n, t in full.items())
    plain, _ = pretrained.load(ckpt)
    assert all(torch.equal(plain.state_dict()[n], rsd[n]) for n in full)
    with pytest.raises(CheckpointError, match="hf-ema"):
        pretrained.load(os.path.join(ref, "hf"), ema=True)


def test_init_from_ema_needs_a_checkpoint_with_an_ema(ref_run, tmp_path):
    from lowbit.train import rundir

    _, ref = ref_run
    rundir.check_sources(load([TINY], [f"model.init_from={ref}", "model.init_from_ema=true"]))
    with pytest.raises(CheckpointError, match="model.init_from_ema"):
        rundir.check_sources(load([TINY], [f"model.init_from={os.path.join(ref, 'hf')}", "model.init_from_ema=true"]))


# ---- ZeRO ------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    pytest.importorskip("deepspeed")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if shutil.which(torchrun) is None:
        pytest.skip("torchrun is not installed")
    tmp = tmp_path_factory.mktemp("ema-zero")
    out = tmp / "result.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(HERE, "_ema_zero_worker.py"), str(out), str(tmp / "ckpt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("stage", [3, 2])
def test_zero_ema_equals_the_one_process_ema(zero, stage):
    """The worker's ZeRO run kept a sharded EMA; here one process without DeepSpeed runs the full EMA over
    the same weights (gathered after each step). Bit for bit: the update is elementwise, so cutting the
    tensors into partitions changes no operation an element sees (torch's lerp kernel gives the same
    bits wherever an element sits in a tensor), and the gather adds -0.0 to every element, which is exact."""
    from _ema_zero_worker import DECAY, STEPS as ZSTEPS, make_model

    r = zero[stage]
    model = make_model()
    ema = None
    for t, w in enumerate(r["weights"]):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w[n])
        if ema is None:
            ema = ema_mod.EMA(model, torch.optim.SGD(model.parameters(), lr=0.0), DECAY)
        else:
            ema.update(t)
    one = ema.full_state()
    assert r["updates"] == ema.updates == ZSTEPS and set(r["ema"]) == set(one)
    for n, t in one.items():
        assert torch.equal(_bits(r["ema"][n]), _bits(t)), n
        assert torch.equal(_bits(r["assembled"][n]), _bits(t)), n  # rebuilt from the per-rank files alone
        assert not torch.equal(t, r["weights"][-1][n]) and not torch.equal(t, r["weights"][0][n]), n


@pytest.mark.parametrize("stage", [3, 2])
def test_zero_ema_is_sharded_and_reloads(zero, stage):
    """Each rank holds half of the EMA (ZeRO 3: ceil(numel / 2) of every tensor; ZeRO 2: half of the
    flat group, padded); a fresh EMA loaded from the rank files holds the saved bits on every rank."""
    from _ema_zero_worker import make_model

    r = zero[stage]
    shapes = [p.numel() for p in make_model().parameters()]
    total = sum(shapes)
    for loaded, numels, sharded in r["ranks"]:
        assert loaded and sharded
        if stage == 3:
            assert sum(numels) == sum(math.ceil(n / 2) for n in shapes)
        else:
            assert total / 2 <= sum(numels) < total / 2 + 64
    assert sum(sum(x[1]) for x in r["ranks"]) < total + 2 * len(shapes)


def test_zero_ema_matches_an_independent_one_process_run(zero):
    """End to end against one process without DeepSpeed that computes its own gradients (the two ranks'
    half batches at half weight, as test_zero.py does). ZeRO 3 rounds the gradients differently, so the
    weights differ slightly; the EMA is a convex combination of the weights, so its difference is at most
    the largest weight difference over the steps, plus the fp32 rounding of the two recurrences (a lerp
    rounds 3 times: <= 3 * 2^-24 * M per step and run, M the largest |weight|; 2 runs, STEPS steps)."""
    from _ema_zero_worker import DECAY, STEPS as ZSTEPS, batch, make_model, make_optimizer

    r = zero[3]
    model = make_model()
    opt = make_optimizer(model.parameters())
    ema = ema_mod.EMA(model, opt, DECAY)
    dw = {n: (p.detach() - r["weights"][0][n]).abs().max().item() for n, p in model.named_parameters()}
    for t in range(1, ZSTEPS + 1):
        x = batch(t)
        for h in range(2):
            (model(input_ids=x[2 * h:2 * h + 2], labels=x[2 * h:2 * h + 2]).loss * 0.5).backward()
        opt.step()
        opt.zero_grad()
        ema.update(t)
        for n, p in model.named_parameters():
            dw[n] = max(dw[n], (p.detach() - r["weights"][t][n]).abs().max().item())
    one = ema.full_state()
    for n, p in model.named_parameters():
        m = max(w[n].abs().max().item() for w in r["weights"])
        bound = dw[n] + 2 * ZSTEPS * 3 * 2.0 ** -24 * m
        assert (r["ema"][n] - one[n]).abs().max().item() <= bound, n
        assert (one[n] - p.detach()).abs().max().item() > bound, n  # the check can tell the EMA from the weights


@pytest.mark.slow
def test_zero3_training_run_saves_gathers_and_resumes_the_ema(tmp_path, cache_dir):
    """The training loop under `torchrun` + ZeRO 3 (2 CPU ranks): each rank writes its shard, hf-ema/ holds
    the gathered EMA, and a run resumed from step 2 (the step-4 checkpoint removed) ends with the same
    shards and export bit for bit."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from _train_helpers import child_env, lowbit_cli

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if shutil.which(torchrun) is None:
        pytest.skip("torchrun is not installed")
    d = str(tmp_path / "run")
    args = ["pretrain", "--config", TINY] + SMALL + [
        "train.steps=4", "train.checkpoint_every=2", "train.ema=0.8", "dist.zero_stage=3", "dist.engine=deepspeed",
        f"run.dir={d}", f"data.cache_dir={cache_dir}"]

    def launch():
        proc = lowbit_cli(args, timeout=300, env=child_env(DS_ACCELERATOR="cpu"),
                          launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port())])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    launch()
    last = os.path.join(d, "checkpoints", "step_00000004")
    first = {r: torch.load(os.path.join(last, "ema", f"rank{r}.pt"), weights_only=True) for r in (0, 1)}
    exported = load_file(os.path.join(d, "hf-ema", "model.safetensors"))
    full = ema_mod.assemble(last)[0]
    total = sum(t.numel() for t in full.values())
    for r in (0, 1):
        assert first[r]["sharded"] and first[r]["updates"] == 4 and sum(s.numel() for s in first[r]["shards"]) < total
    assert all(torch.equal(exported[n], t) for n, t in full.items())

    shutil.rmtree(last)
    assert "resumed from" in launch().stdout
    for r in (0, 1):
        again = torch.load(os.path.join(last, "ema", f"rank{r}.pt"), weights_only=True)
        assert again["updates"] == 4
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(first[r]["shards"], again["shards"]))
    resumed = load_file(os.path.join(d, "hf-ema", "model.safetensors"))
    assert resumed.keys() == exported.keys() and all(torch.equal(resumed[k], exported[k]) for k in exported)
