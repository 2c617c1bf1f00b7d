"""The two SFT tasks of the objectives arm, at the ends of the prior continuum of a model
pretrained on lowbit's embedded corpus (Python standard-library source):

  strong  continue a piece of that corpus: prompt = `prompt_chars` characters of a source line
          window, response = the next `response_chars` characters. The pretrained model already
          assigns these tokens high probability (training pieces from the corpus's train split,
          held-out pieces from its validation split).
  weak    lowbit's built-in synthetic task (sort / reverse letters, add two numbers) in a chat
          format the pretraining never showed.

Both are written as prompt/response JSONL, so `lowbit sft` reads them like any user data; where
each task sits is measured, not assumed (`prior`: mean probability of the response tokens under the
pretrained model, `lowbit.objectives.prior_strength`).
"""
from __future__ import annotations

import json
import os
import random

from ..objectives import prior_strength
from ..train import pretrained
from ..train.corpus import pretrain_documents
from ..train.data import collate
from ..train.sft_data import sft_data, synthetic_pairs

TASKS = ("strong", "weak")


def corpus_pieces(docs: list[str], n: int, seed: int, prompt_chars: int = 40, response_chars: int = 24) -> list[tuple]:
    """`n` (prompt, response) windows of consecutive text, starting at a line start, without blank responses."""
    rng = random.Random(seed)
    docs = [d for d in docs if len(d) > 4 * (prompt_chars + response_chars)]
    if not docs:
        raise ValueError("docs: no document is long enough to cut prompt/response windows from")
    out = []
    while len(out) < n:
        d = rng.choice(docs)
        s = d.find("\n", rng.randrange(len(d) - prompt_chars - response_chars - 1)) + 1
        p, r = d[s:s + prompt_chars], d[s + prompt_chars:s + prompt_chars + response_chars]
        if len(p) == prompt_chars and len(r) == response_chars and r.strip() and p.strip():
            out.append((p, r))
    return out


def write_jsonl(path: str, pairs: list[tuple[str, str]]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, r in pairs:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return path


def write_tasks(folder: str, data_cfg, n_train: int, n_val: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """task -> (train JSONL, validation JSONL) under `folder`."""
    train_docs, val_docs, _ = pretrain_documents(data_cfg)
    files = {
        "strong": (corpus_pieces(train_docs, n_train, seed), corpus_pieces(val_docs, n_val, seed + 1)),
        "weak": (synthetic_pairs(n_train, seed), synthetic_pairs(n_val, seed + 7919)),
    }
    return {t: (write_jsonl(os.path.join(folder, f"{t}-train.jsonl"), tr),
                write_jsonl(os.path.join(folder, f"{t}-val.jsonl"), va)) for t, (tr, va) in files.items()}


def prior(sft_cfg, batches: int = 4) -> float:
    """Mean probability of the response tokens of `sft_cfg`'s training data under its model.init_from."""
    model, tok = pretrained.load(sft_cfg.model.init_from)
    train_set, _, _ = sft_data(sft_cfg, tok)
    bs = sft_cfg.train.micro_batch_size
    loader = [collate([train_set[i] for i in range(j, min(len(train_set), j + bs))])
              for j in range(0, min(len(train_set), batches * bs), bs)]
    return float(prior_strength(model, loader).mean_prob)
