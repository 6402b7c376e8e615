"""roikit against torchvision on the CPU, in one run: a fixed workload and a sweep.

Fixed workload (:func:`run_cpu_benchmark`): 2 images of 256 x 50 x 68 features (stride 16), 512 boxes of 16 to
316 px, 7 x 7 bins, sampling_ratio 2, aligned=True; roi_align and roi_pool; forward alone and forward + backward.

Sweep (:func:`run_sweep`): every op with a torchvision counterpart (``roi_align``, ``roi_pool``, ``ps_roi_align``,
``ps_roi_pool``, and ``RoIPooler`` against ``MultiScaleRoIAlign`` on a 4-level pyramid) x box count x box size
(small 16-64 px, mixed 16-316 px, large 256-800 px) x output 7 / 14 x float32 / bfloat16 x one thread / all
threads, forward and forward + backward, with the peak memory of each side. The position-sensitive ops take
``C' * PH * PW`` channels: the multiple of ``PH * PW`` nearest to the sweep's C (:func:`ps_channels`: 245 for 7 x 7
and 196 for 14 x 14 at C = 256). The two sides are timed interleaved (one round of roikit, one of torchvision,
again), each round's median kept, and the smallest median of the rounds reported, so a load that comes and goes
hits both. torchvision's CPU kernels have no bfloat16: its bfloat16 rows cast to float32 and back, as a user of
torchvision would.
"""
from __future__ import annotations

import gc
import itertools
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
import torchvision
from tqdm import tqdm

from ..layers import RoIPooler
from ..ops import ps_roi_align, ps_roi_pool, roi_align, roi_pool
from ..utils.memory import measure_peak, peak_memory_available


def make_workload(num_boxes: int = 512, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 256, 50, 68, generator=g, dtype=dtype)
    image_w, image_h = 68 * 16, 50 * 16
    wh = torch.rand(num_boxes, 2, generator=g, dtype=dtype) * 300 + 16  # 16 to 316 px
    xy = torch.rand(num_boxes, 2, generator=g, dtype=dtype) * (torch.tensor([image_w, image_h], dtype=dtype) - wh)
    batch = torch.randint(0, 2, (num_boxes, 1), generator=g).to(dtype)
    return features, torch.cat([batch, xy, xy + wh], dim=1)


def time_ms(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _cases(features, rois):
    grad = torch.randn(rois.shape[0], features.shape[1], 7, 7)
    x = features.clone().requires_grad_()
    align = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    pool = dict(output_size=7, spatial_scale=1 / 16)

    def fwd(f, kwargs):
        def run():
            with torch.no_grad():
                f(features, rois, **kwargs)
        return run

    def fwd_bwd(f, kwargs):
        def run():
            x.grad = None
            f(x, rois, **kwargs).backward(grad)
        return run

    yield "roi_align", "forward", fwd(roi_align, align), fwd(torchvision.ops.roi_align, align)
    yield "roi_align", "forward+backward", fwd_bwd(roi_align, align), fwd_bwd(torchvision.ops.roi_align, align)
    yield "roi_pool", "forward", fwd(roi_pool, pool), fwd(torchvision.ops.roi_pool, pool)
    yield "roi_pool", "forward+backward", fwd_bwd(roi_pool, pool), fwd_bwd(torchvision.ops.roi_pool, pool)


def run_cpu_benchmark(repeat: int = 10, num_boxes: int = 512) -> list[dict]:
    features, rois = make_workload(num_boxes)
    rows = []
    for op, mode, ours, theirs in _cases(features, rois):
        t_ours, t_tv = time_ms(ours, repeat), time_ms(theirs, repeat)
        rows.append(dict(op=op, mode=mode, roikit_ms=t_ours, torchvision_ms=t_tv, speedup=t_tv / t_ours))
    return rows


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}")


def format_rows(rows: list[dict]) -> str:
    lines = ["| op | pass | roikit (ms) | torchvision (ms) | speed-up |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['mode']} | {r['roikit_ms']:.1f} | {r['torchvision_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------- sweep
SIZES = {"small": (16.0, 64.0), "mixed": (16.0, 316.0), "large": (256.0, 800.0)}  # box side in pixels
IMAGE_HW = (800, 1088)  # the pyramid's image; the single map is its stride-16 level: 50 x 68
SWEEP_OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "pyramid")
POSITION_SENSITIVE = ("ps_roi_align", "ps_roi_pool")
SINGLE_MAP = {  # (roikit's op, torchvision's op, extra arguments) of the single-map ops
    "roi_align": (roi_align, torchvision.ops.roi_align, {"sampling_ratio": 2, "aligned": False}),
    "roi_pool": (roi_pool, torchvision.ops.roi_pool, {}),
    "ps_roi_align": (ps_roi_align, torchvision.ops.ps_roi_align, {"sampling_ratio": 2}),
    "ps_roi_pool": (ps_roi_pool, torchvision.ops.ps_roi_pool, {}),
}
PASSES = ("forward", "forward+backward")


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Bytes the process's resident set grew to above its size before ``fn()``; None where that cannot be read
    (see :mod:`roikit.utils.memory`)."""
    if peak_memory_available() is not None:
        return None
    return measure_peak(fn)[1]


def ps_channels(channels: int, output: int) -> int:
    """Input channels of the position-sensitive ops for ``output x output`` bins: the multiple of ``output**2``
    nearest to ``channels`` (at least one group): 245 (5 x 49) for 7 x 7 and 196 (1 x 196) for 14 x 14 at 256."""
    bins = output * output
    return max(1, round(channels / bins)) * bins


def sweep_boxes(count: int, size: str, seed: int = 0) -> list[torch.Tensor]:
    """``count`` boxes on 2 images of ``IMAGE_HW``, sides uniform in ``SIZES[size]``, as a list per image."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = SIZES[size]
    wh = torch.rand(count, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    room = torch.tensor([IMAGE_HW[1], IMAGE_HW[0]], dtype=torch.float64) - wh
    xy = torch.rand(count, 2, generator=g, dtype=torch.float64) * room.clamp(min=0)
    boxes = torch.cat([xy, xy + wh], dim=1).float()
    image = torch.randint(0, 2, (count,), generator=g)
    return [boxes[image == i] for i in range(2)]


def _sweep_callables(op: str, features: OrderedDict, boxes: list[torch.Tensor], output: int, dtype: torch.dtype,
                     backward: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(roikit, torchvision) closures of one case; each runs one pass. ``features``: the pyramid for ``"pyramid"``,
    else one map (``C' * output**2`` channels for the position-sensitive ops). The backward is fed a fixed
    contiguous gradient (as a box head gives), made once outside the timed calls, into fresh leaves."""
    shapes = [IMAGE_HW] * 2
    names = list(features)[:1] if op != "pyramid" else list(features)
    if op == "pyramid":
        ours = RoIPooler(names, output, 2, "roi_align")
        theirs = torchvision.ops.MultiScaleRoIAlign(names, output, 2)
    else:
        ours, theirs, extra = SINGLE_MAP[op]
    channels = next(iter(features.values())).shape[1]
    if op in POSITION_SENSITIVE:
        channels //= output * output
    grad = torch.randn(sum(len(b) for b in boxes), channels, output, output, generator=torch.Generator().manual_seed(1))
    grad = grad.to(dtype)

    def run(side: str) -> Callable[[], object]:
        def call():
            cast = side == "torchvision" and dtype != torch.float32
            maps = OrderedDict((k, v.detach().float() if cast else v.detach()) for k, v in features.items()
                               if k in names)
            if backward:
                for v in maps.values():
                    v.requires_grad_()
            with torch.set_grad_enabled(backward):
                if op == "pyramid":
                    out = (ours if side == "roikit" else theirs)(maps, boxes, shapes)
                else:
                    b = [x.to(next(iter(maps.values())).dtype) for x in boxes]
                    out = (ours if side == "roikit" else theirs)(maps[names[0]], b, output, 1 / 16, **extra)
                if cast:
                    out = out.to(dtype)
                if backward:
                    out.backward(grad)
            return out
        return call

    return run("roikit"), run("torchvision")


ROUND_MS = 150.0  # a round's calls of one side take about this long (at least one call)


def _timed(fn: Callable[[], object], calls: int) -> float:
    """Median of ``calls`` timed calls (ms)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _interleaved(ours: Callable, theirs: Callable, rounds: int, calls: int, goal: float | None = None,
                 first: tuple[float, float] | None = None, round_ms: float = ROUND_MS) -> tuple[float, float, int]:
    """Min over rounds of the median of timed calls, roikit and torchvision alternating (ms), and the rounds run.

    A round times as many calls of each side as fit in about ``round_ms`` (one at least, ``calls`` at most), so a
    long case costs a few calls and a short one its median of ``calls``. With a ``goal``, rounds stop once the
    speed-up is clearly (1.4x) above it, or clearly below it after two rounds (a miss is confirmed: one slow call,
    a load spike or the memory call's fresh pages, cannot make it alone): the repeats go where they can change the
    verdict. ``first``: a round already timed (the sweep's memory calls), counted as the first."""
    best = list(first) if first is not None else [float("inf"), float("inf")]
    done = 0 if first is None else 1
    while done < rounds:
        ratio = best[1] / best[0] if done else None
        if ratio is not None and goal is not None and (ratio >= goal * 1.4 or (ratio <= goal / 1.4 and done >= 2)):
            break
        n = calls if done == 0 else max(1, min(calls, int(round_ms / max(best[0], best[1], 1e-3))))
        best[0] = min(best[0], _timed(ours, n))
        best[1] = min(best[1], _timed(theirs, n))
        done += 1
    return best[0], best[1], done


def _pyramid(channels: int, generator: torch.Generator | None = None) -> OrderedDict:
    """The sweep's 4-level pyramid of 2 images of ``IMAGE_HW``: strides 4, 8, 16, 32, ``channels`` each."""
    return OrderedDict((str(i), torch.randn(2, channels, IMAGE_HW[0] // s, IMAGE_HW[1] // s, generator=generator))
                       for i, s in enumerate((4, 8, 16, 32)))


def _case_maps(op: str, pyramid: OrderedDict, output: int, dtype: torch.dtype,
               generator: torch.Generator | None = None) -> OrderedDict:
    """The maps a case reads: the pyramid, its stride-16 level, or for the position-sensitive ops a stride-16 map
    of :func:`ps_channels` channels (random, from ``generator``)."""
    if op == "pyramid":
        return OrderedDict((k, v.to(dtype)) for k, v in pyramid.items())
    single = pyramid["2"]
    if op in POSITION_SENSITIVE:
        n, c, h, w = single.shape
        single = torch.randn(n, ps_channels(c, output), h, w, generator=generator)
    return OrderedDict(single=single.to(dtype))


def warm_up(ops: Iterable[str] = SWEEP_OPS, dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16)) -> float:
    """One tiny call of every case's code (loads numba's compiled kernels, compiling them the first time), so
    that no timed call pays it. Returns the seconds it took."""
    start = time.perf_counter()
    pyramid = _pyramid(8)
    for dtype, op, backward in itertools.product(dtypes, ops, (False, True)):
        maps = _case_maps(op, pyramid, 2, dtype)
        for fn in _sweep_callables(op, maps, sweep_boxes(8, "mixed"), 2, dtype, backward):
            fn()
    return time.perf_counter() - start


def run_sweep(counts: Iterable[int] = (64, 256, 1024, 4096), sizes: Iterable[str] = tuple(SIZES),
              outputs: Iterable[int] = (7, 14), dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16),
              threads: Iterable[int] | None = None, ops: Iterable[str] = SWEEP_OPS, channels: int = 256,
              rounds: int = 3, calls: int = 3, progress: bool = True) -> list[dict]:
    """Every case of the sweep, one row each: times, speed-ups, peak memory (bytes, None off Linux), input channels,
    threads.

    Per case (after one warm-up of every kernel): one call of each side measures its peak memory and is the first
    timed round; up to ``rounds - 1`` more interleaved rounds follow where the speed-up is near the goal (see
    :func:`_interleaved`). The objects alive after the warm-up are frozen out of Python's garbage collector for the
    sweep (``gc.freeze``): a full collection of torch's objects takes 0.2-0.5 s, and the memory measure collects
    before every call (it ran twice per case, most of the sweep's time, and a collection that fell inside a timed
    call added as much to that call)."""
    all_threads = torch.get_num_threads()
    threads = tuple(dict.fromkeys((1, all_threads))) if threads is None else tuple(threads)
    g = torch.Generator().manual_seed(0)
    pyramid = _pyramid(channels, g)
    ps_maps = {o: _case_maps("ps_roi_align", pyramid, o, torch.float32, g)["single"] for o in outputs}
    cases = list(itertools.product(threads, dtypes, ops, sizes, counts, outputs, PASSES))
    rows = []
    frozen = gc.get_freeze_count() == 0
    try:
        warm_up(ops, dtypes)
        if frozen:
            gc.collect()
            gc.freeze()
        for t, dtype, op, size, count, output, mode in tqdm(cases, desc="sweep", unit="case", disable=not progress):
            torch.set_num_threads(t)
            maps = OrderedDict(single=ps_maps[output].to(dtype)) if op in POSITION_SENSITIVE else \
                _case_maps(op, pyramid, output, dtype)
            ours, theirs = _sweep_callables(op, maps, sweep_boxes(count, size), output, dtype, mode != "forward")
            (peak_ours, ms_ours), (peak_tv, ms_tv) = _memory_and_time(ours), _memory_and_time(theirs)
            t_ours, t_tv, done = _interleaved(ours, theirs, rounds, calls, SWEEP_GOALS[mode], (ms_ours, ms_tv))
            rows.append(dict(op=op, mode=mode, boxes=count, size=size, output=output, dtype=str(dtype)[6:],
                             channels=next(iter(maps.values())).shape[1], threads=t, roikit_ms=t_ours,
                             torchvision_ms=t_tv, speedup=t_tv / t_ours, roikit_peak=peak_ours,
                             torchvision_peak=peak_tv, rounds=done))
    finally:
        torch.set_num_threads(all_threads)
        if frozen:
            gc.unfreeze()
    return rows


def _memory_and_time(fn: Callable[[], object]) -> tuple[int | None, float]:
    """Peak extra memory (bytes; None where it cannot be read) and time (ms) of one call of ``fn``."""
    if peak_memory_available() is not None:
        return None, _timed(fn, 1)
    _, peak, seconds = measure_peak(fn)
    return peak, seconds * 1000


SWEEP_GOALS = {"forward": 1.5, "forward+backward": 2.0}  # speed-up over torchvision; memory: at most 1.5x


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_sweep(rows: list[dict]) -> str:
    """A markdown table of the sweep, one row per case, with the goal met or missed. C: the input channels (the
    position-sensitive ops take a multiple of PH * PW, see :func:`ps_channels`)."""
    lines = ["| op | pass | boxes | size | out | C | dtype | threads | roikit (ms) | torchvision (ms) | speed-up | "
             "peak roikit / tv (MiB) | goal |", "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        memory_ok = None in (r["roikit_peak"], r["torchvision_peak"]) or \
            r["roikit_peak"] <= 1.5 * r["torchvision_peak"] + 2**20
        met = r["speedup"] >= SWEEP_GOALS[r["mode"]] and memory_ok
        lines.append(f"| {r['op']} | {r['mode']} | {r['boxes']} | {r['size']} | {r['output']} | "
                     f"{r.get('channels', '-')} | {r['dtype']} | "
                     f"{r['threads']} | {r['roikit_ms']:.1f} | {r['torchvision_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{_mib(r['roikit_peak'])} / {_mib(r['torchvision_peak'])} | {'met' if met else 'missed'} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path) -> None:
    """Speed-up against box count: one panel per op (columns) and pass x thread count (rows), one line per box
    size (colour) and output size (line style), float32; the goal dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_open

    ops = list(dict.fromkeys(r["op"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    panels = [(mode, t) for mode in PASSES for t in threads]
    colours = dict(zip(SIZES, ("tab:blue", "tab:orange", "tab:green")))
    styles = dict(zip(sorted({r["output"] for r in rows}), itertools.cycle(("-o", "--s", ":^"))))
    fig, axes = plt.subplots(len(panels), len(ops), figsize=(4.2 * len(ops), 2.9 * len(panels)), squeeze=False,
                             sharex=True)
    for j, op in enumerate(ops):
        for i, (mode, t) in enumerate(panels):
            ax = axes[i][j]
            for size in SIZES:
                for output, style in styles.items():
                    sel = [r for r in rows if (r["op"], r["mode"], r["size"], r["output"], r["threads"],
                                               r["dtype"]) == (op, mode, size, output, t, "float32")]
                    if sel:
                        ax.plot([r["boxes"] for r in sel], [r["speedup"] for r in sel], style, color=colours[size],
                                label=f"{size}, {output}x{output}")
            ax.axhline(SWEEP_GOALS[mode], color="k", lw=0.8, ls=":")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op}: {mode}, {t} thread{'s' if t > 1 else ''}", fontsize=10)
            ax.set_ylabel("speed-up over torchvision" if j == 0 else "")
            ax.set_xlabel("boxes" if i == len(panels) - 1 else "")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("roikit vs torchvision on the CPU, float32 (torchvision's time / roikit's; dotted: the goal)",
                 fontsize=11)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- detectors
def time_detectors(repeat: int = 10, threads: Iterable[int] = (1, 2), seed: int = 0) -> list[dict]:
    """CPU inference time per image of two detectors with random weights, and the part spent in the box pooler.

    * ``base_shapes``: roikit's default detector (configs/base_shapes.yaml: small CNN at stride 16, RoIAlign
      aligned, 300 proposals), one 320 x 320 image.
    * ``mobilenet_v3_fpn``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (resized to 480 x 640, 1,000
      proposals) with its ``MultiScaleRoIAlign`` swapped for roikit's ``RoIPooler`` (the same sampling), one
      640 x 480 image; and the same model with torchvision's own pooler.

    Median of ``repeat`` runs after 2 warm-up runs. Only absolute imports of APIs that already existed at commit
    4db371e, so the same code can time an older checkout (docs/benchmarks.md shows how).
    """
    from pathlib import Path

    import torch
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    from roikit.engine.config import load_config
    from roikit.modeling import build_detector, swap_roi_pooler

    torch.manual_seed(seed)
    config = Path(__file__).resolve().parents[2] / "configs" / "base_shapes.yaml"
    cfg = load_config(config)
    cfg["model"]["num_classes"] = 6  # the shapes set's classes
    shapes = build_detector(cfg).eval()
    tv_own = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=480, max_size=640).eval()
    tv_swapped = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=480,
                                                   max_size=640).eval()
    tv_swapped.load_state_dict(tv_own.state_dict())
    for model in (tv_own, tv_swapped):  # its pooler names maps '0' .. '3'; the backbone gives '0', '1' (and 'pool'):
        model.roi_heads.box_roi_pool.featmap_names = ["0", "1"]  # torchvision's pooler skips the others silently
    swap_roi_pooler(tv_swapped, "roi_align", aligned=False)
    g = torch.Generator().manual_seed(seed)
    cases = [("base_shapes", "roikit RoIAlign", shapes, torch.rand(3, 320, 320, generator=g)),
             ("mobilenet_v3_fpn", "roikit RoIPooler", tv_swapped, torch.rand(3, 480, 640, generator=g)),
             ("mobilenet_v3_fpn", "torchvision MultiScaleRoIAlign", tv_own, torch.rand(3, 480, 640, generator=g))]
    before = torch.get_num_threads()
    rows = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            for name, pooler, model, image in cases:
                pool_times = []

                def start(module, args):
                    module._bench_start = time.perf_counter()

                def stop(module, args, output):
                    pool_times.append((time.perf_counter() - module._bench_start) * 1000)

                hooks = [model.roi_heads.box_roi_pool.register_forward_pre_hook(start),
                         model.roi_heads.box_roi_pool.register_forward_hook(stop)]
                with torch.no_grad():
                    for _ in range(2):
                        model([image])
                    pool_times.clear()
                    total = time_ms(lambda m=model, x=image: m([x]), repeat=repeat, warmup=0)
                for h in hooks:
                    h.remove()
                rows.append(dict(model=name, pooler=pooler, threads=t, image=f"{image.shape[2]} x {image.shape[1]}",
                                 total_ms=total, pooler_ms=statistics.median(pool_times)))
    finally:
        torch.set_num_threads(before)
    return rows


def format_detectors(rows: list[dict]) -> str:
    lines = ["| model | pooler | threads | image | per image (ms) | in the pooler (ms) |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pooler']} | {r['threads']} | {r['image']} | {r['total_ms']:.1f} | "
                     f"{r['pooler_ms']:.1f} |")
    return "\n".join(lines)
