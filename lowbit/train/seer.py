"""`lowbit seer distill <config.yaml> [key=value ...]` and `lowbit seer eval --gates FILE [options]`.

distill: loads the base model (a lowbit run / checkpoint / HF export dir, or, with model.checkpoint
null, a freshly initialised Llama of shape model.random for smoke tests), freezes it, attaches a gate
to every attention layer and trains the gates on the model's own pretraining text (the embedded
corpus unless its config names other files; random tokens for the random model). Writes
<output>/gates.pt (gate weights only), metrics.jsonl and summary.json. Under torchrun / deepspeed
every rank reads different sequences and gate gradients are averaged.

eval: held-out perplexity of the base model with dense attention and, at each density, with
block-sparse attention chosen by the learned gate, by a static sink + sliding-window pattern and by
the oracle (top blocks of the true pooled map); thresholds report the density the gate reached.
Writes a table (stdout, results.md, results.csv) and, when matplotlib is installed, ppl_vs_density.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist

from ..attention import distillation, model as seer_model
from ..attention.gate import POOLS
from ..attention.ops import check_block_size
from . import config as cfgmod, corpus, data as data_mod, dist as D, pretrained
from .metrics import Logger


@dataclass
class RandomModel:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    initializer_range: float = 0.2  # peaked attention maps, so there is something to learn


@dataclass
class ModelSection:
    checkpoint: Optional[str] = None  # run dir, checkpoints/step_* dir or HF export dir; null = random model
    random: RandomModel = field(default_factory=RandomModel)


@dataclass
class GateSection:
    block_size: int = 64
    gate_dim: Optional[int] = None  # null = the model's head_dim
    q_pool: list = field(default_factory=lambda: ["avg"])
    k_pool: list = field(default_factory=lambda: ["max", "min", "avg"])


@dataclass
class DataSection:
    seq_len: int = 1024
    batch_size: int = 1
    max_corpus_mb: Optional[float] = None  # overrides the checkpoint's data.max_corpus_mb


@dataclass
class TrainSection:
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_batches: int = 4


@dataclass
class SeerConfig:
    model: ModelSection = field(default_factory=ModelSection)
    gate: GateSection = field(default_factory=GateSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: str = "runs/seer"


def load_config(path: str, overrides: list[str]) -> SeerConfig:
    """The YAML file <- overrides over the defaults; errors (ConfigError, a ValueError) name the key."""
    cfg = cfgmod.structured(SeerConfig, [path], overrides, file_arg="config")
    _validate(cfg)
    return cfg


def _validate(c: SeerConfig) -> None:
    check_block_size(c.gate.block_size)
    for key, pools in (("gate.q_pool", c.gate.q_pool), ("gate.k_pool", c.gate.k_pool)):
        if not pools or any(p not in POOLS for p in pools):
            raise ValueError(f"{key}: expected a list of pools from {POOLS}, got {pools}")
    for key, v in (("data.seq_len", c.data.seq_len), ("data.batch_size", c.data.batch_size),
                   ("train.steps", c.train.steps), ("train.log_every", c.train.log_every)):
        if v < 1:
            raise ValueError(f"{key}: expected a positive int, got {v}")
    if c.data.seq_len < c.gate.block_size:
        raise ValueError(f"data.seq_len: expected at least gate.block_size ({c.gate.block_size}), got {c.data.seq_len}")
    if not c.train.lr > 0:
        raise ValueError(f"train.lr: expected a positive float, got {c.train.lr}")


# ---------------------------------------------------------------- model and data

def load_base(checkpoint: Optional[str], random_cfg: RandomModel | None = None, seed: int = 0):
    """(frozen model, tokenizer or None, the checkpoint's config / data section or None)."""
    if checkpoint is None:
        from transformers import LlamaConfig, LlamaForCausalLM  # optional and slow to import: only for this model

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**asdict(random_cfg))).eval(), None, None
    kind, where = pretrained.resolve(checkpoint)
    model, tok = pretrained.load(where, need_tokenizer=False)
    if kind == "hf":
        return model.eval(), tok, cfgmod.Config().data if tok is not None else None
    return model.eval(), tok, pretrained.checkpoint_config(where)


def token_source(tok, data_cfg, seq_len: int, max_corpus_mb, split: str):
    """Packed sequences [N, seq_len] of the model's own text, or None when the model has no tokenizer.

    data_cfg is the checkpoint's full config (lowbit checkpoints: its cached token arrays are reused)
    or a data section (HF exports: the documents are tokenized with the export's tokenizer)."""
    if tok is None:
        return None
    if hasattr(data_cfg, "data"):  # a lowbit run config
        cfg = copy.deepcopy(data_cfg)
        cfg.data.seq_len = seq_len
        if max_corpus_mb is not None:
            cfg.data.max_corpus_mb = max_corpus_mb
        _, train, val, _ = data_mod.pretrain_data(cfg)
        packed = train if split == "train" else val
    else:
        d = copy.copy(data_cfg)
        if max_corpus_mb is not None:
            d.max_corpus_mb = max_corpus_mb
        train_docs, val_docs, _ = corpus.pretrain_documents(d)
        packed = data_mod.Packed(data_mod.tokenize_stream(tok, train_docs if split == "train" else val_docs), seq_len)
    if len(packed) == 0:
        raise ValueError(f"data.seq_len: the {split} text holds no complete sequence of {seq_len} tokens")
    return torch.from_numpy(packed.tokens[: len(packed) * seq_len].astype("int64")).view(len(packed), seq_len)


def batches(seqs: Optional[torch.Tensor], vocab: int, seq_len: int, batch: int, seed: int, rank: int = 0,
            world: int = 1):
    """Endless batches: shuffled sequences (a different slice per rank), or uniform random tokens."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    epoch = 0
    while True:
        if seqs is None:
            yield torch.randint(0, vocab, (batch, seq_len), generator=g)
            continue
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
        for i in range(0, len(order) - batch + 1, batch):
            yield seqs[order[i:i + batch]]
        epoch += 1


def _take(it, n: int, device: torch.device) -> list[torch.Tensor]:
    return [b.to(device) for b in itertools.islice(it, n)]


# ---------------------------------------------------------------- distill

def cmd_distill(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit seer distill", description="self-distil SeerAttention gates")
    p.add_argument("config", help="YAML file (see configs/seer/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    env = D.setup("torch")
    try:
        return distill(cfg, env)
    finally:
        D.teardown(env)


def distill(cfg: SeerConfig, env: D.Env) -> int:
    model, tok, data_cfg = load_base(cfg.model.checkpoint, cfg.model.random, cfg.train.seed)
    model.to(env.device)
    torch.manual_seed(cfg.train.seed)  # the same gate init on every rank and rerun
    gates = seer_model.attach_gates(model, block_size=cfg.gate.block_size, gate_dim=cfg.gate.gate_dim,
                                    q_pool=tuple(cfg.gate.q_pool), k_pool=tuple(cfg.gate.k_pool))
    if env.world > 1:
        for g in gates:
            for prm in g.parameters():
                tdist.broadcast(prm.data, 0)
    vocab, seq_len, bs, seed = model.config.vocab_size, cfg.data.seq_len, cfg.data.batch_size, cfg.train.seed
    train_seqs = token_source(tok, data_cfg, seq_len, cfg.data.max_corpus_mb, "train")
    val_seqs = token_source(tok, data_cfg, seq_len, cfg.data.max_corpus_mb, "validation")
    os.makedirs(cfg.output, exist_ok=True)
    log = Logger(cfg.output, main=env.main, total=cfg.train.steps, start=0, tensorboard=False, progress=False,
                 resume_step=None)
    src = "random tokens" if tok is None else f"{len(train_seqs)} train / {len(val_seqs)} validation sequences"
    n_gate = sum(p.numel() for g in gates for p in g.parameters())
    log.message(f"seer distill: {len(gates)} gates, {n_gate} parameters; block {cfg.gate.block_size}, seq {seq_len}, "
                f"batch {bs} x {env.world} rank(s); data: {src}; device {env.device}")

    def on_log(m):
        log.message(f"step {m['step']:>6}  kl {m['loss']:.5f}  lr {m['lr']:.2e}  grad_norm {m['grad_norm']:.3e}  "
                    f"{m['tokens_per_s']:.0f} tok/s")
        log.log(m)

    held_out = _take(batches(val_seqs, vocab, seq_len, bs, seed + 1_000_003), cfg.train.eval_batches, env.device)
    kl_before = distillation.evaluate_kl(model, held_out)
    hist = distillation.distill(
        model, (b.to(env.device) for b in batches(train_seqs, vocab, seq_len, bs, seed, env.rank, env.world)),
        steps=cfg.train.steps, lr=cfg.train.lr, warmup=cfg.train.warmup, weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip, log=on_log, log_every=cfg.train.log_every)
    kl_after = distillation.evaluate_kl(model, held_out)
    log.close()
    summary = {"gates": os.path.join(cfg.output, "gates.pt"), "layers": len(gates), "gate_parameters": n_gate,
               "steps": cfg.train.steps, "first_loss": hist[0], "last_loss": hist[-1],
               "held_out_kl_before": kl_before, "held_out_kl_after": kl_after}
    if env.main:
        base = cfg.model.checkpoint
        if base is None:  # keep the random base model, so `seer eval` can load it with the gates
            base = os.path.join(cfg.output, "base")
            model.save_pretrained(base, state_dict={k: v for k, v in model.state_dict().items() if "seer_gate" not in k})
        summary["checkpoint"] = base
        distillation.save_gates(model, summary["gates"], extra={"checkpoint": base, "config": asdict(cfg)})
        with open(os.path.join(cfg.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.message(f"held-out KL {kl_before:.5f} -> {kl_after:.5f}; gates -> {summary['gates']}")
    return 0


# ---------------------------------------------------------------- eval

def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit seer eval",
                                description="perplexity vs density: learned gate, static sink+window, oracle")
    p.add_argument("--gates", required=True, help="gates.pt written by `lowbit seer distill`")
    p.add_argument("--checkpoint", default=None, help="base model (default: the one recorded in the gate file)")
    p.add_argument("--densities", default="0.1,0.2,0.3,0.5", help="comma-separated target densities")
    p.add_argument("--thresholds", default="", help="comma-separated gate thresholds (report the density reached)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the distillation seq_len")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output", default=None, help="directory for results.md/.csv/.png (default: next to the gates)")
    args = p.parse_args(argv)
    rows = evaluate(args)
    out = args.output or os.path.dirname(os.path.abspath(args.gates))
    os.makedirs(out, exist_ok=True)
    table = format_table(rows)
    print(table)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = plot(rows, os.path.join(out, "ppl_vs_density.png"))
    print(f"wrote {out}/results.md, results.csv" + (f", {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0


def _floats(s: str, name: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {s!r}") from None


@torch.no_grad()
def perplexity(model, data: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for ids in data:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(nll / n)


def _row(model, data, method: str, target: str) -> dict:
    ppl = perplexity(model, data)
    return {"method": method, "target": target, "density": seer_model.measured_density(model), "ppl": ppl}


def evaluate(args) -> list[dict]:
    densities = _floats(args.densities, "--densities")
    thresholds = _floats(args.thresholds, "--thresholds")
    blob = torch.load(args.gates, map_location="cpu", weights_only=True)
    extra = blob.get("extra", {}) if isinstance(blob, dict) else {}
    checkpoint = args.checkpoint or extra.get("checkpoint")
    if checkpoint is None:
        raise ValueError("--checkpoint: the gate file records no base model; give --checkpoint")
    dcfg = extra.get("config", {}).get("data", {})
    seq_len = args.seq_len or dcfg.get("seq_len", 1024)
    model, tok, data_cfg = load_base(checkpoint)
    dev = D.local_device()
    model.to(dev)
    distillation.load_gates(model, args.gates)
    seqs = token_source(tok, data_cfg, seq_len, dcfg.get("max_corpus_mb"), "validation")
    data = _take(batches(seqs, model.config.vocab_size, seq_len, args.batch_size, 12345), args.batches, dev)
    seer_model.configure(model, "dense")
    rows = [{"method": "dense", "target": "", "density": 1.0, "ppl": perplexity(model, data)}]
    for d in densities:
        for method in ("gate", "static", "oracle"):
            seer_model.configure(model, method, density=d)
            rows.append(_row(model, data, method, f"density={d:g}"))
    for t in thresholds:
        seer_model.configure(model, "gate", threshold=t)
        rows.append(_row(model, data, "gate", f"threshold={t:g}"))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | selection | measured density | perplexity |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target'] or 'all blocks'} | {r['density']:.3f} | {r['ppl']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
    try:  # optional and slow to import: the table and CSV are written without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("gate", "o-"), ("static", "s--"), ("oracle", "^:")):
        pts = sorted((r["density"], r["ppl"]) for r in rows if r["method"] == method and r["target"].startswith("density"))
        if pts:
            ax.plot(*zip(*pts), style, label={"gate": "learned gate", "static": "sink + window",
                                              "oracle": "oracle"}[method])
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="gray", lw=1, label="dense")
    ax.set_xlabel("measured block density")
    ax.set_ylabel("perplexity")
    ax.set_title("SeerAttention: perplexity vs density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry point

USAGE = "usage: lowbit seer distill <config.yaml> [key=value ...] | lowbit seer eval --gates FILE [options]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], list(argv[1:])
    try:
        if cmd == "distill":
            return cmd_distill(rest)
        if cmd == "eval":
            return cmd_eval(rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"lowbit seer {cmd}: {e}", file=sys.stderr)
        return 2
    print(f"lowbit seer: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2
