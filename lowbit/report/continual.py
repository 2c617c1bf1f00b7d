"""Continual learning on a sequence of tasks: AdamW vs EWC vs CLASSP (`lowbit report continual`).

The tasks are the synthetic ones of lowbit's SFT data (`lowbit.train.sft_data`), one kind per stage,
at character level so no tokenizer is trained: ``sort`` and ``reverse`` a few letters, ``add`` two
numbers. A prompt and its answer are one sequence ``<bos> prompt <sep> answer <eos>``; only the answer
and <eos> are trained. A tiny Llama learns the tasks one after another, each for the same number of
steps, with one optimizer for the whole sequence (CLASSP's per-weight sums must carry over from task
to task: they are its memory). After every stage every task's held-out set is scored: the loss of the
answer tokens and the accuracy, the fraction of answers whose every token is the argmax under teacher
forcing, which is exactly what greedy decoding gets right.

Methods:

* ``adamw``: plain AdamW, the baseline that forgets.
* ``ewc``: AdamW plus Elastic Weight Consolidation (Kirkpatrick et al., 2017, "Overcoming catastrophic
  forgetting in neural networks"): after task t the diagonal Fisher F_t of the task's loss is kept with
  the weights theta*_t, and later stages add ``lambda / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``
  (one term per earlier task, as in the paper). F_t is the empirical Fisher: squared per-example
  gradients of the answer loss, averaged over `fisher_examples` training examples.
* ``classp``: `lowbit.optim.CLASSP` with its defaults.

Metrics (Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning"): R[i][j] is a task j score
after stage i. Plasticity: R[j][j], the score on a task right after learning it; forgetting of task j
(not the last): the best of R[i][j] over stages i >= j, before the end, minus its final R[T-1][j] (for
the loss: the final minus the best, so positive is worse in both).

Seeds: every method runs on seeds ``seed .. seed + seeds - 1``; a seed fixes the initial weights, the
training streams and the held-out sets, the same for every method, so two methods' scores pair by
seed. A claim compares two methods on one metric through the per-seed differences d_k = A_k - B_k:
mean d, standard error se = std(d) / sqrt(N) and z = mean / se, judged with k = 2 (`judge`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..optim import CLASSP

TASKS = ("sort", "reverse", "add")
METHODS = ("adamw", "ewc", "classp")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PAD, BOS, SEP, EOS = 0, 1, 2, 3
CHARS = LETTERS + "0123456789 +"
VOCAB = 4 + len(CHARS)
IGNORE = -100


@dataclass
class Settings:
    """The default size runs the 3 methods x 3 tasks in 2 to 4 minutes per seed on 2 shared CPU cores. The EWC
    strength trades forgetting for plasticity: at this size lambda 100 barely slows forgetting, 3000
    keeps the earlier tasks' losses several times lower than AdamW's while still learning each task."""
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    steps: int = 300  # per task
    batch: int = 32
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    lr: float = 3e-3  # AdamW and EWC
    classp_lr: float | None = None  # None: CLASSP's default
    ewc_lambda: float = 3000.0
    fisher_examples: int = 64
    val_examples: int = 256
    min_letters: int = 3
    max_letters: int = 4
    max_number: int = 19  # add: both terms in 0 .. max_number
    seed: int = 0  # the first seed
    seeds: int = 3  # seeds seed .. seed + seeds - 1, every method on each


QUICK = dict(steps=25, batch=16, hidden=32, layers=1, heads=2, intermediate=64, fisher_examples=8, val_examples=32)


# ---- tasks -------------------------------------------------------------------------------------------
def example(task: str, rng: random.Random, s: Settings) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randrange(s.max_number + 1), rng.randrange(s.max_number + 1)
        return f"add {a} + {b}", str(a + b)
    letters = rng.sample(LETTERS, rng.randint(s.min_letters, s.max_letters))
    if task == "sort":
        return "sort " + " ".join(letters), " ".join(sorted(letters))
    if task == "reverse":
        return "reverse " + " ".join(letters), " ".join(reversed(letters))
    raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")


def seq_len(s: Settings) -> int:
    """<bos>, the longest prompt, <sep>, the longest answer, <eos>."""
    letters, n = 2 * s.max_letters - 1, s.max_number
    return 3 + max(len("reverse ") + letters, len(f"add {n} + {n}")) + max(letters, len(str(2 * n)))


def encode(pairs: list[tuple[str, str]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels): the labels keep the answer and <eos>, IGNORE elsewhere; right-padded."""
    ids = torch.full((len(pairs), length), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    for r, (p, a) in enumerate(pairs):
        row = [BOS] + [4 + CHARS.index(c) for c in p] + [SEP]
        start = len(row)
        row += [4 + CHARS.index(c) for c in a] + [EOS]
        ids[r, :len(row)] = torch.tensor(row)
        labels[r, start:len(row)] = ids[r, start:len(row)]
    return ids, labels


def batches(task: str, s: Settings, seed: int):
    """An endless stream of training batches of `task` (fresh examples each step)."""
    rng = random.Random(f"{seed}-train-{task}")
    while True:
        yield encode([example(task, rng, s) for _ in range(s.batch)], seq_len(s))


def held_out(task: str, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(f"{s.seed}-val-{task}")
    return encode([example(task, rng, s) for _ in range(s.val_examples)], seq_len(s))


# ---- model, loss, scores -----------------------------------------------------------------------------
def make_model(s: Settings) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # optional and slow to import: only when run

    torch.manual_seed(s.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      max_position_embeddings=seq_len(s), tie_word_embeddings=False, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).float()


def answer_loss(model, ids, labels, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(target.shape)
    if reduction == "none":  # per example: the mean over its answer tokens
        return loss.sum(1) / (target != IGNORE).sum(1)
    return loss.sum() / (target != IGNORE).sum()


@torch.no_grad()
def score(model, ids, labels) -> dict:
    """{"loss": mean answer-token loss, "acc": fraction of answers right at every token}."""
    model.eval()
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") / mask.sum()
    right = ((logits.argmax(-1) == target) | ~mask).all(1)
    model.train()
    return {"loss": float(loss), "acc": float(right.float().mean())}


# ---- EWC -------------------------------------------------------------------------------------------------
class EWC:
    """The EWC penalty over the tasks learned so far (one Fisher diagonal and anchor per task)."""

    def __init__(self, strength: float):
        self.strength, self.terms = strength, []

    def consolidate(self, model, ids, labels) -> None:
        """Keep the empirical Fisher diagonal of the examples (ids, labels) and the current weights."""
        params = [p for p in model.parameters() if p.requires_grad]
        fisher = [torch.zeros_like(p) for p in params]
        for r in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            answer_loss(model, ids[r:r + 1], labels[r:r + 1]).backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.detach() ** 2, alpha=1.0 / ids.shape[0])
        model.zero_grad(set_to_none=True)
        self.terms.append((fisher, [p.detach().clone() for p in params]))

    def penalty(self, model) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        total = params[0].new_zeros(())
        for fisher, anchor in self.terms:
            for f, a, p in zip(fisher, anchor, params):
                total = total + (f * (p - a) ** 2).sum()
        return 0.5 * self.strength * total


# ---- one method through the task sequence ----------------------------------------------------------------
def optimizer(method: str, model, s: Settings):
    if method == "classp":
        return CLASSP(model.parameters()) if s.classp_lr is None else CLASSP(model.parameters(), lr=s.classp_lr)
    if method in ("adamw", "ewc"):
        return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")


def run_method(method: str, s: Settings, say=print) -> dict:
    """-> {"scores": R[stage][task] = {"loss", "acc"}, "train_loss": last-10-steps mean per stage}."""
    torch.manual_seed(s.seed)
    model = make_model(s)
    opt = optimizer(method, model, s)
    ewc = EWC(s.ewc_lambda) if method == "ewc" else None
    vals = {t: held_out(t, s) for t in s.tasks}
    scores, train_loss = [], []
    for stage, task in enumerate(s.tasks):
        stream, recent = batches(task, s, s.seed + stage), []
        for _ in range(s.steps):
            ids, labels = next(stream)
            loss = answer_loss(model, ids, labels)
            total = loss + ewc.penalty(model) if ewc is not None and ewc.terms else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            recent = (recent + [float(loss.detach())])[-10:]
        if ewc is not None and stage < len(s.tasks) - 1:
            rng = random.Random(f"{s.seed}-fisher-{task}")
            ewc.consolidate(model, *encode([example(task, rng, s) for _ in range(s.fisher_examples)], seq_len(s)))
        row = {t: score(model, *vals[t]) for t in s.tasks}
        scores.append(row)
        train_loss.append(sum(recent) / len(recent))
        say(f"  {method:<7} after {task:<8} " + "  ".join(f"{t} acc {row[t]['acc']:.2f} loss {row[t]['loss']:.3f}"
                                                          for t in s.tasks[:stage + 1]))
    return {"scores": scores, "train_loss": train_loss}


def summarize(scores: list[dict], tasks: tuple[str, ...]) -> dict:
    """Plasticity, forgetting and final scores from R[stage][task] (module docstring)."""
    T = len(tasks)
    out = {}
    for key, sign in (("acc", 1.0), ("loss", -1.0)):
        R = [[scores[i][t][key] for t in tasks] for i in range(T)]
        plastic = [R[j][j] for j in range(T)]
        forget = [max(sign * R[i][j] for i in range(j, T - 1)) - sign * R[T - 1][j] for j in range(T - 1)]
        out[key] = {"matrix": R, "plasticity": plastic, "forgetting": forget, "final": R[T - 1],
                    "mean_final": sum(R[T - 1]) / T, "mean_plasticity": sum(plastic) / T,
                    "mean_forgetting": sum(forget) / len(forget) if forget else 0.0}
    return out


def run_seed(s: Settings, say=print) -> dict:
    """Every method through the task sequence on the one seed `s.seed`: {method: run + "summary"}."""
    if len(s.tasks) < 2:
        raise ValueError("tasks: a sequence needs at least two tasks")
    res = {}
    for m in s.methods:
        r = run_method(m, copy.deepcopy(s), say)
        res[m] = r | {"summary": summarize(r["scores"], s.tasks)}
    return res


def seed_list(s: Settings) -> list[int]:
    if s.seeds < 1:
        raise ValueError(f"seeds: expected at least 1, got {s.seeds}")
    return list(range(s.seed, s.seed + s.seeds))


def run(s: Settings, say=print) -> dict:
    """Every method on every seed: {"settings", "seeds", "runs": [{"seed", "methods": {method: run +
    summary}}], "stats": {method: {metric: mean / std / values}}, "claims": [`claims` rows]}."""
    if len(s.tasks) < 2:
        raise ValueError("tasks: a sequence needs at least two tasks")
    runs = []
    for seed in seed_list(s):
        say(f"seed {seed}")
        runs.append({"seed": seed, "methods": run_seed(dataclasses.replace(s, seed=seed), say)})
    res = {"settings": dataclasses.asdict(s), "seeds": seed_list(s), "runs": runs}
    return res | {"stats": stats(res), "claims": claims(res)}


# ---- over seeds: per-method statistics and the paired claims ---------------------------------------------
METRICS = ("final_acc", "plasticity_acc", "forgetting_acc", "final_loss", "plasticity_loss", "forgetting_loss")


def metric(summary: dict, name: str) -> float:
    """'forgetting_acc' -> summary["acc"]["mean_forgetting"] (the mean over tasks of one run)."""
    kind, key = name.rsplit("_", 1)
    return summary[key][f"mean_{kind}"]


def values(res: dict, method: str, name: str) -> list[float]:
    """The metric of `method` on every seed, in seed order."""
    return [metric(r["methods"][method]["summary"], name) for r in res["runs"]]


def mean_std(xs: list[float]) -> dict:
    """{"mean", "std" (sample std, nan for one value), "n", "values"}."""
    return {"mean": sum(xs) / len(xs), "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
            "n": len(xs), "values": list(xs)}


def stats(res: dict) -> dict:
    methods = res["runs"][0]["methods"]
    return {m: {k: mean_std(values(res, m, k)) for k in METRICS} for m in methods}


REPRODUCED, NOISE, CONTRADICTED, NO_NOISE, NOT_RUN = (
    "reproduced", "inside the noise", "contradicted", "no noise estimate", "not run")
K = 2.0


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences d = a - b, their mean, se = std(d) / sqrt(N) and z = mean / se. N = 1: se and
    z are nan. se = 0 (every difference equal, up to float rounding of the values): z is nan, or 0 when
    the differences are all 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: expected two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.nan
    if se <= 1e-12 * max(abs(x) for x in list(a) + list(b)):  # 0.7 - 0.45 and 0.5 - 0.25 differ by rounding
        se = 0.0
    if n > 1 and se == 0:
        z = 0.0 if mean == 0 else math.nan
    else:
        z = mean / se
    return {"diffs": d, "n": n, "mean": mean, "se": se, "z": z}


def judge(z: float, expect: str, k: float = K) -> str:
    """The verdict on a claim about A - B from its z. expect "lower" / "higher": |z| > k in that direction
    is reproduced, |z| <= k inside the noise, |z| > k the other way contradicted. expect "tracks": |z| <= k
    is reproduced, else contradicted. z nan (one seed, or se 0 with a nonzero mean): no noise estimate."""
    if expect not in ("lower", "higher", "tracks"):
        raise ValueError(f"expect: 'lower', 'higher' or 'tracks', got {expect!r}")
    if math.isnan(z):
        return NO_NOISE
    if abs(z) <= k:
        return REPRODUCED if expect == "tracks" else NOISE
    if expect == "tracks":
        return CONTRADICTED
    return REPRODUCED if (z < 0) == (expect == "lower") else CONTRADICTED


@dataclasses.dataclass(frozen=True)
class Claim:
    label: str
    text: str
    a: str  # method
    b: str
    metric: str  # one of METRICS
    expect: str  # of a - b: "lower" | "higher" | "tracks"


CLAIMS = (
    Claim("a", "CLASSP forgets less than AdamW", "classp", "adamw", "forgetting_acc", "lower"),
    Claim("a", "CLASSP forgets less than AdamW", "classp", "adamw", "forgetting_loss", "lower"),
    Claim("b", "CLASSP is competitive with EWC on forgetting", "classp", "ewc", "forgetting_acc", "tracks"),
    Claim("b", "CLASSP is competitive with EWC on forgetting", "classp", "ewc", "forgetting_loss", "tracks"),
    Claim("c", "CLASSP keeps plasticity: it learns each new task as well as AdamW", "classp", "adamw",
          "plasticity_acc", "tracks"),
    Claim("c", "CLASSP keeps plasticity: it learns each new task as well as AdamW", "classp", "adamw",
          "plasticity_loss", "tracks"),
    Claim("d", "sanity (EWC's own claim): EWC forgets less than AdamW", "ewc", "adamw", "forgetting_acc", "lower"),
    Claim("d", "sanity (EWC's own claim): EWC forgets less than AdamW", "ewc", "adamw", "forgetting_loss", "lower"),
)


def meaning(metric_name: str, side: str) -> str:
    """What A - B "lower" / "higher" on a metric means in words ("forgets less", "learns less", ...)."""
    kind, key = metric_name.rsplit("_", 1)
    better = (side == "lower") == (kind == "forgetting" or key == "loss")  # lower forgetting / loss is better
    if kind == "forgetting":
        return "forgets less" if better else "forgets more"
    if kind == "plasticity":
        return "learns each task better" if better else "learns each task worse"
    return "ends better" if better else "ends worse"


def claims(res: dict, k: float = K) -> list[dict]:
    """One row per claim: the claim, the paired statistics of its methods' metric and the verdict."""
    methods = res["runs"][0]["methods"]
    out = []
    for c in CLAIMS:
        row = dataclasses.asdict(c) | {"k": k}
        if c.a not in methods or c.b not in methods:
            out.append(row | {"verdict": NOT_RUN})
            continue
        p = paired(values(res, c.a, c.metric), values(res, c.b, c.metric))
        out.append(row | p | {"verdict": judge(p["z"], c.expect, k)})
    return out
