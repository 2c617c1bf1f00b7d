"""Suite `optim`: one optimizer step over a Llama model's parameter tensors (default llama-125m, 134 M
parameters in 111 tensors; --quick: tiny).

lowbit's case is `lowbit.optim.StableSPAM` (its fused native step where the backend has one), per
`state_dtype`. Peers do a step over the same tensors and gradients:
  per_tensor     Stable-SPAM written per tensor in plain PyTorch the way the official code is
                 (tensor-valued statistics, a masked write for AdaClip, one host sync per tensor)
  adamw_foreach  torch.optim.AdamW(foreach=True)
  adamw_fused    torch.optim.AdamW(fused=True)
  bnb_adamw8bit  bitsandbytes.optim.AdamW8bit (8-bit block-wise state)
The peers run on the fp32 row (bnb_adamw8bit also on the int8 row). work = bytes lowbit moves per
step: every gradient read twice (statistics, then the step) and the weights and both moments read
and written, at their storage sizes; limit copy bandwidth. state_bytes_per_param is measured
(bytes of tensors in the optimizer state / parameters) for lowbit and each peer.
"""
from __future__ import annotations

import math

import torch

from ..optim import StableSPAM, state_bytes_per_param
from .suite import Context, Row

DESCRIPTION = "optimizer step on a model's tensors: fused Stable-SPAM vs per-tensor Stable-SPAM, AdamW, bnb 8-bit"
PARAMS = ("state_dtype", "params_m", "tensors", "state_bytes_per_param", "per_tensor_bytes_per_param",
          "adamw_bytes_per_param", "bnb_bytes_per_param")
PEERS = {"per_tensor": None, "adamw_foreach": None, "adamw_fused": None, "bnb_adamw8bit": "bitsandbytes"}
STATE_DTYPES = ("fp32", "bf16", "fp8", "int8")
LR = 1e-3


def model_tensors(model) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama decoder (untied embedding and head, RMSNorm weights)."""
    q, kv, h = model.heads * model.head_dim, model.kv_heads * model.head_dim, model.hidden
    out = [(model.vocab, h)]
    for _ in range(model.layers):
        out += [(q, h), (kv, h), (kv, h), (h, q), (model.intermediate, h), (model.intermediate, h),
                (h, model.intermediate), (h,), (h,)]
    return out + [(h,), (model.vocab, h)]


class PerTensorStableSPAM(torch.optim.Optimizer):
    """Stable-SPAM as the official code writes it: one tensor at a time, statistics kept as tensors."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                 theta=0.999):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, theta

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["m_norm_t"] = st["v_norm_t"] = st["m_max_t"] = torch.zeros((), device=p.device)
                st["step"] += 1
                k = st["step"]
                max_gradient = grad.abs().max()
                st["m_max_t"] = self.theta * st["m_max_t"] + (1 - self.theta) * max_gradient
                m_max_hat = st["m_max_t"] / (1 - self.theta ** k)
                mask = grad.abs() > m_max_hat
                if mask.sum() > 0:
                    grad[mask] = grad[mask] / max_gradient * m_max_hat
                grad_norm = torch.norm(grad)
                st["m_norm_t"] = self.gamma1 * st["m_norm_t"] + (1 - self.gamma1) * grad_norm
                st["v_norm_t"] = self.gamma2 * st["v_norm_t"] + (1 - self.gamma2) * grad_norm ** 2
                m_hat = st["m_norm_t"] / (1 - self.gamma1 ** k)
                v_hat = st["v_norm_t"] / (1 - self.gamma2 ** k)
                grad = grad / grad_norm * (m_hat / (torch.sqrt(v_hat) + group["eps"]))
                st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** k)).add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** k))
                p.mul_(1 - group["lr"] * group["weight_decay"])


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def make_peer(name: str, params):
    if name == "per_tensor":
        return PerTensorStableSPAM(params, lr=LR)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=LR, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=LR, fused=True)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb  # an optional peer (run only when it imports)

        return bnb.optim.AdamW8bit(params, lr=LR)
    raise ValueError(f"peer: unknown {name!r}")


def _bytes_per_elem(state_dtype: str) -> float:
    return state_bytes_per_param(state_dtype)


def run(ctx: Context) -> list[Row]:
    rows = []
    timer = dict(warmup=1, min_runs=3, min_time=0.0)
    for model in ctx.models(default=("llama-125m",), quick=("tiny",)):
        shapes = model_tensors(model)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(ctx.device)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(ctx.device)
        n = sum(p.numel() for p in params)
        peer_t, peer_bytes = {}, {}
        for peer, pkg in PEERS.items():
            if not ctx.installed(pkg):
                continue
            try:
                opt = make_peer(peer, params)
                peer_t[peer] = ctx.time(opt.step, peer, **timer)
                peer_bytes[peer] = state_bytes(opt) / n
            except Exception as exc:  # e.g. a bitsandbytes build without this device's kernels
                peer_t[peer] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            finally:
                opt = None
            ctx.console(f"optim {model.name} {peer}: {peer_t[peer] if isinstance(peer_t[peer], str) else f'p50 {peer_t[peer].p50 * 1e3:.1f} ms'}")
        for sd in STATE_DTYPES:
            opt = StableSPAM(params, lr=LR, state_dtype=sd)
            t = ctx.time(opt.step, f"stable-spam {sd}", **timer)
            measured = opt.state_bytes() / n
            opt = None
            peers = {}
            for peer in PEERS:
                if peer in peer_t and (sd == "fp32" or (sd == "int8" and peer == "bnb_adamw8bit")):
                    peers[peer] = peer_t[peer]
                elif peer in peer_t:
                    peers[peer] = "n/a"
            moved = n * (2 * 4 + 2 * 4 + 2 * _bytes_per_elem(sd))  # grad twice, weights r+w, both moments r+w
            rows.append(Row(f"stable-spam {sd}", t, shape=f"{model.name} {n / 1e6:.1f}M params", dtype="float32",
                            work=moved, unit="GB/s", limit="copy_GB/s", peers=peers,
                            backend=_step_backend(ctx, sd),
                            params=dict(state_dtype=sd, params_m=round(n / 1e6, 2), tensors=len(params),
                                        state_bytes_per_param=round(measured, 3),
                                        per_tensor_bytes_per_param=_fmt(peer_bytes.get("per_tensor")),
                                        adamw_bytes_per_param=_fmt(peer_bytes.get("adamw_foreach")),
                                        bnb_bytes_per_param=_fmt(peer_bytes.get("bnb_adamw8bit")))))
            ctx.console(f"optim {model.name} stable-spam {sd}: p50 {t.p50 * 1e3:.1f} ms, "
                        f"{measured:.3f} state bytes / param")
    return rows


def _step_backend(ctx: Context, state_dtype: str) -> str:
    """The backend of the elementwise step: the fused low-precision step where one serves it, else
    `optim_adam_step` (bf16 / fp8 / int8 moments then decoded and encoded with torch ops)."""
    if state_dtype != "fp32":
        try:
            fused = ctx.backend_for("optim_lowprec_step")
        except RuntimeError:  # an explicit --backend without the fused step
            fused = "ref"
        if fused != "ref":
            return fused
    return ctx.backend_for("optim_adam_step")


def _fmt(x):
    return None if x is None else round(x, 3)
