"""Data loading, id maps, splits and the download / checksum logic of cmc_rec.data."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
from cmc_testdata import needs_douban, needs_ml100k

from cmc_rec import data as D


def test_ratings_from_array_dataframe_and_errors():
    pd = pytest.importorskip("pandas")
    arr = np.array([[1, 10, 4.0], [2, 10, 3.0], [1, 11, 5.0]])
    r = D.Ratings.from_any(arr)
    assert r.users.dtype.kind == "i" and list(r.users) == [1, 2, 1] and list(r.ratings) == [4, 3, 5]
    df = pd.DataFrame({"user": ["a", "b"], "item": ["x", "y"], "rating": [1.0, 2.0]})
    r2 = D.Ratings.from_any(df)
    assert list(r2.users) == ["a", "b"]
    with pytest.raises(ValueError, match="shape"):
        D.Ratings.from_any(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        D.Ratings([1], [2], [np.nan])


def test_idmap_roundtrip_and_unknown():
    m = D.IdMap(np.array([30, 10, 20, 10]))
    assert len(m) == 3
    idx = m.to_index(np.array([10, 20, 30, 99]))
    assert list(idx) == [0, 1, 2, -1]
    assert list(m.to_raw(idx[:3])) == [10, 20, 30]
    with pytest.raises(ValueError, match="out of range"):
        m.to_raw(np.array([3]))
    s = D.IdMap(np.array(["b", "a"]))
    assert list(s.to_index(np.array(["a", "c"]))) == [0, -1]


def test_random_split_seeded_and_disjoint():
    r = D.Ratings(np.arange(100), np.arange(100) % 7, np.ones(100))
    a_tr, a_te = D.random_split(r, 0.2, seed=3)
    b_tr, b_te = D.random_split(r, 0.2, seed=3)
    c_tr, _ = D.random_split(r, 0.2, seed=4)
    assert len(a_te) == 20 and len(a_tr) == 80
    assert np.array_equal(a_te.users, b_te.users) and not np.array_equal(a_tr.users, c_tr.users)
    assert not set(a_tr.users) & set(a_te.users)
    with pytest.raises(ValueError, match="test_fraction"):
        D.random_split(r, 1.5)


def test_missing_dataset_error_names_path_and_fix(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_movielens_100k(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "CMC_REC_DATA" in msg and "download_movielens" in msg
    with pytest.raises(ValueError, match="u9"):
        D.load_movielens_100k_split("u9")
    with pytest.raises(ValueError, match="netflix"):
        D.load_monti("netflix")


def test_env_var_selects_root(tmp_path, monkeypatch):
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::5::3::978300760\n")
    monkeypatch.setenv("CMC_REC_DATA", str(tmp_path))
    assert D.data_root() == tmp_path
    assert len(D.load_movielens_1m()) == 1


def test_movielens_1m_fixture(tmp_path):
    (tmp_path / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n6040::3952::1::956703977\n"
    )
    r = D.load_movielens_1m(tmp_path)
    assert list(r.users) == [1, 1, 2, 6040]
    assert list(r.items) == [1193, 661, 1193, 3952]
    assert r.ratings.tolist() == [5.0, 3.0, 4.0, 1.0]


@needs_ml100k
def test_movielens_100k_official_splits():
    full = D.load_movielens_100k()
    assert len(full) == 100_000 and full.ratings.min() == 1 and full.ratings.max() == 5
    tr, te = D.load_movielens_100k_split("u1")
    assert (len(tr), len(te)) == (80_000, 20_000)
    _, te_a = D.load_movielens_100k_split("ua")
    assert len(te_a) == 9430  # 10 test ratings for each of the 943 users
    pairs_tr = set(zip(tr.users.tolist(), tr.items.tolist()))
    assert not pairs_tr & set(zip(te.users.tolist(), te.items.tolist()))


@needs_douban
def test_monti_douban_matches_published_counts():
    pytest.importorskip("h5py")
    tr, te = D.load_monti("douban")
    # IGMC / GC-MC report 136,891 Douban ratings with a 90/10 train/test split
    assert len(tr) + len(te) == 136_891 and len(te) == 13_689
    assert set(np.unique(tr.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert not set(zip(tr.users.tolist(), tr.items.tolist())) & set(zip(te.users.tolist(), te.items.tolist()))


def _file_url(path):
    return path.resolve().as_uri()


def test_atomic_fetch_verifies_checksum_and_leaves_no_partial_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello ratings")
    good = "sha256:" + hashlib.sha256(b"hello ratings").hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    D.atomic_fetch(_file_url(src), dest, good)
    assert dest.read_bytes() == b"hello ratings"
    bad_dest = tmp_path / "cache" / "bad.bin"
    with pytest.raises(D.ChecksumError, match="sha256"):
        D.atomic_fetch(_file_url(src), bad_dest, "sha256:" + "0" * 64)
    assert not bad_dest.exists()
    assert list((tmp_path / "cache").iterdir()) == [dest]  # no .part leftovers
    with pytest.raises(ValueError, match="digest"):
        D.verify_digest(dest, "crc32:abc")


def test_download_movielens_from_local_archive(tmp_path, monkeypatch):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::2::3::4\n")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(D.GROUPLENS_ARCHIVES, "ml-1m", {**D.GROUPLENS_ARCHIVES["ml-1m"], "archive_digest": f"md5:{md5}"})
    folder = D.download_movielens("ml-1m", tmp_path / "cache", url=_file_url(archive))
    assert folder == tmp_path / "cache" / "ml-1m"
    assert len(D.load_movielens_1m(folder)) == 1
    assert D.download_movielens("ml-1m", tmp_path / "cache", url="file:///does/not/exist") == folder  # cached
    with pytest.raises(D.ChecksumError):  # the pinned GroupLens digest rejects a foreign archive
        D.download_movielens("ml-100k", tmp_path / "cache2", url=_file_url(archive))
    assert not (tmp_path / "cache2" / "ml-100k.zip").exists()
