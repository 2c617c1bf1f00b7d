"""SFT and preference data: JSONL records (or the built-in synthetic task) encoded as chats.

Records, one JSON object per line (``prompt`` is a string or a list of system / user messages; a response
is a string or a one-message assistant list; ``completion`` is accepted for ``response``, as in TRL):

- SFT: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "response": ...}``.
- DPO (``align.method=dpo``): ``{"prompt", "chosen", "rejected"}``.
- KLDO / KTO / BCO: ``{"prompt", "response", "label": true|false}``, compliance (true: the response to
  keep) and refusal-worthy (false) examples, the recommended input; a DPO pair also counts as one
  aligned and one unaligned example.

Conversations go through the tokenizer's chat template when it has one, else the built-in format
(`lowbit.train.chat`); only assistant tokens are trained. Each example is cut to ``data.seq_len``; cut
examples are counted and reported in one warning (an example left with no response token is dropped),
and a file in which no example keeps its whole response is refused, since the model would never see a
response end. SFT examples are right-padded to ``seq_len`` or, with ``data.packing``, packed several per
row (`data.PackedExamples`); validation stays one example per row, so exact match stays per example.

The built-in task is generated from a seed, so SFT and alignment run offline and reproducibly: sort or
reverse a few letters, or add two numbers; a corrupted answer is the rejected / unaligned response.
"""
from __future__ import annotations

import random
import warnings

import torch

from . import data as data_mod
from .chat import IGNORE, ChatEncoder, resolve_template
from .corpus import DataError, jsonl

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


def _padded(ids: list[int], labels: list[int], seq_len: int, pad: int) -> dict:
    fill = seq_len - len(ids)
    return {"input_ids": torch.tensor(ids + [pad] * fill), "labels": torch.tensor(labels + [IGNORE] * fill)}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0


def encode_chat(tok, turns: list[tuple[str, str]], seq_len: int, encoder: ChatEncoder | None = None) -> dict:
    """One conversation of (role, text) turns, cut and right-padded to ``seq_len``."""
    enc = encoder or ChatEncoder(tok)
    ids, labels = enc.encode([{"role": r, "content": t} for r, t in turns], "conversation")
    return _padded(ids[:seq_len], labels[:seq_len], seq_len, _pad_id(tok))


class Cuts:
    """What cutting to ``seq_len`` did to one file's examples; `report` warns or refuses."""

    def __init__(self, seq_len: int):
        self.seq_len, self.total, self.cut, self.lost, self.longest = seq_len, 0, 0, 0, 0

    def fit(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
        """The example cut to seq_len, or None when no trained token is left."""
        self.total += 1
        self.longest = max(self.longest, len(ids))
        if len(ids) <= self.seq_len or all(x == IGNORE for x in labels[self.seq_len:]):
            return ids[:self.seq_len], labels[:self.seq_len]
        self.cut += 1
        if all(x == IGNORE for x in labels[:self.seq_len]):
            self.lost += 1
            return None
        return ids[:self.seq_len], labels[:self.seq_len]

    def report(self, source: str) -> None:
        if not self.cut:
            return
        if self.cut == self.total:
            raise DataError(f"{source}: every example ({self.total}) has its response cut by data.seq_len="
                            f"{self.seq_len} (the longest is {self.longest} tokens); raise data.seq_len or "
                            "shorten the examples")
        dropped = f"; {self.lost} lost the whole response and are left out" if self.lost else ""
        warnings.warn(f"{source}: {self.cut} of {self.total} examples are longer than data.seq_len={self.seq_len} "
                      f"and have their responses truncated{dropped}", stacklevel=2)


class Examples:
    """A list of encoded examples with the `Packed` interface (len, getitem)."""

    def __init__(self, items: list[dict], source: str = "the data"):
        if not items:
            raise DataError(f"{source}: no usable examples")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _records(path: str) -> list[tuple[str, dict]]:
    out = []
    for n, rec in jsonl(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        out.append((f"{path}:{n}", rec))
    if not out:
        raise DataError(f"{path}: no records (empty file)")
    return out


def _prompt(rec: dict, where: str) -> list[dict]:
    p = rec.get("prompt")
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, list) and p and all(isinstance(m, dict) for m in p):
        return p
    raise DataError(f"{where}: prompt: expected a string or a list of {{role, content}} messages")


def _response(rec: dict, key: str, where: str) -> list[dict]:
    r = rec.get(key)
    if isinstance(r, list) and len(r) == 1 and isinstance(r[0], dict) and r[0].get("role") == "assistant":
        r = r[0].get("content")
    if not isinstance(r, str):
        raise DataError(f"{where}: {key}: expected a string (or one assistant message)")
    if not r.strip():
        raise DataError(f"{where}: {key}: empty response")
    return [{"role": "assistant", "content": r}]


def _response_key(rec: dict) -> str:
    return "completion" if "completion" in rec and "response" not in rec else "response"


def _conversation(rec: dict, where: str) -> list[dict]:
    if "messages" in rec:
        return rec["messages"]
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return _prompt(rec, where) + _response(rec, _response_key(rec), where)
    raise DataError(f"{where}: expected 'messages' or 'prompt' + 'response' fields, got keys {sorted(rec)}")


def _synthetic_messages(pairs) -> list[tuple[str, list[dict]]]:
    return [(f"synthetic example {i}", [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
            for i, (p, r) in enumerate(pairs)]


def _encoder(cfg, tok) -> ChatEncoder:
    return ChatEncoder(tok, resolve_template(tok, cfg.data.chat_template))


def _encode_all(enc: ChatEncoder, convs, seq_len: int, source: str) -> list[tuple[list[int], list[int]]]:
    cuts, out = Cuts(seq_len), []
    for where, messages in convs:
        fitted = cuts.fit(*enc.encode(messages, where))
        if fitted is not None:
            out.append(fitted)
    cuts.report(source)
    return out


def _split(recs: list, path: str, val_fraction: float) -> tuple[list, list]:
    if len(recs) < 2:
        raise DataError(f"{path}: need at least 2 records to hold one out (or give data.validation)")
    k = max(1, int(len(recs) * val_fraction))
    return recs[:-k], recs[-k:]


def sft_data(cfg, tok) -> tuple[object, Examples, str]:
    """(train set, validation set, source label) for SFT."""
    d, enc, pad = cfg.data, _encoder(cfg, tok), _pad_id(tok)
    if d.train is None:
        tr, va = (_synthetic_messages(x) for x in split_synthetic(d.synthetic_examples, cfg.train.seed))
        source = "synthetic"
    else:
        tr = [(w, _conversation(r, w)) for w, r in _records(d.train)]
        if d.validation is not None:
            va = [(w, _conversation(r, w)) for w, r in _records(d.validation)]
        else:
            tr, va = _split(tr, d.train, d.val_fraction)
        source = d.train
    train = _encode_all(enc, tr, d.seq_len, d.train or "the synthetic task")
    val = _encode_all(enc, va, d.seq_len, d.validation or d.train or "the synthetic task")
    if not train:
        raise DataError(f"{source}: no usable training examples")
    if d.packing:
        data_mod.check_document_masks()
        train_set = data_mod.PackedExamples(train, d.seq_len, pad)
    else:
        train_set = Examples([_padded(i, l, d.seq_len, pad) for i, l in train], source)
    return train_set, Examples([_padded(i, l, d.seq_len, pad) for i, l in val], source), source


# ---- preference / unpaired alignment data -------------------------------------------------------
def _unpaired_item(ids: list[int], labels: list[int], aligned: bool, seq_len: int, pad: int) -> dict:
    """One scored sequence plus where its response starts and ends (KTO rebuilds mismatched pairs)."""
    item = _padded(ids, labels, seq_len, pad)
    first = next(i for i, x in enumerate(labels) if x != IGNORE)
    item.update(aligned=torch.tensor(bool(aligned)), prompt_len=torch.tensor(first), length=torch.tensor(len(ids)))
    return item


def _preference_records(path: str, method: str) -> list[tuple[str, list[dict], list, object]]:
    """(where, prompt messages, responses, label): responses hold (chosen, rejected) for DPO, else one."""
    out = []
    for where, r in _records(path):
        paired = all(k in r for k in ("prompt", "chosen", "rejected"))
        if method == "dpo" and not paired:
            raise DataError(f"{where}: DPO records need prompt, chosen and rejected fields, got keys {sorted(r)}")
        if paired:
            prompt = _prompt(r, where)
            pair = [_response(r, "chosen", where), _response(r, "rejected", where)]
            out += [(where, prompt, pair, None)] if method == "dpo" else \
                [(where, prompt, [pair[0]], True), (where, prompt, [pair[1]], False)]
            continue
        key = _response_key(r)
        if "prompt" not in r or key not in r or "label" not in r:
            raise DataError(f"{where}: {method.upper()} records need prompt, response and label (or a prompt, "
                            f"chosen, rejected pair), got keys {sorted(r)}")
        if not isinstance(r["label"], bool):
            raise DataError(f"{where}: label: expected true (aligned / compliant) or false (unaligned), "
                            f"got {r['label']!r}")
        out.append((where, _prompt(r, where), [_response(r, key, where)], r["label"]))
    return out


def _synthetic_preferences(pairs, method: str, rng: random.Random) -> list:
    out = []
    for i, (p, r) in enumerate(pairs):
        prompt = [{"role": "user", "content": p}]
        wrong = [{"role": "assistant", "content": corrupt(r, rng)}]
        right = [{"role": "assistant", "content": r}]
        if method == "dpo":
            out.append((f"synthetic example {i}", prompt, [right, wrong], None))
        else:  # alternate aligned (correct) and unaligned (corrupted) responses
            out.append((f"synthetic example {i}", prompt, [right if i % 2 == 0 else wrong], i % 2 == 0))
    return out


def _encode_preferences(enc: ChatEncoder, recs: list, seq_len: int, pad: int, source: str) -> Examples:
    cuts, items = Cuts(seq_len), []
    for where, prompt, responses, label in recs:
        fitted = [cuts.fit(*enc.encode(prompt + resp, where)) for resp in responses]
        if any(f is None for f in fitted):
            continue
        if label is None:
            (ci, cl), (ri, rl) = fitted
            x, y = _padded(ci, cl, seq_len, pad), _padded(ri, rl, seq_len, pad)
            items.append({"chosen_ids": x["input_ids"], "chosen_labels": x["labels"],
                          "rejected_ids": y["input_ids"], "rejected_labels": y["labels"]})
        else:
            items.append(_unpaired_item(*fitted[0], label, seq_len, pad))
    cuts.report(source)
    return Examples(items, source)


def preference_data(cfg, tok) -> tuple[Examples, Examples, str]:
    """DPO: chosen / rejected pairs; KLDO / KTO / BCO: single responses labelled aligned or not."""
    d, method = cfg.data, cfg.align.method
    enc, pad = _encoder(cfg, tok), _pad_id(tok)
    if d.train is None:
        tr, va = split_synthetic(d.synthetic_examples, cfg.train.seed)
        rng = random.Random(cfg.train.seed + 1)
        tr, va = _synthetic_preferences(tr, method, rng), _synthetic_preferences(va, method, rng)
    else:
        tr = _preference_records(d.train, method)
        va = _preference_records(d.validation, method) if d.validation is not None else None
        if va is None:
            tr, va = _split(tr, d.train, d.val_fraction)
    source = d.train or "synthetic"
    return (_encode_preferences(enc, tr, d.seq_len, pad, d.train or "the synthetic task"),
            _encode_preferences(enc, va, d.seq_len, pad, d.validation or d.train or "the synthetic task"), source)
