"""`mixcls duplicates`: near-duplicate images of a training table, grouped for grouped folds.

The work is `duplicates.write_duplicate_groups`; this file parses and prints.
"""

from __future__ import annotations

import argparse

from mixcls.duplicates import DEFAULT_MAX_DISTANCE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "duplicates", help="group near-duplicate training images (perceptual hash) for grouped folds",
        description="Hash every training image (imagehash's pHash, 256 bits), pair the images whose "
        "hashes differ in at most --max-distance bits, and write the training table with a group "
        "column (a twin of a twin joins the same group). Train on it with --group-col COLUMN so "
        "no near-duplicate is validated by a model that trained on its twin; --pairs lists the "
        "pairs, those with different labels first worth a look.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="competition folder (train.csv + train_images/) or class-per-folder tree")
    p.add_argument("--csv", help="training table, when it is not DATA/train.csv")
    p.add_argument("--images", help="training images folder, when it is not DATA/train_images")
    p.add_argument("--id-col", default="image_id", help="column of image file names")
    p.add_argument("--label-col", default="label", help="column of labels")
    p.add_argument("--out", required=True, help="grouped training table to write (CSV)")
    p.add_argument("--column", default="dup_group", help="name of the group column it adds")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help="bits (of 256) two hashes may differ by and still be near-duplicates")
    p.add_argument("--pairs", help="also write the pairs (image_a, image_b, distance, labels) here")
    p.add_argument("--workers", type=int, default=2, help="processes that decode and hash (0: this one)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run_duplicates)


def run_duplicates(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mixcls.duplicates import write_duplicate_groups

    result = write_duplicate_groups(
        args.data, args.out, csv=args.csv, images=args.images, id_col=args.id_col,
        label_col=args.label_col, column=args.column, max_distance=args.max_distance,
        pairs_out=args.pairs, workers=args.workers,
        progress=None if args.no_progress else lambda items, total: tqdm(items, total=total,
                                                                          desc="hashing"))
    print(result.summary())
    print(f"wrote {args.out}" + (f" and {args.pairs}" if args.pairs else "")
          + f"; train with --csv {args.out} --images {result.images_dir} --group-col {args.column}")
    return 0
