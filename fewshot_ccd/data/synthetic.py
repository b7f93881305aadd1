"""A tiny generated folder in mini-ImageNet's layout, for tests and smoke runs (never a result).

Each class is a random colour plus Gaussian pixel noise, so a backbone can learn it in a few steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["write_miniimagenet_like"]

_LAYOUTS = ("flat", "folders")


def write_miniimagenet_like(
    root: str | os.PathLike,
    *,
    classes: dict[str, int] | None = None,
    per_class: int = 20,
    image_size: int = 84,
    layout: str = "flat",
    seed: int = 0,
    noise: float = 40.0,
) -> Path:
    """Writes ``root/mini-imagenet/`` with ``{split}.csv`` files and PNG images; returns ``root``.

    Args:
        classes: classes per split (default ``{"train": 6, "val": 5, "test": 5}``; leave a split out
            to leave out its CSV, like the shared copy without test classes).
        per_class: images per class.
        layout: ``"flat"`` (the original ``images/<file>``) or ``"folders"`` (``images/<wnid>/<file>``).
        seed: colours and noise.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    from PIL import Image  # lazy

    classes = {"train": 6, "val": 5, "test": 5} if classes is None else classes
    rng = np.random.default_rng(seed)
    folder = Path(root) / "mini-imagenet"
    for split, n_classes in classes.items():
        rows = ["filename,label"]
        for c in range(n_classes):
            label = f"n{split}{c:05d}"
            target = folder / "images" / label if layout == "folders" else folder / "images"
            target.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, size=3)
            for k in range(per_class):
                pixels = np.clip(colour + rng.normal(0, noise, size=(image_size, image_size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(target / f"{label}{k:04d}.png")
                rows.append(f"{label}{k:04d}.png,{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return Path(root)
