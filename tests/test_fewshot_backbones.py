"""Conv-4, ResNet-12 and the generic feature-extractor wrapper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fewshot_ccd import Conv4, FeatureExtractor, ResNet12, feature_dim


def test_conv4_feature_sizes():
    assert Conv4(1)(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert feature_dim(Conv4(3), (3, 84, 84)) == 1600


def test_resnet12_small_channels():
    net = ResNet12(3, channels=(4, 6, 8, 10))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10) and net.out_dim == 10
    with pytest.raises(ValueError, match="channels"):
        ResNet12(3, channels=(4, 6, 8))


def test_resnet12_default_is_the_640d_variant():
    assert ResNet12().out_dim == 640


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_feature_extractor_strips_the_head():
    fx = FeatureExtractor(TinyClassifier(), head="fc")
    assert fx(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert FeatureExtractor(TinyClassifier())(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_feature_extractor_errors():
    with pytest.raises(ValueError, match="classifier"):
        FeatureExtractor(TinyClassifier(), head="classifier")

    class Dict(nn.Module):
        def forward(self, x):
            return {"x": x}

    with pytest.raises(TypeError, match="tensor"):
        FeatureExtractor(Dict())(torch.randn(1, 3, 4, 4))


def test_feature_dim_restores_training_mode():
    net = Conv4(1)
    net.train()
    feature_dim(net, (1, 28, 28))
    assert net.training


def test_import_is_light():
    code = ("import sys, fewshot_ccd; print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', "
            "'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
