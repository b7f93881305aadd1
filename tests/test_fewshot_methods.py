"""ProtoNet / CCDNet: the pure episode call, distances, label checks, fit/predict, FEAT regulariser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot_ccd import CCDNet, ClassDependencyModule, ProtoNet
from fewshot_ccd.methods.ccd import _group_by_class


class Flat(nn.Module):
    """Backbone that flattens images: features = pixels (D = C*H*W)."""

    def forward(self, x):
        return x.flatten(1)


def _episode(n_way=4, n_shot=2, n_query=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_way, d, generator=g) * 5
    s_labels = torch.arange(n_way).repeat_interleave(n_shot)
    q_labels = torch.arange(n_way).repeat_interleave(n_query)
    support = (centres[s_labels] + 0.1 * torch.randn(len(s_labels), d, generator=g)).view(-1, 1, 1, d)
    query = (centres[q_labels] + 0.1 * torch.randn(len(q_labels), d, generator=g)).view(-1, 1, 1, d)
    return support, s_labels, query, q_labels


def test_protonet_logits_are_negative_squared_distances_over_temperature():
    support, s_labels, query, _ = _episode()
    model = ProtoNet(Flat(), temperature=2.0)
    protos = torch.stack([support.flatten(1)[s_labels == c].mean(0) for c in range(4)])
    expected = -((query.flatten(1)[:, None] - protos[None]) ** 2).sum(-1) / 2.0
    torch.testing.assert_close(model(support, s_labels, query), expected, rtol=1e-4, atol=1e-3)


def test_protonet_unsquared_euclidean_is_easyfsls_cdist():
    support, s_labels, query, _ = _episode()
    protos = torch.stack([support.flatten(1)[s_labels == c].mean(0) for c in range(4)])
    expected = -((query.flatten(1)[:, None] - protos[None]) ** 2).sum(-1).sqrt() / 2.0
    model = ProtoNet(Flat(), distance="euclidean_unsquared", temperature=2.0)
    torch.testing.assert_close(model(support, s_labels, query), expected, rtol=1e-4, atol=1e-4)
    ccd = CCDNet(Flat(), ClassDependencyModule(6, num_heads=2), distance="euclidean_unsquared")
    assert ccd(support, s_labels, query).shape == (len(query), 4)


def test_protonet_cosine():
    support, s_labels, query, q_labels = _episode()
    model = ProtoNet(Flat(), distance="cosine", temperature=0.1)
    logits = model(support, s_labels, query)
    assert logits.abs().max() <= 10.0 + 1e-4  # |cos| / 0.1
    assert (logits.argmax(-1) == q_labels).all()


def test_learned_temperature_is_a_parameter():
    model = ProtoNet(Flat(), temperature=3.0, learn_temperature=True)
    assert any(p is model.log_temperature for p in model.parameters())
    assert ProtoNet(Flat()).log_temperature.requires_grad is False


def test_forward_is_pure_and_label_order_consistent():
    support, s_labels, query, q_labels = _episode()
    torch.manual_seed(0)
    model = CCDNet(Flat(), ClassDependencyModule(6, num_heads=2)).eval()
    a = model(support, s_labels, query)
    b = model(support, s_labels, query)
    torch.testing.assert_close(a, b)
    # relabelling the classes permutes the logit columns (the module is equivariant)
    perm = torch.tensor([2, 0, 3, 1])
    c = model(support, perm[s_labels], query)
    torch.testing.assert_close(c[:, perm], a, rtol=1e-5, atol=1e-4)
    assert (a.argmax(-1) == q_labels).all()
    assert not any(isinstance(v, torch.Tensor) for v in vars(model).values())


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 0, 2, 2]), r"classes \[1\] have no image"),
    (torch.tensor([0, 1, -1, 1]), "0..N-1"),
    (torch.tensor([0.0, 1.0, 0.0, 1.0]), "integers"),
    (torch.tensor([0, 1, 0]), "one label per support image"),
])
def test_bad_support_labels_are_clear_errors(labels, match):
    model = ProtoNet(Flat())
    with pytest.raises(ValueError, match=match):
        model(torch.randn(4, 1, 1, 3), labels, torch.randn(2, 1, 1, 3))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="distance"):
        ProtoNet(Flat(), distance="manhattan")
    with pytest.raises(ValueError, match="temperature"):
        ProtoNet(Flat(), temperature=0.0)
    with pytest.raises(ValueError, match="ClassDependencyModule"):
        CCDNet(Flat(), nn.Identity())
    with pytest.raises(ValueError, match="contrastive_weight"):
        CCDNet(Flat(), ClassDependencyModule(6, num_heads=2), contrastive_weight=-1.0)


def test_fit_predict_single_images_with_arbitrary_labels():
    support, s_labels, query, q_labels = _episode()
    names = torch.tensor([10, 42, 7, 99])
    model = ProtoNet(Flat()).fit(support, names[s_labels])
    torch.testing.assert_close(model.predict(query), names[q_labels])
    one = model.predict(query[5])  # a single image (C, H, W)
    assert one.dim() == 0 and int(one) == int(names[q_labels[5]])
    assert "_fit_prototypes" not in model.state_dict()  # not saved with the weights


def test_predict_before_fit_is_a_clear_error():
    with pytest.raises(RuntimeError, match="fit"):
        ProtoNet(Flat()).predict(torch.randn(2, 1, 1, 3))


def test_fit_matches_forward_for_ccd():
    support, s_labels, query, _ = _episode()
    torch.manual_seed(0)
    model = CCDNet(Flat(), ClassDependencyModule(6, num_heads=2, scale_init=0.5)).eval()
    torch.testing.assert_close(model.fit(support, s_labels).predict_logits(query), model(support, s_labels, query))


def test_ccd_module_changes_the_logits_once_scaled():
    support, s_labels, query, _ = _episode()
    torch.manual_seed(0)
    dep = ClassDependencyModule(6, num_heads=2)
    with torch.no_grad():
        dep.alpha.fill_(1.0)
    ccd, proto = CCDNet(Flat(), dep), ProtoNet(Flat())
    assert not torch.allclose(ccd(support, s_labels, query), proto(support, s_labels, query))


def test_group_by_class_pads_uneven_sets():
    feats = torch.arange(5.0).unsqueeze(1)  # (5, 1)
    labels = torch.tensor([1, 0, 1, 1, 0])
    sets, mask = _group_by_class(feats, labels, 2)
    assert sets.shape == (2, 3, 1)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert sets[0, :2, 0].tolist() == [1.0, 4.0] and sets[1, :, 0].tolist() == [0.0, 2.0, 3.0]


def test_feat_contrastive_regulariser_adds_a_trainable_term():
    support, s_labels, query, q_labels = _episode()
    torch.manual_seed(0)
    plain = CCDNet(Flat(), ClassDependencyModule(6, num_heads=2))
    torch.manual_seed(0)
    reg = CCDNet(Flat(), ClassDependencyModule(6, num_heads=2), contrastive_weight=0.5,
                 contrastive_temperature=4.0)
    loss_plain, logits_plain = plain.episode_loss(support, s_labels, query, q_labels)
    loss_reg, logits_reg = reg.episode_loss(support, s_labels, query, q_labels)
    torch.testing.assert_close(logits_plain, logits_reg)
    assert loss_reg > loss_plain
    loss_reg.backward()
    assert reg.dependency.q_map.weight.grad.abs().sum() > 0


def test_build_model_shares_the_backbone_init_across_methods():
    from fewshot_ccd.models import build_model

    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    proto, ccd, qkv = (build_model(m, seed=3) for m in ("protonet", "ccd", "ccd_qkv"))
    assert torch.equal(torch.rand(3), before)  # the global RNG is left untouched
    for a, b in zip(proto.backbone.state_dict().values(), ccd.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert qkv.dependency.config.num_heads == 1 and not qkv.dependency.config.residual
    with pytest.raises(ValueError, match="method"):
        build_model("maml")
    strong = build_model("ccd", seed=3, scale_init=0.5)  # the experiment's --scale-init
    assert float(strong.dependency.alpha.detach()) == pytest.approx(0.5)
    assert float(ccd.dependency.alpha.detach()) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="scale_init"):
        build_model("ccd", scale_init=0.0)
    assert proto.distance == ccd.distance == "euclidean"  # Snell et al.'s squared distance by default
    assert {build_model(m, distance="euclidean_unsquared").distance for m in ("protonet", "ccd")} == {
        "euclidean_unsquared"}
