"""Bad input and faults in fewshot_ccd: each is refused at the boundary, naming the value or file."""

from __future__ import annotations

import json
import os

import pytest

from fewshot_ccd import experiment


# ---- experiment --out ------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_experiment_refuses_an_unwritable_out_before_any_work(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)

    def no_work(cfg):
        raise AssertionError("training started although --out cannot be written")

    monkeypatch.setattr(experiment, "run_experiment", no_work)
    try:
        with pytest.raises(OSError, match=r"cannot write the --out file .*locked"):
            experiment.main(["--out", str(locked / "r.json")])
    finally:
        locked.chmod(0o700)


def test_experiment_refuses_an_out_below_a_file_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: pytest.fail("work started"))
    with pytest.raises(OSError, match=r"cannot write the --out file .*file/r.json"):
        experiment.main(["--out", str(tmp_path / "file" / "r.json")])


def test_experiment_refuses_a_folder_as_out(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: pytest.fail("work started"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        experiment.main(["--out", str(tmp_path)])


def test_experiment_prints_results_before_writing_them(tmp_path, monkeypatch, capsys):
    fake = {"accuracy": {"5way1shot": {"mean": 91.25, "ci95": 0.5, "episodes": 3}}, "train": {"steps": 2},
            "lake_runs": None}
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: fake)

    def disk_full(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(experiment, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="disk full"):
        experiment.main(["--out", str(tmp_path / "r.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"]["5way1shot"]["mean"] == 91.25
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind

    monkeypatch.undo()
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: fake)
    experiment.main(["--out", str(tmp_path / "sub" / "r.json")])
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == fake


# ---- ClassDependencyModule: padded classes --------------------------------------------------------
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_padded_class_does_not_poison_the_real_ones(poison):
    import torch

    from fewshot_ccd import ClassDependencyModule

    torch.manual_seed(0)
    module = ClassDependencyModule(8, num_heads=2, scale_init=0.5).eval()
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    clean = module(x, mask)
    bad = x.clone()
    bad[0, 3] = poison
    bad[1, 2:, 1] = poison
    out = module(bad, mask)
    torch.testing.assert_close(out[mask], clean[mask], rtol=0, atol=0)  # the real classes: bit for bit
    assert torch.equal(out[~mask].isnan(), bad[~mask].isnan())  # padded classes pass through unchanged


# ---- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels, match", [
    ([0.2, 0.7, 0.2, 0.7], r"labels must be integers, got 0.2"),
    ([0.0, float("nan"), 1.0, 1.0], r"labels must be finite integers, got nan \(at position 1\)"),
    ([0.0, float("inf"), 1.0, 1.0], r"finite integers, got inf"),
    ([True, False, True, False], "must be integers, got dtype torch.bool"),
])
def test_non_integer_labels_are_refused(labels, match):
    import torch

    from fewshot_ccd import Conv4, ProtoNet
    from fewshot_ccd.data import EpisodeSampler

    with pytest.raises(ValueError, match=match):
        EpisodeSampler(labels, n_way=2, n_shot=1, n_query=1, episodes=1)
    with pytest.raises(ValueError, match=match.replace("labels", "support_labels", 1)):
        ProtoNet(Conv4(1, hidden=4)).fit(torch.zeros(4, 1, 8, 8), torch.tensor(labels))
    # whole numbers held as floats are integers
    assert EpisodeSampler([0.0, 0.0, 1.0, 1.0], n_way=2, n_shot=1, n_query=1, episodes=1).classes == [0, 1]


# ---- hyper-parameters: NaN / inf / zero episodes ----------------------------------------------------
@pytest.mark.parametrize("build, match", [
    (lambda: __import__("fewshot_ccd").TrainConfig(lr=float("nan")), "lr must be a finite number, got nan"),
    (lambda: __import__("fewshot_ccd").TrainConfig(lr_decay=float("nan")), "lr_decay must be a finite number"),
    (lambda: __import__("fewshot_ccd").TrainConfig(weight_decay=float("nan")), "weight_decay must be a finite"),
    (lambda: __import__("fewshot_ccd").TrainConfig(grad_clip=float("inf")), "grad_clip must be a finite"),
    (lambda: __import__("fewshot_ccd").TrainConfig(steps=2.5), "steps must be an integer >= 1, got 2.5"),
    (lambda: __import__("fewshot_ccd").TrainConfig(steps=float("nan")), "steps must be an integer >= 1, got nan"),
    (lambda: experiment.ExperimentConfig(contrastive_weight=float("nan")), "contrastive_weight must be a finite"),
    (lambda: experiment.ExperimentConfig(scale_init=float("inf")), "scale_init must be a finite"),
    (lambda: experiment.ExperimentConfig(eval_episodes=0), "eval_episodes must be an integer >= 1, got 0"),
    (lambda: __import__("fewshot_ccd").ClassDependencyModule(8, scale_init=float("nan")), "scale_init must be"),
])
def test_non_finite_hyper_parameters_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_ccd_contrastive_weight_nan_and_zero_episodes_are_refused():
    import torch

    from fewshot_ccd import CCDNet, ClassDependencyModule, Conv4, evaluate

    with pytest.raises(ValueError, match="contrastive_weight must be a finite number, got nan"):
        CCDNet(Conv4(1, hidden=4), ClassDependencyModule(4, num_heads=1), contrastive_weight=float("nan"))

    class Tiny(torch.utils.data.Dataset):
        labels = torch.arange(3).repeat_interleave(4)

        def __len__(self):
            return 12

        def __getitem__(self, i):
            raise AssertionError("the data set was embedded although episodes=0")

    with pytest.raises(ValueError, match="episodes must be an integer >= 1, got 0"):
        evaluate(CCDNet(Conv4(1, hidden=4), ClassDependencyModule(4, num_heads=1)), Tiny(), n_way=2, n_shot=1,
                 episodes=0)


# ---- damaged files, mixed sizes, empty folders ------------------------------------------------------
def _png(path, size=(8, 8), value=128):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def test_a_truncated_png_names_the_file(tmp_path):
    from fewshot_ccd.data import ImageFolderDataset

    good = _png(tmp_path / "a" / "1.png")
    bad = _png(tmp_path / "a" / "2.png")
    bad.write_bytes(good.read_bytes()[:40])
    ds = ImageFolderDataset(tmp_path)
    ds[0]
    with pytest.raises(OSError, match=r"cannot read image .*a/2.png"):
        ds[1]
    with pytest.raises(OSError, match=r"a/2.png"):
        ImageFolderDataset(tmp_path, image_size=8, cache=tmp_path / "cache", progress=False)


def test_mixed_image_sizes_name_both_files(tmp_path):
    from fewshot_ccd.data import ImageFolderDataset

    _png(tmp_path / "a" / "1.png", (8, 8))
    _png(tmp_path / "b" / "2.png", (8, 6))
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match=r"image .*b/2.png is 8x6 but .*a/1.png is 8x8.*image_size"):
        ds.load_batch([0, 1])
    ds[0]
    with pytest.raises(ValueError, match="images differ in size"):
        ds[1]
    assert ImageFolderDataset(tmp_path, image_size=8).load_batch([0, 1]).shape == (2, 3, 8, 8)


def test_an_empty_image_folder_is_not_an_empty_data_set(tmp_path):
    from fewshot_ccd.data import ImageFolderDataset

    with pytest.raises(ValueError, match=r"no images in .*expected <class>/<image>"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images in"):
        ImageFolderDataset(tmp_path)


def test_truncated_omniglot_archives_name_the_file(tmp_path):
    import io
    import zipfile

    import numpy as np

    from fewshot_ccd.data import OmniglotDataset, load_lake_runs

    folder = tmp_path / "omniglot"
    folder.mkdir()
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.ones((2, 20, 105, 105), dtype=bool))
    (folder / "images_background.npz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"images_background.npz is unreadable, truncated or corrupt"):
        OmniglotDataset(tmp_path, split="background")
    (folder / "all_runs.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"all_runs.zip is unreadable"):
        load_lake_runs(tmp_path)
    png = _png(tmp_path / "x.png").read_bytes()
    with zipfile.ZipFile(folder / "images_background_small1.zip", "w") as zf:
        zf.writestr("Alpha/character01/0001_01.png", png[:30])
    with pytest.raises(ValueError, match=r"small1.zip \(member Alpha/character01/0001_01.png\) is unreadable"):
        OmniglotDataset(tmp_path, split="small1")


# ---- meta_train checkpoints: bound to data and config, two generations -----------------------------
class _Patterns:
    """Classes = fixed random 16x16 patterns; items = pattern + noise (seeded)."""

    def __init__(self, seed: int, n_classes: int = 8, per_class: int = 5):
        import torch

        g = torch.Generator().manual_seed(seed)
        patterns = torch.rand(n_classes, 1, 16, 16, generator=g)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)
        self.images = patterns[self.labels] + 0.3 * torch.randn(len(self.labels), 1, 16, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _model():
    import torch

    from fewshot_ccd import CCDNet, ClassDependencyModule, Conv4

    torch.manual_seed(0)
    return CCDNet(Conv4(1, hidden=8), ClassDependencyModule(8, num_heads=2, scale_init=0.1))


def _train(folder, data, **kw):
    from fewshot_ccd import TrainConfig, meta_train

    cfg = dict(n_way=4, n_shot=1, n_query=2, steps=4, lr=3e-3, progress=False, cpu=True, seed=1,
               checkpoint_dir=str(folder), checkpoint_every=2) | kw
    model = _model()
    return model, meta_train(model, data, TrainConfig(**cfg))


@pytest.mark.parametrize("change, match", [
    (dict(n_way=3), r"another configuration \(n_way: 4 -> 3\)"),
    (dict(lr=1e-2), r"another configuration \(lr: 0.003 -> 0.01\)"),
])
def test_resume_refuses_another_config_naming_the_folder(tmp_path, change, match):
    data = _Patterns(0)
    _train(tmp_path, data)
    with pytest.raises(ValueError, match=match):
        _train(tmp_path, data, **change)
    with pytest.raises(ValueError, match=str(tmp_path)):
        _train(tmp_path, data, **change)


def test_resume_refuses_other_data_of_the_same_shape(tmp_path):
    _train(tmp_path, _Patterns(0))
    with pytest.raises(ValueError, match=rf"checkpoint in {tmp_path} was written for other data"):
        _train(tmp_path, _Patterns(1), steps=6)


def test_fewer_steps_than_the_checkpoint_has_done_is_an_error(tmp_path):
    data = _Patterns(0)
    _train(tmp_path, data, steps=4)
    with pytest.raises(ValueError, match=r"has done 4 steps, more than steps=2: pass steps >= 4"):
        _train(tmp_path, data, steps=2)
    _, again = _train(tmp_path, data, steps=4)  # as many steps as done: the finished model, no step run
    assert again.steps == 4 and again.seconds < 5


def test_the_previous_checkpoint_survives_a_truncated_last_one(tmp_path, caplog):
    import torch

    from fewshot_ccd.checkpoint import load_checkpoint, previous_path

    data = _Patterns(0)
    full, _ = _train(tmp_path / "full", data, steps=6)
    _train(tmp_path / "cut", data, steps=6)
    last = tmp_path / "cut" / "last.pt"
    assert load_checkpoint(last)["step"] == 6 and load_checkpoint(previous_path(last))["step"] == 4
    last.write_bytes(last.read_bytes()[:100])  # a torn write
    with caplog.at_level("WARNING", logger="fewshot_ccd.checkpoint"):
        resumed, res = _train(tmp_path / "cut", data, steps=6)
    assert "resuming from the previous checkpoint" in caplog.text and res.steps == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # steps 5-6 recomputed exactly
    last.write_bytes(b"garbage")
    previous_path(last).write_bytes(b"garbage too")
    with pytest.raises(ValueError, match=r"last.previous.pt is unreadable \(truncated or not a torch checkpoint\)"):
        _train(tmp_path / "cut", data, steps=6)
