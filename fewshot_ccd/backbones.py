"""Feature extractors: Conv-4, ResNet-12 and a wrapper for any torchvision / timm model.

Every backbone maps images ``(B, C, H, W)`` to flat features ``(B, D)`` and exposes ``out_dim``
once it is known (Conv-4 depends on the input size; call :func:`feature_dim` to measure it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv4", "ResNet12", "FeatureExtractor", "feature_dim"]


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Conv-4 of Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017.

    Four blocks of 3x3 conv (``hidden`` filters), BatchNorm, ReLU and 2x2 max-pool, then flatten.

    Args:
        in_channels: image channels C (1 for Omniglot, 3 for mini-ImageNet).
        hidden: filters per block (64 in the paper).

    Shapes: images ``(B, C, H, W)`` -> features ``(B, hidden * (H // 16) * (W // 16))``;
    64-d for 28x28 Omniglot, 1600-d for 84x84 mini-ImageNet.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or hidden < 1:
            raise ValueError(f"in_channels and hidden must be >= 1, got {in_channels}, {hidden}")
        self.encoder = nn.Sequential(
            _conv_block(in_channels, hidden), _conv_block(hidden, hidden),
            _conv_block(hidden, hidden), _conv_block(hidden, hidden),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).flatten(1)  # (B, D)


class _ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, drop_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Dropout(drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12, the few-shot variant (Lee et al., MetaOptNet, CVPR 2019; used by FEAT).

    Four residual blocks, each three 3x3 conv + BN + LeakyReLU(0.1) with a 1x1 conv shortcut,
    followed by 2x2 max-pool; global average pooling at the end.  (DropBlock is replaced by plain
    dropout of rate ``drop_rate``.)

    Args:
        in_channels: image channels C.
        channels: filters of the four blocks ((64, 160, 320, 640) in the papers).
        drop_rate: dropout after each block.

    Shapes: images ``(B, C, H, W)`` -> features ``(B, channels[-1])``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int, int, int] = (64, 160, 320, 640),
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels must be four positive ints, got {channels}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        blocks, prev = [], in_channels
        for ch in channels:
            blocks.append(_ResBlock(prev, ch, drop_rate))
            prev = ch
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images).mean(dim=(2, 3))  # (B, D)


class FeatureExtractor(nn.Module):
    """Turns any image classifier into a feature extractor ``(B, C, H, W) -> (B, D)``.

    Args:
        model: any ``nn.Module`` mapping images to a tensor; its output is flattened.
        head: name of the classification-head attribute to replace by ``nn.Identity``
            (e.g. ``"fc"`` for torchvision ResNets); None keeps the model as it is.

    Use :meth:`from_torchvision` or :meth:`from_timm` to build one by name (both import lazily).
    """

    def __init__(self, model: nn.Module, head: str | None = None) -> None:
        super().__init__()
        if head is not None:
            if not isinstance(getattr(model, head, None), nn.Module):
                raise ValueError(f"model has no sub-module named {head!r} to strip")
            setattr(model, head, nn.Identity())
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"wrapped model must return a tensor, got {type(out).__name__}")
        return out.flatten(1)  # (B, D)

    @classmethod
    def from_torchvision(cls, name: str, *, weights: str | None = None) -> FeatureExtractor:
        """``torchvision.models.get_model(name, weights=weights)`` with its head stripped."""
        import torchvision  # lazy: optional dependency

        model = torchvision.models.get_model(name, weights=weights)
        for head in ("fc", "classifier", "head", "heads"):
            if isinstance(getattr(model, head, None), nn.Module):
                return cls(model, head=head)
        raise ValueError(f"cannot find the classification head of torchvision model {name!r}")

    @classmethod
    def from_timm(cls, name: str, *, pretrained: bool = False) -> FeatureExtractor:
        """``timm.create_model(name, pretrained=pretrained, num_classes=0)`` (pooled features)."""
        import timm  # lazy: optional dependency

        return cls(timm.create_model(name, pretrained=pretrained, num_classes=0))


@torch.no_grad()
def feature_dim(backbone: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Feature dimension D of ``backbone`` on images of shape ``(C, H, W)`` (one dry forward)."""
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = backbone(torch.zeros(2, *image_shape, device=device))
    finally:
        backbone.train(was_training)
    return int(out.flatten(1).shape[1])
