"""Data: deterministic split and order, rank slices that tile the global batch, prompt masking, clear errors."""
import json

import pytest
import torch

from _train_helpers import SMALL, TINY

from lowbit.train import corpus, load, run
from lowbit.train import data as D
from lowbit.train import sft_data as S


def test_stdlib_split_is_deterministic_and_disjoint():
    a_train, a_val = corpus.stdlib_split(0.1, 0.5)
    b_train, b_val = corpus.stdlib_split(0.1, 0.5)
    assert a_train == b_train and a_val == b_val
    assert a_train and a_val and not set(a_train) & set(a_val)
    total = sum(len(t.encode()) for t in a_train + a_val)
    assert total <= 0.5e6


def test_order_is_a_seeded_permutation_per_epoch():
    o = D.Order(10, seed=3)
    first, second = [o(k) for k in range(10)], [o(k) for k in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [D.Order(10, seed=3)(k) for k in range(20)] == first + second
    assert [D.Order(10, seed=4)(k) for k in range(10)] != first


def test_rank_slices_tile_the_global_batch():
    # 2 ranks x 2 micro-batches x 3 sequences read exactly what 1 rank x 4 micro-batches x 3 reads
    two = sorted(k for r in range(2) for m in range(2) for k in D.positions(5, m, r, 2, 3, 12))
    one = sorted(k for m in range(4) for k in D.positions(5, m, 0, 1, 3, 12))
    assert two == one == list(range(60, 72))


def test_sft_encoding_masks_the_prompt():
    from lowbit.train.pretrained import default_tokenizer
    cfg = load([TINY], SMALL)
    tok = default_tokenizer(cfg)
    ex = S.encode_chat(tok, [("user", "sort c a b"), ("assistant", "a b c")], 32)
    ids, labels = ex["input_ids"], ex["labels"]
    trained = labels[labels != S.IGNORE]
    assert tok.decode(trained[:-1]) == "a b c" and trained[-1] == tok.eos_token_id
    assert int((labels != S.IGNORE).sum()) == len(trained)
    k = ids.tolist().index(tok.convert_tokens_to_ids("<|assistant|>"))
    assert tok.decode(ids[1:k]) == "sort c a b" and (labels[:k + 1] == S.IGNORE).all()
    assert S.synthetic_pairs(50, 1) == S.synthetic_pairs(50, 1) != S.synthetic_pairs(50, 2)
    for p, r in S.synthetic_pairs(50, 1):
        assert S.corrupt(r, __import__("random").Random(0)) != r


def test_missing_and_empty_data_are_clear_errors(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    cfg = load([TINY], SMALL + [f"data.train={empty}", f"run.dir={tmp_path / 'r'}", f"data.cache_dir={cache_dir}"])
    with pytest.raises(corpus.DataError, match="no text found \\(empty corpus\\)"):
        run(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    cfg = load([TINY], SMALL + [f"data.train={bad}", f"run.dir={tmp_path / 's'}", f"data.cache_dir={cache_dir}"],
               task="sft")
    with pytest.raises(corpus.DataError, match="bad.jsonl:1: expected 'messages' or 'prompt' \\+ 'response'"):
        run(cfg)


def test_user_text_and_jsonl_sft(tmp_path, cache_dir):
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(6):
        (text / f"doc{i}.txt").write_text(("the quick brown fox %d jumps over the lazy dog. " % i) * 60)
    out = run(load([TINY], SMALL + ["train.steps=2", f"data.train={text}", "data.val_fraction=0.3",
                                    f"run.dir={tmp_path / 'p'}", f"data.cache_dir={cache_dir}", "run.export_hf=false"]))
    assert out["data"] == str(text) and out["val_loss"] > 0
    recs = tmp_path / "chat.jsonl"
    recs.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": f"hello {i}"}]})
                              for i in range(12)) + "\n")
    out = run(load([TINY], SMALL + ["train.steps=2", f"data.train={recs}", f"run.dir={tmp_path / 's'}",
                                    f"data.cache_dir={cache_dir}", "run.export_hf=false"], task="sft"))
    assert out["task"] == "sft" and 0 <= out["val_exact_match"] <= 1
