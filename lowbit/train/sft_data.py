"""SFT and preference data: chat encoding with the prompt masked, JSONL readers, a built-in synthetic task.

Encoding: ``<|user|> prompt <|assistant|> response <|endoftext|>``; labels are -100 everywhere except
the response and its EOS, so only the answer is trained. Sequences are right-padded to ``seq_len``
(padding is never attended to by earlier positions under the causal mask, and carries label -100).

The built-in task is generated from a seed, so SFT and alignment run offline and reproducibly:
sort or reverse a few letters, or add two numbers. Preference pairs reuse it with a corrupted answer
as the rejected (DPO) / unaligned (KLDO) response.
"""
from __future__ import annotations

import random

import torch

from .corpus import DataError, jsonl

IGNORE = -100
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def synthetic_example(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"add {a} + {b}", str(a + b)
    letters = rng.sample(LETTERS, rng.randrange(3, 7))
    if kind == 0:
        return "sort " + " ".join(letters), " ".join(sorted(letters))
    return "reverse " + " ".join(letters), " ".join(reversed(letters))


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same kind (for rejected / unaligned responses)."""
    if answer.isdigit():
        return str(int(answer) + rng.choice([-11, -10, -1, 1, 10, 11]) if int(answer) > 11 else int(answer) + 1)
    parts = answer.split()
    while True:
        shuffled = rng.sample(parts, len(parts))
        if shuffled != parts:
            return " ".join(shuffled)


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [synthetic_example(rng) for _ in range(n)]


def split_synthetic(n: int, seed: int) -> tuple[list, list]:
    """Train and held-out examples of the built-in task (held-out drawn from a different stream)."""
    return synthetic_pairs(n, seed), synthetic_pairs(max(64, n // 16), seed + 7919)


def encode_chat(tok, turns: list[tuple[str, str]], seq_len: int) -> dict:
    """turns: (role, text) with role user | assistant; assistant text (and its EOS) is trained."""
    ids, labels = [], []
    user = tok.convert_tokens_to_ids("<|user|>")
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for role, text in turns:
        body = tok(text, add_special_tokens=False)["input_ids"]
        if role == "assistant":
            ids += [assistant] + body + [tok.eos_token_id]
            labels += [IGNORE] + body + [tok.eos_token_id]
        else:
            ids += [user] + body
            labels += [IGNORE] * (len(body) + 1)
    ids, labels = ids[:seq_len], labels[:seq_len]
    pad = seq_len - len(ids)
    return {"input_ids": torch.tensor(ids + [tok.pad_token_id] * pad), "labels": torch.tensor(labels + [IGNORE] * pad)}


def _records(path: str) -> list[tuple[int, dict]]:
    out = []
    for n, rec in jsonl(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        out.append((n, rec))
    if not out:
        raise DataError(f"{path}: no records (empty file)")
    return out


def _turns(rec: dict, where: str) -> list[tuple[str, str]]:
    if "messages" in rec:
        turns = []
        for m in rec["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs role system|user|assistant and string content")
            turns.append(("user" if m["role"] == "system" else m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise DataError(f"{where}: no assistant message to train on")
        return turns
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return [("user", rec["prompt"]), ("assistant", rec["response"])]
    raise DataError(f"{where}: expected 'messages' or 'prompt' + 'response' string fields")


class Examples:
    """A list of encoded examples with the `Packed` interface (len, getitem)."""

    def __init__(self, items: list[dict]):
        if not items:
            raise DataError("no examples")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def sft_data(cfg, tok) -> tuple[Examples, Examples, str]:
    d = cfg.data
    if d.train is None:
        tr, va = split_synthetic(d.synthetic_examples, cfg.train.seed)
        enc = lambda pairs: Examples([encode_chat(tok, [("user", p), ("assistant", r)], d.seq_len) for p, r in pairs])
        return enc(tr), enc(va), "synthetic"
    recs = [encode_chat(tok, _turns(r, f"{d.train}:{n}"), d.seq_len) for n, r in _records(d.train)]
    if d.validation is not None:
        val = [encode_chat(tok, _turns(r, f"{d.validation}:{n}"), d.seq_len) for n, r in _records(d.validation)]
    else:
        k = max(1, int(len(recs) * d.val_fraction))
        if len(recs) < 2:
            raise DataError(f"{d.train}: need at least 2 records to hold one out (or give data.validation)")
        recs, val = recs[:-k], recs[-k:]
    return Examples(recs), Examples(val), d.train


def _pair(tok, prompt: str, a: str, b: str, seq_len: int, names=("chosen", "rejected")) -> dict:
    x = encode_chat(tok, [("user", prompt), ("assistant", a)], seq_len)
    y = encode_chat(tok, [("user", prompt), ("assistant", b)], seq_len)
    return {f"{names[0]}_ids": x["input_ids"], f"{names[0]}_labels": x["labels"],
            f"{names[1]}_ids": y["input_ids"], f"{names[1]}_labels": y["labels"]}


def _single(tok, prompt: str, response: str, label: bool, seq_len: int) -> dict:
    x = encode_chat(tok, [("user", prompt), ("assistant", response)], seq_len)
    return {"input_ids": x["input_ids"], "labels": x["labels"], "aligned": torch.tensor(bool(label))}


def preference_data(cfg, tok) -> tuple[Examples, Examples, str]:
    """DPO: chosen/rejected pairs; KLDO: single responses with an aligned label."""
    d, method = cfg.data, cfg.align.method
    if d.train is None:
        tr, va = split_synthetic(d.synthetic_examples, cfg.train.seed)
        rng = random.Random(cfg.train.seed + 1)

        def enc(pairs):
            if method == "dpo":
                return Examples([_pair(tok, p, r, corrupt(r, rng), d.seq_len) for p, r in pairs])
            # alternate aligned (correct) and unaligned (corrupted) responses
            return Examples([_single(tok, p, r if i % 2 == 0 else corrupt(r, rng), i % 2 == 0, d.seq_len)
                             for i, (p, r) in enumerate(pairs)])
        return enc(tr), enc(va), "synthetic"

    def read(path):
        out = []
        for n, r in _records(path):
            where = f"{path}:{n}"
            if method == "dpo":
                if not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")):
                    raise DataError(f"{where}: DPO records need string fields prompt, chosen, rejected")
                out.append(_pair(tok, r["prompt"], r["chosen"], r["rejected"], d.seq_len))
            else:
                if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str) \
                        or not isinstance(r.get("label"), bool):
                    raise DataError(f"{where}: KLDO records need prompt, response (strings) and label (true/false)")
                out.append(_single(tok, r["prompt"], r["response"], r["label"], d.seq_len))
        return out
    recs = read(d.train)
    if d.validation is not None:
        val = read(d.validation)
    else:
        if len(recs) < 2:
            raise DataError(f"{d.train}: need at least 2 records to hold one out (or give data.validation)")
        k = max(1, int(len(recs) * d.val_fraction))
        recs, val = recs[:-k], recs[-k:]
    return Examples(recs), Examples(val), d.train
