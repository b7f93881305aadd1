"""Episode sampler, Omniglot loaders, image-folder formats (tiny fixtures), downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_ccd.data import (
    CIFARFS,
    EpisodeCollate,
    EpisodeSampler,
    ImageFolderDataset,
    MiniImageNet,
    OmniglotDataset,
    atomic_write_bytes,
    cache_dir,
    data_root,
    download,
    load_lake_runs,
    omniglot_dir,
    verify_file,
)

LABELS = torch.arange(10).repeat_interleave(6)  # 10 classes x 6 images


def _omniglot_or_skip() -> Path:
    try:
        return omniglot_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))


# ---- EpisodeSampler ---------------------------------------------------------------------------
def test_sampler_layout_and_classes():
    s = EpisodeSampler(LABELS, n_way=3, n_shot=2, n_query=1, episodes=4, seed=1)
    episodes = list(s)
    assert len(episodes) == len(s) == 4
    for ep in episodes:
        labels = LABELS[ep].view(3, 3)  # class-major: support then query of each class
        assert (labels == labels[:, :1]).all()
        assert labels[:, 0].unique().numel() == 3
        assert len(set(ep)) == 9


def test_sampler_is_seeded_and_independent_of_global_rng():
    a = list(EpisodeSampler(LABELS, n_way=3, n_shot=1, n_query=2, episodes=5, seed=7))
    torch.manual_seed(123)
    torch.rand(10)
    b = list(EpisodeSampler(LABELS, n_way=3, n_shot=1, n_query=2, episodes=5, seed=7))
    c = list(EpisodeSampler(LABELS, n_way=3, n_shot=1, n_query=2, episodes=5, seed=8))
    assert a == b and a != c
    s = EpisodeSampler(LABELS, n_way=3, n_shot=1, n_query=2, episodes=5, seed=7)
    assert list(s) == list(s)  # the same fixed list on every pass


def test_sampler_start_and_sharding_cover_the_same_episodes():
    full = list(EpisodeSampler(LABELS, n_way=2, n_shot=1, n_query=1, episodes=10, seed=3))
    tail = list(EpisodeSampler(LABELS, n_way=2, n_shot=1, n_query=1, episodes=10, seed=3, start=4))
    assert tail == full[4:]
    shards = [list(EpisodeSampler(LABELS, n_way=2, n_shot=1, n_query=1, episodes=10, seed=3, rank=r,
                                  world_size=3)) for r in range(3)]
    assert shards[0] + shards[1] + shards[2] != full and sorted(map(tuple, sum(shards, []))) == sorted(
        map(tuple, full))


def test_sampler_names_the_class_with_too_few_images():
    labels = torch.cat([LABELS, torch.full((2,), 77)])  # class 77 has 2 images
    with pytest.raises(ValueError, match=r"class 77 has 2 images .* n_shot \+ n_query = 5"):
        EpisodeSampler(labels, n_way=3, n_shot=1, n_query=4, episodes=1)
    s = EpisodeSampler(labels, n_way=3, n_shot=1, n_query=4, episodes=3, drop_small_classes=True)
    assert 77 not in s.classes and all(77 not in LABELS[[i for i in ep if i < 60]] for ep in s)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 11}, "only 10 classes"),
    ({"n_shot": 0}, "n_shot"),
    ({"rank": 2, "world_size": 2}, "rank"),
])
def test_sampler_bad_arguments(kwargs, match):
    args = {"n_way": 2, "n_shot": 1, "n_query": 1, "episodes": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(LABELS, **args)


class _Toy(torch.utils.data.Dataset):
    labels = LABELS

    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), int(LABELS[i])


def test_sampler_as_dataloader_batch_sampler():
    sampler = EpisodeSampler(LABELS, n_way=4, n_shot=2, n_query=3, episodes=2, seed=0)
    loader = torch.utils.data.DataLoader(_Toy(), batch_sampler=sampler, collate_fn=EpisodeCollate(4, 2, 3))
    for (support, s_labels, query, q_labels), ep in zip(loader, sampler):
        assert support.shape == (8, 1, 2, 2) and query.shape == (12, 1, 2, 2)
        assert s_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and q_labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
        true = LABELS[support[:, 0, 0, 0].long()]
        assert (true.view(4, 2) == true.view(4, 2)[:, :1]).all()  # one real class per episode label
        assert support[:2, 0, 0, 0].tolist() == [float(i) for i in ep[:2]]


# ---- data root / Omniglot -------------------------------------------------------------------------
def test_data_root_precedence(monkeypatch, tmp_path):
    """argument, then $FEWSHOT_CCD_DATA, then the download cache; never a folder beside the checkout."""
    monkeypatch.setenv("MEASURED_REPRO_DATA", str(tmp_path / "b"))  # no longer read
    monkeypatch.setenv("FEWSHOT_CCD_DATA", str(tmp_path / "a"))
    monkeypatch.setenv("FEWSHOT_CCD_CACHE", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "a"
    assert data_root(tmp_path / "c") == tmp_path / "c"
    monkeypatch.delenv("FEWSHOT_CCD_DATA")
    assert data_root() == tmp_path / "cache" == cache_dir()
    with pytest.raises(FileNotFoundError, match=r"omniglot data not found.*the cache folder, since \$FEWSHOT_CCD_DATA is not set"):
        omniglot_dir()
    (tmp_path / "cache" / "omniglot").mkdir(parents=True)  # where download_omniglot() puts the files
    (tmp_path / "cache" / "omniglot" / "images_background.npz").write_bytes(b"")
    assert omniglot_dir() == tmp_path / "cache" / "omniglot"



def test_missing_omniglot_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="omniglot data not found.*FEWSHOT_CCD_DATA"):
        OmniglotDataset(tmp_path)


def test_omniglot_npz_with_rotations():
    root = _omniglot_or_skip()
    if not (root / "images_background.npz").exists():
        pytest.skip(f"no images_background.npz in {root}")
    ds = OmniglotDataset(root, split="background", rotations=True, max_classes=3)
    assert ds.num_classes == 12 and len(ds) == 240
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and label == 0 and 0 <= image.min() and image.max() <= 1
    assert 0.01 < image.mean() < 0.5  # ink = 1 on a dark background
    torch.testing.assert_close(ds[3 * 20][0], torch.rot90(image, 1, dims=(1, 2)))  # class 3 = char 0 @ 90
    assert ds.class_names[3] == "char0000@rot90"


def test_omniglot_minimal_background_zip():
    root = _omniglot_or_skip()
    if not (root / "images_background_small1.zip").exists():
        pytest.skip(f"no images_background_small1.zip in {root}")
    ds = OmniglotDataset(root, split="small1", max_classes=2)
    assert ds.num_classes == 2 and len(ds) == 40 and ds.class_names[0].endswith("/character01")


def test_lake_runs():
    root = _omniglot_or_skip()
    if not (root / "all_runs.zip").exists():
        pytest.skip(f"no all_runs.zip in {root}")
    runs = load_lake_runs(root)
    assert len(runs) == 20
    for run in runs:
        assert run.train_images.shape == (20, 1, 28, 28) == run.test_images.shape
        assert sorted(run.test_labels.tolist()) == list(range(20))  # one test image per class


# ---- image-folder formats on tiny fixtures --------------------------------------------------------
def _png(path: Path, value: int, size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", 40 * c + i)
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.class_names == ["cat", "dog"] and len(ds) == 6
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and label == 1
    assert abs(image.mean().item() - 41 / 255) < 1e-3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'empty' has no images"):
        ImageFolderDataset(tmp_path)


@pytest.mark.parametrize("layout", ["flat", "class_folders"])
def test_mini_imagenet_csv_splits(tmp_path, layout):
    rows = ["filename,label"]
    for cls in ["n01532829", "n01558993"]:
        for i in range(2):
            name = f"{cls}{i:08d}.jpg"
            folder = tmp_path / "images" if layout == "flat" else tmp_path / cls
            _png(folder / name, 10, size=84)
            rows.append(f"{name},{cls}")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    ds = MiniImageNet(tmp_path, split="test")
    assert ds.class_names == ["n01532829", "n01558993"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds[0][0].shape == (3, 84, 84)
    with pytest.raises(FileNotFoundError, match="train.csv"):
        MiniImageNet(tmp_path, split="train")
    with pytest.raises(ValueError, match="split"):
        MiniImageNet(tmp_path, split="valid")


def test_cifar_fs_split_lists(tmp_path):
    for cls in ["apple", "bee", "cup"]:
        for i in range(2):
            _png(tmp_path / "data" / cls / f"{i}.png", 5, size=32)
    (tmp_path / "splits" / "bertinetto").mkdir(parents=True)
    (tmp_path / "splits" / "bertinetto" / "val.txt").write_text("cup\nbee\n")
    ds = CIFARFS(tmp_path, split="val")
    assert ds.class_names == ["cup", "bee"] and len(ds) == 4 and ds[0][0].shape == (3, 32, 32)
    (tmp_path / "splits" / "bertinetto" / "test.txt").write_text("zebra\n")
    with pytest.raises(FileNotFoundError, match="zebra"):
        CIFARFS(tmp_path, split="test")


# ---- downloads: checksum and atomic writes on local files -------------------------------------------
def test_download_verifies_checksum_atomically(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"omniglot" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(src.as_uri(), dest, sha256="0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing partial left behind
    assert download(src.as_uri(), dest, sha256=good) == dest and dest.read_bytes() == src.read_bytes()
    src.write_bytes(b"changed")  # a cached, verified file is not fetched again
    download(src.as_uri(), dest, sha256=good)
    verify_file(dest, good)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_experiment_finds_mini_imagenet_and_rejects_bad_config(tmp_path):
    from fewshot_ccd.experiment import ExperimentConfig, miniimagenet_eval_split, miniimagenet_root

    with pytest.raises(FileNotFoundError, match="'train.csv' or 'split/train.csv'"):
        miniimagenet_root(tmp_path)
    (tmp_path / "mini-imagenet" / "split").mkdir(parents=True)
    (tmp_path / "mini-imagenet" / "split" / "train.csv").write_text("filename,label\n")
    assert miniimagenet_root(tmp_path) == tmp_path / "mini-imagenet"
    assert miniimagenet_eval_split(tmp_path / "mini-imagenet") == "val"  # no test classes here
    (tmp_path / "mini-imagenet" / "split" / "test.csv").write_text("filename,label\n")
    assert miniimagenet_eval_split(tmp_path / "mini-imagenet") == "test"
    with pytest.raises(ValueError, match="dataset"):
        ExperimentConfig(dataset="cifar")
    with pytest.raises(ValueError, match="max_classes"):
        ExperimentConfig(dataset="miniimagenet", max_classes=3)
