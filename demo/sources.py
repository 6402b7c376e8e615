"""The demo's inputs and outputs: images, folders of images, video files and cameras in; images and videos out.

Every error is a ValueError with one line that names the input; ``say`` prints the demo's messages
(``demo.py: ...``) on stderr.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from roikit.io import atomic_write_bytes

__all__ = ["PROG", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "say", "Source", "read_image", "jpeg_truncation",
           "output_names", "open_source", "VideoOut", "remove_dead_temporaries", "write_image", "display_problem",
           "AnnotationBoxes"]

PROG = "demo.py"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


def say(message: str) -> None:
    """The demo's message on stderr, one line: ``demo.py: <message>``."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@dataclass
class Source:
    kind: str  # image | folder | video | camera
    name: str  # output name stem (video, camera)
    paths: list[Path]  # image, folder
    capture: cv2.VideoCapture | None = None
    fps: float = 30.0


def read_image(path: Path, *, warn: bool = True) -> np.ndarray:
    """The BGR image in ``path``; ValueError when it cannot be decoded. A JPEG file that ends before its image
    does decodes with its missing part filled in: ``warn`` says so."""
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}: not an image file OpenCV can decode, or damaged")
    problem = jpeg_truncation(path) if warn else None
    if problem:
        say(f"warning: {path} is incomplete ({problem}): its missing part is drawn grey")
    return image


def jpeg_truncation(path: Path) -> str | None:
    """Why the JPEG file ``path`` is cut short (its data ends before its image does), or None (complete, or not a
    JPEG). OpenCV decodes such a file without an error; Pillow, reading it at 1/8 scale, stops at the gap."""
    from PIL import Image

    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))  # libjpeg's scaled decode
            im.load()
    except OSError as e:  # "image file is truncated (279 bytes not processed)"
        return str(e)
    return None


def output_names(paths: list[Path]) -> dict[Path, dict[str, str]]:
    """The files each input image's results go to, no two the same: ``image`` (the annotated image, under the
    input's own file name), ``explain`` (``<stem>_explain.png``) and ``json`` (``<stem>.json``). Inputs sharing a
    stem (``a.png``, ``a.jpg``) use stems with the suffix (``a_png``, ``a_jpg``); a stem whose names are still
    taken (by ``x.png`` and an input ``x_explain.png``) gets a number (``x_2``)."""
    annotated = {p: p.name if p.suffix.lower() in IMAGE_SUFFIXES else f"{p.stem}.png" for p in paths}
    taken = set(annotated.values())
    stems = Counter(p.stem for p in paths)
    names = {}
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        stem, n = base, 1
        while {f"{stem}_explain.png", f"{stem}.json"} & taken:
            n += 1
            stem = f"{base}_{n}"
        taken |= {f"{stem}_explain.png", f"{stem}.json"}
        names[p] = {"image": annotated[p], "explain": f"{stem}_explain.png", "json": f"{stem}.json"}
    return names


def open_source(text: str) -> Source:
    """``--input``: a camera index, an image, a folder of images or a video file (ValueError when it cannot be
    read)."""
    if text.strip().isdigit():
        index = int(text)
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # each backend logs its own failure
        try:
            cap = cv2.VideoCapture(index)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not cap.isOpened():
            raise ValueError(f"cannot open camera {index}")
        return Source("camera", f"camera{index}", [], cap, cap.get(cv2.CAP_PROP_FPS) or 30.0)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"input not found: {path}")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return Source("folder", path.name, images)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        read_image(path, warn=False)  # fail now, before loading a model (and warn once, when it is run)
        return Source("image", path.stem, [path])
    cap = cv2.VideoCapture(str(path))
    ok = cap.isOpened() and cap.grab()
    if not ok:
        cap.release()
        if path.suffix.lower() not in VIDEO_SUFFIXES and cv2.imread(str(path), cv2.IMREAD_COLOR) is not None:
            return Source("image", path.stem, [path])
        raise ValueError(f"cannot open video {path}: not a video file OpenCV can decode, or damaged")
    cap.release()
    cap = cv2.VideoCapture(str(path))  # from the first frame again
    fps = cap.get(cv2.CAP_PROP_FPS)
    return Source("video", path.stem, [], cap, fps if fps and fps > 0 else 30.0)


class VideoOut:
    """A video written to a temporary file and renamed into place when complete: mp4v ``.mp4``, else MJPG
    ``.avi``. Opened at the first frame, which sets its size.

    The temporary name is unique (``.<stem>.<pid>-<random>.tmp.mp4``, in the output folder), so two demos writing
    into one folder never share it; one that a killed demo left (its process is gone) is removed when the next
    video of that name is opened."""

    def __init__(self, folder: Path, stem: str, fps: float):
        self.folder, self.stem, self.fps = folder, stem, fps
        self.writer: cv2.VideoWriter | None = None
        self.tmp = self.path = None

    def write(self, frame: np.ndarray) -> None:
        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(self.folder, self.stem)
            for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
                self.path = self.folder / f"{self.stem}{suffix}"
                fd, tmp = tempfile.mkstemp(prefix=f".{self.stem}.{os.getpid()}-", suffix=f".tmp{suffix}",
                                           dir=self.folder)
                os.close(fd)  # reserved; the writer opens it by name
                self.tmp = Path(tmp)
                size = (frame.shape[1], frame.shape[0])
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*fourcc), self.fps, size)
                if self.writer.isOpened():
                    break
                self.tmp.unlink(missing_ok=True)
            else:
                raise ValueError(f"cannot write a video in {self.folder} (neither mp4v nor MJPG works)")
        self.writer.write(frame)

    def close(self) -> Path | None:
        if self.writer is None:
            return None
        self.writer.release()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
            Path(self.tmp).unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_dead_temporaries(folder: Path, stem: str) -> list[Path]:
    """Delete the temporary videos of ``stem`` in ``folder`` (``.<stem>.<pid>-*.tmp.*``) whose demo process has
    ended (killed before it could rename or remove them); returns them. Those of running demos stay."""
    removed = []
    for tmp in folder.glob(f".{stem}.*-*.tmp.*"):
        pid = tmp.name[len(stem) + 2:].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def display_problem() -> str | None:
    """Why a window cannot open here (None: it can). Qt aborts the whole process when it finds no display
    instead of raising ``cv2.error``, so the first window is opened in a child process."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and os.environ.get("QT_QPA_PLATFORM", "") in ("", "xcb", "wayland"):
        return "DISPLAY is not set"
    probe = "import cv2, numpy; cv2.imshow('probe', numpy.zeros((8, 8, 3), numpy.uint8)); cv2.waitKey(1)"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "opening a window timed out"
    if r.returncode != 0:
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        named = [line for line in lines if "display" in line.lower()] or lines  # Qt's own reason comes first
        return named[0] if named else f"a test window could not open (exit status {r.returncode})"
    return None


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write ``image`` (BGR) to ``path`` atomically, encoded by its suffix; ValueError when it cannot be encoded."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, 6] if path.suffix.lower() == ".png" else []  # 1/3 the size of 1's
    ok, data = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise ValueError(f"cannot encode {path}")
    atomic_write_bytes(path, data.tobytes())
    return path


class AnnotationBoxes:
    """The boxes of a COCO instances JSON, found for an image by its file name: the demo's ``--annotations``.

    The file is checked as the detector's data set checks it (``roikit.data.coco.read_annotation_file``: one line
    naming the file and the record). ``detections(path, shape)`` gives the image's boxes in the form of a
    detector's detections, largest first: ``boxes`` [K, 4] (x1, y1, x2, y2 pixels), ``labels`` [K] (the category
    ids), ``annotation_ids`` [K]; crowd boxes (``iscrowd: 1``, a box around many objects) are left out and listed
    in ``crowd_ids``. ``class_names[id - 1]`` names a category id (``"N/A"`` at the ids the file leaves out).
    """

    def __init__(self, path: str | Path):
        from roikit.data.coco import read_annotation_file

        self.path = Path(path)
        data = read_annotation_file(self.path)
        self.images = {}
        for img in data["images"]:
            self.images.setdefault(Path(img["file_name"]).name, img)
        self._anns: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            self._anns[ann["image_id"]].append(ann)
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self.class_names = tuple(names.get(i, "N/A") for i in range(1, max(names, default=0) + 1))

    def detections(self, path: Path, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        img = self.images.get(path.name)
        if img is None:
            raise ValueError(f"{path.name} is not in {self.path} (images are matched by file name)")
        if (img["height"], img["width"]) != tuple(shape[:2]):
            raise ValueError(f"{path} is {shape[1]}x{shape[0]} px, but {self.path} says {path.name} is "
                             f"{img['width']}x{img['height']}: its boxes would not fit")
        anns = [a for a in self._anns[img["id"]] if not a["iscrowd"]]
        anns.sort(key=lambda a: -a["bbox"][2] * a["bbox"][3])  # largest first: --detection 0 is the biggest
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64)
        return {"boxes": boxes.reshape(-1, 4), "labels": np.array([a["category_id"] for a in anns], np.int64),
                "annotation_ids": np.array([a["id"] for a in anns], np.int64),
                "crowd_ids": [a["id"] for a in self._anns[img["id"]] if a["iscrowd"]]}
