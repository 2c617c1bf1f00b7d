"""The SFT / alignment app as a TRL user meets it: chat templates, data errors that name file, line and key,
truncation accounting, every objective by name, and tiny GPT-2- and Qwen2-style models end to end."""
import json
import math
import os

import pytest
import torch

import _hf_models as H

from lowbit.train import ConfigError, load
from lowbit.train import cli as train_cli
from lowbit.train import corpus, losses, sft_data
from lowbit.train.chat import IGNORE, ChatEncoder
from lowbit.train.data import collate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort c a b"},
        {"role": "assistant", "content": "a b c"}, {"role": "user", "content": "add 1 + 2"},
        {"role": "assistant", "content": "3"}]
RUN = ["train.micro_batch_size=4", "train.eval_batches=1", "run.progress=false", "run.tensorboard=false",
       "data.seq_len=64", "optim.warmup_steps=0", "optim.lr=3e-3"]


def _trained(tok, ids, labels) -> list[str]:
    out, cur = [], []
    for t, y in zip(ids + [0], labels + [IGNORE]):
        if y != IGNORE:
            cur.append(t)
        elif cur:
            out, cur = out + [tok.decode(cur)], []
    return out


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind,turns", [("qwen2", ["a b c<|im_end|>", "3<|im_end|>"]),
                                        ("gpt2", [" a b c<|endoftext|>", " 3<|endoftext|>"])])
def test_chat_template_trains_assistant_turns_only(kind, turns):
    tok = H.tokenizer(kind)
    ids, labels = ChatEncoder(tok).encode(CHAT, "x")
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)  # exactly the template's text
    assert _trained(tok, ids, labels) == turns  # each answer and the template's end-of-turn marker
    assert "Be brief." in tok.decode(ids)  # the system message stays a system message, untrained


def test_builtin_format_when_the_tokenizer_has_no_template():
    tok = H.tokenizer("gpt2")
    tok.chat_template = None
    ids, labels = ChatEncoder(tok).encode(CHAT, "x")
    text = tok.decode(ids)
    assert text.startswith("<|system|>Be brief.<|user|>sort c a b<|assistant|>a b c<|endoftext|>")
    assert _trained(tok, ids, labels) == ["a b c<|endoftext|>", "3<|endoftext|>"]


BAD = [
    ('{"prompt": "hi", "response": "yo"', r"bad.jsonl:1: not valid JSON"),
    ({"question": "hi", "answer": "yo"}, r"bad.jsonl:1: expected 'messages' or 'prompt' \+ 'response'"),
    ({"prompt": "hi", "response": "  "}, r"bad.jsonl:1: response: empty response"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     r"bad.jsonl:1: messages\[1\].content: empty assistant response"),
    ({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]},
     r"bad.jsonl:1: messages\[0\].role \('tool'\): the chat template rejects"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "ok"}]},
     r"bad.jsonl:1: messages\[0\].content: expected a string"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m.split(": ", 1)[1][:30] for _, m in BAD])
def test_bad_sft_records_name_the_file_line_and_key(tmp_path, line, message):
    bad = _jsonl(tmp_path / "bad.jsonl", [line])
    cfg = load([], [f"data.train={bad}", f"data.validation={bad}"], task="sft")
    with pytest.raises(corpus.DataError, match=message):
        sft_data.sft_data(cfg, H.tokenizer("gpt2"))


def test_truncation_is_counted_and_an_all_cut_file_refused(tmp_path):
    tok = H.tokenizer("qwen2")
    rows = [{"prompt": "add 1 + 2", "response": "3"}] * 6 + [{"prompt": "sort a b", "response": "a b " * 40}] * 2
    data = _jsonl(tmp_path / "sft.jsonl", rows)
    cfg = load([], [f"data.train={data}", f"data.validation={data}", "data.seq_len=40"], task="sft")
    with pytest.warns(UserWarning, match=r"sft.jsonl: 2 of 8 examples are longer than data.seq_len=40 and have "
                                         r"their responses truncated"):
        train, _, _ = sft_data.sft_data(cfg, tok)
    assert len(train) == 8
    long_only = _jsonl(tmp_path / "long.jsonl", rows[-2:])
    cfg = load([], [f"data.train={long_only}", f"data.validation={data}", "data.seq_len=40"], task="sft")
    with pytest.raises(corpus.DataError, match=r"long.jsonl: every example \(2\) has its response cut by "
                                               r"data.seq_len=40"):
        sft_data.sft_data(cfg, tok)


OBJECTIVES = [("nll", []), ("neg_p", []), ("f_alpha", ["objective.alpha=0.5"]), ("threshold", ["objective.tau=0.001"]),
              ("top_fraction", ["objective.fraction=0.5"]), ("bottom_fraction", ["objective.fraction=0.5"]),
              ("original", []), ("logp", []), ("p", []), ("GeneralFamily-10", []), ("OnlyTopP-0", []),
              ("OnlyBottomP-0.9", []), ("OnlyTopLogP-0", []), ("OnlyBottomLogP-1", [])]


def test_every_objective_trains_through_the_app(tmp_path):
    tok = H.tokenizer("qwen2")
    model = H.model("qwen2", len(tok))
    cfg = load([], ["data.seq_len=64", "data.synthetic_examples=16"], task="sft")
    train, _, _ = sft_data.sft_data(cfg, tok)
    batch = collate([train[i] for i in range(2)])
    for name, extra in OBJECTIVES:
        obj = load([], [f"objective.name={name}"] + extra, task="sft").objective
        model.zero_grad()
        loss, _, n = losses.token_loss(model, batch, obj)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0 and n > 0, name
        assert model.lm_head.weight.grad.abs().sum() > 0, name
    with pytest.raises(ConfigError, match=r"objective.name: .*'top_p' is no longer accepted.*'top_fraction'"):
        load([], ["objective.name=top_p"], task="sft")
    with pytest.raises(ConfigError, match=r"unknown key 'objective.p'"):
        load([], ["objective.p=0.2"], task="sft")
    with pytest.raises(ConfigError, match=r"objective.fraction: fraction must lie in \(0, 1\]"):
        load([], ["objective.name=top_fraction", "objective.fraction=1.5"], task="sft")
    text = train_cli.parser("sft").format_help()
    assert "arXiv:2510.00526" in text and "m >= 0.5" in text and "GeneralFamily-<a>" in text


@pytest.mark.parametrize("kind,method", [("gpt2", "kto"), ("qwen2", "bco")])
def test_hf_models_sft_then_align_end_to_end(tmp_path, kind, method):
    src = H.save(kind, str(tmp_path / kind))
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": f"add {i} + {i}"},
                                                          {"role": "assistant", "content": str(2 * i)}]}
                                            for i in range(24)])
    recipe = ["quant.recipe=nvfp4"] if kind == "gpt2" else []  # GPT-2's Conv1D layers go through convert too
    sft = str(tmp_path / "sft")
    assert train_cli.sft([f"model.init_from={src}", f"data.train={chat}", "train.steps=4", f"run.dir={sft}",
                          "data.packing=true", "--objective", "GeneralFamily-0.5"] + recipe + RUN) == 0
    s = json.load(open(os.path.join(sft, "summary.json")))
    assert s["objective"] == "GeneralFamily-0.5" and s["recipe"] == ("nvfp4" if recipe else "bf16")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(s["hf_export"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(s["hf_export"], local_files_only=True)
    assert hf.config.model_type == kind and tok.chat_template == H.tokenizer(kind).chat_template
    ck = torch.load(os.path.join(s["checkpoint"], "model.pt"), weights_only=True)
    assert set(hf.state_dict()) <= set(ck) and all(torch.equal(ck[k], v) for k, v in hf.state_dict().items())
    rows = [json.loads(x) for x in open(s["metrics"])]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]

    labelled = _jsonl(tmp_path / "labelled.jsonl", [{"prompt": f"add {i} + 1", "label": i % 2 == 1,
                                                     "response": str(i + 1) if i % 2 else "I cannot help with that."}
                                                    for i in range(24)])
    prompts = _jsonl(tmp_path / "sep.jsonl", [{"prompt": f"how do I bake bread, step {i}?", "label": "safe"}
                                              for i in range(4)] +
                     [{"prompt": f"how do I build a weapon, step {i}?", "label": "harmful"} for i in range(4)])
    al = str(tmp_path / "align")
    assert train_cli.align([f"model.init_from={sft}", f"data.train={labelled}", "train.steps=3", f"run.dir={al}",
                            f"align.method={method}", f"align.separation_data={prompts}"] + RUN) == 0
    a = json.load(open(os.path.join(al, "summary.json")))
    assert a["parameters"] == s["parameters"]  # the GPT-2 / Qwen2 architecture came back from the sft run
    for when in ("initial", "final"):
        sep = a[f"separation_{when}"]
        assert sep["n_aligned"] == sep["n_unaligned"] == 4 and sep["bhattacharyya_distance"] > 0
    first = [json.loads(x) for x in open(a["metrics"])][0]
    # policy == reference at the first step: every reward is 0, so KTO's loss is 1 - sigmoid(0) and BCO's log 2
    assert first["loss"] == pytest.approx(0.5 if method == "kto" else math.log(2), abs=1e-6)
    assert first["kl" if method == "kto" else "delta"] == pytest.approx(0.0, abs=1e-6)
