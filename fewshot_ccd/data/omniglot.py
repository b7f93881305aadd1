"""Omniglot (Lake, Salakhutdinov, Tenenbaum, "Human-level concept learning through probabilistic
program induction", Science 2015) in the layouts of ``../shared/data/omniglot``:

* ``images_background.npz`` / ``images_evaluation.npz``: the full background (964 characters, for
  training) and evaluation (659 characters, for testing) sets, ``images`` bool (C, 20, 105, 105) with
  True = white background;
* ``images_background_small1.zip`` / ``..._small2.zip``: the two minimal background sets
  (``Alphabet/characterNN/XXXX_YY.png``), and any zip of that layout such as the original
  ``images_background.zip``;
* ``all_runs.zip``: Lake's 20 official within-alphabet 20-way one-shot runs.

Images are resized to ``image_size`` (28 by default, the usual protocol) with area averaging and
returned as float ``(1, H, W)`` with ink = 1.  ``rotations=True`` adds the 90, 180 and 270 degree
rotations of every character as new classes (Vinyals et al. 2016; Snell et al. 2017), for training.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .paths import dataset_dir

__all__ = ["OmniglotDataset", "omniglot_dir", "LakeRun", "load_lake_runs"]

_SPLITS = {"background": "images_background.npz", "evaluation": "images_evaluation.npz"}
_SMALL = {"small1": "images_background_small1.zip", "small2": "images_background_small2.zip"}


def omniglot_dir(root: str | os.PathLike | None = None) -> Path:
    """The Omniglot folder (see :func:`fewshot_ccd.data.paths.data_root` for the search order)."""
    for marker in ("images_background.npz", "images_evaluation.npz", "all_runs.zip", *_SMALL.values()):
        try:
            return dataset_dir("omniglot", root, marker=marker)
        except FileNotFoundError:
            continue
    return dataset_dir("omniglot", root, marker="images_background.npz")  # raises the clear error


def _to_ink(white_background: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """bool/uint8 ``(M, H, W)`` with True/1 = background -> uint8 ink ``(M, S, S)`` (255 = ink)."""
    out = []
    for start in range(0, len(white_background), 2048):  # chunks keep the float copy small
        chunk = 1.0 - torch.as_tensor(np.asarray(white_background[start:start + 2048]), dtype=torch.float32)
        if chunk.max() > 1.0 or chunk.min() < 0.0:
            raise ValueError("expected binary images (True / 1 = white background)")
        if chunk.shape[-1] != image_size or chunk.shape[-2] != image_size:
            chunk = F.interpolate(chunk.unsqueeze(1), size=(image_size, image_size), mode="area")[:, 0]
        out.append((chunk * 255).round().to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, image_size, image_size, dtype=torch.uint8)


def _read_png(data: bytes) -> np.ndarray:
    from PIL import Image  # lazy: only the zip layouts need Pillow

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127  # True = white background


_CORRUPT = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error)  # what a damaged file raises


def _unreadable(path, err: Exception, member: str | None = None) -> ValueError:
    inside = f" (member {member})" if member else ""
    return ValueError(f"{path}{inside} is unreadable, truncated or corrupt ({type(err).__name__}: {err}); "
                      f"copy or download it again")


def _read_member_png(zf: zipfile.ZipFile, name: str, zpath) -> np.ndarray:
    try:
        return _read_png(zf.read(name))
    except _CORRUPT as err:
        raise _unreadable(zpath, err, name) from err


class OmniglotDataset(torch.utils.data.Dataset):
    """Omniglot characters as classes; items ``(image (1, S, S) float in [0, 1], label int)``.

    Args:
        root: the data root or the ``omniglot`` folder itself (None: $FEWSHOT_CCD_DATA, then the cache folder).
        split: ``"background"`` / ``"evaluation"`` (the npz full sets) or ``"small1"`` / ``"small2"``
            (the minimal background zips); or a path to a zip in the ``Alphabet/character/*.png`` layout.
        image_size: side S of the resized images (28 as usual; 105 keeps the originals).
        rotations: add 90/180/270-degree rotations as extra classes (x4 classes; for training).
        max_classes: keep only the first ``max_classes`` characters (quick experiments, tests).

    Attributes: ``labels`` (``(len,)`` long, for :class:`EpisodeSampler`), ``num_classes``,
    ``class_names`` (``"Alphabet/characterNN"`` for zips, ``"charNNNN"`` for npz, + ``"@rot90"``...).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        split: str = "background",
        image_size: int = 28,
        rotations: bool = False,
        max_classes: int | None = None,
    ) -> None:
        if max_classes is not None and max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {max_classes}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if split in _SPLITS:
            path = omniglot_dir(root) / _SPLITS[split]
            if not path.exists():
                raise FileNotFoundError(f"Omniglot {split} set not found at {path}")
            try:
                with np.load(path) as npz:
                    raw = npz["images"][:max_classes]  # (C, 20, 105, 105) bool
            except _CORRUPT as err:
                raise _unreadable(path, err) from err
            n_chars, per = raw.shape[:2]
            names = [f"char{i:04d}" for i in range(n_chars)]
            images = _to_ink(raw.reshape(-1, *raw.shape[2:]), image_size)  # (C * 20, S, S)
            counts = [per] * n_chars
        else:
            zpath = Path(split) if split.endswith(".zip") else None
            if zpath is None:
                if split not in _SMALL:
                    raise ValueError(f"split must be one of {[*_SPLITS, *_SMALL]} or a .zip path, got {split!r}")
                zpath = omniglot_dir(root) / _SMALL[split]
            if not zpath.exists():
                raise FileNotFoundError(f"Omniglot zip not found at {zpath}")
            names, flat, counts = self._read_zip(zpath, image_size, max_classes)
            images = flat  # (M, S, S), grouped by class
        self.image_size = image_size
        self.rotations = rotations
        self.split = split
        base_labels = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(counts))
        flat = images.reshape(-1, image_size, image_size)  # (M, S, S)
        if rotations:
            flat = torch.cat([torch.rot90(flat, k, dims=(1, 2)) for k in range(4)])  # (4M, S, S)
            base_labels = torch.cat([base_labels + k * len(names) for k in range(4)])
            names = [n + ("" if k == 0 else f"@rot{90 * k}") for k in range(4) for n in names]
        self.images = flat.unsqueeze(1).contiguous()  # (M', 1, S, S) uint8
        self.labels = base_labels  # (M',)
        self.class_names = names
        self.num_classes = len(names)

    @staticmethod
    def _read_zip(zpath: Path, image_size: int, max_classes: int | None) -> tuple[list[str], torch.Tensor, list[int]]:
        groups: dict[str, list[str]] = {}
        try:
            zf = zipfile.ZipFile(zpath)
        except _CORRUPT as err:
            raise _unreadable(zpath, err) from err
        with zf:
            for name in sorted(zf.namelist()):
                if not name.lower().endswith(".png"):
                    continue
                parts = name.split("/")
                if len(parts) < 3:
                    continue
                groups.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
            if not groups:
                raise ValueError(f"{zpath} holds no Alphabet/character/*.png images")
            names = sorted(groups)[:max_classes]
            arrays = [_read_member_png(zf, f, zpath) for n in names for f in groups[n]]
        return names, _to_ink(np.stack(arrays), image_size), [len(groups[n]) for n in names]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255.0, int(self.labels[index])


@dataclass
class LakeRun:
    """One of Lake's 20-way one-shot runs: 20 training images (one per class), 20 test images."""

    name: str
    train_images: torch.Tensor  # (20, 1, S, S) float, class i = row i
    test_images: torch.Tensor  # (20, 1, S, S) float
    test_labels: torch.Tensor  # (20,) index of the matching training image


def load_lake_runs(root: str | os.PathLike | None = None, *, image_size: int = 28) -> list[LakeRun]:
    """Lake et al.'s 20 official within-alphabet one-shot runs from ``all_runs.zip``."""
    zpath = omniglot_dir(root) / "all_runs.zip"
    if not zpath.exists():
        raise FileNotFoundError(f"Lake's one-shot runs not found at {zpath}")
    runs = []
    try:
        zf = zipfile.ZipFile(zpath)
    except _CORRUPT as err:
        raise _unreadable(zpath, err) from err
    with zf:
        run_names = sorted({n.split("/")[0] for n in zf.namelist() if re.match(r"run\d+/", n)})
        for run in run_names:
            try:
                labels_text = zf.read(f"{run}/class_labels.txt").decode()
            except _CORRUPT as err:
                raise _unreadable(zpath, err, f"{run}/class_labels.txt") from err
            pairs = [line.split() for line in labels_text.splitlines()
                     if line.strip()]
            train_files = sorted({t for _, t in pairs})
            index = {f: i for i, f in enumerate(train_files)}
            to_ink = [_to_ink(np.stack([_read_member_png(zf, f, zpath) for f in files]), image_size)
                      for files in (train_files, [q for q, _ in pairs])]
            runs.append(LakeRun(
                name=run,
                train_images=to_ink[0].unsqueeze(1).float() / 255.0,
                test_images=to_ink[1].unsqueeze(1).float() / 255.0,
                test_labels=torch.tensor([index[t] for _, t in pairs]),
            ))
    if not runs:
        raise ValueError(f"{zpath} holds no runNN/ folders")
    return runs
