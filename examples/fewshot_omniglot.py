"""Few-shot Omniglot with conditional class dependencies, in a few lines.

    python examples/fewshot_omniglot.py --smoke        # a few seconds: tiny budget, 30 characters
    python examples/fewshot_omniglot.py --steps 3000   # Snell et al.'s budget (~40+ min on 2 CPU cores)

Trains a CCD model (Conv-4 + ClassDependencyModule) on 60-way 1-shot episodes of Lake's background
alphabets (with rotations), evaluates 5-way 1-shot on the evaluation alphabets and on Lake's 20
one-shot runs, then classifies one new image with fit/predict.
"""

from __future__ import annotations

import argparse

import torch

from fewshot_ccd import OmniglotDataset, TrainConfig, evaluate, evaluate_lake_runs, load_lake_runs, meta_train
from fewshot_ccd.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny budget (a few seconds)")
    parser.add_argument("--steps", type=int, default=300, help="training episodes")
    parser.add_argument("--method", choices=["protonet", "ccd", "ccd_qkv"], default="ccd")
    parser.add_argument("--root", default=None, help="data root holding omniglot/ (default: $FEWSHOT_CCD_DATA, then the cache folder)")
    args = parser.parse_args()
    small = 30 if args.smoke else None  # characters per set in smoke mode
    steps, ways, episodes = (5, 10, 20) if args.smoke else (args.steps, 60, 600)

    train_set = OmniglotDataset(args.root, split="background", rotations=True, max_classes=small)
    test_set = OmniglotDataset(args.root, split="evaluation", max_classes=small)
    model = build_model(args.method, seed=0)
    meta_train(model, train_set, TrainConfig(n_way=ways, n_shot=1, n_query=5, steps=steps, progress=not args.smoke))

    acc = evaluate(model, test_set, n_way=5, n_shot=1, episodes=episodes, seed=2024)
    lake = evaluate_lake_runs(model, load_lake_runs(args.root))
    print(f"{args.method}: 5-way 1-shot accuracy {acc} %, Lake's 20 runs error {lake}")

    # one new image: fit on a 5-way 1-shot support set, predict a query of class 3
    classes = torch.arange(5) * 7
    support = torch.stack([test_set[int(c) * 20][0] for c in classes])  # (5, 1, 28, 28)
    query = test_set[int(classes[3]) * 20 + 1][0]  # (1, 28, 28)
    predicted = model.fit(support, classes).predict(query)
    print(f"new image of character {int(classes[3])} -> predicted {int(predicted)}")


if __name__ == "__main__":
    main()
