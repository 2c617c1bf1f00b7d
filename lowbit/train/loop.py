"""One training loop for pretraining, SFT and alignment (plain PyTorch or the DeepSpeed engine).

    setup ranks -> data + tokenizer -> model (+ recipe) -> optimizer, schedule -> engine -> resume?
    for step: for each micro-batch: forward, loss, backward
              non-finite? skip (stop after K in a row) : clip, optimizer step, schedule step, EMA update
              log; evaluate / checkpoint every N
    final evaluation, checkpoint, HF export (and hf-ema/ with train.ema), summary.json

What differs between the engines (gradient sync, clipping, how a step is skipped, checkpoint
state) is behind the step adapters of `dist`.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from ..objectives import prior_strength
from . import checkpoint as C
from . import config as cfgmod
from . import data as data_mod
from . import dist as D
from . import ema as ema_mod
from . import evaluate, losses, model as model_mod, optim as optim_mod, pretrained, rundir, safety, sft_data
from .metrics import Logger


def run_dir_of(cfg) -> str:
    if cfg.run.dir:
        return cfg.run.dir
    return os.path.join("runs", f"{cfg.task}-{os.path.splitext(os.path.basename(cfg.quant.recipe))[0]}")


def prepare(cfg):
    """(model, tokenizer, train set, validation set, data source) for cfg.task."""
    init = cfg.model.init_from
    if cfg.task == "pretrain" and init is None:
        tok, train_set, val_set, source = data_mod.pretrain_data(cfg)
        model = model_mod.build(cfg, len(tok), pretrained.special_ids(tok))
        return model, tok, train_set, val_set, source
    model, tok = pretrained.load(init, ema=cfg.model.init_from_ema) if init else \
        (None, pretrained.default_tokenizer(cfg))
    if cfg.task == "pretrain":
        _, train_set, val_set, source = data_mod.pretrain_data(cfg, tok)
    elif cfg.task == "sft":
        train_set, val_set, source = sft_data.sft_data(cfg, tok)
    else:
        train_set, val_set, source = sft_data.preference_data(cfg, tok)
    if model is None:
        model = model_mod.build(cfg, len(tok), pretrained.special_ids(tok))
    else:
        model_mod.prepare_loaded(model, cfg)
    return model, tok, train_set, val_set, source


def batch_sizes(cfg, env) -> tuple[int, int, int]:
    """(micro-batch, global batch, micro-batches per step on each rank)."""
    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * env.world
    if gbs % (mbs * env.world):
        raise cfgmod.ConfigError(f"train.global_batch_size: expected a multiple of train.micro_batch_size ({mbs}) x "
                                 f"world size ({env.world}) = {mbs * env.world}, got {gbs}")
    return mbs, gbs, gbs // (mbs * env.world)


def resolve_auto_objective(cfg, model, train_set, say) -> None:
    """objective.name=auto: measure the model's prior on the SFT data and pick the objective."""
    n = min(len(train_set), 8 * cfg.train.micro_batch_size)
    batches = [data_mod.collate([train_set[i] for i in range(j, min(n, j + cfg.train.micro_batch_size))])
               for j in range(0, n, cfg.train.micro_batch_size)]
    result = prior_strength(model, [{**data_mod.model_inputs(b), "labels": b["labels"]} for b in batches])
    say(f"objective auto: mean target probability {result.mean_prob:.4g} over {result.num_tokens} tokens "
        f"({result.regime} prior) -> recommended objective {result.recommended_objective}: {result.explanation}")
    cfg.objective.name = result.recommended_objective


def preference_objective(cfg, model, env) -> losses.Preference | None:
    """align: DPO / KLDO / KTO / BCO against a frozen reference (align.reference, else a copy of the initial policy)."""
    if cfg.task != "align":
        return None
    model_mod.disable_dropout(model)
    if not cfg.align.reference:
        return losses.Preference(cfg, copy.deepcopy(model))
    reference, _ = pretrained.load(cfg.align.reference)
    model_mod.apply_recipe(reference, cfg)
    return losses.Preference(cfg, reference.to(env.device))


@dataclass
class Tally:
    """What the loop counts over the run; saved in every checkpoint and restored on resume."""
    bad_steps: int = 0  # non-finite steps in a row
    loss_avg: float | None = None  # running mean of the training loss
    tokens: int = 0
    spikes: int = 0
    skipped: int = 0

    @classmethod
    def restore(cls, state: dict) -> "Tally":
        return cls(int(state.get("bad_steps", 0)), state.get("loss_avg"), int(state.get("tokens", 0)),
                   int(state.get("spikes", 0)), int(state.get("skipped", 0)))

    def count(self, step: int, loss: float, gnorm, skipped: bool, tokens: int, cfg, log: Logger) -> str | None:
        """Count finished step `step` (1-based); returns why to stop once too many in a row were skipped."""
        self.tokens += tokens
        if skipped:
            self.bad_steps, self.skipped = self.bad_steps + 1, self.skipped + 1
            log.log({"step": step, "kind": "skip", "loss": loss, "grad_norm": gnorm, "consecutive": self.bad_steps})
            log.message(f"step {step}: non-finite loss or gradient (loss {loss}, grad-norm {gnorm}); "
                        f"step skipped ({self.bad_steps} in a row, limit {cfg.train.max_bad_steps})")
            if self.bad_steps < cfg.train.max_bad_steps:
                return None
            stop = (f"stopped at step {step}: {self.bad_steps} consecutive non-finite steps "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); lower optim.lr or check the data")
            log.message(stop)
            return stop
        self.bad_steps = 0
        if self.loss_avg is not None and step > 10 and loss > cfg.train.spike_factor * self.loss_avg:
            self.spikes += 1
            log.log({"step": step, "kind": "spike", "loss": loss, "running_mean": self.loss_avg})
            log.message(f"step {step}: loss spike {loss:.4f} (running mean {self.loss_avg:.4f})")
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        return None


def run(cfg) -> dict:
    """Train per `cfg` (a `lowbit.train.config.Config`); returns the summary (also written to summary.json)."""
    cfgmod.validate(cfg)
    cfg = copy.deepcopy(cfg)
    env = D.setup(cfg.dist.engine, cfg.dist.zero_stage)
    try:
        return _run(cfg, env)
    finally:
        D.teardown(env)


def _run(cfg, env: D.Env) -> dict:
    wall0 = time.time()
    run_dir = run_dir_of(cfg)
    mbs, gbs, accum = batch_sizes(cfg, env)
    if cfg.objective.fused and env.engine == "torch" and env.world > 1:
        raise cfgmod.ConfigError("objective.fused: the fused LM head bypasses DDP's forward (no gradient sync); "
                                 "use the DeepSpeed engine or objective.fused=false")
    lock, ckpt = rundir.claim(cfg, run_dir, env)  # before any work: the run dir is this run's, checks passed
    try:
        return _train(cfg, env, run_dir, ckpt, (mbs, gbs, accum), wall0)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, env: D.Env, run_dir: str, ckpt: str | None, batches: tuple[int, int, int], wall0: float) -> dict:
    mbs, gbs, accum = batches
    for turn in (0, 1):  # rank 0 builds the tokenizer / token caches first, the others then read them
        if (turn == 0) == env.main:
            model, tok, train_set, val_set, source = prepare(cfg)
        D.barrier(env)
    say = (lambda s: print(s, flush=True)) if env.main else (lambda s: None)
    if cfg.task == "sft" and cfg.objective.name == "auto":
        resolve_auto_objective(cfg, model, train_set, say)
    model.to(env.device)
    pref = preference_objective(cfg, model, env)
    separation = {"initial": safety.for_run(model, tok, cfg, "initial", say)}
    n_params = model_mod.count_parameters(model)
    conversion = getattr(model, "lowbit_conversion", None)
    optimizer = optim_mod.build(model.parameters(), cfg)
    engine = D.engine(model, optimizer, optim_mod.scheduler(optimizer, cfg), cfg, env, mbs, accum)
    config_yaml = cfgmod.to_yaml(cfg)
    rundir.on_main(env, lambda: rundir.check_disk(run_dir, model, cfg))

    # ---- resume -----------------------------------------------------------------------------
    start, state = 0, {}
    if ckpt is not None:
        state = C.restore(ckpt, env=env, engine=engine)
        start = int(state["step"])
        if pref is not None:
            pref.load(state.get("task", {}))
        say(f"resumed from {ckpt} at step {start}")
    # the EMA starts as a copy of the weights the run starts from (the initial or the resumed ones)
    ema = ema_mod.EMA(engine.module, engine.optimizer, cfg.train.ema, cfg.train.ema_every, env.rank, env.world) \
        if cfg.train.ema else None
    if ema is not None and ckpt is not None and not ema.load(ckpt):
        say(f"{ckpt} holds no EMA (trained without train.ema): the EMA starts from its weights")
    if env.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if conversion is not None:
            say(str(conversion))
    log = Logger(run_dir, main=env.main, total=cfg.train.steps, start=start, tensorboard=cfg.run.tensorboard,
                 progress=cfg.run.progress, resume_step=start if ckpt is not None else None)
    order = data_mod.Order(len(train_set), cfg.train.seed)
    tally = Tally.restore(state)
    task_loss = (lambda m, b: pref.loss(m, b)) if pref is not None else \
        (lambda m, b: losses.token_loss(m, b, cfg.objective, "nll" if cfg.task == "pretrain" else None))

    def do_eval(step):
        kw = dict(batches=cfg.train.eval_batches, batch_size=mbs, env=env)
        res = evaluate.preference(engine.model, pref, val_set, **kw) if pref is not None else \
            evaluate.language_model(engine.model, val_set, **kw)
        if cfg.task == "pretrain":
            res.pop("val_exact_match")  # exact match of whole code chunks says nothing
        log.log({"step": step, "kind": "eval", **res})
        return res

    def do_checkpoint(step):
        tstate = {"step": step, "data_position": step * gbs, **asdict(tally), "scheduler": engine.scheduler.state_dict(),
                  "task": pref.state() if pref is not None else {}, "world_size": env.world}
        return C.save(run_dir, step, env=env, engine=engine, trainer_state=tstate, tokenizer=tok,
                      config_yaml=config_yaml, keep=cfg.train.keep_checkpoints, ema=ema)

    # ---- train ------------------------------------------------------------------------------
    engine.model.train()
    t_loop = time.perf_counter()
    final_step, stopped, last_loss = max(start, cfg.train.steps), None, None
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        loss_sum, n_tok, stats, nonfinite = 0.0, 0, {}, False
        for micro in range(accum):
            idx = data_mod.positions(step, micro, env.rank, env.world, mbs, gbs)
            batch = data_mod.load_batch(train_set, order, idx, env.device)
            with engine.micro_batch(micro):
                loss, st, n = task_loss(engine.model, batch)
                finite = D.all_sum(env, float(not torch.isfinite(loss)))[0] == 0
                if finite:
                    engine.backward(loss)
            nonfinite |= not finite
            loss_sum += float(loss.detach())
            n_tok += n
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v / accum
        loss_val = D.all_sum(env, loss_sum)[0] / (accum * env.world)
        n_tok = int(D.all_sum(env, n_tok)[0])
        lr = engine.lr
        gnorm, skipped = engine.step(nonfinite)
        if ema is not None and not skipped:
            ema.update(step + 1)
        dt = time.perf_counter() - t0

        stopped = tally.count(step + 1, loss_val, gnorm, skipped, n_tok, cfg, log)
        if stopped:
            final_step = step + 1
            break
        record = {"step": step + 1, "kind": "train", "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                  "tokens": tally.tokens, "tokens_per_s": n_tok / dt if dt > 0 else 0.0, "step_time_s": dt, **stats}
        last_loss = loss_val
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            log.log(record)
        log.progress(record)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
            do_eval(step + 1)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < cfg.train.steps:
            do_checkpoint(step + 1)
    loop_s = time.perf_counter() - t_loop

    # ---- finish -----------------------------------------------------------------------------
    last_eval = do_eval(final_step)
    final_ckpt = do_checkpoint(final_step)
    separation["final"] = safety.for_run(engine.model, tok, cfg, "final", say)
    hf_dir = ema_dir = None
    if cfg.run.export_hf:
        sd = engine.model_state()
        averaged = ema.full_state(env.device) if ema is not None else None  # collective under ZeRO
        if env.main:
            hf_dir = C.export_hf(os.path.join(run_dir, "hf"), engine.module, sd, tok)
            if averaged is not None:
                ema_dir = C.export_hf(os.path.join(run_dir, "hf-ema"), engine.module,
                                      ema_mod.overlay(engine.module, sd, averaged), tok)
    log.close()

    trained = final_step > start
    new_tokens = tally.tokens - int(state.get("tokens", 0))
    summary = {
        "task": cfg.task, "status": "stopped" if stopped else "completed", "message": stopped,
        "steps": final_step, "resumed_from_step": start if ckpt else None, "engine": env.engine,
        "world_size": env.world, "zero_stage": cfg.dist.zero_stage if env.engine == "deepspeed" else None,
        "recipe": cfg.quant.recipe, "optimizer": cfg.optim.name, "objective": cfg.objective.name if cfg.task == "sft" else None,
        "parameters": n_params, "data": source, "global_batch_size": gbs, "seq_len": cfg.data.seq_len,
        "train_loss": tally.loss_avg, "last_train_loss": last_loss if trained else None, **last_eval,
        "tokens": tally.tokens, "tokens_per_s": new_tokens / loop_s if trained and loop_s > 0 else None,
        "skipped_steps": tally.skipped, "loss_spikes": tally.spikes, "wall_time_s": time.time() - wall0,
        "run_dir": os.path.abspath(run_dir), "metrics": os.path.abspath(log.path),
        "tensorboard": os.path.abspath(os.path.join(run_dir, "tb")) if cfg.run.tensorboard else None,
        "checkpoint": os.path.abspath(final_ckpt), "hf_export": os.path.abspath(hf_dir) if hf_dir else None,
        "ema": cfg.train.ema or None, "hf_ema_export": os.path.abspath(ema_dir) if ema_dir else None,
        **{f"separation_{k}": v for k, v in separation.items() if v is not None},
    }
    if env.main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    D.barrier(env)
    return summary
