"""What every op shares: input checks, torch.library registration (opcheck, torch.compile), determinism."""
import pytest
import torch
import torch.fx
import torchvision
from _helpers import assert_compiled_matches_eager

from roikit.ops import (
    PrRoIPool,
    RoIAlign,
    deform_roi_pool,
    deterministic_backward,
    multilevel_roi_align,
    prroi_pool,
    roi_align,
    roi_pool,
    roi_spp,
)

OPS = {
    "roi_pool": lambda x, b, **kw: roi_pool(x, b, 3, 0.5, **kw),
    "roi_pool_integer": lambda x, b, **kw: roi_pool(x, b, 3, 0.5, rounding="integer", **kw),
    "roi_align": lambda x, b, **kw: roi_align(x, b, 3, 0.5, 2, True, **kw),
    "roi_align_max": lambda x, b, **kw: roi_align(x, b, 3, 0.5, 2, False, pool="max", **kw),
    "prroi_pool": lambda x, b, **kw: prroi_pool(x, b, 3, 0.5, **kw),
    "roi_spp": lambda x, b, **kw: roi_spp(x, b, spatial_scale=0.5, **kw),
    "deform_roi_pool": lambda x, b, **kw: deform_roi_pool(x, b, None, 3, 0.5, 2, **kw),  # offsets: its own file
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
        (torch.zeros(2, 5, dtype=torch.int64), "floating-point"),
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
    assert_compiled_matches_eager(lambda t: OPS[name](t, rois), x)


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


# ---------------------------------------------------------------- hardening: maps, flags, autocast, fx, repr
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", [(2, 3, 0, 12), (2, 3, 10, 0), (2, 0, 10, 12)], ids=["H=0", "W=0", "C=0"])
def test_empty_map_gives_zeros_and_a_zero_gradient(name, shape):
    _, rois = inputs()
    x = torch.zeros(shape, requires_grad=True)
    out = OPS[name](x, rois)
    c = shape[1]
    assert out.shape == ((3, c * 50) if name == "roi_spp" else (3, c, 3, 3))
    assert not out.any()  # every bin is empty: 0, as a bin off the map
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("call", [
    lambda x, b: roi_align(x, b, 3, aligned="False"),
    lambda x, b: roi_align(x, b, 3, aligned=1),
    lambda x, b: prroi_pool(x, b, 3, aligned="nope"),
    lambda x, b: multilevel_roi_align([x], b, 3, [1.0], aligned=0),
    lambda x, b: RoIAlign(3, aligned="True"),
    lambda x, b: PrRoIPool(3, aligned=None),
])
def test_flags_must_be_bools(call):
    x, rois = inputs()
    with pytest.raises(ValueError, match="aligned must be True or False"):
        call(x, rois)


AUTOCAST_OPS = dict(OPS, multilevel=lambda x, b: multilevel_roi_align([x, x[:, :, ::2, ::2]], b, 3, [0.5, 0.25], 2))


@pytest.mark.parametrize("name", list(AUTOCAST_OPS))
def test_autocast_runs_in_float32_as_torchvision(name):
    """Under CPU autocast (bfloat16) the ops run in float32 and answer in the features' dtype (torchvision's rule),
    also when features and boxes differ in dtype; the result equals the float32 op's."""
    x, rois = inputs()
    f = AUTOCAST_OPS[name]
    expected = f(x, rois)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = f(x, rois)  # float32 in: float32 out
        mixed = f(x.bfloat16(), rois)  # bfloat16 features (a conv's output under autocast), float32 boxes
        for_tv = torchvision.ops.roi_align(x.bfloat16(), rois, 3, 0.5, 2, True)
    assert same.dtype == torch.float32 and mixed.dtype == for_tv.dtype == torch.bfloat16
    torch.testing.assert_close(same, expected, atol=0, rtol=0)
    torch.testing.assert_close(mixed, f(x.bfloat16().float(), rois).bfloat16(), atol=0, rtol=0)


def test_autocast_is_registered_for_cpu_and_cuda():
    for op in ("roi_pool", "roi_align", "prroi_pool", "multilevel_roi_align"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roikit::{op}", key), (op, key)
    x, rois = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the registered op itself casts to float32
        out, _ = torch.ops.roikit.roi_align(x.bfloat16(), rois, 0.5, 3, 3, 2, True, False)
    assert out.dtype == torch.float32


class _Regions(torch.nn.Module):
    """A model holding roikit ops, called from the user's own module with a list of boxes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.align = RoIAlign(3, 0.5, 2, aligned=True)

    def forward(self, x, rois, boxes: list[torch.Tensor]):
        f = self.conv(x)
        return (self.align(f, rois).sum((2, 3)) + roi_pool(f, boxes, 3, 0.5).amax((2, 3))
                + prroi_pool(f, rois, 2, 0.5).mean((2, 3)) + roi_spp(f, rois, (1, 2), 0.5)[:, :3]
                + multilevel_roi_align([f, f[:, :, ::2, ::2]], rois, 2, [0.5, 0.25]).sum((2, 3)))


def test_fx_traces_every_op_as_a_leaf():
    model = _Regions()
    x, rois = inputs()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    traced = torch.fx.symbolic_trace(model)
    called = {getattr(n.target, "__name__", None) for n in traced.graph.nodes if n.op == "call_function"}
    assert {"roi_align", "roi_pool", "prroi_pool", "roi_spp", "multilevel_roi_align"} <= called
    torch.testing.assert_close(traced(x, rois, boxes), model(x, rois, boxes), atol=0, rtol=0)


@pytest.mark.parametrize("op, names, options", [
    ("roi_align", ["0"], {"aligned": True}), ("roi_align", ["0", "1"], {}), ("roi_pool", ["0", "1"], {}),
    ("roi_spp", ["0"], {"levels": (1, 2)}), ("prroi_pool", ["0", "1"], {}),
])
def test_fx_traces_a_detector_region_path_with_roipooler(op, names, options):
    """Backbone -> RoIPooler -> box head, as in the detector; traced by torch.fx (as torchvision's pooler is)."""
    from roikit.layers import RoIPooler
    from roikit.modeling import FastRCNNConvFCHead

    class RegionPath(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.pooler = RoIPooler(names, 4, 2, op, **options)
            self.head = FastRCNNConvFCHead(input_shape=self.pooler.output_shape(4), fc_dims=(8,))

        def forward(self, images, proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
            f = self.backbone(images)
            return self.head(self.pooler({"0": f, "1": f[:, :, ::2, ::2]}, proposals, image_shapes))

    torch.manual_seed(0)
    model = RegionPath().eval()
    images = torch.randn(2, 3, 64, 64)
    proposals = [torch.tensor([[1.0, 2, 40, 30], [0, 0, 63, 63]]), torch.tensor([[5.0, 5, 20, 50]])]
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(images, proposals, [(64, 64)] * 2), model(images, proposals, [(64, 64)] * 2),
                               atol=0, rtol=0)


def test_roipooler_repr_shows_sampling_ratio_and_takes_it_once():
    import copy

    from roikit.engine.config import DEFAULTS
    from roikit.layers import RoIPooler
    from roikit.modeling.detector import build_pooler

    text = repr(RoIPooler(["0", "1"], 7, sampling_ratio=0, op="roi_align", aligned=True))
    assert "sampling_ratio=0" in text and "aligned=True" in text
    cfg = copy.deepcopy(DEFAULTS)
    cfg["model"]["pooler"]["options"] = {"sampling_ratio": 0}  # a second place to set it: refused
    with pytest.raises(ValueError, match="sampling_ratio"):
        build_pooler(cfg, ["0"])


def test_argmax_lands_on_the_input_device():
    """The plain-PyTorch kernels make every tensor on the input's device (it is also the CUDA fallback)."""
    from roikit.ops.pytorch.roi_align import roi_align_forward
    from roikit.ops.pytorch.roi_pool import roi_pool_forward

    x, rois = torch.empty(2, 3, 10, 12, device="meta"), torch.empty(0, 5, device="meta")
    for pool_max in (False, True):
        out, argmax = roi_align_forward(x, rois, 0.5, 3, 3, 2, True, pool_max)
        assert out.device.type == argmax.device.type == "meta"
    out, argmax = roi_pool_forward(x, rois, 0.5, 3, 3, "torchvision")
    assert out.device.type == argmax.device.type == "meta"


# The boxes' value check (roikit.ops._utils.check_roi_values): CPU float32 / float64 boxes take one numba pass
# where numba imports, numpy's reductions where it does not; both must give the same verdict and the same error.
_HOSTILE_INDEX = [0.0, 1.0, -0.0, 0.5, 1.5, -1.0, 2.0, 1.9999999, 2.0 - 2**-23, 1e30, float("nan"), float("inf"),
                  -float("inf")]
_HOSTILE_CELL = [3.0, float("nan"), float("inf"), -float("inf"), 1e38]


def _value_error(rois, batch_size):
    from roikit.ops._utils import check_roi_values
    try:
        check_roi_values(rois, batch_size, "rois")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_value_check_numba_matches_numpy(dtype, monkeypatch):
    pytest.importorskip("numba")
    from roikit.ops import _utils
    cases = []
    for index in _HOSTILE_INDEX:
        for cell in _HOSTILE_CELL:
            for row in (0, 2):  # the first row, or a later one after good rows
                rois = torch.tensor([[0.0, 1, 2, 5, 6], [1.0, 0, 0, 3, 3], [1.0, 2, 2, 9, 9]], dtype=dtype)
                rois[row, 0], rois[row, 3] = index, cell
                cases.append(rois)
    cases.append(cases[5].t().contiguous().t())  # any strides
    # hand-computed verdicts: an integer index in [0, 2) and finite cells pass
    assert _value_error(cases[0], 2) is None  # index 0.0, cell 3.0
    assert "must be finite; row 0" in _value_error(cases[2], 2)  # cell NaN
    assert "must hold integer values; row 0 has 0.5" in _value_error(cases[3 * 10], 2)  # index 0.5
    assert "must lie in [0, 2); row 2 has 2" in _value_error(cases[6 * 10 + 1], 2)  # index 2.0, second row
    numba_verdicts = [(_value_error(r, n), _utils._rois_pass(r, n)) for r in cases for n in (1, 2)]
    monkeypatch.setattr(_utils, "numba_module", lambda name: None)  # numba not importable: numpy's pass
    numpy_verdicts = [(_value_error(r, n), _utils._rois_pass(r, n)) for r in cases for n in (1, 2)]
    assert numba_verdicts == numpy_verdicts
    assert sum(v[1] for v in numba_verdicts) >= 8 and sum(not v[1] for v in numba_verdicts) >= 100
