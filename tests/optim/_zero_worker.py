"""One rank of the ZeRO tests (launched by test_zero.py with torchrun, 2 ranks, gloo, DS_ACCELERATOR=cpu).

For ZeRO stages 1, 2 and 3: 30 StableSPAM steps on a tiny Llama, checkpoint saved after step
15; then a fresh engine loads that checkpoint and runs steps 16-30 again. Rank 0 writes the
final weights, the averaged gradients of every step, the optimizer stats and the resumed run's
weights to argv[1]. Last, a stage 2
engine without `zero.attach` must refuse to step.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from lowbit.optim import StableSPAM, zero  # noqa: E402

from _zero_common import HP, SAVE_AT, STEPS, batch, loss_of, make_model  # noqa: E402


def full_params(engine, stage):
    model = engine.module
    params = list(model.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_for(stage):
    model = make_model()
    opt = StableSPAM(model.parameters(), **HP)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0,  # DeepSpeed clips the global norm to 1.0 unless told otherwise
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                 "reduce_bucket_size": 4096, "allgather_bucket_size": 4096}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def train(engine, first, last, ckpt=None, grads=None):
    rank = dist.get_rank()
    for t in range(first, last + 1):
        x = batch(t)[2 * rank:2 * rank + 2]
        engine.backward(loss_of(engine, x, t))
        if grads is not None:  # the averaged full gradients the optimizer is about to see
            grads.append([safe_get_full_grad(p).clone() for p in engine.module.parameters()])
        engine.step()
        if ckpt is not None and t == SAVE_AT:
            engine.save_checkpoint(ckpt, tag=f"step{t}")


def main(out, ckdir):
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    result = {}
    for stage in (1, 2, 3):
        ckpt = os.path.join(ckdir, f"zero{stage}")
        engine, opt = engine_for(stage)
        zero.attach(engine)
        grads = []
        train(engine, 1, STEPS, ckpt, grads)
        result[stage] = {"params": full_params(engine, stage), "stats": dict(opt.stats), "grads": grads}
        engine2, opt2 = engine_for(stage)
        zero.attach(engine2)
        engine2.load_checkpoint(ckpt, tag=f"step{SAVE_AT}")
        result[stage]["loaded_stats"] = dict(opt2.stats)
        train(engine2, SAVE_AT + 1, STEPS)
        result[stage]["resumed"] = full_params(engine2, stage)
        result[stage]["resumed_stats"] = dict(opt2.stats)
    # without attach: the step must fail rather than compute statistics per partition
    engine, _ = engine_for(2)
    x = batch(1)[2 * rank:2 * rank + 2]
    engine.backward(loss_of(engine, x, 1))
    try:
        engine.step()
        result["unattached"] = "stepped"
    except RuntimeError as exc:
        result["unattached"] = str(exc)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
