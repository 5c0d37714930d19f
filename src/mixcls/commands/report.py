"""`mixcls report RUN`: rebuild the self-contained HTML report of a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="(re)build RUN/report.html, the self-contained report of a run",
        description="Read a run folder (config.yaml, metrics.json, oof.csv, fold_K/history.csv, "
                    "and suspects.csv / suspects.png when `mixcls noise` wrote them there) and "
                    "write one HTML file with every picture embedded: settings, CV scores, "
                    "learning curves, confusion matrix, per-class accuracy, the most confidently "
                    "wrong images, mixed batches and suspect labels.")
    p.add_argument("run", metavar="RUN", help="run folder written by mixcls train")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.add_argument("--seed", type=int, default=0, help="picks the images of the mixed-batch examples")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    # local imports: matplotlib and torch load only when used
    from mixcls.blend import is_blend_folder

    if is_blend_folder(args.run):  # a blend's page: members beside the blend, weights, errors
        from mixcls.blend_report import write_blend_report
        path = write_blend_report(args.run, out=args.out)
    else:
        from mixcls.report import write_report
        path = write_report(args.run, out=args.out, seed=args.seed)
    print(f"wrote {path} ({Path(path).stat().st_size / 1024:.0f} KiB)")
    return 0
