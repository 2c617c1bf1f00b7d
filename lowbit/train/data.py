"""Packed pretraining sequences and the deterministic, resumable order every task shares.

Documents are tokenized, joined with EOS and cut into non-overlapping ``seq_len`` sequences. The
sequence read at global position k (k counts sequences over the whole run, all ranks) is
``perm_e[k mod n]`` with ``e = k div n`` and ``perm_e`` a permutation seeded by (seed, e). A step
consumes positions ``[step * G, (step + 1) * G)`` for the global batch G; micro-batch a of rank r
takes its slice of them. The data position is therefore the step itself: resuming at step s reads
exactly what the uninterrupted run read, with any number of ranks that keeps G.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from . import corpus, tokenizer as tk


class Order:
    """Epoch-wise seeded permutations of range(n)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise corpus.DataError("the dataset holds no complete sequence (corpus shorter than data.seq_len?)")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[k % self.n])


def positions(step: int, micro: int, rank: int, world: int, micro_bs: int, global_bs: int) -> range:
    """Global sequence positions of (step, micro-batch, rank)."""
    start = step * global_bs + (micro * world + rank) * micro_bs
    return range(start, start + micro_bs)


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def load_batch(dataset, order: Order, idx: range, device: torch.device) -> dict:
    """The batch at global positions `idx` (see `positions`), on `device`."""
    return {k: v.to(device) for k, v in collate([dataset[order(k)] for k in idx]).items()}


class Packed:
    """Fixed-length sequences cut from one token stream; labels equal inputs (the model shifts)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = len(tokens) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def tokenize_stream(tok, docs: list[str]) -> np.ndarray:
    eos = tok.eos_token_id
    ids = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    out = []
    for e in ids:
        out.extend(e.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


def _cached_stream(tok, docs_fn, key: str, data_cfg, split: str) -> np.ndarray:
    path = os.path.join(tk.cache_dir(data_cfg), f"tokens-{key}-{split}.npy")
    if os.path.exists(path):
        return np.load(path)
    arr = tokenize_stream(tok, docs_fn())
    tk.atomic_write(path, lambda p: np.save(open(p, "wb"), arr))
    return arr


def pretrain_data(cfg, tok=None):
    """(tokenizer, train Packed, validation Packed, source label) for pretraining; `tok` (e.g. the
    tokenizer of the checkpoint a run starts from) replaces the BPE trained on the corpus."""
    d = cfg.data
    docs: dict = {}

    def load_docs():
        if not docs:
            docs["train"], docs["val"], docs["source"] = corpus.pretrain_documents(d)
        return docs

    if d.train is None:
        fp = f"stdlib-{corpus.stdlib_fingerprint(d.max_corpus_mb)}-{d.val_fraction}"
    else:
        load_docs()
        h = hashlib.sha256()
        for t in docs["train"] + ["\0validation\0"] + docs["val"]:
            h.update(hashlib.sha1(t.encode()).digest())
        fp = h.hexdigest()[:16]
    if tok is None:
        tok = tk.get(d, lambda: load_docs()["train"], fp)
    vocab_key = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    key = f"{fp}-{vocab_key}"
    train = _cached_stream(tok, lambda: load_docs()["train"], key, d, "train")
    val = _cached_stream(tok, lambda: load_docs()["val"], key, d, "val")
    source = d.train or corpus.STDLIB_LABEL
    return tok, Packed(train, d.seq_len), Packed(val, d.seq_len), source
