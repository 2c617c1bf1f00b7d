#!/usr/bin/env python3
"""The stages of `scripts/gpu_check.sh`: lowbit end to end on one GPU machine, in one time-boxed call.

    python scripts/gpu_check.py --out DIR [--dry] [--bench-in-repo] [--wheels DIR] [--budget S]

Stages, in order; each has its own time limit, and a failed stage does not stop the later ones:

  wheels        install the carried wheels (packages the GPU image lacks) from a folder, no index
  build         pip install -e . for the visible GPU's own architecture; import both extensions
  env           python -m lowbit.env
  tests-cuda    every test marked `cuda`; on a GPU a skipped one fails the stage (the backend did
                not load)
  tests-triton  the Triton tests (marked `triton`, or in a test_*triton*.py file), bit-exact with ref
                (both test stages include tests/ops/test_gpu_edge_cases.py: an input past one grid axis,
                a misaligned view, a non-default stream, NaN / Inf blocks)
  sync          scripts/gpu_sync_check.py: per recipe and optimizer (adamw, stable_spam), a tiny Llama's
                third training step under torch.cuda.set_sync_debug_mode("error"); PASS, or the first
                sync's message and lowbit frame; any sync fails the stage
  train         configs/pretrain/tiny.yaml for N steps per recipe on the GPU and on the CPU; each
                recipe's final-loss gap must lie inside the bf16 seed band measured on the GPU here
  bench         lowbit bench quantize qmatmul linear attention: CSVs plus a one-page summary

--dry runs the same stages on CPU at tiny sizes: the wheels are only listed, the build is the
existing one, the cuda tests must skip cleanly, a few Triton tests run in Triton's interpreter, the
"device" runs are CPU runs too (the degenerate comparison), the sync stage runs its steps on the
CPU without the debug mode (the code path only), and the bench uses the smallest shapes.

Everything is written under --out: summary.md (also printed), logs/<stage>.log, train/<run>/ (the
run's metrics.jsonl, summary.json, stdout.log) and bench/<machine>/ (the repo's
bench/results/<machine>/ with --bench-in-repo). GPU_CHECK_PACK=1 packs logs/, train/ and the plots
into gpu-check.tar.gz, for transports that carry back only a few files. Exit status 1 when a stage
failed.

Only the standard library is imported here: torch and lowbit are used through child processes,
so the driver runs before lowbit is built and survives whatever a stage breaks.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CORES = os.cpu_count() or 2

# Seconds each stage may take at most: (on a GPU, --dry). The whole call also has a budget
# (--budget); a stage gets the smaller of its own limit and what the budget leaves after keeping
# RESERVE_S for each stage still to come.
LIMITS = {
    "wheels": (60, 30),
    "build": (240, 60),
    "env": (60, 60),
    "tests-cuda": (120, 120),
    "tests-triton": (180, 180),
    "sync": (120, 240),
    "train": (300, 420),
    "bench": (150, 240),
}
RESERVE_S = 20

# Training: the tiny config as it is on a GPU; on --dry a model and corpus small enough that all
# recipes, twice, take about a minute on two cores. The dims stay multiples of 128 so that every
# recipe (128x128 weight blocks included) still quantizes every layer.
TRAIN_STEPS = (30, 3)
DRY_TRAIN = ["model.hidden_size=128", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256",
             "data.seq_len=32", "data.vocab_size=512", "data.max_corpus_mb=0.2", "train.micro_batch_size=4",
             "train.eval_batches=1"]
# Device runs at a time and the CPU threads of each: the GPU has room for several tiny runs, and
# a quarter of the cores keeps them clear of the CPU runs (one where two cores are all there is).
DEVICE_WORKERS = max(1, min(4, CORES // 4))
DEVICE_THREADS = 2 if CORES >= 8 else 1
BAND_SEEDS = (0, 1, 2)  # bf16 on the GPU with these seeds: the spread of their final losses is the band
FINAL_STEPS = 5  # the final loss is the mean train loss over the last FINAL_STEPS logged steps

# --dry runs a few Triton tests in the interpreter (all of them take minutes there); on a GPU, all.
DRY_TRITON_K = ("philox_known_answer or rounding_bits_match_ref or registry or triton_corners or block_pool "
                "or unsupported_combinations or fused_triton or (test_edge and mxfp8)")

BENCH_SUITES = ["quantize", "qmatmul", "linear", "attention"]
BENCH_ROWS = 10  # rows per suite in the one-page summary; the CSVs hold them all


@dataclass
class Result:
    stage: str
    status: str  # PASS | FAIL | SKIP
    seconds: float = 0.0
    note: str = ""
    details: list[str] = field(default_factory=list)  # markdown lines for the summary


class Check:
    def __init__(self, args):
        self.dry = args.dry
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        clear_previous(self.out)
        os.makedirs(self.logs, exist_ok=True)
        self.wheels = os.path.abspath(args.wheels)
        self.bench_in_repo = args.bench_in_repo
        self.deadline = time.monotonic() + args.budget
        self.results: list[Result] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # --dry is a CPU run, also on a machine with a GPU
        self.probe = {}
        self.train = None

    # ------------------------------------------------------------------------------------- helpers
    def log_path(self, stage: str) -> str:
        return os.path.join(self.logs, f"{stage}.log")

    def run(self, cmd: list[str], log: str, timeout: float, env: dict | None = None) -> int | None:
        """Run cmd in the repo root with its output appended to log; the exit status, or None when
        it ran past timeout (then it and every process it started are killed)."""
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                return p.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                kill_group(p)
                f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
                return None

    def python(self, *args: str, timeout: float = 120) -> str | None:
        """stdout of `python ARGS`, or None when it fails."""
        try:
            p = subprocess.run([PY, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return p.stdout if p.returncode == 0 else None

    def stage(self, name: str, fn, *, later: int) -> Result:
        """Run one stage inside its time box; an exception in the driver fails only that stage."""
        limit = min(LIMITS[name][self.dry], self.deadline - time.monotonic() - RESERVE_S * later)
        print(f"[gpu-check] {name} (at most {max(limit, 0):.0f} s)", flush=True)
        start = time.monotonic()
        if limit < 10:
            res = Result(name, "SKIP", 0.0, "no time left in the budget")
        else:
            try:
                res = fn(name, start + limit)
            except Exception as e:  # noqa: BLE001  (a bug in one stage must not hide the others)
                res = Result(name, "FAIL", note=f"driver error: {type(e).__name__}: {e}")
        res.seconds = time.monotonic() - start
        print(f"[gpu-check] {name}: {res.status} in {res.seconds:.0f} s  {res.note}", flush=True)
        if res.status == "FAIL" and os.path.exists(self.log_path(name)):
            print(tail(self.log_path(name), 30), flush=True)
        self.results.append(res)
        return res

    # -------------------------------------------------------------------------------------- stages
    def do_wheels(self, name: str, until: float) -> Result:
        wheels = sorted(glob.glob(os.path.join(self.wheels, "*.whl")))
        if not wheels:
            return Result(name, "SKIP", note=f"no wheels in {rel(self.wheels)} (make gpu-wheels makes them)")
        listing = ", ".join(os.path.basename(w).split("-")[0] + " " + os.path.basename(w).split("-")[1]
                            for w in wheels)
        mib = sum(os.path.getsize(w) for w in wheels) / 2**20
        if self.dry:  # they are built for the GPU machine's Python: list them, install nothing
            return Result(name, "SKIP", note=f"--dry: not installed ({mib:.1f} MiB: {listing})")
        # Into a folder of their own on PYTHONPATH: the machine's environment stays as it was.
        site = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lowbit-gpu-check-site")
        rc = self.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--upgrade", "--target", site, *wheels],
                      self.log_path(name), until - time.monotonic())
        if rc != 0:
            return Result(name, "FAIL", note=f"pip install from {rel(self.wheels)} failed (rc {rc})")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (site, self.env.get("PYTHONPATH")) if p)
        return Result(name, "PASS", note=f"{listing} ({mib:.1f} MiB)")

    def do_build(self, name: str, until: float) -> Result:
        log = self.log_path(name)
        if self.dry:  # the Makefile's .venv build is the one CI made; rebuilding it would cost minutes
            ok = self.python("-c", "import lowbit, lowbit._C; print(lowbit.__file__)")
            note = "--dry: existing CPU build of lowbit._C imports; no CUDA build"
            return Result(name, "PASS" if ok else "FAIL", note=note if ok else "lowbit._C does not import")
        cap = self.probe.get("capability")
        if not cap:
            return Result(name, "FAIL", note="torch sees no CUDA device (on a machine without one, use DRY=1)")
        major, minor = cap
        # Hopper and later have arch-specific instructions (wgmma, setmaxnreg) only in the "a" target.
        arch = f"{major}{minor}{'a' if major >= 9 else ''}"
        env = dict(self.env, LOWBIT_BUILD_CUDA="1", LOWBIT_CUDA_ARCHS=arch,
                   TORCH_CUDA_ARCH_LIST=f"{major}.{minor}{'a' if major >= 9 else ''}", MAX_JOBS=str(CORES))
        rc = self.run([PY, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."],
                      log, until - time.monotonic(), env)
        if rc != 0:
            return Result(name, "FAIL", note=f"pip install -e . for sm_{arch}: " + ("timed out" if rc is None else f"rc {rc}"))
        rc = self.run([PY, "-c", "import lowbit, lowbit._C, lowbit._C_cuda; print('imported', lowbit._C_cuda.__file__)"],
                      log, 60)
        if rc != 0:
            return Result(name, "FAIL", note=f"built for sm_{arch}, but lowbit._C_cuda does not import")
        return Result(name, "PASS", note=f"sm_{arch}, {CORES} jobs")

    def do_env(self, name: str, until: float) -> Result:
        log = self.log_path(name)
        rc = self.run([PY, "-m", "lowbit.env"], log, until - time.monotonic())
        print(tail(log, 200), flush=True)
        return Result(name, "PASS" if rc == 0 else "FAIL", note="" if rc == 0 else f"rc {rc}")

    def pytest(self, name: str, files: list[str], marker: str | None, until: float) -> tuple[int | None, dict]:
        """pytest on files (with -m marker); (exit status, junit counts)."""
        xml = os.path.join(self.logs, f"{name}-{len(glob.glob(os.path.join(self.logs, name + '*.xml')))}.xml")
        cmd = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        env = dict(self.env)
        if self.dry:  # slow tests and most Triton tests take minutes in the interpreter
            cmd += ["-m", f"({marker}) and not slow" if marker else "not slow"]
            cmd += ["-k", DRY_TRITON_K] if name == "tests-triton" else []
            env["TRITON_INTERPRET"] = "1"
        else:
            cmd += ["-m", marker] if marker else []
            if self.probe.get("xdist"):  # Triton compiles each kernel variant once: spread that over the cores
                cmd += ["-n", str(max(1, min(8, CORES // 2)))]
        rc = self.run(cmd + files, self.log_path(name), until - time.monotonic(), env)
        return rc, junit_counts(xml)

    def do_tests_cuda(self, name: str, until: float) -> Result:
        files = marked_files("cuda")
        if not files:
            return Result(name, "FAIL", note="no test file uses @pytest.mark.cuda")
        rc, n = self.pytest(name, files, "cuda", until)
        note = counts_note(n, rc)
        if rc != 0:
            return Result(name, "FAIL", note=note)
        if self.dry:  # without a GPU every one of them must skip, and none may error
            ok = n.get("tests", 0) > 0 and n.get("skipped", 0) == n.get("tests", 0)
            return Result(name, "PASS" if ok else "FAIL", note=note + ("" if ok else "; expected all to skip"))
        if n.get("skipped"):
            return Result(name, "FAIL", note=note + "; a cuda test skipped on a GPU (reasons in the log)")
        return Result(name, "PASS", note=note)

    def do_tests_triton(self, name: str, until: float) -> Result:
        # Two selections: tests marked `triton` in files that mix them with others, and whole files
        # named after Triton (some of these carry no marker).
        named = sorted(f for f in glob.glob(os.path.join("tests", "**", "test_*triton*.py"), recursive=True))
        marked = [f for f in marked_files("triton") if f not in named]
        runs, notes, failed = [], [], False
        for label, files, marker in (("marked", marked, "triton"), ("test_*triton*.py", named, None)):
            if files:
                rc, n = self.pytest(name, files, marker, until)
                runs.append(n)
                notes.append(f"{label}: {counts_note(n, rc)}")
                # rc 5: nothing selected, which on --dry means DRY_TRITON_K no longer matches any test
                failed |= rc != 0 or n.get("tests", 0) == n.get("skipped", 0)
        if not runs:
            return Result(name, "FAIL", note="no Triton tests found")
        return Result(name, "FAIL" if failed else "PASS", note="; ".join(notes))

    def do_sync(self, name: str, until: float) -> Result:
        out = os.path.join(self.logs, "sync.jsonl")
        # The child stops starting runs a little before the box closes, so the ones it finished are kept.
        cmd = [PY, os.path.join("scripts", "gpu_sync_check.py"), "--out", out,
               "--seconds", f"{max(until - time.monotonic() - 20, 1):.0f}"] + (["--dry"] if self.dry else [])
        rc = self.run(cmd, self.log_path(name), until - time.monotonic())
        return sync_result(name, read_jsonl(out), rc, self.dry)

    def do_train(self, name: str, until: float) -> Result:
        if self.train is None:
            self.train = Training(self)
            self.train.start_cpu_lane()
        return self.train.finish(name, until)

    def do_bench(self, name: str, until: float) -> Result:
        device = "cpu" if self.dry else "cuda"
        machine = self.machine_name(device)
        out = os.path.join(ROOT, "bench", "results", machine) if self.bench_in_repo else \
            os.path.join(self.out, "bench", machine)
        os.makedirs(out, exist_ok=True)
        help_text = self.python("-m", "lowbit", "bench", "--help") or ""
        # The issue's GPU preset; until lowbit bench has it, --quick (small shapes, short timings).
        quick = "--gpu-quick" if ("--gpu-quick" in help_text and not self.dry) else "--quick"
        cmd = [PY, "-m", "lowbit", "bench", *BENCH_SUITES, quick, "--device", device, "--out", out]
        if self.dry:
            cmd += ["--shapes", "tiny", "--tokens", "64"]
        started = time.time()
        rc = self.run(cmd, self.log_path(name), until - time.monotonic())
        # Only this call's CSVs: one left by an earlier call must not pass for a suite that failed now.
        csvs = sorted(c for c in glob.glob(os.path.join(out, "*.csv")) if os.path.getmtime(c) >= started)
        page = bench_summary(machine, device, cmd, csvs)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(page)
        missing = [s for s in BENCH_SUITES if not any(os.path.basename(c).startswith(s) for c in csvs)]
        note = f"{len(csvs)} CSVs in {rel(out)}" + (f"; no CSV for {', '.join(missing)}" if missing else "")
        ok = rc == 0 and not missing
        return Result(name, "PASS" if ok else "FAIL", note=note if ok else f"rc {rc}; {note}",
                      details=[f"One page: `{rel(os.path.join(out, 'summary.md'))}`; command: "
                               f"`{shlex.join(['lowbit', *cmd[3:]])}`."])

    def machine_name(self, device: str) -> str:
        """The results folder's name, as lowbit bench names it (the GPU model, or CPU model + cores)."""
        got = self.python("-c", f"from lowbit.bench.harness import machine_name; print(machine_name({device!r}))")
        if got and got.strip():
            return got.strip().splitlines()[-1]
        label = self.probe.get("gpu") if device == "cuda" else None
        return re.sub(r"[^a-z0-9]+", "-", (label or f"cpu-{CORES}c").lower()).strip("-")

    # ----------------------------------------------------------------------------------- the call
    def main(self) -> int:
        start = time.monotonic()
        self.probe = probe(self)
        print("[gpu-check] " + ("--dry: every stage on CPU at tiny sizes" if self.dry else
                                f"GPU: {self.probe.get('gpu') or 'none visible'}"), flush=True)
        plan = [("wheels", self.do_wheels), ("build", self.do_build), ("env", self.do_env),
                ("tests-cuda", self.do_tests_cuda), ("tests-triton", self.do_tests_triton),
                ("sync", self.do_sync), ("train", self.do_train), ("bench", self.do_bench)]
        for i, (name, fn) in enumerate(plan):
            if name == "tests-cuda":
                # The CPU reference runs take longest and need no GPU: they start here, beside the
                # tests, and the train stage waits for them.
                try:
                    self.train = Training(self)
                    self.train.start_cpu_lane()
                except Exception as e:  # noqa: BLE001  (the train stage tries again and reports it)
                    print(f"[gpu-check] could not start the CPU training runs: {e}", flush=True)
                    self.train = None
            self.stage(name, fn, later=len(plan) - i - 1)
        if self.train is not None:
            self.train.stop()
        summary = self.summary(time.monotonic() - start)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(summary)
        print("\n" + summary, flush=True)
        if os.environ.get("GPU_CHECK_PACK") == "1":
            pack(self.out)
        return 1 if any(r.status == "FAIL" for r in self.results) else 0

    def summary(self, seconds: float) -> str:
        p = self.probe
        head = "gpu-check --dry (CPU, tiny sizes)" if self.dry else f"gpu-check on {p.get('gpu') or 'no GPU'}"
        lines = [f"# {head}", "",
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; commit {git_rev()}; python {p.get('python', '?')}, "
                 f"torch {p.get('torch', '?')}, triton {p.get('triton', '?')}, {CORES} cores; "
                 f"{seconds:.0f} s in all.", "",
                 "| stage | status | seconds | note |", "|---|---|---:|---|"]
        lines += [f"| {r.stage} | {r.status} | {r.seconds:.0f} | {r.note.replace('|', '/')} |" for r in self.results]
        for r in self.results:
            if r.details:
                lines += ["", f"## {r.stage}", "", *r.details]
        failed = [r.stage for r in self.results if r.status == "FAIL"]
        where = "gpu-check.tar.gz" if os.environ.get("GPU_CHECK_PACK") == "1" else rel(self.logs)
        lines += ["", "Result: " + (f"FAIL ({', '.join(failed)})" if failed else "PASS") + f". Logs: `{where}`.", ""]
        return "\n".join(lines)


class Training:
    """The loss-curve comparison: every recipe on the device and on the CPU with the same seed, plus
    bf16 with more seeds on the device for the band. Runs are separate processes (a crash or a
    poisoned CUDA context ends one run, not the stage), in two lanes: CPU runs, one thread each,
    as many at once as half the cores allow, started early; device runs, DEVICE_WORKERS at a time."""

    def __init__(self, check: Check):
        self.c = check
        self.steps = TRAIN_STEPS[check.dry]
        self.dir = os.path.join(check.out, "train")
        self.cache = os.path.join(check.out, "train", "cache")  # tokenizer + token arrays, shared by all runs
        os.makedirs(self.cache, exist_ok=True)
        self.recipes = self.recipe_names()
        # The device lane's runs: on the GPU; with --dry on the CPU as well, under a name of their own.
        self.lane = "dev" if check.dry else "cuda"
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.warm = threading.Event()  # set once the first run has built the tokenizer cache
        self.cpu_pool = self.cpu_jobs = None
        self.runs: dict[str, dict] = {}

    def recipe_names(self) -> list[str]:
        got = self.c.python("-c", "import lowbit.nn as n; print(' '.join(n.RECIPE_NAMES))")
        if got and got.split():
            return got.split()
        return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))

    def run_name(self, recipe: str, lane: str, seed: int) -> str:
        return f"{recipe}-{lane}-s{seed}"

    def start_cpu_lane(self) -> None:
        jobs = [(r, "cpu", 0) for r in self.recipes]
        workers = max(1, min(len(jobs), CORES // 2))
        self.cpu_pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="cpu-lane")

        def warm_then_all():
            # One step first, alone: it trains the tokenizer and tokenizes the corpus into the
            # shared cache, which every other run then reads instead of redoing it at once.
            try:
                self.one("bf16", "warmup", 0, steps=1)
            finally:
                self.warm.set()
            return [self.cpu_pool.submit(self.one, *j) for j in jobs]
        self.cpu_jobs = self.cpu_pool.submit(warm_then_all)

    def one(self, recipe: str, lane: str, seed: int, steps: int | None = None) -> dict:
        """Train one run; its record: status, losses by step, final val_loss, tokens/s."""
        name = self.run_name(recipe, lane, seed)
        run_dir = os.path.join(self.dir, name)
        os.makedirs(run_dir, exist_ok=True)
        rec = {"name": name, "status": "not run", "losses": {}, "seconds": 0.0}
        self.runs[name] = rec
        cmd = [PY, "-m", "lowbit", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"quant.recipe={recipe}",
               f"train.steps={steps or self.steps}", f"train.seed={seed}", "train.eval_every=0", f"run.dir={run_dir}",
               "run.resume=never", "run.export_hf=false", "run.tensorboard=false", "run.progress=false",
               f"data.cache_dir={self.cache}"] + (DRY_TRAIN if self.c.dry else [])
        env = dict(self.c.env, OMP_NUM_THREADS=str(DEVICE_THREADS) if lane == "cuda" else "1")
        if lane != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""  # torch sees no GPU: lowbit trains on the CPU
        start = time.monotonic()
        with open(os.path.join(run_dir, "stdout.log"), "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            with self.lock:  # stop() either sees this process or keeps it from starting
                if self.stopping:
                    return rec
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                self.procs.add(p)
            rc = p.wait()
            with self.lock:
                self.procs.discard(p)
        rec["seconds"] = time.monotonic() - start
        rec["status"] = "completed" if rc == 0 else ("killed at the stage's time limit" if self.stopping else f"rc {rc}")
        # The final checkpoint (weights + optimizer state) is not needed here and would bloat --out.
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        rec.update(read_run(run_dir))
        return rec

    def finish(self, name: str, until: float) -> Result:
        band_jobs = [("bf16", self.lane, s) for s in BAND_SEEDS]
        dev_jobs = band_jobs + [(r, self.lane, 0) for r in self.recipes if r != "bf16"]
        # Device runs wait for the warm-up run's tokenizer cache instead of racing it.
        self.warm.wait(timeout=max(0, until - time.monotonic()))
        with futures.ThreadPoolExecutor(DEVICE_WORKERS, thread_name_prefix="device-lane") as pool:
            dev = [pool.submit(self.one, *j) for j in dev_jobs]
            done, _ = futures.wait(dev, timeout=max(0, until - time.monotonic()))
            if len(done) < len(dev):
                self.stop()
        try:
            rest = self.cpu_jobs.result(timeout=max(0, until - time.monotonic()))
            futures.wait(rest, timeout=max(0, until - time.monotonic()))
        except (futures.TimeoutError, futures.CancelledError, RuntimeError):
            pass  # out of time, or stopped while the CPU lane was still queueing its runs
        self.stop()
        return self.judge(name)

    def stop(self) -> None:
        """Kill the runs still going (the stage's time is up) and let no new one start."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for p in procs:
            kill_group(p)
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    def judge(self, name: str) -> Result:
        dev = "device (cpu)" if self.c.dry else "cuda"
        finals = [final_loss(self.runs.get(self.run_name("bf16", self.lane, s), {})) for s in BAND_SEEDS]
        finals = [f for f in finals if f is not None]
        band = max(finals) - min(finals) if len(finals) >= 2 else None
        rows = [f"Tiny config, {self.steps} steps per recipe; final loss = mean train loss of the last "
                f"{min(FINAL_STEPS, self.steps)} steps. Band = spread of bf16's final loss over seeds "
                f"{', '.join(map(str, BAND_SEEDS[:len(finals)]))} on {dev}: "
                + (f"{band:.4f}." if band is not None else "not measured (fewer than two bf16 seeds completed)."),
                "", f"| recipe | {dev} final | cpu final | gap | band | max step gap | val loss {dev} / cpu "
                f"| tokens/s {dev} / cpu | verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        failed = []
        for r in self.recipes:
            a = self.runs.get(self.run_name(r, self.lane, 0), {"status": "not run", "losses": {}})
            b = self.runs.get(self.run_name(r, "cpu", 0), {"status": "not run", "losses": {}})
            fa, fb = final_loss(a), final_loss(b)
            common = sorted(set(a["losses"]) & set(b["losses"]))
            step_gap = max((abs(a["losses"][s] - b["losses"][s]) for s in common), default=None)
            why = None
            for lane, rec in ((dev, a), ("cpu", b)):
                if rec["status"] != "completed":
                    why = why or f"{lane} run: {rec['status']}"
                elif len(rec["losses"]) < self.steps or not all(map(math.isfinite, rec["losses"].values())):
                    why = why or f"{lane} run: {len(rec['losses'])} of {self.steps} finite losses"
            gap = abs(fa - fb) if fa is not None and fb is not None else None
            if why is None and band is None:
                why = "no band to judge by"
            if why is None and gap > band:
                why = f"gap {gap:.4f} > band {band:.4f}"
            verdict = "PASS" if why is None else f"FAIL: {why}"
            if why:
                failed.append(r)
            rows.append(f"| {r} | {num(fa)} | {num(fb)} | {num(gap)} | {num(band)} | {num(step_gap)} "
                        f"| {num(a.get('val_loss'))} / {num(b.get('val_loss'))} "
                        f"| {num(a.get('tokens_per_s'), '.0f')} / {num(b.get('tokens_per_s'), '.0f')} | {verdict} |")
        rows += ["", f"Runs: `{rel(self.dir)}/<recipe>-<lane>-s<seed>/` (metrics.jsonl, summary.json, stdout.log)."]
        note = (f"{len(self.recipes) - len(failed)}/{len(self.recipes)} recipes inside the bf16 seed band"
                + (f" ({band:.4f})" if band is not None else "") + (f"; outside or failed: {', '.join(failed)}" if failed else ""))
        return Result(name, "FAIL" if failed else "PASS", note=note, details=rows)


# ------------------------------------------------------------------------------------------ helpers
def probe(check: Check) -> dict:
    """What the machine's python has: versions, the GPU and its capability, pytest-xdist."""
    code = ("import json, platform, importlib.util as u, torch\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__, 'xdist': bool(u.find_spec('xdist'))}\n"
            "try:\n    import triton; d['triton'] = triton.__version__\nexcept Exception: d['triton'] = 'absent'\n"
            "if torch.cuda.is_available():\n"
            "    d['gpu'] = torch.cuda.get_device_name(0); d['capability'] = list(torch.cuda.get_device_capability(0))\n"
            "print(json.dumps(d))")
    got = check.python("-c", code)
    return json.loads(got.strip().splitlines()[-1]) if got else {}


def marked_files(marker: str) -> list[str]:
    """Test files that use @pytest.mark.<marker> (collecting only these keeps optional imports of
    the other test modules out of the GPU run)."""
    pat = re.compile(rf"pytest\.mark\.{marker}\b")
    files = glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)
    return sorted(os.path.relpath(f, ROOT) for f in files if pat.search(open(f, encoding="utf-8").read()))


def read_jsonl(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def sync_result(name: str, recs: list[dict], rc: int | None, dry: bool) -> Result:
    """The sync stage's verdict from gpu_sync_check.py's records: every (recipe, optimizer) ran, and none
    synchronised with the host."""
    rows = ["| recipe | optimizer | status | first sync (or error) | lowbit frame | s |", "|---|---|---|---|---|---:|"]
    rows += [f"| {r.get('recipe')} | {r.get('optim')} | {r.get('status')} | {r.get('message', '').replace('|', '/')} "
             f"| {r.get('frame', '')} | {num(r.get('seconds'), '.1f')} |" for r in recs]
    every: dict[str, int] = {}  # each sync of the failing steps, over all runs
    for r in recs:
        for x in r.get("syncs", []):
            every[x["frame"]] = every.get(x["frame"], 0) + x["count"]
    if every:
        rows += ["", "| every sync of those steps (innermost lowbit frame, else torch / transformers) | count |",
                 "|---|---:|"] + [f"| {f} | {n} |" for f, n in every.items()]
    bad = [f"{r.get('recipe')}/{r.get('optim')}" for r in recs if r.get("status") != "PASS"]
    passed = "runs completed" if dry else "steps without a host sync"
    note = (f"{sum(r.get('status') == 'PASS' for r in recs)}/{len(recs)} {passed}"
            + (f"; failed: {', '.join(bad)}" if bad else ""))
    if dry:
        note = "--dry: steps ran on the CPU without set_sync_debug_mode (no CUDA), the code path only; " + note
    if not recs:
        note = ("timed out" if rc is None else f"rc {rc}") + ", no results (see logs/sync.log)"
    elif rc != 0:
        note += "; " + ("timed out" if rc is None else f"rc {rc}")
    ok = bool(recs) and not bad and rc == 0
    return Result(name, "PASS" if ok else "FAIL", note=note, details=rows)


def junit_counts(xml: str) -> dict:
    """tests / failures / errors / skipped summed over a junit XML file's test suites."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def counts_note(n: dict, rc: int | None) -> str:
    if not n:
        return "timed out" if rc is None else f"rc {rc}, no results"
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    parts = [f"{passed} passed", f"{n['skipped']} skipped"] + [f"{n[k]} {k}" for k in ("failures", "errors") if n[k]]
    return ", ".join(parts) + (" (timed out)" if rc is None else "")


def read_run(run_dir: str) -> dict:
    losses, out = {}, {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line) if line.strip() else {}
                if r.get("kind", "train") == "train" and "loss" in r:
                    losses[int(r["step"])] = float(r["loss"])
                elif r.get("kind") == "eval" and "val_loss" in r:
                    out["val_loss"] = float(r["val_loss"])
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        out["tokens_per_s"] = s.get("tokens_per_s")
        out.setdefault("val_loss", s.get("val_loss"))
    except (OSError, ValueError):
        pass
    out["losses"] = losses
    return out


def final_loss(rec: dict) -> float | None:
    losses = rec.get("losses") or {}
    if rec.get("status") != "completed" or not losses:
        return None
    last = [losses[s] for s in sorted(losses)[-FINAL_STEPS:]]
    return sum(last) / len(last) if all(map(math.isfinite, last)) else None


def bench_summary(machine: str, device: str, cmd: list[str], csvs: list[str]) -> str:
    """One page: the machine's measured limits, then the first BENCH_ROWS cases of each suite."""
    order = {s: i for i, s in enumerate(BENCH_SUITES)}
    csvs = sorted(csvs, key=lambda p: (order.get(os.path.basename(p).split("-")[0].split(".")[0], len(order)), p))
    shown_limits = None
    lines = [f"# lowbit bench on {machine} ({device})", "", f"`{shlex.join(['lowbit', *cmd[3:]])}`; "
             f"{time.strftime('%Y-%m-%d')}, commit {git_rev()}. p50 of the timed samples; ratios are "
             "comparable within this run only.", ""]
    for path in csvs:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        limits = [r for r in rows if r.get("case", "").startswith("limit ")]
        cases = [r for r in rows if not r.get("case", "").startswith("limit ")]
        peers = [k[len("speedup_vs_"):] for k in (rows[0] if rows else {}) if k.startswith("speedup_vs_")]
        lines += [f"## {os.path.basename(path)}", ""]
        limits_line = "Limits: " + ", ".join(f"{r['case'][6:]} {num(r.get('rate'), '.4g')}" for r in limits) + "."
        if limits and limits_line != shown_limits:  # each suite records them; the same line once is enough
            lines += [limits_line, ""]
            shown_limits = limits_line
        lines += ["| case | shape | p50 ms | rate | of limit | " + " | ".join(f"vs {p}" for p in peers) + " |",
                  "|---" * (5 + len(peers)) + "|"]
        for r in cases[:BENCH_ROWS]:
            rate = f"{num(r.get('rate'), '.4g')} {r.get('unit', '')}".strip()
            of = num(100 * float(r["ratio_to_limit"]), ".1f") + " %" if _float(r.get("ratio_to_limit")) else ""
            vs = [f"{num(r.get(f'speedup_vs_{p}'), '.2f')}x" if _float(r.get(f"speedup_vs_{p}")) else
                  (r.get(f"speedup_vs_{p}") or "") for p in peers]
            lines.append("| " + " | ".join([r.get("case", ""), r.get("shape", ""), num(r.get("p50_ms"), ".3g"),
                                             rate, of, *vs]) + " |")
        if len(cases) > BENCH_ROWS:
            lines.append(f"\n{len(cases) - BENCH_ROWS} more cases in the CSV.")
        lines.append("")
    if not csvs:
        lines.append("No results: the bench stage wrote no CSV (see logs/bench.log).")
    return "\n".join(lines) + "\n"


def _float(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def num(v, spec: str = ".4f") -> str:
    x = _float(v)
    return "-" if x is None else format(x, spec)


def tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def rel(path: str) -> str:
    r = os.path.relpath(path, ROOT)
    return path if r.startswith("..") else r


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def kill_group(p: subprocess.Popen) -> None:
    """Kill a child started with start_new_session=True and everything it started."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def clear_previous(out: str) -> None:
    """Remove what an earlier call left in out, except the tokenizer cache (keyed by its inputs)."""
    shutil.rmtree(os.path.join(out, "logs"), ignore_errors=True)
    for path in glob.glob(os.path.join(out, "train", "*")):
        if os.path.basename(path) != "cache":
            shutil.rmtree(path, ignore_errors=True)
    for name in ("summary.md", "gpu-check.tar.gz"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def pack(out: str) -> None:
    """logs/, train/ and the plots into gpu-check.tar.gz; what stays loose is summary.md and the bench
    CSVs and summary page."""
    loose = [os.path.join(out, d) for d in ("logs", "train")] + glob.glob(os.path.join(out, "bench", "*", "*.png"))
    with tarfile.open(os.path.join(out, "gpu-check.tar.gz"), "w:gz") as tar:
        for path in loose:
            if os.path.exists(path):
                tar.add(path, arcname=os.path.relpath(path, out),
                        filter=lambda t: None if "/cache" in "/" + t.name else t)  # the tokenizer cache is rebuilt anyway
    for path in loose:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for everything the check writes")
    p.add_argument("--dry", action="store_true", help="every stage on CPU at tiny sizes")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".gpu-wheels"), help="wheels to install first (no index)")
    p.add_argument("--bench-in-repo", action="store_true",
                   help="bench CSVs to bench/results/<machine>/ (default OUT/bench/<machine>/)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole call (default 470 on a GPU, 900 with --dry)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 900 if args.dry else 470
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
