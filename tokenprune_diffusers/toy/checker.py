"""Analytic prompt-adherence checker for the toy shapes: no learned judge, only geometry.

An image is segmented by nearest palette colour (the black background included); each colour's
connected regions of at least ``min_area`` pixels are the detected objects. For every object the
prompt asks for, the largest region of its colour is measured:

- shape from the region's geometry: a triangle (apex up) puts much less of its mass in the upper
  half of its bounding box than in the lower half, and fills about half of the box; a square fills
  its box (~100%), a circle ~79% (pi / 4);
- size from the longer side of the bounding box (small shapes are 8 px, large ones 12 px);
- position from the bounding-box centre's nearest anchor (left/right/top/bottom/center).

Scores: per attribute, the share of asked objects whose colour is found (``color``) and whose shape,
size and position are right; ``count``, the share of images with exactly as many detected objects
as asked; ``all``, the share of images with every attribute of every object right and the count
right. See :func:`score_images`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .data import COLORS, IMAGE_SIZE, POSITION_PHRASES, POSITIONS, SHAPES, SIZES, ToyObject

__all__ = ["Region", "parse_caption", "to_hwc01", "detect_regions", "check_image", "score_images", "ATTRIBUTES"]

ATTRIBUTES = ("color", "shape", "size", "position")  # per asked object
_PALETTE = np.array([(0.0, 0.0, 0.0), *COLORS.values()], dtype=np.float32)  # (1 + colours, 3), 0 = background
_COLOR_NAMES = ("background", *COLORS)
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2.0  # bounding-box side between the two sizes
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(
    r"\ban? (" + "|".join(SIZES) + r") (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r") ("
    + "|".join(POSITION_PHRASES.values()) + r")\b"
)


@dataclass(frozen=True)
class Region:
    """One connected region of a single palette colour."""

    color: str
    area: int  # pixels
    x0: int  # bounding box, inclusive pixel indices
    y0: int
    x1: int
    y1: int
    top_bottom: float  # pixels in the upper half of the box / pixels in the lower half

    @property
    def side(self) -> int:
        return max(self.x1 - self.x0 + 1, self.y1 - self.y0 + 1)

    @property
    def fill(self) -> float:
        return self.area / float((self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1))

    @property
    def shape(self) -> str:
        if self.top_bottom < 0.6 and self.fill < 0.7:
            return "triangle"
        return "square" if self.fill > 0.9 else "circle"

    @property
    def size(self) -> str:
        return "large" if self.side > _SIZE_SPLIT else "small"

    @property
    def position(self) -> str:
        cx, cy = (self.x0 + self.x1 + 1) / 2.0, (self.y0 + self.y1 + 1) / 2.0
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def parse_caption(caption: str) -> tuple[ToyObject, ...]:
    """The objects a toy caption asks for; distractor words are ignored.

    Raises:
        ValueError: when the caption describes no object in the toy grammar.
    """
    found = _OBJECT_RE.findall(caption.lower())
    if not found:
        raise ValueError(f"no toy object (size colour shape position) found in caption {caption!r}")
    return tuple(ToyObject(color=c, shape=s, size=z, position=_PHRASE_TO_POSITION[p]) for z, c, s, p in found)


def to_hwc01(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image, an (H, W, 3) array in [0, 1] or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.max() > 1.0 + 1e-6:  # uint8 / PIL
        array = array / 255.0
    return array.clip(0.0, 1.0)


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean (H, W) mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, comp = deque([(int(y), int(x))]), []
        while queue:
            cy, cx = queue.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


def detect_regions(image, min_area: int = 12) -> list[Region]:
    """Connected single-colour regions of at least ``min_area`` pixels, largest first."""
    pixels = to_hwc01(image)  # (H, W, 3)
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, got {pixels.shape[:2]}")
    dist = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 1 + colours)
    label = dist.argmin(-1)  # (H, W), 0 = background
    regions = []
    for k, name in enumerate(_COLOR_NAMES):
        if k == 0:
            continue
        for comp in _components(label == k):
            if len(comp) < min_area:
                continue
            ys = np.array([p[0] for p in comp])
            xs = np.array([p[1] for p in comp])
            y0, y1 = int(ys.min()), int(ys.max())
            mid = (y0 + y1 + 1) / 2.0  # rows with centre above mid are the upper half
            upper = float(((ys + 0.5) < mid).sum())
            lower = float(((ys + 0.5) > mid).sum())
            regions.append(
                Region(name, len(comp), int(xs.min()), y0, int(xs.max()), y1, upper / max(lower, 1.0))
            )
    return sorted(regions, key=lambda r: -r.area)


def check_image(image, objects: tuple[ToyObject, ...] | str, min_area: int = 12) -> dict[str, list[bool] | bool]:
    """Which attributes of the asked objects the image gets right.

    Args:
        image: see :func:`to_hwc01`.
        objects: the asked objects, or a caption to parse.

    Returns:
        ``{"color": [...], "shape": [...], "size": [...], "position": [...]}`` with one bool per asked
        object, plus ``"count"`` (as many regions as objects) and ``"all"`` (everything right).
    """
    if isinstance(objects, str):
        objects = parse_caption(objects)
    regions = detect_regions(image, min_area=min_area)
    result: dict[str, list[bool] | bool] = {a: [] for a in ATTRIBUTES}
    for obj in objects:
        match = next((r for r in regions if r.color == obj.color), None)  # largest of its colour
        result["color"].append(match is not None)
        result["shape"].append(match is not None and match.shape == obj.shape)
        result["size"].append(match is not None and match.size == obj.size)
        result["position"].append(match is not None and match.position == obj.position)
    result["count"] = len(regions) == len(objects)
    result["all"] = bool(result["count"]) and all(all(result[a]) for a in ATTRIBUTES)
    return result


def score_images(images, objects_list, min_area: int = 12, per_image: bool = False) -> dict:
    """Per-attribute and all-correct accuracy over a list of images and their asked objects (or captions).

    Returns:
        ``{"color", "shape", "size", "position"}``: share of asked objects right; ``"count"`` and
        ``"all"``: share of images right; ``"n"``: number of images; with ``per_image``, also
        ``"all_per_image"``: each image's all-correct verdict (a list of bools, in order: for
        differences paired by prompt and seed between two settings).
    """
    images, objects_list = list(images), list(objects_list)
    if len(images) != len(objects_list) or not images:
        raise ValueError(f"need as many images as object lists (and at least one), got {len(images)} and {len(objects_list)}")
    per_object = {a: [] for a in ATTRIBUTES}
    counts, alls = [], []
    for image, objects in zip(images, objects_list):
        r = check_image(image, objects, min_area=min_area)
        for a in ATTRIBUTES:
            per_object[a].extend(r[a])
        counts.append(r["count"])
        alls.append(r["all"])
    scores = {a: float(np.mean(v)) for a, v in per_object.items()}
    scores["count"] = float(np.mean(counts))
    scores["all"] = float(np.mean(alls))
    scores["n"] = len(images)
    if per_image:
        scores["all_per_image"] = [bool(a) for a in alls]
    return scores
