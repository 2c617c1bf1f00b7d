"""One rank of test_ema.py's ZeRO test (torchrun, 2 ranks, gloo, DS_ACCELERATOR=cpu).

For ZeRO stages 3 and 2: a tiny Llama trained STEPS AdamW steps by the DeepSpeed engine with a
`lowbit.train.ema.EMA` of its fp32 master partitions, updated after every step. Rank 0 writes to
argv[1], per stage: the full weights after every step (gathered; step 0 = the initial ones), the
gathered EMA (`full_state`), the EMA rebuilt from the per-rank checkpoint files alone (`assemble`),
each rank's shard sizes, and whether a fresh EMA loaded from those files holds the same bits.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "optim"))
from _zero_common import batch, make_model  # noqa: E402  (the ZeRO optimizer tests' model and data)

STEPS = 6
DECAY = 0.7


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)


def main(out, ckdir):
    import deepspeed

    from lowbit.train.ema import EMA, assemble

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for stage in (3, 2):
        model = make_model()
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                     "reduce_bucket_size": 4096, "allgather_bucket_size": 4096}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model.parameters()), config=cfg)
        ema = EMA(engine.module, engine.optimizer, DECAY, 1, rank, world)

        def full():
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

        weights = [full()]
        for t in range(1, STEPS + 1):
            x = batch(t)[2 * rank:2 * rank + 2]
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            ema.update(t)
            weights.append(full())
        gathered = ema.full_state(torch.device("cpu"))
        folder = os.path.join(ckdir, f"zero{stage}")
        ema.save(folder)
        dist.barrier()
        again = EMA(engine.module, engine.optimizer, 0.5, 1, rank, world)  # starts from the weights, then loads
        loaded = again.load(folder) and again.updates == STEPS and \
            all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(again.shards, ema.shards))
        flags = [None] * world
        dist.all_gather_object(flags, (bool(loaded), [s.numel() for s in ema.shards], ema.sharded))
        if rank == 0:
            result[stage] = {"weights": weights, "ema": gathered, "assembled": assemble(folder)[0],
                             "ranks": flags, "updates": ema.updates}
        dist.barrier()
    if rank == 0:
        torch.save(result, out)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1], sys.argv[2])
