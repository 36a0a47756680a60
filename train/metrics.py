"""metrics.jsonl (one JSON object per line, fsynced) + TensorBoard, written by the main process.

Records: {"kind": "train", "iteration", "step" (global optimizer step), ...} per logged step,
{"kind": "eval", "iteration", "step", ...} per finished iteration (iteration -1: θ_0 before any
training). On resume from a mid-iteration checkpoint, step records past that checkpoint are
dropped (the steps will be redone), and so are evaluations of unfinished iterations, so the file
never holds a step or an iteration twice.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .io_utils import append_jsonl, atomic_write_jsonl, read_jsonl


def _clean(v):
    # JSON has no NaN/inf; write them as strings so a skipped (NaN) step is still visible.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    def __init__(self, output_dir, *, enabled: bool, resume_iteration: int = 0, resume_step: int = 0,
                 tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            rows = read_jsonl(self.path, tolerate_torn_tail=True)
            kept = [r for r in rows if not (
                (r.get("kind") == "train" and r.get("step", 0) > resume_step)
                or (r.get("kind") == "eval" and r.get("iteration", -1) >= resume_iteration))]
            atomic_write_jsonl(self.path, kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                # purge_step hides events past the resume point, the TensorBoard twin of the filter above.
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, [{k: _clean(v) for k, v in record.items()}])
        if self.writer is not None:
            kind = record.get("kind", "train")
            step = record.get("step", 0)
            for k, v in record.items():
                if k in ("kind", "step", "iteration") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self.writer.add_scalar(f"{kind}/{k}", v, step)
            self.writer.flush()

    def records(self, kind=None):
        if not self.path.exists():
            return []
        return [r for r in read_jsonl(self.path, tolerate_torn_tail=True) if kind is None or r.get("kind") == kind]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir):
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
