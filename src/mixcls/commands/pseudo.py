"""mixcls pseudo: pseudo-labels of unlabelled images, once per teacher fold."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pseudo", help="pseudo-label unlabelled images once per teacher fold",
        description="Predict unlabelled images with each fold model of a finished run (or blend) "
        "separately and write a long table (image_id, fold, label, confidence, passed, prob_*) and "
        "its sidecar OUT.json. `mixcls train --pseudo OUT --folds-from TEACHER` then adds to fold "
        "g's training part the rows that passed for g, labelled by the teacher's fold-g model, "
        "which never trained on fold g's validation rows: CV stays honest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True,
                   help="the teacher: a finished run folder or a blend folder; a student trained "
                        "with --pseudo makes a second round (its fold-g models never saw fold g's "
                        "validation rows either)")
    p.add_argument("--images", required=True, help="folder of unlabelled images")
    p.add_argument("--ids", help="CSV with an image_id column: only these images")
    p.add_argument("--out", required=True, help="pseudo table to write (CSV)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="a row passes for a fold when that fold's confidence is above this (1.0: none)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="keep at most the N most confident passing rows per class per fold")
    p.add_argument("--soft", action="store_true",
                   help="the student trains on the fold's probabilities, not its argmax label")
    p.add_argument("--tta", type=int, default=None,
                   help="the first N of the teacher's TTA views (default: the setting mixcls tta "
                   "--apply chose for the teacher, else its tta)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=run_pseudo)


def run_pseudo(args: argparse.Namespace) -> int:
    from mixcls.predict import resolve_images
    from mixcls.pseudo import make_pseudo
    from mixcls.runs import RunFolder

    RunFolder(Path(args.run)).classes  # fail on a wrong --run before reading images
    ids, paths = resolve_images(args.images, args.ids)
    meta = make_pseudo(args.run, args.images, ids, paths, args.out, threshold=args.threshold,
                       max_per_class=args.max_per_class, soft=args.soft, tta=args.tta,
                       device=args.device, batch_size=args.batch_size, workers=args.workers)
    print(f"teacher folds {meta['folds_fingerprint']}: train the student with "
          f"--pseudo {args.out} --folds-from {args.run}")
    return 0
