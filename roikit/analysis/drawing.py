"""Drawing helpers for the demo and the analysis tools: detections, feature-grid cells, sample points, tiled views.

Every function takes a BGR ``uint8`` image ``[H, W, 3]`` (OpenCV's layout), draws on it in place and returns it,
so calls chain. Coordinates are continuous pixels: pixel ``(col i, row j)`` is the square ``[i, i + 1) x
[j, j + 1)``, so a box ``(x1, y1, x2, y2)`` covers the pixels whose centres it contains; a feature cell
``(u, v)`` of stride ``s`` is ``[v s, (v + 1) s) x [u s, (u + 1) s)``. A line at ``x = v`` is drawn on pixel
column ``round(v)`` (the first pixel right of it), placed with 1/16-pixel precision (OpenCV's ``shift``), so a
zoomed-in grid stays where it belongs.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

__all__ = ["PALETTE", "Colour", "class_colour", "text_colour", "box_pixels", "draw_box", "draw_label",
           "draw_detections", "draw_cell_grid", "draw_rects", "draw_points", "put_text_lines", "resize_to_fit",
           "pad_to", "tile_images"]

Colour = tuple[int, int, int]  # B, G, R

# Twelve colours far apart in hue and brightness (BGR); class k gets PALETTE[k % 12]. Label 0 (background in
# torchvision's numbering) is never drawn, so the first object class gets the second entry; that is fine.
PALETTE: tuple[Colour, ...] = (
    (75, 25, 230),    # red
    (75, 180, 60),    # green
    (25, 225, 255),   # yellow
    (200, 130, 0),    # blue
    (48, 130, 245),   # orange
    (180, 30, 145),   # purple
    (240, 240, 70),   # cyan
    (230, 50, 240),   # magenta
    (60, 245, 210),   # lime
    (128, 128, 0),    # teal
    (0, 0, 128),      # maroon
    (255, 190, 220),  # lavender
)

_SHIFT = 4  # sub-pixel bits for cv2 drawing calls
_ONE = 1 << _SHIFT
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_colour(index: int) -> Colour:
    """The colour of class ``index`` (any int; the palette repeats every 12 classes)."""
    return PALETTE[int(index) % len(PALETTE)]


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background`` (BGR)."""
    b, g, r = background
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 array [H, W, 3] (BGR), got {got}")


def _line(v: float) -> int:
    """A line at ``v`` in cv2's fixed-point units (``shift=_SHIFT``): drawn on pixel ``round(v)``, so the line
    between cells ``[a, v)`` and ``[v, b)`` is the first pixel of the second one, for any zoom."""
    return int(round(v * _ONE))


def _point(v: float) -> int:
    """A point at ``v`` in cv2's fixed-point units: cv2 puts pixel ``i``'s centre at ``i``, ours is ``i + 0.5``."""
    return int(round((v - 0.5) * _ONE))


def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The pixels ``[i0, i1)`` of ``n`` whose centres lie in ``[lo, hi)``."""
    return min(max(int(np.ceil(lo - 0.5)), 0), n), min(max(int(np.ceil(hi - 0.5)), 0), n)


def box_pixels(box: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int, int] | None:
    """The first and last pixel column and row ``(x0, y0, x1, y1)`` (inclusive) of box ``(x1, y1, x2, y2)``,
    clipped to an image of ``shape`` (H, W, ...); None when nothing of the box is on the image.

    A pixel belongs to the box when its centre does: columns ``round(x1) .. round(x2) - 1`` (half up).
    """
    h, w = int(shape[0]), int(shape[1])
    x0, y0 = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    x1, y1 = int(np.floor(box[2] + 0.5)) - 1, int(np.floor(box[3] + 0.5)) - 1
    x1, y1 = max(x1, x0), max(y1, y0)  # a box thinner than a pixel still gets one
    if x1 < 0 or y1 < 0 or x0 >= w or y0 >= h:
        return None
    return max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)


def draw_box(image: np.ndarray, box: Sequence[float], colour: Colour, thickness: int = 2) -> np.ndarray:
    """Outline a box on its own border pixels (see :func:`box_pixels`), ``thickness`` rings growing inwards."""
    _check_image(image)
    px = box_pixels(box, image.shape)
    if px is None:
        return image
    x0, y0, x1, y1 = px
    for k in range(max(int(thickness), 1)):
        if x0 + k > x1 - k or y0 + k > y1 - k:
            break
        cv2.rectangle(image, (x0 + k, y0 + k), (x1 - k, y1 - k), colour, 1, cv2.LINE_8)
    return image


def draw_label(image: np.ndarray, text: str, anchor: tuple[int, int], colour: Colour, *, font_scale: float = 0.45,
               above: bool = True) -> np.ndarray:
    """A filled tag in ``colour`` with ``text`` on it, its bottom-left (``above``) or top-left at ``anchor``,
    moved inside the image where it would stick out."""
    _check_image(image)
    h, w = image.shape[:2]
    (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, 1)
    tag_w, tag_h = tw + 4, th + base + 3
    x, y = int(anchor[0]), int(anchor[1])
    top = y - tag_h if above else y
    if top < 0:  # no room above: put it just inside
        top = y if above else 0
    top = min(max(top, 0), max(h - tag_h, 0))
    x = min(max(x, 0), max(w - tag_w, 0))
    cv2.rectangle(image, (x, top), (x + tag_w - 1, top + tag_h - 1), colour, cv2.FILLED)
    cv2.putText(image, text, (x + 2, top + th + 1), _FONT, font_scale, text_colour(colour), 1, cv2.LINE_AA)
    return image


def draw_detections(image: np.ndarray, boxes, labels, scores=None, class_names: Sequence[str] | None = None, *,
                    thickness: int = 2, font_scale: float = 0.45) -> np.ndarray:
    """Draw boxes ``[K, 4]`` (x1, y1, x2, y2 pixels) with their class name and score, one colour per class.

    ``labels`` index ``class_names`` from 1 (torchvision's numbering, 0 is the background); a label without a
    name is written as its number. The label goes above the box, below it where the image has no room above,
    inside it where neither fits. Lower scores are drawn first, so the best detection is on top.
    """
    _check_image(image)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(labels)} labels")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes))
    for i in order:
        colour = class_colour(labels[i])
        name = class_names[labels[i] - 1] if class_names and 1 <= labels[i] <= len(class_names) else str(labels[i])
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        draw_box(image, boxes[i], colour, thickness)
        px = box_pixels(boxes[i], image.shape)
        if px is None:
            continue
        (_, th), base = cv2.getTextSize(text, _FONT, font_scale, 1)
        if px[1] < th + base + 3 and px[3] + th + base + 4 <= image.shape[0]:  # no room above: below the box
            draw_label(image, text, (px[0], px[3] + 1), colour, font_scale=font_scale, above=False)
        else:
            draw_label(image, text, (px[0], px[1]), colour, font_scale=font_scale)
    return image


def draw_cell_grid(image: np.ndarray, cell_size: float, *, origin: tuple[float, float] = (0.0, 0.0),
                   region: Sequence[float] | None = None, colour: Colour = (160, 160, 160),
                   thickness: int = 1) -> np.ndarray:
    """Lines between the cells of a feature grid: ``x = origin_x + v * cell_size`` and ``y = origin_y + u *
    cell_size`` (pixels; ``origin`` is where cell (0, 0) starts, ``cell_size`` the stride times any zoom),
    inside ``region`` ``(x1, y1, x2, y2)`` (default: the whole image)."""
    _check_image(image)
    if not cell_size > 0:
        raise ValueError(f"draw_cell_grid: cell_size must be > 0, got {cell_size!r}")
    h, w = image.shape[:2]
    x_lo, y_lo, x_hi, y_hi = (0.0, 0.0, float(w), float(h)) if region is None else map(float, region)
    ox, oy = origin
    for lo, hi, o, vertical in ((x_lo, x_hi, ox, True), (y_lo, y_hi, oy, False)):
        first = int(np.ceil((lo - o) / cell_size - 1e-9))
        last = int(np.floor((hi - o) / cell_size + 1e-9))
        for k in range(first, last + 1):
            v = o + k * cell_size
            if vertical:
                p, q = (_line(v), _line(y_lo)), (_line(v), _line(y_hi))
            else:
                p, q = (_line(x_lo), _line(v)), (_line(x_hi), _line(v))
            cv2.line(image, p, q, colour, thickness, cv2.LINE_8, _SHIFT)
    return image


def draw_rects(image: np.ndarray, rects: Iterable[Sequence[float]], colour: Colour, *, thickness: int = 1,
               fill_alpha: float = 0.0) -> np.ndarray:
    """Rectangles ``(x1, y1, x2, y2)`` in pixels: their union tinted with ``colour`` at ``fill_alpha`` (an area
    two rectangles share is tinted once), then each outlined (``thickness`` 0: no outline) on the lines
    ``x = x1, x2`` and ``y = y1, y2`` as :func:`draw_cell_grid` draws them."""
    _check_image(image)
    rects = [tuple(float(v) for v in r) for r in rects]
    if fill_alpha > 0 and rects:
        h, w = image.shape[:2]
        sel = np.zeros((h, w), bool)
        for x1, y1, x2, y2 in rects:  # the pixels whose centres are inside
            (i0, i1), (j0, j1) = _pixel_span(x1, x2, w), _pixel_span(y1, y2, h)
            sel[j0:j1, i0:i1] = True
        tint = np.asarray(colour, np.float32)
        image[sel] = np.clip(image[sel] * (1.0 - fill_alpha) + tint * fill_alpha + 0.5, 0, 255).astype(np.uint8)
    if thickness > 0:
        for x1, y1, x2, y2 in rects:
            cv2.rectangle(image, (_line(x1), _line(y1)), (_line(x2), _line(y2)), colour, thickness, cv2.LINE_8, _SHIFT)
    return image


def draw_points(image: np.ndarray, points: Iterable[Sequence[float]], colour: Colour, *, radius: int = 2,
                outline: Colour | None = (0, 0, 0)) -> np.ndarray:
    """Filled dots at ``(x, y)`` pixels, with a 1-pixel ``outline`` so they show on any background."""
    _check_image(image)
    for x, y in points:
        centre = (_point(float(x)), _point(float(y)))
        if outline is not None:
            cv2.circle(image, centre, (radius + 1) * _ONE, outline, cv2.FILLED, cv2.LINE_AA, _SHIFT)
        cv2.circle(image, centre, radius * _ONE, colour, cv2.FILLED, cv2.LINE_AA, _SHIFT)
    return image


def put_text_lines(image: np.ndarray, lines: Sequence[str] | str, origin: tuple[int, int] = (4, 4), *,
                   colour: Colour = (255, 255, 255), background: Colour | None = (0, 0, 0),
                   font_scale: float = 0.45) -> np.ndarray:
    """Lines of text from ``origin`` (top-left) down, on a filled ``background`` box (None: none)."""
    _check_image(image)
    lines = lines.split("\n") if isinstance(lines, str) else list(lines)
    x, y = origin
    for line in lines:
        (tw, th), base = cv2.getTextSize(line, _FONT, font_scale, 1)
        if background is not None:
            cv2.rectangle(image, (x, y), (x + tw + 4, y + th + base + 3), background, cv2.FILLED)
        cv2.putText(image, line, (x + 2, y + th + 1), _FONT, font_scale, colour, 1, cv2.LINE_AA)
        y += th + base + 4
    return image


def resize_to_fit(image: np.ndarray, width: int, height: int,
                  interpolation: int = cv2.INTER_AREA) -> tuple[np.ndarray, float]:
    """``image`` scaled by one factor to fit ``width x height``; returns it and the factor."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    return cv2.resize(image, size, interpolation=interpolation), scale


def pad_to(image: np.ndarray, width: int, height: int, colour: Colour = (32, 32, 32)) -> np.ndarray:
    """``image`` at the top-left of a ``width x height`` canvas (cropped where it is larger)."""
    out = np.empty((height, width, 3), np.uint8)
    out[:] = colour
    h, w = min(image.shape[0], height), min(image.shape[1], width)
    out[:h, :w] = image[:h, :w] if image.ndim == 3 else image[:h, :w, None]
    return out


def tile_images(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, columns: int | None = None,
                gap: int = 6, background: Colour = (32, 32, 32), font_scale: float = 0.45) -> np.ndarray:
    """Images side by side in rows of ``columns`` (default: one row), each with its caption (``\\n`` for more
    lines) above it; every tile is as big as the largest image, smaller ones sit at its top-left."""
    if not images:
        raise ValueError("tile_images: no images")
    images = [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) if im.ndim == 2 else im for im in images]
    for im in images:
        _check_image(im)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"tile_images: {len(images)} images but {len(captions)} captions")
    columns = len(images) if columns is None else max(1, min(int(columns), len(images)))
    rows = -(-len(images) // columns)
    tw = max(im.shape[1] for im in images)
    th = max(im.shape[0] for im in images)
    (_, text_h), base = cv2.getTextSize("Ag", _FONT, font_scale, 1)
    line_h = text_h + base + 4  # as put_text_lines steps
    n_lines = max((len(c.split("\n")) for c in captions), default=0) if captions else 0
    cap_h = n_lines * line_h + (2 if n_lines else 0)
    cell_h = cap_h + th
    out = np.empty((rows * cell_h + (rows + 1) * gap, columns * tw + (columns + 1) * gap, 3), np.uint8)
    out[:] = background
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x, y = gap + c * (tw + gap), gap + r * (cell_h + gap)
        if captions:
            put_text_lines(out, captions[i], (x, y), background=None, font_scale=font_scale)
        out[y + cap_h:y + cap_h + im.shape[0], x:x + im.shape[1]] = im
    return out
