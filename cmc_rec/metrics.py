"""Metrics shared by every model: rating error, top-K ranking, coverage and popularity bias.

Ranking protocol (the issue's): for each test user, rank every catalog item the user did not
rate in train; the relevant items are the user's test items rated >= ``threshold`` (4 on a
1-5 scale).  Users with no relevant test item are skipped.  Relevant items unseen in train
stay in the denominator (a model cannot recommend them, and the metric says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {a.shape} and {b.shape}")
    for name, x in (("y_true", a), ("y_pred", b)):
        if not np.all(np.isfinite(x)):
            bad = x[~np.isfinite(x)][0]
            raise ValueError(f"{name} holds a non-finite value ({bad}) at index {int(np.flatnonzero(~np.isfinite(x))[0])}")
    return a, b


def relevant_sets(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, threshold: float = 4.0) -> dict:
    """{user: set of items rated >= threshold} from test triples (raw ids)."""
    keep = np.asarray(ratings) >= threshold
    out: dict = {}
    for u, i in zip(np.asarray(users)[keep].tolist(), np.asarray(items)[keep].tolist()):
        out.setdefault(u, set()).add(i)
    return out


def recall_ndcg_at_k(recommended: np.ndarray, relevant: list[set]) -> tuple[float, float]:
    """Mean Recall@K (hits / |relevant|) and NDCG@K (binary gains) over users.

    recommended: (n_users, K) raw item ids, ``relevant[j]`` the relevant set of user ``j``.
    """
    recommended = np.asarray(recommended)
    if recommended.ndim != 2 or len(recommended) != len(relevant) or not len(relevant):
        raise ValueError(f"need (n_users, K) recommendations for {len(relevant)} users, got {recommended.shape}")
    k = recommended.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # (K,)
    recalls, ndcgs = [], []
    for row, rel in zip(recommended.tolist(), relevant):
        hits = np.array([item in rel for item in row], dtype=np.float64)  # (K,)
        recalls.append(hits.sum() / len(rel))
        ideal = discounts[: min(len(rel), k)].sum()
        ndcgs.append(float(hits @ discounts) / ideal)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def catalog_coverage(recommended: np.ndarray, n_catalog: int) -> float:
    """Share of the catalog recommended to at least one user."""
    if n_catalog <= 0:
        raise ValueError(f"n_catalog must be positive, got {n_catalog}")
    return float(len(np.unique(np.asarray(recommended))) / n_catalog)


def popularity_bias(recommended: np.ndarray, train_items: np.ndarray) -> tuple[float, float]:
    """(mean popularity percentile of recommended items, Gini of recommendation counts).

    Percentile 1.0 = the most-rated train item; 0.5 = median.  Gini over the catalog (all
    train items): 0 = every item recommended equally often, 1 = one item gets everything.
    """
    cat, counts = np.unique(np.asarray(train_items), return_counts=True)  # catalog and popularity
    order = np.argsort(np.argsort(counts, kind="stable"), kind="stable")
    percentile = (order + 1) / len(cat)  # (n_catalog,)
    rec = np.asarray(recommended).ravel()
    pos = np.clip(np.searchsorted(cat, rec), 0, len(cat) - 1)
    known = cat[pos] == rec
    mean_pct = float(percentile[pos[known]].mean()) if known.any() else float("nan")
    rec_counts = np.bincount(pos[known], minlength=len(cat)).astype(np.float64)  # (n_catalog,)
    x = np.sort(rec_counts)
    n = len(x)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum())) if x.sum() > 0 else 0.0
    return mean_pct, gini


@dataclass
class EvalResult:
    rmse: float
    mae: float
    recall: float  # Recall@K
    ndcg: float  # NDCG@K
    coverage: float  # catalog coverage@K
    pop_percentile: float  # mean popularity percentile of recommended items
    gini: float  # Gini of how often each item is recommended
    k: int
    n_rank_users: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def to_markdown(self) -> str:
        """A one-row markdown table of the metrics (RMSE / MAE ``n/a`` for ranking-only models)."""
        def num(x: float) -> str:
            return "n/a" if np.isnan(x) else f"{x:.4f}"

        k = self.k
        return "\n".join([
            f"| RMSE | MAE | Recall@{k} | NDCG@{k} | coverage@{k} | pop. percentile | Gini | ranked users |",
            "|---|---|---|---|---|---|---|---|",
            f"| {num(self.rmse)} | {num(self.mae)} | {num(self.recall)} | {num(self.ndcg)} | {self.coverage:.1%} | "
            f"{num(self.pop_percentile)} | {num(self.gini)} | {self.n_rank_users} |",
        ])

    __str__ = to_markdown


def evaluate(model, train, test, k: int = 10, threshold: float = 4.0, batch_size: int = 1024) -> EvalResult:
    """Rating error on every test triple, and top-K metrics under the protocol above.

    ``model`` is any fitted recommender of this package (``predict`` / ``recommend``);
    ``train`` / ``test`` are :class:`cmc_rec.data.Ratings`.  A ranking-only model
    (``model.predicts_ratings`` false) gets NaN RMSE / MAE.
    """
    from .data import Ratings

    train, test = Ratings.from_any(train), Ratings.from_any(test)
    if len(test) == 0:
        raise ValueError("the test set holds no ratings: nothing to evaluate")
    if getattr(model, "predicts_ratings", True):
        pred = model.predict(test.users, test.items)
        err_rmse, err_mae = rmse(test.ratings, pred), mae(test.ratings, pred)
    else:
        err_rmse = err_mae = float("nan")
    rel = relevant_sets(test.users, test.items, test.ratings, threshold)
    users = np.array(sorted(rel))
    if len(users) == 0:
        raise ValueError(f"no test rating >= {threshold}: ranking metrics are undefined")
    rec, _ = model.recommend(users, k=k, exclude_seen=True, batch_size=batch_size)
    rel_list = [rel[u] for u in users.tolist()]
    recall, ndcg = recall_ndcg_at_k(rec, rel_list)
    catalog = np.unique(train.items)
    valid = rec[np.isin(rec, catalog)]
    pct, gini = popularity_bias(valid, train.items)
    return EvalResult(
        rmse=err_rmse,
        mae=err_mae,
        recall=recall,
        ndcg=ndcg,
        coverage=catalog_coverage(valid, len(catalog)),
        pop_percentile=pct,
        gini=gini,
        k=k,
        n_rank_users=len(users),
    )
