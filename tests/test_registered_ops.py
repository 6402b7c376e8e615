"""The registered ops ``torch.ops.roikit.*`` check their own arguments: torch.compile / torch.export graphs and users
call them directly, past the public wrappers, and their kernels (numba on the CPU, Triton on CUDA) index the map with
the batch index and the argmax unchecked. Every op, forward and backward, must answer hostile arguments with a
ValueError naming what is wrong, never a crash; and a valid direct call must give what the public wrapper gives
(the wrappers are checked against torchvision and naive references elsewhere).

The hostile calls run in one subprocess (a segfault there fails the tests of the cases it did not reach instead of
killing pytest). The op list is read from ``torch.ops.roikit``: an op added without hostile cases fails
``test_every_registered_op_is_covered``.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import roikit.ops  # noqa: F401  (registers the ops)
from roikit.ops import (
    deform_roi_pool,
    multilevel_roi_align,
    prroi_pool,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_align_rotated,
    roi_pool,
)

OPS = sorted(n for n in dir(torch.ops.roikit) if isinstance(getattr(torch.ops.roikit, n), torch._ops.OpOverloadPacket))
R = torch.ops.roikit

# one small problem for every op: N = 2 images, C = 8 channels (2 x 2 x 2 for the position-sensitive ops), 2 x 2 bins
N, C, H, W, P, SCALE = 2, 8, 10, 12, 2, 0.5
_g = torch.Generator().manual_seed(0)
X = torch.randn(N, C, H, W, generator=_g, dtype=torch.float64)
X2 = torch.randn(N, C, 5, 6, generator=_g, dtype=torch.float64)  # the pyramid's second level (scale 1/4)
ROIS = torch.tensor([[0, 1.0, 1, 15, 12], [1, 0.5, 2, 19, 17.5], [1, 3, 0, 9, 8]], dtype=torch.float64)
ROT = torch.tensor([[0, 10.0, 9, 12, 8, 30], [1, 8, 12, 6, 10, -15], [1, 12, 8, 4, 4, 0]], dtype=torch.float64)
OFFSET = torch.randn(3, 2, P, P, generator=_g, dtype=torch.float64)
K = ROIS.shape[0]
G = torch.randn(K, C, P, P, generator=_g, dtype=torch.float64)  # a gradient of a [K, C, PH, PW] output
G_PS = torch.randn(K, C // (P * P), P, P, generator=_g, dtype=torch.float64)


def _valid() -> dict[str, tuple]:
    """A valid direct call of every op: its arguments."""
    pool_argmax = R.roi_pool(X, ROIS, SCALE, P, P, "torchvision")[1]
    out, no_argmax = R.roi_align(X, ROIS, SCALE, P, P, 2, True, False)
    sizes = (N, C, H, W)
    return {
        "roi_pool": (X, ROIS, SCALE, P, P, "torchvision"),
        "roi_pool_inference": (X, ROIS, SCALE, P, P, "torchvision"),
        "roi_pool_backward": (G, ROIS, pool_argmax, *sizes, False),
        "roi_align": (X, ROIS, SCALE, P, P, 2, True, False),
        "roi_align_box": (X, ROIS, SCALE, P, P, 2, True, False),
        "roi_align_backward": (G, ROIS, no_argmax, SCALE, P, P, *sizes, 2, True, False, False),
        "roi_align_box_grad": (G, X, ROIS, out, no_argmax, SCALE, P, P, 2, True, False),
        "prroi_pool": (X, ROIS, SCALE, P, P, False),
        "prroi_pool_backward": (G, X, ROIS, SCALE, P, P, False, False),
        "ps_roi_align": (X, ROIS, SCALE, P, P, 2),
        "ps_roi_align_backward": (G_PS, ROIS, SCALE, P, P, 2, *sizes, False),
        "ps_roi_pool": (X, ROIS, SCALE, P, P),
        "ps_roi_pool_backward": (G_PS, ROIS, SCALE, P, P, *sizes, False),
        "roi_align_rotated": (X, ROT, SCALE, P, P, 2, True, False, False),
        "roi_align_rotated_backward": (G, ROT, SCALE, P, P, 2, True, False, False, *sizes, False),
        "deform_roi_pool": (X, ROIS, OFFSET, SCALE, P, P, 2, 0.1),
        "deform_roi_pool_backward": (G, X, ROIS, OFFSET, SCALE, P, P, 2, 0.1, True, False),
        "multilevel_roi_align": ([X, X2], ROIS, [SCALE, SCALE / 2], P, P, 2, False, 224, 4),
        "multilevel_roi_align_backward": (G, ROIS, [SCALE, SCALE / 2], P, P, N, C, [H, 5], [W, 6], 2, False, 224, 4,
                                          False),
    }


# where each op's arguments are: rois, the map (or the pyramid), the gradient, PH (PW follows), the scale, batch_size
ROLES = {
    "roi_pool": dict(rois=1, map=0, pooled=3, scale=2),
    "roi_pool_inference": dict(rois=1, map=0, pooled=3, scale=2),
    "roi_pool_backward": dict(rois=1, grad=0, sizes=3),
    "roi_align": dict(rois=1, map=0, pooled=3, scale=2),
    "roi_align_box": dict(rois=1, map=0, pooled=3, scale=2),
    "roi_align_backward": dict(rois=1, grad=0, pooled=4, scale=3, sizes=6),
    "roi_align_box_grad": dict(rois=2, map=1, grad=0, pooled=6, scale=5),
    "prroi_pool": dict(rois=1, map=0, pooled=3, scale=2),
    "prroi_pool_backward": dict(rois=2, map=1, grad=0, pooled=4, scale=3),
    "ps_roi_align": dict(rois=1, map=0, pooled=3, scale=2),
    "ps_roi_align_backward": dict(rois=1, grad=0, pooled=3, scale=2, sizes=6),
    "ps_roi_pool": dict(rois=1, map=0, pooled=3, scale=2),
    "ps_roi_pool_backward": dict(rois=1, grad=0, pooled=3, scale=2, sizes=5),
    "roi_align_rotated": dict(rois=1, map=0, pooled=3, scale=2),
    "roi_align_rotated_backward": dict(rois=1, grad=0, pooled=3, scale=2, sizes=9),
    "deform_roi_pool": dict(rois=1, map=0, pooled=4, scale=3),
    "deform_roi_pool_backward": dict(rois=2, map=1, grad=0, pooled=5, scale=4),
    "multilevel_roi_align": dict(rois=1, map=0, pooled=3),
    "multilevel_roi_align_backward": dict(rois=1, grad=0, pooled=3, sizes=5),
}


def _with(args: tuple, i: int, value) -> tuple:
    return args[:i] + (value,) + args[i + 1:]


def _rois_with(args: tuple, i: int, row: int, col: int, value) -> tuple:
    rois = args[i].clone()
    rois[row, col] = value
    return _with(args, i, rois)


def _cases(op: str, args: tuple) -> list[tuple[str, tuple, str]]:
    """(label, hostile arguments, the ValueError's message pattern) for ``op``'s valid ``args``."""
    roles = ROLES[op]
    r = roles["rois"]
    rois = args[r]
    out = [
        ("batch index too high", _with(args, r, torch.cat([rois[:, :1] * 0 + 300000, rois[:, 1:]], 1)),
         r"rois\[:, 0\] is the batch index and must lie in \[0, 2\); row 0 has 300000"),
        ("batch index = N", _rois_with(args, r, 2, 0, N), r"must lie in \[0, 2\); row 2 has 2"),
        ("batch index negative", _rois_with(args, r, 1, 0, -1), r"must lie in \[0, 2\); row 1 has -1"),
        ("batch index fractional", _rois_with(args, r, 0, 0, 0.5), "batch index and must hold integer values"),
        ("NaN coordinate", _rois_with(args, r, 1, 2, math.nan), "rois must be finite; row 1"),
        ("inf coordinate", _rois_with(args, r, 0, 3, math.inf), "rois must be finite; row 0"),
        ("-inf batch index", _rois_with(args, r, 0, 0, -math.inf), "rois must be finite; row 0"),
        ("rois one column short", _with(args, r, rois[:, :-1]), rf"rois must be a Tensor\[K, {rois.shape[1]}\]"),
        ("rois 1-D", _with(args, r, rois[0]), "rois must be 2-D"),
        ("rois integer", _with(args, r, rois.long()), "rois must be floating-point"),
    ]
    if "pooled" in roles:
        p = roles["pooled"]
        out += [("pooled height 0", _with(args, p, 0), "pooled_height must be a positive int, got 0"),
                ("pooled width negative", _with(args, p + 1, -1), "pooled_width must be a positive int, got -1")]
    if "scale" in roles:
        out += [("spatial scale NaN", _with(args, roles["scale"], math.nan), "spatial scale 0 must be positive"),
                ("spatial scale 0", _with(args, roles["scale"], 0.0), "spatial scale 0 must be positive")]
    if "map" in roles:
        m = roles["map"]
        if op.startswith("multilevel"):
            out += [("map 3-D", _with(args, m, [X[0], X2]), r"features\[0\] must be 4-D"),
                    ("map integer", _with(args, m, [X, X2.long()]), r"features\[1\] must be float16")]
        else:
            out += [("map 3-D", _with(args, m, X[0]), "input must be 4-D"),
                    ("map integer", _with(args, m, X.long()), "input must be float16, bfloat16, float32 or float64")]
    if "grad" in roles:
        g = roles["grad"]
        out += [("grad 3-D", _with(args, g, args[g][0]), "grad must be 4-D"),
                ("grad one box short", _with(args, g, args[g][1:]), "grad must have the forward output's shape"),
                ("grad one channel short", _with(args, g, args[g][:, 1:]), "grad must have the forward output's shape")]
    if "sizes" in roles:
        s = roles["sizes"]
        out += [("batch_size negative", _with(args, s, -1), "batch_size must be a non-negative int"),
                ("channels negative", _with(args, s + 1, -8), "channels must be a non-negative int"),
                ("batch index = batch_size", _with(args, s, 1), r"must lie in \[0, 1\); row 1 has 1")]
    return out + _extra_cases(op, args)


def _extra_cases(op: str, args: tuple) -> list[tuple[str, tuple, str]]:
    """What only some ops take: argmax, offsets, the rounding rule, position-sensitive channels, the pyramid."""
    if op in ("roi_pool", "roi_pool_inference"):
        return [("rounding unknown", _with(args, 5, "floor"), "rounding must be 'torchvision' or 'integer'")]
    if op == "roi_pool_backward":
        argmax = args[2]
        return [("argmax = H * W", _with(args, 2, torch.full_like(argmax, H * W)), r"argmax must hold cells in \[-1, 120\)"),
                ("argmax huge", _with(args, 2, torch.full_like(argmax, 2**30)), r"got values in \[1073741824"),
                ("argmax < -1", _with(args, 2, torch.full_like(argmax, -2)), r"argmax must hold cells in \[-1, 120\)"),
                ("argmax int64", _with(args, 2, argmax.long()), "argmax must be the forward's torch.int32 argmax"),
                ("argmax one box short", _with(args, 2, argmax[1:]), "argmax must be the forward's"),
                ("argmax not contiguous", _with(args, 2, argmax.transpose(2, 3)), "argmax must be contiguous"),
                ("height 0 under argmax", _with(args, 5, 0), r"argmax must hold cells in \[-1, 0\)")]
    if op == "roi_align_backward":  # max pooling reads argmax by index
        max_args = _with(args, 12, True)
        argmax = torch.zeros(G.shape, dtype=torch.int64)
        return [("pool_max without argmax", max_args, "argmax must be the forward's torch.int64 argmax"),
                ("pool_max argmax int32", _with(max_args, 2, argmax.int()), "argmax must be the forward's"),
                ("pool_max argmax expanded", _with(max_args, 2, torch.zeros(1, 1, 1, 1, dtype=torch.int64)
                                                   .expand(G.shape)), "argmax must be contiguous")]
    if op == "roi_align_box_grad":
        max_args = _with(args, 10, True)
        return [("output one box short", _with(args, 3, args[3][1:]), "output must be the forward's output"),
                ("pool_max without argmax", max_args, "argmax must be the forward's torch.int64 argmax")]
    if op in ("ps_roi_align", "ps_roi_pool"):
        return [("channels not a multiple of PH * PW", _with(args, 0, X[:, :6]), "has 6 channels: .* multiple of 4"),
                ("channels fewer than PH * PW", _with(args, 0, X[:, :3]), "has 3 channels: .* multiple of 4")]
    if op in ("ps_roi_align_backward", "ps_roi_pool_backward"):
        c = ROLES[op]["sizes"] + 1
        return [("channels not a multiple of PH * PW", _with(args, c, 6), "has 6 channels: .* multiple of 4"),
                ("channels not the grad's", _with(args, c, 12), "grad must have the forward output's shape")]
    if op in ("roi_align_rotated", "roi_align_rotated_backward"):
        return [("negative width, aligned", _rois_with(args, 1, 1, 3, -2.0), "width and height >= 0 with aligned")]
    if op in ("deform_roi_pool", "deform_roi_pool_backward"):
        o = ROLES[op]["rois"] + 1
        gamma = 7 if op == "deform_roi_pool" else 8
        return [("offset one box short", _with(args, o, OFFSET[1:]), r"offset must be None or a Tensor\[K, 2, PH, PW\]"),
                ("offset 3-D", _with(args, o, OFFSET[0]), "offset must be 4-D"),
                ("offset NaN", _with(args, o, OFFSET.clone().fill_(math.nan)), "offset must be finite"),
                ("offset inf", _with(args, o, torch.where(OFFSET > 0, math.inf, OFFSET)), "offset must be finite"),
                ("gamma NaN", _with(args, gamma, math.nan), "gamma must be a finite number")]
    if op == "multilevel_roi_align":
        return [("one scale for two maps", _with(args, 2, [SCALE]), "one spatial scale per map"),
                ("no map", _with(_with(args, 0, []), 2, []), "one spatial scale per map of a non-empty pyramid"),
                ("levels' channels differ", _with(args, 0, [X, X2[:, :4]]), "every level must share"),
                ("levels' batch differs", _with(args, 0, [X, X2[:1]]), "every level must share"),
                ("canonical_scale 0", _with(args, 7, 0), "canonical_scale must be an int >= 1")]
    if op == "multilevel_roi_align_backward":
        return [("one scale for two maps", _with(args, 2, [SCALE]), "one spatial scale per map"),
                ("widths one short", _with(args, 8, [W]), "2 heights but 1 widths"),
                ("a negative height", _with(args, 7, [H, -5]), "heights must be a non-negative int")]
    return []


def all_cases() -> list[tuple[str, str, tuple, str]]:
    valid = _valid()
    return [(op, label, args, match) for op in OPS for label, args, match in _cases(op, valid[op])]


def run_hostile_cases() -> None:
    """In the subprocess: every hostile call, one JSON line each (flushed), so a crash shows where it happened."""
    for op, label, args, _ in all_cases():
        print(json.dumps({"op": op, "case": label, "status": "running"}), flush=True)
        try:
            getattr(R, op)(*args)
            result = {"type": None, "message": "no exception"}
        except Exception as e:  # noqa: BLE001  (the test reports the type)
            result = {"type": type(e).__name__, "message": str(e)}
        print(json.dumps({"op": op, "case": label, **result}), flush=True)


@pytest.fixture(scope="module")
def hostile_results():
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "import test_registered_ops; test_registered_ops.run_hostile_cases()")
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                          timeout=300)
    results, last = {}, None
    for line in done.stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        last = row
        if "type" in row:
            results[(row["op"], row["case"])] = row
    crash = None
    if done.returncode != 0:
        crash = f"the subprocess died (return code {done.returncode}) at {last}: {done.stderr[-2000:]}"
    return results, crash


def test_every_registered_op_is_covered():
    """A new op in torch.ops.roikit needs a valid call and its roles here (and so its hostile cases)."""
    assert len(OPS) >= 19
    assert set(OPS) == set(_valid()) == set(ROLES)


@pytest.mark.parametrize("op", OPS)
def test_hostile_direct_calls_raise_value_error(op, hostile_results):
    results, crash = hostile_results
    cases = [(label, match) for o, label, _, match in all_cases() if o == op]
    assert len(cases) >= 14
    for label, match in cases:
        row = results.get((op, label))
        assert row is not None, f"{op} / {label}: no result; {crash}"
        assert row["type"] == "ValueError", f"{op} / {label}: {row['type']}: {row['message']}"
        assert row["message"].startswith(f"roikit::{op}: "), row["message"]
        assert re.search(match, row["message"]), f"{op} / {label}: {row['message']!r} does not match {match!r}"
    assert crash is None, crash


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a second device is needed for the wrong-device case")
@pytest.mark.parametrize("op", [op for op in OPS if not op.startswith("multilevel")])
def test_rois_on_another_device(op):
    args = _valid()[op]
    r = ROLES[op]["rois"]
    moved = tuple(a.cuda() if isinstance(a, torch.Tensor) and i != r else a for i, a in enumerate(args))
    with pytest.raises(ValueError, match="rois is on cpu but the map is on cuda"):
        getattr(R, op)(*moved)


# -------------------------------------------------------------------------------- valid direct calls = the wrappers
def _forward_and_grads(fn, *tensors):
    """``fn(*tensors)`` with every tensor requiring grad; the output and the gradients of ``(out * G).sum()``."""
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * _grad_for(out)).sum(), leaves, allow_unused=True)
    return out.detach(), grads


def _grad_for(out):
    return G_PS if out.shape[1] == G_PS.shape[1] else G


def test_roi_pool_direct_equals_wrapper():
    out, (gx,) = _forward_and_grads(lambda x: roi_pool(x, ROIS, P, SCALE), X)
    direct, argmax = R.roi_pool(X, ROIS, SCALE, P, P, "torchvision")
    assert torch.equal(direct, out)
    assert torch.equal(R.roi_pool_inference(X, ROIS, SCALE, P, P, "torchvision"), out)
    assert torch.equal(R.roi_pool_backward(G, ROIS, argmax, N, C, H, W, False), gx)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_roi_align_direct_equals_wrapper(pool):
    pool_max = pool == "max"
    out, (gx, gr) = _forward_and_grads(
        lambda x, r: roi_align(x, r, P, SCALE, 2, True, pool, box_grad=True), X, ROIS)
    direct, argmax = R.roi_align(X, ROIS, SCALE, P, P, 2, True, pool_max)
    assert torch.equal(direct, out)
    assert torch.equal(R.roi_align_box(X, ROIS, SCALE, P, P, 2, True, pool_max)[0], out)
    back = R.roi_align_backward(G, ROIS, argmax, SCALE, P, P, N, C, H, W, 2, True, pool_max, False)
    torch.testing.assert_close(back, gx, rtol=0, atol=1e-12)
    box = R.roi_align_box_grad(G, X, ROIS, direct, argmax, SCALE, P, P, 2, True, pool_max)
    torch.testing.assert_close(box, gr, rtol=0, atol=1e-12)


def test_prroi_pool_direct_equals_wrapper():
    out, (gx, gr) = _forward_and_grads(lambda x, r: prroi_pool(x, r, P, SCALE), X, ROIS)
    assert torch.equal(R.prroi_pool(X, ROIS, SCALE, P, P, False), out)
    bx, br = R.prroi_pool_backward(G, X, ROIS, SCALE, P, P, False, False)
    assert torch.equal(bx, gx) and torch.equal(br, gr)


def test_ps_ops_direct_equal_wrappers():
    out, (gx,) = _forward_and_grads(lambda x: ps_roi_align(x, ROIS, P, SCALE, 2), X)
    assert torch.equal(R.ps_roi_align(X, ROIS, SCALE, P, P, 2), out)
    assert torch.equal(R.ps_roi_align_backward(G_PS, ROIS, SCALE, P, P, 2, N, C, H, W, False), gx)
    out, (gx,) = _forward_and_grads(lambda x: ps_roi_pool(x, ROIS, P, SCALE), X)
    assert torch.equal(R.ps_roi_pool(X, ROIS, SCALE, P, P), out)
    assert torch.equal(R.ps_roi_pool_backward(G_PS, ROIS, SCALE, P, P, N, C, H, W, False), gx)


def test_roi_align_rotated_direct_equals_wrapper():
    out, (gx,) = _forward_and_grads(lambda x: roi_align_rotated(x, ROT, P, SCALE, 2), X)
    assert torch.equal(R.roi_align_rotated(X, ROT, SCALE, P, P, 2, True, False, False), out)
    back = R.roi_align_rotated_backward(G, ROT, SCALE, P, P, 2, True, False, False, N, C, H, W, False)
    assert torch.equal(back, gx)


def test_deform_roi_pool_direct_equals_wrapper():
    out, (gx, go) = _forward_and_grads(lambda x, o: deform_roi_pool(x, ROIS, o, P, SCALE, 2, 0.1), X, OFFSET)
    assert torch.equal(R.deform_roi_pool(X, ROIS, OFFSET, SCALE, P, P, 2, 0.1), out)
    bx, bo = R.deform_roi_pool_backward(G, X, ROIS, OFFSET, SCALE, P, P, 2, 0.1, True, False)
    assert torch.equal(bx, gx) and torch.equal(bo, go)


def test_multilevel_roi_align_direct_equals_wrapper():
    scales = [SCALE, SCALE / 2]
    out, (g1, g2) = _forward_and_grads(lambda a, b: multilevel_roi_align([a, b], ROIS, P, scales, 2), X, X2)
    assert torch.equal(R.multilevel_roi_align([X, X2], ROIS, scales, P, P, 2, False, 224, 4), out)
    b1, b2 = R.multilevel_roi_align_backward(G, ROIS, scales, P, P, N, C, [H, 5], [W, 6], 2, False, 224, 4, False)
    assert torch.equal(b1, g1) and torch.equal(b2, g2)


# -------------------------------------------------------------------------------- compiled graphs check too
def test_compiled_call_with_a_bad_batch_index_raises_value_error():
    """Under torch.compile the registered op runs eagerly: the compiled graph's call checks the boxes' values (the
    wrapper's shape checks ran when the graph was traced). aot_eager: the fake kernels trace, the real op runs."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: roi_align(x, r, P, SCALE, 2, True), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(X, ROIS), roi_align(X, ROIS, P, SCALE, 2, True))
    bad = ROIS.clone()
    bad[1, 0] = 300000
    with pytest.raises(ValueError, match=r"roikit::roi_align: rois\[:, 0\] is the batch index and must lie in"):
        compiled(X, bad)
    direct = torch.compile(lambda x, r: R.ps_roi_pool(x, r, SCALE, P, P), backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"roikit::ps_roi_pool: rois must be finite"):
        direct(X, torch.where(ROIS > 10, math.nan, ROIS))
