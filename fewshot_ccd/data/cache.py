"""Decode-once image cache: every image of a file list, decoded and resized once into one uint8
array ``(N, H, W, C)`` stored as ``.npy`` and memory-mapped afterwards, so that training epochs and
evaluation episodes never touch JPEG again.

The cache file is named by a key computed from the file list (each path with its size and
modification time), the image size and the channel count: a changed, added or removed file gives a
new key, hence a rebuild.  It is written to a temporary file in the same folder and moved into place
with ``os.replace`` (atomic), so an interrupted build never leaves a half-written cache behind.

Cache folder: the ``cache_dir`` argument, else ``$FEWSHOT_CCD_CACHE``, else
``$XDG_CACHE_HOME/fewshot_ccd`` (``~/.cache/fewshot_ccd``).  Needs only numpy and Pillow.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from .._atomic import atomic_path
from .paths import cache_dir

__all__ = ["cache_dir", "cache_key", "build_image_cache", "decode_image"]

_VERSION = 1  # bump when the decoding changes


def cache_key(paths: Sequence[str | os.PathLike], image_size: int, channels: int) -> str:
    """Hex key of a file list (path, size and mtime of each file) at one image size and channel count."""
    h = hashlib.sha256(json.dumps({"version": _VERSION, "size": image_size, "channels": channels}).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def decode_image(path: str | os.PathLike, image_size: int | None, channels: int) -> np.ndarray:
    """One image as uint8 ``(H, W, C)``, resized (bilinear) to ``image_size`` when given."""
    from PIL import Image  # lazy

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def build_image_cache(
    paths: Sequence[str | os.PathLike],
    *,
    image_size: int,
    channels: int = 3,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The images of ``paths`` as a read-only memory-mapped uint8 array ``(N, H, W, C)``.

    Decodes every file on the first call (tqdm bar) and writes ``<cache_dir>/images-<key>.npy``
    atomically; later calls with the same file list only map the file.
    """
    if image_size is None or int(image_size) != image_size or image_size < 1:
        raise ValueError(f"the image cache needs a fixed image_size >= 1, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if len(paths) == 0:
        raise ValueError("no images to cache")
    folder = cache_dir(directory)
    target = folder / f"images-{cache_key(paths, image_size, channels)}.npy"
    shape = (len(paths), image_size, image_size, channels)
    if target.exists():
        arr = np.load(target, mmap_mode="r")
        if arr.shape == shape and arr.dtype == np.uint8:
            return arr
    with atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        from tqdm.auto import tqdm  # lazy

        for i, p in enumerate(tqdm(paths, disable=not progress, desc="decode images", dynamic_ncols=True)):
            try:
                out[i] = decode_image(p, image_size, channels)
            except OSError as err:
                raise OSError(f"cannot decode image {p}: {err}") from err
        out.flush()
        del out
    return np.load(target, mmap_mode="r")
