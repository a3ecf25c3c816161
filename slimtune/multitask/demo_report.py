"""The multi-task demo's outputs: report.json, report.md and plots/accuracy.png (slimtune/multitask/demo.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cell(v: dict | None) -> str:
    return "n/a" if v is None else f"{v['accuracy']:.1%}"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json, report.md and plots/accuracy.png in `out`."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    names = list(report["tasks"])
    lines = [f"# slimtune demo: {report['title']}", "",
             f"- model: `{report['model']}`, every adapter: `{json.dumps(report['method'])}`",
             f"- metric: {report['metric']}; held-out: "
             + ", ".join(f"{t} {v['n_eval']}" for t, v in report["tasks"].items()), "",
             "| row | " + " | ".join(names) + " | mean | note |", "|---" * (len(names) + 3) + "|"]
    for r in report["rows"]:
        mean = "n/a" if r["mean"] is None else f"{r['mean']:.1%}"
        cells = [_cell(r["tasks"][t]) for t in names]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {mean} | {r['note']} |")
    m = report["mixed_batch"]
    lines += ["", "## One mixed batch, every task at once", "",
              f"{m['n']} held-out prompts of all tasks interleaved in batches of {m['batch_size']}, row i routed to "
              "its task's LoRA with `model(**batch, adapter_names=[...])`:", "",
              "| task | mixed batch | adapter alone | same predictions |", "|---|---|---|---|"]
    for t, v in m["tasks"].items():
        same = "yes" if v["equal_predictions"] else f"no ({v['n_differ']} differ)"
        lines.append(f"| {t} | {v['accuracy']:.1%} | {v['accuracy_alone']:.1%} | {same} |")
    lines += ["", f"Time: {m['seconds']:.1f} s for the mixed batch vs {m['separate_seconds']:.1f} s for one pass per "
              "adapter (same batch size; mixed batches pad short prompts to long ones)."]
    lines += ["", "## Training", ""] + [
        f"- {t}: {v['description']}, {v['steps']} steps on {v['examples']} examples, {v['train_seconds']:.0f} s, "
        f"{v['trainable_params']:,} parameters, adapter `{v['adapter']}`" for t, v in report["tasks"].items()]
    hub = next((r for r in report["rows"] if r["row"] == "LoRAHub" and r["available"]), None)
    if hub:
        i = hub["info"]
        lines.append(f"- LoRAHub: weights {i['weights']}, few-shot loss {i['few_shot_loss']:.4f} (uniform mix "
                     f"{i['uniform_loss']:.4f}) on {i['fewshot_examples']} examples, {i['search_seconds']:.0f} s")
    load = report.get("load_average") or {}
    lines += [f"- wall time: {report['wall_seconds']:.0f} s on {report['torch_threads']} CPU threads"
              + (f", load average {load['first']} at the start, {load['max']} at most" if load else "")
              + (f" (first-use model conversion {report['convert_seconds']:.0f} s)"
                 if report["convert_seconds"] > 1 else ""), "- plot: `plots/accuracy.png`"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_accuracy(report, out / "plots" / "accuracy.png")


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy of every row on every task, chance level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = report["rows"], list(report["tasks"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4), dpi=100)
    for j, t in enumerate(names):
        color = f"C{j}"
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        accs = [r["tasks"][t]["accuracy"] if r["tasks"][t] else 0.0 for r in rows]
        ax.bar(xs, accs, width, label=t, color=color)
        ax.axhline(1 / len(report["tasks"][t]["labels"]), color=color, ls="--", lw=0.8)
        for x, r in zip(xs, rows, strict=True):
            if r["tasks"][t] is None:
                ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(rows)), [r["row"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per task (dashed: chance)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
