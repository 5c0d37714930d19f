"""Read and check the training table and its images; the Dataset the loaders use.

Every check runs before any training or writing starts, and all problems of one kind are
reported together (the first 20 and a count), so a user fixes their data in one pass.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from mixcls.device_augment import WarpItem
from mixcls.folds import TRAIN_ONLY_FOLD
from mixcls.image_cache import CACHE_SCALE, RAM_LIMIT_BYTES, ImageCache, decode_image, load_copy

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CLASS_FILES = ("label_num_to_disease_map.json", "classes.json")


def prob_columns(num_classes: int) -> list[str]:
    """prob_0 … prob_{K-1}: the probability columns of oof.csv, soft-label tables, submissions."""
    return [f"prob_{k}" for k in range(num_classes)]
MAX_LISTED = 20
# Fold and keep values above this are typos or overflow (they would not fit an int32 index).
MAX_INDEX = 2**31
# Caching decoded images avoids re-decoding every epoch; above this the RAM is better left to
# the OS page cache and the workers (image_cache.py owns the rule).
CACHE_LIMIT_BYTES = RAM_LIMIT_BYTES


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, rows or values."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, whatever its mode (grey, RGBA, palette, 16-bit)."""
    return decode_image(path)  # fully: a truncated file raises here, not in a worker later


@dataclass
class TrainTable:
    """A checked training table.

    `frame` has image_id, label (int index into `classes`), path (absolute), and when the CSV
    had them: fold (TRAIN_ONLY_FOLD for a train-only row), label_given (int), keep (0/1),
    prob_0 … prob_{K-1} (soft targets), group (text) when a group column was named, and
    train_only (bool) when a train-only column was.
    """

    frame: pd.DataFrame
    classes: list[str]
    images_dir: Path
    csv_path: Path | None
    integer_labels: bool
    soft_targets: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy(dtype=np.int64)


def format_listing(title: str, items: Sequence[str]) -> str:
    """'title (count):' and the first MAX_LISTED items, one per line: every list of bad rows."""
    shown = "\n".join(f"  {item}" for item in items[:MAX_LISTED])
    more = f"\n  … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{title} ({len(items)}):\n{shown}{more}"


def resolve_layout(data: str | Path | None, csv: str | Path | None,
                   images: str | Path | None) -> tuple[Path | None, Path]:
    """(csv path or None for a class-per-folder tree, images folder) from the user's paths."""
    if data is None and csv is None:
        raise DataError("no training data given: pass --data FOLDER, or --csv FILE with --images DIR")
    if csv is not None:
        csv = Path(csv)
        if not csv.is_file():
            raise DataError(f"training table {csv} does not exist")
        base = Path(data) if data is not None else csv.parent
        images_dir = Path(images) if images is not None else base / "train_images"
    else:
        data = Path(data)
        if data.is_file() and data.suffix.lower() == ".csv":
            return resolve_layout(None, data, images)
        if not data.is_dir():
            raise DataError(f"data folder {data} does not exist")
        if (data / "train.csv").is_file():
            csv = data / "train.csv"
            images_dir = Path(images) if images is not None else data / "train_images"
        else:
            return None, Path(images) if images is not None else data
    if not images_dir.is_dir():
        raise DataError(f"images folder {images_dir} does not exist")
    return csv, images_dir


def read_class_names(folder: Path) -> dict[str, str] | list[str] | None:
    """The class names file of a competition folder, if any: {label: name} or [name, …]."""
    for name in CLASS_FILES:
        path = folder / name
        if path.is_file():
            try:
                names = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc})") from None
            if isinstance(names, dict):
                return {str(k): str(v) for k, v in names.items()}
            if isinstance(names, list):
                return [str(v) for v in names]
            raise DataError(f"{path}: expected a mapping label -> name or a list of names")
    return None


def _ordered_keys(names: dict[str, str]) -> list[str]:
    return sorted(names, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))


def class_names_in_order(names: dict[str, str] | list[str] | None) -> list[str]:
    """Class names in index order from `read_class_names` output (numeric keys sort as numbers)."""
    if isinstance(names, dict):
        return [names[k] for k in _ordered_keys(names)]
    return list(names or [])


def _scan_class_folders(root: Path) -> pd.DataFrame:
    """image_id (relative path) and label (folder name) from root/<class>/<file>."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"image_id": path.relative_to(root).as_posix(), "label": class_dir.name})
    if not rows:
        raise DataError(f"{root}: no train.csv and no class folders with images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) inside")
    return pd.DataFrame(rows)


def read_csv(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """pd.read_csv(path, **kwargs); DataError naming `path` for an empty or unreadable file.

    The one CSV reader of the package: tables, pools, run files and the report's inputs.
    """
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from None


def read_text_table(path: str | Path, *, allow_empty: bool = False) -> pd.DataFrame:
    """Every cell as a string ("" when empty or missing); rows must not outgrow the header;
    DataError for a header without rows unless `allow_empty`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        # index_col=False: without it pandas silently turns the first cells of rows with
        # too many cells into an index, shifting every column by one.
        frame = read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        raise DataError(format_listing(f"{path}: rows with more cells than the header's "
                                       f"{len(frame.columns)} columns", _long_rows(path, len(frame.columns))))
    if frame.empty and not allow_empty:
        raise DataError(f"{path} has a header but no rows")
    return frame.fillna("")


def _long_rows(path: Path, n_columns: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [f"row {i + 1}: {len(cells)} cells" for i, cells in enumerate(csv.reader(handle))
                if len(cells) > n_columns]


def load_train_table(data: str | Path | None = None, *, csv: str | Path | None = None,
                     images: str | Path | None = None, id_col: str = "image_id",
                     label_col: str = "label", group_col: str | None = None,
                     train_only_col: str | None = None, n_folds: int | None = None,
                     check_images: str = "full", classes: list[str] | None = None,
                     image_cache: ImageCache | None = None) -> TrainTable:
    """Read a Kaggle-layout folder, a CSV + images folder, or a class-per-folder tree, and check it.

    `classes` fixes the class list (e.g. a run's classes.json when predicting or merging).
    `group_col` names a column of group ids, kept as the frame's `group` (non-empty text).
    `train_only_col` names a column of 0/1 flags, kept as the frame's `train_only` (bool).
    `image_cache`: the check skips files its index knows unchanged, and its decodes fill it.
    """
    csv_path, images_dir = resolve_layout(data, csv, images)
    if csv_path is None:
        for key, column in (("group_col", group_col), ("train_only_col", train_only_col)):
            if column is not None:
                raise DataError(f"{key} {column!r}: {images_dir} is a class-per-folder tree, "
                                "which has no columns; list the images in a CSV with that column")
        raw = _scan_class_folders(images_dir)
        source = str(images_dir)
        id_col, label_col = "image_id", "label"
        names_file = None
    else:
        raw = read_text_table(csv_path)
        source = str(csv_path)
        missing = [c for c in (id_col, label_col, group_col, train_only_col)
                   if c is not None and c not in raw.columns]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                            f"columns are {', '.join(raw.columns)}")
        names_file = read_class_names(csv_path.parent)
    frame = pd.DataFrame({"image_id": raw[id_col].astype(str).str.strip(),
                          "label_raw": raw[label_col].astype(str).str.strip()})
    _check_ids(frame, source, images_dir)
    _check_labels(frame["label_raw"], source)
    if group_col is not None:
        frame["group"] = _group_ids(raw[group_col], group_col, source)
    if train_only_col is not None:
        frame["train_only"] = _flags(raw[train_only_col], train_only_col, source)
    class_list, integer_labels = _resolve_classes(frame["label_raw"], names_file, classes)
    frame["label"] = _map_labels(frame["label_raw"], class_list, integer_labels, source)
    optional = _read_optional_columns(raw, frame, class_list, integer_labels, source)
    frame = frame.drop(columns="label_raw")
    frame["path"] = [str((images_dir / i).resolve()) for i in frame["image_id"]]
    _check_files(frame, source, check_images, image_cache)
    table = TrainTable(frame=frame.assign(**optional["columns"]), classes=class_list,
                       images_dir=images_dir.resolve(), csv_path=csv_path,
                       integer_labels=integer_labels, soft_targets=optional["soft"])
    if n_folds is not None:
        check_class_counts(table, n_folds)
    return table


def _check_ids(frame: pd.DataFrame, source: str, images_dir: Path) -> None:
    ids = frame["image_id"]
    empty = [f"row {i + 2}" for i in np.flatnonzero(ids.eq("").to_numpy())]
    if empty:
        raise DataError(format_listing(f"{source}: rows with an empty image id", empty))
    nul = [f"row {i + 2}: {v!r}" for i, v in ids.items() if "\x00" in v]
    if nul:  # the OS cannot even look such a name up
        raise DataError(format_listing(f"{source}: image ids with a NUL character", nul))
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        listed = [f"row {i + 2}: {v!r}" for i, v in dup.items()]
        raise DataError(format_listing(f"{source}: duplicate image ids", listed))
    root = images_dir.resolve()
    outside, resolved = [], {}
    for i, image_id in ids.items():
        candidate = Path(image_id)
        if candidate.is_absolute() or ".." in candidate.parts:
            outside.append(f"row {i + 2}: {image_id!r}")
            continue
        target = (root / candidate).resolve()
        if not target.is_relative_to(root):
            outside.append(f"row {i + 2}: {image_id!r} (a link out of the folder)")
        resolved.setdefault(target, []).append(f"row {i + 2}: {image_id!r}")
    if outside:
        raise DataError(format_listing(f"{source}: image ids that point outside {images_dir}", outside))
    # 'a.png', './a.png', 'a.png/' and a link to a.png are one image: in two folds it would leak
    same = [row for rows in resolved.values() if len(rows) > 1 for row in rows]
    if same:
        raise DataError(format_listing(f"{source}: image ids that name the same file", same))


def _check_labels(labels: pd.Series, source: str) -> None:
    empty = [f"row {i + 2}" for i in np.flatnonzero(labels.eq("").to_numpy())]
    if empty:
        raise DataError(format_listing(f"{source}: rows with an empty label", empty))


def _flags(values: pd.Series, column: str, source: str) -> np.ndarray:
    """(N,) bool from a column of 0/1 (or true/false, yes/no); DataError lists other values."""
    text = values.astype(str).str.strip().str.lower()
    known = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
    bad = [f"row {i + 2}: {values.iloc[i]!r}" for i in np.flatnonzero(~text.isin(known).to_numpy())]
    if bad:
        raise DataError(format_listing(f"{source}: column {column} must hold 0 or 1", bad))
    return text.map(known).to_numpy(dtype=bool)


def _group_ids(values: pd.Series, group_col: str, source: str) -> pd.Series:
    groups = values.astype(str).str.strip()
    empty = [f"row {i + 2}" for i in np.flatnonzero(groups.eq("").to_numpy())]
    if empty:  # an empty id would silently make one big group of every unlabelled row
        raise DataError(format_listing(f"{source}: rows with an empty {group_col}", empty))
    return groups


def _resolve_classes(labels: pd.Series, names_file: Any, classes: list[str] | None
                     ) -> tuple[list[str], bool]:
    """Class names in index order, and whether the table's labels are integer indices."""
    values = labels.unique().tolist()
    integer = all(v.lstrip("-").isdigit() for v in values)
    if classes is not None:
        indexed = list(classes) == [str(i) for i in range(len(classes))]
        return list(classes), integer and (indexed or not set(values) <= set(classes))
    if isinstance(names_file, dict):
        keys = _ordered_keys(names_file)
        indexed = keys == [str(i) for i in range(len(keys))]
        return class_names_in_order(names_file), integer and indexed
    if isinstance(names_file, list):
        return names_file, integer
    if integer:
        ints = sorted(int(v) for v in values)
        if ints[0] >= 0 and ints[-1] < 1000:
            return [str(i) for i in range(ints[-1] + 1)], True
    return sorted(values), False


def _map_labels(raw: pd.Series, classes: list[str], integer: bool, source: str) -> np.ndarray:
    if integer:
        index = {str(i): i for i in range(len(classes))}
    else:
        index = {name: i for i, name in enumerate(classes)}
    mapped = raw.map(index)
    bad = [f"row {i + 2}: {v!r}" for i, v in raw[mapped.isna()].items()]
    if bad:
        allowed = ", ".join(index) if len(index) <= 30 else f"{len(index)} classes"
        raise DataError(format_listing(f"{source}: labels outside the class list ({allowed})", bad))
    return mapped.to_numpy(dtype=np.int64)


def _read_optional_columns(raw: pd.DataFrame, frame: pd.DataFrame, classes: list[str],
                           integer: bool, source: str) -> dict[str, Any]:
    """fold / label_given / keep / prob_k columns written by `mixcls clean` or by hand."""
    columns: dict[str, Any] = {}
    if "label_given" in raw.columns:
        columns["label_given"] = _map_labels(raw["label_given"].astype(str).str.strip(), classes,
                                             integer, f"{source} (label_given)")
    for name in ("fold", "keep"):
        if name in raw.columns:
            values = pd.to_numeric(raw[name], errors="coerce")
            low = TRAIN_ONLY_FOLD if name == "fold" else 0  # fold -1: a train-only row
            bad = [f"row {i + 2}: {raw[name][i]!r}" for i in np.flatnonzero(
                values.isna().to_numpy() | (values < low).to_numpy() | (values % 1 != 0).to_numpy()
                | (values >= MAX_INDEX).to_numpy())]
            if bad:
                also = f" ({TRAIN_ONLY_FOLD}: train only)" if name == "fold" else ""
                raise DataError(format_listing(f"{source}: column {name} must hold integers in {low} "
                                               f"… {MAX_INDEX - 1}{also}", bad))
            columns[name] = values.to_numpy(dtype=np.int64)
    if "keep" in columns and not set(np.unique(columns["keep"])) <= {0, 1}:
        raise DataError(f"{source}: column keep must hold 0 or 1")
    prob_cols = [c for c in raw.columns if c.startswith("prob_")]
    soft = None
    if prob_cols:
        expected = prob_columns(len(classes))
        if sorted(prob_cols, key=lambda c: int(c[5:]) if c[5:].isdigit() else -1) != expected:
            raise DataError(f"{source}: soft-target columns must be exactly {expected[0]} … "
                            f"{expected[-1]} for {len(classes)} classes, found {prob_cols}")
        soft = raw[expected].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        sums = soft.sum(axis=1)
        bad_rows = np.flatnonzero(~np.isfinite(sums) | (soft < 0).any(axis=1) | (abs(sums - 1) > 1e-3))
        if len(bad_rows):
            raise DataError(format_listing(f"{source}: soft targets must be >= 0 and sum to 1",
                                     [f"row {i + 2}: sum {sums[i]:.4f}" for i in bad_rows]))
        soft = soft / soft.sum(axis=1, keepdims=True)
    return {"columns": columns, "soft": soft}


def _check_one_image(path: str, mode: str | None, image_cache: ImageCache | None = None) -> str | None:
    """None, or what is wrong with the image at `path`; with `image_cache` it is also cached."""
    try:
        if image_cache is not None:
            image_cache.admit(path, check=mode)
        elif mode == "full":
            read_image(path)
        else:
            with Image.open(path) as image:
                image.verify()
        return None
    except FileNotFoundError:
        return "missing file"
    except Image.DecompressionBombError as exc:  # not an OSError: a header claiming gigapixels
        return f"too large to decode safely ({str(exc)[:80]})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({exc.__class__.__name__}: {str(exc)[:80]})"


def _check_files(frame: pd.DataFrame, source: str, mode: str,
                 image_cache: ImageCache | None = None) -> None:
    paths = frame["path"].tolist()
    missing = [f"row {i + 2}: {frame['image_id'].iat[i]!r}"
               for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        raise DataError(format_listing(f"{source}: image files that do not exist", missing))
    problems = _check_images(paths, mode, image_cache)
    bad = [f"row {i + 2}: {frame['image_id'].iat[i]!r}: {msg}" for i, msg in enumerate(problems) if msg]
    if bad:
        raise DataError(format_listing(f"{source}: images that cannot be decoded", bad))


def _check_images(paths: Sequence[str], mode: str | None, image_cache: ImageCache | None
                  ) -> list[str | None]:
    """Per path None or its problem; through `image_cache`, which then records the good ones."""
    if image_cache is not None:
        image_cache.plan(paths)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        problems = list(pool.map(lambda p: _check_one_image(p, mode, image_cache), paths))
    if image_cache is not None:
        image_cache.commit()  # the good files too when others are bad: the rerun skips them
    return problems


def check_classes_beside(out: str | Path, classes: Sequence[str], *, source: str, what: str) -> bool:
    """Whether a class file (classes.json, label_num_to_disease_map.json) is already beside
    `out`; DataError when it names other classes than `classes` (those of `source`)."""
    out = Path(out)
    existing = [out.parent / name for name in CLASS_FILES if (out.parent / name).is_file()]
    if existing and class_names_in_order(read_class_names(out.parent)) != list(classes):
        raise DataError(f"{existing[0]} names other classes than {source} ({len(classes)} "
                        f"classes); write the {what} to another folder")
    return bool(existing)


def write_table_with_classes(out: str | Path, table: pd.DataFrame, classes: Sequence[str], *,
                             source: str, what: str) -> None:
    """Write `table` to `out` (atomically) with its class list beside it, so the trainer reads
    the classes back in `source`'s order wherever the table is written (checked first:
    `check_classes_beside`)."""
    from mixcls.runs import atomic_write_csv, atomic_write_json

    existing = check_classes_beside(out, classes, source=source, what=what)
    atomic_write_csv(out, table)
    if not existing:
        atomic_write_json(Path(out).parent / "classes.json", list(classes))


def check_class_counts(table: TrainTable, n_folds: int) -> None:
    """Stratified k-fold needs every class at least n_folds times among the validated rows (a
    train-only row is in no fold)."""
    classes, source = table.classes, str(table.csv_path or table.images_dir)
    labels, which = table.labels, "images"
    if "train_only" in table.frame.columns:
        labels = labels[~table.frame["train_only"].to_numpy(dtype=bool)]
        which = "validated images (train-only rows are in no fold)"
    counts = np.bincount(labels, minlength=len(classes))
    small = [f"{classes[k]!r}: {counts[k]} image(s)" for k in range(len(classes)) if counts[k] < n_folds]
    if small:
        raise DataError(format_listing(f"{source}: classes with fewer {which} than the {n_folds} "
                                       "folds (stratified k-fold needs at least one per fold)", small))


# OOF rows are softmax outputs written as text; allow for the rounding of a CSV round trip.
PROB_SUM_TOLERANCE = 1e-3
MAX_ROWS_NAMED = 10


def _row_numbers(index: np.ndarray) -> str:
    """'row 2, row 7, … (N rows)' with CSV line numbers (header is line 1)."""
    shown = ", ".join(f"row {i + 2}" for i in index[:MAX_ROWS_NAMED])
    return shown + (f", … ({len(index)} rows)" if len(index) > MAX_ROWS_NAMED else "")


def check_oof(oof: pd.DataFrame, *, num_classes: int, source: str = "oof") -> None:
    """Raise DataError naming `source` and the rows unless `oof` is a complete OOF table (RUN/oof.csv):
    image_id, label in 0..K-1, fold >= 0, prob_0 … prob_{K-1} >= 0 summing to 1."""
    expected = prob_columns(num_classes)
    found = [c for c in oof.columns if str(c).startswith("prob_")]
    missing = [c for c in ("image_id", "label", "fold") if c not in oof.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; "
                        f"columns are {', '.join(map(str, oof.columns))}")
    if sorted(found) != sorted(expected):
        raise DataError(f"{source}: probability columns {found} do not match the {num_classes} "
                        f"classes of the run (expected prob_0 … prob_{num_classes - 1})")
    if len(oof) == 0:
        raise DataError(f"{source}: no rows")
    for name, high in (("label", num_classes - 1), ("fold", None)):
        values = pd.to_numeric(oof[name], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values) | (values % 1 != 0) | (values < 0)
        if high is not None:
            bad |= values > high
        if bad.any():
            allowed = f"0..{high}" if high is not None else "integers >= 0"
            raise DataError(f"{source}: column {name} must hold {allowed}: {_row_numbers(np.flatnonzero(bad))}")
    dup = oof["image_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        raise DataError(f"{source}: duplicate image ids: {_row_numbers(np.flatnonzero(dup))}")
    probs = oof[expected].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    sums = probs.sum(axis=1)
    bad = ~np.isfinite(sums) | (probs < 0).any(axis=1) | (np.abs(sums - 1) > PROB_SUM_TOLERANCE)
    if bad.any():
        raise DataError(f"{source}: probabilities must be >= 0 and sum to 1 (rows not scored "
                        f"by any fold count too): {_row_numbers(np.flatnonzero(bad))}")


def list_image_files(folder: str | Path) -> list[str]:
    """Image ids (paths relative to `folder`) of every image file below it, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"images folder {folder} does not exist")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_image_folder(folder: str | Path) -> tuple[list[str], list[str]]:
    """(image ids, absolute paths) of every image file below `folder`, each opened and its
    header verified; DataError when the folder is missing or empty, or listing the files that
    cannot be read."""
    ids = list_image_files(folder)
    if not ids:
        raise DataError(f"images folder {folder} holds no image files")
    paths = [str((Path(folder) / i).resolve()) for i in ids]
    problems = _check_images(paths, "header", None)
    bad = [f"{image_id}: {msg}" for image_id, msg in zip(ids, problems) if msg]
    if bad:
        raise DataError(format_listing(f"{folder}: images that cannot be decoded", bad))
    return ids, paths


def load_image_cache(paths: Sequence[str], *, mode: str = "auto", img_size: int | None = None,
                     cache_dir: str | Path | None = None, cache_scale: float = CACHE_SCALE,
                     image_cache: ImageCache | None = None) -> list[np.ndarray | Path] | None:
    """Per path its decoded image (RAM) or cached copy (disk), for ImageDataset(cache=…); or None.

    `mode`: yes (RAM, full size), disk (copies with short side cache_scale × img_size in
    `cache_dir`), no, or auto (RAM when the decoded set fits in CACHE_LIMIT_BYTES, else disk
    when `img_size` and `cache_dir` are given, else None). `image_cache`, when given, is the
    ImageCache the table check already filled (`load_train_table(image_cache=…)`): its images
    are not decoded again, and the other keywords are its own and not read here.
    """
    if image_cache is None:
        image_cache = ImageCache(mode, img_size=img_size, cache_dir=cache_dir,
                                 cache_scale=cache_scale, ram_limit_bytes=CACHE_LIMIT_BYTES)
    if not paths or image_cache.plan(paths) == "no":
        return None
    problems = _check_images(paths, None, image_cache)
    bad = [f"{path}: {msg}" for path, msg in zip(paths, problems) if msg]
    if bad:
        raise DataError(format_listing("images that cannot be decoded", bad))
    return image_cache.sources(paths)


def seed_transform(transform: Callable, seed: int) -> None:
    """Make the next call of an albumentations pipeline a pure function of `seed`.

    Not Compose.set_random_seed: albumentations 2 gives every step the same seed, so every step
    draws the same first number, and steps of equal p fire together (two flips of p=0.5 give
    two outcomes, not four). One pair of generators shared by all the steps
    (set_random_state) makes their draws independent, and is cheaper than a pair per step.
    """
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    elif hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class ImageDataset(torch.utils.data.Dataset):
    """Images with their targets: class indices (N,) int64 or soft targets (N, K) float32.

    The image is whatever `transform` returns: with the presets of mixcls.transforms a uint8
    tensor (3, H, W), normalised later on the device (transforms.Normalizer); with a
    device_augment.HostPlan a WarpItem (the source and its plan, augmented on the device).

    An item key is an index or an (index, seed) pair: with a seed the augmentation of that item
    is a pure function of (seed, index), so a run is the same whatever the number of workers
    and a resumed epoch can skip batches without changing the ones that follow.

    With `weights` (N,) an item is (image, target, weight): the row's weight in the loss.
    """

    def __init__(self, paths: Sequence[str], targets: np.ndarray | None, transform: Callable,
                 *, cache: Sequence[np.ndarray | str | Path] | None = None,
                 loader: Callable[[str], np.ndarray] = read_image,
                 weights: np.ndarray | None = None):
        """`cache[i]`, when given, is image i decoded (RAM) or its cached .npy copy (disk, from
        load_image_cache); otherwise `loader(paths[i])` decodes it every time."""
        self.paths = list(paths)
        if weights is not None and targets is None:
            raise ValueError("row weights need targets: an unlabelled dataset has no loss to weigh")
        if weights is not None and len(weights) != len(self.paths):
            raise ValueError(f"{len(weights)} weights for {len(self.paths)} images")
        self.targets = targets
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.transform = transform
        self.cache = cache
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self._read(index)
        if seed is not None:
            seed_transform(self.transform, seed)
        out = self.transform(image=image)
        # a HostPlan (--augment-on-device) gives the source and its plan; the device warps it
        tensor = WarpItem(out["image"], out["plan"]) if "plan" in out else out["image"]
        if self.targets is None:
            return tensor, index
        if self.weights is not None:
            return tensor, self.targets[index], self.weights[index]
        return tensor, self.targets[index]

    def _read(self, index: int) -> np.ndarray:
        if self.cache is None:
            return self.loader(self.paths[index])
        item = self.cache[index]
        return item if isinstance(item, np.ndarray) else load_copy(item)
