"""Mean, SVD and EASE baselines vs contrastive matrix completion on MovieLens 100K (official u1 split).

``cmc`` is ``CMCRecommender()`` at its defaults: it ranks with graph embeddings trained by InfoNCE
over all items and predicts ratings with the kernel-autoencoder head.

    python examples/cmc_movielens.py              # full budget (about 2 minutes on 2 CPU cores)
    python examples/cmc_movielens.py --smoke      # tiny budget, seconds
    python examples/cmc_movielens.py --data /path/to/ml-100k
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from cmc_rec import (
    EASE,
    AutoencoderConfig,
    CMCConfig,
    CMCRecommender,
    MeanRecommender,
    RankingConfig,
    SVDRecommender,
    evaluate,
    load_movielens_100k_split,
)
from cmc_rec.cmc import default_autoencoder, default_user_autoencoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget: a few epochs")
    parser.add_argument("--data", default=None, help="folder holding u1.base / u1.test (default: ../shared/data)")
    parser.add_argument("--split", default="u1", help="u1..u5, ua, ub")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, test = load_movielens_100k_split(args.split, args.data)
    if args.smoke:
        cmc_cfg = CMCConfig(ranking=RankingConfig(embedding_dim=16, epochs=1, ensemble=1, seed=args.seed),
                            autoencoder=AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2, seed=args.seed),
                            user_autoencoder=AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2,
                                                               seed=args.seed, user_based=True))
    else:
        cmc_cfg = CMCConfig(ranking=RankingConfig(seed=args.seed, progress=True),
                            autoencoder=dataclasses.replace(default_autoencoder(), seed=args.seed),
                            user_autoencoder=dataclasses.replace(default_user_autoencoder(), seed=args.seed))
    # EASE's lambda and SVD at Surprise's defaults; see benchmarks/ for the validation-tuned versions
    models = {"mean": MeanRecommender(), "svd": SVDRecommender(n_epochs=2 if args.smoke else None, seed=args.seed),
              "ease": EASE(reg=250.0), "cmc": CMCRecommender(cmc_cfg)}

    print(f"MovieLens 100K {args.split}: {len(train)} train / {len(test)} test ratings")
    print(f"{'model':7s} {'RMSE':>7s} {'MAE':>7s} {'R@10':>7s} {'NDCG@10':>8s} {'cov@10':>7s} {'fit s':>7s}")
    for name, model in models.items():
        start = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - start
        r = evaluate(model, train, test, k=10)  # ranking-only EASE: RMSE / MAE nan
        print(f"{name:7s} {r.rmse:7.4f} {r.mae:7.4f} {r.recall:7.4f} {r.ndcg:8.4f} {r.coverage:7.1%} {fit_s:7.1f}")
    users = np.unique(train.users)[:2]
    ids, scores = models["cmc"].recommend(users, k=5)
    for u, row, s in zip(users, ids, scores):
        print(f"user {u}: top-5 items {row.tolist()} (scores {[round(float(x), 3) for x in s]})")


if __name__ == "__main__":
    main()
