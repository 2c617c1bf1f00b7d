"""Run-directory logging on rank 0: JSONL metrics, TensorBoard event files, a tqdm bar."""
from __future__ import annotations

import json
import math
import os


class Logger:
    def __init__(self, run_dir: str, *, main: bool, total: int, start: int, tensorboard: bool, progress: bool,
                 resume_step: int | None):
        self.main = main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = self.bar = None
        if not main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            self._truncate(resume_step)  # steps after the checkpoint are replayed, not duplicated
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.file = open(self.path, "a")
        if tensorboard:  # optional and slow to import: only when run.tensorboard is on
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start + 1 if resume_step else None)
        if progress:  # optional: only when run.progress is on
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def progress(self, record: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if record.get("grad_norm") is not None:
            shown["gnorm"] = f"{record['grad_norm']:.3f}"
        shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
