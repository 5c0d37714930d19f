"""`mixcls select`, `review` and `merge` on a tiny run folder, with a fake mixcls.predict.

The fake model makes the images that must never be chosen (already labelled, or a second
copy of a pool image) the most uncertain, the most disputed between folds and the farthest in
feature space, so any strategy would pick them first if they reached it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mixcls.active import STRATEGIES
from mixcls.cli import main
from mixcls import active as library
from mixcls.commands import active as commands
from mixcls.config import dump_config, load_config
from mixcls.data import DataError
from mixcls.runs import RunError

K = 3
TRAP_NAMES = ("c0_000.png", "c1_000.png", "c2_005.png")


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mixcls")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def run_dir(tmp_path: Path, tiny_data: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(overrides={"data": str(tiny_data), "folds": 2})))
    (run / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    for fold in range(2):
        (run / f"fold_{fold}").mkdir()
        (run / f"fold_{fold}" / "best.pt").write_bytes(b"")  # the fake model never reads it
    return run


def write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def pool(tmp_path: Path, tiny_data: Path) -> dict:
    """A pool folder: 12 new images (2 in a subfolder) and copies of 3 training images by name."""
    rng = np.random.default_rng(7)
    root = tmp_path / "pool"
    fresh = [f"new_{i:02d}.png" for i in range(10)] + ["sub/new_10.png", "sub/new_11.png"]
    for image_id in fresh:
        write_image(root / image_id, rng)
    for name in TRAP_NAMES:
        shutil.copy(tiny_data / "train_images" / name, root / name)
    return {"root": root, "fresh": fresh}


class FakePredict(types.ModuleType):
    """Stands in for mixcls.predict: deterministic outputs per file name; records every call."""

    def __init__(self, traps: set[str]):
        super().__init__("mixcls.predict")
        self.traps, self.calls = traps, []

    def _member(self, path: str, fold: int) -> np.ndarray:
        if Path(path).resolve().as_posix() in self.traps:
            return np.eye(K)[fold % K]  # folds disagree completely; the mean is near uniform
        rng = np.random.default_rng(zlib.crc32(Path(path).name.encode()))
        return rng.dirichlet(np.full(K, 0.3))

    def predict_run_outputs(self, run_dir, paths, *, tta=None, device="auto", batch_size=64, workers=0,
                            features=False):
        self.calls.append(("probs and features" if features else "probs", list(paths)))
        probs = np.stack([[self._member(p, f) for p in paths] for f in range(2)])
        return types.SimpleNamespace(probs=probs, features=np.stack([self._features(paths)] * 2)
                                     if features else None)

    def extract_features(self, run_dir, paths, *, device="auto", batch_size=64, workers=0):
        self.calls.append(("features", list(paths)))
        return self._features(paths)

    def _features(self, paths) -> np.ndarray:
        out = []
        for p in paths:
            rng = np.random.default_rng(zlib.crc32(Path(p).name.encode()))
            far = 1000.0 if Path(p).resolve().as_posix() in self.traps else 1.0
            out.append(far * rng.normal(size=4))
        return np.array(out)


def install_fake(monkeypatch, traps: list[Path]) -> FakePredict:
    fake = FakePredict({p.resolve().as_posix() for p in traps})
    monkeypatch.setitem(sys.modules, "mixcls.predict", fake)
    return fake


def make_pool_csv(pool: dict, tiny_data: Path) -> tuple[Path, list[Path]]:
    """A CSV pool with repeated ids, a repeated file under another spelling, identical bytes
    under a new name, and a training image reached by a path."""
    root = pool["root"]
    shutil.copy(root / "new_03.png", root / "copy_of_new_03.png")
    shutil.copy(root / "new_04.png", root / "sub" / "again_new_04.png")
    ids = pool["fresh"] + ["new_00.png", "./new_01.png", "sub/../new_02.png", "copy_of_new_03.png",
                           "sub/again_new_04.png", "../data/train_images/c1_003.png", *TRAP_NAMES]
    csv = root / "pool.csv"
    pd.DataFrame({"image_id": ids, "note": range(len(ids))}).to_csv(csv, index=False)
    traps = [root / "copy_of_new_03.png", root / "sub" / "again_new_04.png",
             tiny_data / "train_images" / "c1_003.png", *[root / n for n in TRAP_NAMES]]
    return csv, traps


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_select_never_returns_labelled_or_duplicate_images(strategy, pool, run_dir, tiny_data, monkeypatch):
    csv, traps = make_pool_csv(pool, tiny_data)
    fake = install_fake(monkeypatch, traps)
    table, counts = library.select_from_pool(run_dir, csv, strategy=strategy, budget=5, seed=1)
    assert counts == {"pool": 21, "labelled": 4, "duplicates": 5, "candidates": 12, "selected": 5}
    assert set(table["image_id"]) <= set(pool["fresh"]) and table["image_id"].is_unique
    full, _ = library.select_from_pool(run_dir, csv, strategy=strategy, budget=100, seed=1)
    assert sorted(full["image_id"]) == sorted(pool["fresh"])  # every fresh image once, nothing else
    assert full["rank"].tolist() == list(range(1, 13))
    trap_paths = {p.resolve().as_posix() for p in traps}
    for kind, paths in fake.calls:
        if len(paths) == 12:  # the pool's model outputs: only candidates were scored
            assert not trap_paths & {Path(p).as_posix() for p in paths}, kind
    # One pass of the models over the pool per selection: probabilities and features together.
    pool_passes = [paths for kind, paths in fake.calls if kind.startswith("probs")]
    assert len(pool_passes) == 2 and all(len(paths) == 12 for paths in pool_passes)
    assert all(len(paths) != 12 for kind, paths in fake.calls if kind == "features")


def test_select_cli_writes_table_and_copies_or_links(pool, run_dir, tmp_path, monkeypatch, capsys):
    install_fake(monkeypatch, [pool["root"] / n for n in TRAP_NAMES])
    out = tmp_path / "to_label.csv"
    assert run_command(["select", "--run", str(run_dir), "--pool", str(pool["root"]), "--budget", "4",
                        "--strategy", "margin", "--out", str(out), "--copy-to", str(tmp_path / "label")]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert table.columns.tolist()[:5] == ["image_id", "label", "rank", "score", "pred_class"]
    assert {f"prob_{k}" for k in range(K)} <= set(table.columns)
    probs = table[[f"prob_{k}" for k in range(K)]].to_numpy()
    want = [1 - (np.sort(row)[-1] - np.sort(row)[-2]) for row in probs]
    np.testing.assert_allclose(table["score"], want, rtol=1e-9)
    assert table["pred_class"].tolist() == [["red", "green", "blue"][k] for k in probs.argmax(axis=1)]
    assert (table["label"] == "").all() and not set(table["image_id"]) & set(TRAP_NAMES)
    for image_id in table["image_id"]:
        copied = tmp_path / "label" / image_id
        assert copied.is_file() and not copied.is_symlink()
        assert copied.read_bytes() == (pool["root"] / image_id).read_bytes()
    assert "3 already labelled" in capsys.readouterr().out
    linked = tmp_path / "linked"
    run_command(["select", "--run", str(run_dir), "--pool", str(pool["root"]), "--budget", "12",
                 "--strategy", "random", "--out", str(tmp_path / "b.csv"), "--copy-to", str(linked), "--link"])
    assert sorted(p.relative_to(linked).as_posix() for p in linked.rglob("*.png")) == sorted(pool["fresh"])
    assert all(p.is_symlink() for p in linked.rglob("*.png"))


def test_select_refuses_bad_input_before_writing(pool, run_dir, tmp_path, monkeypatch):
    fake = install_fake(monkeypatch, [])
    csv = tmp_path / "pool.csv"
    pd.DataFrame({"image_id": ["new_00.png", "gone.png", "new_01.png"]}).to_csv(csv, index=False)
    out = tmp_path / "to_label.csv"
    with pytest.raises(DataError, match=r"row 3: 'gone\.png'"):
        run_command(["select", "--run", str(run_dir), "--pool", str(csv), "--pool-images",
                     str(pool["root"]), "--budget", "2", "--out", str(out)])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not an empty folder"):
        run_command(["select", "--run", str(run_dir), "--pool", str(pool["root"]), "--budget", "2",
                     "--out", str(out), "--copy-to", str(busy)])
    for name in ("fold_1",):
        shutil.rmtree(run_dir / name)
    with pytest.raises(RunError, match="bald needs at least 2 trained folds"):
        run_command(["select", "--run", str(run_dir), "--pool", str(pool["root"]), "--budget", "2",
                     "--strategy", "bald", "--out", str(out)])
    assert not out.exists() and fake.calls == []


def write_oof(run_dir: Path, tiny_data: Path, flipped: list[int]) -> pd.DataFrame:
    """An oof.csv whose model is confident everywhere, and disagrees with the given label
    (it says label + 1) on the `flipped` rows: those labels look wrong."""
    train = pd.read_csv(tiny_data / "train.csv")
    rng = np.random.default_rng(3)
    believed = train["label"].to_numpy().copy()
    believed[flipped] = (believed[flipped] + 1) % K
    probs = rng.dirichlet(np.full(K, 0.3), size=len(train)) * 0.1
    probs[np.arange(len(train)), believed] += 0.9
    oof = pd.DataFrame({"image_id": train["image_id"], "label": train["label"], "fold": np.arange(len(train)) % 2,
                        "pred": probs.argmax(axis=1)})
    for k in range(K):
        oof[f"prob_{k}"] = probs[:, k]
    oof.to_csv(run_dir / "oof.csv", index=False)
    return oof


def test_review_then_merge_corrections_round_trip(run_dir, tiny_data, tmp_path, capsys):
    flipped = [1, 14, 30]
    oof = write_oof(run_dir, tiny_data, flipped)
    review = tmp_path / "to_review.csv"
    assert run_command(["review", "--run", str(run_dir), "--budget", "5", "--out", str(review)]) == 0
    table = pd.read_csv(review)
    assert len(table) == 5 and table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert set(table["image_id"][:3]) == set(oof["image_id"][flipped])
    names = ["red", "green", "blue"]
    assert table["label"].tolist() == [names[oof.set_index("image_id")["label"][i]] for i in table["image_id"]]
    # The person agrees with the model on the top 3 and keeps the other 2: the training labels
    # (integers in train.csv, class names in the review file) of exactly those 3 change.
    table.loc[:2, "label"] = table.loc[:2, "pred_class"]
    table.to_csv(review, index=False)
    out = tmp_path / "train_next.csv"
    args = ["merge", "--train", str(tiny_data / "train.csv"), "--new", str(review), "--out", str(out),
            "--classes", str(run_dir / "classes.json")]
    with pytest.raises(DataError, match="--allow-relabel"):
        run_command(args)
    assert not out.exists()
    assert run_command(args + ["--allow-relabel"]) == 0
    assert "0 added, 3 corrected, 2 unchanged" in capsys.readouterr().out
    merged = pd.read_csv(out)
    train = pd.read_csv(tiny_data / "train.csv")
    assert merged["image_id"].tolist() == train["image_id"].tolist()
    want = train["label"].to_numpy().copy()
    want[flipped] = (want[flipped] + 1) % K
    assert merged["label"].tolist() == want.tolist()


def test_merge_cli_adds_rows_and_writes_nothing_on_conflict(tiny_data, tmp_path, capsys):
    new = tmp_path / "labelled.csv"
    out = tmp_path / "train_next.csv"
    pd.DataFrame({"image_id": ["new_00.png", "new_01.png", "new_01.png", "new_02.png"],
                  "label": ["0", "1", "2", "9"]}).to_csv(new, index=False)
    argv = ["merge", "--train", str(tiny_data / "train.csv"), "--new", str(new), "--out", str(out)]
    assert main(argv) == 2  # the wired command: one error message, exit code 2, no traceback
    message = capsys.readouterr().err
    assert message.startswith("mixcls: error: merging")
    assert "'new_01.png' given different labels in rows 3, 4" in message
    assert "row 5: 'new_02.png' label '9'" in message and str(new) in message
    assert not out.exists()
    pd.DataFrame({"image_id": ["new_00.png", "new_01.png", "c0_000.png"],
                  "label": ["2", "1", "0"]}).to_csv(new, index=False)
    assert run_command(argv) == 0
    merged = pd.read_csv(out)
    train = pd.read_csv(tiny_data / "train.csv")
    assert len(merged) == len(train) + 2
    assert merged.tail(2).to_dict("list") == {"image_id": ["new_00.png", "new_01.png"], "label": [2, 1]}
    assert "2 added, 0 corrected, 1 unchanged" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 2-fold run of timm's test_resnet (1 epoch, 16 px) and a pool that holds new
    images plus 4 of the training images under their training names."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("active_e2e")
    data = write_tiny_dataset(root / "data", n_per_class=8, size=16)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "test_resnet",
                 "--img-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--folds", "2", "--epochs", "1"]) == 0
    fresh = write_tiny_dataset(root / "fresh", n_per_class=4, size=16, seed=5)
    pool = root / "pool"
    shutil.copytree(fresh / "train_images", pool / "new")
    for name in ("c0_000.png", "c1_001.png", "c2_002.png", "c2_003.png"):
        shutil.copy(data / "train_images" / name, pool / name)
    return run, pool


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["margin", "bald", "coreset"])
def test_select_and_review_end_to_end_with_the_real_predict(trained, strategy, tmp_path):
    run, pool = trained
    out = tmp_path / "to_label.csv"
    assert main(["select", "--run", str(run), "--pool", str(pool), "--budget", "5", "--strategy",
                 strategy, "--out", str(out), "--device", "cpu", "--tta", "1"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 5 and table["image_id"].is_unique
    assert all(i.startswith("new/") for i in table["image_id"])  # training images never come back
    probs = table[[f"prob_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(table["score"]) <= 1e-12)  # best first
    review = tmp_path / "to_review.csv"
    assert main(["review", "--run", str(run), "--budget", "6", "--out", str(review)]) == 0
    assert pd.read_csv(review)["rank"].tolist() == [1, 2, 3, 4, 5, 6]


def _photo_like(rng: np.random.Generator) -> Image.Image:
    """320 x 240, smooth with fine structure, as a photo is to pHash: its JPEG re-saves stay
    within a few bits, where two such images differ by about half the bits."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.normal(0, 1, (128, 128, 3)), (6.0, 6.0, 0))
    x = ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    return Image.fromarray(x).resize((320, 240), Image.BICUBIC)


def _resaved(source: Path, target: Path) -> None:
    """`source` saved again as JPEG: another file, other bytes, the same picture."""
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).convert("RGB").save(target, quality=90)


def test_select_skips_near_duplicates_of_labelled_images_and_of_each_other(
        run_dir, tiny_data, tmp_path, monkeypatch, capsys):
    from mixcls.duplicates import DEFAULT_MAX_DISTANCE, hash_image

    rng = np.random.default_rng(11)
    _photo_like(rng).save(tiny_data / "train_images" / "c1_003.png")  # a labelled photo
    root = tmp_path / "pool"
    root.mkdir()
    for i in range(6):
        _photo_like(rng).save(root / f"f{i}.png")
    _resaved(root / "f2.png", root / "f2_again.jpg")  # after f2 in pool order: f2 is kept
    _resaved(root / "f2_again.jpg", root / "sub" / "f2_third.jpg")  # a copy of the copy
    _resaved(tiny_data / "train_images" / "c1_003.png", root / "labelled_again.jpg")
    near = {("f2.png", "f2_again.jpg"), ("f2_again.jpg", "sub/f2_third.jpg")}
    for a, b in near:  # the premise: copies near, different photos far
        assert (hash_image(root / a) != hash_image(root / b)).sum() <= DEFAULT_MAX_DISTANCE // 2
    assert (hash_image(root / "labelled_again.jpg") != hash_image(
        tiny_data / "train_images" / "c1_003.png")).sum() <= DEFAULT_MAX_DISTANCE // 2
    fresh = [root / f"f{i}.png" for i in range(6)]
    assert min((hash_image(a) != hash_image(b)).sum() for a in fresh for b in fresh if a != b) \
        > 2 * DEFAULT_MAX_DISTANCE
    fake = install_fake(monkeypatch, [root / "f2_again.jpg", root / "sub" / "f2_third.jpg",
                                      root / "labelled_again.jpg"])
    out = tmp_path / "to_label.csv"
    argv = ["select", "--run", str(run_dir), "--pool", str(root), "--budget", "100",
            "--strategy", "margin", "--out", str(out)]
    assert run_command(argv + ["--skip-near-duplicates"]) == 0
    assert sorted(pd.read_csv(out)["image_id"]) == [f"f{i}.png" for i in range(6)]
    assert "pool 9 images: 0 already labelled, 0 duplicates, 3 near-duplicates (within 24 bits), " \
           "6 candidates" in capsys.readouterr().out
    scored = [paths for kind, paths in fake.calls if kind.startswith("probs")]
    assert [len(paths) for paths in scored] == [6]
    # Without the flag the copies are candidates, and the fake model makes them the first picks.
    assert run_command(argv) == 0
    assert {"f2_again.jpg", "sub/f2_third.jpg", "labelled_again.jpg"} <= set(
        pd.read_csv(out)["image_id"].head(3))
    # At 0 bits the re-saved copies are no longer near-duplicates.
    assert run_command(argv + ["--skip-near-duplicates", "0"]) == 0
    assert len(pd.read_csv(out)) == 9
    with pytest.raises(DataError, match="--skip-near-duplicates 256 must be in 0 … 255 bits"):
        run_command(argv + ["--skip-near-duplicates", "256"])
