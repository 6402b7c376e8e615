"""The benchmark scripts themselves: the CPU bench on a small workload, and the GPU bench's code run on the CPU.

The GPU script (``roikit/analysis/bench_cuda.py``) can only give real figures on a GPU; here its correctness check and
its timing loop run on CPU tensors (roikit's CPU path against torchvision's CPU ops, a wall-clock timer, few
channels), so that a session with a GPU does not spend its minutes on a script that crashes.
"""
from __future__ import annotations

import gc
import time

import pytest
import torch

from roikit.analysis import bench, bench_cuda


def test_cpu_bench_rows():
    rows = bench.run_cpu_benchmark(repeat=1, num_boxes=8)
    assert [(r["op"], r["mode"]) for r in rows] == [("roi_align", "forward"), ("roi_align", "forward+backward"),
                                                    ("roi_pool", "forward"), ("roi_pool", "forward+backward")]
    for r in rows:
        assert r["roikit_ms"] > 0 and r["torchvision_ms"] > 0
        assert r["speedup"] == pytest.approx(r["torchvision_ms"] / r["roikit_ms"])
    assert bench.format_rows(rows).count("\n") == len(rows) + 1


def test_gpu_bench_correctness_check_passes_on_the_cpu_path():
    torch.manual_seed(0)
    assert bench_cuda.check_correctness(device="cpu") == []


def _wall_ms(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) * 1000 / repeat


def test_gpu_bench_timing_loop_runs_on_the_cpu():
    rows = bench_cuda.run_cuda_benchmark(repeat=1, device="cpu", channels=2, timer=_wall_ms)
    cases = [(r["workload"], r["op"], r["mode"]) for r in rows]
    assert len(cases) == 12 and len(set(cases)) == 12
    assert ("pyramid 4/8/16/32, 1000 boxes/image", "multilevel_roi_align", "forward+backward") in cases
    for r in rows:
        assert r["speedup"] == pytest.approx(r["torchvision_ms"] / r["roikit_ms"]) and r["peak_gbs"] is None
    table = bench_cuda.format_rows(rows)
    assert table.count("\n") == 13 and "| unknown |" in table


def test_covered_cells_counts_the_union_of_box_rectangles():
    # box (8, 8)-(16, 16) at scale 1/4: rows and columns floor(2 - 1) = 1 to ceil(4) + 1 = 5 (exclusive): 4 x 4
    one = torch.tensor([[0.0, 8.0, 8.0, 16.0, 16.0]])
    assert bench_cuda.covered_cells(one, 0.25, 10, 10, images=1) == 16
    # a second box shifted by one cell overlaps 3 x 4 cells: 16 + 16 - 12; in another image it does not overlap
    two = torch.tensor([[0.0, 8.0, 8.0, 16.0, 16.0], [0.0, 12.0, 8.0, 20.0, 16.0]])
    assert bench_cuda.covered_cells(two, 0.25, 10, 10, images=1) == 20
    two[1, 0] = 1
    assert bench_cuda.covered_cells(two, 0.25, 10, 10, images=2) == 32


def test_peak_bandwidth_by_gpu_name():
    assert bench_cuda.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench_cuda.peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert bench_cuda.peak_bandwidth("NVIDIA H200") == 4800.0
    assert bench_cuda.peak_bandwidth("NVIDIA GeForce RTX 4090") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_gpu_bench_without_a_gpu_says_so(capsys):
    assert bench_cuda.main(repeat=1) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sweep_rows_table_and_plot(tmp_path):
    """A tiny sweep: every op and pass, both dtypes; the table says met/missed per row and the plot is a PNG."""
    rows = bench.run_sweep(counts=(4,), sizes=("small", "large"), outputs=(2,), threads=(1,), channels=2,
                           rounds=1, calls=1, progress=False)
    assert len(rows) == 2 * len(bench.SWEEP_OPS) * 2 * 2  # dtypes x ops x sizes x passes
    for r in rows:
        assert r["roikit_ms"] > 0 and r["torchvision_ms"] > 0
        assert r["speedup"] == pytest.approx(r["torchvision_ms"] / r["roikit_ms"])
        assert r["threads"] == 1 and r["dtype"] in ("float32", "bfloat16")
    table = bench.format_sweep(rows)
    assert table.count("\n") == len(rows) + 1 and all(f"| {op} |" in table for op in bench.SWEEP_OPS)
    # the position-sensitive ops read 1 group of 2 x 2 = 4 channels (the multiple of 4 nearest to 2), the others 2
    assert {r["op"]: r["channels"] for r in rows} == dict(roi_align=2, roi_pool=2, ps_roi_align=4, ps_roi_pool=4,
                                                           pyramid=2)
    assert "| ps_roi_align | forward | 4 | small | 2 | 4 | float32 | 1 |" in table
    assert gc.get_freeze_count() == 0  # the sweep's gc.freeze is undone
    bench.plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_boxes_have_their_sizes():
    boxes = torch.cat(bench.sweep_boxes(500, "large"))
    sides = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    assert len(boxes) == 500 and sides.min() >= 256 - 1e-3 and sides.max() <= 800 + 1e-3
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= bench.IMAGE_HW[1] + 1e-3).all()


def test_peak_memory_sees_an_allocation():
    if bench.peak_memory(lambda: None) is None:
        pytest.skip("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    grown = bench.peak_memory(lambda: torch.ones(64 * 2**20 // 4))  # 64 MiB, written
    assert 56 * 2**20 < grown < 96 * 2**20


def test_interleaved_repeats_only_near_the_goal():
    def sleeper(ms):
        return lambda: time.sleep(ms / 1000)

    # 10x faster against a goal of 1.5x: the verdict cannot change, one round
    ours, theirs, rounds = bench._interleaved(sleeper(2), sleeper(20), rounds=3, calls=1, goal=1.5)
    assert rounds == 1 and theirs / ours > 5
    # about the goal: every round runs
    _, _, rounds = bench._interleaved(sleeper(10), sleeper(15), rounds=3, calls=1, goal=1.5)
    assert rounds == 3
    # 10x slower: a miss takes a second round to confirm, then stops
    ours, theirs, rounds = bench._interleaved(sleeper(20), sleeper(2), rounds=3, calls=1, goal=1.5)
    assert rounds == 2 and ours / theirs > 5


def test_interleaved_calls_per_round_fit_the_round_budget():
    calls = {"ours": 0, "theirs": 0}

    def counted(side, ms):
        def fn():
            calls[side] += 1
            time.sleep(ms / 1000)
        return fn

    # 30 ms calls in a 100 ms round: 3 calls each after the given first round (at most calls=5)
    bench._interleaved(counted("ours", 30), counted("theirs", 30), rounds=2, calls=5, goal=1.0, first=(30.0, 30.0),
                       round_ms=100)
    assert calls == {"ours": 3, "theirs": 3}
    # a call longer than the round: one call each
    calls.update(ours=0, theirs=0)
    bench._interleaved(counted("ours", 30), counted("theirs", 30), rounds=2, calls=5, goal=1.0, first=(30.0, 30.0),
                       round_ms=10)
    assert calls == {"ours": 1, "theirs": 1}


def test_ps_channels_nearest_multiple_of_the_bins():
    assert bench.ps_channels(256, 7) == 245  # 5 x 49 (6 x 49 = 294 is farther)
    assert bench.ps_channels(256, 14) == 196  # 1 x 196 (2 x 196 = 392 is farther)
    assert bench.ps_channels(2, 7) == 49  # at least one group
    assert bench.ps_channels(100, 3) == 99


def test_detector_times_per_image(tmp_path):
    rows = bench.time_detectors(repeat=1, threads=(1,))
    assert [(r["model"], r["pooler"]) for r in rows] == [
        ("base_shapes", "roikit RoIAlign"), ("mobilenet_v3_fpn", "roikit RoIPooler"),
        ("mobilenet_v3_fpn", "torchvision MultiScaleRoIAlign")]
    for r in rows:
        assert 0 < r["pooler_ms"] < r["total_ms"] and r["threads"] == 1
    assert bench.format_detectors(rows).count("\n") == len(rows) + 1


def test_zoo_table_ratios_are_to_the_last_case_of_each_group():
    from roikit.analysis.bench_zoo import format_zoo

    rows = [{"op": "a", "pass": "forward", "case": "ours", "ms": 2.0},
            {"op": "a", "pass": "forward", "case": "ref", "ms": 3.0},
            {"op": "b", "pass": "forward", "case": "ours", "ms": 4.0},
            {"op": "b", "pass": "forward", "case": "ref", "ms": 1.0}]
    lines = format_zoo(rows).splitlines()[2:]
    assert [line.rsplit("|", 2)[1].strip() for line in lines] == ["1.50x", "1.00x", "0.25x", "1.00x"]


def test_zoo_times_every_case():
    from roikit.analysis import bench_zoo

    rows = bench_zoo.time_zoo(repeat=1, rounds=1, num_boxes=4)
    groups = {(r["op"], r["pass"]) for r in rows}
    assert groups == {("roi_align_rotated", "forward"), ("roi_align_rotated", "forward+backward"),
                      ("deform_roi_pool", "forward"), ("deform_roi_pool", "forward+backward"),
                      ("roi_align box_grad", "forward+backward")}
    assert len(rows) == 15 and all(r["ms"] > 0 for r in rows)


def test_sweep_cli_runs_only_the_named_ops(tmp_path, capsys):
    """``--ops`` limits the sweep to those ops (every row of the JSON is one of them); an unknown op is a one-line
    error naming it, before any timing."""
    import json

    from _helpers import load_tool, run_tool

    tool = load_tool("bench")
    argv = ["--sweep", "--boxes", "4", "--channels", "2", "--threads", "1", "--repeat", "1", "--no-progress",
            "--output-dir", str(tmp_path)]
    assert run_tool(tool, argv + ["--ops", "roi_pool"]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"roi_pool"} and len(rows) == 3 * 2 * 2 * 2  # sizes x outputs x dtypes x passes
    capsys.readouterr()
    assert run_tool(tool, argv + ["--ops", "roi_pool", "roi_wrap"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "roi_wrap" in err and "roi_pool" not in err.split(":", 2)[2].split("(")[0]
