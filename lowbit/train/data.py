"""Packed pretraining sequences and the deterministic, resumable order every task shares.

Documents are tokenized, joined with EOS and cut into non-overlapping ``seq_len`` sequences. The
sequence read at global position k (k counts sequences over the whole run, all ranks) is
``perm_e[k mod n]`` with ``e = k div n`` and ``perm_e`` a permutation seeded by (seed, e). A step
consumes positions ``[step * G, (step + 1) * G)`` for the global batch G; micro-batch a of rank r
takes its slice of them. The data position is therefore the step itself: resuming at step s reads
exactly what the uninterrupted run read, with any number of ranks that keeps G.

Document boundaries (``data.document_mask``, SFT ``data.packing``): a row holding several documents
carries ``position_ids`` that restart at 0 for each one, and the first token of a document is never a
target (nothing before it in its document predicts it). `model_inputs` passes the positions without an
attention mask, from which transformers (>= 4.53, ``masking_utils``) builds a block-diagonal causal mask,
or the varlen path of flash-attention: attention never crosses a document.
"""
from __future__ import annotations

import bisect
import hashlib
import os

import numpy as np
import torch

from . import corpus, tokenizer as tk

IGNORE = -100


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


def model_inputs(batch: dict, device=None) -> dict:
    """The model's forward keywords for a batch; rows with ``position_ids`` hold several documents, and
    no attention mask is passed so that transformers derives the per-document mask from the positions."""
    kw = {"input_ids": batch["input_ids"], "use_cache": False}  # a KV cache would also disable that mask
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"]
    return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in kw.items()}


def check_document_masks() -> None:
    """Raise unless transformers builds per-document masks from position_ids (else packed documents would
    silently attend to each other)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise corpus.DataError("packed rows need transformers >= 4.53 to keep attention within each document; "
                               "upgrade transformers, or set data.document_mask=false / data.packing=false") from None


def document_rows(ids: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, labels) of a row cut from the EOS-joined stream: a document starts after each EOS."""
    starts = np.zeros(len(ids), dtype=bool)
    starts[1:] = ids[:-1] == eos
    idx = np.arange(len(ids))
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    labels = ids.astype(np.int64)
    labels[starts] = IGNORE
    return positions, labels


class Packed:
    """Fixed-length sequences cut from one token stream; labels equal inputs (the model shifts). With
    ``eos``, documents are kept apart (positions restart after each EOS, see `document_rows`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos: int | None = None):
        self.tokens, self.seq_len, self.eos = tokens, seq_len, eos
        self.n = len(tokens) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        row = self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64)
        ids = torch.from_numpy(row)
        if self.eos is None:
            return {"input_ids": ids, "labels": ids}
        pos, labels = document_rows(row, self.eos)
        return {"input_ids": ids, "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(pos)}


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: rows (lists of example indices) whose lengths sum to at most ``seq_len``;
    examples are never split. Deterministic; the training order shuffles the rows."""
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], r))
    return rows


class PackedExamples:
    """Encoded examples (``ids``, ``labels`` lists, each at most ``seq_len``) packed into rows of
    ``seq_len`` with per-example positions; padding closes a row as one more, untrained, segment."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int):
        self.seq_len, self.rows = seq_len, []
        for members in pack([len(e[0]) for e in examples], seq_len):
            ids, labels, pos = [], [], []
            for i in members:
                x, y = examples[i]
                ids += x
                labels += [IGNORE] + list(y[1:])  # the first token is predicted from the previous example
                pos += range(len(x))
            fill = seq_len - len(ids)
            self.rows.append((torch.tensor(ids + [pad] * fill), torch.tensor(labels + [IGNORE] * fill),
                              torch.tensor(pos + list(range(fill)))))
        self.examples = len(examples)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids, labels, pos = self.rows[i]
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def tokenize_stream(tok, docs: list[str]) -> np.ndarray:
    eos = tok.eos_token_id
    ids = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    out = []
    for e in ids:
        out.extend(e.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


def _cache_problem(path: str, vocab: int) -> tuple[np.ndarray | None, str | None]:
    """(the cached token array, or None with why it cannot be this tokenizer's stream)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        return None, f"does not load ({type(e).__name__})"
    if arr.dtype != np.int32 or arr.ndim != 1 or arr.size == 0:
        return None, f"holds {arr.dtype} {arr.shape}, expected a non-empty 1-d int32 array"
    top = int(arr.max())
    if top >= vocab or int(arr.min()) < 0:
        return None, f"holds token id {top}, but the tokenizer has {vocab} tokens"
    return arr, None


def _cached_stream(tok, docs_fn, key: str, data_cfg, split: str) -> np.ndarray:
    path = os.path.join(tk.cache_dir(data_cfg), f"tokens-{key}-{split}.npy")
    if os.path.exists(path):
        arr, why = _cache_problem(path, len(tok))
        if why is None:
            return arr
        print(f"lowbit: token cache {path} {why}; rebuilding it", flush=True)
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
    eos = tok.eos_token_id if d.document_mask else None
    if eos is not None:
        check_document_masks()
    return tok, Packed(train, d.seq_len, eos), Packed(val, d.seq_len, eos), source
