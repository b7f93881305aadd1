"""Per-token attention heat maps over the image (cross-attention on a UNet, image-to-text joint
attention on an MM-DiT), as a PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from .report import PruneReport
from .scoring import PADDING

__all__ = ["render_heatmaps"]


def render_heatmaps(
    report: PruneReport,
    path: str | Path,
    image=None,
    row: int = -1,
    columns: int = 6,
) -> Path:
    """Write a grid of per-token attention maps (one panel per start / word / end-of-text token).

    Each panel shows where the image looked at that token during the scored (warm-up) calls,
    over the image when given, titled with the token, its normalised score and whether it was kept.

    Args:
        report: the processor's report of a generation with ``warmup < 1`` and ``record_maps=True``.
        path: PNG file to write (folders are created).
        image: the generated image to draw under the maps: a PIL image (``pipe(...).images[0]``), or
            an (H, W, 3) / (H, W) array in [0, 1] or uint8 (``pipe(..., output_type="np").images[0]``).
        row: UNet batch row, in ``[-B, B)`` for a batch of B rows (under classifier-free guidance
            the conditional rows come last; the default -1 is the last prompt).
        columns: panels per grid row.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.maps:
        raise ValueError("the report holds no attention maps: the generation scored no call (warmup=1?) or record_maps=False")
    row = report.row_index(row)  # IndexError naming the row and the batch size when out of range
    image = _as_float_image(image)
    size = image.shape[:2] if image is not None else max(report.maps, key=lambda hw: hw[0] * hw[1])
    maps = report.token_maps(row).float().cpu()  # (L, h, w)
    maps = F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]  # (L, H, W)
    positions = [p for p in range(maps.shape[0]) if report.roles is None or int(report.roles[row, p]) != PADDING]
    rows = -(-len(positions) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, positions):
        m = maps[p]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        if image is not None:
            ax.imshow(image)
            ax.imshow(m.numpy(), cmap="jet", alpha=0.5)
        else:
            ax.imshow(m.numpy(), cmap="jet")
        token = report.tokens[row][p].replace("</w>", "") if report.tokens else f"#{p}"
        score = float(report.scores[row, p]) if report.scores is not None else float("nan")
        kept = report.keep is None or bool(report.keep[row, p])
        ax.set_title(f"{token}\n{score:.2f} {'kept' if kept else 'PRUNED'}", fontsize=9, color="black" if kept else "red")
    title = report.prompts[row] if report.prompts else f"row {row}"
    fig.suptitle(f"{report.attention} per token: {title!r}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _as_float_image(image) -> np.ndarray | None:
    """A PIL image or an (H, W[, C]) array (uint8, or floats in [0, 1]) as float32 (H, W[, C]) in [0, 1]."""
    if image is None:
        return None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image (no PIL import needed)
        image = np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or arr.size == 0:
        raise ValueError(f"image must be a PIL image or an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"image must be a PIL image or a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"a float image must be in [0, 1] (got [{arr.min():.3g}, {arr.max():.3g}]); pass uint8 for 0-255")
    return arr
