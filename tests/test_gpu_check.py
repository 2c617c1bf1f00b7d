"""scripts/gpu_check.py's judgements, on made-up inputs: the loss-curve verdict against the bf16
seed band, the pytest counts, the bench page. The whole script runs in CI as `make gpu-check DRY=1`;
these pin down the rules it applies to what the stages produce."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc  # its dataclasses look their module up there
spec.loader.exec_module(gc)


def write_run(run_dir, losses, val_loss=5.0, tokens_per_s=1000.0):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "kind": "train", "loss": loss, "lr": 1e-3}) + "\n")
        f.write(json.dumps({"step": len(losses), "kind": "eval", "val_loss": val_loss}) + "\n")
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"status": "completed", "tokens_per_s": tokens_per_s, "val_loss": val_loss}, f)


def test_final_loss_is_the_mean_of_the_last_steps(tmp_path):
    write_run(tmp_path / "r", [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    rec = dict(gc.read_run(str(tmp_path / "r")), status="completed")
    assert rec["losses"][1] == 9.0 and rec["val_loss"] == 5.0 and rec["tokens_per_s"] == 1000.0
    assert gc.final_loss(rec) == pytest.approx((7 + 6 + 5 + 4 + 3) / 5)
    assert gc.final_loss(dict(rec, status="rc 1")) is None
    assert gc.final_loss(dict(rec, losses={1: 2.0, 2: float("nan")})) is None


def judged(tmp_path, device_final, cpu_final, seeds=(3.00, 3.02, 3.05), steps=5, logged=5, recipes=("bf16", "nvfp4")):
    """Training.judge on made-up runs of `steps` steps that logged `logged` losses: bf16 seeds with
    the given finals on the GPU lane, and each recipe's GPU / CPU pair with flat curves at
    device_final[r] / cpu_final[r]."""
    t = gc.Training.__new__(gc.Training)
    t.c, t.steps, t.lane, t.recipes, t.dir = SimpleNamespace(dry=False), steps, "cuda", list(recipes), str(tmp_path)
    t.runs = {}
    flat = lambda v: {s: v for s in range(1, logged + 1)}  # noqa: E731
    for s, v in zip(gc.BAND_SEEDS, seeds):
        t.runs[t.run_name("bf16", "cuda", s)] = {"status": "completed", "losses": flat(v)}
    for r in recipes:
        if r != "bf16":
            t.runs[t.run_name(r, "cuda", 0)] = {"status": "completed", "losses": flat(device_final[r])}
        t.runs[t.run_name(r, "cpu", 0)] = {"status": "completed", "losses": flat(cpu_final[r])}
    return t.judge("train")


def test_a_gap_inside_the_seed_band_passes_and_one_outside_fails(tmp_path):
    res = judged(tmp_path, {"nvfp4": 3.10}, {"bf16": 3.01, "nvfp4": 3.14})  # band 0.05; gaps 0.01, 0.04
    assert res.status == "PASS", res.details
    res = judged(tmp_path, {"nvfp4": 3.10}, {"bf16": 3.01, "nvfp4": 3.20})  # nvfp4's gap 0.10 > band 0.05
    assert res.status == "FAIL" and "nvfp4" in res.note and "bf16" not in res.note.split("failed:")[-1]
    assert any("gap 0.1000 > band 0.0500" in line for line in res.details)


def test_a_missing_or_short_run_fails_and_without_a_band_nothing_passes(tmp_path):
    res = judged(tmp_path, {"nvfp4": 3.10}, {"bf16": 3.01, "nvfp4": 3.10}, steps=6, logged=6)
    short = judged(tmp_path, {"nvfp4": 3.10}, {"bf16": 3.01, "nvfp4": 3.10}, steps=6, logged=5)  # a run stopped early
    assert res.status == "PASS" and short.status == "FAIL" and any("5 of 6 finite losses" in x for x in short.details)
    t = gc.Training.__new__(gc.Training)
    t.c, t.steps, t.lane, t.recipes, t.dir, t.runs = SimpleNamespace(dry=False), 5, "cuda", ["bf16"], str(tmp_path), {}
    res = t.judge("train")  # nothing ran: no band, no curves
    assert res.status == "FAIL" and any("not measured" in line for line in res.details)


def test_junit_counts_and_note(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2"/>'
                   '</testsuites>')
    n = gc.junit_counts(str(xml))
    assert n == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2}
    assert gc.counts_note(n, 1) == "4 passed, 2 skipped, 1 failures"
    assert gc.junit_counts(str(tmp_path / "absent.xml")) == {}
    assert gc.counts_note({}, None) == "timed out"


def test_the_selected_test_files_exist_and_use_the_marker():
    cuda = gc.marked_files("cuda")
    assert "tests/ops/test_backend_cuda.py".replace("/", os.sep) in cuda
    for f in cuda + gc.marked_files("triton"):
        assert os.path.isfile(os.path.join(ROOT, f))


def test_the_edge_case_tests_run_in_both_test_stages():
    edge = os.path.join("tests", "ops", "test_gpu_edge_cases.py")
    assert edge in gc.marked_files("cuda") and edge in gc.marked_files("triton")
    assert "test_edge" in gc.DRY_TRITON_K  # a few of them in the interpreter on --dry


def test_sync_verdict(tmp_path):
    rec = lambda recipe, optim, status, **kw: dict(recipe=recipe, optim=optim, status=status, seconds=1.0, **kw)  # noqa: E731
    clean = [rec("bf16", "adamw", "PASS"), rec("bf16", "stable_spam", "PASS")]
    res = gc.sync_result("sync", clean, 0, dry=False)
    assert res.status == "PASS" and res.note == "2/2 steps without a host sync"
    syncs = [{"frame": "lowbit/optim/kernels.py:30 in grad_stats", "count": 2},
             {"frame": "not lowbit: transformers/masking_utils.py:776 in find_packed_sequence_indices", "count": 1}]
    synced = clean + [rec("nvfp4", "stable_spam", "SYNC", message="called a synchronizing CUDA operation",
                          frame="lowbit/optim/kernels.py:30 in grad_stats", syncs=syncs), rec("int4", "adamw", "NOT RUN")]
    res = gc.sync_result("sync", synced, 0, dry=False)
    assert res.status == "FAIL" and "failed: nvfp4/stable_spam, int4/adamw" in res.note  # every sync fails
    assert any("lowbit/optim/kernels.py:30 in grad_stats" in line for line in res.details)
    assert "| not lowbit: transformers/masking_utils.py:776 in find_packed_sequence_indices | 1 |" in res.details
    assert gc.sync_result("sync", [], None, dry=False).status == "FAIL"  # nothing ran: no verdict to give
    assert gc.sync_result("sync", clean, 1, dry=False).status == "FAIL"
    assert gc.sync_result("sync", clean, 0, dry=True).note.startswith("--dry: steps ran on the CPU")
    path = tmp_path / "sync.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synced))
    assert gc.read_jsonl(str(path)) == synced and gc.read_jsonl(str(tmp_path / "absent")) == []


def test_bench_page_lists_limits_and_cases(tmp_path):
    path = tmp_path / "qmatmul-quick.csv"
    cols = "machine,device,suite,case,shape,p50_ms,unit,rate,ratio_to_limit,speedup_vs_torch_mm,speedup_vs_torchao"
    rows = ["m,cpu,qmatmul,limit copy_GB/s,x,1,GB/s,11.96,,,",
            "m,cpu,qmatmul,fp8 q_proj,512x768x768,39.4,TFLOP/s,0.01533,0.2708,0.6066,n/a"]
    path.write_text("\n".join([cols, *rows]) + "\n")
    page = gc.bench_summary("m", "cpu", ["py", "-m", "lowbit", "bench", "qmatmul", "--quick"], [str(path)])
    assert "`lowbit bench qmatmul --quick`" in page
    assert "Limits: copy_GB/s 11.96." in page
    assert "| fp8 q_proj | 512x768x768 | 39.4 | 0.01533 TFLOP/s | 27.1 % | 0.61x | n/a |" in page


def test_shell_script_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")]).returncode == 0


def test_every_sync_lists_each_synchronising_frame(monkeypatch):
    """The sync check's second pass: each sync the step makes (reported by the "warn" debug mode as a
    warning) counted under its innermost lowbit frame. Faked on the CPU: Tensor.item warns as torch
    does on a GPU, and reading Stable-SPAM's `stats` after a step reads its two device counts."""
    import torch
    import warnings

    from lowbit.optim import StableSPAM

    path = os.path.join(ROOT, "scripts", "gpu_sync_check.py")
    sc_spec = importlib.util.spec_from_file_location("gpu_sync_check", path)
    sc = importlib.util.module_from_spec(sc_spec)
    sc_spec.loader.exec_module(sc)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    item = torch.Tensor.item

    def syncing_item(self):
        warnings.warn("called a synchronizing CUDA operation")
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", syncing_item)
    ps = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    opt = StableSPAM(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    assert sc.every_sync(opt.step) == []  # the step reads nothing back
    found = sc.every_sync(lambda: opt.stats)
    assert len(found) == 1 and found[0]["count"] == 2
    assert found[0]["frame"].startswith("lowbit/optim/_base.py:") and found[0]["frame"].endswith("in stats")
    assert sc.innermost([]) == "no Python frame"
