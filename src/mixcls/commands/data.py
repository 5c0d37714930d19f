"""mixcls data: export offline datasets to the competition layout."""

from __future__ import annotations

import argparse

from mixcls.datasets import FASHION_DEFAULT_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="write an offline dataset in the Kaggle layout")
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    d = sub.add_parser("digits", help="scikit-learn's 1,797 handwritten digits (no download)")
    d.add_argument("--out", required=True)
    d.add_argument("--size", type=int, default=32, help="upscaled side in pixels")
    d.set_defaults(func=run_digits)
    f = sub.add_parser("fashion-mnist", help="Fashion-MNIST IDX files -> PNG folders")
    f.add_argument("--from", dest="source", default=str(FASHION_DEFAULT_DIR),
                   help="folder of the four IDX files")
    f.add_argument("--out", required=True)
    f.add_argument("--limit", type=int, default=None, help="stratified subset of the training set")
    f.add_argument("--test-limit", type=int, default=None, help="stratified subset of the test set")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=run_fashion)


def run_digits(args: argparse.Namespace) -> int:
    from mixcls.datasets import export_digits
    out = export_digits(args.out, size=args.size)
    print(f"wrote digits to {out} (train.csv + train_images/, test.csv + test_images/)")
    return 0


def run_fashion(args: argparse.Namespace) -> int:
    from mixcls.datasets import export_fashion_mnist
    out = export_fashion_mnist(args.source, args.out, limit=args.limit, test_limit=args.test_limit,
                               seed=args.seed)
    print(f"wrote Fashion-MNIST to {out}")
    return 0
