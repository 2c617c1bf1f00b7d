"""Tiny Hugging Face causal LMs saved to a local folder, each with its own byte-level BPE tokenizer and chat
template, built offline: a GPT-2-style model (Conv1D layers, learned positions, a plain-text template that
rejects unknown roles) and a Qwen2-style one (grouped-query attention, RoPE, ChatML template)."""
from __future__ import annotations

import os

QWEN2_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
GPT2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
TEXT = ["User: sort c a b Assistant: a b c. reverse d e f gives f e d; add 12 + 30 = 42.",
        "You are a helpful assistant. How do I bake bread? I cannot help with that request.",
        "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 + = ?"] * 8


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def tokenizer(kind: str):
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":  # GPT-2 has one special token and no pad token
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>")
        tok.chat_template = GPT2_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>"])
        tok.chat_template = QWEN2_TEMPLATE
    return tok


def model(kind: str, vocab: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=96,
                                          bos_token_id=0, eos_token_id=0))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True, eos_token_id=2, pad_token_id=0))


def save(kind: str, folder: str) -> str:
    """A save_pretrained folder (model + tokenizer) of the tiny `kind` ("gpt2" or "qwen2") model."""
    tok = tokenizer(kind)
    os.makedirs(folder, exist_ok=True)
    model(kind, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
