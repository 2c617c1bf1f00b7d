"""CLASSP's defaults on a tiny Llama (2 layers, byte-level text of the embedded corpus): a short
training run updates most weights of the transformer blocks and lowers the loss, where the
paper's absolute threshold (0.5 on g^2) freezes nearly every weight. ~3 s on 2 cores."""
import pytest
import torch

from lowbit.optim import CLASSP
from lowbit.train.corpus import stdlib_files

transformers = pytest.importorskip("transformers")

STEPS = 60


@pytest.fixture(scope="module")
def data():
    text = b"".join(open(full, "rb").read() for _, full in stdlib_files(0.05))
    return torch.tensor(list(text[:200_000]), dtype=torch.long)


def make_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float()


def train(data, scale=1.0, **kw):
    """-> (losses, fraction of the blocks' weights that moved, entries updated per step / numel, model)."""
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CLASSP(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        i = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[j:j + 32] for j in i])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        (loss * scale).backward()
        opt.step()
        losses.append(loss.item())
    blocks = [n for n in before if ".layers." in n]
    moved = sum(int((model.get_parameter(n).detach() != before[n]).sum()) for n in blocks)
    total = sum(before[n].numel() for n in blocks)
    numel = sum(p.numel() for p in model.parameters())
    return losses, moved / total, opt.stats["updated"] / (numel * STEPS), model


@pytest.fixture(scope="module")
def default_run(data):
    return train(data)


def test_defaults_update_most_weights_and_lower_the_loss(default_run):
    losses, moved, per_step, _ = default_run
    # measured: loss 5.05 (first 5 steps) -> 3.69 (last 10), 76 % of the blocks' weights moved,
    # 12 % of all entries updated per step
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 1.0
    assert moved > 0.6
    assert per_step < 0.3  # still sparse: most entries untouched on each step


def test_the_papers_absolute_threshold_freezes_an_llm(data):
    _, moved, _, _ = train(data, lr=0.2, threshold=0.5, eps=1e-5)
    # measured: 0.004 % of the blocks' weights moved (the loss still falls a little, through the
    # few output-layer entries with the largest gradients, each moved by lr = 0.2)
    assert moved < 1e-3


def test_defaults_do_not_depend_on_the_loss_scale(data, default_run):
    """The threshold and eps follow the gradient's scale: a loss x 2^10 (exact in fp32) gives the
    same weights bit for bit."""
    _, _, _, scaled = train(data, scale=1024.0)
    for (n, a), b in zip(default_run[3].named_parameters(), scaled.parameters()):
        assert torch.equal(a, b), n
