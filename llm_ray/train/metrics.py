"""Rank 0's training metrics: TensorBoard events, ``metrics.jsonl`` and a progress bar.

Ray Train V2 keeps only metrics reported with a checkpoint, so per-step metrics are written here.
Files go straight into the run folder when it is local; for object storage they are written to
a local folder and uploaded at each checkpoint and at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from llm_ray.storage import Storage

FILES = ("metrics.jsonl", "tensorboard")


class MetricsLogger:
    """``metrics.jsonl`` and TensorBoard get every step (cheap, and resume and loss comparisons
    read them); the progress bar's text, or the log line when there is no bar, every
    ``train.log_every`` steps (and the first and last)."""

    def __init__(self, run: Storage, start_step: int, total_steps: int, progress_bar: bool = True,
                 log_every: int = 1, desc: str = "train"):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.local_dir = run.root if run.is_local else tempfile.mkdtemp(prefix="llm-ray-metrics-")
        if not run.is_local:  # continue the files of earlier attempts
            for name in FILES:
                if run.exists(name):
                    target = os.path.join(self.local_dir, name)
                    if name == "tensorboard":
                        run.download_dir(name, target)
                    else:
                        with open(target, "w") as f:
                            f.write(run.read_text(name))
        os.makedirs(self.local_dir, exist_ok=True)
        # purge_step hides events an earlier attempt logged after the checkpoint we resume from.
        self.writer = SummaryWriter(os.path.join(self.local_dir, "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(os.path.join(self.local_dir, "metrics.jsonl"), "a")
        self.log_every, self.total, self.desc = log_every, total_steps, desc
        self.bar = None
        if progress_bar:
            from ray.experimental.tqdm_ray import tqdm  # renders cleanly in the driver's console

            self.bar = tqdm(total=total_steps, desc=desc, position=0)
            self.bar.update(start_step)

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        due = step % self.log_every == 0 or step == 1 or step == self.total
        loss = metrics.get("loss", float("nan"))
        if self.bar is not None:
            if due:
                self.bar.set_description(f"{self.desc} loss {loss:.4f}")
            self.bar.update(1)
        elif due:
            # written, not print()ed: Ray Train V2 patches print in workers and would log it twice
            sys.stderr.write(f"{self.desc} step {step}/{self.total} loss {loss:.4f}\n")
            sys.stderr.flush()

    def sync(self) -> None:
        self.writer.flush()
        if not self.run.is_local:
            self.run.upload_dir(os.path.join(self.local_dir, "tensorboard"), "tensorboard")
            with open(os.path.join(self.local_dir, "metrics.jsonl")) as f:
                self.run.write_text("metrics.jsonl", f.read())

    def close(self) -> None:
        self.sync()
        self.writer.close()
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if not self.run.is_local:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def read_metrics(run: Storage) -> dict[int, dict]:
    """Per-step metrics of a run; a step logged twice (re-run after a restart) keeps the last."""
    if not run.exists("metrics.jsonl"):
        return {}
    rows = [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines() if line.strip()]
    return {row["step"]: row for row in rows}
