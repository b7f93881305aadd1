"""Procedural captioned shapes: compositional prompts rendered on the fly, no files.

Every sample is a 32x32 RGB image on a black background holding one or two flat-coloured shapes,
and a caption that states each object's size, colour, shape and position, e.g.
``"a small red circle on the left and a large blue square on the right, studio lighting"``.
Trailing distractor phrases ("highly detailed", "studio lighting", ...) carry no information:
they are what pruning may drop harmlessly, while the attribute words are what it must keep.

Sample ``i`` of a :class:`ToyShapesDataset` depends only on ``(seed, i)`` (its own
``numpy.random.Generator``), so any index can be regenerated in any order and a training run resumes
exactly. Two objects always differ in colour (the colour identifies the object for the checker)
and sit on opposite sides (left/right or top/bottom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "DISTRACTORS",
    "IMAGE_SIZE",
    "ToyObject",
    "ToySample",
    "ToyShapesDataset",
    "sample_objects",
    "caption_for",
    "render",
    "collate",
]

IMAGE_SIZE = 32  # pixels per side
# name -> RGB in [0, 1]; saturated and far apart in hue so that segmentation is unambiguous
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.25, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.7, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 8, "large": 12}  # side of the shape's bounding box, pixels
# name -> (x, y) centre in pixels; 8 px apart, so the +-1 px jitter never changes the nearest anchor,
# and two large shapes on opposite sides neither overlap nor leave the image
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "center": (16.0, 16.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIRS = (("left", "right"), ("top", "bottom"))  # positions two objects may take
DISTRACTORS = (
    "highly detailed",
    "studio lighting",
    "sharp focus",
    "4k",
    "trending on artstation",
    "masterpiece",
    "digital art",
    "beautiful composition",
)
JITTER = 1  # max position jitter, pixels (each axis)


@dataclass(frozen=True)
class ToyObject:
    """One shape of a scene: the ground truth that its caption states."""

    color: str  # a key of COLORS
    shape: str  # one of SHAPES
    size: str  # a key of SIZES
    position: str  # a key of POSITIONS

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class ToySample:
    """An image, its caption and the objects the caption describes."""

    image: torch.Tensor  # (3, 32, 32) float32 in [-1, 1]
    caption: str
    objects: tuple[ToyObject, ...]


def sample_objects(rng: np.random.Generator, num_objects: int | None = None) -> tuple[ToyObject, ...]:
    """One or two objects with distinct colours; two objects take opposite sides."""
    if num_objects is None:
        num_objects = int(rng.integers(1, 3))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    colors = list(COLORS)
    picked = rng.choice(len(colors), size=num_objects, replace=False)
    if num_objects == 1:
        positions = [list(POSITIONS)[int(rng.integers(len(POSITIONS)))]]
    else:
        pair = PAIRS[int(rng.integers(len(PAIRS)))]
        positions = list(pair) if rng.random() < 0.5 else [pair[1], pair[0]]
    return tuple(
        ToyObject(
            color=colors[int(c)],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            position=p,
        )
        for c, p in zip(picked, positions)
    )


def caption_for(objects: tuple[ToyObject, ...], distractors: tuple[str, ...] = ()) -> str:
    """``"a small red circle on the left and a large blue square on the right, 4k"``."""
    text = " and ".join(o.phrase() for o in objects)
    return ", ".join((text, *distractors))


def _shape_mask(shape: str, side: int, cx: float, cy: float) -> np.ndarray:
    """(32, 32) bool mask of a shape whose bounding box is ``side`` pixels wide, centred at (cx, cy)."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres
    half = side / 2.0
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":  # isosceles, apex up, base at the bottom of the box
        t = (dy + half) / side  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: tuple[ToyObject, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """(32, 32, 3) float32 image in [0, 1]: the objects on black, centres jittered by ``rng``."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for obj in objects:
        cx, cy = POSITIONS[obj.position]
        if rng is not None:
            cx += float(rng.integers(-JITTER, JITTER + 1))
            cy += float(rng.integers(-JITTER, JITTER + 1))
        image[_shape_mask(obj.shape, SIZES[obj.size], cx, cy)] = COLORS[obj.color]
    return image


class ToyShapesDataset(Dataset):
    """Map-style data set of ``length`` procedural samples; sample ``i`` depends on ``(seed, i)`` only.

    Args:
        seed: base seed; different seeds give independent data sets (train / evaluation).
        length: number of samples (they are generated, not stored; any size is free).
        num_objects: 1 or 2 for every sample, or None for an even mix.
        max_distractors: each caption gets 0..max_distractors distractor phrases.
    """

    def __init__(self, seed: int = 0, length: int = 1_000_000, num_objects: int | None = None, max_distractors: int = 2):
        if length < 1:
            raise ValueError(f"length must be positive, got {length!r}")
        if num_objects not in (None, 1, 2):
            raise ValueError(f"num_objects must be None, 1 or 2, got {num_objects!r}")
        if max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {max_distractors!r}")
        self.seed = int(seed)
        self.length = int(length)
        self.num_objects = num_objects
        self.max_distractors = int(max_distractors)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ToySample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of {self.length}")
        rng = np.random.default_rng([self.seed, int(index)])
        objects = sample_objects(rng, self.num_objects)
        k = int(rng.integers(0, self.max_distractors + 1))
        distractors = tuple(DISTRACTORS[int(i)] for i in rng.choice(len(DISTRACTORS), size=k, replace=False))
        pixels = render(objects, rng)  # (32, 32, 3) in [0, 1]
        image = torch.from_numpy(pixels).permute(2, 0, 1) * 2.0 - 1.0  # (3, 32, 32) in [-1, 1]
        return ToySample(image=image, caption=caption_for(objects, distractors), objects=objects)


def collate(samples: list[ToySample]) -> tuple[torch.Tensor, list[str], list[tuple[ToyObject, ...]]]:
    """DataLoader ``collate_fn``: (B, 3, 32, 32) images, B captions, B object tuples."""
    return (
        torch.stack([s.image for s in samples]),  # (B, 3, 32, 32)
        [s.caption for s in samples],
        [s.objects for s in samples],
    )
