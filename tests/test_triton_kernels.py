"""The Triton kernels as a whole: every launcher with no boxes, the CUDA registration, importing roikit without
Triton, and every kernel compiled for a GPU (sm_90) without one.

The kernels of each op family are tested on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``) against the
plain-PyTorch reference in their own files: ``test_triton_roi_align.py``, ``test_triton_roi_pool.py`` (and RoISPP),
``test_triton_prroi_pool.py``, ``test_triton_multilevel.py``, ``test_triton_ps_roi.py``, and the Triton cases of
``test_roi_align_rotated_api.py``, ``test_deform_roi_pool_triton.py`` and ``test_roi_align_box_grad.py``. Shared inputs and
helpers: ``triton_cases.py``.
"""
import subprocess
import sys

import pytest
import torch
from triton_cases import ML, PH, PR, PW, RA, RP, SCALE, compile_for_sm90, make_input, make_rois

# log2(0) and sqrt(-1) of degenerate boxes are computed in numpy by the interpreter, which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- every launcher with no boxes
def test_no_boxes():
    x, rois = make_input(), make_rois()[:0]
    out, arg = RA.roi_align_forward(x, rois, SCALE, PH, PW, 2, False, True)
    assert out.shape == (0, 3, PH, PW) and arg.shape == (0, 3, PH, PW)
    grad = out.new_zeros(out.shape)
    for det in (False, True):
        assert torch.equal(RA.roi_align_backward(grad, rois, arg, SCALE, PH, PW, 2, 3, 7, 13, 2, False, True, det),
                           torch.zeros(2, 3, 7, 13))
        assert torch.equal(RP.roi_pool_backward(grad, rois, arg, 2, 3, 7, 13, det), torch.zeros(2, 3, 7, 13))
        gi, gr = PR.prroi_pool_backward(grad, x, rois, SCALE, PH, PW, False, det)
        assert torch.equal(gi, torch.zeros(2, 3, 7, 13)) and gr.shape == (0, 5)
    assert RP.roi_pool_forward(x, rois, SCALE, PH, PW, "integer")[0].shape == (0, 3, PH, PW)
    assert PR.prroi_pool_forward(x, rois, SCALE, PH, PW, True).shape == (0, 3, PH, PW)
    assert RP.roi_spp_forward(x, rois, (1, 2), SCALE, "torchvision").shape == (0, 15)
    pyramid = [x, x[:, :, ::2, ::2].contiguous()]
    assert ML.multilevel_roi_align_forward(pyramid, rois, [0.25, 0.125], PH, PW, 2, False, 224, 4).shape == \
        (0, 3, PH, PW)
    grads = ML.multilevel_roi_align_backward(grad, rois, [0.25, 0.125], PH, PW, 2, 3, [7, 4], [13, 7], 2, False,
                                             224, 4, True)
    assert [tuple(g.shape) for g in grads] == [(2, 3, 7, 13), (2, 3, 4, 7)] and all(not g.any() for g in grads)



# ---------------------------------------------------------------- registration
def test_cuda_kernels_registered():
    for op in ("roi_pool", "roi_pool_backward", "roi_align", "roi_align_backward", "prroi_pool",
               "prroi_pool_backward", "multilevel_roi_align", "multilevel_roi_align_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roikit::{op}", "CUDA"), op


def test_import_without_triton():
    """Importing roikit imports no kernel module; without Triton everything still imports and runs on the CPU."""
    code = (
        "import sys\n"
        "import torch, roikit.ops\n"
        "assert not [m for m in sys.modules if m.startswith('roikit.ops.triton.')], 'kernels imported eagerly'\n"
        "sys.modules['triton'] = None  # as if not installed: find_spec gives None, import raises ImportError\n"
        "from roikit.ops import triton as t\n"
        "assert t.kernels('roi_align') is None\n"
        "x = torch.randn(1, 2, 5, 5)\n"
        "print(roikit.ops.roi_align(x, torch.tensor([[0, 0., 0., 4., 4.]]), 2).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 2, 2, 2])" in done.stdout


# ---------------------------------------------------------------- compiled for a GPU, without one
# Every launcher run on CPU tensors with each kernel launch compiled for sm_90 instead (triton_cases.compile_for_sm90):
# roi_align, roi_pool, prroi_pool, multilevel_roi_align, roi_align_rotated and deform_roi_pool here, ps_roi and
# roi_align's box gradient in test_triton_ps_roi.py.
LAUNCHES = r'''
from roikit.ops.triton import roi_align as RA, roi_pool as RP, prroi_pool as PR, multilevel_roi_align as ML
from roikit.ops.triton import roi_align_rotated as RR, deform_roi_pool as DF

rois = torch.tensor([[0, 1.0, 1.5, 30.3, 20.2], [1, 0, 0, 52, 28]])
rrois = torch.tensor([[0, 10.0, 8.0, 20.0, 12.0, 30.0], [1, 26.0, 14.0, 52.0, 28.0, 180.0]])
for x in (torch.randn(2, 3, 7, 13), torch.randn(2, 1, 1, 13)):  # the second: C = H = 1, specialized
    n, c, h, w = x.shape
    RA.roi_align_forward(x.contiguous(memory_format=torch.channels_last), rois, 0.25, 7, 7, -1, False, True)
    for pm in (False, True):
        out, arg = RA.roi_align_forward(x, rois, 0.25, 7, 7, 2, True, pm)
        for det in (False, True):
            RA.roi_align_backward(out, rois, arg, 0.25, 7, 7, n, c, h, w, 2, True, pm, det)
    for rounding in ("torchvision", "integer"):
        out, arg = RP.roi_pool_forward(x.half(), rois.half(), 0.25, 7, 7, rounding)
    arg = torch.zeros(out.shape, dtype=torch.int64)
    for det in (False, True):
        RP.roi_pool_backward(out, rois, arg, n, c, h, w, det)
    out = PR.prroi_pool_forward(x, rois, 0.25, 7, 7, True)
    for det in (False, True):
        PR.prroi_pool_backward(out, x, rois, 0.25, 7, 7, True, det)
    feats = [x.bfloat16(), x[:, :, ::2, ::2].contiguous().bfloat16()]
    r16 = rois.bfloat16()
    out = ML.multilevel_roi_align_forward(feats, r16, [0.25, 0.125], 7, 7, 1, False, 224, 4)
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    for det in (False, True):
        ML.multilevel_roi_align_backward(out, r16, [0.25, 0.125], 7, 7, n, c, heights, widths, 1, False, 224, 4, det)
    out = RR.roi_align_rotated_forward(x, rrois, 0.25, 3, 2, -1, False, True, False)
    for det in (False, True):
        RR.roi_align_rotated_backward(out, rrois, 0.25, 3, 2, -1, False, True, False, n, c, h, w, det)
    offset = torch.zeros(2, 2, 3, 5)
    out = DF.deform_roi_pool_forward(x, rois, offset, 0.25, 3, 5, 2, 0.1)
    for det in (False, True):
        DF.deform_roi_pool_backward(out, x, rois, offset, 0.25, 3, 5, 2, 0.1, True, det)
'''


def test_kernels_compile_for_sm90():
    compile_for_sm90(LAUNCHES)
