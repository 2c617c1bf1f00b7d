"""`lowbit merge`: the weights (uniform, WSM) and the merged checkpoint of a tiny run's last checkpoints."""
import json
import math
import os
import shutil

import pytest
import torch

from _train_helpers import SMALL, TINY, lowbit_cli

from lowbit.errors import UserError
from lowbit.train import checkpoint as C
from lowbit.train import load, merge as M, pretrained, run


# ---- the weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", sorted(M.DECAYS))
@pytest.mark.parametrize("steps", [[100, 200, 300, 400, 500], [2, 4, 6], [10, 20, 45], [7, 8]])
def test_wsm_weights_are_a_convex_combination(steps, decay):
    c = M.wsm_coefficients(steps, decay)
    assert len(c) == len(steps) and min(c) >= 0 and math.isclose(sum(c), 1.0, abs_tol=1e-12)


def test_wsm_weights_are_the_decay_they_emulate():
    """w_i = c_i + ... + c_k is the decay at u_i = i / (k + 1) for evenly spaced checkpoints."""
    steps = [100, 200, 300, 400, 500]
    c = M.wsm_coefficients(steps, "cosine")
    for i in range(1, 5):
        assert math.isclose(sum(c[i:]), (1 + math.cos(math.pi * i / 5)) / 2, abs_tol=1e-12)
    assert c == pytest.approx(c[::-1])  # a cosine is symmetric: so is its merge
    sq = M.wsm_coefficients(steps, "1-sqrt")
    assert sq == sorted(sq, reverse=True)  # a fast early decay keeps the merge near the older checkpoints
    # averaging evenly spaced checkpoints is a linear decay to 0 one interval after the last
    assert M.wsm_coefficients(steps, "linear") == pytest.approx(M.coefficients(steps, "uniform"))
    assert M.wsm_coefficients([5], "cosine") == [1.0]


def test_average_of_identical_state_dicts_is_the_identity():
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
          "n": torch.tensor([3, 4])}
    for coeffs in ([1 / 3] * 3, M.wsm_coefficients([10, 20, 30], "cosine")):
        out = M.average([sd, sd, sd], coeffs)
        assert all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)


def test_average_refuses_different_models():
    a, b = {"w": torch.zeros(2)}, {"w": torch.zeros(3)}
    with pytest.raises(Exception, match="not the same model"):
        M.average([a, b], [0.5, 0.5])


# ---- a run's checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    d = str(tmp_path_factory.mktemp("merge") / "run")
    cfg = load([TINY], SMALL + ["train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                                f"run.dir={d}", f"data.cache_dir={cache_dir}", "run.export_hf=false"],
               task="pretrain")
    run(cfg)
    return d


def _weights(ckpt):
    return C.load_file(os.path.join(ckpt, "model.pt"))


def test_uniform_merge_of_a_run_is_the_average(run_dir, tmp_path):
    out = str(tmp_path / "merged")
    info = M.merge(run_dir, 3, out)
    assert [c["step"] for c in info["checkpoints"]] == [2, 4, 6]
    sds = [_weights(p) for _, p in C.complete(C.ckpt_root(run_dir))]
    got = _weights(out)
    for k, v in got.items():
        want = (sds[0][k].double() + sds[1][k].double() + sds[2][k].double()) / 3
        assert torch.allclose(v.double(), want, rtol=0, atol=2 * torch.finfo(v.dtype).eps * want.abs().max().item()), k
    assert not C.verify(out)
    # a checkpoint every loader takes: lowbit's own and the HF export
    model, _ = pretrained.load(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in got.items() if k in model.state_dict())
    hf_model, _ = C.load_hf(os.path.join(out, "hf"))
    for k, v in hf_model.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k].to(v.dtype)), k


def test_merge_of_identical_checkpoints_is_the_identity(run_dir, tmp_path):
    """Every checkpoint a copy of the newest one's weights: uniform and WSM merges give its weights back."""
    fake = str(tmp_path / "run")
    shutil.copytree(run_dir, fake)
    found = C.complete(C.ckpt_root(fake))
    newest = found[-1][1]
    for step, path in found[:-1]:
        shutil.copy2(os.path.join(newest, "model.pt"), os.path.join(path, "model.pt"))
        C.write_manifest(path, step)
    for weights in ("uniform", "wsm"):
        out = str(tmp_path / f"merged-{weights}")
        M.merge(fake, 3, out, weights=weights, export_hf=False)
        ref, got = _weights(newest), _weights(out)
        assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_wsm_and_its_errors(run_dir, tmp_path):
    out = str(tmp_path / "wsm")
    done = lowbit_cli(["merge", run_dir, "--last", "2", "--weights", "wsm", "--out", out, "--no-hf"])
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(out, "merge.json")) as f:
        info = json.load(f)
    assert [c["step"] for c in info["checkpoints"]] == [4, 6] and info["decay"] == "cosine"
    assert [c["weight"] for c in info["checkpoints"]] == pytest.approx(M.wsm_coefficients([4, 6], "cosine"))
    # too few checkpoints, an existing --out, a damaged checkpoint: one line each, exit 2
    again = lowbit_cli(["merge", run_dir, "--last", "5", "--out", str(tmp_path / "x")])
    assert again.returncode == 2 and "train.keep_checkpoints=5" in again.stderr
    exists = lowbit_cli(["merge", run_dir, "--last", "2", "--out", out])
    assert exists.returncode == 2 and "--overwrite" in exists.stderr


def test_damaged_checkpoint_is_refused(run_dir, tmp_path):
    fake = str(tmp_path / "run")
    shutil.copytree(run_dir, fake)
    path = C.complete(C.ckpt_root(fake))[0][1]
    with open(os.path.join(path, "model.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception, match="model.pt"):
        M.merge(fake, 3, str(tmp_path / "m"))
    with pytest.raises(UserError, match="inside the run's checkpoints"):
        M.merge(fake, 1, os.path.join(C.ckpt_root(fake), "merged"))
