"""cmc_rec at its boundary (issue 17): bad input and faults give a clear error naming the value or
file, or a documented behaviour -- never a silent wrong result."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from cmc_rec import (
    EASE,
    AutoencoderConfig,
    CMCConfig,
    CMCRecommender,
    KernelAutoencoderRecommender,
    LossConfig,
    MeanRecommender,
    RankingConfig,
    Ratings,
    SVDRecommender,
    TrainConfig,
    Trainer,
    evaluate,
    info_nce,
    temperature_sweep,
    tune,
)
from cmc_rec import data as D
from cmc_rec.model import ContrastiveMatrixModel
from cmc_rec.recommender import PAD_ID

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)
NAN, INF = float("nan"), float("inf")


def low_rank(n_users=40, n_items=25, rank=2, density=0.5, seed=0) -> np.ndarray:
    """(n, 3) float array user, item, rating on 1..5 (both ends present)."""
    rng = np.random.default_rng(seed)
    u, i = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    full = np.clip(np.round(3 + 1.5 * (u @ i.T) / np.sqrt(rank)), 1, 5)
    uu, ii = np.nonzero(rng.random((n_users, n_items)) < density)
    return np.stack([uu, ii, full[uu, ii]], axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# serious: checkpoints bound to their data; SVD on a large rating scale
# ---------------------------------------------------------------------------------------------


def _graph_run(ratings: np.ndarray, folder, epochs=3, seed=0, **train):
    u, i, r = ratings[:, 0].astype(int), ratings[:, 1].astype(int), ratings[:, 2].astype(np.float32)
    m = ContrastiveMatrixModel(40, 25, 8, num_layers=1, attention_dim=4, num_levels=5, global_mean=float(r.mean()),
                               seed=seed)
    m.attach_graph(u, i, (r - 1).astype(int))
    cfg = TrainConfig(epochs=epochs, batch_size=512, lr=0.02, patience=100, view_nodes=16, cpu=True,
                      checkpoint_dir=None if folder is None else str(folder), **train)
    return m, Trainer(cfg, LossConfig(contrast_batch=64)).fit(m, (u, i, r), (u[:30], i[:30], r[:30]))


def test_checkpoint_of_other_data_of_the_same_shape_is_refused(tmp_path):
    data = low_rank()
    _graph_run(data, tmp_path / "ck")  # finished run: 3 epochs
    other = data.copy()
    other[:, 2] = 6.0 - other[:, 2]  # same users, items and shape; other ratings
    with pytest.raises(ValueError, match=r"ck.*other data"):
        _graph_run(other, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"ck.*another model"):  # same data, another model (init seed)
        _graph_run(data, tmp_path / "ck", seed=1)
    _, res = _graph_run(data, tmp_path / "ck")  # the same run resumes its finished checkpoint
    assert res.resumed_at == 3 and res.epochs_run == 3
    _, res = _graph_run(data, tmp_path / "ck", progress=True)  # watching a run is not another run
    assert res.resumed_at == 3


def test_cmc_checkpoint_is_bound_to_the_graph_model_config(tmp_path):
    base = CMCConfig(ranking=None, autoencoder=None, graph_rating=True, rank_by="blend", embedding_dim=8,
                     num_layers=1, attention_dim=4, loss=LossConfig(contrast_batch=64),
                     train=TrainConfig(epochs=2, batch_size=512, view_nodes=16, cpu=True,
                                       checkpoint_dir=str(tmp_path / "cmc")))
    CMCRecommender(base).fit(low_rank())
    changed = CMCConfig(**{**base.__dict__, "node_dropout": 0.5})  # not a weight: only the context tells
    with pytest.raises(ValueError, match="another model"):
        CMCRecommender(changed).fit(low_rank())


def test_svd_scales_its_step_to_the_ratings_and_never_returns_a_nan_model():
    data = low_rank()
    scaled = data.copy()
    scaled[:, 2] = 50.0 * scaled[:, 2]  # a 50-250 scale: before, 100% NaN predictions
    a = SVDRecommender(n_factors=4, n_epochs=20, seed=0).fit(data)
    b = SVDRecommender(n_factors=4, n_epochs=20, seed=0).fit(scaled)  # before: every prediction NaN
    pa, pb = a.predict(data[:, 0], data[:, 1]), b.predict(data[:, 0], data[:, 1])
    assert np.all(np.isfinite(pb)) and np.allclose(pb, 50.0 * pa, rtol=1e-5)
    diverging = SVDRecommender(n_factors=4, n_epochs=5, lr=50.0, seed=0)
    with pytest.raises(FloatingPointError, match=r"diverged.*epoch 1.*lr=50"):
        diverging.fit(data)
    with pytest.raises(RuntimeError, match="not fitted"):  # a failed fit leaves no half-fitted model
        diverging.predict([0], [0])


# ---------------------------------------------------------------------------------------------
# wrong results without an error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [MeanRecommender, lambda: EASE(reg=1.0)], ids=["mean", "ease"])
def test_recommend_never_returns_seen_items_pads_explicitly(make):
    rows = [(1, i, 3.0) for i in range(8)] + [(2, i, 4.0) for i in range(2, 5)]  # user 1 saw 8 of 10 items
    rows += [(3, 8, 5.0), (3, 9, 1.0)]
    model = make().fit(np.array(rows))
    ids, scores = model.recommend([1, 2], k=5)
    assert ids.shape == (2, 5)
    assert set(ids[0, :2].tolist()) == {8, 9} and np.all(np.isfinite(scores[0, :2]))  # the only unseen items
    assert ids[0, 2:].tolist() == [PAD_ID["integer"]] * 3 and np.all(scores[0, 2:] == -np.inf)
    assert not set(ids[1].tolist()) & {2, 3, 4} and np.all(np.isfinite(scores[1]))  # 7 unseen: no padding
    named = make().fit(np.array([(f"u{u}", f"i{i}", r) for u, i, r in rows], dtype=object))
    ids, scores = named.recommend(["u1"], k=4)
    assert set(ids[0, :2].tolist()) == {"i8", "i9"} and ids[0, 2:].tolist() == ["", ""]


def test_dataframe_columns_are_read_by_name_never_by_position():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"movieId": [10, 11, 10], "rating": [4.0, 2.0, 5.0], "userId": [1, 1, 2]})
    with pytest.raises(ValueError, match=r"columns named.*userId.*columns="):
        MeanRecommender().fit(df)
    r = Ratings.from_any(df, columns={"userId": "user", "movieId": "item", "rating": "rating"})
    assert r.users.tolist() == [1, 1, 2] and r.items.tolist() == [10, 11, 10] and r.ratings.tolist() == [4, 2, 5]
    reordered = df.rename(columns={"userId": "user", "movieId": "item"})[["rating", "item", "user"]]
    assert Ratings.from_any(reordered).users.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="columns"):
        Ratings.from_any(df, columns={"userId": "user", "movieId": "item"})


def test_queries_with_the_other_id_type_are_refused():
    model = MeanRecommender().fit(np.array([("a", "x", 4.0), ("b", "y", 2.0), ("a", "y", 3.0)], dtype=object))
    with pytest.raises(ValueError, match=r"integer ids given.*fitted with string ids"):
        model.predict([1], ["x"])
    with pytest.raises(ValueError, match="integer ids given"):
        model.recommend([1, 2], k=1)
    assert model.predict(["a"], ["x"])[0] > 0  # the right type works
    ints = MeanRecommender().fit(low_rank())
    with pytest.raises(ValueError, match="string ids given"):
        ints.predict(["0"], ["1"])


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("make", [
    lambda x: SVDRecommender(lr=x),
    lambda x: SVDRecommender(reg=x),
    lambda x: MeanRecommender(reg_user=x),
    lambda x: MeanRecommender(reg_item=x),
    lambda x: LossConfig(temperature=x),
    lambda x: RankingConfig(temperature=x),
    lambda x: TrainConfig(lr=x),
    lambda x: TrainConfig(val_fraction=x),
    lambda x: AutoencoderConfig(l2=x),
    lambda x: CMCConfig(init_std=x),
    lambda x: CMCConfig(node_dropout=x),
    lambda x: D.random_split(Ratings.from_any(low_rank()), x),
    lambda x: info_nce(torch.ones(2, 3), torch.ones(2, 3), x),
], ids=["svd-lr", "svd-reg", "mean-reg_user", "mean-reg_item", "loss-temperature", "ranking-temperature",
        "train-lr", "train-val_fraction", "ae-l2", "cmc-init_std", "cmc-node_dropout", "split", "info_nce"])
def test_nan_and_inf_settings_are_refused(make, bad):
    with pytest.raises(ValueError, match=r"must be .*(nan|inf)"):
        make(bad)


def test_temperature_sweep_refuses_a_nan_temperature_anywhere():
    with pytest.raises(ValueError, match="temperature.*nan"):
        temperature_sweep(low_rank(), [0.2, NAN])


# ---------------------------------------------------------------------------------------------
# unhelpful errors: each names the file or the value and what was expected
# ---------------------------------------------------------------------------------------------


def _write_mat(path, n=6):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    m = rng.integers(0, 6, size=(n, n)).astype(np.float64)
    with h5py.File(path, "w") as f:
        f["M"], f["Otraining"], f["Otest"] = m, (rng.random((n, n)) < 0.5) * 1.0, (rng.random((n, n)) < 0.2) * 1.0


def test_monti_mat_files_truncated_or_not_hdf5(tmp_path):
    _write_mat(tmp_path / "training_test_dataset.mat", n=200)
    train, test = D.load_monti("douban", tmp_path)
    assert len(train) and len(test)
    blob = (tmp_path / "training_test_dataset.mat").read_bytes()
    (tmp_path / "training_test_dataset.mat").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"training_test_dataset\.mat.*truncated"):
        D.load_monti("douban", tmp_path)
    (tmp_path / "training_test_dataset.mat").write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(200))
    with pytest.raises(ValueError, match=r"training_test_dataset\.mat is not an HDF5 file.*v7\.3"):
        D.load_monti("douban", tmp_path)


def test_truncated_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(tmp_path):
    data = low_rank()
    m_full, _ = _graph_run(data, None, epochs=4)
    _graph_run(data, tmp_path / "ck", epochs=4)
    # a write of last.pt torn after the fact (e.g. the disk filled): the previous epoch's file is kept
    saved = torch.load(tmp_path / "ck" / "previous.pt", weights_only=True)
    assert saved["state"]["epoch"] == 3
    blob = (tmp_path / "ck" / "last.pt").read_bytes()
    (tmp_path / "ck" / "last.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.warns(UserWarning, match=r"last\.pt.*unreadable.*previous\.pt \(epoch 3\)"):
        m, res = _graph_run(data, tmp_path / "ck", epochs=4)
    assert res.resumed_at == 3 and res.epochs_run == 4
    for (name, a), b in zip(m_full.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), name  # one epoch redone from the previous checkpoint: the same weights
    for name in ("last.pt", "previous.pt"):
        (tmp_path / "ck" / name).write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"ck: no readable checkpoint.*last\.pt.*previous\.pt"):
        _graph_run(data, tmp_path / "ck", epochs=4)
    (tmp_path / "ck" / "previous.pt").unlink()
    torch.save({"model": {}}, tmp_path / "ck" / "last.pt")  # a foreign / older checkpoint
    with pytest.raises(ValueError, match="not a cmc_rec checkpoint"):
        _graph_run(data, tmp_path / "ck", epochs=4)


def test_movielens_files_header_only_empty_or_with_a_word(tmp_path):
    (tmp_path / "u.data").write_text("user_id\titem_id\trating\ttimestamp\n")  # a header-only file
    with pytest.raises(ValueError, match=r"u\.data, line 1: expected user.*'user_id"):
        D.load_movielens_100k(tmp_path)
    (tmp_path / "u.data").write_text("1\t2\t3\t0\n1\t3\tfive\t0\n")  # a word where a number belongs
    with pytest.raises(ValueError, match=r"u\.data, line 2: .*'1\\t3\\tfive"):
        D.load_movielens_100k(tmp_path)
    (tmp_path / "u.data").write_text("\n\n")
    with pytest.raises(ValueError, match=r"u\.data: no ratings"):
        D.load_movielens_100k(tmp_path)
    (tmp_path / "ratings.dat").write_text("1::2\n")
    with pytest.raises(ValueError, match=r"ratings\.dat, line 1"):
        D.load_movielens_1m(tmp_path)


def test_header_only_csv_is_an_empty_data_set_not_a_model(tmp_path):
    pd = pytest.importorskip("pandas")
    (tmp_path / "r.csv").write_text("user,item,rating\n")
    df = pd.read_csv(tmp_path / "r.csv")
    with pytest.raises(ValueError, match="zero ratings"):
        MeanRecommender().fit(df)
    model = MeanRecommender().fit(low_rank())
    with pytest.raises(ValueError, match="test set holds no ratings"):
        evaluate(model, low_rank(), df)


@pytest.mark.parametrize("k", [2.5, 0, True, "3", NAN])
def test_recommend_k_must_be_a_positive_integer(k):
    model = MeanRecommender().fit(low_rank())
    with pytest.raises(ValueError, match=r"k must be"):
        model.recommend([0], k=k)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        model.recommend([0], k=3, batch_size=1.5)


def test_mixed_type_ids_are_refused():
    pd = pytest.importorskip("pandas")
    with pytest.raises(ValueError, match=r"user ids mix id types: int \(1\), str \('a'\)"):
        Ratings([1, "a"], [1, 2], [3.0, 4.0])
    df = pd.DataFrame({"user": [1, 2], "item": ["x", 7], "rating": [3.0, 4.0]})  # an object column
    with pytest.raises(ValueError, match="item ids mix id types"):
        MeanRecommender().fit(df)
    model = MeanRecommender().fit(low_rank())
    with pytest.raises(ValueError, match="mix id types"):
        model.predict([0, "1"], [0, 1])
    with pytest.raises(ValueError, match=r"integers or strings, got the float 1\.5"):
        Ratings([1.5], [1], [3.0])
    assert model.predict([0.0, 1], [0, 1.0]).shape == (2,)  # integral floats are integer ids


def test_repeated_pairs_are_refused_not_summed_and_deduplicate_keeps_the_last():
    rows = np.array([[1, 10, 4.0], [2, 10, 3.0], [1, 10, 5.0], [2, 11, 1.0]])
    for make in (MeanRecommender, lambda: KernelAutoencoderRecommender(AutoencoderConfig(hidden=4, epochs=1))):
        with pytest.raises(ValueError, match=r"1 repeated \(user, item\) pairs, e\.g\. user 1, item 10 .*deduplicate"):
            make().fit(rows)
    model = MeanRecommender()
    with pytest.raises(ValueError, match="repeated"):
        model.fit(rows)
    with pytest.raises(RuntimeError, match="not fitted"):  # a refused fit leaves nothing half-fitted
        model.recommend([1], k=1)
    once = Ratings.from_any(rows).deduplicate()
    assert once.users.tolist() == [2, 1, 2] and once.items.tolist() == [10, 10, 11] and once.ratings.tolist() == [3, 5, 1]
    model = KernelAutoencoderRecommender(AutoencoderConfig(hidden=4, num_hidden_layers=1, epochs=2)).fit(once)
    assert model.rating_range == (1.0, 5.0)  # never a summed 9 on a 1-5 scale


# ---------------------------------------------------------------------------------------------
# data location, progress, readable results
# ---------------------------------------------------------------------------------------------


def test_data_root_is_an_argument_or_cmc_rec_data_never_a_guess(tmp_path, monkeypatch):
    monkeypatch.delenv("CMC_REC_DATA", raising=False)
    monkeypatch.setenv("MEASURED_REPRO_DATA", str(tmp_path))  # the old project-wide variable is not read
    with pytest.raises(D.DatasetNotFoundError, match=r"no data location.*CMC_REC_DATA.*download_movielens"):
        D.load_movielens_100k()
    assert D.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("CMC_REC_DATA", str(tmp_path / "root"))
    with pytest.raises(D.DatasetNotFoundError, match=r"root/ml-100k/u\.data not found"):
        D.load_movielens_100k()


def test_training_reports_early_stopping_and_prints_tables(caplog):
    data = low_rank()
    u, i, r = data[:, 0].astype(int), data[:, 1].astype(int), data[:, 2].astype(np.float32)
    m = ContrastiveMatrixModel(40, 25, 8, num_layers=1, attention_dim=4, num_levels=5, global_mean=float(r.mean()))
    m.attach_graph(u, i, (r - 1).astype(int))
    cfg = TrainConfig(epochs=100, batch_size=4096, lr=0.3, patience=2, view_nodes=16, cpu=True)
    with caplog.at_level(logging.INFO, logger="cmc_rec"):
        res = Trainer(cfg, LossConfig(l2=0.0, contrast_batch=64)).fit(m, (u, i, r), (u[:40], i[:40], r[:40]))
    assert res.stopped_early and res.epochs_run < 100
    assert f"early stopping at epoch {res.epochs_run}" in caplog.text and f"keeping epoch {res.best_epoch}" in caplog.text
    text = str(res)
    assert text.startswith(f"trained early stopping after {res.epochs_run} epochs")
    assert "| epoch | loss | mse | val RMSE |" in text and text.count("\n| ") == res.epochs_run + 1
    model = MeanRecommender().fit(data)
    table = str(evaluate(model, data, data, k=3))
    assert table.splitlines()[0].startswith("| RMSE | MAE | Recall@3") and len(table.splitlines()) == 3
    ease = str(evaluate(EASE(reg=1.0).fit(data), data, data, k=3))
    assert ease.splitlines()[2].startswith("| n/a | n/a |")
    tuned = tune(MeanRecommender, {"reg_user": [1.0, 50.0]}, data, k=3, metric="rmse")
    lines = str(tuned).splitlines()
    assert lines[0] == f"chosen by validation rmse: {tuned.best}" and lines[2].startswith("| reg_user | RMSE |")
    assert sum(line.endswith("| * |") for line in lines) == 1 and len(lines) == 6


def test_cmc_fit_shows_progress_of_each_part_and_the_autoencoder_early_stop(capsys, caplog):
    cfg = CMCConfig(ranking=RankingConfig(embedding_dim=8, num_layers=1, epochs=2, batch_size=256),
                    autoencoder=AutoencoderConfig(hidden=8, num_hidden_layers=1, l2=1.0, epochs=40, patience=1,
                                                  val_fraction=0.2),
                    user_autoencoder=AutoencoderConfig(hidden=8, num_hidden_layers=1, epochs=2, user_based=True),
                    progress=True)
    with caplog.at_level(logging.INFO, logger="cmc_rec"):
        CMCRecommender(cfg).fit(low_rank())
    err = capsys.readouterr().err
    assert "cmc ranking" in err and "autoencoder 1/1" in err
    assert "autoencoder 1/1: early stopping at epoch" in caplog.text
    quiet = CMCConfig(**{**cfg.__dict__, "progress": False})
    CMCRecommender(quiet).fit(low_rank())
    assert capsys.readouterr().err == ""


def test_check_number_is_the_one_validation():
    from cmc_rec._util import check_number

    assert check_number("x", 3, low=1, integer=True) == 3
    for bad, kw in [(NAN, {}), (INF, {}), (-math.inf, {"low": 0}), (1.0, {"integer": True}), (True, {}),
                    (0.0, {"low": 0, "low_open": True}), (1.0, {"high": 1, "high_open": True}), ("1", {})]:
        with pytest.raises(ValueError, match=r"^x must be"):
            check_number("x", bad, **kw)
