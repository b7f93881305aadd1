"""ContrastiveMatrixModel, its InfoNCE, and the sparse graph views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmc_rec.graph import BipartiteGraph, DenoisingView, VariationalView, scatter_softmax
from cmc_rec.model import ContrastiveMatrixModel, LossConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)


def small_graph(n_users=6, n_items=8, n=40, levels=3, seed=0):
    rng = np.random.default_rng(seed)
    return BipartiteGraph(rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, levels, n),
                          n_users, n_items, levels)


def dense(graph, values, keep=None):
    keep = torch.ones(graph.num_edges, dtype=torch.bool) if keep is None else keep
    a = torch.zeros(graph.num_nodes, graph.num_nodes, dtype=values.dtype)
    a[graph.dst[keep], graph.src[keep]] = values[keep]
    return a


def test_blog_contrastive_loss_matches_formula():
    m = ContrastiveMatrixModel(5, 7, embedding_dim=4)
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    blog = F.cross_entropy(a @ p.T / 0.07, torch.arange(6))  # the blog's code, verbatim maths
    assert torch.allclose(m.contrastive_loss(a, p, 0.07, normalize=False), blog)
    cos = F.cross_entropy(F.normalize(a, dim=1) @ F.normalize(p, dim=1).T / 0.1, torch.arange(6))
    assert torch.allclose(m.contrastive_loss(a, p, 0.1), cos)
    assert m.contrastive_loss(p, p, 0.1) < m.contrastive_loss(a, p, 0.1)  # aligned pairs -> lower loss
    with pytest.raises(ValueError, match="temperature"):
        m.contrastive_loss(a, p, 0.0)
    with pytest.raises(ValueError, match="anchor"):
        m.contrastive_loss(a, p[:3], 0.1)


def test_spmm_matches_dense_and_gradients():
    graph = small_graph(n_users=3, n_items=4, n=8).double()
    v = torch.rand(graph.num_edges, dtype=torch.double, requires_grad=True)
    h = torch.rand(graph.num_nodes, 2, dtype=torch.double, requires_grad=True)
    keep = graph.symmetric_keep(0.3, torch.Generator().manual_seed(1))
    assert torch.allclose(graph.spmm(v, h), dense(graph, v.detach()) @ h)
    assert torch.allclose(graph.spmm(v, h, keep), dense(graph, v.detach(), keep) @ h)
    assert torch.autograd.gradcheck(lambda v, h: graph.spmm(v, h, keep), (v, h))
    assert torch.equal(keep, keep[graph.rev])  # a rating is dropped in both directions


def test_graph_rejects_bad_edges_and_dedupes():
    with pytest.raises(ValueError, match="out of range"):
        BipartiteGraph(np.array([0, 5]), np.array([0, 1]), np.array([0, 0]), 5, 2, 1)
    g = BipartiteGraph(np.array([0, 0]), np.array([1, 1]), np.array([0, 0]), 1, 2, 1)
    assert g.num_edges == 2  # the duplicate rating is kept once, in both directions


def test_scatter_softmax_sums_to_one_per_group():
    logits = torch.tensor([1.0, 2.0, 3.0, 100.0, -100.0])
    index = torch.tensor([0, 0, 1, 1, 2])
    out = scatter_softmax(logits, index, 4)
    sums = torch.zeros(4).index_add(0, index, out)
    assert torch.allclose(sums[:3], torch.ones(3)) and out[3] > 0.999


def test_denoising_view_downweights_edges_with_negative_score():
    graph = small_graph(levels=2)
    view = DenoisingView(dim=4, num_levels=2, num_layers=2, attention_dim=2)
    h = torch.randn(graph.num_nodes, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        view.level_bias.copy_(torch.tensor([0.0, -20.0]))  # level 1 edges are "noise"
    z, alpha = view(h, graph)
    assert z.shape == h.shape
    noisy = graph.level == 1
    # nodes that have any clean in-edge put (almost) no weight on their noisy in-edges
    has_clean = torch.zeros(graph.num_nodes, dtype=torch.bool)
    has_clean[graph.dst[~noisy]] = True
    assert alpha[noisy & has_clean[graph.dst]].max() < 1e-6


def test_variational_view_kl_sampling_and_seeding():
    graph = small_graph()
    view = VariationalView(dim=4, num_layers=2, edge_dropout=0.2)
    h = torch.randn(graph.num_nodes, 4, generator=torch.Generator().manual_seed(0))
    z1, mu1, kl = view(h, graph, torch.Generator().manual_seed(5))
    z2, _, _ = view(h, graph, torch.Generator().manual_seed(5))
    z3, _, _ = view(h, graph, torch.Generator().manual_seed(6))
    assert kl >= 0 and torch.equal(z1, z2) and not torch.equal(z1, z3)
    view.eval()
    za, mua, _ = view(h, graph)
    assert torch.equal(za, mua)  # eval: the mean, no noise, no edge dropout


def test_model_forward_backward_reaches_every_parameter():
    graph_users, graph_items = np.array([0, 1, 2, 3, 0]), np.array([0, 1, 2, 0, 3])
    m = ContrastiveMatrixModel(4, 4, embedding_dim=8, num_levels=2, global_mean=3.0)
    m.attach_graph(graph_users, graph_items, np.array([0, 1, 1, 0, 1]))
    u, i = torch.as_tensor(graph_users), torch.as_tensor(graph_items)
    r = torch.tensor([2.0, 5.0, 4.0, 1.0, 5.0])
    out = m(u, i, r, LossConfig(view=0.5, pref=0.5, kl=0.1, l2=0.1), torch.arange(8), torch.Generator())
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_model_without_graph_is_the_blog_model():
    m = ContrastiveMatrixModel(3, 5)  # blog signature, default embedding_dim=128
    assert m.user_emb.weight.shape == (3, 128) and m.item_emb.weight.shape == (5, 128)
    z = m.embeddings()
    assert torch.equal(z[:3], m.user_emb.weight) and torch.equal(z[3:], m.item_emb.weight)
    with pytest.raises(ValueError):
        ContrastiveMatrixModel(0, 5)


@pytest.mark.slow
def test_views_scale_to_a_million_ratings():
    rng = np.random.default_rng(0)
    n_users, n_items, n = 6000, 4000, 1_000_000
    m = ContrastiveMatrixModel(n_users, n_items, embedding_dim=8, num_levels=5)
    m.attach_graph(rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, 5, n))
    u, i = torch.as_tensor(rng.integers(0, n_users, 4096)), torch.as_tensor(rng.integers(0, n_items, 4096))
    out = m(u, i, torch.full((4096,), 3.0), LossConfig(), torch.arange(512), torch.Generator())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.user_emb.weight.grad is not None


def test_node_dropout_only_in_training_and_validated():
    with pytest.raises(ValueError, match="node_dropout"):
        ContrastiveMatrixModel(3, 3, node_dropout=1.0)
    m = ContrastiveMatrixModel(4, 4, embedding_dim=8, num_levels=2, node_dropout=0.5)
    m.attach_graph(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1]))
    a = m.encode(torch.Generator().manual_seed(0))[3]
    b = m.encode(torch.Generator().manual_seed(1))[3]
    assert not torch.equal(a, b)
    assert torch.equal(m.embeddings(), m.embeddings())  # eval: deterministic
