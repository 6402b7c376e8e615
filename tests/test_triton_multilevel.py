"""The fused multi-level RoIAlign Triton kernels (``roikit.ops.triton.multilevel_roi_align``), run on the CPU by
Triton's interpreter: the level rule and the reference against torchvision's MultiScaleRoIAlign, the kernels against
the reference (every dtype, channels-last, deterministic bits), the registered op (autograd, opcheck,
torch.compile), work bounded by the map. Shared inputs and helpers: ``triton_cases.py``.
"""
import importlib

import pytest
import torch
from triton_cases import ML, PH, PW, close, time_limit

from roikit.ops import _library
from roikit.ops.pytorch import roi_align as ref_align

ml_op = importlib.import_module("roikit.ops.multilevel_roi_align")  # the module (its function has its name)
ml_ref = importlib.import_module("roikit.ops.pytorch.multilevel_roi_align")

# log2(0) and sqrt(-1) of degenerate boxes are computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- multi-level RoIAlign
def make_pyramid(dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(1)
    sizes = [(16, 20), (8, 10), (4, 5)]  # strides 4, 8, 16 of a 64 x 80 image
    feats = [torch.randn(2, 3, h, w, generator=g).to(dtype) for h, w in sizes]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    return feats, [1 / 4, 1 / 8, 1 / 16]


def make_pyramid_boxes(dtype=torch.float32):
    per_image = [
        torch.tensor([[1.0, 2, 30, 40], [0, 0, 64, 64], [10, 10, 122, 122], [3, 4, 227, 228], [0, 0, 79, 63],
                      [50, 50, 40, 60], [7, 7, 7, 7]]),  # level edges: 112 and 224 px squares; reversed; empty
        torch.tensor([[5.0, 5, 20, 70], [0, 0, 300, 200], [1, 1, 2, 2], [60, 40, 500, 400]]),
    ]
    per_image = [b.to(dtype) for b in per_image]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=dtype), b], 1) for i, b in enumerate(per_image)])
    return per_image, rois


def test_multilevel_reference_matches_torchvision():
    """The op's default implementation against torchvision's MultiScaleRoIAlign on a small CPU pyramid."""
    torchvision = pytest.importorskip("torchvision")
    from collections import OrderedDict

    feats, scales = make_pyramid()
    boxes, rois = make_pyramid_boxes()
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4"], (PH, PW), 2)
    expected = pooler(OrderedDict(p2=feats[0], p3=feats[1], p4=feats[2]), boxes, [(64, 80)])
    assert pooler.scales == scales
    levels = pooler.map_levels(boxes)
    ours = ml_op.pyramid_levels(rois, scales)
    valid = ours >= 0  # torchvision leaves an undefined integer for a box with a NaN level (reversed side)
    assert torch.equal(ours[valid], levels[valid]) and not valid[5]
    # our level rule through the kernels' numpy math (the interpreter) gives the same levels
    assert torch.equal(ML.pyramid_levels(rois, scales).long(), ours)
    out = ml_op.multilevel_roi_align(feats, rois, (PH, PW), scales, 2)
    # the levels are torchvision's exactly; the values are roikit's RoIAlign, equal to torchvision's to rounding
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # box by box, each output is the single-level RoIAlign of its own level
    for k in range(rois.shape[0]):
        if ours[k] >= 0:
            single = torchvision.ops.roi_align(feats[ours[k]], rois[k:k + 1], (PH, PW), scales[ours[k]], 2)
            torch.testing.assert_close(out[k:k + 1], single, atol=1e-6, rtol=1e-6)
        else:
            assert not out[k].any()


@pytest.mark.parametrize("dtype,channels_last,aligned,sampling_ratio", [
    (torch.float32, False, False, 2), (torch.float32, True, True, -1), (torch.float16, True, False, 2),
    (torch.bfloat16, False, True, 2),
])
def test_multilevel_kernel(dtype, channels_last, aligned, sampling_ratio):
    feats, scales = make_pyramid(dtype, channels_last)
    _, rois = make_pyramid_boxes(dtype)
    assert torch.equal(ML.pyramid_levels(rois, scales).long(), ml_op.pyramid_levels(rois, scales))
    settings = (scales, PH, PW, sampling_ratio, aligned, 224, 4)
    expected = ml_ref.multilevel_roi_align_forward(feats, rois, *settings)
    out = ML.multilevel_roi_align_forward(feats, rois, *settings)
    close(out, expected, dtype, "output")
    grad = torch.randn(out.shape).to(dtype)
    shapes = ([f.shape[2] for f in feats], [f.shape[3] for f in feats])
    bwd = (grad, rois, scales, PH, PW, 2, 3, *shapes, sampling_ratio, aligned, 224, 4)
    expected_grads = ml_ref.multilevel_roi_align_backward(*bwd)
    for det in (False, True):
        for got, want in zip(ML.multilevel_roi_align_backward(*bwd, det), expected_grads):
            close(got, want, dtype, f"gradient, deterministic={det}")


def test_multilevel_single_map_and_deterministic_bits():
    feats, scales = make_pyramid()
    _, rois = make_pyramid_boxes()
    # one map: every box pools from it, as torchvision does (no level rule), even the reversed one
    out = ML.multilevel_roi_align_forward(feats[:1], rois, scales[:1], PH, PW, 2, False, 224, 4)
    expected, _ = ref_align.roi_align_forward(feats[0], rois, scales[0], PH, PW, 2, False, False)
    close(out, expected, torch.float32, "single map")
    grad = torch.randn_like(out)
    bwd = (grad, rois, scales, PH, PW, 2, 3, [16, 8, 4], [20, 10, 5], 2, False, 224, 4, True)
    first, second = ML.multilevel_roi_align_backward(*bwd), ML.multilevel_roi_align_backward(*bwd)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_multilevel_op_autograd_opcheck_compile():
    """The registered op on CPU: gradients for every map through autograd, torch.library's checks, torch.compile."""
    feats, scales = make_pyramid()
    _, rois = make_pyramid_boxes()
    leaves = [f.clone().requires_grad_() for f in feats]
    out = ml_op.multilevel_roi_align(leaves, rois, PH, scales, 2)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = ml_ref.multilevel_roi_align_backward(grad, rois, scales, PH, PH, 2, 3, [16, 8, 4], [20, 10, 5], 2,
                                                    False, 224, 4)
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, want)
    args = ([f.double().requires_grad_() for f in feats], rois.double(), scales, 2, 2, 2, False, 224, 4)
    torch.library.opcheck(_library.multilevel_roi_align_op, args, test_utils=("test_schema", "test_faketensor",
                                                                             "test_autograd_registration"))
    compiled = torch.compile(lambda fs: ml_op.multilevel_roi_align(fs, rois, PH, scales, 2), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(feats), out.detach())
    with pytest.raises(ValueError, match="spatial_scales"):
        ml_op.multilevel_roi_align(feats, rois, 2, scales[:2])
    with pytest.raises(ValueError, match="features"):
        ml_op.multilevel_roi_align([], rois, 2, [])



def test_multilevel_work_bounded_by_the_map():
    """The fused kernel pools with the same bounded loops (a 100,000 px box goes to the coarsest map)."""
    feats, scales = make_pyramid()
    rois = torch.tensor([[0, 0, 0, 1e5, 1e5], [1, 0, 0, 1e30, 1e30], [0, 5, 5, 20, 70]])
    settings = (scales, PH, PW, -1, True, 224, 4)
    with time_limit(60):
        out = ML.multilevel_roi_align_forward(feats, rois, *settings)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
        bwd = (grad, rois, scales, PH, PW, 2, 3, [16, 8, 4], [20, 10, 5], -1, True, 224, 4)
        got = [ML.multilevel_roi_align_backward(*bwd, det) for det in (False, True)]
    close(out, ml_ref.multilevel_roi_align_forward(feats, rois, *settings), torch.float32, "output")
    for grads in got:
        for g, want in zip(grads, ml_ref.multilevel_roi_align_backward(*bwd)):
            close(g, want, torch.float32, "gradient")

