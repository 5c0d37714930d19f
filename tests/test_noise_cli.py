"""`mixcls noise` and `mixcls clean` on a tiny run folder with planted label flips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mixcls.cli import main
from mixcls.noise import write_clean_table, write_suspects
from mixcls.config import dump_config, load_config
from mixcls.data import DataError, load_train_table
from mixcls.runs import RunError

CLASSES = ["red", "green", "blue"]
SUSPECT_COLUMNS = ["rank", "image_id", "fold", "given", "suggested", "label_given", "label_suggested",
                   "prob_given", "prob_suggested", "quality"]


@pytest.fixture
def run(tmp_path: Path, tiny_data: Path) -> dict:
    """A run folder as `mixcls train` leaves it (config, classes, folds, oof) on tiny_data, with
    OOF probabilities around each image's true class and 6 of the 36 given labels flipped."""
    rng = np.random.default_rng(31)
    table = pd.read_csv(tiny_data / "train.csv")
    true = table["label"].to_numpy()
    n, k = len(table), len(CLASSES)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=6, replace=False)] = True
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, k, size=flipped.sum())) % k
    alpha = np.ones((n, k))
    alpha[np.arange(n), true] = 12.0
    probs = np.stack([rng.dirichlet(a) for a in alpha])
    folds = np.arange(n) % 3
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config(overrides={"data": str(tiny_data)})))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    pd.DataFrame({"image_id": table["image_id"], "fold": folds}).to_csv(run_dir / "folds.csv", index=False)
    oof = pd.DataFrame({"image_id": table["image_id"], "label": given, "fold": folds,
                        "pred": probs.argmax(axis=1)})
    for c in range(k):
        oof[f"prob_{c}"] = probs[:, c]
    oof.to_csv(run_dir / "oof.csv", index=False)
    return {"dir": run_dir, "oof": oof, "flipped": flipped, "images": tiny_data / "train_images"}


def test_noise_command_writes_suspects_summary_and_gallery(run: dict, tmp_path: Path, capsys) -> None:
    out, gallery = tmp_path / "out" / "suspects.csv", tmp_path / "out" / "suspects.png"
    assert main(["noise", "--run", str(run["dir"]), "--out", str(out), "--gallery", str(gallery)]) == 0
    suspects = pd.read_csv(out)
    assert list(suspects.columns) == SUSPECT_COLUMNS
    assert suspects["rank"].tolist() == list(range(1, len(suspects) + 1))
    assert (suspects["given"] == [CLASSES[i] for i in suspects["label_given"]]).all()
    assert (suspects["suggested"] == [CLASSES[i] for i in suspects["label_suggested"]]).all()
    oof = run["oof"].set_index("image_id")
    assert (suspects["label_given"].to_numpy() == oof.loc[suspects["image_id"], "label"].to_numpy()).all()
    planted = set(run["oof"]["image_id"][run["flipped"]])
    assert len(planted & set(suspects["image_id"])) >= 5  # of 6, with a confident OOF model
    assert set(suspects["image_id"].head(5)) <= planted
    printed = capsys.readouterr().out
    assert f"suspects: {len(suspects)} of 36 rows" in printed
    assert "noise matrix" in printed and all(name in printed for name in CLASSES)
    with Image.open(gallery) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 200 and height > 150
    assert pixels.std() > 10  # the images are drawn, not a blank canvas


def test_max_rows_keeps_the_worst(run: dict, tmp_path: Path) -> None:
    full = write_suspects(run["dir"], tmp_path / "all.csv")
    short = write_suspects(run["dir"], tmp_path / "two.csv", max_rows=2)
    written = pd.read_csv(tmp_path / "two.csv")
    assert len(written) == 2 and short.n_suspects == full.n_suspects
    assert written["image_id"].tolist() == full.suspects["image_id"].head(2).tolist()


@pytest.mark.parametrize("policy", ["drop", "relabel", "soft"])
def test_clean_command_writes_a_table_the_loader_reads(run: dict, tmp_path: Path, policy: str) -> None:
    out = tmp_path / f"clean_{policy}.csv"
    assert main(["clean", "--run", str(run["dir"]), "--policy", policy, "--out", str(out),
                 "--max-fraction", "0.5"]) == 0
    written = pd.read_csv(out)
    expected = ["image_id", "label", "label_given", "fold", "keep"]
    if policy == "soft":
        expected += ["prob_0", "prob_1", "prob_2"]
    assert list(written.columns) == expected
    oof = run["oof"]
    assert written["image_id"].tolist() == oof["image_id"].tolist()
    assert written["label_given"].tolist() == [CLASSES[i] for i in oof["label"]]
    folds = pd.read_csv(run["dir"] / "folds.csv")
    assert written["fold"].tolist() == folds["fold"].tolist()
    acted = (written["keep"] == 0) | (written["label"] != written["label_given"])
    if policy == "soft":
        acted |= written[["prob_0", "prob_1", "prob_2"]].max(axis=1) < 1
    assert 0 < acted.sum() <= 18
    # The lead's loader reads it back with the run's classes: given labels and folds intact.
    table = load_train_table(csv=out, images=run["images"], classes=CLASSES, check_images="header")
    assert table.frame["label_given"].tolist() == oof["label"].tolist()
    assert table.frame["fold"].tolist() == oof["fold"].tolist()
    if policy == "soft":
        np.testing.assert_allclose(table.soft_targets.sum(axis=1), 1.0, rtol=1e-6)


def _no_outputs(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_missing_oof_is_a_clear_error_and_writes_nothing(run: dict, tmp_path: Path, capsys) -> None:
    (run["dir"] / "oof.csv").unlink()
    out = tmp_path / "out"
    assert main(["noise", "--run", str(run["dir"]), "--out", str(out / "s.csv")]) == 2
    assert "oof.csv does not exist" in capsys.readouterr().err
    with pytest.raises(RunError, match="oof.csv does not exist"):
        write_clean_table(run["dir"], out / "c.csv", policy="drop")
    assert _no_outputs(out)


def test_wrong_columns_and_class_mismatch_write_nothing(run: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    run["oof"].drop(columns="prob_2").to_csv(run["dir"] / "oof.csv", index=False)
    with pytest.raises(DataError, match=r"oof\.csv.*probability columns.*3 classes"):
        write_suspects(run["dir"], out / "s.csv")
    run["oof"].drop(columns="label").to_csv(run["dir"] / "oof.csv", index=False)
    with pytest.raises(DataError, match="missing column.*label"):
        write_clean_table(run["dir"], out / "c.csv", policy="soft")
    run["oof"].to_csv(run["dir"] / "oof.csv", index=False)
    (run["dir"] / "classes.json").write_text(json.dumps(CLASSES + ["yellow"]))
    assert main(["clean", "--run", str(run["dir"]), "--policy", "drop", "--out", str(out / "c.csv")]) == 2
    assert "do not match the 4 classes" in capsys.readouterr().err
    assert _no_outputs(out)


def test_gallery_with_missing_images_writes_nothing(run: dict, tmp_path: Path) -> None:
    suspects = write_suspects(run["dir"], tmp_path / "first.csv").suspects
    (run["images"] / suspects["image_id"].iloc[0]).unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="gallery: 1 image"):
        write_suspects(run["dir"], out / "s.csv", gallery=out / "g.png")
    assert _no_outputs(out)


def test_clean_checks_folds_against_the_run(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    folds = pd.read_csv(run["dir"] / "folds.csv")
    folds.loc[4, "fold"] = (folds.loc[4, "fold"] + 1) % 3
    folds.to_csv(run["dir"] / "folds.csv", index=False)
    with pytest.raises(DataError, match="folds disagree with oof.csv.*c0_004"):
        write_clean_table(run["dir"], out / "c.csv", policy="relabel")
    # A run that trained only some folds has OOF rows for those only: refuse, do not drop rows.
    run["oof"][["image_id", "fold"]].to_csv(run["dir"] / "folds.csv", index=False)
    run["oof"][run["oof"]["fold"] != 2].to_csv(run["dir"] / "oof.csv", index=False)
    with pytest.raises(DataError, match="12 of 36 images have no OOF probabilities"):
        write_clean_table(run["dir"], out / "c.csv", policy="relabel")
    run["oof"].to_csv(run["dir"] / "oof.csv", index=False)
    with pytest.raises(ValueError, match="threshold 1.5"):
        write_clean_table(run["dir"], out / "c.csv", policy="drop", threshold=1.5)
    assert _no_outputs(out)


def test_a_clean_run_gives_an_empty_table_and_a_gallery_saying_so(run: dict, tmp_path: Path,
                                                                  capsys) -> None:
    oof = run["oof"].copy()
    probs = np.full((len(oof), 3), 0.02)
    probs[np.arange(len(oof)), oof["label"]] = 0.96
    oof[["prob_0", "prob_1", "prob_2"]] = probs
    oof.to_csv(run["dir"] / "oof.csv", index=False)
    out, gallery = tmp_path / "s.csv", tmp_path / "g.png"
    assert main(["noise", "--run", str(run["dir"]), "--out", str(out), "--gallery", str(gallery)]) == 0
    assert list(pd.read_csv(out).columns) == SUSPECT_COLUMNS and len(pd.read_csv(out)) == 0
    assert "suspects: 0 of 36 rows" in capsys.readouterr().out
    with Image.open(gallery) as image:
        assert image.size[0] > 50
    assert main(["clean", "--run", str(run["dir"]), "--policy", "drop", "--out", str(tmp_path / "c.csv")]) == 0
    cleaned = pd.read_csv(tmp_path / "c.csv")
    assert (cleaned["keep"] == 1).all() and (cleaned["label"] == cleaned["label_given"]).all()


def test_gallery_of_an_unknown_format_writes_nothing(run: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gallery .*\.xyz: use one of the suffixes.*\.png"):
        write_suspects(run["dir"], tmp_path / "out" / "s.csv", gallery=tmp_path / "out" / "g.xyz")
    assert _no_outputs(tmp_path / "out")
