"""The model, data and optimizer settings shared by the ZeRO worker and its single-process reference."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

STEPS = 30
SAVE_AT = 15
SPIKE_AT = 7  # the loss is scaled x1000 on this step: AdaClip clips every tensor
# resets at steps 12 and 24; a cosine schedule over the 30 steps
HP = dict(lr=3e-3, weight_decay=0.01, reset_interval=12, total_steps=STEPS, eta_min=0.5)
VOCAB = 96


def make_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def batch(t):
    """The global batch of step t: 4 sequences of 16 tokens; rank r takes rows 2r and 2r+1."""
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randint(0, VOCAB, (4, 16), generator=g)


def loss_of(model, ids, t):
    # every sequence has 15 predicted tokens, so the mean over 4 rows is the mean of the two
    # ranks' means: DeepSpeed's gradient average equals the full-batch gradient
    loss = model(input_ids=ids, labels=ids).loss
    return loss * 1000 if t == SPIKE_AT else loss
