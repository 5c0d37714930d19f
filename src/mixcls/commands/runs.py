"""`mixcls runs [DIR ...]`: the table of run folders, their CV scores, settings and folds."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from mixcls.run_table import SORT_KEYS

    p = subparsers.add_parser(
        "runs", help="compare run folders: CV accuracy, macro F1, OOF log-loss, settings, folds",
        description="Find every run folder (config.yaml + folds.csv) under each DIR and print one "
                    "row per run: CV accuracy, macro F1, OOF log-loss, model, img size, loss, mix, "
                    "epochs, training seconds, the folds fingerprint (equal fingerprints: the same "
                    "validation rows, so the scores compare) and whether the run is finished. A "
                    "run folder that cannot be read is listed as broken, with the reason.")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR",
                   help="folders searched recursively for run folders (default: runs)")
    p.add_argument("--sort", choices=list(SORT_KEYS), default="logloss",
                   help="order of the rows: scores best first, seconds fastest first (default logloss)")
    p.add_argument("--against", metavar="RUN",
                   help="a finished run folder: add each run's CV accuracy minus RUN's on the OOF "
                        "rows both scored (acc_diff), its paired standard error (diff_se) and "
                        "those rows' count, for the runs on RUN's folds")
    p.add_argument("--csv", metavar="FILE", help="also write the table to this CSV file")
    p.set_defaults(func=run_runs)


def run_runs(args: argparse.Namespace) -> int:
    from mixcls.run_table import format_runs_table, runs_table
    from mixcls.runs import atomic_write_csv

    table = runs_table(args.dirs, sort=args.sort, against=args.against)
    if table.empty:
        print(f"no run folders (config.yaml + folds.csv) under {', '.join(args.dirs)}")
    else:
        print(format_runs_table(table))
    if args.csv:
        atomic_write_csv(args.csv, table)
        print(f"wrote {args.csv} ({len(table)} runs)")
    return 0
