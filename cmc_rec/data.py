"""Rating data: MovieLens 100K / 1M, the Monti et al. matrices, splits, id maps and downloads.

Where the data comes from (first hit wins):

1. an explicit ``path=`` (the data set's own folder, e.g. ``.../ml-100k``);
2. ``$CMC_REC_DATA``, a root holding ``ml-100k/``, ``ml-1m/``, ``monti/``.

There is no other fallback: with neither, or with the data set absent, the loaders raise
:class:`DatasetNotFoundError`, naming the path and how to fix it (set the variable, pass
``path=``, or fetch MovieLens with :func:`download_movielens`).  Nothing here is ever committed:
GroupLens' terms forbid redistribution.

Ids are integers or strings, one type per column (mixed types are refused); integral float ids,
as in an (n, 3) float array, become integers.  A (user, item) pair may appear once:
:meth:`Ratings.duplicates` finds repeats, :meth:`Ratings.deduplicate` keeps the last of each, and
every recommender's ``fit`` refuses data with repeats (they would otherwise be summed or averaged
silently).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ._util import atomic_write, check_number
from .ratings import IdMap, Ratings

__all__ = ["ENV_VAR", "ChecksumError", "DatasetNotFoundError", "IdMap", "Ratings", "atomic_fetch", "data_root",
           "download_movielens", "holdout_indices", "load_monti", "load_movielens_1m", "load_movielens_100k",
           "load_movielens_100k_split", "random_split", "verify_digest"]

ENV_VAR = "CMC_REC_DATA"  # the data root; the checkout's Makefile / CI set it to ../shared/data
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
# Locating and reading data
# ----------------------------------------------------------------------------------------------


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$CMC_REC_DATA``; neither raises :class:`DatasetNotFoundError`."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    raise DatasetNotFoundError(
        f"no data location: pass path=<the data set's folder>, or set ${ENV_VAR} to a folder holding "
        f"'ml-100k/', 'ml-1m/' or 'monti/' (export {ENV_VAR}=/path/to/data); MovieLens can be fetched with "
        f"cmc_rec.data.download_movielens('ml-100k', cache_dir)")


def _dataset_dir(name: str, sub: str, path: str | os.PathLike | None, needed: str) -> Path:
    folder = Path(path) if path is not None else data_root() / sub
    if not (folder / needed).is_file():
        hint = (
            f"pass path=<folder holding {needed}>, or set ${ENV_VAR} to a root holding '{sub}/'"
            + (f", or call cmc_rec.data.download_movielens('{name}', cache_dir)" if name in GROUPLENS_ARCHIVES else "")
        )
        raise DatasetNotFoundError(f"{name}: {folder / needed} not found; {hint}")
    return folder


def _read_table(path: Path, sep: str) -> Ratings:
    """Read ``user<sep>item<sep>rating[<sep>timestamp]`` lines (integer ids, numeric ratings).

    A line with a word where a number belongs, or with fewer than three fields, raises naming the
    file, the line number and the line; a file without a single rating is refused.
    """
    text = path.read_text(encoding="latin-1")
    rows, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(sep)
        try:
            if len(fields) < 3:
                raise ValueError(f"{len(fields)} field(s)")
            user, item, rating = int(fields[0]), int(fields[1]), float(fields[2])
            if not math.isfinite(rating):
                raise ValueError(f"rating {fields[2]!r} is not finite")
        except ValueError as err:
            raise ValueError(f"{path}, line {lineno}: expected user{sep}item{sep}rating[{sep}timestamp] with "
                             f"integer ids and a numeric rating, got {line[:80]!r} ({err})") from None
        rows.append((user, item))
        numbers.append(rating)
    if not rows:
        raise ValueError(f"{path}: no ratings in the file (empty, or blank lines only)")
    ids = np.asarray(rows, dtype=np.int64)  # (n, 2)
    return Ratings(ids[:, 0], ids[:, 1], np.asarray(numbers, dtype=np.float32))


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
    file = folder / "training_test_dataset.mat"
    import h5py  # lazy: only this loader needs it

    if not h5py.is_hdf5(file):
        raise ValueError(f"{file} is not an HDF5 file: load_monti reads the MATLAB v7.3 (HDF5) .mat files of "
                         f"Monti et al. (older .mat versions, v5 / v7, are not HDF5: re-save with "
                         f"save(..., '-v7.3')); the file may also be truncated")
    try:
        with h5py.File(file, "r") as f:
            missing = {"M", "Otraining", "Otest"} - set(f.keys())
            if missing:
                raise ValueError(f"{file}: .mat file lacks keys {sorted(missing)}; has {sorted(f.keys())}")
            m = np.asarray(f["M"]).T  # (users, items)
            o_train = np.asarray(f["Otraining"]).T
            o_test = np.asarray(f["Otest"]).T
    except OSError as err:  # h5py's error for truncated / corrupt files
        raise ValueError(f"{file}: cannot read the HDF5 .mat file, it is truncated or corrupt ({err}); "
                         f"fetch it again") from err
    if not (m.shape == o_train.shape == o_test.shape and m.ndim == 2):
        raise ValueError(f"{file}: M, Otraining, Otest must be matrices of one shape, got "
                         f"{m.shape}, {o_train.shape}, {o_test.shape}")

    def pick(mask: np.ndarray) -> Ratings:
        u, i = np.nonzero((mask > 0) & (m != 0))
        return Ratings(u.astype(np.int64), i.astype(np.int64), m[u, i].astype(np.float32))

    return pick(o_train), pick(o_test)


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def random_split(ratings: Ratings, test_fraction: float = 0.2, seed: int = 0) -> tuple[Ratings, Ratings]:
    """Seeded uniform split of the rating events (``numpy.random.Generator``, no global RNG)."""
    check_number("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
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

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if digest:
            verify_digest(tmp, digest)

    return atomic_write(dest, fetch)


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
