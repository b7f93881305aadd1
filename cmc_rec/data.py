"""Rating data: MovieLens 100K / 1M, the Monti et al. matrices, splits, id maps and downloads.

Where the data comes from (first hit wins):

1. an explicit ``path=`` (the data set's own folder, e.g. ``.../ml-100k``);
2. ``$CMC_REC_DATA`` or the project-wide ``$MEASURED_REPRO_DATA`` (a root holding ``ml-100k/``,
   ``ml-1m/``, ``monti/``);
3. ``../shared/data`` beside the repository root.

A missing data set raises :class:`DatasetNotFoundError`, naming the path and how to fix it.
Nothing here is ever committed: GroupLens' terms forbid redistribution.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
ENV_VARS = ("CMC_REC_DATA", "MEASURED_REPRO_DATA")
MOVIELENS_100K_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
MONTI_DATASETS = ("douban", "flixster", "yahoo_music")

# GroupLens archives.  GroupLens publishes MD5 files beside each archive; those are pinned for the
# archive.  The SHA-256 of the extracted ratings file is pinned where we could verify it offline.
GROUPLENS_ARCHIVES: dict[str, dict[str, str]] = {
    "ml-100k": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "archive_digest": "md5:0e33842e24a9c977be4e0107933c0723",
        "ratings_file": "u.data",
        "ratings_digest": "sha256:06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    },
    "ml-1m": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "archive_digest": "md5:c4d9eecfca2ab87c1945afe126590906",
        "ratings_file": "ratings.dat",
        "ratings_digest": "",
    },
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not where we looked; the message says where and how to fix it."""


class ChecksumError(ValueError):
    """A downloaded or cached file does not match its pinned digest."""


# ----------------------------------------------------------------------------------------------
# Ratings container and id maps
# ----------------------------------------------------------------------------------------------


@dataclass
class Ratings:
    """Explicit ratings as three aligned arrays of raw ids (any hashable numpy dtype)."""

    users: np.ndarray  # (n,) raw user ids
    items: np.ndarray  # (n,) raw item ids
    ratings: np.ndarray  # (n,) float32 ratings

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users)
        self.items = np.asarray(self.items)
        self.ratings = np.asarray(self.ratings, dtype=np.float32)
        n = len(self.users)
        if len(self.items) != n or len(self.ratings) != n:
            raise ValueError(
                f"users, items, ratings must have equal lengths, got {n}, {len(self.items)}, {len(self.ratings)}"
            )
        if n and not np.all(np.isfinite(self.ratings)):
            raise ValueError("ratings contain NaN or inf")

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, index: np.ndarray) -> Ratings:
        return Ratings(self.users[index], self.items[index], self.ratings[index])

    def to_array(self) -> np.ndarray:
        """(n, 3) float64 array user, item, rating (raw ids must be numeric)."""
        return np.stack([self.users, self.items, self.ratings], axis=1).astype(np.float64)

    @classmethod
    def from_any(cls, data: object) -> Ratings:
        """Accept a :class:`Ratings`, an (n, 3) array, or a DataFrame with user, item, rating columns."""
        if isinstance(data, Ratings):
            return data
        if hasattr(data, "iloc") and hasattr(data, "columns"):  # pandas DataFrame, without importing pandas
            cols = list(data.columns)
            if {"user", "item", "rating"} <= set(cols):
                return cls(data["user"].to_numpy(), data["item"].to_numpy(), data["rating"].to_numpy())
            if len(cols) < 3:
                raise ValueError(f"a ratings DataFrame needs columns user, item, rating; got {cols}")
            return cls(data.iloc[:, 0].to_numpy(), data.iloc[:, 1].to_numpy(), data.iloc[:, 2].to_numpy())
        arr = np.asarray(data)
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise ValueError(f"ratings must be an (n, 3) array of user, item, rating; got shape {arr.shape}")
        users, items = arr[:, 0], arr[:, 1]
        if arr.dtype.kind == "f":  # ids given as floats: keep them integral when they are
            if np.all(users == np.round(users)) and np.all(items == np.round(items)):
                users, items = users.astype(np.int64), items.astype(np.int64)
        return cls(users, items, arr[:, 2].astype(np.float32))


class IdMap:
    """Raw ids <-> contiguous indices 0..n-1 (sorted order of the raw ids)."""

    def __init__(self, raw_ids: np.ndarray) -> None:
        self.raw = np.unique(np.asarray(raw_ids))  # (n,) sorted

    def __len__(self) -> int:
        return len(self.raw)

    def to_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Indices of ``raw_ids``; unknown ids map to -1."""
        raw_ids = np.asarray(raw_ids)
        if len(self.raw) == 0:
            return np.full(raw_ids.shape, -1, dtype=np.int64)
        try:
            pos = np.searchsorted(self.raw, raw_ids)
        except TypeError as err:
            raise ValueError(f"ids of dtype {raw_ids.dtype} cannot be compared with {self.raw.dtype}") from err
        pos = np.clip(pos, 0, len(self.raw) - 1)
        found = self.raw[pos] == raw_ids
        return np.where(found, pos, -1).astype(np.int64)

    def to_raw(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self.raw)):
            raise ValueError(f"index out of range [0, {len(self.raw)}): min {index.min()}, max {index.max()}")
        return self.raw[index]


# ----------------------------------------------------------------------------------------------
# Locating data
# ----------------------------------------------------------------------------------------------


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$CMC_REC_DATA``, ``$MEASURED_REPRO_DATA``, ``../shared/data``."""
    if root is not None:
        return Path(root)
    for var in ENV_VARS:
        if os.environ.get(var):
            return Path(os.environ[var])
    return DEFAULT_DATA_ROOT


def _dataset_dir(name: str, sub: str, path: str | os.PathLike | None, needed: str) -> Path:
    folder = Path(path) if path is not None else data_root() / sub
    if not (folder / needed).is_file():
        hint = (
            f"pass path=<folder holding {needed}>, or set $CMC_REC_DATA to a root holding '{sub}/'"
            + (f", or call cmc_rec.data.download_movielens('{name}', cache_dir)" if name in GROUPLENS_ARCHIVES else "")
        )
        raise DatasetNotFoundError(f"{name}: {folder / needed} not found; {hint}")
    return folder


def _read_table(path: Path, sep: str) -> Ratings:
    """Read user<sep>item<sep>rating[<sep>timestamp] lines with integer ids."""
    if len(sep) == 1:
        arr = np.loadtxt(path, dtype=np.int64, delimiter=sep, usecols=(0, 1, 2), ndmin=2)
    else:  # multi-character separators such as '::' (ML-1M)
        text = path.read_text(encoding="latin-1").replace(sep, "\t")
        rows = [line.split("\t")[:3] for line in text.splitlines() if line.strip()]
        try:
            arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        except ValueError as err:
            raise ValueError(f"{path}: expected user{sep}item{sep}rating lines ({err})") from err
    return Ratings(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.float32))


def load_movielens_100k(path: str | os.PathLike | None = None) -> Ratings:
    """All 100,000 ratings of MovieLens 100K (``u.data``; Harper & Konstan 2015)."""
    return _read_table(_dataset_dir("ml-100k", "ml-100k", path, "u.data") / "u.data", "\t")


def load_movielens_100k_split(split: str = "u1", path: str | os.PathLike | None = None) -> tuple[Ratings, Ratings]:
    """An official split: ``u1``..``u5`` (5-fold, 80/20) or ``ua``/``ub`` (10 test ratings per user)."""
    if split not in MOVIELENS_100K_SPLITS:
        raise ValueError(f"split must be one of {MOVIELENS_100K_SPLITS}, got {split!r}")
    folder = _dataset_dir("ml-100k", "ml-100k", path, f"{split}.base")
    return _read_table(folder / f"{split}.base", "\t"), _read_table(folder / f"{split}.test", "\t")


def load_movielens_1m(path: str | os.PathLike | None = None) -> Ratings:
    """MovieLens 1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)."""
    return _read_table(_dataset_dir("ml-1m", "ml-1m", path, "ratings.dat") / "ratings.dat", "::")


def load_monti(name: str, path: str | os.PathLike | None = None) -> tuple[Ratings, Ratings]:
    """Douban / Flixster / YahooMusic with the train/test split of Monti et al. (NeurIPS 2017).

    The ``.mat`` file is MATLAB v7.3 (HDF5) holding dense (3000, 3000) ``M`` (ratings),
    ``Otraining`` and ``Otest`` (masks), stored column-major, so they are transposed to
    (users, items) exactly as GC-MC and IGMC do.  Raw ids are the matrix row/column indices.
    """
    if name not in MONTI_DATASETS:
        raise ValueError(f"name must be one of {MONTI_DATASETS}, got {name!r}")
    folder = _dataset_dir(name, f"monti/{name}", path, "training_test_dataset.mat")
    import h5py  # lazy: only this loader needs it

    with h5py.File(folder / "training_test_dataset.mat", "r") as f:
        missing = {"M", "Otraining", "Otest"} - set(f.keys())
        if missing:
            raise ValueError(f"{folder}: .mat file lacks keys {sorted(missing)}; has {sorted(f.keys())}")
        m = np.asarray(f["M"]).T  # (users, items)
        o_train = np.asarray(f["Otraining"]).T
        o_test = np.asarray(f["Otest"]).T

    def pick(mask: np.ndarray) -> Ratings:
        u, i = np.nonzero((mask > 0) & (m != 0))
        return Ratings(u.astype(np.int64), i.astype(np.int64), m[u, i].astype(np.float32))

    return pick(o_train), pick(o_test)


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def random_split(ratings: Ratings, test_fraction: float = 0.2, seed: int = 0) -> tuple[Ratings, Ratings]:
    """Seeded uniform split of the rating events (``numpy.random.Generator``, no global RNG)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    keep, test = holdout_indices(len(ratings), test_fraction, seed=seed, min_size=0)
    return ratings.subset(keep), ratings.subset(test)


def holdout_indices(n: int, fraction: float, seed: int = 0, min_size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (fit, held out) of ``n`` ratings, a seeded share ``fraction`` held out (the draw
    behind :func:`random_split`); nothing held out when ``fraction`` is 0 or ``n < min_size``."""
    idx = np.arange(n)
    if fraction <= 0 or n < min_size:
        return idx, idx[:0]
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ----------------------------------------------------------------------------------------------
# Downloads (for users with internet; the logic below is tested on local files)
# ----------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_digest(path: str | os.PathLike, digest: str) -> None:
    """Check ``path`` against ``'sha256:<hex>'`` (or ``'md5:<hex>'``); raise :class:`ChecksumError`."""
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "md5") or not expected:
        raise ValueError(f"digest must look like 'sha256:<hex>' or 'md5:<hex>', got {digest!r}")
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: {algorithm} {actual} != pinned {expected}")


def atomic_fetch(url: str, dest: str | os.PathLike, digest: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically: write a temp file beside it, verify, ``os.replace``.

    A half-written or corrupt download never appears under ``dest``.  ``url`` may be a
    ``file://`` URL (used by the tests; no internet here).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if digest:
            verify_digest(tmp, digest)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def download_movielens(name: str = "ml-100k", cache_dir: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """Fetch and unpack a GroupLens archive into ``cache_dir`` (default ``~/.cache/cmc_rec``).

    Returns the data set folder (e.g. ``<cache>/ml-100k``).  Already-extracted data is reused
    when its ratings file matches the pinned digest.  ``url`` overrides the GroupLens URL (mirrors).
    """
    if name not in GROUPLENS_ARCHIVES:
        raise ValueError(f"name must be one of {sorted(GROUPLENS_ARCHIVES)}, got {name!r}")
    spec = GROUPLENS_ARCHIVES[name]
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "cmc_rec"
    folder = cache / name
    ratings_file = folder / spec["ratings_file"]
    if ratings_file.is_file():
        if spec["ratings_digest"]:
            verify_digest(ratings_file, spec["ratings_digest"])
        return folder
    archive = atomic_fetch(url or spec["url"], cache / f"{name}.zip", spec["archive_digest"])
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        extracted = Path(tmp) / name
        if not (extracted / spec["ratings_file"]).is_file():
            raise ValueError(f"{archive}: archive has no {name}/{spec['ratings_file']}")
        if spec["ratings_digest"]:
            verify_digest(extracted / spec["ratings_file"], spec["ratings_digest"])
        os.replace(extracted, folder)  # atomic on one file system
    return folder
