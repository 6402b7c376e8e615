"""Compare finished training runs: their COCO scores and training times, as a table and a bar chart, and their
loss and AP curves over the iterations.

A run is the folder ``tools/train.py`` writes: ``metrics.jsonl`` (one line per logged iteration window, ``"type":
"train"``, and per evaluation, ``"type": "eval"``) and ``eval_final_metrics.json`` (the last evaluation; runs
written before that name read as ``eval_final.json``). The training time
is the sum of the logged windows (``sec_per_iter`` times the iterations since the previous log line), so it leaves
out data preparation and evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..engine.coco_eval import METRICS, evaluation_files
from ..io import read_jsonl

__all__ = ["load_run", "format_runs", "figure_runs", "plot_runs"]


def load_run(path: str | Path, label: str | None = None) -> dict:
    """``{"label", "path", "iterations", "train_s", <each of METRICS>, "loss_curve", "ap_curve"}`` of the run folder
    ``path``; ``METRICS`` are the COCO scores of :mod:`roikit.engine.coco_eval` (AP, AP50, AP75, APs, APm, APl).
    ``loss_curve`` is ``[(iteration, loss), ...]`` of the logged training windows, ``ap_curve`` ``[(iteration,
    AP), ...]`` of the evaluations, both by iteration (a resumed run's later record of an iteration wins).

    Scores come from ``eval_final_metrics.json`` (``eval_final.json`` in older runs) or, without it, from the last
    ``"eval"`` line of ``metrics.jsonl``.
    """
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ValueError(f"{path} is not a training run folder (no metrics.jsonl)")
    train_s, last_iter, iterations, evals = 0.0, 0, 0, []
    losses: dict[int, float] = {}
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
            if isinstance(record.get("loss"), (int, float)):
                losses[it] = float(record["loss"])
        elif record.get("type") == "eval":
            evals.append(record)
    final = evaluation_files(path, "eval_final")[1]  # the name tools/train.py writes
    if not final.is_file():
        final = path / "eval_final.json"  # runs written before it
    if final.is_file():
        try:
            scores = json.loads(final.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {final}: {e}") from e
    elif evals:
        scores = evals[-1]
    else:
        raise ValueError(f"{path}: the run has no evaluation yet (no eval_final_metrics.json, no eval line in "
                         f"metrics.jsonl)")
    missing = [s for s in METRICS if not isinstance(scores, dict) or not isinstance(scores.get(s), (int, float))]
    if missing:
        raise ValueError(f"{path}: the evaluation lacks {', '.join(missing)}")
    aps = {int(r["iter"]): float(r["AP"]) for r in evals
           if isinstance(r.get("iter"), int) and isinstance(r.get("AP"), (int, float))}
    return {"label": label or path.name, "path": str(path), "iterations": iterations, "train_s": train_s,
            **{s: float(scores[s]) for s in METRICS}, "loss_curve": sorted(losses.items()),
            "ap_curve": sorted(aps.items())}


def format_runs(runs: list[dict]) -> str:
    """A markdown table: one row per run, scores in percent, training time in minutes."""
    lines = ["| run | " + " | ".join(METRICS) + " | iterations | training time |",
             "|---|" + "---:|" * (len(METRICS) + 2)]
    for r in runs:
        scores = " | ".join(f"{100 * r[s]:.1f}" for s in METRICS)
        lines.append(f"| {r['label']} | {scores} | {r['iterations']} | {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def figure_runs(runs: list[dict], title: str = ""):
    """The matplotlib figure of :func:`plot_runs`: top, grouped bars of AP, AP50 and AP75 per run (labelled to one
    decimal) and the training time; bottom, each run's training loss and AP over the iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), dpi=90, gridspec_kw={"width_ratios": [3, 2]})
    (ax, ax_t), (ax_loss, ax_ap) = axes
    width = 0.8 / 3
    for i, score in enumerate(("AP", "AP50", "AP75")):
        xs = [j + (i - 1) * width for j in range(len(runs))]
        bars = ax.bar(xs, [100 * r[score] for r in runs], width=width, label=score, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{100 * r[score]:.1f}" for r in runs], fontsize=6)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("COCO score (%)")
    ax.legend(fontsize=8, ncols=3)
    ax_t.bar(range(len(runs)), [r["train_s"] / 60 for r in runs], color="C7")
    ax_t.set_xticks(range(len(runs)), labels)
    ax_t.set_ylabel("training time (min)")
    for a in (ax, ax_t):
        a.tick_params(axis="x", labelrotation=30, labelsize=8)

    for j, r in enumerate(runs):  # one colour per run in both curves
        for a, key, scale, marker in ((ax_loss, "loss_curve", 1.0, None), (ax_ap, "ap_curve", 100.0, "o")):
            points = r.get(key) or []
            a.plot([p[0] for p in points], [scale * p[1] for p in points], color=f"C{j % 10}", marker=marker,
                   markersize=3, linewidth=1.2, label=r["label"])
    ax_loss.set_ylabel("training loss")
    ax_ap.set_ylabel("AP (%)")
    for a in (ax_loss, ax_ap):
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_runs(runs: list[dict], path: str | Path, title: str = "") -> None:
    """:func:`figure_runs`, written atomically as a PNG."""
    import matplotlib.pyplot as plt

    from ..io import atomic_open

    fig = figure_runs(runs, title)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
