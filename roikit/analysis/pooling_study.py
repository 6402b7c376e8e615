"""The pooling study: which pooling head classifies ground-truth crops of the synthetic shapes best?

Every ground-truth box is cut out of its image (the exact pixels inside the box, see ``crop_box``) and resized to
``crop_size`` x ``crop_size``. One small CNN trunk (the same architecture, the same initial weights, the same data
order for every head) turns a crop into a ``[C, S, S]`` map, and a pooling head turns the map into a vector for a
linear classifier (the box head's own pools, :func:`roikit.modeling.build_head_pool`):

- ``global_max``: global max pooling, ``[C]``.
- ``global_avg``: global average pooling, ``[C]``.
- ``stochastic``: global stochastic pooling, a ``StochasticPool2d`` whose window is the whole map: in training one
  position per channel drawn with probability proportional to its activation, in evaluation the
  probability-weighted average, ``[C]``.
- ``bilinear``: full bilinear pooling of the map with itself (signed square root, L2 normalisation), ``[C * C]``.
- ``compact_bilinear``: its Tensor Sketch, ``[compact_dim]``.

``run_study`` trains each head in turn on the same crops and measures validation accuracy, training time and
inference time. All of it runs on the CPU in one process, so the times of the heads are comparable with each other
(within the noise of a shared machine), not with other machines.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import StochasticPool2d
from ..modeling.box_head import build_head_pool, pooled_dim

__all__ = [
    "HEADS", "StudyConfig", "crop_box", "extract_crops", "Trunk", "make_head", "CropClassifier", "train_head",
    "evaluate", "run_study", "wilson_interval", "format_table", "plot_results",
]

HEADS = ("global_max", "global_avg", "stochastic", "bilinear", "compact_bilinear")  # names of build_head_pool


@dataclasses.dataclass
class StudyConfig:
    train_crops: int = 3000
    val_crops: int = 1000
    crop_size: int = 32
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16  # channels of the trunk's first layer; the map has 4 * width channels
    compact_dim: int = 512  # C * C = 4096 for the default trunk: 8x smaller
    seed: int = 0
    heads: Sequence[str] = HEADS
    eval_batch_size: int = 256
    inference_repeats: int = 3  # the inference time is the fastest of these passes over the val crops

    def __post_init__(self) -> None:
        for name in ("train_crops", "val_crops", "crop_size", "epochs", "batch_size", "width", "compact_dim",
                     "eval_batch_size", "inference_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.crop_size < 8:
            raise ValueError(f"crop_size must be at least 8 (the trunk halves it twice), got {self.crop_size}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        self.heads = tuple(self.heads)
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be distinct names among {', '.join(HEADS)}, got {list(self.heads)}")


# ---------------------------------------------------------------- crops


def crop_box(image: Tensor, box: Sequence[float] | Tensor) -> Tensor:
    """The pixels of ``image`` inside ``box``: ``image[:, y1:y2, x1:x2]`` (a view, not a copy).

    Args:
        image (Tensor[C, H, W]): the image.
        box (4 numbers, x1, y1, x2, y2): in pixels, a pixel (col i, row j) covering ``[i, i + 1) x [j, j + 1)``,
            so the box ``(x, y, x + w, y + h)`` of COCO's ``[x, y, w, h]`` covers ``w`` columns from column ``x``.
            A fractional edge is rounded outwards (every pixel the box touches is kept), and the box is clipped
            to the image.

    Returns:
        Tensor[C, y2 - y1, x2 - x1].
    """
    if not isinstance(image, Tensor) or image.dim() != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a Tensor[C, H, W], got {got}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be finite, got {(x1, y1, x2, y2)}")
    h, w = image.shape[1:]
    c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    c2, r2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    if c2 <= c1 or r2 <= r1:
        raise ValueError(f"box {(x1, y1, x2, y2)} covers no pixel of a {h}x{w} image")
    return image[:, r1:r2, c1:c2]


def resize_crop(crop: Tensor, size: int) -> Tensor:
    """``[C, h, w] -> [C, size, size]``, bilinear with antialiasing (crops are mostly shrunk: 12 to 180 px)."""
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def extract_crops(dataset, max_crops: int, size: int, progress: bool = False) -> dict:
    """The first ``max_crops`` ground-truth crops of ``dataset``, in image order then annotation order.

    Args:
        dataset: a ``roikit.data.CocoDetection`` (``(image [3, H, W], target with boxes and labels)``).
        max_crops (int): how many; ``ValueError`` when the data set has fewer boxes.
        size (int): side of the resized crops.

    Returns:
        dict: ``crops`` (Tensor[N, 3, size, size] float32), ``labels`` (Tensor[N] int64, 0-based: the data set's
        label - 1), ``sources`` (list of ``(dataset index, box x1 y1 x2 y2)``, where each crop came from).
    """
    from tqdm import tqdm

    crops, labels, sources = [], [], []
    with tqdm(total=max_crops, desc="crops", unit="crop", disable=not progress, leave=False) as bar:
        for index in range(len(dataset)):
            image, target = dataset[index]
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                crops.append(resize_crop(crop_box(image, box), size))
                labels.append(label - 1)
                sources.append((index, box))
                bar.update(1)
                if len(crops) == max_crops:
                    return {"crops": torch.stack(crops), "labels": torch.tensor(labels), "sources": sources}
    raise ValueError(f"{getattr(dataset, 'ann_file', 'the data set')} has only {len(crops)} boxes, {max_crops} wanted; "
                     "generate more images")


# ---------------------------------------------------------------- model


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Trunk(nn.Module):
    """Four 3x3 conv + BN + ReLU layers, two 2x2 max pools: ``[N, 3, S, S] -> [N, 4 * width, S // 4, S // 4]``.

    Pooling early keeps it cheap on a CPU (a 32 px crop costs about 5 M multiply-adds). It ends with a ReLU, so the
    map is non-negative, as stochastic pooling needs.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.out_channels = 4 * width
        self.body = nn.Sequential(
            _conv(3, width), nn.MaxPool2d(2), _conv(width, 2 * width), nn.MaxPool2d(2),
            _conv(2 * width, 4 * width), _conv(4 * width, 4 * width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_head(name: str, channels: int, map_size: int, compact_dim: int = 512, seed: int = 0) -> tuple[nn.Module, int]:
    """The box head's pool ``name`` (:func:`roikit.modeling.build_head_pool`) over the whole
    ``[N, channels, map_size, map_size]`` map, and its output dimension: stochastic pooling takes one window of
    the whole map, compact bilinear pooling ``compact_dim`` outputs."""
    if name not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")
    options = {"stochastic": {"kernel_size": map_size},
               "compact_bilinear": {"output_dim": compact_dim, "seed": seed}}.get(name, {})
    head = build_head_pool(name, channels, options)
    return head, pooled_dim(head, (channels, map_size, map_size))


class CropClassifier(nn.Module):
    """``trunk -> pooling head -> linear``: ``[N, 3, S, S] -> [N, num_classes]`` logits."""

    def __init__(self, trunk: Trunk, head: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.trunk(x)))


# ---------------------------------------------------------------- train, evaluate


def train_head(model: CropClassifier, crops: Tensor, labels: Tensor, config: StudyConfig, bar=None) -> list[float]:
    """Adam with a cosine schedule for ``config.epochs`` epochs; returns the mean training loss of each epoch.

    The batch order comes from a generator seeded with ``config.seed``, so every head sees the same batches.
    """
    order_gen = torch.Generator().manual_seed(config.seed)
    for layer in model.head.modules():
        if isinstance(layer, StochasticPool2d):  # reproducible draws
            layer.generator = torch.Generator().manual_seed(config.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(crops) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    losses = []
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(crops), generator=order_gen)
        total = 0.0
        for start in range(0, len(crops), config.batch_size):
            idx = perm[start:start + config.batch_size]
            loss = F.cross_entropy(model(crops[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            if bar is not None:
                bar.update(1)
        losses.append(total / len(crops))
    return losses


@torch.inference_mode()
def evaluate(model: nn.Module, crops: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted class of every crop (eval mode: BN statistics, stochastic pooling's weighted average)."""
    model.eval()
    return torch.cat([model(crops[i:i + batch_size]).argmax(1) for i in range(0, len(crops), batch_size)])


def _time_head(head: nn.Module, classifier: nn.Module, map_shape, config: StudyConfig, repeats: int = 10) -> float:
    # the pooling head alone (with its classifier): forward + backward of one training batch of maps, fastest of
    # `repeats`; separates the head's own cost from the trunk's, which every head shares
    maps = torch.rand(config.batch_size, *map_shape, generator=torch.Generator().manual_seed(config.seed))
    maps.requires_grad_(True)
    head.train()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        classifier(head(maps)).sum().backward()
        best = min(best, time.perf_counter() - start)
    head.zero_grad(set_to_none=True)
    classifier.zero_grad(set_to_none=True)
    return 1000 * best


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (the spread of an accuracy measured on ``total`` crops)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def run_study(train_set, val_set, config: StudyConfig, progress: bool = True) -> dict:
    """Extract the crops once, then train and evaluate every head of ``config.heads`` on them.

    Args:
        train_set, val_set: ``CocoDetection`` data sets (the boxes' labels are 1..num_classes).
        config (StudyConfig): sizes, schedule, seed, heads.
        progress (bool): tqdm bars.

    Returns:
        A JSON-ready dict: ``config``, ``machine``, ``data`` (crop counts, class counts, extraction time), and
        ``heads``: for each head its feature dimension, parameters, validation accuracy with its 95 % interval,
        per-class accuracy, the training losses, the training time and the inference time.
    """
    from tqdm import tqdm

    num_classes = train_set.num_classes
    load_start = _loadavg()
    t0 = time.perf_counter()
    train = extract_crops(train_set, config.train_crops, config.crop_size, progress)
    val = extract_crops(val_set, config.val_crops, config.crop_size, progress)
    extract_s = time.perf_counter() - t0

    probe = Trunk(config.width).eval()
    with torch.no_grad():
        map_shape = tuple(probe(train["crops"][:1]).shape[1:])  # [C, S', S']
    steps = config.epochs * math.ceil(config.train_crops / config.batch_size)
    results = {}
    with tqdm(total=steps * len(config.heads), desc="pooling study", unit="step", disable=not progress) as bar:
        for name in config.heads:
            bar.set_postfix_str(name)
            torch.manual_seed(config.seed)  # the same initial trunk for every head
            trunk = Trunk(config.width)
            head, feature_dim = make_head(name, map_shape[0], map_shape[1], config.compact_dim, config.seed)
            torch.manual_seed(config.seed + 2)
            model = CropClassifier(trunk, head, feature_dim, num_classes)

            start, cpu = time.perf_counter(), time.process_time()
            losses = train_head(model, train["crops"], train["labels"], config, bar)
            train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu

            times, cpu_times = [], []
            for _ in range(config.inference_repeats):
                start, cpu = time.perf_counter(), time.process_time()
                pred = evaluate(model, val["crops"], config.eval_batch_size)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu)
            head_ms = _time_head(model.head, model.classifier, map_shape, config)
            correct = pred == val["labels"]
            n_correct = int(correct.sum())
            low, high = wilson_interval(n_correct, len(correct))
            per_class = {}
            for c in range(num_classes):
                mask = val["labels"] == c
                per_class[_class_name(val_set, c)] = float(correct[mask].float().mean()) if mask.any() else None
            results[name] = {
                "feature_dim": feature_dim,
                "parameters": sum(p.numel() for p in model.parameters()),
                "val_accuracy": n_correct / len(correct),
                "val_correct": n_correct,
                "val_accuracy_95ci": [low, high],
                "val_accuracy_per_class": per_class,
                "train_loss_per_epoch": losses,
                "train_s": train_s,
                "train_cpu_s": train_cpu_s,
                "train_ms_per_crop": 1000 * train_s / (config.epochs * config.train_crops),
                "inference_s": min(times),
                "inference_s_all": times,
                "inference_cpu_s_all": cpu_times,
                "inference_us_per_crop": 1e6 * min(times) / config.val_crops,
                "inference_cpu_us_per_crop": 1e6 * min(cpu_times) / config.val_crops,
                "head_train_step_ms": head_ms,
            }
    counts = torch.bincount(train["labels"], minlength=num_classes).tolist()
    val_counts = torch.bincount(val["labels"], minlength=num_classes).tolist()
    return {
        "config": dataclasses.asdict(config) | {"heads": list(config.heads)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15_start": load_start,  # other jobs on the machine: the times depend on it
            "loadavg_1_5_15_end": _loadavg(),
        },
        "data": {
            "train_crops": config.train_crops,
            "val_crops": config.val_crops,
            "train_images_used": train["sources"][-1][0] + 1,
            "val_images_used": val["sources"][-1][0] + 1,
            "train_class_counts": counts,
            "val_class_counts": val_counts,
            "map_shape": list(map_shape),
            "crop_extraction_s": extract_s,
        },
        "heads": results,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _class_name(dataset, c: int) -> str:
    names = getattr(dataset, "class_names", None)
    return names[c] if names and c < len(names) else str(c + 1)


# ---------------------------------------------------------------- report


def format_table(results: dict) -> str:
    """A Markdown table of the measured numbers, one row per head."""
    lines = [
        "| head | feature dim | parameters | val accuracy (95 % CI) | train time, wall / CPU (s) "
        "| inference, wall / CPU (µs / crop) | head alone, train step (ms) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in results["heads"].items():
        low, high = r["val_accuracy_95ci"]
        lines.append(
            f"| {name} | {r['feature_dim']:,} | {r['parameters']:,} | {r['val_accuracy']:.3f} ({low:.3f}-{high:.3f}) "
            f"| {r['train_s']:.1f} / {r['train_cpu_s']:.1f} "
            f"| {r['inference_us_per_crop']:.0f} / {r['inference_cpu_us_per_crop']:.0f} "
            f"| {r['head_train_step_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path) -> None:
    """A bar chart (validation accuracy with its 95 % interval, training time, inference time) written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from roikit.io import atomic_open

    names = list(results["heads"])
    heads = [results["heads"][n] for n in names]
    acc = [h["val_accuracy"] for h in heads]
    err = [[a - h["val_accuracy_95ci"][0] for a, h in zip(acc, heads)],
           [h["val_accuracy_95ci"][1] - a for a, h in zip(acc, heads)]]
    colours = [f"C{i}" for i in range(len(names))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=90)
    axes[0].bar(names, acc, yerr=err, capsize=3, color=colours)
    axes[0].set_ylim(0.0, 1.0)
    axes[0].set_title("val accuracy (95% CI)")
    x = range(len(names))
    for ax, wall, cpu, title in (
        (axes[1], "train_s", "train_cpu_s", "train time (s)"),
        (axes[2], "inference_us_per_crop", "inference_cpu_us_per_crop", "inference (µs / crop)"),
    ):
        ax.bar([i - 0.2 for i in x], [h[wall] for h in heads], width=0.4, color=colours, label="wall")
        ax.bar([i + 0.2 for i in x], [h[cpu] for h in heads], width=0.4, color=colours, alpha=0.45, hatch="//",
               label="CPU")
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    cfg = results["config"]
    fig.suptitle(f"pooling heads on {cfg['train_crops']} / {cfg['val_crops']} shape crops "
                 f"({cfg['crop_size']} px, {cfg['epochs']} epochs, seed {cfg['seed']})", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
