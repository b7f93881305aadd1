"""Image data sets in their standard on-disk layouts, loaded lazily with Pillow.

* :class:`ImageFolderDataset`: ``root/<class>/<image>`` (any extension Pillow reads).
* :class:`MiniImageNet`: Ravi & Larochelle's split CSVs (``train.csv``, ``val.csv``, ``test.csv``,
  lines ``filename,label`` after a header) with the 84x84 images either in ``root/images/`` (the
  original flat layout) or in class folders ``root/[images/]<label>/<filename>``.
* :class:`CIFARFS`: Bertinetto et al.'s CIFAR-FS, ``root/data/<class>/*.png`` and split lists
  ``root/splits/bertinetto/{train,val,test}.txt`` (one class name per line).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .cache import build_image_cache

__all__ = ["ImageFolderDataset", "MiniImageNet", "CIFARFS", "load_image"]

CacheArg = bool | str | os.PathLike | None  # False/None: decode per item; True: default cache dir; a folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLITS = ("train", "val", "test")


def load_image(path: str | os.PathLike, *, image_size: int | None = None, channels: int = 3) -> torch.Tensor:
    """Reads an image as float ``(C, H, W)`` in [0, 1], resized to ``image_size`` if given."""
    from PIL import Image  # lazy

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as err:  # truncated / not an image (PIL raises these)
        raise OSError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(arr).unsqueeze(0) if channels == 1 else torch.from_numpy(arr).permute(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items ``(image (C, H, W) float, label int)`` from a list of files and class names.

    Args:
        root: folder with one sub-folder per class (used when ``samples`` is None).
        samples: explicit ``(path, class_name)`` pairs instead of scanning ``root``.
        classes: keep only these class names, in this order (labels follow it).
        image_size: resize to ``image_size x image_size`` (None keeps the size).
        channels: 3 (RGB) or 1 (grayscale).
        transform: optional callable applied to the image tensor.
        cache: decode every image once into a memory-mapped uint8 cache (see
            :mod:`fewshot_ccd.data.cache`): True uses the default cache folder, a path that folder;
            False / None decodes the file on every access.  Needs ``image_size``.
        progress: tqdm bar while building the cache.

    Attributes: ``labels`` ``(len,)``, ``class_names``, ``num_classes``, ``paths``, ``images`` (the
    cached uint8 array ``(len, H, W, C)``, or None without a cache).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        samples: Sequence[tuple[str | os.PathLike, str]] | None = None,
        classes: Sequence[str] | None = None,
        image_size: int | None = None,
        channels: int = 3,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: CacheArg = None,
        progress: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if samples is None:
            if root is None:
                raise ValueError("give root or samples")
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {root} does not exist")
            samples = [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir()
                       for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
            if classes is None:
                classes = sorted({d.name for d in root.iterdir() if d.is_dir()})
        if classes is None:
            classes = sorted({c for _, c in samples})
        classes = list(classes)
        index = {c: i for i, c in enumerate(classes)}
        kept = [(Path(p), index[c]) for p, c in samples if c in index]
        if not kept:
            where = f"in {root}" if root is not None else "among the samples given"
            raise ValueError(f"no images {where} (expected <class>/<image> files with an extension in "
                             f"{IMAGE_EXTENSIONS}{'' if classes is None else f' for classes {list(classes)[:5]}'})")
        counts = np.bincount([label for _, label in kept], minlength=len(classes))
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"class {empty[0]!r} has no images ({len(empty)} empty classes)")
        self.paths = [p for p, _ in kept]
        self.labels = torch.tensor([label for _, label in kept], dtype=torch.long)
        self.class_names = classes
        self.num_classes = len(classes)
        self.image_size, self.channels, self.transform = image_size, channels, transform
        self.images = None
        self._first_shape: tuple[tuple[int, ...], Path] | None = None  # image_size=None: every image must match
        if cache:
            if image_size is None:
                raise ValueError("cache=... needs a fixed image_size (the cache holds one array)")
            self.images = build_image_cache(self.paths, image_size=image_size, channels=channels,
                                            directory=None if cache is True else cache, progress=progress)

    def __len__(self) -> int:
        return len(self.paths)

    def _check_size(self, image: torch.Tensor, path: Path) -> None:
        """Episodes stack images: without ``image_size`` they must all have the first one's size."""
        if self._first_shape is None:
            self._first_shape = (tuple(image.shape), path)
        elif tuple(image.shape) != self._first_shape[0]:
            (_, h, w), first = self._first_shape
            raise ValueError(f"image {path} is {image.shape[2]}x{image.shape[1]} but {first} is {w}x{h}: the "
                             f"images differ in size; pass image_size=... to resize them all")

    def load_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` float in [0, 1] of ``indices`` (no ``transform``); one array read
        when cached."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if self.images is None:
            images = [load_image(self.paths[i], image_size=self.image_size, channels=self.channels)
                      for i in idx.tolist()]
            if self.image_size is None:
                for i, image in zip(idx.tolist(), images):
                    self._check_size(image, self.paths[i])
            return torch.stack(images)
        arr = self.images[np.sort(idx.numpy())] if len(idx) else self.images[:0]
        order = torch.argsort(torch.argsort(idx))  # memmaps read fastest in file order; restore the order
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)[order]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1).float().div_(255.0)
        else:
            image = load_image(self.paths[index], image_size=self.image_size, channels=self.channels)
            if self.image_size is None:
                self._check_size(image, self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


class MiniImageNet(ImageFolderDataset):
    """mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (ICLR 2017) class splits:
    64 train, 16 val, 20 test classes of 600 84x84 images.

    Args:
        root: folder holding ``{split}.csv`` and the images (see the module docstring).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: 84 by default.
        transform: optional callable on the image tensor.
        cache, progress: decode-once uint8 cache, as in :class:`ImageFolderDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        image_size: int | None = 84,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: CacheArg = None,
        progress: bool = True,
    ) -> None:
        _check_split(split)
        root = Path(root)
        csv_path = next((p for p in (root / f"{split}.csv", root / "split" / f"{split}.csv") if p.exists()), None)
        if csv_path is None:
            raise FileNotFoundError(f"mini-ImageNet split file {split}.csv not found in {root}")
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][0].strip().lower() == "filename":
            rows = rows[1:]
        samples = []
        for row in rows:
            if len(row) != 2:
                raise ValueError(f"{csv_path}: expected 'filename,label' rows, got {row!r}")
            filename, label = row[0].strip(), row[1].strip()
            candidates = (root / "images" / filename, root / "images" / label / filename, root / label / filename)
            path = next((p for p in candidates if p.exists()), None)
            if path is None:
                raise FileNotFoundError(f"{csv_path}: image {filename!r} of class {label!r} not found under {root}")
            samples.append((path, label))
        classes = list(dict.fromkeys(label for _, label in samples))
        super().__init__(samples=samples, classes=classes, image_size=image_size, transform=transform,
                         cache=cache, progress=progress)


class CIFARFS(ImageFolderDataset):
    """CIFAR-FS (Bertinetto et al., ICLR 2019): 64/16/20 CIFAR-100 classes, 600 32x32 images each.

    Args:
        root: folder holding ``data/<class>/`` and ``splits/bertinetto/{split}.txt``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: None keeps 32x32.
        transform: optional callable on the image tensor.
        cache, progress: decode-once uint8 cache, as in :class:`ImageFolderDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        image_size: int | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: CacheArg = None,
        progress: bool = True,
    ) -> None:
        _check_split(split)
        root = Path(root)
        lst = next((p for p in (root / "splits" / "bertinetto" / f"{split}.txt", root / f"{split}.txt")
                    if p.exists()), None)
        if lst is None:
            raise FileNotFoundError(f"CIFAR-FS split list {split}.txt not found under {root}")
        classes = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
        data = root / "data" if (root / "data").is_dir() else root
        samples = []
        for c in classes:
            folder = data / c
            if not folder.is_dir():
                raise FileNotFoundError(f"CIFAR-FS class folder {folder} (listed in {lst}) is missing")
            samples += [(p, c) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        super().__init__(samples=samples, classes=classes, image_size=image_size, transform=transform,
                         cache=cache, progress=progress)
