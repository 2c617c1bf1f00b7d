"""The model: a `transformers` Llama built from the config, or any HF causal LM loaded by model.init_from
(Llama, Qwen2/3, Mistral, GPT-2's Conv1D layers, ...), converted with `lowbit.nn.convert`."""
from __future__ import annotations

import torch

from .. import nn as lnn
from ..errors import UserError

NO_QUANT = "bf16"  # the recipe that leaves nn.Linear alone (fp32 on CPU, bf16 under autocast)


def recipe_problem(cfg) -> str | None:
    """Why cfg.quant.recipe cannot run on cfg.model (None if it can); checked without building anything."""
    name = cfg.quant.recipe
    if name == NO_QUANT:
        return None
    try:
        recipe = lnn.get_recipe(name)
    except (ValueError, TypeError, FileNotFoundError) as err:
        msg = str(err)
        return "quant.recipe: " + (msg[len("recipe: "):] if msg.startswith("recipe: ") else msg)
    if not cfg.quant.strict:
        return None  # a layer whose shape does not fit stays in high precision
    m = cfg.model
    kv = (m.num_kv_heads or m.num_heads) * (m.hidden_size // m.num_heads)
    shapes = {"q_proj/o_proj": (m.hidden_size, m.hidden_size), "k_proj/v_proj": (m.hidden_size, kv),
              "gate_proj/up_proj": (m.hidden_size, m.intermediate_size), "down_proj": (m.intermediate_size, m.hidden_size)}
    for layer, (fin, fout) in shapes.items():
        why = recipe.shape_problem(fin, fout)
        if why:
            return (f"quant.recipe: {name} cannot quantize {layer} ({fin} -> {fout}) with quant.strict=true: {why}; "
                    "change model.hidden_size / model.intermediate_size or set quant.strict=false")
    return None


def build(cfg, vocab_size: int, special: dict) -> torch.nn.Module:
    """A fresh LlamaForCausalLM (seeded by train.seed) with the recipe applied."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional and slow to import: only when a model is built

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=cfg.data.seq_len,
        tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope_theta, attention_dropout=0.0,
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))
    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(hf_cfg)
    model.to(dtype=getattr(torch, m.dtype))
    return apply_recipe(model, cfg)


def prepare_loaded(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """A model loaded by model.init_from, made this run's: parameter dtype, context length, recipe."""
    model.to(dtype=getattr(torch, cfg.model.dtype))
    limit = getattr(model.config, "n_positions", None)  # learned absolute positions (GPT-2 family)
    if limit is not None and cfg.data.seq_len > limit:
        raise UserError(f"data.seq_len: {cfg.data.seq_len} exceeds the {limit} positions of the model in "
                        f"model.init_from; set data.seq_len <= {limit}")
    return apply_recipe(model, cfg)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (as TRL's DPO / KTO / BCO trainers default to): the policy and the reference must score a
    sequence alike, or the implicit reward is noise at the first step already."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0  # Llama-family attention keeps its rate as a plain float


def apply_recipe(model: torch.nn.Module, cfg) -> torch.nn.Module:
    q = cfg.quant
    if q.recipe == NO_QUANT and not q.smooth_swiglu:
        return model
    lnn.convert(model, q.recipe, skip=list(q.skip) or None, keep_high_precision=q.keep_high_precision,
                strict=q.strict, smooth_swiglu=q.smooth_swiglu)
    return model


def hf_copy(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain `transformers` model (no lowbit layers) carrying `state_dict`, for save_pretrained."""
    from transformers import AutoModelForCausalLM  # optional and slow to import: only for the HF export

    fresh = AutoModelForCausalLM.from_config(model.config)
    own = fresh.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise RuntimeError(f"HF export: the trained model lacks {missing[:4]} (lowbit.nn changed parameter names?)")
    fresh.load_state_dict({k: state_dict[k].to(own[k].dtype) for k in own if k in state_dict}, strict=False)
    return fresh


def count_parameters(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += getattr(p, "ds_numel", p.numel())
    return n


def clear_weight_caches(model: torch.nn.Module) -> None:
    """LowBitLinear caches its quantized weight; engines that write weights through .data need a reset."""
    for m in model.modules():
        if hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()
