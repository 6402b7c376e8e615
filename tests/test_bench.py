"""The benchmark scripts themselves: the CPU bench on a small workload, and the GPU bench's code run on the CPU.

The GPU script (``roikit/analysis/bench_cuda.py``) can only give real figures on a GPU; here its correctness check and
its timing loop run on CPU tensors (roikit's CPU path against torchvision's CPU ops, a wall-clock timer, few
channels), so that a session with a GPU does not spend its minutes on a script that crashes.
"""
from __future__ import annotations

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
