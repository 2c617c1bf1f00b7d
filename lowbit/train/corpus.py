"""Documents for pretraining: the embedded default corpus or the user's files.

The embedded corpus is the Python standard library source of the running interpreter (present on
every machine, so nothing is downloaded). Files are ordered by a hash of their relative path, and a
document goes to validation when that hash falls below ``val_fraction``: the split and any
``max_corpus_mb`` subset are deterministic and independent of the file system's listing order.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
STDLIB_LABEL = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}


class DataError(UserError, ValueError):
    """A missing, unreadable or empty data source."""


# Share of undecodable bytes above which a "text" file is refused: real text with a stray Latin-1
# byte passes, binary data (about half of random bytes are not UTF-8) does not.
MAX_BAD_BYTES = 0.02


def read_text(path: str) -> str:
    """A UTF-8 text file; stray undecodable bytes become U+FFFD, a file made of them is refused."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if raw and bad > MAX_BAD_BYTES * len(raw):
        raise DataError(f"{path}: {bad / len(raw):.0%} of its bytes are not UTF-8 text (binary data?); "
                        "data.train / data.validation expect UTF-8 text or JSONL")
    return text


def _hash01(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / float(16 ** 12)


def stdlib_files(max_mb: float | None = None) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the stdlib .py files in hash order, capped at max_mb."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        for f in files:
            if f.endswith(".py"):
                full = os.path.join(d, f)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort(key=lambda rf: hashlib.sha1(rf[0].encode()).hexdigest())
    if max_mb is not None:
        budget, kept = max_mb * 1e6, []
        for rel, full in found:
            size = os.path.getsize(full)
            if kept and budget - size < 0:
                break
            kept.append((rel, full))
            budget -= size
        found = kept
    if not found:
        raise DataError(f"the embedded corpus is empty: no .py files under {root!r}")
    return found


def stdlib_fingerprint(max_mb: float | None) -> str:
    h = hashlib.sha256(f"{sys.version}|{max_mb}".encode())
    for rel, full in stdlib_files(max_mb):
        h.update(f"{rel}:{os.path.getsize(full)}\n".encode())
    return h.hexdigest()[:16]


def stdlib_split(val_fraction: float, max_mb: float | None) -> tuple[list[str], list[str]]:
    train, val = [], []
    for rel, full in stdlib_files(max_mb):
        with open(full, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            (val if _hash01("split:" + rel) < val_fraction else train).append(text)
    if not train or not val:
        raise DataError(f"the embedded corpus split is empty (train {len(train)}, validation {len(val)} files); "
                        "raise data.max_corpus_mb or change data.val_fraction")
    return train, val


def jsonl(path: str):
    """(line number, value) for every non-blank line of a JSONL file; bad JSON raises DataError."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            yield n, rec


def _read_jsonl(path: str, key: str) -> list[str]:
    out = []
    for n, rec in jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise DataError(f"{path}:{n}: expected an object with a string field {key!r} (data.text_key)")
        out.append(rec[key])
    return out


def _read_datasets_dir(path: str, key: str, split: str | None) -> list[str]:
    try:  # optional and slow to import: only saved `datasets` directories need it
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved `datasets` directory, but the datasets package is not installed") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        name = split if split in ds else next(iter(ds))
        ds = ds[name]
    if key not in ds.column_names:
        raise DataError(f"{path}: no column {key!r} (data.text_key); columns: {ds.column_names}")
    return [t for t in ds[key] if isinstance(t, str)]


def read_documents(path: str, key: str = "text", split: str | None = None) -> list[str]:
    """Documents from a text / JSONL file, a directory of them, or a saved `datasets` directory."""
    if not os.path.exists(path):
        raise DataError(f"no such file or directory: {path!r}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            docs = _read_datasets_dir(path, key, split)
        else:
            docs = []
            for d, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    full = os.path.join(d, f)
                    if f.endswith(".jsonl"):
                        docs += _read_jsonl(full, key)
                    elif f.endswith(TEXT_SUFFIXES):
                        docs.append(read_text(full))
    elif path.endswith(".jsonl"):
        docs = _read_jsonl(path, key)
    else:
        docs = [read_text(path)]
    docs = [t for t in docs if t.strip()]
    if not docs:
        raise DataError(f"{path}: no text found (empty corpus)")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out documents by a hash of their content (deterministic, order-independent)."""
    train, val = [], []
    for t in docs:
        (val if _hash01("split:" + hashlib.sha1(t.encode()).hexdigest()) < val_fraction else train).append(t)
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train or not val:
        raise DataError(f"cannot split {len(docs)} document(s) into train and validation; give data.validation")
    return train, val


def pretrain_documents(data_cfg) -> tuple[list[str], list[str], str]:
    """(train docs, validation docs, a source label) for pretraining."""
    if data_cfg.train is None:
        tr, va = stdlib_split(data_cfg.val_fraction, data_cfg.max_corpus_mb)
        return tr, va, STDLIB_LABEL
    docs = read_documents(data_cfg.train, data_cfg.text_key, "train")
    if data_cfg.validation is not None:
        return docs, read_documents(data_cfg.validation, data_cfg.text_key, "validation"), data_cfg.train
    tr, va = split_documents(docs, data_cfg.val_fraction)
    return tr, va, data_cfg.train
