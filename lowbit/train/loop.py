"""One training loop for pretraining, SFT and alignment (plain PyTorch or the DeepSpeed engine).

    setup ranks -> data + tokenizer -> model (+ recipe) -> optimizer, schedule -> engine -> resume?
    for step: for each micro-batch: forward, loss, backward
              non-finite? skip (stop after K in a row) : clip, optimizer step, schedule step
              log; evaluate / checkpoint every N
    final evaluation, checkpoint, HF export, summary.json
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time

import torch

from . import checkpoint as C
from . import config as cfgmod
from . import data as data_mod
from . import dist as D
from . import evaluate, losses, model as model_mod, optim as optim_mod, pretrained, sft_data
from .metrics import Logger


class TrainingStopped(RuntimeError):
    """Raised after train.max_bad_steps consecutive non-finite steps."""


def run_dir_of(cfg) -> str:
    if cfg.run.dir:
        return cfg.run.dir
    return os.path.join("runs", f"{cfg.task}-{os.path.splitext(os.path.basename(cfg.quant.recipe))[0]}")


def prepare(cfg, env):
    """(model, tokenizer, train set, validation set, data source) for cfg.task."""
    init = cfg.model.init_from
    if cfg.task == "pretrain" and init is None:
        tok, train_set, val_set, source = data_mod.pretrain_data(cfg)
        model = model_mod.build(cfg, len(tok), pretrained.special_ids(tok))
        return model, tok, train_set, val_set, source
    model, tok = pretrained.load(init, cfg) if init else (None, pretrained.default_tokenizer(cfg))
    if cfg.task == "pretrain":
        _, train_set, val_set, source = data_mod.pretrain_data(cfg, tok)
    elif cfg.task == "sft":
        train_set, val_set, source = sft_data.sft_data(cfg, tok)
    else:
        train_set, val_set, source = sft_data.preference_data(cfg, tok)
    if model is None:
        model = model_mod.build(cfg, len(tok), pretrained.special_ids(tok))
    else:
        model_mod.apply_recipe(model, cfg)
    return model, tok, train_set, val_set, source


def batch_sizes(cfg, env) -> tuple[int, int, int]:
    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * env.world
    if gbs % (mbs * env.world):
        raise cfgmod.ConfigError(f"train.global_batch_size: expected a multiple of train.micro_batch_size ({mbs}) x "
                                 f"world size ({env.world}) = {mbs * env.world}, got {gbs}")
    return mbs, gbs, gbs // (mbs * env.world)


def clear_weight_caches(model) -> None:
    """LowBitLinear caches its quantized weight; engines that write weights through .data need a reset."""
    for m in model.modules():
        if hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()


def resolve_auto_objective(cfg, model, train_set, env, say) -> None:
    from ..objectives import prior_strength

    n = min(len(train_set), 8 * cfg.train.micro_batch_size)
    batches = [data_mod.collate([train_set[i] for i in range(j, min(n, j + cfg.train.micro_batch_size))])
               for j in range(0, n, cfg.train.micro_batch_size)]
    result = prior_strength(model, batches)
    say(f"objective auto: {result}")
    cfg.objective.name = result.recommended_objective


def grad_norm(params) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def run(cfg) -> dict:
    """Train per `cfg` (a `lowbit.train.config.Config`); returns the summary (also written to summary.json)."""
    cfgmod.validate(cfg)
    cfg = copy.deepcopy(cfg)
    env = D.setup(cfg)
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
    for turn in (0, 1):  # rank 0 builds the tokenizer / token caches first, the others then read them
        if (turn == 0) == env.main:
            model, tok, train_set, val_set, source = prepare(cfg, env)
        D.barrier(env)
    say = (lambda s: print(s, flush=True)) if env.main else (lambda s: None)
    if cfg.task == "sft" and cfg.objective.name == "auto":
        resolve_auto_objective(cfg, model, train_set, env, say)
    model.to(env.device)
    reference = copy.deepcopy(model) if cfg.task == "align" else None
    if reference is not None and cfg.align.reference:
        reference, _ = pretrained.load(cfg.align.reference, cfg)
        model_mod.apply_recipe(reference, cfg)
        reference.to(env.device)
    pref = losses.Preference(cfg, reference) if reference is not None else None
    n_params = model_mod.count_parameters(model)
    conversion = getattr(model, "lowbit_conversion", None)

    optimizer = optim_mod.build(model.parameters(), cfg)
    scheduler = optim_mod.scheduler(optimizer, cfg)
    engine, optimizer, scheduler = D.wrap(model, optimizer, scheduler, cfg, env, mbs, accum)
    inner = getattr(engine, "module", engine)
    params = [p for p in inner.parameters() if p.requires_grad]
    config_yaml = cfgmod.to_yaml(cfg)

    # ---- resume -----------------------------------------------------------------------------
    start, state = 0, {}
    ckpt = None if cfg.run.resume == "never" else (C.latest(run_dir) if cfg.run.resume == "auto" else cfg.run.resume)
    if ckpt is not None:
        state = C.restore(ckpt, env=env, engine_model=engine, optimizer=optimizer)
        if env.engine != "deepspeed":
            scheduler.load_state_dict(state["scheduler"])
        clear_weight_caches(inner)
        start = int(state["step"])
        if pref is not None:
            pref.load(state.get("task", {}))
        say(f"resumed from {ckpt} at step {start}")
    if env.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if conversion is not None:
            say(str(conversion))
    log = Logger(run_dir, main=env.main, total=cfg.train.steps, start=start, tensorboard=cfg.run.tensorboard,
                 progress=cfg.run.progress, resume_step=start if ckpt is not None else None)

    order = data_mod.Order(len(train_set), cfg.train.seed)
    bad, loss_avg = int(state.get("bad_steps", 0)), state.get("loss_avg")
    tokens_seen, spikes, skipped = int(state.get("tokens", 0)), int(state.get("spikes", 0)), int(state.get("skipped", 0))
    last_eval: dict = {}
    stopped = None
    task_loss = (lambda m, b: pref.loss(m, b)) if pref is not None else \
        (lambda m, b: losses.token_loss(m, b, cfg.objective, "nll" if cfg.task == "pretrain" else None))

    def do_eval(step):
        kw = dict(batches=cfg.train.eval_batches, batch_size=mbs, env=env)
        res = evaluate.preference(engine, pref, val_set, **kw) if pref is not None else \
            evaluate.language_model(engine, val_set, **kw)
        if cfg.task == "pretrain":
            res.pop("val_exact_match")  # exact match of whole code chunks says nothing
        log.log({"step": step, "kind": "eval", **res})
        return res

    def do_checkpoint(step):
        tstate = {"step": step, "data_position": step * gbs, "bad_steps": bad, "loss_avg": loss_avg, "tokens": tokens_seen,
                  "spikes": spikes, "skipped": skipped, "scheduler": scheduler.state_dict(),
                  "task": pref.state() if pref is not None else {}, "world_size": env.world}
        return C.save(run_dir, step, env=env, cfg=cfg, engine_model=engine, optimizer=optimizer, trainer_state=tstate,
                      tokenizer=tok, config_yaml=config_yaml, keep=cfg.train.keep_checkpoints)

    engine.train()
    t_loop = time.perf_counter()
    step = start
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        loss_sum, n_tok, stats, nonfinite = 0.0, 0, {}, False
        for micro in range(accum):
            idx = data_mod.positions(step, micro, env.rank, env.world, mbs, gbs)
            batch = {k: v.to(env.device) for k, v in data_mod.collate([train_set[order(k)] for k in idx]).items()}
            sync = contextlib.nullcontext() if env.engine == "deepspeed" or env.world == 1 or micro == accum - 1 \
                else engine.no_sync()
            with sync:
                loss, st, n = task_loss(engine, batch)
                finite = D.all_sum(env, float(not torch.isfinite(loss)))[0] == 0
                nonfinite |= not finite
                if env.engine == "deepspeed":
                    if finite:
                        engine.backward(loss)
                elif finite:
                    (loss / accum).backward()
            loss_sum += float(loss.detach())
            n_tok += n
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v / accum
        loss_val = D.all_sum(env, loss_sum)[0] / (accum * env.world)
        n_tok = int(D.all_sum(env, n_tok)[0])
        lr = scheduler.get_last_lr()[0]

        if env.engine == "deepspeed":
            # The engine's accumulation counters must advance every step; a bad step runs at lr 0.
            gnorm = grad_norm(params) if cfg.dist.zero_stage == 0 and not nonfinite else None
            nonfinite |= gnorm is not None and not math.isfinite(gnorm)
            if nonfinite:
                for g in optimizer.param_groups:
                    g["lr"] = 0.0
            engine.step()
            if gnorm is None and not nonfinite:
                gn = engine.get_global_grad_norm()
                gnorm = float(gn) if gn is not None else None
            nonfinite |= gnorm is not None and not math.isfinite(gnorm)
        else:
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if not nonfinite else float("nan")
            nonfinite |= not math.isfinite(gnorm)
            if not nonfinite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        clear_weight_caches(inner)

        dt = time.perf_counter() - t0
        tokens_seen += n_tok
        if nonfinite:
            bad, skipped = bad + 1, skipped + 1
            log.log({"step": step + 1, "kind": "skip", "loss": loss_val, "grad_norm": gnorm, "consecutive": bad})
            log.message(f"step {step + 1}: non-finite loss or gradient (loss {loss_val}, grad-norm {gnorm}); "
                        f"step skipped ({bad} in a row, limit {cfg.train.max_bad_steps})")
            if bad >= cfg.train.max_bad_steps:
                stopped = (f"stopped at step {step + 1}: {bad} consecutive non-finite steps "
                           f"(train.max_bad_steps={cfg.train.max_bad_steps}); lower optim.lr or check the data")
                log.message(stopped)
                break
        else:
            bad = 0
            if loss_avg is not None and step >= 10 and loss_val > cfg.train.spike_factor * loss_avg:
                spikes += 1
                log.log({"step": step + 1, "kind": "spike", "loss": loss_val, "running_mean": loss_avg})
                log.message(f"step {step + 1}: loss spike {loss_val:.4f} (running mean {loss_avg:.4f})")
            loss_avg = loss_val if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_val
        record = {"step": step + 1, "kind": "train", "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                  "tokens": tokens_seen, "tokens_per_s": n_tok / dt if dt > 0 else 0.0, "step_time_s": dt, **stats}
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            log.log(record)
        log.progress(record)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
            last_eval = do_eval(step + 1)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < cfg.train.steps:
            do_checkpoint(step + 1)
    else:
        step = cfg.train.steps - 1 if cfg.train.steps > start else start - 1
    loop_s = time.perf_counter() - t_loop
    final_step = step + 1

    last_eval = do_eval(final_step)
    final_ckpt = do_checkpoint(final_step)
    hf_dir = None
    if cfg.run.export_hf:
        sd = C.model_state(engine, env, cfg.dist.zero_stage)
        if env.main:
            hf_dir = C.export_hf(os.path.join(run_dir, "hf"), inner, sd, tok)
    log.close()

    trained = max(final_step - start, 0)
    summary = {
        "task": cfg.task, "status": "stopped" if stopped else "completed", "message": stopped,
        "steps": final_step, "resumed_from_step": start if ckpt else None, "engine": env.engine,
        "world_size": env.world, "zero_stage": cfg.dist.zero_stage if env.engine == "deepspeed" else None,
        "recipe": cfg.quant.recipe, "optimizer": cfg.optim.name, "objective": cfg.objective.name if cfg.task == "sft" else None,
        "parameters": n_params, "data": source, "global_batch_size": gbs, "seq_len": cfg.data.seq_len,
        "train_loss": loss_avg, "last_train_loss": record["loss"] if trained else None, **last_eval,
        "tokens": tokens_seen, "tokens_per_s": (tokens_seen - int(state.get("tokens", 0))) / loop_s if trained and loop_s > 0 else None,
        "skipped_steps": skipped, "loss_spikes": spikes, "wall_time_s": time.time() - wall0,
        "run_dir": os.path.abspath(run_dir), "metrics": os.path.abspath(log.path),
        "tensorboard": os.path.abspath(os.path.join(run_dir, "tb")) if cfg.run.tensorboard else None,
        "checkpoint": os.path.abspath(final_ckpt), "hf_export": os.path.abspath(hf_dir) if hf_dir else None,
    }
    if env.main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    D.barrier(env)
    return summary
