"""The ratings container and the id maps every model shares, with the checks at the boundary.

Ids are integers or strings, one type per column: a column mixing them is refused (numpy would
otherwise turn ``[1, "a"]`` into the strings ``"1", "a"``), and integral float ids -- as in an
(n, 3) float array -- become integers.  A model fitted on one id type refuses queries of the
other (every id would otherwise be "unknown").  A DataFrame must name its columns ``user``,
``item``, ``rating``, or come with an explicit ``columns=`` mapping: it is never read by position.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["COLUMNS", "IdMap", "Ratings", "as_ids", "id_kind"]

COLUMNS = ("user", "item", "rating")


def _id_type(value) -> str:
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, str | np.str_):
        return "str"
    if isinstance(value, numbers.Real):
        return "float"
    return type(value).__name__


def as_ids(values, name: str = "ids") -> np.ndarray:
    """``values`` as an array (at least 1-d, same shape) of integer (int64) or string ids; refuses
    mixed or other types."""
    if isinstance(values, list | tuple):
        values = np.asarray(values, dtype=object)  # keep each element's own type to check it
    values = np.atleast_1d(np.asarray(values))
    return _flat_ids(values.reshape(-1), name).reshape(values.shape)


def _flat_ids(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "O":
        types = {}
        for v in arr:
            types.setdefault(_id_type(v), v)
        if len(types) == 2 and set(types) == {"int", "float"}:  # numbers: integral floats are integers
            types = {"float": types["float"]}
        if len(types) > 1:
            examples = ", ".join(f"{t} ({np.asarray(v).tolist()!r})" for t, v in types.items())
            raise ValueError(f"{name} mix id types: {examples}; use one type (all integers or all strings)")
        kind = next(iter(types), "int")
        if kind == "str":
            arr = arr.astype(str)
        elif kind in ("int", "float"):
            arr = arr.astype(np.int64 if kind == "int" else np.float64)
        else:
            raise ValueError(f"{name} must be integers or strings, got {kind} ({types[kind]!r})")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must be integers or strings, got the float {arr[bad][0].tolist()!r} "
                             f"at index {int(np.flatnonzero(bad)[0])}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "US":
        raise ValueError(f"{name} must be integers or strings, got dtype {arr.dtype}")
    return arr


def id_kind(arr: np.ndarray) -> str:
    return "integer" if arr.dtype.kind in "iu" else "string"


@dataclass
class Ratings:
    """Explicit ratings as three aligned arrays: raw user ids, raw item ids (integers or strings),
    and finite float32 ratings."""

    users: np.ndarray  # (n,) raw user ids
    items: np.ndarray  # (n,) raw item ids
    ratings: np.ndarray  # (n,) float32 ratings

    def __post_init__(self) -> None:
        self.users = as_ids(self.users, "user ids")
        self.items = as_ids(self.items, "item ids")
        if self.users.ndim != 1 or self.items.ndim != 1:
            raise ValueError(f"user and item ids must be 1-d, got shapes {self.users.shape}, {self.items.shape}")
        try:
            self.ratings = np.atleast_1d(np.asarray(self.ratings, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise ValueError(f"ratings must be numbers ({err})") from err
        n = len(self.users)
        if len(self.items) != n or len(self.ratings) != n:
            raise ValueError(
                f"users, items, ratings must have equal lengths, got {n}, {len(self.items)}, {len(self.ratings)}"
            )
        if n and not np.all(np.isfinite(self.ratings)):
            j = int(np.flatnonzero(~np.isfinite(self.ratings))[0])
            raise ValueError(f"ratings contain NaN or inf: {self.ratings[j]} at index {j}")

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, index: np.ndarray) -> Ratings:
        return Ratings(self.users[index], self.items[index], self.ratings[index])

    def to_array(self) -> np.ndarray:
        """(n, 3) float64 array user, item, rating (raw ids must be numeric)."""
        if id_kind(self.users) != "integer" or id_kind(self.items) != "integer":
            raise ValueError("to_array needs integer ids; these ratings have string ids")
        return np.stack([self.users, self.items, self.ratings], axis=1).astype(np.float64)

    def _pair_codes(self) -> np.ndarray:
        u = np.unique(self.users, return_inverse=True)[1].astype(np.int64)
        i = np.unique(self.items, return_inverse=True)[1].astype(np.int64)
        return u * (int(i.max()) + 1 if len(i) else 1) + i

    def duplicates(self) -> np.ndarray:
        """Indices of the ratings whose (user, item) pair occurred earlier (empty when none)."""
        codes = self._pair_codes()
        first = np.zeros(len(codes), bool)
        first[np.unique(codes, return_index=True)[1]] = True
        return np.flatnonzero(~first)

    def deduplicate(self) -> Ratings:
        """These ratings with one per (user, item) pair: the LAST occurrence of each (as in a log)."""
        codes = self._pair_codes()[::-1]
        last = len(codes) - 1 - np.unique(codes, return_index=True)[1]
        return self.subset(np.sort(last))

    def check_unique_pairs(self, repeated: np.ndarray | None = None) -> Ratings:
        """Return self, or raise naming the first repeated (user, item) pair and how to resolve it
        (``repeated``: the indices :meth:`duplicates` returns, when the caller has them already)."""
        dup = self.duplicates() if repeated is None else np.sort(repeated)
        if len(dup):
            j = int(dup[0])
            raise ValueError(
                f"{len(dup)} repeated (user, item) pairs, e.g. user {self.users[j].tolist()!r}, "
                f"item {self.items[j].tolist()!r} "
                f"(rating {self.ratings[j]:g} at index {j}); a model needs one rating per pair: "
                f"Ratings.from_any(data).deduplicate() keeps the last of each")
        return self

    @classmethod
    def from_any(cls, data: object, columns: dict[str, str] | None = None) -> Ratings:
        """Accept a :class:`Ratings`, an (n, 3) array (user, item, rating), or a DataFrame.

        A DataFrame needs columns named ``user``, ``item``, ``rating``, or ``columns`` mapping its
        names to those (``{"userId": "user", "movieId": "item", "rating": "rating"}``).
        """
        if isinstance(data, Ratings):
            if columns is not None:
                raise ValueError("columns= applies to a DataFrame, not to Ratings")
            return data
        if hasattr(data, "iloc") and hasattr(data, "columns"):  # pandas DataFrame, without importing pandas
            cols = list(data.columns)
            if columns is not None:
                bad = {v for v in columns.values()} - set(COLUMNS)
                if bad or sorted(columns.values()) != sorted(COLUMNS):
                    raise ValueError(f"columns must map three DataFrame columns onto {COLUMNS}, got {columns}")
                missing = [c for c in columns if c not in cols]
                if missing:
                    raise ValueError(f"columns names {missing}, not in the DataFrame's columns {cols}")
                data = data.rename(columns=columns)
            elif not set(COLUMNS) <= set(cols):
                raise ValueError(f"a ratings DataFrame needs columns named {COLUMNS}, got {cols}: rename them or "
                                 f"pass columns={{<your user column>: 'user', <item>: 'item', <rating>: 'rating'}}")
            return cls(data["user"].to_numpy(), data["item"].to_numpy(), data["rating"].to_numpy())
        if columns is not None:
            raise ValueError("columns= applies to a DataFrame only")
        arr = np.asarray(data, dtype=object) if isinstance(data, list | tuple) else np.asarray(data)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"ratings must be an (n, 3) array of user, item, rating; got shape {arr.shape}")
        return cls(arr[:, 0], arr[:, 1], arr[:, 2])


class IdMap:
    """Raw ids <-> contiguous indices 0..n-1 (sorted order of the raw ids)."""

    def __init__(self, raw_ids: np.ndarray) -> None:
        self.raw = np.unique(as_ids(raw_ids))  # (n,) sorted

    def __len__(self) -> int:
        return len(self.raw)

    def to_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Indices of ``raw_ids``; unknown ids map to -1; ids of the other type (int vs str) are refused."""
        raw_ids = as_ids(raw_ids)
        if len(raw_ids) and len(self.raw) and id_kind(raw_ids) != id_kind(self.raw):
            raise ValueError(f"{id_kind(raw_ids)} ids given (e.g. {raw_ids[0].tolist()!r}), but the model was fitted "
                             f"with {id_kind(self.raw)} ids (e.g. {self.raw[0].tolist()!r}): convert them to that type")
        if len(self.raw) == 0:
            return np.full(raw_ids.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.raw, raw_ids), 0, len(self.raw) - 1)
        found = self.raw[pos] == raw_ids
        return np.where(found, pos, -1).astype(np.int64)

    def to_raw(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self.raw)):
            raise ValueError(f"index out of range [0, {len(self.raw)}): min {index.min()}, max {index.max()}")
        return self.raw[index]
