"""RoIPool's numba kernels (roikit/ops/pytorch/jit.py, _numba_pool_kernels.py) against torchvision, bit for bit.

torchvision's CPU roi_pool is the oracle (output, argmax and gradient: the same maxima and the same additions in
the same order). Every kernel variant is drawn by hypothesis: the per-box and the channels-last forward, each with
and without argmax (``roikit::roi_pool_inference``), the backward; float32, float64 and bfloat16 (torchvision run
in float32 and rounded once, as torch rounds); boxes off the map, reversed, zero-size; empty bins; ties, NaN,
+-inf and -FLT_MAX cells; channel counts around the kernels' blocks of 8 and 32. bfloat16's rounding is also
checked alone against torch's ``.to(torch.bfloat16)`` on the bit patterns that decide it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roikit.ops import roi_pool
from roikit.ops.pytorch import jit

pytestmark = pytest.mark.skipif(not jit.enabled(), reason="numba is not installed (the plain path runs)")

LOWEST = torch.finfo(torch.float32).min
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def read_path(name: str):
    """Force the forward to read per-box copies or channels-last blocks of the map."""
    original = jit._use_channels_last
    jit._use_channels_last = lambda cells, input: name == "channels_last"
    try:
        yield
    finally:
        jit._use_channels_last = original


@st.composite
def cases(draw):
    n, c = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 8, 13, 33, 70]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x = (2 * x).round()  # ties: the first cell in row-major order wins
    x = x.to(dtype)
    for value in draw(st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), LOWEST]), max_size=3)):
        flat = x.view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=g))] = value
    k = draw(st.integers(1, 10))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 2.0]))
    coords = draw(st.lists(st.floats(-30, 60, allow_nan=False, width=32), min_size=4 * k, max_size=4 * k))
    boxes = torch.tensor(coords, dtype=torch.float32).reshape(k, 4)  # any order: reversed boxes, zero-size, off map
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=g).float(), boxes], dim=1)
    pooled = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return x, rois.to(torch.float64 if dtype == torch.float64 else torch.float32), scale, pooled


def torchvision_forward(x, rois, scale, pooled):
    """torchvision's (output, argmax); bfloat16 maps in float32, the output rounded once."""
    out, argmax = torch.ops.torchvision.roi_pool(x.float() if x.dtype == torch.bfloat16 else x, rois, scale, *pooled)
    return out.to(x.dtype), argmax


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), path=st.sampled_from(["per_box", "channels_last"]))
def test_forward_equals_torchvision(case, path):
    x, rois, scale, pooled = case
    expected, expected_arg = torchvision_forward(x, rois, scale, pooled)
    with read_path(path):
        out, arg = torch.ops.roikit.roi_pool(x, rois, scale, *pooled, "torchvision")
        values = torch.ops.roikit.roi_pool_inference(x, rois, scale, *pooled, "torchvision")
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(arg, expected_arg.to(torch.int32))
    torch.testing.assert_close(values, expected, atol=0, rtol=0, equal_nan=True)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_backward_equals_torchvision(case):
    x, rois, scale, pooled = case
    _, argmax = torchvision_forward(x, rois, scale, pooled)
    n, c, h, w = x.shape
    grad = torch.randn(rois.shape[0], c, *pooled, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad = grad.to(x.dtype)
    wide = grad.float() if x.dtype == torch.bfloat16 else grad  # bfloat16: added in float32, rounded once
    expected = torch.ops.torchvision._roi_pool_backward(wide, rois, argmax, scale, *pooled, n, c, h, w).to(x.dtype)
    out = jit.roi_pool_backward(grad, rois, argmax.to(torch.int32), (n, c, h, w))
    assert out.dtype == x.dtype and torch.equal(out, expected)


@st.composite
def box_tables(draw):
    """Boxes (float32 or float64) on corners that round either way: halves and neighbours of the scale's cell
    edges, far off the map, huge (clamped to +-2^52 cells), reversed; a map and bins of any size."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([1 / 16, 1 / 3, 0.1, 0.5, 1.0, 1e6]))
    corner = st.one_of(st.floats(-100, 900, allow_nan=False), st.integers(-200, 1800).map(lambda v: v / 2),
                       st.floats(-1e20, 1e20, allow_nan=False), st.integers(-64, 64).map(lambda v: v * 16 + 8.0))
    k = draw(st.integers(1, 12))
    rois = torch.tensor([[draw(st.integers(0, 1))] + [draw(corner) for _ in range(4)] for _ in range(k)],
                        dtype=torch.float64).to(dtype)
    return rois, scale, (draw(st.integers(1, 9)), draw(st.integers(1, 9))), (draw(st.integers(1, 70)),
                                                                              draw(st.integers(1, 70)))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=box_tables(), rounding=st.sampled_from(["torchvision", "integer"]))
def test_box_tables_equal_the_plain_paths(case, rounding):
    """The numba tables (``roi_pool_tables``) against the plain path's ``geometry.box_cells`` + ``clip_edges``
    (torch ops), entry for entry, and the copied-cell count the launcher decides the read path by."""
    from roikit.ops.geometry import box_cells, clip_edges
    from roikit.ops.pytorch import _numba_pool_kernels

    rois, scale, pooled, (h, w) = case
    (hs, he), (ws, we) = clip_edges(box_cells(rois, scale, pooled, rounding), (h, w))
    spans = [(end.amax(dim=1) - start.amin(dim=1)).clamp(min=0) for start, end in ((hs, he), (ws, we))]
    boxes = rois.numpy()
    tables = [np.empty(len(boxes), np.int64)] + [np.empty((len(boxes), p), np.int64) for p in (*pooled[:1] * 2,
                                                                                               *pooled[1:] * 2)]
    cells = _numba_pool_kernels.roi_pool_tables(boxes, 0, boxes.dtype.type(scale), rounding == "torchvision", h, w,
                                                *tables)
    assert cells == int((spans[0] * spans[1]).sum())
    for got, expected in zip(tables, (rois[:, 0].long(), hs, he, ws, we)):
        assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_training_and_inference_calls_equal_torchvision(dtype, make_rois):
    """Through the public function: under no_grad the op without argmax runs, with a map that requires grad the
    op with argmax; the gradient through autograd (no zeros materialized for argmax) is torchvision's."""
    rois = make_rois(k=30, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    x = (2 * torch.randn(2, 37, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).round()
    x = x.to(dtype)
    wide = x.float() if dtype == torch.bfloat16 else x
    xt = wide.clone().requires_grad_()
    expected = torchvision.ops.roi_pool(xt, rois, (5, 4), 0.5)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected.backward(grad.to(wide.dtype))
    with torch.no_grad():
        assert torch.equal(roi_pool(x, rois, (5, 4), 0.5), expected.detach().to(dtype))
    assert torch.equal(roi_pool(x, rois, (5, 4), 0.5), expected.detach().to(dtype))  # no grad asked of x
    xr = x.clone().requires_grad_()
    out = roi_pool(xr, rois, (5, 4), 0.5)
    assert out.requires_grad and torch.equal(out.detach(), expected.detach().to(dtype))
    out.backward(grad)
    assert torch.equal(xr.grad, xt.grad.to(dtype))


def test_inference_op_passes_opcheck(make_rois):
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.library.opcheck(torch.ops.roikit.roi_pool_inference.default, (x, make_rois(k=12), 0.5, 3, 2, "torchvision"))


@pytest.mark.parametrize("path", ["per_box", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_and_two_threads_give_the_same_bits(path, dtype, make_rois):
    rois = make_rois(k=64, dtype=torch.float32)
    x = torch.randn(2, 70, 13, 17, generator=torch.Generator().manual_seed(6)).to(dtype)
    grad = torch.randn(64, 70, 7, 7, generator=torch.Generator().manual_seed(7)).to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with read_path(path):
                out, arg = torch.ops.roikit.roi_pool(x, rois, 0.5, 7, 7, "torchvision")
                values = torch.ops.roikit.roi_pool_inference(x, rois, 0.5, 7, 7, "torchvision")
            results.append((out, arg, values, jit.roi_pool_backward(grad, rois, arg, tuple(x.shape))))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_hostile_boxes_agree_with_the_plain_path():
    """Boxes far past the map, huge, and a spatial scale that blows them up: the kernels clip every bin to the map
    (torchvision's integer casts overflow there, so the plain path, which shares no kernel code, is the oracle)."""
    x = torch.randn(2, 9, 6, 7, generator=torch.Generator().manual_seed(8))
    rois = torch.tensor([[0, -1e30, -1e30, 1e30, 1e30], [1, 1e9, 1e9, 2e9, 2e9], [0, -5, -5, 3e7, 2],
                         [1, 2, 2, 2, 2], [0, 5, 5, 1, 1]])
    for scale in (1.0, 1e6):
        out, arg = torch.ops.roikit.roi_pool(x, rois, scale, 3, 3, "torchvision")
        values = torch.ops.roikit.roi_pool_inference(x, rois, scale, 3, 3, "torchvision")
        with jit.disabled():
            ref, ref_arg = torch.ops.roikit.roi_pool(x, rois, scale, 3, 3, "torchvision")
        assert torch.equal(out, ref) and torch.equal(arg, ref_arg) and torch.equal(values, ref)


def test_bfloat16_rounding_is_torchs():
    """The kernels' float32 -> bfloat16 (``narrow``) on the patterns that decide rounding to nearest even: ties
    below and above odd and even results, carries into the exponent, -FLT_MAX (-> -inf), +-inf, NaN, subnormals."""
    import numba as nb

    from roikit.ops.pytorch._numba_common import narrow

    @nb.njit
    def narrow_all(values, out):
        for i in range(values.shape[0]):
            out[i] = narrow(values[i], out)

    high = np.array([0x0000, 0x0001, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x8000, 0xBF80, 0xBF81, 0xFF7F, 0x007F,
                     0x7FC0, 0xFF80, 0x4049], dtype=np.uint32)
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234], dtype=np.uint32)
    bits = ((high[:, None] << 16) | low[None, :]).ravel()
    bits = np.concatenate([bits, np.random.default_rng(9).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)])
    values = bits.view(np.float32)
    out = np.empty(values.shape, np.uint16)
    narrow_all(values, out)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16)
    ours = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int16), expected[~nan].view(torch.int16))
