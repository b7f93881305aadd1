"""Decode-once cache, augmentation, pre-training (resume, selection), frozen-feature training, and
the staged mini-ImageNet pipeline on tiny generated folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fewshot_ccd.backbones import Conv4
from fewshot_ccd.data import MiniImageNet, split_episode
from fewshot_ccd.data.augment import AugmentConfig, augment_batch
from fewshot_ccd.data.cache import build_image_cache, cache_dir, cache_key
from fewshot_ccd.data.synthetic import write_miniimagenet_like
from fewshot_ccd.dependency import ClassDependencyModule
from fewshot_ccd.evaluate import evaluate_features
from fewshot_ccd.features import cached_features, meta_train_features, on_features
from fewshot_ccd.methods import CCDNet, ProtoNet
from fewshot_ccd.pretrain import LAST_NAME, PretrainConfig, load_pretrained, pretrain
from fewshot_ccd.train import TrainConfig


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Class-folder layout, 4 train / 3 val classes of 12 images at 16x16; a per-test cache folder."""
    root = write_miniimagenet_like(tmp_path_factory.mktemp("data"), classes={"train": 4, "val": 3},
                                   per_class=12, image_size=16, layout="folders")
    return root / "mini-imagenet"


# ---- cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "folders"])
def test_cache_matches_decoding_in_both_layouts(tmp_path, layout):
    root = write_miniimagenet_like(tmp_path / "d", classes={"train": 2}, per_class=3, image_size=16,
                                   layout=layout) / "mini-imagenet"
    plain = MiniImageNet(root, split="train", image_size=16)
    cached = MiniImageNet(root, split="train", image_size=16, cache=tmp_path / "c", progress=False)
    assert isinstance(cached.images, np.memmap) or isinstance(getattr(cached.images, "base", None), np.memmap)
    assert cached.images.shape == (6, 16, 16, 3) and cached.images.dtype == np.uint8
    for i in range(6):
        assert torch.allclose(plain[i][0], cached[i][0]) and plain[i][1] == cached[i][1]
    idx = [4, 0, 4, 2]
    assert torch.equal(cached.load_batch(idx), torch.stack([cached[i][0] for i in idx]))
    assert torch.equal(plain.load_batch(idx), cached.load_batch(idx))


def test_cache_is_atomic_keyed_by_the_files_and_reused(tmp_path, monkeypatch):
    root = write_miniimagenet_like(tmp_path / "d", classes={"train": 2}, per_class=3, image_size=8) / "mini-imagenet"
    paths = MiniImageNet(root, split="train", image_size=8).paths
    folder = tmp_path / "c"
    first = build_image_cache(paths, image_size=8, directory=folder, progress=False)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"images-{cache_key(paths, 8, 3)}.npy"]  # no temporary file left behind

    import fewshot_ccd.data.cache as cache_mod

    def boom(*args, **kwargs):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", boom)
    again = build_image_cache(paths, image_size=8, directory=folder, progress=False)  # mapped, not decoded
    assert np.array_equal(first, again)
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another key
        build_image_cache(paths, image_size=4, directory=folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == files  # the failed build left nothing
    os.utime(paths[0], ns=(1, 1))  # a changed file changes the key
    assert cache_key(paths, 8, 3) != files[0][len("images-"):-len(".npy")]


def test_cache_dir_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CCD_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and cache_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="image_size"):
        build_image_cache(["x.png"], image_size=None, directory=tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="bad.jpg"):
        build_image_cache([bad], image_size=8, directory=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# ---- augmentation -----------------------------------------------------------------------------
def test_augment_is_seeded_and_changes_images():
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(padding=2, flip=True, jitter=0.2)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    flip_only = augment_batch(x, AugmentConfig(padding=0, flip=True), torch.Generator().manual_seed(3))
    for img, out in zip(x, flip_only):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
    with pytest.raises(ValueError, match="jitter"):
        AugmentConfig(jitter=1.5)


# ---- pre-training -----------------------------------------------------------------------------
def _pre_cfg(tmp_path, **kw):
    base = dict(epochs=3, batch_size=8, lr=0.05, val_every=3, val_way=3, val_per_class=None, val_episodes=20,
                val_query=2, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, progress=False)
    return PretrainConfig(**(base | kw))


def test_pretrain_learns_selects_on_val_and_resumes_exactly(mini, tmp_path):
    train = MiniImageNet(mini, split="train", image_size=16, cache=tmp_path / "c", progress=False)
    val = MiniImageNet(mini, split="val", image_size=16, cache=tmp_path / "c", progress=False)
    torch.manual_seed(0)
    full_bb = Conv4(3, hidden=8)
    init = {k: v.clone() for k, v in full_bb.state_dict().items()}
    full = pretrain(full_bb, train, _pre_cfg(tmp_path / "a"), val_set=val)
    assert full.steps == full.total_steps == 18 and len(full.val) == 6
    assert np.mean(full.losses[-4:]) < np.mean(full.losses[:4])
    assert full.best_val == max(v["mean"] for v in full.val)

    part_bb = Conv4(3, hidden=8)
    part_bb.load_state_dict(init)
    cut = pretrain(part_bb, train, _pre_cfg(tmp_path / "b", stop_after=7), val_set=val)
    assert cut.steps == 7
    resumed_bb = Conv4(3, hidden=8)  # a fresh process: other weights, restored from the checkpoint
    rest = pretrain(resumed_bb, train, _pre_cfg(tmp_path / "b"), val_set=val)
    assert rest.steps == 18 and rest.losses == full.losses and rest.val == full.val
    for k, v in full_bb.state_dict().items():
        assert torch.equal(v, resumed_bb.state_dict()[k]), k
    meta = load_pretrained(part_bb, tmp_path / "b" / "ckpt")
    assert meta["step"] == full.best_step and meta["val"]["mean"] == full.best_val

    with pytest.raises(ValueError, match=r"another config \(differs in \['lr'\]\)"):
        pretrain(Conv4(3, hidden=8), train, _pre_cfg(tmp_path / "b", lr=0.01), val_set=val)
    with pytest.raises(ValueError, match="other data"):
        pretrain(Conv4(3, hidden=8), val, _pre_cfg(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no pre-trained checkpoint"):
        load_pretrained(Conv4(3, hidden=8), tmp_path / "nowhere")
    assert (tmp_path / "b" / "ckpt" / LAST_NAME).exists()


def test_pretrain_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr"):
        PretrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="val_per_class"):
        PretrainConfig(val_per_class=3)


# ---- episodes, frozen features ----------------------------------------------------------------
def test_split_episode_is_the_sampler_layout():
    items = torch.arange(2 * 5).float().unsqueeze(1)  # 2 classes x (2 support + 3 query)
    s, sl, q, ql = split_episode(items, 2, 2, 3)
    assert s.flatten().tolist() == [0, 1, 5, 6] and q.flatten().tolist() == [2, 3, 4, 7, 8, 9]
    assert sl.tolist() == [0, 0, 1, 1] and ql.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="expected n_way"):
        split_episode(items, 3, 2, 3)


def _clustered(n_classes, per, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 2
    labels = torch.arange(n_classes).repeat_interleave(per)
    return centres[labels] + torch.randn(len(labels), dim, generator=g) * 1.5, labels


def test_frozen_feature_training_trains_only_the_module_and_is_seeded():
    feats, labels = _clustered(12, 10, 16, 0)

    def run():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = ClassDependencyModule(16, num_heads=2, scale_init=0.1)
        model = on_features(CCDNet(Conv4(3, hidden=4), module, temperature=64.0, learn_temperature=True))
        r = meta_train_features(model, feats, labels, TrainConfig(n_way=4, n_shot=1, n_query=3, steps=30, lr=1e-2,
                                                                  progress=False))
        return model, r

    (m1, r1), (_, r2) = run(), run()
    assert r1.losses == r2.losses and r1.steps == 30 and min(r1.losses) > 1e-3
    assert m1.dependency.alpha.item() != pytest.approx(0.1)  # the module was trained
    with pytest.raises(ValueError, match="no parameters outside its backbone"):
        meta_train_features(on_features(ProtoNet(Conv4(3))), feats, labels, TrainConfig(n_way=4, progress=False))
    bad = feats.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        meta_train_features(m1, bad, labels, TrainConfig(n_way=4, progress=False))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_features(ProtoNet(torch.nn.Identity()), bad, labels, n_way=4, n_shot=1, episodes=2)


def test_cached_features_recompute_only_when_the_key_changes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3, 2) * len(calls)

    a = cached_features(tmp_path / "f.npy", compute, meta={"step": 1})
    b = cached_features(tmp_path / "f.npy", compute, meta={"step": 1})
    c = cached_features(tmp_path / "f.npy", compute, meta={"step": 2})
    assert torch.equal(a, b) and len(calls) == 2 and torch.equal(c, torch.full((3, 2), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.npy"]


# ---- pipeline pieces ----------------------------------------------------------------------------
def test_pipeline_stage_is_resumable_and_variants_are_validated(tmp_path):
    from fewshot_ccd.pipeline import PipelineConfig, Variant, _stage, build_variant

    calls = []
    first = _stage(tmp_path / "s.json", {"a": 1}, lambda: calls.append(1) or {"x": len(calls)})
    again = _stage(tmp_path / "s.json", {"a": 1}, lambda: calls.append(1) or {"x": len(calls)})
    other = _stage(tmp_path / "s.json", {"a": 2}, lambda: calls.append(1) or {"x": len(calls)})
    assert first == again == {"x": 1} and other == {"x": 2}
    with pytest.raises(ValueError, match="divisible"):
        Variant("bad", num_heads=3).dependency(16)
    with pytest.raises(ValueError, match="train_way"):
        Variant("w", train_way=1)
    with pytest.raises(ValueError, match="unique"):
        PipelineConfig(variants=(Variant("a"), Variant("a")))
    with pytest.raises(ValueError, match="distance must be one of"):
        Variant("d", distance="manhattan")
    with pytest.raises(ValueError, match="train_steps"):
        Variant("s", train_steps=0)
    with pytest.raises(ValueError, match="lr"):
        Variant("l", lr=float("nan"))
    cos = build_variant(Variant("c", num_heads=1, distance="cosine", temperature=0.1), 16)
    assert cos.distance == "cosine" and cos.log_temperature.exp().item() == pytest.approx(0.1)
    cfg = PipelineConfig(variants=[{"name": "p", "norm": "post"}], pretrain={"epochs": 1})
    assert cfg.variants[0].norm == "post" and cfg.pretrain.epochs == 1
