"""Run records: ``metrics.jsonl`` (one JSON object per logged step or eval) and PNG plots of them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them exactly)."""
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``plots/loss.png``, ``plots/lr.png`` and ``plots/eval.png`` (when there are evals)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def figure(name: str, series: dict[str, tuple[list, list]], ylabel: str, marker: str = "") -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker=marker, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        written.append(out_dir / f"{name}.png")

    finite = [r for r in train if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if finite:
        series = {"train loss": ([r["step"] for r in finite], [r["loss"] for r in finite])}
        eval_loss = [r for r in evals if "loss" in r and r.get("model", "adapted") == "adapted"]
        if eval_loss:  # eval loss on the same axes when the task has one
            series["eval loss"] = ([r["step"] for r in eval_loss], [r["loss"] for r in eval_loss])
        figure("loss", series, "loss")
    if train:
        figure("lr", {"lr": ([r["step"] for r in train], [r["lr"] for r in train])}, "learning rate")
    metric = next((m for m in ("accuracy", "perplexity") if any(m in r for r in evals)), None)
    if metric:
        adapted = [r for r in evals if metric in r and r.get("model", "adapted") == "adapted"]
        base = [r for r in evals if metric in r and r.get("model") == "base"]
        series = {"adapted": ([r["step"] for r in adapted], [r[metric] for r in adapted])}
        if base:
            series["base (step 0)"] = ([r["step"] for r in base], [r[metric] for r in base])
        figure("eval", series, f"eval {metric}", marker="o")
    return written
