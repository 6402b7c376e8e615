"""What every op shares: input checks, torch.library registration (opcheck, torch.compile), determinism."""
import pytest
import torch

from roikit.ops import deterministic_backward, prroi_pool, roi_align, roi_pool, roi_spp

OPS = {
    "roi_pool": lambda x, b, **kw: roi_pool(x, b, 3, 0.5, **kw),
    "roi_pool_integer": lambda x, b, **kw: roi_pool(x, b, 3, 0.5, rounding="integer", **kw),
    "roi_align": lambda x, b, **kw: roi_align(x, b, 3, 0.5, 2, True, **kw),
    "roi_align_max": lambda x, b, **kw: roi_align(x, b, 3, 0.5, 2, False, pool="max", **kw),
    "prroi_pool": lambda x, b, **kw: prroi_pool(x, b, 3, 0.5, **kw),
    "roi_spp": lambda x, b, **kw: roi_spp(x, b, spatial_scale=0.5, **kw),
}


def inputs(dtype=torch.float32):
    x = torch.randn(2, 3, 10, 12, dtype=dtype)
    rois = torch.tensor([[0, 1.0, 2.0, 15.0, 17.0], [1, 4.0, 0.5, 20.0, 9.0], [1, -3.0, 5.0, 8.0, 30.0]], dtype=dtype)
    return x, rois


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize(
    "boxes, message",
    [
        (torch.zeros(3, 4), r"Tensor\[K, 5\]"),
        (torch.tensor([[2.0, 0, 0, 1, 1]]), r"batch index and must lie in \[0, 2\)"),
        (torch.tensor([[-1.0, 0, 0, 1, 1]]), r"must lie in \[0, 2\)"),
        (torch.tensor([[0.5, 0, 0, 1, 1]]), "integer values"),
        (torch.tensor([[0.0, 0, float("nan"), 1, 1]]), "finite"),
        (torch.tensor([[0.0, 0, 0, float("inf"), 1]]), "finite"),
        (torch.zeros(2, 5, dtype=torch.float64), "dtype"),
        ([torch.zeros(1, 4)], "list of 1 tensors but input has a batch of 2"),
        ([torch.zeros(1, 4), torch.zeros(1, 5)], r"boxes\[1\] must be a Tensor\[L, 4\]"),
        ("boxes", "must be a Tensor"),
    ],
)
def test_bad_boxes(name, boxes, message):
    x, _ = inputs()
    with pytest.raises(ValueError, match=message):
        OPS[name](x, boxes)


def test_bad_features_and_settings():
    x, rois = inputs()
    with pytest.raises(ValueError, match="4-D"):
        roi_align(x[0], rois, 3)
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        roi_pool(x.long(), rois.long(), 3)
    with pytest.raises(ValueError, match="on meta but input is on cpu"):
        roi_align(x, rois.to("meta"), 3)
    with pytest.raises(ValueError, match="output_size must be positive"):
        roi_pool(x, rois, (0, 3))
    with pytest.raises(ValueError, match="output_size must be a positive int or a pair"):
        prroi_pool(x, rois, (1, 2, 3))
    with pytest.raises(ValueError, match="spatial_scale must be positive"):
        roi_align(x, rois, 3, spatial_scale=0.0)
    with pytest.raises(ValueError, match="spatial_scale must be positive"):
        roi_pool(x, rois, 3, spatial_scale=-1 / 16)
    with pytest.raises(ValueError, match="rounding must be one of 'torchvision', 'integer'"):
        roi_pool(x, rois, 3, rounding="nearest")
    with pytest.raises(ValueError, match="pool must be one of 'avg', 'max'"):
        roi_align(x, rois, 3, pool="sum")
    with pytest.raises(ValueError, match="sampling_ratio must be an int"):
        roi_align(x, rois, 3, sampling_ratio=1.5)


@pytest.mark.parametrize("name", list(OPS))
def test_several_images_equal_one_image_at_a_time(name):
    x, rois = inputs()
    out = OPS[name](x, rois)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        single = OPS[name](x[b:b + 1], torch.cat([torch.zeros(1, 1), rois[k:k + 1, 1:]], 1))
        torch.testing.assert_close(out[k:k + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(OPS))
def test_backward_is_deterministic(name):
    x, rois = inputs()
    grads = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        with deterministic_backward():
            out = OPS[name](xg, rois)
        out.backward(torch.ones_like(out))
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])


def _opcheck_cases():
    x, rois = inputs(torch.float64)
    ops = torch.ops.roikit
    yield "roi_pool", ops.roi_pool.default, (x, rois, 0.5, 3, 2, "torchvision")
    yield "roi_pool_integer", ops.roi_pool.default, (x, rois, 0.5, 3, 2, "integer")
    yield "roi_align", ops.roi_align.default, (x, rois, 0.5, 3, 2, 2, True, False)
    yield "roi_align_max", ops.roi_align.default, (x, rois, 0.5, 3, 2, -1, False, True)
    yield "prroi_pool", ops.prroi_pool.default, (x, rois, 0.5, 3, 2, False)


@pytest.mark.parametrize("case", list(_opcheck_cases()), ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    x = args[0].clone().requires_grad_()
    rois = args[1].clone().requires_grad_(op is torch.ops.roikit.prroi_pool.default)
    torch.library.opcheck(op, (x, rois, *args[2:]))


@pytest.mark.parametrize("name", list(OPS))
def test_torch_compile_fullgraph_matches_eager(name):
    x, rois = inputs()
    f = OPS[name]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = f(xe, rois), compiled(xc, rois)
    torch.testing.assert_close(comp, eager, atol=0, rtol=0)
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=0, rtol=0)


def test_torch_compile_inductor_roi_align_in_a_model():
    x, rois = inputs()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))

    def f(t):
        return roi_align(model(t), rois, 3, 0.5, 2, True).relu().sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("name", list(OPS))
def test_no_boxes_gives_an_empty_result_and_a_zero_gradient(name):
    x, _ = inputs()
    x.requires_grad_()
    out = OPS[name](x, torch.zeros(0, 5))
    expected = (0, 3 * 50) if name == "roi_spp" else (0, 3, 3, 3)
    assert out.shape == expected
    out.sum().backward()
    assert x.grad is not None and not x.grad.any()
