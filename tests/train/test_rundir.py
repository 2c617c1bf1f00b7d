"""The run directory belongs to one run: its lock, resume-or-refuse, overwrite that moves aside, the
checks before step 1, manifests, and resume falling back past a damaged checkpoint (with a warning)."""
import json
import os
import shutil
import socket

import pytest
import torch

from _train_helpers import SMALL, TINY, losses

from lowbit.errors import CheckpointError, RunDirError, UserError
from lowbit.train import checkpoint as C, load, rundir, run

ENV = rundir.D.Env(0, 1, 0, torch.device("cpu"), "torch", False)


def _cfg(run_dir, cache_dir, *extra):
    return load([TINY], SMALL + ["train.steps=4", "train.checkpoint_every=2", "run.export_hf=false",
                                 f"data.cache_dir={cache_dir}", f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    d = str(tmp_path_factory.mktemp("rundir") / "run")
    run(_cfg(d, cache_dir))
    return d


def _copy(finished, tmp_path, name="run"):
    return shutil.copytree(finished, str(tmp_path / name))


def _claim(cfg):
    return rundir.claim(cfg, cfg.run.dir, ENV)


def test_lock_names_its_holder_and_is_released(tmp_path):
    first = rundir.Lock(str(tmp_path)).acquire()
    with pytest.raises(RunDirError) as err:
        rundir.Lock(str(tmp_path)).acquire()
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in str(err.value)
    first.release()
    assert not os.path.exists(tmp_path / rundir.LOCK)
    rundir.Lock(str(tmp_path)).acquire().release()


def test_stale_lock_is_reclaimed_with_a_message(tmp_path, capsys):
    with open(tmp_path / rundir.LOCK, "w") as f:  # what a killed run leaves: the file, no flock
        json.dump({"host": "gone", "pid": 999999, "started": "2001-01-01 00:00:00"}, f)
    lock = rundir.Lock(str(tmp_path)).acquire()
    err = capsys.readouterr().err
    assert "reclaimed the lock of a run that ended without releasing it (host gone, pid 999999" in err
    assert json.load(open(tmp_path / rundir.LOCK))["pid"] == os.getpid()
    lock.release()


def test_holds_run(tmp_path):
    assert not rundir.holds_run(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")  # what a run that failed in its data leaves
    assert not rundir.holds_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert rundir.holds_run(str(tmp_path))


def test_overwrite_moves_the_old_run_aside(finished, tmp_path, cache_dir, capsys):
    d = _copy(finished, tmp_path)
    before = sorted(os.listdir(d))
    lock, ckpt = _claim(_cfg(d, cache_dir, "run.resume=never", "run.overwrite=true"))
    assert ckpt is None and sorted(os.listdir(d)) == sorted([rundir.LOCK, "checkpoints"])
    lock.release()
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the previous run in {d!r} to" in capsys.readouterr().err
    old = str(tmp_path / aside[0])
    assert sorted(os.listdir(old)) == before  # nothing deleted, not even its lock file left behind
    assert all(C.verify(p) == [] for _, p in C.steps(C.ckpt_root(old)))


def test_resume_falls_back_past_a_damaged_checkpoint(finished, tmp_path, cache_dir, capsys):
    d = _copy(finished, tmp_path)
    with open(os.path.join(d, "checkpoints", "step_00000004", "model.pt"), "r+b") as f:
        f.truncate(100)
    out = run(_cfg(d, cache_dir))
    err = capsys.readouterr().err
    assert "step_00000004: model.pt: 100 bytes, expected" in err and "resuming from" in err
    aside = [n for n in os.listdir(os.path.join(d, "checkpoints")) if n.startswith("damaged-step_00000004-")]
    assert len(aside) == 1 and f"moved the damaged checkpoint to {os.path.join(d, 'checkpoints', aside[0])}" in err
    assert out["resumed_from_step"] == 2 and out["steps"] == 4
    assert all(C.verify(p) == [] for _, p in C.steps(C.ckpt_root(d)))  # step 4 was written again, whole
    assert losses(d) == losses(finished)  # steps 3-4 replayed from step 2 exactly as first trained


def test_resume_checks(finished, tmp_path, cache_dir, capsys):
    d = _copy(finished, tmp_path)
    lock, ckpt = _claim(_cfg(d, cache_dir, "quant.recipe=nvfp4"))  # another recipe: allowed, with a note
    lock.release()
    assert ckpt.endswith("step_00000004")
    assert "trained with quant.recipe=bf16, with quant.recipe=nvfp4" in capsys.readouterr().err
    lock, ckpt = _claim(_cfg(str(tmp_path / "other"), cache_dir, f"run.resume={d}"))  # a run dir: its newest
    lock.release()
    assert ckpt == os.path.join(d, "checkpoints", "step_00000004")


def test_leftover_partial_write_is_removed(finished, tmp_path, cache_dir, capsys):
    d = _copy(finished, tmp_path)
    os.makedirs(os.path.join(d, "checkpoints", ".tmp-step_00000006", "rng"))
    assert rundir.main([d]) == 0
    assert ".tmp-step_00000006  (an interrupted write; never used)" in capsys.readouterr().out
    lock, _ = _claim(_cfg(d, cache_dir))
    lock.release()
    assert "removed .tmp-step_00000006" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(d, "checkpoints", ".tmp-step_00000006"))


def test_manifest_lists_every_file(finished):
    ck = C.latest(finished)
    with open(os.path.join(ck, C.MANIFEST)) as f:
        files = json.load(f)["files"]
    on_disk = {os.path.relpath(os.path.join(r, n), ck) for r, _, ns in os.walk(ck) for n in ns} - {C.MANIFEST}
    assert set(files) == on_disk >= {"model.pt", "optimizer.pt", "trainer.pt", "rng/rank0.pt", "config.yaml"}
    assert all(files[k]["size"] == os.path.getsize(os.path.join(ck, k)) for k in files)


def test_disk_check_estimates_two_checkpoints(finished, monkeypatch):
    model = torch.nn.Linear(1000, 1000)
    rundir.check_disk(finished, model, load([], []))  # plenty of room here
    usage = shutil.disk_usage(finished)
    # 1M fp32 parameters + AdamW's two fp32 moments = 12 MB a checkpoint: 24 MB for two
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: usage._replace(free=23_000_000))
    with pytest.raises(RunDirError, match=r"0.02 GB free .* need about 0.02 GB"):
        rundir.check_disk(finished, model, load([], []))
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: usage._replace(free=25_000_000))
    rundir.check_disk(finished, model, load([], []))


# ---- refused before any work: one line naming the key or file ---------------------------------------
STEP2, STEP4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


class Case:
    """What a row of the table below works with: copies of the finished run, files, fresh run dirs."""

    def __init__(self, finished, tmp_path, cache_dir):
        self.finished, self.root, self.cache = finished, str(tmp_path), cache_dir

    def copy(self, name="run", *truncated):
        d = shutil.copytree(self.finished, os.path.join(self.root, name))
        for rel in truncated:
            with open(os.path.join(d, rel), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(d, rel)) // 2)
        return d

    def file(self, name, content=""):
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
        return path

    def claim(self, run_dir=None, *overrides):
        lock, ckpt = _claim(_cfg(run_dir or os.path.join(self.root, "fresh"), self.cache, *overrides))
        lock.release()
        return ckpt


def _read_only_checkpoints(c):
    os.makedirs(c.root + "/ro")
    os.symlink("/sys/kernel", c.root + "/ro/checkpoints")  # not writable, even by root
    c.claim(c.root + "/ro")


def _init_from_without_tokenizer(c):
    d = c.copy("notok")
    shutil.rmtree(f"{d}/{STEP4}/tokenizer")
    C.write_manifest(f"{d}/{STEP4}", 4)  # whole by its manifest, yet without a tokenizer
    c.claim(None, f"model.init_from={d}")


REFUSED = [  # (id, call(case), exception, substrings)
    ("never-on-a-run", lambda c: c.claim(c.copy(), "run.resume=never"), RunDirError,
     ["holds a run", "run.resume=auto", "run.overwrite=true"]),
    ("run-dir-unwritable", lambda c: c.claim("/sys/kernel/lowbit-run"), RunDirError, ["run.dir", "/sys/kernel"]),
    ("run-dir-is-a-file", lambda c: c.claim(c.file("afile", "x")), RunDirError, ["run.dir", "afile"]),
    ("checkpoints-read-only", _read_only_checkpoints, RunDirError, ["run.dir", "ro/checkpoints"]),
    ("all-checkpoints-damaged", lambda c: c.claim(c.copy("all", f"{STEP2}/model.pt", f"{STEP4}/model.pt")),
     CheckpointError, ["no intact checkpoint", "model.pt"]),
    ("resume-other-optimizer", lambda c: c.claim(c.copy(), "optim.name=stable_spam"), CheckpointError,
     ["optim.name 'adamw' -> 'stable_spam'"]),
    ("resume-other-shape", lambda c: c.claim(c.copy(), "model.hidden_size=128", "model.num_layers=3"),
     CheckpointError, ["model.hidden_size 64 -> 128", "model.num_layers 2 -> 3"]),
    ("resume-other-vocab", lambda c: c.claim(c.copy(), "data.vocab_size=600"), CheckpointError, ["data.vocab_size"]),
    ("init-from-no-checkpoint", lambda c: c.claim(None, f"model.init_from={os.path.dirname(c.file('e/x'))}"),
     CheckpointError, ["model.init_from", "no complete lowbit checkpoint"]),
    ("init-from-damaged", lambda c: c.claim(None, f"model.init_from={c.copy('init', f'{STEP4}/model.pt')}"),
     CheckpointError, ["model.init_from", "model.pt", "the newest intact one is", "step_00000002"]),
    ("init-from-no-tokenizer", _init_from_without_tokenizer, CheckpointError, ["model.init_from", "tokenizer"]),
    ("tokenizer-dir-without-files", lambda c: c.claim(None, f"data.tokenizer={os.path.dirname(c.file('t/a.md'))}"),
     UserError, ["data.tokenizer", "tokenizer.json"]),
]


@pytest.mark.parametrize("case", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_before_any_work(case, finished, tmp_path, cache_dir):
    _, call, exc, words = case
    with pytest.raises(exc) as err:
        call(Case(finished, tmp_path, cache_dir))
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
