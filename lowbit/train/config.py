"""The training configuration: OmegaConf structured dataclasses, YAML files + dotted overrides.

`load(paths, overrides, task=...)` merges the dataclass defaults, each YAML file in order, then
``key=value`` overrides, and validates the result before anything is built: unknown keys, wrong
types and impossible combinations raise `ConfigError` naming the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import UserError
from ..objectives import OBJECTIVES, PAPER_KEYS, is_objective, parse_objective
from . import model as model_mod, optim as optim_mod

TASKS = ("pretrain", "sft", "align")
OPTIMIZERS = ("adamw", "stable_spam", "spam", "classp")
SCHEDULES = ("cosine", "linear", "constant")
ENGINES = ("auto", "torch", "deepspeed")
DTYPES = ("float32", "bfloat16")
ALIGN_METHODS = ("dpo", "kldo", "kto", "bco")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""


def _f(default, help: str, factory=None):
    """A dataclass field with a help text (shown by ``lowbit <task> --help``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    hidden_size: int = _f(256, "width of the Llama model")
    num_layers: int = _f(4, "number of transformer blocks")
    num_heads: int = _f(4, "attention heads")
    num_kv_heads: Optional[int] = _f(None, "key/value heads (grouped-query attention); null = num_heads")
    intermediate_size: int = _f(768, "SwiGLU MLP width")
    tie_embeddings: bool = _f(True, "share the input embedding and the LM head")
    rope_theta: float = _f(10000.0, "RoPE base")
    init_from: Optional[str] = _f(None, "start from this lowbit checkpoint / run dir / HF export (sft, align)")
    init_from_ema: bool = _f(False, "with a lowbit checkpoint / run dir as model.init_from: start from its EMA weights "
                             "(train.ema) instead of the raw ones; an hf-ema/ export needs no flag")
    dtype: str = _f("float32", "parameter dtype: float32 or bfloat16")


@dataclass
class QuantConfig:
    recipe: str = _f("bf16", "lowbit.nn recipe name or a recipe .yaml path (bf16 = no quantization)")
    skip: List[str] = _f(None, "module-name patterns left as nn.Linear", factory=list)
    keep_high_precision: Optional[List[str]] = _f(None, "extra module-name patterns kept in high precision")
    strict: bool = _f(False, "error (instead of keeping high precision) when a layer's shape does not fit the recipe")
    smooth_swiglu: bool = _f(False, "Smooth-SwiGLU scaling in the MLPs")


@dataclass
class DataConfig:
    train: Optional[str] = _f(None, "text / JSONL file or directory, or a saved `datasets` dir; null = embedded stdlib corpus")
    validation: Optional[str] = _f(None, "held-out data (same kinds as data.train); null = split off data.train")
    text_key: str = _f("text", "JSONL field holding the text (pretraining)")
    val_fraction: float = _f(0.05, "fraction of documents held out when data.validation is null")
    max_corpus_mb: Optional[float] = _f(None, "use at most this many MB of the embedded corpus (deterministic subset)")
    seq_len: int = _f(128, "tokens per packed sequence")
    tokenizer: Optional[str] = _f(None, "tokenizer.json or a local HF tokenizer dir; null = BPE trained on the corpus")
    vocab_size: int = _f(4096, "vocabulary of the trained BPE tokenizer")
    cache_dir: Optional[str] = _f(None, "where tokenizers and token arrays are cached; null = $LOWBIT_CACHE or ~/.cache/lowbit")
    synthetic_examples: int = _f(4096, "size of the built-in synthetic SFT / preference task (when data.train is null)")
    chat_template: Optional[str] = _f(None, "sft / align: null = the tokenizer's own chat template, else the built-in "
                                      "format; builtin; or a Jinja template file (saved with the tokenizer)")
    packing: bool = _f(False, "sft: pack several examples into each data.seq_len row (positions restart and "
                       "attention stays within each example)")
    document_mask: bool = _f(True, "pretrain: positions restart and attention stops at each document (EOS) in "
                             "a row; false = attend across documents")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "adamw | stable_spam | spam | classp")
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    betas: List[float] = _f(None, "(beta1, beta2)", factory=lambda: [0.9, 0.95])
    eps: float = _f(1e-8, "Adam epsilon")
    state_dtype: str = _f("fp32", "moment storage for stable_spam / spam: fp32, bf16, fp8, int8")
    args: Dict[str, Any] = _f(None, "extra keyword arguments of the optimizer (e.g. gamma1, theta)", factory=dict)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    schedule: str = _f("cosine", "cosine | linear | constant decay after warm-up")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of optim.lr")


@dataclass
class ObjectiveConfig:
    name: str = _f("nll", "sft: nll | neg_p | f_alpha | threshold | top_fraction | bottom_fraction | auto, or a key "
                   "of the paper's code: original | p | GeneralFamily-<alpha> | OnlyTopP-<q> | OnlyBottomP-<q> | "
                   "OnlyTopLogP-<q> | OnlyBottomLogP-<q> (README, objectives table)")
    alpha: Optional[float] = _f(None, "f_alpha exponent")
    tau: Optional[float] = _f(None, "threshold objective's probability cut")
    fraction: Optional[float] = _f(None, "top_fraction / bottom_fraction: share of the tokens trained on")
    fused: bool = _f(False, "fused LM head + loss (no logits tensor)")


@dataclass
class AlignConfig:
    method: str = _f("dpo", "dpo (f-DPO, preference pairs) | kldo | kto | bco (labelled prompt / response data)")
    beta: float = _f(0.1, "inverse temperature of the implicit reward")
    divergence: str = _f("reverse_kl", "f-DPO divergence: reverse_kl | forward_kl | js | alpha")
    alpha: Optional[float] = _f(None, "alpha of divergence=alpha")
    label_smoothing: float = _f(0.0, "conservative DPO epsilon")
    reference: Optional[str] = _f(None, "reference model checkpoint; null = the initial policy (model.init_from)")
    desirable_weight: float = _f(1.0, "kto: weight of the aligned (desirable) examples' losses")
    undesirable_weight: float = _f(1.0, "kto: weight of the unaligned (undesirable) examples' losses")
    separation_data: Optional[str] = _f(None, "JSONL of safe / harmful prompts (see lowbit eval --help): the "
                                        "summary reports their separation before and after alignment")
    separation_layer: int = _f(-1, "hidden layer the separation is measured at (-1 = last)")


@dataclass
class TrainConfig:
    steps: int = _f(100, "optimizer steps")
    micro_batch_size: int = _f(8, "sequences per rank per forward")
    global_batch_size: Optional[int] = _f(None, "sequences per step over all ranks; null = micro_batch_size x world size")
    seed: int = _f(0, "seed of the model init, data order and dropout")
    eval_every: int = _f(0, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = _f(8, "validation batches per evaluation")
    log_every: int = _f(1, "write a metrics line every N steps")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "complete checkpoints kept on disk")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite steps")
    spike_factor: float = _f(3.0, "log a loss spike when the loss exceeds this multiple of its running mean")
    ema: Optional[float] = _f(0.0, "decay of an exponential moving average of the (fp32 master) weights, in [0, 1); "
                              "0 or null = off. Saved in checkpoints (sharded like the weights under ZeRO), exported "
                              "to <run.dir>/hf-ema")
    ema_every: int = _f(1, "update the EMA every N optimizer steps")


@dataclass
class DistConfig:
    engine: str = _f("auto", "auto (DeepSpeed when launched on several ranks and installed) | torch | deepspeed")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3 (configs/deepspeed/zero{N}.json)")
    deepspeed_config: Optional[str] = _f(None, "a DeepSpeed JSON file instead of the built-in zero{N}.json")


@dataclass
class RunConfig:
    dir: Optional[str] = _f(None, "run directory; null = runs/<task>-<recipe>")
    resume: str = _f("auto", "auto (newest intact checkpoint, if any) | never (start fresh) | a checkpoint dir")
    overwrite: bool = _f(False, "with run.resume=never: move a run found in run.dir aside to <dir>.old-<time>")
    export_hf: bool = _f(True, "write an HF save_pretrained export + tokenizer at the end")
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    tensorboard: bool = _f(True, "TensorBoard event files in <run dir>/tb")


@dataclass
class Config:
    task: str = _f("pretrain", "pretrain | sft | align (set by the subcommand)")
    model: ModelConfig = _f(None, "", factory=ModelConfig)
    quant: QuantConfig = _f(None, "", factory=QuantConfig)
    data: DataConfig = _f(None, "", factory=DataConfig)
    optim: OptimConfig = _f(None, "", factory=OptimConfig)
    objective: ObjectiveConfig = _f(None, "", factory=ObjectiveConfig)
    align: AlignConfig = _f(None, "", factory=AlignConfig)
    train: TrainConfig = _f(None, "", factory=TrainConfig)
    dist: DistConfig = _f(None, "", factory=DistConfig)
    run: RunConfig = _f(None, "", factory=RunConfig)


def _omega_message(e: OmegaConfBaseException, source: str, schema) -> str:
    key = getattr(e, "full_key", None) or "?"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else None
        known = sorted(f.name for f in dataclasses.fields(_section(schema, parent)))
        return f"{source}: unknown key '{key}'; expected one of {known}"
    if isinstance(e, ValidationError):
        return f"{source}: bad value for '{key}': {first}"
    return f"{source}: '{key}': {first}"


def _section(schema, dotted: Optional[str]):
    cls = schema
    for part in (dotted.split(".") if dotted else []):
        f = {x.name: x for x in dataclasses.fields(cls)}.get(part)
        if f is None or not dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            return cls
        cls = f.default_factory
    return cls


def structured(schema, paths=(), overrides=(), base: Optional[dict] = None, file_arg: str = "--config"):
    """An instance of the dataclass `schema`: its defaults (or `base`, a dict) <- YAML files <- ``key=value``
    overrides. Unknown keys, wrong types and missing values raise ConfigError naming the key;
    `file_arg` names where the file paths came from."""
    cfg = OmegaConf.structured(schema)
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(base))
        except OmegaConfBaseException as e:
            raise ConfigError(_omega_message(e, "config", schema)) from None
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"{file_arg}: no such file {path!r}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            continue
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise ConfigError(_omega_message(e, path, schema)) from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=100)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(_omega_message(e, f"override {item!r}", schema)) from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a mandatory value (???) left unset
        raise ConfigError(_omega_message(e, "config", schema)) from None


def load(paths=(), overrides=(), task: Optional[str] = None, base: Optional[dict] = None) -> Config:
    """Merge defaults (or `base`, a dict) <- YAML files <- ``key=value`` overrides; validate; return a `Config`."""
    cfg = structured(Config, paths, overrides, base)
    if task is not None:
        cfg.task = task
    validate(cfg)
    return cfg


def from_dict(d: dict) -> Config:
    """A validated Config from a nested dict (e.g. the one saved in a checkpoint)."""
    return load(base=d)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe(prefix: str = "", cls=Config) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf key: the body of ``--help``."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        val = getattr(inst, f.name)
        if dataclasses.is_dataclass(val):
            rows += describe(key + ".", type(val))
        else:
            rows.append((key, OmegaConf.to_yaml({"v": val}).strip()[3:].strip() or "null", f.metadata.get("help", "")))
    return rows


# ---- semantic validation -------------------------------------------------------------------------
def _need(cond: bool, key: str, expected: str, got: Any, errors: list) -> None:
    if not cond:
        errors.append(f"{key}: expected {expected}, got {got!r}")


def validate(c: Config) -> None:
    """Raise ConfigError listing every problem (each naming its key) before any work is done."""
    e: list[str] = []
    _need(c.task in TASKS, "task", f"one of {list(TASKS)}", c.task, e)
    m = c.model
    for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _need(getattr(m, k) >= 1, f"model.{k}", "an int >= 1", getattr(m, k), e)
    if m.num_heads >= 1 and m.hidden_size % m.num_heads:
        e.append(f"model.hidden_size: expected a multiple of model.num_heads ({m.num_heads}), got {m.hidden_size}")
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    if kv < 1 or (m.num_heads >= 1 and m.num_heads % kv):
        e.append(f"model.num_kv_heads: expected a divisor of model.num_heads ({m.num_heads}), got {m.num_kv_heads!r}")
    _need(m.dtype in DTYPES, "model.dtype", f"one of {list(DTYPES)}", m.dtype, e)
    if m.init_from is not None and not os.path.exists(m.init_from):
        e.append(f"model.init_from: no such checkpoint / directory {m.init_from!r}")
    if m.init_from_ema and m.init_from is None:
        e.append("model.init_from_ema: loads the EMA weights of model.init_from, which is null")

    d = c.data
    _need(d.seq_len >= 2, "data.seq_len", "an int >= 2", d.seq_len, e)
    _need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "a fraction in (0, 1)", d.val_fraction, e)
    _need(d.vocab_size >= 300, "data.vocab_size", "an int >= 300 (256 bytes + merges + special tokens)", d.vocab_size, e)
    _need(d.max_corpus_mb is None or d.max_corpus_mb > 0, "data.max_corpus_mb", "null or a size > 0", d.max_corpus_mb, e)
    _need(d.synthetic_examples >= 16, "data.synthetic_examples", "an int >= 16", d.synthetic_examples, e)
    for k in ("train", "validation", "tokenizer"):
        p = getattr(d, k)
        if p is not None and not os.path.exists(p):
            e.append(f"data.{k}: no such file or directory {p!r}")
    if d.chat_template not in (None, "builtin") and not os.path.isfile(d.chat_template):
        e.append(f"data.chat_template: expected null, builtin or a Jinja template file, got {d.chat_template!r}")
    if d.packing and c.task == "align":
        e.append("data.packing: alignment scores each sequence on its own; set data.packing=false")

    o = c.optim
    _need(o.name in OPTIMIZERS, "optim.name", f"one of {list(OPTIMIZERS)}", o.name, e)
    _need(o.lr >= 0 and math.isfinite(o.lr), "optim.lr", "a finite number >= 0", o.lr, e)
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas, e)
    _need(o.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0 = off)", o.grad_clip, e)
    _need(o.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", o.warmup_steps, e)
    _need(o.schedule in SCHEDULES, "optim.schedule", f"one of {list(SCHEDULES)}", o.schedule, e)
    _need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]", o.min_lr_ratio, e)
    if o.name in OPTIMIZERS and not e:
        try:
            optim_mod.check(c)
        except ValueError as err:
            e.append(str(err))
    if o.state_dtype != "fp32" and o.name not in ("stable_spam", "spam"):
        e.append(f"optim.state_dtype: {o.state_dtype!r} needs optim.name stable_spam or spam ({o.name} keeps fp32 state)")

    ob = c.objective
    if c.task == "sft":
        _validate_objective(ob, e)
    elif ob.name != "nll":
        e.append(f"objective.name: {c.task} trains with nll; objective.name={ob.name!r} is for the sft task")

    a = c.align
    if c.task == "align":
        _need(a.method in ALIGN_METHODS, "align.method", f"one of {list(ALIGN_METHODS)}", a.method, e)
        _need(a.beta > 0, "align.beta", "a number > 0", a.beta, e)
        if a.reference is not None and not os.path.exists(a.reference):
            e.append(f"align.reference: no such checkpoint {a.reference!r}")
        if ob.fused:
            e.append("objective.fused: align computes sequence log-probs from logits; set objective.fused=false")
        for k in ("desirable_weight", "undesirable_weight"):
            _need(getattr(a, k) >= 0, f"align.{k}", "a number >= 0", getattr(a, k), e)
        if a.method == "kto" and c.train.micro_batch_size < 2:
            e.append("train.micro_batch_size: kto pairs each prompt with another example's response in its "
                     f"micro-batch, so it needs >= 2, got {c.train.micro_batch_size}")
        if a.separation_data is not None and not os.path.isfile(a.separation_data):
            e.append(f"align.separation_data: no such file {a.separation_data!r}")

    t = c.train
    for k in ("steps", "micro_batch_size", "log_every", "eval_batches", "keep_checkpoints", "max_bad_steps"):
        _need(getattr(t, k) >= 1, f"train.{k}", "an int >= 1", getattr(t, k), e)
    for k in ("eval_every", "checkpoint_every", "seed"):
        _need(getattr(t, k) >= 0, f"train.{k}", "an int >= 0", getattr(t, k), e)
    if t.global_batch_size is not None and (t.global_batch_size < 1 or t.global_batch_size % max(t.micro_batch_size, 1)):
        e.append(f"train.global_batch_size: expected a multiple of train.micro_batch_size ({t.micro_batch_size}), "
                 f"got {t.global_batch_size}")
    _need(t.spike_factor > 1, "train.spike_factor", "a number > 1", t.spike_factor, e)
    _need(t.ema is None or 0 <= t.ema < 1, "train.ema", "a decay in [0, 1) (0 or null = off)", t.ema, e)
    _need(t.ema_every >= 1, "train.ema_every", "an int >= 1", t.ema_every, e)

    ds = c.dist
    _need(ds.engine in ENGINES, "dist.engine", f"one of {list(ENGINES)}", ds.engine, e)
    _need(ds.zero_stage in (0, 1, 2, 3), "dist.zero_stage", "0, 1, 2 or 3", ds.zero_stage, e)
    if ds.deepspeed_config is not None and not os.path.isfile(ds.deepspeed_config):
        e.append(f"dist.deepspeed_config: no such file {ds.deepspeed_config!r}")
    if ds.zero_stage > 0 and ds.engine == "torch":
        e.append(f"dist.zero_stage: ZeRO stage {ds.zero_stage} needs the DeepSpeed engine, but dist.engine='torch'")
    if ds.zero_stage == 3 and ob.fused:
        e.append("objective.fused: the fused LM head reads lm_head.weight outside the module's forward, which ZeRO-3 "
                 "leaves partitioned; set objective.fused=false or dist.zero_stage<=2")
    r = c.run
    if r.resume not in ("auto", "never") and not os.path.isdir(r.resume):
        e.append(f"run.resume: expected auto, never or an existing checkpoint dir, got {r.resume!r}")
    if r.overwrite and r.resume != "never":
        e.append(f"run.overwrite: moves an old run aside to start fresh, which needs run.resume=never (got {r.resume!r})")

    _validate_recipe(c, e)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def _validate_objective(ob: ObjectiveConfig, e: list) -> None:
    """objective.name: lowbit's names, the authors' keys verbatim, or auto; then its hyper-parameters."""
    if ob.name == "auto":
        for k in ("alpha", "tau", "fraction"):
            if getattr(ob, k) is not None:
                e.append(f"objective.{k}: objective.name=auto picks a complete objective; leave objective.{k} null")
        return
    if not is_objective(ob.name):
        why = ""
        try:
            parse_objective(ob.name)
        except (TypeError, ValueError) as err:  # e.g. the renamed top_p / bottom_p explain their replacement
            why = f" ({err})" if "unknown objective" not in str(err) else ""
        e.append(f"objective.name: expected one of {list(OBJECTIVES) + ['auto']} or a key of the paper's code "
                 f"({', '.join(PAPER_KEYS)}), got {ob.name!r}{why}")
        return
    try:
        parse_objective(ob.name, alpha=ob.alpha, tau=ob.tau, fraction=ob.fraction)
    except (TypeError, ValueError) as err:
        key = next((k for k in ("alpha", "tau", "fraction") if k in str(err)), "name")
        e.append(f"objective.{key}: {err}")


def _validate_recipe(c: Config, e: list) -> None:
    """The recipe exists and fits every Linear shape of the model (checked arithmetically, nothing built)."""
    problem = model_mod.recipe_problem(c)
    if problem:
        e.append(problem)
