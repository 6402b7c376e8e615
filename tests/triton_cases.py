"""What the Triton kernel tests (test_triton_*.py) share: the kernel modules built for Triton's interpreter, small
inputs with odd shapes (C = 3, a 7 x 13 map) and awkward boxes (partly or wholly outside the map, zero-size,
reversed), tolerances, a time limit for the bounded-work cases, a map with non-finite cells, and the check that every
kernel compiles for a GPU (sm_90) without one.

Importing this module sets ``TRITON_INTERPRET=1`` before any kernel module is imported (@triton.jit reads it then),
and leaves it set: the interpreter reads it again while it launches (restoring it makes triton's lazy imports fail).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import _helpers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

KERNEL_MODULES = ["_deterministic", "_tiles", "roi_align", "roi_pool", "prroi_pool", "multilevel_roi_align", "ps_roi"]


def _interpreted(module) -> bool:
    return any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values())


def _load():
    """The kernel modules, built for the interpreter (re-imported if something imported them before)."""
    mods = {name: importlib.import_module(f"roikit.ops.triton.{name}") for name in KERNEL_MODULES}
    if not all(_interpreted(m) for m in mods.values()):
        mods = {name: importlib.reload(mods[name]) for name in KERNEL_MODULES}
    return mods


K = _load()
RA, RP, PR, ML, PS = K["roi_align"], K["roi_pool"], K["prroi_pool"], K["multilevel_roi_align"], K["ps_roi"]

SCALE = 0.25
PH, PW = 3, 2
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_input(dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 13, generator=g).to(dtype)  # odd: C = 3, a 7 x 13 map (28 x 52 px at stride 4)
    x[0, 1, 2, 4:6] = 2.5  # a tie for the max ops
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_rois(dtype=torch.float32):
    return torch.tensor([
        [0, 1.0, 1.5, 30.3, 20.2],  # inside
        [1, -10.0, -5.0, 8.0, 40.0],  # partly outside
        [0, 5.0, 5.0, 5.0, 5.0],  # zero size
        [1, 20.0, 20.0, 3.0, 4.0],  # reversed
        [0, 100.0, 100.0, 120.0, 130.0],  # wholly outside
        [1, 0.0, 0.0, 52.0, 28.0],  # the whole map
        [0, 10.5, 6.25, 22.0, 14.0],  # small, a few cells
    ], dtype=torch.float64).to(dtype)


def close(actual, expected, dtype, msg):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype], msg=msg)


def time_limit(seconds: float):
    """Raise TimeoutError (inside the interpreted kernel, which reports it as an InterpreterError) after ``seconds``."""
    return _helpers.time_limit(seconds, why="the kernel's work is not bounded by the map")


def small_map(seed=0, size=10):
    return torch.randn(1, 2, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_non_finite(out, expected, msg):
    assert torch.equal(out.isnan(), expected.isnan()), f"{msg}: NaN where the reference has none, or not"
    assert torch.equal(out == float("inf"), expected == float("inf")), f"{msg}: +inf"
    assert torch.equal(out == float("-inf"), expected == float("-inf")), f"{msg}: -inf"
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], atol=1e-5, rtol=1e-5, msg=msg)


NON_FINITE_ROIS = torch.tensor([
    [0, -6.0, -6.0, 1.5, 1.5],  # partly off the map at the NaN corner cell (0, 0)
    [0, -5.0, 2.0, 0.4, 6.0],  # off-map samples next to the corner: they read nothing
    [0, 2.0, 1.0, 6.0, 5.0],  # over the +inf and the -inf cell
    [0, 4.0, 3.0, 4.0, 3.0],  # zero size on the +inf cell: a sample exactly on it (weight 0 on a neighbour)
    [0, 3.0, 2.0, 5.0, 4.0],  # samples on whole cells next to the +inf cell
    [0, 6.5, 6.5, 9.0, 9.0],  # far from every non-finite cell
    [0, 0.0, 0.0, 9.0, 9.0],  # the whole map
])


def non_finite_map():
    x = small_map(seed=3)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 3, 4] = float("inf")  # (y, x) = (3, 4)
    x[0, 0, 3, 4] = float("inf")
    x[0, 0, 2, 3] = float("-inf")
    return x



# ---------------------------------------------------------------- compiled for a GPU, without one
# The interpreter runs the kernels' arithmetic but not Triton's compiler: constexpr specialization (ints equal to 1
# become constants, inside tuples too), the libdevice branch of the level rule, typing. compile_for_sm90 runs
# launcher calls on CPU tensors with JITFunction.run replaced by a compile for sm_90, in a process without the
# interpreter.
_COMPILE_PRELUDE = r'''
import time
import torch
try:  # triton internals (3.x): the JIT's own specialization; skip where they moved
    import triton
    from triton._utils import find_paths_if, get_iterable_path
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, native_specialize_impl
except Exception as e:
    print("SKIP: cannot compile for sm_90 with this triton:", repr(e))
    raise SystemExit(0)

TARGET = GPUTarget("cuda", 90, 32)
# kernels whose outputs the launcher reads back (the deterministic backwards' windows): given a plausible 1 x 1 each
READ_BACK = ("_roi_align_runs_kernel", "_windows_kernel", "_deform_runs_kernel", "_ps_pool_window_kernel")
seen = {}


def compile_instead(self, *args, grid, warmup, **kwargs):
    """Specialize the arguments as the JIT does (ints equal to 1, also inside tuples, become constexpr), then
    compile for sm_90 instead of launching. DEVICE_MATH (libdevice) is on, as on a GPU."""
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    values = [True if p.name == "DEVICE_MATH" else bound[p.name] for p in self.params]
    sigvals = ["constexpr" if p.is_constexpr else
               native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize, True)[0]
               for p, v in zip(self.params, values)]
    consts = {path: get_iterable_path(values, path)
              for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    key = (self.__name__, repr(sigvals), repr(sorted(consts.items())))
    if self.__name__ in READ_BACK:
        bound["win_ptr"].fill_(1)
        for name in ("lo_y_ptr", "lo_x_ptr", "n_y_ptr", "n_x_ptr"):
            if name in bound:
                bound[name].zero_()
    if key not in seen:
        t = time.time()
        triton.compile(ASTSource(fn=self, signature=dict(zip(self.arg_names, sigvals)), constexprs=consts),
                       target=TARGET)
        seen[key] = time.time() - t


JITFunction.run = compile_instead
'''
_COMPILE_SUMMARY = '''
print(f"compiled {len(seen)} kernel variants for sm_90 in {sum(seen.values()):.0f} s")
'''


def compile_for_sm90(launches: str) -> None:
    """Run ``launches`` (Python source that calls kernel launchers on CPU tensors) in a fresh process without the
    interpreter, every kernel launch replaced by a compile for sm_90; fail on a compile error, skip where this
    Triton's internals moved."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_PRELUDE + launches + _COMPILE_SUMMARY],
                          capture_output=True, text=True, timeout=600, env=env)
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled" in done.stdout
