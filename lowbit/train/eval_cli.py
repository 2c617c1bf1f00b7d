"""`lowbit eval --checkpoint DIR`: held-out perplexity and accuracy on the built-in SFT task, or with
``--separation DATA.jsonl`` the separation of safe and harmful prompts in the model's hidden states.

The model is rebuilt from the checkpoint (its own config and recipe; an HF export runs unquantized),
evaluated on the validation split of its pretraining data (the embedded corpus unless the config
names other files) and on the held-out examples of the built-in synthetic task, encoded with the
model's chat template when its tokenizer has one.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

from ..attention import apply_seer, measured_density
from . import config as cfgmod
from . import corpus, data as data_mod, dist as D, evaluate, model as model_mod, pretrained, safety, sft_data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit eval", description="held-out perplexity and exact-match accuracy on "
                                "the built-in SFT task, for a run dir, a lowbit checkpoint or an HF export")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step_* dir or HF export dir")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a lowbit checkpoint / run dir "
                   "(trained with train.ema); the run's hf-ema/ export needs no flag")
    p.add_argument("--batches", type=int, default=16, help="validation batches (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--attention", choices=["dense", "seer"], default="dense",
                   help="seer: apply SeerAttention gates (lowbit.attention.apply_seer)")
    p.add_argument("--gates", default=None, help="gate weights for --attention seer")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--separation", default=None, metavar="DATA.jsonl",
                   help="instead: separation of safe and harmful prompts (KLDO paper's metric). DATA.jsonl: "
                        + safety.FORMAT.replace("%", "%%"))
    p.add_argument("--layer", type=int, default=-1, help="hidden layer for --separation (default -1, the last; "
                   "0 = the embeddings)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides of the checkpoint's config")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        res = separation_of_checkpoint(args) if args.separation else evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit eval: {e}", file=sys.stderr)
        return 2
    for k, v in res.items():
        print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def separation_of_checkpoint(args) -> dict:
    """`safety.measure` of the checkpoint's model (with its recipe, as it was trained) on args.separation."""
    kind, where = pretrained.resolve(args.checkpoint)
    model, tok = pretrained.load(where, ema=args.ema)
    if kind == "lowbit":
        model_mod.apply_recipe(model, pretrained.checkpoint_config(where))
    model.to(D.local_device())
    res = safety.measure(model, tok, args.separation, args.layer)
    return {"checkpoint": where, **res}


def evaluate_checkpoint(args) -> dict:
    kind, where = pretrained.resolve(args.checkpoint)
    model, tok = pretrained.load(where, ema=args.ema)
    if kind == "lowbit":
        cfg = pretrained.checkpoint_config(where)
        model_mod.apply_recipe(model, cfg)
    else:
        cfg = cfgmod.Config()
    if args.overrides:
        bad = [o for o in args.overrides if not o.startswith("data.")]
        if bad:
            raise ValueError(f"eval overrides: only data.* keys apply to evaluation, got {bad}")
        cfg = cfgmod.load([], args.overrides, base=cfgmod.to_dict(cfg))
    if args.attention == "seer":
        if args.gates is None:
            raise ValueError("--attention seer: give --gates (the trained gate weights)")
        apply_seer(model, args.gates, threshold=args.threshold, density=args.density)
    device = D.local_device()
    model.to(device)
    env = D.Env(0, 1, 0, device, "torch", False)
    kw = dict(batches=args.batches, batch_size=args.batch_size, env=env)

    pdata = copy.copy(cfg.data)
    if cfg.task != "pretrain":  # SFT / preference files are not a perplexity corpus: use the embedded one
        pdata.train = pdata.validation = None
    _, val_docs, source = corpus.pretrain_documents(pdata)
    eos = tok.eos_token_id if cfg.data.document_mask else None  # documents kept apart as in training
    val = data_mod.Packed(data_mod.tokenize_stream(tok, val_docs), cfg.data.seq_len, eos)
    lm = evaluate.language_model(model, val, **kw)
    _, held_out = sft_data.split_synthetic(cfg.data.synthetic_examples, cfg.train.seed)
    # a data.chat_template file was saved into the checkpoint's tokenizer: only "builtin" needs the config
    template = sft_data.resolve_template(tok, "builtin" if cfg.data.chat_template == "builtin" else None)
    chat = sft_data.ChatEncoder(tok, template)
    task = sft_data.Examples([sft_data.encode_chat(tok, [("user", p), ("assistant", r)], cfg.data.seq_len, chat)
                              for p, r in held_out])
    sft = evaluate.language_model(model, task, batches=len(task), batch_size=args.batch_size, env=env)
    res = {"checkpoint": where, "weights": "ema" if args.ema else "raw",
           "recipe": cfg.quant.recipe if kind == "lowbit" else "none (HF export)",
           "data": source, "val_loss": lm["val_loss"], "val_ppl": lm["val_ppl"], "val_tokens": lm["val_tokens"],
           "sft_task_exact_match": sft["val_exact_match"], "sft_task_loss": sft["val_loss"],
           "sft_task_examples": len(task), "attention": args.attention}
    if args.attention == "seer":
        res["seer_measured_density"] = measured_density(model)
    return res
