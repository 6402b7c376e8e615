"""tools/compare_runs.py and roikit.analysis.runs on hand-made run folders."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from roikit.analysis.runs import figure_runs, format_runs, load_run
from roikit.engine.coco_eval import METRICS

REPO = Path(__file__).resolve().parents[1]


def _write_run(folder: Path, lines: list[dict], final: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if final is not None:
        (folder / "eval_final.json").write_text(json.dumps(final))
    return folder


def _scores(base: float) -> dict:
    return {s: base + i / 100 for i, s in enumerate(METRICS)}


def test_training_time_sums_the_logged_windows_once(tmp_path):
    run = _write_run(tmp_path / "a", [
        {"type": "train", "iter": 20, "sec_per_iter": 0.5},
        {"type": "train", "iter": 40, "sec_per_iter": 1.0},
        {"type": "train", "iter": 40, "sec_per_iter": 9.0},  # logged again after a resume: not counted twice
        {"type": "train", "iter": 60, "sec_per_iter": 0.25},
        {"type": "eval", "iter": 60, **_scores(0.1)},
    ], final=_scores(0.5))
    r = load_run(run)
    assert r["train_s"] == pytest.approx(20 * 0.5 + 20 * 1.0 + 20 * 0.25) and r["iterations"] == 60
    assert r["AP"] == 0.5 and r["APl"] == pytest.approx(0.55) and r["label"] == "a"  # eval_final.json wins
    table = format_runs([r])
    assert "| a | 50.0 | 51.0 | 52.0 | 53.0 | 54.0 | 55.0 | 60 | 0.6 min |" in table


def test_without_eval_final_the_last_eval_line_counts(tmp_path):
    run = _write_run(tmp_path / "b", [{"type": "eval", "iter": 10, **_scores(0.2)},
                                      {"type": "eval", "iter": 20, **_scores(0.3)}])
    assert load_run(run, "mine")["AP"] == 0.3 and load_run(run, "mine")["label"] == "mine"


@pytest.mark.parametrize("lines, final, message", [
    (None, None, "not a training run folder"),
    ([{"type": "train", "iter": 10, "sec_per_iter": 1.0}], None, "has no evaluation yet"),
    ([], {"AP": 0.5}, "the evaluation lacks AP50"),
])
def test_bad_run_folders(tmp_path, lines, final, message):
    folder = tmp_path / "c"
    if lines is None:
        folder.mkdir()
    else:
        _write_run(folder, lines, final)
    with pytest.raises(ValueError, match=message):
        load_run(folder)


def test_broken_metrics_line_names_the_line(tmp_path):
    folder = _write_run(tmp_path / "d", [], _scores(0.1))
    (folder / "metrics.jsonl").write_text('{"type": "train", "iter": 1, "sec_per_iter": 1}\n{"type": "tr\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        load_run(folder)


def test_a_last_line_cut_short_by_a_kill_is_skipped(tmp_path):
    folder = _write_run(tmp_path / "d", [{"type": "train", "iter": 10, "sec_per_iter": 2.0},
                                          {"type": "train", "iter": 20, "sec_per_iter": 1.0}], _scores(0.3))
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 30, "sec_')  # what append_jsonl promises readers skip
    run = load_run(folder)
    assert run["iterations"] == 20 and run["train_s"] == pytest.approx(30.0) and run["AP"] == pytest.approx(0.3)


@pytest.mark.parametrize("metrics, final, message", [
    ('{"type": "train", "sec_per_iter": 1}\n', None, r"metrics.jsonl: a train record needs a number 'iter'"),
    ('[1, 2]\n', None, r"metrics.jsonl: a record is not a JSON object: \[1, 2\]"),
    ("", "{not json", r"cannot read .*eval_final.json: "),
    ("", '{"AP": "high"}', r"the evaluation lacks AP, AP50"),
])
def test_malformed_records_are_one_line_errors_naming_the_file(tmp_path, metrics, final, message):
    folder = _write_run(tmp_path / "d", [], _scores(0.1))
    (folder / "metrics.jsonl").write_text(metrics)
    if final is not None:
        (folder / "eval_final.json").write_text(final)
    with pytest.raises(ValueError, match=message):
        load_run(folder)


def test_tool_prints_the_table_and_writes_the_chart(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_runs_tool", REPO / "tools" / "compare_runs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    runs = [str(_write_run(tmp_path / name, [{"type": "train", "iter": 20, "sec_per_iter": 3.0}], _scores(ap)))
            for name, ap in (("x", 0.4), ("y", 0.6))]
    chart = tmp_path / "out" / "chart.png"
    chart.parent.mkdir()
    args = tool.get_args_parser().parse_args([*runs, "--labels", "first", "second", "--plot", str(chart)])
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "| first | 40.0 |" in out and "| second | 60.0 |" in out and "1.0 min" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(chart.parent.iterdir()) == [chart]
    assert tool.main(argparse.Namespace(runs=runs, labels=["one"], plot=None, title="")) == 2
    assert "1 label(s) for 2 run(s)" in capsys.readouterr().err
    assert tool.main(argparse.Namespace(runs=runs, labels=None, plot=str(chart.parent), title="")) == 2
    err = capsys.readouterr().err.strip()  # the chart's path is a folder: one line, no traceback
    assert len(err.splitlines()) == 1 and err.startswith("compare_runs: error: ") and str(chart.parent) in err


def test_curves_come_from_the_metrics_lines(tmp_path):
    run = _write_run(tmp_path / "e", [
        {"type": "train", "iter": 10, "sec_per_iter": 1.0, "loss": 2.5},
        {"type": "train", "iter": 20, "sec_per_iter": 1.0, "loss": 1.5},
        {"type": "eval", "iter": 20, **_scores(0.1)},
        {"type": "train", "iter": 20, "sec_per_iter": 1.0, "loss": 1.25},  # logged again after a resume: it wins
        {"type": "train", "iter": 30, "sec_per_iter": 1.0, "loss": 0.75},
        {"type": "eval", "iter": 30, **_scores(0.2)},
    ], final=_scores(0.2))
    r = load_run(run)
    assert r["loss_curve"] == [(10, 2.5), (20, 1.25), (30, 0.75)]
    assert r["ap_curve"] == [(20, 0.1), (30, 0.2)]


def test_the_chart_labels_bars_to_one_decimal_and_draws_the_curves(tmp_path):
    runs = [load_run(_write_run(tmp_path / name, [
        {"type": "train", "iter": 10, "sec_per_iter": 1.0, "loss": 3.0 * k},
        {"type": "train", "iter": 20, "sec_per_iter": 1.0, "loss": 2.0 * k},
        {"type": "eval", "iter": 20, **_scores(0.3)},
    ], final={**_scores(0.745), "AP": ap}), name) for name, ap, k in (("p", 0.745, 1.0), ("q", 0.1234, 2.0))]
    fig = figure_runs(runs)
    bars, _, loss, ap = fig.axes
    texts = [t.get_text() for t in bars.texts]
    assert "74.5" in texts and "74" not in texts and "12.3" in texts  # AP 0.745 is 74.5, not "74"
    assert [list(line.get_xdata()) for line in loss.lines] == [[10, 20], [10, 20]]
    assert [list(line.get_ydata()) for line in loss.lines] == [[3.0, 2.0], [6.0, 4.0]]
    assert [list(line.get_ydata()) for line in ap.lines] == [[pytest.approx(30.0)], [pytest.approx(30.0)]]
    assert [line.get_label() for line in ap.lines] == ["p", "q"]
