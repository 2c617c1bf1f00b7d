"""A tiny fp32 teacher-student regression model shared by the training tests."""
import torch
import torch.nn.functional as F


def make(seed=0):
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    X = torch.randn(512, 32)
    with torch.no_grad():
        Y = teacher(X)
    return model, X, Y


def train(make_opt, steps=300, spikes=(), frac=0.3, seed=0):
    """Full-data loss after every step; on steps in `spikes` a random `frac` of every
    gradient's entries is multiplied by 1000 before the optimizer sees it."""
    model, X, Y = make(seed)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(123)
    losses = []
    for t in range(1, steps + 1):
        idx = torch.randint(0, X.shape[0], (64,), generator=g)
        loss = F.mse_loss(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        if t in spikes:
            for p in model.parameters():
                p.grad[torch.rand(p.shape, generator=g) < frac] *= 1000
        opt.step()
        with torch.no_grad():
            losses.append(F.mse_loss(model(X), Y).item())
    return losses
