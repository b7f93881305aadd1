"""Per-token cross-attention heat maps over the image, as a PNG grid."""

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
    image: np.ndarray | None = None,
    row: int = -1,
    columns: int = 6,
) -> Path:
    """Write a grid of per-token attention maps (one panel per start / word / end-of-text token).

    Each panel shows where the image looked at that token during the scored (warm-up) calls,
    over the image when given, titled with the token, its normalised score and whether it was kept.

    Args:
        report: the processor's report of a generation with ``warmup < 1`` and ``record_maps=True``.
        path: PNG file to write (folders are created).
        image: (H, W, 3) image in [0, 1] or uint8 (e.g. ``pipe(..., output_type="np").images[0]``).
        row: UNet batch row (under classifier-free guidance the conditional rows come last;
            the default -1 is the last prompt).
        columns: panels per grid row.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.maps:
        raise ValueError("the report holds no attention maps: the generation scored no call (warmup=1?) or record_maps=False")
    B = report.mass.shape[0]
    row = row % B
    size = image.shape[:2] if image is not None else max(report.maps, key=lambda hw: hw[0] * hw[1])
    maps = report.token_maps(row).float().cpu()  # (L, h, w)
    maps = F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]  # (L, H, W)
    positions = [p for p in range(maps.shape[0]) if report.roles is None or int(report.roles[row, p]) != PADDING]
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        image = image / 255.0 if image.max() > 1.0 else image
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
    fig.suptitle(f"cross-attention per token: {title!r}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
