"""deform_roi_pool's interface: dtypes, boxes as lists, determinism, empty inputs, bad input as ValueError,
torch.library (opcheck, torch.compile, autocast), the pack modules; hostile boxes and offsets in bounded memory."""
from __future__ import annotations

import math
import time

import pytest
import torch
from _helpers import assert_compiled_matches_eager, deform_case

from roikit.ops import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
    deterministic_backward,
    roi_align,
)


# ---------------------------------------------------------------- dtypes, batches, determinism, empties
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    """Half types are read and accumulated in float32 (float32 boxes keep the geometry exact): the result is the
    float32 op on the same (rounded) values, in the features' dtype; so are the gradients."""
    x, rois, offset = deform_case(seed=8, dtype=torch.float32)
    xh, oh = x.to(dtype).requires_grad_(), offset.to(dtype).requires_grad_()
    out = deform_roi_pool(xh, rois, oh, (3, 2), 0.5, 2)
    xf, of = xh.detach().float().requires_grad_(), oh.detach().float().requires_grad_()
    expected = deform_roi_pool(xf, rois, of, (3, 2), 0.5, 2)
    assert out.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 0.0}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    out.backward(grad)
    expected.backward(grad.float())
    assert xh.grad.dtype == oh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad.float(), xf.grad, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(oh.grad.float(), of.grad, atol=tol * 4, rtol=tol * 4)


def test_list_of_boxes_and_one_image_at_a_time():
    x, rois, offset = deform_case(seed=10)
    out = deform_roi_pool(x, rois, offset, (3, 2), 0.5, 2)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        single = deform_roi_pool(x[b:b + 1], [rois[k:k + 1, 1:]], offset[k:k + 1], (3, 2), 0.5, 2)
        torch.testing.assert_close(out[k:k + 1], single, atol=1e-13, rtol=0)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
    torch.testing.assert_close(deform_roi_pool(x, boxes, offset[order], (3, 2), 0.5, 2), out[order])


def test_backward_is_deterministic():
    x, rois, offset = deform_case(seed=11, dtype=torch.float32)
    grads = []
    for _ in range(2):
        xg, og = x.clone().requires_grad_(), offset.clone().requires_grad_()
        with deterministic_backward():
            deform_roi_pool(xg, rois, og, (3, 2), 0.5, 0).sum().backward()
        grads.append((xg.grad, og.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_no_boxes_and_empty_maps():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    offset = torch.zeros(0, 2, 3, 3, requires_grad=True)
    out = deform_roi_pool(x, torch.zeros(0, 5), offset, 3)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert not x.grad.any() and offset.grad.shape == (0, 2, 3, 3)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 4.0, 3.0]])
    for shape in [(2, 3, 0, 7), (2, 3, 6, 0), (2, 0, 6, 7)]:
        e = torch.zeros(shape, requires_grad=True)
        o = torch.ones(2, 2, 3, 3, requires_grad=True)
        out = deform_roi_pool(e, rois, o, 3)
        assert out.shape == (2, shape[1], 3, 3) and not out.any()
        out.sum().backward()
        assert e.grad.shape == shape and not o.grad.any()


# ---------------------------------------------------------------- bad input
def test_bad_input_is_a_value_error():
    x = torch.randn(2, 3, 6, 7)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 2.0, 4.0, 3.0]])
    good = torch.zeros(2, 2, 3, 3)
    cases = [
        (lambda: deform_roi_pool(x, rois, torch.zeros(2, 2, 3, 2), 3), r"offset must be None or a Tensor\[K, 2, PH"),
        (lambda: deform_roi_pool(x, rois, torch.zeros(3, 2, 3, 3), 3), r"\[2, 2, 3, 3\]"),
        (lambda: deform_roi_pool(x, rois, torch.zeros(2, 1, 3, 3), 3), "offset must be None"),
        (lambda: deform_roi_pool(x, rois, "offset", 3), "offset must be None"),
        (lambda: deform_roi_pool(x, rois, good.long(), 3), "offset must be a floating-point"),
        (lambda: deform_roi_pool(x, rois, good.to("meta"), 3), "offset is on meta"),
        (lambda: deform_roi_pool(x, rois, torch.full_like(good, math.nan), 3), "offset must be finite"),
        (lambda: deform_roi_pool(x, rois, torch.full_like(good, math.inf), 3), "offset must be finite"),
        (lambda: deform_roi_pool(x, rois[:, :4], None, 3), r"Tensor\[K, 5\]"),
        (lambda: deform_roi_pool(x, torch.tensor([[2.0, 0, 0, 1, 1]]), None, 3), r"must lie in \[0, 2\)"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=math.nan), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=math.inf), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma="0.1"), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, gamma=True), "gamma must be a finite number"),
        (lambda: deform_roi_pool(x, rois, good, 3, sampling_ratio=2.0), "sampling_ratio must be an int"),
        (lambda: deform_roi_pool(x, rois, good, 3, spatial_scale=0.0), "spatial_scale must be positive"),
        (lambda: deform_roi_pool(x, rois, good, (3, 0)), "output_size must be positive"),
        (lambda: deform_roi_pool(x[0], rois, good, 3), "4-D"),
        (lambda: DeformRoIPool(3, gamma=math.nan), "gamma must be a finite number"),
        (lambda: DeformRoIPoolPack(3, 4)(x, rois), "input has 3 channels but this DeformRoIPoolPack was built for "
                                                   "output_channels=4"),
        (lambda: DeformRoIPoolPack(3, 0), "output_channels must be >= 1"),
        (lambda: ModulatedDeformRoIPoolPack(3, 3, deform_fc_channels=1.5), "deform_fc_channels must be an int"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------- registration, compile, modules
def test_opcheck():
    x, rois, offset = deform_case(seed=12, k=4)
    op = torch.ops.roikit.deform_roi_pool.default
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, offset.clone().requires_grad_(), 0.5, 3, 2, 2, 0.1))
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, None, 0.5, 3, 2, 0, 0.1))
    torch.library.opcheck(op, (x.clone().requires_grad_(), rois, offset, 0.5, 3, 2, 2, 0.1))  # no offset grad


def test_torch_compile_fullgraph_matches_eager():
    x, rois, offset = deform_case(seed=13, dtype=torch.float32)

    def f(a, o):
        return deform_roi_pool(a, rois, o, (3, 2), 0.5, 2, 0.1)

    assert_compiled_matches_eager(f, x, offset, loss=lambda out: out.square().sum())


def test_pack_compiles_and_autocasts():
    torch.manual_seed(1)
    pool = DeformRoIPoolPack((3, 2), 3, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.nn.init.normal_(pool.offset_fc[-1].weight, std=0.1)
    x, rois, _ = deform_case(seed=14, dtype=torch.float32)
    torch.testing.assert_close(torch.compile(pool, fullgraph=True, backend="aot_eager")(x, rois), pool(x, rois))
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("roikit::deform_roi_pool", key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_roi_pool(x.bfloat16(), rois, torch.zeros(6, 2, 3, 2, dtype=torch.bfloat16), (3, 2), 0.5, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, roi_align(x.bfloat16().float(), rois, (3, 2), 0.5, 2, True).bfloat16(),
                               atol=0, rtol=0)


def test_pack_modules_structure_repr_and_mask():
    pack = ModulatedDeformRoIPoolPack((2, 3), 4, deform_fc_channels=6, spatial_scale=0.25, gamma=0.2)
    assert sorted(pack.state_dict()) == sorted(  # mmcv's names: its checkpoints load
        [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
        + [f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")])
    assert pack.offset_fc[4].out_features == 2 * 6 and pack.mask_fc[2].out_features == 6
    assert pack.offset_fc[0].in_features == pack.mask_fc[0].in_features == 4 * 6
    assert "output_size=(2, 3), spatial_scale=0.25, sampling_ratio=0, gamma=0.2, output_channels=4" in repr(pack)
    torch.manual_seed(2)
    for p in pack.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 4, 10, 12)
    rois = torch.tensor([[0, 2.0, 3.0, 30.0, 25.0], [0, 10.0, 1.0, 44.0, 39.0]])
    flat = deform_roi_pool(x, rois, None, (2, 3), 0.25, 0, 0.2).flatten(1)
    offset = pack.offset_fc(flat).view(2, 2, 2, 3)
    mask = torch.sigmoid(pack.mask_fc[:3](flat)).view(2, 1, 2, 3)
    expected = deform_roi_pool(x, rois, offset, (2, 3), 0.25, 0, 0.2) * mask
    torch.testing.assert_close(pack(x, rois), expected)
    plain = DeformRoIPool((2, 3), 0.25, 0, 0.2)
    assert repr(plain) == "DeformRoIPool(output_size=(2, 3), spatial_scale=0.25, sampling_ratio=0, gamma=0.2)"
    torch.testing.assert_close(plain(x, rois, offset), expected / mask)


# ---------------------------------------------------------------- hostile boxes and offsets
HOSTILE = [  # (box in px on a 20 x 20 map at scale 1, sampling_ratio, offset value)
    ([0, 0, 0, 1e4, 1e4], 0, 0.0),  # 10,000 px, adaptive: 1429 samples a bin and axis, about 22 on the map
    ([0, 0, 0, 1e4, 1e4], 0, -0.05),  # the same, its bins moved back onto the map
    ([0, 0, 0, 1e30, 1e30], 0, 0.0),  # MAX_GRID samples a bin and axis
    ([0, -1e30, -1e30, 1e30, 1e30], 1000, 1e30),  # offsets overflow float32: inf * 0 = NaN corners, off the map
    ([0, 2, 3, 15, 12], 1000, 1e6),  # an ordinary box moved a million boxes away
    ([0, 2, 3, 15, 12], 5, 0.2),  # ordinary
]


@pytest.mark.parametrize("box, sampling_ratio, value", HOSTILE,
                         ids=["10k_px", "10k_px_moved", "1e30_px", "1e30_offsets", "1e6_offsets", "ordinary"])
def test_hostile_boxes_and_offsets_bounded(peak_memory, box, sampling_ratio, value):
    """Memory and time follow the map, not the box or its offsets: peak under 128 MiB (a box-sized table would
    take gigabytes) and a few seconds. Values: a bin moved off the map is 0; at offset 0 the result is roi_align's
    (the row-times-column path, tested against torchvision there)."""
    x = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(15))
    rois = torch.tensor([box], dtype=torch.float32)
    offset = torch.full((1, 2, 7, 7), value).requires_grad_()
    xg = x.clone().requires_grad_()
    deform_roi_pool(x[:, :, :4, :4], rois, offset.detach(), 7, 1.0, sampling_ratio)  # warm-up

    def run():
        out = deform_roi_pool(xg, rois, offset, 7, 1.0, sampling_ratio)
        out.backward(torch.ones_like(out))
        return out

    start = time.perf_counter()
    out, extra, _ = peak_memory(run)
    seconds = time.perf_counter() - start
    assert extra < 128 * 2**20, f"{extra / 2**20:.0f} MiB"
    assert seconds < 20.0, f"{seconds:.1f} s"
    assert out.shape == (1, 8, 7, 7) and bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(xg.grad).all()) and bool(torch.isfinite(offset.grad).all())
    if abs(value) >= 1e6:
        assert not out.any() and not xg.grad.any() and not offset.grad.any()
    if value == 0.0:
        torch.testing.assert_close(out, roi_align(x, rois, 7, 1.0, sampling_ratio, True), atol=1e-5, rtol=1e-5)
