"""The tokenizer: a byte-level BPE trained offline on the training documents and cached, or the user's.

The cache key covers the corpus fingerprint, the vocabulary size and the `tokenizers` version, so a
changed corpus retrains. Files are written to a temporary name and renamed, so concurrent ranks or
runs never read half a file.
"""
from __future__ import annotations

import hashlib
import os

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import UserError

SPECIAL = {"eos": "<|endoftext|>", "pad": "<|pad|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def cache_dir(data_cfg) -> str:
    d = data_cfg.cache_dir or os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    os.makedirs(d, exist_ok=True)
    return d


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def train_bpe(docs: list[str], vocab_size: int, path: str):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    atomic_write(path, tok.save)
    return tok


def wrap(tok):
    """A transformers PreTrainedTokenizerFast around a `tokenizers.Tokenizer` (for save_pretrained)."""
    from transformers import PreTrainedTokenizerFast  # optional and slow to import: only when a tokenizer is made

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                   bos_token=SPECIAL["eos"], additional_special_tokens=[SPECIAL["user"], SPECIAL["assistant"]])


def load_user(path: str):
    """A tokenizer.json file or a local HF tokenizer directory, as a PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # optional and slow to import

    try:
        if os.path.isfile(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # tokenizers / transformers raise many types for a missing or garbled file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"data.tokenizer: cannot load {path!r} ({first[:200]}); expected a tokenizer.json "
                        "or a local Hugging Face tokenizer directory") from None
    if tok.eos_token is None:
        raise UserError(f"data.tokenizer: {path!r} defines no eos token (needed to separate packed documents)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    missing = [t for t in (SPECIAL["user"], SPECIAL["assistant"]) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def get(data_cfg, docs_fn, fingerprint: str):
    """The run's tokenizer (PreTrainedTokenizerFast); trains and caches the BPE on first use.

    ``docs_fn()`` returns the training documents; it is only called when the cache misses.
    """
    if data_cfg.tokenizer is not None:
        return load_user(data_cfg.tokenizer)
    key = hashlib.sha256(f"{fingerprint}|{data_cfg.vocab_size}|{tokenizers.__version__}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(data_cfg), f"bpe-{key}.json")
    tok = Tokenizer.from_file(path) if os.path.exists(path) else train_bpe(docs_fn(), data_cfg.vocab_size, path)
    return wrap(tok)


def special_ids(tok) -> dict:
    ids = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.eos_token_id,
           "user": tok.convert_tokens_to_ids(SPECIAL["user"]), "assistant": tok.convert_tokens_to_ids(SPECIAL["assistant"])}
    return ids
