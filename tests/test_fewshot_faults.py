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
