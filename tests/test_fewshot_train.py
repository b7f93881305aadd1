"""Meta-training (accelerate), checkpoints and resume, evaluation protocol, tiny end-to-end run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot_ccd import (
    CCDNet,
    ClassDependencyModule,
    Conv4,
    ProtoNet,
    TrainConfig,
    evaluate,
    evaluate_lake_runs,
    mean_ci95,
    meta_train,
)
from fewshot_ccd.data import LakeRun
from fewshot_ccd.evaluate import embed_dataset
from fewshot_ccd.train import load_checkpoint, save_checkpoint


class Synthetic(torch.utils.data.Dataset):
    """Classes = fixed random blocky 16x16 patterns (4x4 cells); items = pattern + noise (seeded)."""

    def __init__(self, n_classes: int, per_class: int, seed: int, noise: float = 0.7) -> None:
        g = torch.Generator().manual_seed(seed)
        cells = (torch.rand(n_classes, 1, 4, 4, generator=g) > 0.5).float()
        patterns = torch.nn.functional.interpolate(cells, scale_factor=4.0)  # (C, 1, 16, 16)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)
        self.images = patterns[self.labels] + noise * torch.randn(len(self.labels), 1, 16, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _ccd(seed: int = 0) -> CCDNet:
    torch.manual_seed(seed)
    return CCDNet(Conv4(1, hidden=16), ClassDependencyModule(16, num_heads=2, scale_init=0.1))


def _cfg(tmp_path=None, **kw) -> TrainConfig:
    base = dict(n_way=5, n_shot=1, n_query=3, steps=6, lr=3e-3, progress=False, cpu=True, seed=1,
                checkpoint_dir=str(tmp_path) if tmp_path else None, checkpoint_every=2)
    return TrainConfig(**(base | kw))


def test_mean_ci95_formula():
    x = [50.0, 60.0, 70.0, 80.0]
    mean, ci = mean_ci95(x)
    assert mean == 65.0 and math.isclose(ci, 1.96 * np.std(x, ddof=1) / 2)
    assert mean_ci95([3.0]) == (3.0, 0.0)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="meta_batch"):
        TrainConfig(meta_batch=0)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    data = Synthetic(12, 6, seed=0)
    full = _ccd()
    meta_train(full, data, _cfg(tmp_path / "a", meta_batch=2))
    part = _ccd()
    r1 = meta_train(part, data, _cfg(tmp_path / "b", meta_batch=2, stop_after=3))  # "interrupted"
    assert r1.steps == 3 and load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 3
    resumed = _ccd(seed=99)  # different init: everything must come from the checkpoint
    r2 = meta_train(resumed, data, _cfg(tmp_path / "b", meta_batch=2))
    assert r2.steps == 6 and len(r2.losses) == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    data = Synthetic(12, 6, seed=0)
    meta_train(_ccd(), data, _cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"another configuration \(seed: 1 -> 5\)"):
        meta_train(_ccd(), data, _cfg(tmp_path, steps=4, seed=5))


def test_evaluation_on_features_equals_episode_forward():
    data = Synthetic(8, 5, seed=1)
    model = _ccd().eval()
    res = evaluate(model, data, n_way=3, n_shot=2, n_query=2, episodes=4, seed=3)
    from fewshot_ccd.data import EpisodeCollate, EpisodeSampler

    sampler = EpisodeSampler(data.labels, n_way=3, n_shot=2, n_query=2, episodes=4, seed=3)
    collate = EpisodeCollate(3, 2, 2)
    accs = []
    with torch.no_grad():
        for ep in sampler:
            support, s_labels, query, q_labels = collate([data[i] for i in ep])
            accs.append(100.0 * (model(support, s_labels, query).argmax(-1) == q_labels).float().mean().item())
    assert res.per_episode == pytest.approx(accs) and res.episodes == 4
    assert embed_dataset(model, data).shape == (40, 16)


def test_lake_protocol_on_a_trivial_run():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 16, 16, generator=g)
    perm = torch.randperm(20, generator=g)
    run = LakeRun("run01", train, train[perm] + 0.01, perm)
    torch.manual_seed(0)
    res = evaluate_lake_runs(ProtoNet(Conv4(1, hidden=8)), [run])
    assert res.error == 0.0 and res.per_run == [0.0]


@pytest.mark.slow
def test_tiny_training_run_rises_above_chance():
    train, test = Synthetic(30, 8, seed=0), Synthetic(10, 8, seed=1)  # disjoint novel classes
    model = _ccd()
    before = evaluate(model, test, n_way=5, n_shot=1, n_query=3, episodes=60, seed=0)
    result = meta_train(model, train, _cfg(steps=60, n_query=3, lr=3e-3))
    after = evaluate(model, test, n_way=5, n_shot=1, n_query=3, episodes=60, seed=0)
    assert after.mean > 20.0 + 30.0  # chance is 20% on 5-way
    assert after.mean > before.mean + after.ci95 + before.ci95
    assert np.mean(result.accuracies[-10:]) > np.mean(result.accuracies[:10])
