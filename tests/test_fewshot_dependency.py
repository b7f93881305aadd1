"""ClassDependencyModule: shapes, permutation equivariance, masks, gradients, near-identity init."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot_ccd import ClassDependencyModule, DependencyConfig


def _module(dim: int = 16, **kw) -> ClassDependencyModule:
    torch.manual_seed(0)
    return ClassDependencyModule(dim, num_heads=4, **kw).eval()


def _grow_scale(module: ClassDependencyModule, value: float = 1.0) -> ClassDependencyModule:
    """Make the dependency update large so that the tests see it (it is ~1% at init)."""
    with torch.no_grad():
        module.alpha.fill_(value)
    return module


@pytest.mark.parametrize("shape", [(5, 16), (3, 5, 16), (1, 16), (2, 1, 16)])
def test_output_shape_matches_input(shape):
    m = _module()
    out = m(torch.randn(*shape))
    assert out.shape == shape
    assert torch.isfinite(out).all()


def test_single_class_attends_to_itself():
    m = _grow_scale(_module())
    x = torch.randn(1, 16)
    h = m.norm(x)
    v = m.out_map(m.v_map(h))  # softmax over one key is 1: the update is W_o W_v LN(x)
    expected = x + m.scale(h.unsqueeze(0))[0] * v
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_permutation_equivariant(norm):
    m = _grow_scale(_module(norm=norm))
    x = torch.randn(2, 7, 16)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], rtol=1e-5, atol=1e-5)


def test_refinement_depends_on_other_classes():
    m = _grow_scale(_module())
    x = torch.randn(5, 16)
    y = x.clone()
    y[4] = torch.randn(16) * 3  # change another class
    assert not torch.allclose(m(x)[0], m(y)[0], atol=1e-4)


def test_batched_equals_one_episode_at_a_time():
    m = _grow_scale(_module())
    x = torch.randn(3, 6, 16)
    torch.testing.assert_close(m(x), torch.stack([m(e) for e in x]), rtol=1e-5, atol=1e-5)


def test_mask_padded_classes_do_not_affect_the_real_ones():
    m = _grow_scale(_module())
    real = torch.randn(4, 16)
    padded = torch.cat([real, torch.randn(3, 16) * 100]).unsqueeze(0)  # (1, 7, 16)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    out = m(padded, mask)
    torch.testing.assert_close(out[0, :4], m(real), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 4:], padded[0, 4:])  # padded rows pass through unchanged


def test_mask_batch_of_episodes_with_different_ways():
    m = _grow_scale(_module())
    a, b = torch.randn(5, 16), torch.randn(2, 16)
    batch = torch.zeros(2, 5, 16)
    batch[0], batch[1, :2] = a, b
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = m(batch, mask)
    torch.testing.assert_close(out[0], m(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :2], m(b), rtol=1e-5, atol=1e-5)


def test_mask_with_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="mask must have shape"):
        _module()(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))


def test_near_identity_at_init():
    torch.manual_seed(0)
    m = ClassDependencyModule(64)  # default: 8 heads, pre-norm, adaptive scale 0.01
    x = torch.randn(20, 64) * 2 + 1
    rel = (m(x) - x).norm() / x.norm()
    assert 0 < rel < 0.02


def test_gradients_reach_every_parameter_and_the_input():
    m = _module()
    m.train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    (m(x) ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_padded_classes_get_no_gradient():
    m = _grow_scale(_module())
    x = torch.randn(1, 6, 16, requires_grad=True)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    m(x, mask)[0, :4].sum().backward()
    assert x.grad[0, 4:].abs().sum() == 0


def test_scale_is_episode_dependent_once_learned():
    m = _module()
    with torch.no_grad():
        m.gate.weight.normal_()
    g = m.scale(torch.randn(3, 5, 16))
    assert g.shape == (3, 1, 1)
    assert g.flatten().unique().numel() == 3


def test_blog_qkv_variant_is_the_blog_formula():
    torch.manual_seed(0)
    m = ClassDependencyModule.blog_qkv(32)
    x = torch.randn(5, 32)
    q, k, v = m.q_map(x), m.k_map(x), m.v_map(x)
    expected = torch.softmax(q @ k.T * 32 ** -0.5, dim=-1) @ v
    torch.testing.assert_close(m(x), expected)
    assert not hasattr(m, "alpha")


def test_config_and_keywords_agree():
    cfg = DependencyConfig(dim=24, num_heads=3, norm="post", scale_init=0.1)
    m = ClassDependencyModule(config=cfg)
    assert m.head_dim == 8 and math.isclose(m.alpha.item(), 0.1, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 10, "num_heads": 4}, "divisible"),
    ({"dim": 16, "norm": "mid"}, "norm"),
    ({"dim": 16, "dropout": 1.5}, "dropout"),
    ({"dim": 16, "scale_init": 0.0}, "scale_init"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassDependencyModule(**kwargs)


def test_bad_input_shape_is_a_clear_error():
    m = _module()
    with pytest.raises(ValueError, match="D=8"):
        m(torch.randn(5, 8))
    with pytest.raises(ValueError, match="prototypes must be"):
        m(torch.randn(16))
