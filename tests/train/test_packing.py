"""Packing keeps documents apart: the loss of a packed row equals the per-document losses computed one by one
(SFT examples and pretraining documents; lowbit's Llama, a GPT-2-style and a Qwen2-style model)."""
import numpy as np
import pytest
import torch

import _hf_models as H

from lowbit.objectives import sft_loss
from lowbit.train import data as D
from lowbit.train import losses
from lowbit.train.chat import IGNORE, ChatEncoder


class _Obj:  # objective config: nll, unfused
    name, alpha, tau, fraction, fused = "nll", None, None, None, False


def _model(kind: str, vocab: int):
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128))
    return H.model(kind, vocab)


def _conversations():
    return [[{"role": "user", "content": f"add {i} + {2 * i}"}, {"role": "assistant", "content": str(3 * i)}]
            for i in range(5)] + [[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "sort c a b"}, {"role": "assistant", "content": "a b c"},
                                   {"role": "user", "content": "reverse"}, {"role": "assistant", "content": "c b a"}]]


def test_pack_places_every_example_once_within_the_row():
    lengths = [5, 17, 3, 9, 12, 1, 20, 8, 8, 4]
    rows = D.pack(lengths, 20)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 20 for r in rows)
    assert len(rows) == 5  # best fit: 87 tokens in the fewest rows of 20
    assert D.pack(lengths, 20) == rows


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_packed_sft_loss_equals_per_example_losses(kind):
    tok = H.tokenizer("qwen2" if kind == "llama" else kind)
    enc = ChatEncoder(tok)
    examples = [enc.encode(c, f"example {i}") for i, c in enumerate(_conversations())]
    seq_len = 96
    packed = D.PackedExamples(examples, seq_len, pad=0)
    assert len(packed) < len(examples)  # rows really hold several examples
    model = _model(kind, len(tok)).eval()
    batch = D.collate([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        loss, _, n = losses.token_loss(model, batch, _Obj())
        leaky = sft_loss(model(input_ids=batch["input_ids"]).logits[:, :-1], batch["labels"][:, 1:])
        total, count = 0.0, 0
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[:, :-1]
            target = torch.tensor([labels])[:, 1:]
            total += float(sft_loss(logits, target, reduction="sum"))
            count += int((target != IGNORE).sum())
    assert n == count
    assert float(loss) == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    assert abs(float(leaky) - total / count) > 1e-3  # without positions the documents see each other


def test_pretraining_rows_restart_positions_and_mask_document_starts():
    eos = 9
    pos, labels = D.document_rows(np.array([4, 5, 9, 6, 7, 8, 9, 1]), eos)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert labels.tolist() == [4, 5, 9, IGNORE, 7, 8, 9, IGNORE]  # a document's first token has no context


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_pretraining_loss_equals_per_document_losses(kind):
    eos, vocab = 1, 64
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, vocab, size=n).tolist() + [eos] for n in (7, 3, 12, 5, 9, 4)]
    stream = np.array([t for d in docs for t in d], dtype=np.int32)
    seq_len = 20
    rows = D.Packed(stream, seq_len, eos)
    model = _model(kind, vocab).eval()
    batch = D.collate([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        loss, _, n = losses.token_loss(model, batch, _Obj(), "nll")
        # one by one: every piece of a document that lies in one row is its own sequence
        total, count = 0.0, 0
        for r in range(len(rows)):
            ids = stream[r * seq_len:(r + 1) * seq_len].tolist()
            cuts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == eos] + [len(ids)]
            for a, b in zip(cuts, cuts[1:]):
                piece = torch.tensor([ids[a:b]])
                if piece.shape[1] > 1:
                    logits = model(input_ids=piece).logits[:, :-1]
                    total += float(sft_loss(logits, piece[:, 1:], reduction="sum"))
                    count += piece.shape[1] - 1
    assert n == count
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
