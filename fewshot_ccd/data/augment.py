"""Batch augmentation for pre-training, on tensors, seeded by a ``torch.Generator``.

The standard few-shot pre-training augmentation (FEAT, Ye et al. 2020; Chen et al. 2019): a random
crop of the zero-padded image (``padding`` pixels each side) back to its size, and a random
horizontal flip.  Applied to a whole batch at once so that it costs little next to the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment_batch"]


@dataclass
class AugmentConfig:
    """Pre-training augmentation: random padded crop, horizontal flip, brightness/contrast jitter."""

    padding: int = 8  # pixels of zero padding each side before the random crop (0: no crop)
    flip: bool = True  # random horizontal flip with probability 1/2
    jitter: float = 0.0  # brightness and contrast factors drawn from [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if int(self.padding) != self.padding or self.padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {self.padding!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """``(B, C, H, W)`` float images -> augmented ``(B, C, H, W)``; all randomness from ``generator``."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    out = images
    if config.padding:
        p = config.padding
        padded = F.pad(images, (p, p, p, p))  # (B, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).tolist()
        out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    if config.flip:
        flip = torch.rand(b, generator=generator) < 0.5  # (B,)
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
    if config.jitter:
        lo, span = 1.0 - config.jitter, 2.0 * config.jitter
        bright = lo + span * torch.rand(b, 1, 1, 1, generator=generator)
        contrast = lo + span * torch.rand(b, 1, 1, 1, generator=generator)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        out = ((out - mean) * contrast + mean * bright).clamp(0.0, 1.0)
    return out
