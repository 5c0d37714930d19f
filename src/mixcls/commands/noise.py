"""`mixcls noise` (suspect labels of a run) and `mixcls clean` (a cleaned training table).

The work is `noise.write_suspects` and `noise.write_clean_table`; this file parses and prints.
"""

from __future__ import annotations

import argparse

from mixcls.noise import (DEFAULT_METHOD, FILTER_METHODS, POLICIES, SCORE_METHODS,
                          format_suspect_summary, write_clean_table, write_suspects)


# ----- argparse -----

def _add_suspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder with oof.csv and classes.json")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=FILTER_METHODS,
                   help="cleanlab filter deciding which labels are issues (default: the estimated "
                        "number of issues, lowest OOF probability of the given label first)")
    p.add_argument("--score", default="self_confidence", choices=SCORE_METHODS,
                   help="cleanlab label-quality score ranking the suspects")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "noise", help="find likely label errors from a run's out-of-fold probabilities",
        description="Confident learning (cleanlab) on RUN/oof.csv: a CSV of suspect labels, "
                    "worst first, a summary of confused class pairs and the noise matrix.")
    _add_suspect_options(p)
    p.add_argument("--out", required=True, help="suspects CSV to write")
    p.add_argument("--gallery", help="also draw the top suspects into this image (png, jpg, svg)")
    p.add_argument("--max-rows", type=int, help="write at most this many suspects")
    p.set_defaults(func=run_noise)

    p = subparsers.add_parser(
        "clean", help="write a cleaned training table from a run's suspect labels",
        description="Drop, relabel or soften suspect labels for TRAINING only: the table keeps "
                    "every row, the given label (validation is scored on it) and the run's folds.")
    _add_suspect_options(p)
    p.add_argument("--policy", required=True, choices=POLICIES,
                   help="drop: keep=0; relabel: train on the suggested class; "
                        "soft: train on a blend of the given label and the OOF probabilities")
    p.add_argument("--out", required=True, help="cleaned CSV to write")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="act only on suspects whose suggested class has OOF probability >= this")
    p.add_argument("--max-fraction", type=float, default=0.2,
                   help="act on at most this fraction of all rows, worst first")
    p.add_argument("--soft-weight", type=float, default=0.5,
                   help="policy soft: weight of the OOF probabilities in the blend")
    p.set_defaults(func=run_clean)


def run_noise(args: argparse.Namespace) -> int:
    result = write_suspects(args.run, args.out, gallery=args.gallery, max_rows=args.max_rows,
                            method=args.method, score=args.score)
    print(format_suspect_summary(result))
    print(f"wrote {args.out}" + (f" and {args.gallery}" if args.gallery else ""))
    return 0


def run_clean(args: argparse.Namespace) -> int:
    table, n_acted = write_clean_table(args.run, args.out, policy=args.policy,
                                       threshold=args.threshold, max_fraction=args.max_fraction,
                                       soft_weight=args.soft_weight, method=args.method,
                                       score=args.score)
    verb = {"drop": "excluded from training", "relabel": "relabelled for training",
            "soft": "given soft targets for training"}[args.policy]
    from mixcls.data import TRAIN_ONLY_FOLD

    train_only = int((table["fold"] == TRAIN_ONLY_FOLD).sum())
    kept = f"; {train_only} train-only row(s) (fold -1) kept as they are" if train_only else ""
    print(f"clean ({args.policy}): {n_acted} of {len(table) - train_only} OOF rows {verb}; "
          f"validation is still scored on label_given for every one of them{kept}")
    print(f"wrote {args.out}")
    return 0
