"""Test-wide setup.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the CUDA kernels on CPU tensors. Triton reads the variable when
a kernel module is imported, and any test may import roikit's kernel modules first, so it is set here, before
the test modules are collected. Tests that need the real compiler remove it for their subprocess.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- peak memory of one CPU call
import contextlib  # noqa: E402

import pytest  # noqa: E402

from roikit.utils.memory import address_space_guard, measure_peak, peak_memory_available  # noqa: E402


@pytest.fixture
def peak_memory():
    """:func:`measure_peak` as a fixture; skips the test where the peak resident set cannot be reset (not Linux,
    or /proc/self/clear_refs not writable, as in some containers)."""
    why = peak_memory_available()
    if why is not None:
        pytest.skip(why)
    return measure_peak


@pytest.fixture(scope="session")
def memory_guard():
    """:func:`address_space_guard` for tests that cannot take a function-scoped fixture (hypothesis ``@given``):
    ``with memory_guard(1 << 30): ...``. Where RLIMIT_AS cannot be set the block runs unguarded."""
    def guard(extra_bytes):
        if peak_memory_available() is not None:  # no /proc: run unguarded
            return contextlib.nullcontext()
        return address_space_guard(extra_bytes)
    return guard


# ---------------------------------------------------------------- boxes and layouts shared by the op tests
import torch  # noqa: E402


def _make_rois(k=24, n=2, size=(13, 17), scale=0.5, seed=0, dtype=torch.float64, reversed_boxes=True):
    """Boxes inside, partly outside and wholly outside the map, zero-size and (optionally) reversed."""
    g = torch.Generator().manual_seed(seed)
    h, w = size[0] / scale, size[1] / scale
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64) * 1.2 - 4
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64) * 0.7 + 0.3
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([-30.0, -30.0, -10.0, -12.0])  # wholly outside, before the map
    boxes[1] = torch.tensor([w + 5, h + 5, w + 20, h + 30])  # wholly outside, past the map
    boxes[2, 2:] = boxes[2, :2]  # zero size
    if reversed_boxes:
        boxes[3, [0, 2]] = boxes[3, [2, 0]]  # reversed in x
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    return torch.cat([idx, boxes], dim=1).to(dtype)


def _layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:3], x.shape[3] * 2, dtype=x.dtype)
    wide[..., ::2] = x
    yield "strided", wide[..., ::2]


@pytest.fixture
def make_rois():
    """``make_rois(k=24, n=2, size=(13, 17), scale=0.5, seed=0, dtype=float64, reversed_boxes=True)``: boxes inside,
    partly outside and wholly outside the map, zero-size and (optionally) reversed."""
    return _make_rois


@pytest.fixture
def layouts():
    """``layouts(x)``: the map as contiguous, channels-last and strided tensors, with their names."""
    return _layouts
