"""benchmarks/duplicates.py on a tiny clothing-like checkout (phash only): its final line
agrees with its tables, and table 3 counts the held-out photos planted as copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from conftest import final_figures, load_benchmark


def _smooth_photo(rng: np.random.Generator) -> Image.Image:
    """320 x 240, smooth with fine structure: pHash keeps its re-saved copies within a few bits,
    as it does a photo's."""
    x = gaussian_filter(rng.normal(0, 1, (128, 128, 3)), (6.0, 6.0, 0))
    x = ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    return Image.fromarray(x).resize((320, 240), Image.BICUBIC)


def _write_checkout(root: Path) -> None:
    """train/{coat,shoe}/: 20 photos; test/: a copy of train/coat/1.jpg and a new photo;
    validation/coat/: a copy of train/shoe/2.jpg (another label)."""
    rng = np.random.default_rng(0)
    for i in range(20):
        folder = root / "train" / ("coat" if i % 2 else "shoe")
        folder.mkdir(parents=True, exist_ok=True)
        _smooth_photo(rng).save(folder / f"{i}.jpg", quality=90)
    for folder in ("test/coat", "test/shoe", "validation/coat"):
        (root / folder).mkdir(parents=True)
    shutil.copyfile(root / "train" / "coat" / "1.jpg", root / "test" / "coat" / "copy.jpg")
    _smooth_photo(rng).save(root / "test" / "shoe" / "new.jpg", quality=90)
    shutil.copyfile(root / "train" / "shoe" / "2.jpg", root / "validation" / "coat" / "v.jpg")


def test_duplicates_bench_line_matches_its_tables_and_counts_the_planted_heldout_copies(
        tmp_path, capsys):
    _write_checkout(tmp_path / "clothing")
    bench = load_benchmark("duplicates")
    assert bench.main(["--data", str(tmp_path / "clothing"), "--work", str(tmp_path / "work"),
                       "--copies", "4", "--speed-photos", "2", "--workers", "0",
                       "--no-embedding", "--sheets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = final_figures(lines)
    assert figures["phash_heldout_near"] == "2"
    table1 = {line.split()[0]: line.split() for line in lines
              if line.split() and line.split()[0] in bench.TRANSFORMS}
    for name in ("resize", "jpeg", "brightness", "crop95", "hflip"):
        assert float(figures[f"phash_found_{name}"]) == float(table1[name][-1]), name
    start = lines.index(next(line for line in lines if line.split()[:2] == ["split", "photos"]))
    table3 = {line.split()[0]: line.split()[1:] for line in lines[start + 1:start + 3]}
    assert table3 == {"test": ["2", "1", "0"], "validation": ["1", "1", "1"]}
    matches = (tmp_path / "work" / "phash" / "heldout_matches.csv").read_text()
    assert "test/coat/copy.jpg,train/coat/1.jpg,0,coat,True" in matches
    assert "validation/coat/v.jpg,train/shoe/2.jpg,0,shoe,True" in matches
    for sheet in ("phash_original_pairs.png", "phash_heldout_matches.png"):
        assert Image.open(tmp_path / "work" / sheet).size[0] == 480
    assert bench.draw_sheet(tmp_path / "none.png", []) is False
    assert not (tmp_path / "none.png").exists()


def test_pair_search_bench_finds_the_planted_pairs_both_ways_and_its_line_is_its_last_row(capsys):
    bench = load_benchmark("pair_search")
    assert bench.main(["--rows", "250", "401"]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = final_figures(lines)
    last_row = lines[-2].split()
    assert figures["rows"] == last_row[0] == "401" and figures["same_pairs"] == "1"
    assert last_row[1] == "4"  # rows 1, 101, 201 and 301 copy the row before them
    assert figures["mixcls_s"] == last_row[2] and figures["sklearn_s"] == last_row[3]


def test_group_leak_bench_copies_training_photos_only_and_duplicates_groups_them(tmp_path):
    from mixcls.cli import main

    _write_checkout(tmp_path / "clothing")
    bench = load_benchmark("group_leak")
    work = tmp_path / "work"
    train_csv, test_csv, n_copies = bench.write_tables(tmp_path / "clothing", work, 0.5)
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    originals = train[train["image_id"] == train["source"]]
    copies = train[train["image_id"] != train["source"]]
    assert len(originals) + len(test) == 23 and n_copies == len(copies) == round(0.5 * len(originals))
    assert not set(test["image_id"]) & set(train["source"])  # no test photo is trained on, copied or not
    assert set(copies["source"]) <= set(originals["image_id"])
    assert (copies.set_index("source").loc[copies["source"], "label"].to_numpy()
            == originals.set_index("image_id").loc[copies["source"], "label"].to_numpy()).all()
    grouped = work / "dup_groups" / "train.csv"
    assert main(["duplicates", "--csv", str(train_csv), "--images", str(work / "images"),
                 "--out", str(grouped), "--workers", "0", "--no-progress"]) == 0
    assert bench.copies_grouped(grouped) == 100.0
