"""`mixcls duplicates`: near-duplicate images of a training table, grouped for grouped folds.

The work is `duplicates.write_duplicate_groups`; this file parses and prints.
"""

from __future__ import annotations

import argparse

from mixcls.duplicates import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_SIMILARITY


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "duplicates", help="group near-duplicate training images (perceptual hash or CNN "
        "embedding) for grouped folds",
        description="Pair the training images that look alike and write the training table with "
        "a group column (a twin of a twin joins the same group). Train on it with --group-col "
        "COLUMN, so no near-duplicate is validated by a model that trained on its twin; --pairs "
        "lists the pairs, and those with different labels are worth a look. --method phash "
        "(imagehash's 256-bit pHash, no model) finds resized, re-compressed and brightened copies; "
        "--method embedding (cosine similarity of a CNN's pooled features) also finds crops, "
        "flips and re-shot photos, at the cost of a forward pass per image. With --against DIR "
        "(test images, an extra data set, an unlabelled pool) it writes instead, for every image "
        "of DIR, its nearest training image and whether that is a near-duplicate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="competition folder (train.csv + train_images/) or class-per-folder tree")
    p.add_argument("--csv", help="training table, when it is not DATA/train.csv")
    p.add_argument("--images", help="training images folder, when it is not DATA/train_images")
    p.add_argument("--id-col", default="image_id", help="column of image file names")
    p.add_argument("--label-col", default="label", help="column of labels")
    p.add_argument("--out", required=True, help="grouped training table to write (CSV); with "
                   "--against, the table of DIR's images and their nearest training images")
    p.add_argument("--column", help="name of the group column it adds (default: dup_group)")
    p.add_argument("--pairs", help="also write the pairs (image_a, image_b, bits or similarity, labels) here")
    p.add_argument("--against", metavar="DIR", help="match the images below DIR against the "
                   "training images instead of grouping these")
    p.add_argument("--method", choices=("phash", "embedding"), default="phash")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help="phash: bits (of 256) two hashes may differ by and still be near-duplicates")
    p.add_argument("--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY,
                   help="embedding: the cosine similarity from which two images are near-duplicates")
    p.add_argument("--run", help="embedding: a finished run whose fold models embed (mean over folds)")
    p.add_argument("--model", help="embedding: a timm model with pretrained weights, instead of --run")
    p.add_argument("--pretrained-file", help="embedding: --model's weights from this file")
    p.add_argument("--pretrained", action="store_true", help="embedding: --model's hub weights")
    p.add_argument("--img-size", type=int, default=224, help="embedding: --model's input size")
    p.add_argument("--device", default="auto", help="embedding: auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="embedding: images per forward pass")
    p.add_argument("--workers", type=int, default=2,
                   help="processes that decode (phash: and hash; 0: this one)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (phash)")
    p.set_defaults(func=run_duplicates)


def run_duplicates(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mixcls.data import DataError
    from mixcls.duplicates import EmbeddingFinder, HashFinder, write_duplicate_groups, write_matches

    if args.against is not None and (args.column is not None or args.pairs is not None):
        raise DataError("--column and --pairs are for grouping the training images; with "
                        "--against, --out is the table of matches")
    if args.method == "phash":
        finder = HashFinder(max_distance=args.max_distance, workers=args.workers)
    else:
        finder = EmbeddingFinder(min_similarity=args.min_similarity, run=args.run,
                                 model=args.model, pretrained_file=args.pretrained_file,
                                 pretrained=args.pretrained, img_size=args.img_size,
                                 device=args.device, batch_size=args.batch_size,
                                 workers=args.workers)
    progress = None if args.no_progress else lambda items, total: tqdm(items, total=total,
                                                                        desc="hashing")
    layout = dict(csv=args.csv, images=args.images, id_col=args.id_col, label_col=args.label_col,
                  finder=finder, progress=progress)
    if args.against is not None:
        matches = write_matches(args.data, args.against, args.out, **layout)
        print(matches.summary())
        print(f"wrote {args.out}")
        return 0
    column = args.column or "dup_group"
    result = write_duplicate_groups(args.data, args.out, column=column, pairs_out=args.pairs,
                                    **layout)
    print(result.summary())
    print(f"wrote {args.out}" + (f" and {args.pairs}" if args.pairs else "")
          + f"; train with --csv {args.out} --images {result.images_dir} --group-col {column}")
    return 0
