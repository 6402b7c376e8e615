"""Bilinear pooling (Lin et al., "Bilinear CNN Models for Fine-grained Visual Recognition", ICCV 2015) and its
compact form by Tensor Sketch (Gao et al., "Compact Bilinear Pooling", CVPR 2016).

Full form: for feature maps ``x`` [N, C1, H, W] and ``y`` [N, C2, H, W] (``y = x`` when omitted),

    B = (1 / HW) sum_p x_p y_p^T          # [N, C1, C2], x_p = x[:, :, p]: second-order statistics
    z = sign(B) sqrt(|B| + eps)            # signed square root (optional)
    z = z / ||z||_2                        # L2 normalisation (optional)

flattened to [N, C1 * C2]. Order-less and translation-invariant like average pooling, but it keeps which
channels fire *together*: the fine-grained head (birds, cars, textures). Its size grows as C1 * C2
(512 x 512 = 262,144), hence the compact form.

Compact form: fixed random hashes ``h1`` [C1] in ``[0, D)``, signs ``s1`` [C1] in ``{-1, +1}`` (and ``h2``,
``s2`` for ``y``, drawn independently). The count sketch of ``x_p`` is ``S1(x_p)[d] = sum_{i: h1(i) = d} s1(i)
x_p[i]``; the Tensor Sketch of ``x_p y_p^T`` is the circular convolution of the two count sketches,
``irfft(rfft(S1 x_p) * rfft(S2 y_p))``, i.e. the count sketch of the outer product with hash
``(h1(i) + h2(j)) mod D`` and sign ``s1(i) s2(j)``. It is linear in the outer product, so averaging the sketches
over positions sketches ``B``, and ``E<phi(X), phi(X')> = <B(X), B(X')>`` (Frobenius) with a variance of order
``||B|| ||B'|| / sqrt(D)``. The same optional signed square root and L2 normalisation follow.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checks import check_bool, check_float_features, check_nonempty_map


def _check_maps(x, y) -> Tensor:
    for name, t in (("x", x), ("y", y)):
        if t is None and name == "y":
            continue
        check_float_features(t, name)
        check_nonempty_map(t, name)
    if y is None:
        return x
    if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"y must have x's batch size and H, W: x is {tuple(x.shape)}, y is {tuple(y.shape)} (only C may differ)"
        )
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y must have x's dtype and device ({x.dtype}, {x.device}), got ({y.dtype}, {y.device})")
    return y


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _normalize(z: Tensor, signed_sqrt: bool, l2_normalize: bool, eps: float) -> Tensor:
    check_bool(signed_sqrt, "signed_sqrt")
    check_bool(l2_normalize, "l2_normalize")
    if signed_sqrt:
        # eps keeps the gradient finite near 0 (d sqrt(t)/dt = 1 / (2 sqrt(t))); at exactly 0 it is 0
        z = torch.sign(z) * torch.sqrt(z.abs() + eps)
    if l2_normalize:
        z = F.normalize(z, p=2.0, dim=1)
    return z


def bilinear_pool(
    x: Tensor,
    y: Tensor | None = None,
    *,
    signed_sqrt: bool = True,
    l2_normalize: bool = True,
    eps: float = 1e-10,
) -> Tensor:
    """Full bilinear pooling: the outer product of ``x`` and ``y`` averaged over positions, flattened.

    Args:
        x (Tensor[N, C1, H, W]): first feature map (e.g. RoI features [K, C, 7, 7]).
        y (Tensor[N, C2, H, W], optional): second feature map, same N, H, W, dtype, device; ``None`` means ``x``
            (symmetric bilinear pooling, ``C2 = C1``).
        signed_sqrt (bool): apply ``sign(z) sqrt(|z| + eps)``.
        l2_normalize (bool): divide each row by its L2 norm.
        eps (float): inside the square root.

    Returns:
        Tensor[N, C1 * C2]; entry ``i * C2 + j`` comes from ``mean_p x[:, i, p] y[:, j, p]``.
    """
    y = _check_maps(x, y)
    n, c1, h, w = x.shape
    c2 = y.shape[1]
    xf = x.reshape(n, c1, h * w)  # [N, C1, P]
    yf = y.reshape(n, c2, h * w)  # [N, C2, P]
    z = torch.bmm(xf, yf.transpose(1, 2)) / (h * w)  # [N, C1, C2]
    return _normalize(z.reshape(n, c1 * c2), signed_sqrt, l2_normalize, eps)


class BilinearPool(nn.Module):
    """``bilinear_pool`` as a module: ``forward(x, y=None)``, [N, C1, H, W] (x [N, C2, H, W]) -> [N, C1 * C2]."""

    def __init__(self, *, signed_sqrt: bool = True, l2_normalize: bool = True, eps: float = 1e-10):
        super().__init__()
        self.signed_sqrt = check_bool(signed_sqrt, "signed_sqrt")
        self.l2_normalize = check_bool(l2_normalize, "l2_normalize")
        self.eps = float(eps)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return bilinear_pool(x, y, signed_sqrt=self.signed_sqrt, l2_normalize=self.l2_normalize, eps=self.eps)

    def extra_repr(self) -> str:
        return f"signed_sqrt={self.signed_sqrt}, l2_normalize={self.l2_normalize}"


def tensor_sketch_hashes(in_channels1: int, in_channels2: int, output_dim: int, seed: int = 0):
    """The fixed random hashes of a Tensor Sketch, drawn on the CPU from ``seed``.

    Returns:
        ``(h1, s1, h2, s2)``: ``h1`` Tensor[C1] (int64 in ``[0, output_dim)``), ``s1`` Tensor[C1] (float32 +-1),
        and the same for ``y``'s ``C2`` channels, drawn independently of ``h1, s1``.
    """
    c1 = _check_positive_int(in_channels1, "in_channels1")
    c2 = _check_positive_int(in_channels2, "in_channels2")
    d = _check_positive_int(output_dim, "output_dim")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randint(d, (c1,), generator=g)
    s1 = torch.randint(2, (c1,), generator=g).float() * 2 - 1
    h2 = torch.randint(d, (c2,), generator=g)
    s2 = torch.randint(2, (c2,), generator=g).float() * 2 - 1
    return h1, s1, h2, s2


SKETCH_METHODS = ("auto", "fft", "direct")


def _count_sketch(x: Tensor, h: Tensor, s: Tensor, output_dim: int) -> Tensor:
    """``[..., C] -> [..., D]``: entry ``d`` sums ``s[i] x[..., i]`` over the channels ``i`` with ``h[i] = d``."""
    out = x.new_zeros((*x.shape[:-1], output_dim))
    return out.index_add_(-1, h.to(x.device), x * s.to(x))


def _sketch_fft(xp: Tensor, yp: Tensor, hashes, d: int) -> Tensor:
    """Tensor Sketch of the mean outer product, position by position: [N, P, C1], [N, P, C2] -> [N, D].

    By the convolution theorem; the mean over positions commutes with the (linear) inverse FFT.
    """
    h1, s1, h2, s2 = hashes
    sx, sy = _count_sketch(xp, h1, s1, d), _count_sketch(yp, h2, s2, d)  # [N, P, D]
    prod = (torch.fft.rfft(sx, n=d, dim=-1) * torch.fft.rfft(sy, n=d, dim=-1)).mean(1)  # [N, D // 2 + 1]
    return torch.fft.irfft(prod, n=d, dim=-1)


def _sketch_direct(xp: Tensor, yp: Tensor, hashes, d: int) -> Tensor:
    """The same sketch from the full bilinear matrix ``B`` [N, C1, C2]: entry ``(i, j)`` of ``B`` goes, times
    ``s1(i) s2(j)``, to ``(h1(i) + h2(j)) mod D`` (what the circular convolution does, written out)."""
    h1, s1, h2, s2 = hashes
    b = torch.bmm(xp.transpose(1, 2), yp) / xp.shape[1]  # [N, C1, C2]
    index = (h1[:, None] + h2[None, :]).remainder(d).flatten().to(xp.device)
    sign = (s1[:, None] * s2[None, :]).flatten().to(b)
    return b.new_zeros((b.shape[0], d)).index_add_(1, index, b.flatten(1) * sign)


def compact_bilinear_pool(
    x: Tensor,
    y: Tensor | None = None,
    output_dim: int = 8192,
    seed: int = 0,
    *,
    hashes=None,
    signed_sqrt: bool = True,
    l2_normalize: bool = True,
    eps: float = 1e-10,
    method: str = "auto",
) -> Tensor:
    """Compact bilinear pooling by Tensor Sketch: ``[N, C1, H, W] x [N, C2, H, W] -> [N, output_dim]``.

    Args:
        x (Tensor[N, C1, H, W]): first feature map.
        y (Tensor[N, C2, H, W], optional): second feature map; ``None`` means ``x`` (still sketched with a second,
            independent hash pair, as the estimator needs).
        output_dim (int): ``D``, the sketch size (8192 keeps nearly all the accuracy of 512 x 512 in Gao et al.).
        seed (int): draws the hashes with ``tensor_sketch_hashes(C1, C2, D, seed)``; the same seed gives the same
            projection, so features from separate calls are comparable.
        hashes (tuple, optional): ``(h1, s1, h2, s2)`` to use instead of ``seed`` (``CompactBilinearPool`` passes
            its buffers); ``output_dim`` must still be the hashes' range.
        signed_sqrt, l2_normalize, eps: as in ``bilinear_pool``, applied to the sketch.
        method (str): how the same sketch is computed. ``"fft"``: count-sketch every position, multiply the
            FFTs, average (Gao et al.; about ``3 H W D log2 D`` operations per sample). ``"direct"``: form the
            full ``B`` (``C1 C2 H W``) and hash its entries; cheaper for RoI features (128 channels on 7 x 7:
            0.8 M against 3.3 M for ``D = 2048``), but holds ``C1 x C2`` per sample. ``"auto"`` picks the one
            with fewer operations.

    Returns:
        Tensor[N, output_dim]. Before the signed square root and L2 normalisation, the inner product of two
        outputs estimates the inner product of the full bilinear features without bias.
    """
    y = _check_maps(x, y)
    d = _check_positive_int(output_dim, "output_dim")
    n, c1, h, w = x.shape
    c2 = y.shape[1]
    if hashes is None:
        hashes = tensor_sketch_hashes(c1, c2, d, seed)
    if not (isinstance(hashes, (tuple, list)) and len(hashes) == 4):
        raise ValueError("hashes must be a tuple (h1, s1, h2, s2)")
    h1, s1, h2, s2 = hashes
    if h1.shape != (c1,) or s1.shape != (c1,) or h2.shape != (c2,) or s2.shape != (c2,):
        raise ValueError(
            f"hashes must have shapes ({c1},), ({c1},), ({c2},), ({c2},) for x's and y's channels, got "
            f"{tuple(h1.shape)}, {tuple(s1.shape)}, {tuple(h2.shape)}, {tuple(s2.shape)}"
        )

    if not torch.compiler.is_compiling() and (int(h1.min()) < 0 or int(h2.min()) < 0
                                               or int(h1.max()) >= d or int(h2.max()) >= d):
        raise ValueError(f"hashes h1, h2 must lie in [0, output_dim) = [0, {d})")

    if method not in SKETCH_METHODS:
        raise ValueError(f"method must be one of {SKETCH_METHODS}, got {method!r}")
    if method == "auto":
        method = "direct" if c1 * c2 <= 3 * d * max(math.log2(d), 1.0) else "fft"

    compute = x if x.dtype in (torch.float32, torch.float64) else x.float()  # the FFT wants float32/64
    yc = y if y.dtype == compute.dtype else y.to(compute.dtype)
    xp = compute.permute(0, 2, 3, 1).reshape(n, h * w, c1)  # [N, P, C1]
    yp = yc.permute(0, 2, 3, 1).reshape(n, h * w, c2)  # [N, P, C2]
    z = (_sketch_direct if method == "direct" else _sketch_fft)(xp, yp, (h1, s1, h2, s2), d)  # [N, D]
    return _normalize(z, signed_sqrt, l2_normalize, eps).to(x.dtype)


class CompactBilinearPool(nn.Module):
    """Compact bilinear pooling with its hashes stored as buffers (saved in the state dict).

    Args:
        in_channels1 (int): channels of ``x``.
        in_channels2 (int, optional): channels of ``y``; ``None`` means ``in_channels1`` (and ``forward(x)``).
        output_dim (int): sketch size ``D``.
        seed (int): seed of the hashes.
        method (str): ``"auto"``, ``"fft"`` or ``"direct"``, as in ``compact_bilinear_pool``.

    ``forward(x, y=None)``: [N, C1, H, W] (and [N, C2, H, W]) -> [N, output_dim].
    """

    def __init__(self, in_channels1: int, in_channels2: int | None = None, output_dim: int = 8192,
                 seed: int = 0, *, signed_sqrt: bool = True, l2_normalize: bool = True, eps: float = 1e-10,
                 method: str = "auto"):
        super().__init__()
        if method not in SKETCH_METHODS:
            raise ValueError(f"method must be one of {SKETCH_METHODS}, got {method!r}")
        self.method = method
        self.in_channels1 = _check_positive_int(in_channels1, "in_channels1")
        self.in_channels2 = in_channels1 if in_channels2 is None else _check_positive_int(in_channels2, "in_channels2")
        self.output_dim = _check_positive_int(output_dim, "output_dim")
        self.seed = seed
        self.signed_sqrt = check_bool(signed_sqrt, "signed_sqrt")
        self.l2_normalize = check_bool(l2_normalize, "l2_normalize")
        self.eps = float(eps)
        h1, s1, h2, s2 = tensor_sketch_hashes(self.in_channels1, self.in_channels2, self.output_dim, seed)
        self.register_buffer("h1", h1)
        self.register_buffer("s1", s1)
        self.register_buffer("h2", h2)
        self.register_buffer("s2", s2)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a Tensor[N, {self.in_channels1}, H, W], got {shape}")
        c2 = self.in_channels1 if y is None else (y.shape[1] if isinstance(y, Tensor) and y.dim() == 4 else None)
        if c2 != self.in_channels2:
            got = "None (y = x)" if y is None else (tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__)
            raise ValueError(f"y must be a Tensor[N, {self.in_channels2}, H, W], got {got}")
        return compact_bilinear_pool(x, y, self.output_dim, hashes=(self.h1, self.s1, self.h2, self.s2),
                                     signed_sqrt=self.signed_sqrt, l2_normalize=self.l2_normalize, eps=self.eps,
                                     method=self.method)

    def extra_repr(self) -> str:
        return (f"in_channels1={self.in_channels1}, in_channels2={self.in_channels2}, output_dim={self.output_dim}, "
                f"seed={self.seed}, signed_sqrt={self.signed_sqrt}, l2_normalize={self.l2_normalize}")


__all__ = ["bilinear_pool", "BilinearPool", "tensor_sketch_hashes", "compact_bilinear_pool", "CompactBilinearPool"]
