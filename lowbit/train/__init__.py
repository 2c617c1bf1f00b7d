"""Training: `lowbit pretrain | sft | align | eval | seer` and the programmatic entry `run(config)`.

    from lowbit.train import config, run
    cfg = config.load(["configs/pretrain/tiny.yaml"], ["train.steps=50", "run.dir=runs/a"], task="pretrain")
    summary = run(cfg)          # dict, also written to <run.dir>/summary.json

`run` may be called repeatedly in one process; each call writes only to its run directory.
"""
from .config import Config, ConfigError, load
from .loop import run

__all__ = ["Config", "ConfigError", "load", "run"]
