"""The ``torch.library`` registration of every region op, with its fake kernel, autograd and autocast, in one place.

Each op is a forward custom op and a backward custom op (so torch.compile, ``opcheck`` and autograd all see
through them). The default implementation is the plain-PyTorch one in ``roikit.ops.pytorch``, which runs on any
device; on CUDA tensors the ops run the Triton kernels of ``roikit.ops.triton`` when Triton is there.

One module per op family registers its ops (``roi_pool``, ``roi_align`` with its box gradient, ``prroi_pool``,
``multilevel``, ``ps_roi``, ``rotated``, ``deform``); ``_common`` holds what they share. Every op and the
deterministic-backward switch are importable from here.
"""
from ._common import deterministic_backward, deterministic_backward_enabled
from .deform import deform_roi_pool_backward_op, deform_roi_pool_op
from .multilevel import multilevel_roi_align_backward_op, multilevel_roi_align_op
from .prroi_pool import prroi_pool_backward_op, prroi_pool_op
from .ps_roi import ps_roi_align_backward_op, ps_roi_align_op, ps_roi_pool_backward_op, ps_roi_pool_op
from .roi_align import roi_align_backward_op, roi_align_box_grad_op, roi_align_box_op, roi_align_op
from .roi_pool import roi_pool_backward_op, roi_pool_op
from .rotated import roi_align_rotated_backward_op, roi_align_rotated_op

__all__ = [
    "deform_roi_pool_backward_op", "deform_roi_pool_op", "deterministic_backward", "deterministic_backward_enabled",
    "multilevel_roi_align_backward_op", "multilevel_roi_align_op", "prroi_pool_backward_op", "prroi_pool_op",
    "ps_roi_align_backward_op", "ps_roi_align_op", "ps_roi_pool_backward_op", "ps_roi_pool_op",
    "roi_align_backward_op", "roi_align_box_grad_op", "roi_align_box_op", "roi_align_op",
    "roi_align_rotated_backward_op", "roi_align_rotated_op", "roi_pool_backward_op", "roi_pool_op",
]
