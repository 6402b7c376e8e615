"""Compare finished training runs: their COCO scores and training times, as a table and a bar chart.

A run is the folder ``tools/train.py`` writes: ``metrics.jsonl`` (one line per logged iteration window, ``"type":
"train"``, and per evaluation, ``"type": "eval"``) and ``eval_final.json`` (the last evaluation). The training time
is the sum of the logged windows (``sec_per_iter`` times the iterations since the previous log line), so it leaves
out data preparation and evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..engine.coco_eval import METRICS
from ..io import read_jsonl

__all__ = ["load_run", "format_runs", "plot_runs"]


def load_run(path: str | Path, label: str | None = None) -> dict:
    """``{"label", "path", "iterations", "train_s", <each of METRICS>}`` of the run folder ``path``; ``METRICS`` are
    the COCO scores of :mod:`roikit.engine.coco_eval` (AP, AP50, AP75, APs, APm, APl).

    Scores come from ``eval_final.json`` or, without it, from the last ``"eval"`` line of ``metrics.jsonl``.
    """
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ValueError(f"{path} is not a training run folder (no metrics.jsonl)")
    train_s, last_iter, iterations, evals = 0.0, 0, 0, []
    for record in read_jsonl(metrics_file):  # a last line a kill cut short is skipped
        if not isinstance(record, dict):
            raise ValueError(f"{metrics_file}: a record is not a JSON object: {record!r}")
        if record.get("type") == "train":
            try:
                it, sec_per_iter = int(record["iter"]), float(record["sec_per_iter"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{metrics_file}: a train record needs a number 'iter' and 'sec_per_iter', "
                                 f"got {record!r}") from None
            if it > last_iter:  # a resumed run logs again from its checkpoint: count each window once
                train_s += sec_per_iter * (it - last_iter)
                last_iter = it
            iterations = max(iterations, it)
        elif record.get("type") == "eval":
            evals.append(record)
    final = path / "eval_final.json"
    if final.is_file():
        try:
            scores = json.loads(final.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {final}: {e}") from e
    elif evals:
        scores = evals[-1]
    else:
        raise ValueError(f"{path}: the run has no evaluation yet (no eval_final.json, no eval line in metrics.jsonl)")
    missing = [s for s in METRICS if not isinstance(scores, dict) or not isinstance(scores.get(s), (int, float))]
    if missing:
        raise ValueError(f"{path}: the evaluation lacks {', '.join(missing)}")
    return {"label": label or path.name, "path": str(path), "iterations": iterations, "train_s": train_s,
            **{s: float(scores[s]) for s in METRICS}}


def format_runs(runs: list[dict]) -> str:
    """A markdown table: one row per run, scores in percent, training time in minutes."""
    lines = ["| run | " + " | ".join(METRICS) + " | iterations | training time |",
             "|---|" + "---:|" * (len(METRICS) + 2)]
    for r in runs:
        scores = " | ".join(f"{100 * r[s]:.1f}" for s in METRICS)
        lines.append(f"| {r['label']} | {scores} | {r['iterations']} | {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[dict], path: str | Path, title: str = "") -> None:
    """Grouped bars of AP, AP50 and AP75 per run, and the training time, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_open

    labels = [r["label"] for r in runs]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=90, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / 3
    for i, score in enumerate(("AP", "AP50", "AP75")):
        xs = [j + (i - 1) * width for j in range(len(runs))]
        bars = ax.bar(xs, [100 * r[score] for r in runs], width=width, label=score, color=f"C{i}")
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("COCO score (%)")
    ax.legend(fontsize=8, ncols=3)
    ax_t.bar(range(len(runs)), [r["train_s"] / 60 for r in runs], color="C7")
    ax_t.set_xticks(range(len(runs)), labels)
    ax_t.set_ylabel("training time (min)")
    for a in (ax, ax_t):
        a.tick_params(axis="x", labelrotation=30, labelsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
