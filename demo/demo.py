"""Run a detector on an image, a folder, a video or a camera, and show what its region pooling sees.

    python demo/demo.py --input photo.jpg                  # no --checkpoint: trains a quick model once, then reuses it
    python demo/demo.py --config configs/base_shapes.yaml --checkpoint runs/base_shapes/checkpoint.pth \\
        --input clip.mp4 --output-dir outputs/demo/clip
    python demo/demo.py --input 0 --show                   # camera 0, in a window
    python demo/demo.py --input photo.jpg --explain-pooling --detection 1
    python demo/demo.py --input photos/ --model torchvision:fasterrcnn_resnet50_fpn \\
        --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --explain-pooling     # real objects, COCO's 80 classes
    python demo/demo.py --input val2017/000000022892.jpg --annotations instances_val2017.json --explain-pooling

The model: with no --checkpoint and no --model, a quick model trained on synthetic shapes (it knows six shapes,
nothing of a photo); --checkpoint, a roikit detector from tools/train.py; --model torchvision:NAME --weights FILE,
torchvision's detector with the weights of a local file (nothing is downloaded). --annotations FILE runs no
model: the file's boxes for each image (matched by file name; crowd boxes left out) are drawn and explained with
their category names, so one sees what each pooling rule reads on real objects without a detector.

Annotated images keep their file names; a video or camera becomes ``<name>.mp4`` (mp4v, else MJPG ``.avi``). With
``--explain-pooling`` each image also gets ``<name>_explain.png`` (a video ``<name>_explain.mp4``): for one
detection, the feature-grid cells that ``roi_pool`` reads with integer and with torchvision rounding and the sample
points of ``roi_align``, each over the picture as the network sees it, and below them the 7x7 crop each rule makes
of the picture itself (area-averaged to the stride, so a 3-channel "feature map" whose cells one can see). Where
two inputs would share an output name (``a.png`` and ``a.jpg`` both ``a.json``) the stem takes the suffix
(``a_png.json``).

An image of a folder that cannot be read or run is reported and skipped; the exit status is then 1 (2: bad
arguments, nothing done). A JPEG file cut short is run, with a warning.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # OpenCV's own warnings would repeat our one-line errors
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet ("moov atom not found" for a broken file)

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sources.py and detector.py, beside this script
import detector
from sources import (
    AnnotationBoxes,
    Source,
    VideoOut,
    display_problem,
    open_source,
    output_names,
    read_image,
    say,
    write_image,
)

from roikit.analysis.drawing import draw_detections, put_text_lines
from roikit.analysis.pooling_view import blank_explain, explain_box, explain_pooling, fpn_stride
from roikit.engine.config import load_config
from roikit.engine.inference import detect
from roikit.io import atomic_save_json
from roikit.io import output_dir as make_output_dir
from roikit.modeling.torchvision_models import TORCHVISION_MODELS
from roikit.utils.threads import add_threads_argument, torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "base_shapes.yaml"
DEFAULT_QUICK = ROOT / "outputs" / "demo" / "quick.pt"
DEFAULT_OUTPUT = Path("outputs") / "demo" / "results"
WINDOW, EXPLAIN_WINDOW = "roikit demo", "roikit demo: pooling"
STRIDES = (4, 8, 16, 32)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--input", required=True, metavar="PATH|INDEX",
                        help="an image, a folder of images, a video file, or a camera index (0)")
    model = parser.add_argument_group("the model (default: the quick model, synthetic shapes only)")
    model.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="roikit YAML config of --checkpoint and of the quick model (default: %(default)s)")
    model.add_argument("--checkpoint", default=None,
                       help="a roikit checkpoint from tools/train.py; none (and no --model or --annotations): "
                            "train a quick model on synthetic shapes once and reuse it")
    model.add_argument("--quick-checkpoint", default=str(DEFAULT_QUICK),
                       help="where the quick model is cached (default: %(default)s)")
    model.add_argument("--quick-iters", type=int, default=detector.QUICK_ITERS,
                       help="training iterations of the quick model (default: %(default)s)")
    model.add_argument("--model", default=None, metavar="torchvision:NAME",
                       help=f"torchvision's detector instead, NAME one of {', '.join(TORCHVISION_MODELS)}; "
                            "needs --weights")
    model.add_argument("--weights", default=None, metavar="FILE",
                       help="the --model's weights file (torchvision's COCO file, e.g. "
                            "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth, or any state_dict of that model)")
    model.add_argument("--min-size", type=int, default=None,
                       help="--model: the short side images are resized to (default: torchvision's 800)")
    model.add_argument("--max-size", type=int, default=None,
                       help="--model: the most the long side may get (default: torchvision's 1333)")
    model.add_argument("--annotations", default=None, metavar="FILE",
                       help="no model: draw and explain the boxes of this COCO instances JSON for each input "
                            "image (matched by file name; crowd boxes left out)")
    model.add_argument("--stride", type=int, choices=STRIDES, default=None,
                       help="--annotations: the feature stride the pooling view uses (default: the FPN level a "
                            "Faster R-CNN FPN pools the box from, 4 to 32 by its size)")
    parser.add_argument("--output-dir", default=None,
                        help=f"annotated images / video go here (default: {DEFAULT_OUTPUT}, none with --show)")
    parser.add_argument("--show", action="store_true", help="show the results in a window (q or Esc quits)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this (default: %(default)s)")
    parser.add_argument("--explain-pooling", action="store_true",
                        help="also draw, for one detection, the cells each pooling rule reads and its 7x7 crop")
    parser.add_argument("--detection", type=int, default=0, metavar="INDEX",
                        help="the detection to explain: 0 = the top-scoring one (with --annotations, the largest "
                             "box) (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop a video or camera after this many frames")
    parser.add_argument("--save-detections", action="store_true",
                        help="also write the detections as JSON (<name>.json)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when there is one, else cpu), cpu, cuda or cuda:N (default: %(default)s)")
    add_threads_argument(parser, "the small model is fastest on one thread, and several slow down ten-fold when "
                                 "another process holds a core")
    parser.add_argument("opts", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. model.rpn.nms_thresh=0.6")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.detection < 0:
        raise ValueError(f"--detection must be >= 0, got {args.detection}")
    if args.detection and not args.explain_pooling:
        raise ValueError("--detection chooses the detection --explain-pooling explains; add --explain-pooling")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.quick_iters < 1:
        raise ValueError(f"--quick-iters must be >= 1, got {args.quick_iters}")
    for flag, value in (("--min-size", args.min_size), ("--max-size", args.max_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if (args.model is None) != (args.weights is None):
        raise ValueError("--model torchvision:NAME and --weights FILE go together")
    if args.model is None and (args.min_size or args.max_size):
        raise ValueError("--min-size and --max-size set a --model's transform (a roikit config sets "
                         "model.transform.min_size)")
    if args.model is not None and args.checkpoint is not None:
        raise ValueError("give --checkpoint (a roikit detector) or --model (torchvision's), not both")
    if args.annotations is not None and (args.model is not None or args.checkpoint is not None):
        raise ValueError("--annotations draws the file's boxes instead of a model's detections: leave out "
                         "--checkpoint and --model")
    if args.opts and (args.model is not None or args.annotations is not None):
        raise ValueError(f"config overrides ({args.opts[0]} ...) set a roikit model; --model and --annotations "
                         f"take none")
    if args.stride is not None and args.annotations is None:
        raise ValueError("--stride sets the pooling view of --annotations (a model's own pooler sets it otherwise)")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


class Runner:
    """Detects (or looks up the annotation file's boxes), draws, writes and shows frames; holds what every frame
    shares. ``model`` None: ``annotations`` gives the boxes. ``cfg`` None with a model: torchvision's."""

    def __init__(self, args, model, cfg, class_names, output_dir: Path | None, show: bool,
                 annotations: AnnotationBoxes | None = None):
        self.args, self.model, self.cfg, self.class_names = args, model, cfg, class_names
        self.output_dir, self.show, self.annotations = output_dir, show, annotations
        self.quit = False
        self.empty = 0  # images or frames with nothing to draw
        if model is not None:
            # the model drops scores under model.roi_heads.score_thresh itself; a lower --score-threshold shows more
            # (set on the module, not in the config, which must stay the checkpoint's)
            model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, args.score_threshold)

    def annotate(self, image: np.ndarray, fps: float | None = None, path: Path | None = None):
        t0 = time.perf_counter()
        if self.annotations is not None:
            dets = self.annotations.detections(path, image.shape)
        else:
            dets = detect(self.model, image, self.args.score_threshold)
        t1 = time.perf_counter()
        self.empty += len(dets["boxes"]) == 0
        drawn = draw_detections(image.copy(), dets["boxes"], dets["labels"], dets.get("scores"), self.class_names)
        if fps is not None:
            put_text_lines(drawn, f"{fps:.1f} fps", (4, drawn.shape[0] - 24))
        t2 = time.perf_counter()
        return dets, drawn, (t1 - t0, t2 - t1)

    def explain(self, image: np.ndarray, dets: dict, where: str, *, quiet: bool = False):
        k = self.args.detection
        if k >= len(dets["boxes"]):
            what = "box(es) in the annotation file" if self.annotations is not None else \
                f"with a score >= {self.args.score_threshold}"
            if not quiet:
                say(f"{where}: no detection {k} to explain ({len(dets['boxes'])} {what})")
            return blank_explain(256, f"no detection {k}\nto explain"), None
        if self.model is not None:
            return explain_pooling(self.model, self.cfg, image, dets, k, self.class_names)
        box, label = dets["boxes"][k], int(dets["labels"][k])
        seen = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float64) / 255.0
        name = self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)
        stride = self.args.stride or fpn_stride(box)
        view, info = explain_box(seen, box, f"box {k}: {name} (annotation {dets['annotation_ids'][k]})",
                                 f"in the {image.shape[1]}x{image.shape[0]} image", stride=stride, label=label,
                                 class_names=self.class_names, index=k)
        return view, {**info, "annotation_id": int(dets["annotation_ids"][k])}

    def display(self, drawn: np.ndarray, view: np.ndarray | None, wait: int) -> None:
        if not self.show:
            return
        cv2.imshow(WINDOW, drawn)
        if view is not None:
            cv2.imshow(EXPLAIN_WINDOW, view)
        key = cv2.waitKey(wait) & 0xFF
        if key in (ord("q"), 27):
            self.quit = True

    def record(self, dets: dict) -> dict:
        out = {"boxes": np.round(dets["boxes"], 2).tolist(), "labels": dets["labels"].tolist(),
               "names": [self.class_names[i - 1] if 1 <= i <= len(self.class_names) else str(i)
                         for i in dets["labels"].tolist()]}
        if "scores" in dets:
            out["scores"] = dets["scores"].tolist()
        if "annotation_ids" in dets:
            out["annotation_ids"] = dets["annotation_ids"].tolist()
            out["crowd_ids_left_out"] = dets["crowd_ids"]
        return out

    def run_images(self, paths: list[Path]) -> int:
        """Each image in turn; one that cannot be read or run is reported and skipped. Returns how many were."""
        names, failed = output_names(paths), 0
        for path in paths:
            try:
                self.run_image(path, names[path])
            except ValueError as e:
                failed += 1
                say(f"error: {e}" + ("; skipped" if len(paths) > 1 else ""))
            if self.quit:
                break
        if failed and len(paths) > 1:
            say(f"error: {failed} of {len(paths)} images could not be read or run (above); the others are done")
        return failed

    def run_image(self, path: Path, names: dict[str, str]) -> None:
        image = read_image(path)
        try:
            dets, drawn, (t_model, t_draw) = self.annotate(image, path=path)
            view, info = self.explain(image, dets, path.name) if self.args.explain_pooling else (None, None)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        written = []
        if self.output_dir is not None:
            written.append(write_image(self.output_dir / names["image"], drawn))
            if view is not None and info is not None:
                written.append(write_image(self.output_dir / names["explain"], view))
            if self.args.save_detections:
                record = {"image": path.name, "size": [image.shape[1], image.shape[0]], **self.record(dets)}
                if info is not None:
                    record["explain"] = info
                atomic_save_json(self.output_dir / names["json"], record)
                written.append(self.output_dir / names["json"])
        if self.annotations is not None:
            crowd = len(dets["crowd_ids"])
            found = f"{len(dets['boxes'])} box(es) from {self.annotations.path.name}" + (
                f" ({crowd} crowd box(es) left out)" if crowd else "")
        else:
            found = f"{len(dets['boxes'])} detection(s), {1000 * t_model:.0f} ms model"
        print(f"{path.name}: {found} + {1000 * t_draw:.0f} ms drawing"
              + (f" -> {', '.join(map(str, written))}" if written else ""), flush=True)
        if info is not None:
            box = " ".join(f"{v:.1f}" for v in info["box_net_px"])
            print(f"  pooling of {'box' if self.model is None else 'detection'} {info['detection']} (box {box} "
                  f"{'in the image' if self.model is None else 'at the network input'}, stride {info['stride']}); "
                  f"its arithmetic: python tools/explain.py --box {box} --stride {info['stride']}", flush=True)
        self.display(drawn, view, 0)

    def run_video(self, source: Source) -> None:
        out = VideoOut(self.output_dir, source.name, source.fps) if self.output_dir is not None else None
        out_explain = VideoOut(self.output_dir, f"{source.name}_explain", source.fps) \
            if self.output_dir is not None and self.args.explain_pooling else None
        records, frames, fps, busy = [], 0, None, 0.0
        t_model_sum = t_draw_sum = 0.0
        try:
            while not self.quit and (self.args.max_frames is None or frames < self.args.max_frames):
                t0 = time.perf_counter()  # a frame's time: decode, detect, draw, encode, show
                ok, image = source.capture.read()
                if not ok:
                    break
                dets, drawn, (t_model, t_draw) = self.annotate(image, fps)
                view = None
                if self.args.explain_pooling:
                    view, _ = self.explain(image, dets, f"frame {frames}", quiet=True)
                t_model_sum, t_draw_sum = t_model_sum + t_model, t_draw_sum + t_draw
                if out is not None:
                    out.write(drawn)
                if out_explain is not None:
                    out_explain.write(view)
                if self.args.save_detections:
                    records.append({"frame": frames, **self.record(dets)})
                frames += 1
                self.display(drawn, view, 1)
                spent = time.perf_counter() - t0
                busy += spent
                fps = 1.0 / spent if fps is None else 0.9 * fps + 0.1 / spent  # drawn on the next frame
        except KeyboardInterrupt:
            say("interrupted; closing the video")
        except BaseException:
            for video in (out, out_explain):
                if video is not None:
                    video.discard()
            raise
        finally:
            source.capture.release()
        if frames == 0:
            raise ValueError(f"no frame could be read from {self.args.input}")
        written = [p for p in (out.close() if out else None, out_explain.close() if out_explain else None) if p]
        if self.args.save_detections and self.output_dir is not None:
            atomic_save_json(self.output_dir / f"{source.name}.json", {"input": self.args.input, "frames": records})
            written.append(self.output_dir / f"{source.name}.json")
        print(f"{source.name}: {frames} frame(s), {frames / busy:.1f} fps in all ({1000 * t_model_sum / frames:.0f} "
              f"ms model + {1000 * t_draw_sum / frames:.0f} ms drawing a frame, the rest reading and writing)"
              + (f" -> {', '.join(map(str, written))}" if written else ""), flush=True)

    def hint(self) -> None:
        """One line when some image or frame had nothing to draw: why, and what to try."""
        if not self.empty or self.annotations is not None:
            return
        if detector.knows_only_shapes(self.class_names):
            say(f"hint: nothing detected in {self.empty} image(s) or frame(s): this model only knows synthetic "
                f"shapes; for the objects of a photo use --model torchvision:fasterrcnn_resnet50_fpn --weights FILE, "
                f"or --annotations FILE to explain a COCO file's boxes")
        else:
            say(f"hint: nothing scored >= --score-threshold {self.args.score_threshold} in {self.empty} image(s) or "
                f"frame(s); a lower threshold shows more")


def _check_output_dir(output_dir: Path, source: Source, input_text: str) -> None:
    """Refuse an output folder where a result would replace an input."""
    out = output_dir.resolve()
    if source.paths and out in {p.parent.resolve() for p in source.paths}:
        raise ValueError(f"--output-dir {output_dir} holds the input images, which the results would replace")
    if source.kind == "video" and Path(input_text).resolve() in {out / f"{source.name}{s}" for s in (".mp4", ".avi")}:
        raise ValueError(f"--output-dir {output_dir}: the annotated video would replace the input {input_text}")


def _load_model(args: argparse.Namespace, device: torch.device):
    """(model, roikit config or None, class names from label 1, the line that says what it is)."""
    if args.model is not None:
        model, names = detector.load_torchvision(args.model, args.weights, device, args.min_size, args.max_size)
        return model, None, names, detector.describe("torchvision", f"{args.model[len('torchvision:'):]} with the "
                                                                    f"weights of {args.weights}", names)
    cfg = load_config(args.config, args.opts)
    if args.checkpoint:
        model, cfg, names = detector.load_detector(cfg, Path(args.checkpoint), device)
        return model, cfg, names, detector.describe("roikit", args.checkpoint, names)
    checkpoint = detector.quick_checkpoint(cfg, Path(args.quick_checkpoint), args.quick_iters)
    cfg = detector.quick_config(cfg, checkpoint, args.quick_iters)
    model, cfg, names = detector.load_detector(cfg, checkpoint, device)
    return model, cfg, names, detector.describe("quick", str(checkpoint), names, str(args.quick_iters))


def main(args: argparse.Namespace) -> int:
    show, source = False, None
    try:
        with torch_threads(args.threads):  # restored after: main() may run inside another program (the tests)
            _check_args(args)
            source = open_source(args.input)  # bad input fails before a model is loaded or trained
            if args.annotations is not None and source.kind not in ("image", "folder"):
                raise ValueError("--annotations takes an image or a folder of images (boxes are found by file "
                                 "name), not a video or a camera")
            if args.show:
                problem = display_problem()
                if problem:
                    say(f"--show: no display available ({problem}); writing files instead")
                show = problem is None
            output_dir = Path(args.output_dir) if args.output_dir else (None if show else DEFAULT_OUTPUT)
            if output_dir is not None:
                _check_output_dir(output_dir, source, args.input)
                output_dir = make_output_dir(output_dir, "--output-dir")
            if args.annotations is not None:
                annotations = AnnotationBoxes(args.annotations)
                model, cfg, names = None, None, annotations.class_names
                print(f"model: none: the boxes of {args.annotations} for each image, with their category names "
                      f"(no detector runs)", flush=True)
            else:
                annotations = None
                model, cfg, names, about = _load_model(args, _device(args.device))
                print(about, flush=True)
            runner = Runner(args, model, cfg, names, output_dir, show, annotations)
            if source.kind in ("image", "folder"):
                failed = runner.run_images(source.paths)
            else:
                runner.run_video(source)
                failed = 0
            runner.hint()
            if failed:
                return 1
    except (ValueError, FloatingPointError, OSError) as e:  # OSError: an output that cannot be written
        say(f"error: {e}")
        return 2
    finally:
        if source is not None and source.capture is not None:
            source.capture.release()
        if show:
            cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
