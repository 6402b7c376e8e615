"""The PrRoIPool Triton kernels (``roikit.ops.triton.prroi_pool``), run on the CPU by Triton's interpreter, against
the plain-PyTorch reference: outputs, feature and box gradients (atomic and deterministic backward) in every dtype,
contiguous and channels-last maps; non-finite cells, tiny bins, work bounded by the map. Shared inputs and helpers:
``triton_cases.py``.
"""
import pytest
import torch
from triton_cases import (
    NON_FINITE_ROIS,
    PH,
    PR,
    PW,
    SCALE,
    assert_same_non_finite,
    close,
    make_input,
    make_rois,
    non_finite_map,
    small_map,
    time_limit,
)

from roikit.ops.pytorch import prroi_pool as ref_prroi

# log2(0) and sqrt(-1) of degenerate boxes are computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- prroi_pool
@pytest.mark.parametrize("aligned", [False, True])
def test_prroi_pool_float32(aligned):
    x, rois = make_input(), make_rois()
    out_ref = ref_prroi.prroi_pool_forward(x, rois, SCALE, PH, PW, aligned)
    out = PR.prroi_pool_forward(x, rois, SCALE, PH, PW, aligned)
    close(out, out_ref, torch.float32, "output")
    grad = torch.randn_like(out_ref)
    gi_ref, gr_ref = ref_prroi.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, aligned)
    for det in (False, True):
        gi, gr = PR.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, aligned, det)
        close(gi, gi_ref, torch.float32, f"feature gradient, deterministic={det}")
        close(gr, gr_ref, torch.float32, f"box gradient, deterministic={det}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prroi_pool_half_channels_last(dtype, monkeypatch):
    x, rois = make_input(dtype, channels_last=True), make_rois(dtype)[[0, 1, 3, 6]]
    out_ref = ref_prroi.prroi_pool_forward(x, rois, SCALE, PH, PW, True)
    out = PR.prroi_pool_forward(x, rois, SCALE, PH, PW, True)
    close(out, out_ref, dtype, "output")
    grad = torch.randn(out.shape).to(dtype)
    gi_ref, gr_ref = ref_prroi.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, True)
    monkeypatch.setattr(PR, "MAX_ENTRIES", 200)  # several chunks
    gi, gr = PR.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, True, True)
    assert gi.dtype == dtype and gr.dtype == dtype
    close(gi, gi_ref, dtype, "feature gradient")
    close(gr, gr_ref, dtype, "box gradient")
    assert torch.equal(PR.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, True, True)[0], gi)



# ---------------------------------------------------------------- hostile inputs
@pytest.mark.parametrize("aligned", [False, True])
def test_prroi_pool_non_finite_cells(aligned):
    """A bin is non-finite only if it weighs a non-finite cell (a non-zero weight): the reference's rule."""
    x = non_finite_map()
    out = PR.prroi_pool_forward(x, NON_FINITE_ROIS, 1.0, 2, 3, aligned)
    expected = ref_prroi.prroi_pool_forward(x, NON_FINITE_ROIS, 1.0, 2, 3, aligned)
    assert_same_non_finite(out, expected, "prroi_pool")
    assert out.isfinite().any() and not out.isfinite().all()


def test_prroi_pool_tiny_bins():
    """The weights as the mean of the tent by pieces: no cancellation for a 1e-7-cell box or spatial_scale=1e-30
    (the integral difference gave 0.204 for 0.418, and 0)."""
    x = small_map(seed=4)
    a = torch.tensor(1.3)
    b = torch.nextafter(a, torch.tensor(2.0))  # 1.2e-7 px wide
    tiny = torch.stack([torch.tensor(0.0), a, a, b, b])[None]
    for rois, scale in ((tiny, 1.0), (torch.tensor([[0.0, 10, 20, 30, 40]]), 1e-30),
                        (torch.tensor([[0.0, 2.25, 3.5, 2.25, 7.5]]), 1.0)):  # and zero width: 0
        for aligned in (False, True):
            out = PR.prroi_pool_forward(x, rois, scale, 2, 2, aligned)
            expected = ref_prroi.prroi_pool_forward(x, rois, scale, 2, 2, aligned)
            close(out, expected, torch.float32, f"scale={scale}, aligned={aligned}")
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
            gi_ref, gr_ref = ref_prroi.prroi_pool_backward(grad, x, rois, scale, 2, 2, aligned)
            for det in (False, True):
                gi, gr = PR.prroi_pool_backward(grad, x, rois, scale, 2, 2, aligned, det)
                close(gi, gi_ref, torch.float32, f"feature gradient, scale={scale}")
                torch.testing.assert_close(gr, gr_ref, atol=2e-4, rtol=1e-4, msg=f"box gradient, scale={scale}")
    # a tiny box averages the surface at its point: the bilinear interpolation at (1.3, 1.3)
    at = x[0, :, 1:3, 1:3].double()
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    torch.testing.assert_close(PR.prroi_pool_forward(x, tiny, 1.0, 1, 1, False).double().flatten(),
                               torch.einsum("i,cij,j->c", w, at, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(PR.prroi_pool_forward(x, torch.tensor([[0.0, 10, 20, 30, 40]]), 1e-30, 1, 1, False),
                               x[:, :, :1, :1])  # every bin at cell (0, 0)


@pytest.mark.parametrize("box", [[0, 0, 0, 1e4, 1e4], [0, -5e3, -5e3, 4.5, 10], [0, -1e30, 2, 1e30, 1e30]],
                         ids=["10k_px", "partly", "1e30_px"])
def test_prroi_pool_work_bounded_by_the_map(box):
    """Each bin reads the cells of the map its tent reaches, not floor(bin) + 3 of them."""
    x, rois = small_map(seed=6), torch.tensor([box])
    with time_limit(60):
        out = PR.prroi_pool_forward(x, rois, 1.0, 7, 7, False)
        grad = torch.ones_like(out)
        got = [PR.prroi_pool_backward(grad, x, rois, 1.0, 7, 7, False, det) for det in (False, True)]
    expected = ref_prroi.prroi_pool_forward(x, rois, 1.0, 7, 7, False)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-4)
    gi_ref, gr_ref = ref_prroi.prroi_pool_backward(grad, x, rois, 1.0, 7, 7, False)
    for gi, gr in got:
        torch.testing.assert_close(gi, gi_ref, atol=1e-9, rtol=1e-4)
        torch.testing.assert_close(gr, gr_ref, atol=1e-9, rtol=1e-3)
