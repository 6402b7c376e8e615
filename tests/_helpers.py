"""Helpers used by several test files: the tools as modules, the Triton kernels under the interpreter, op inputs, a
comparison of non-finite results. (The naive reference loops are in tests/naive.py; fixtures in tests/conftest.py.)"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
INF = float("inf")


# ---------------------------------------------------------------- a time limit
@contextlib.contextmanager
def time_limit(seconds: float, *, cpu: bool = False, why: str = "the work is not bounded"):
    """Raise TimeoutError inside the block once ``seconds`` have passed: wall-clock time, or with ``cpu`` the
    process's CPU time (all its threads: robust to a loaded machine). The signal is handled between Python steps
    (in an interpreted Triton kernel, which reports it as an InterpreterError); main thread only."""
    def expire(signum, frame):
        raise TimeoutError(f"over {seconds:.1f} {'CPU ' if cpu else ''}s: {why}")
    which, timer = (signal.SIGPROF, signal.ITIMER_PROF) if cpu else (signal.SIGALRM, signal.ITIMER_REAL)
    previous = signal.signal(which, expire)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        signal.setitimer(timer, 0)
        signal.signal(which, previous)


# ---------------------------------------------------------------- tools/*.py, in process
def load_tool(name: str):
    """tools/<name>.py as a fresh module (in-process: no second torch start-up; a tool is a script, not a package
    module)."""
    spec = importlib.util.spec_from_file_location(f"roikit_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(tool, argv: list[str]) -> int:
    """``tool``'s exit status for the command line ``argv``."""
    return tool.main(tool.get_args_parser().parse_intermixed_args(argv))


# ---------------------------------------------------------------- Triton kernels on the CPU
def triton_module(name: str):
    """roikit.ops.triton.<name> with its kernels built for Triton's interpreter (re-imported if an earlier import
    built them for a GPU); skips where triton is absent or ``TRITON_INTERPRET`` is not 1 (tests/conftest.py sets
    it)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    module = importlib.import_module(f"roikit.ops.triton.{name}")
    if not any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values()):
        module = importlib.reload(module)
    return module


# ---------------------------------------------------------------- inputs
def random_rotated_rois(k, n, size, scale, seed, dtype=torch.float64, max_side=1.0):
    """Rotated boxes [K, 6] (n, cx, cy, w, h, angle in degrees) around and off a map of ``size`` cells: centres from
    -20% to 120%, sides up to ``max_side`` map sizes, any angle; one zero-size box and one wholly off the map."""
    g = torch.Generator().manual_seed(seed)
    h, w = size[0] / scale, size[1] / scale
    centre = (torch.rand(k, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2) * torch.tensor([w, h])
    sides = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * max_side + 0.2
    angle = torch.rand(k, 1, generator=g, dtype=torch.float64) * 720 - 360
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    rois = torch.cat([idx, centre, sides, angle], dim=1)
    rois[0, 3:5] = 0.0  # zero size
    rois[1, 1:3] = torch.tensor([-3 * w, 4 * h])  # wholly off the map
    return rois.to(dtype)


def deform_case(seed=0, dtype=torch.float64, k=6, size=(9, 11), pooled=(3, 2)):
    """deform_roi_pool's inputs: x [2, 3, *size], rois [k, 5] (inside, partly outside, reversed, zero size, wholly
    outside) and offsets [k, 2, *pooled] of about 0.6."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64).to(dtype)
    rois = torch.tensor([
        [0, 1.0, 2.0, 15.0, 17.0],  # inside
        [1, 4.0, 0.5, 20.0, 9.0],
        [1, -3.0, 5.0, 8.0, 30.0],  # partly outside
        [0, 20.0, 20.0, 3.0, 4.0],  # reversed
        [0, 5.0, 5.0, 5.0, 5.0],  # zero size
        [1, 40.0, 40.0, 60.0, 50.0],  # wholly outside
    ], dtype=torch.float64)[:k].to(dtype)
    offset = (torch.randn(k, 2, *pooled, generator=g, dtype=torch.float64) * 0.6).to(dtype)
    return x, rois, offset


# ---------------------------------------------------------------- comparisons
def assert_compiled_matches_eager(f, *inputs, loss=torch.sum):
    """``torch.compile(f, fullgraph=True, backend="aot_eager")`` gives ``f``'s output on ``inputs`` and the gradients
    of ``loss(output)`` for every input, exactly."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    eager, comp = f(*eager_inputs), compiled(*compiled_inputs)
    torch.testing.assert_close(comp, eager, atol=0, rtol=0)
    loss(eager).backward()
    loss(comp).backward()
    for e, c in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(c.grad, e.grad, atol=0, rtol=0)


def assert_same_non_finite_and_close(out, expected, tol, what=""):
    """NaN where expected has NaN, +inf / -inf where it has them, and the finite values to ``tol`` (relative, and
    absolute relative to the largest finite value)."""
    out, expected = out.double(), expected.double()
    for name, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF)):
        got, want = mask(out), mask(expected)
        if not torch.equal(got, want):
            where = (got != want).nonzero()[:5].tolist()
            raise AssertionError(f"{what}{name} pattern differs: roikit has {int(got.sum())}, the reference "
                                 f"{int(want.sum())}; first differing outputs [k, c, ph, pw] {where}: "
                                 f"roikit {[out[tuple(i)].item() for i in where]}, "
                                 f"reference {[expected[tuple(i)].item() for i in where]}")
    finite = torch.isfinite(expected)
    scale = max(1.0, float(expected[finite].abs().max())) if finite.any() else 1.0
    torch.testing.assert_close(out[finite], expected[finite], rtol=tol, atol=tol * scale, msg=lambda m: what + m)


# ---------------------------------------------------------------- ONNX
def quiet_onnx_export(model, args, **kwargs):
    """``roikit.export.onnx_export`` without the exporter's progress lines and warnings."""
    import contextlib
    import io
    import warnings

    from roikit.export import onnx_export

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnx_export(model, args, **kwargs)


def ort_session(program):
    """An onnxruntime CPU session of an ``ONNXProgram``."""
    import onnxruntime

    return onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
