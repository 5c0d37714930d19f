import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.data import DataError, load_train_table, read_image, seed_transform


def _train_cli(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), "--model", "test_resnet",
                 "--img-size", "16", "--epochs", "1", "--folds", "2", "--batch-size", "8",
                 "--workers", "0", "--no-progress", *extra])


def test_kaggle_layout_loads_with_class_names(tiny_data_named):
    table = load_train_table(tiny_data_named, n_folds=3)
    assert table.classes == ["disease_0", "disease_1", "disease_2"] and table.integer_labels
    assert len(table.frame) == 36 and table.labels.tolist() == sorted(table.labels.tolist())


def test_string_labels_csv_and_images_given_separately(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", string_labels=True)
    table = load_train_table(csv=root / "train.csv", images=root / "train_images")
    assert table.classes == ["class_0", "class_1", "class_2"] and not table.integer_labels


def test_class_per_folder_tree(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "tree" / name / "sub").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / name / "sub" / f"{i}.png")
    table = load_train_table(tmp_path / "tree")
    assert table.classes == ["cat", "dog"]
    assert table.frame["image_id"].iloc[0] == "cat/sub/0.png"


def _edit_csv(root, fn):
    frame = pd.read_csv(root / "train.csv", dtype=str)
    fn(frame).to_csv(root / "train.csv", index=False)


BAD_CASES = {
    "missing column": (lambda r: _edit_csv(r, lambda f: f.drop(columns="label")), ["missing column", "label"]),
    "duplicate ids": (lambda r: _edit_csv(r, lambda f: pd.concat([f, f.iloc[:2]])), ["duplicate image ids", "c0_000.png"]),
    "missing file": (lambda r: (r / "train_images" / "c1_003.png").unlink(), ["do not exist", "c1_003.png"]),
    "unreadable": (lambda r: (r / "train_images" / "c2_001.png").write_bytes(b"not an image"), ["cannot be decoded", "c2_001.png"]),
    "truncated": (lambda r: (r / "train_images" / "c0_004.png").write_bytes(
        (r / "train_images" / "c0_004.png").read_bytes()[:200]), ["cannot be decoded", "c0_004.png"]),
    "label outside list": (lambda r: (json.dump(["a", "b", "c"], open(r / "classes.json", "w")),
                                      _edit_csv(r, lambda f: f.assign(label=f["label"].replace("2", "7")))),
                           ["labels outside the class list", "'7'"]),
    "parent path": (lambda r: _edit_csv(r, lambda f: f.assign(image_id=f["image_id"].where(f.index != 3, "../x.png"))),
                    ["outside", "../x.png"]),
    "absolute path": (lambda r: _edit_csv(r, lambda f: f.assign(image_id=f["image_id"].where(f.index != 5, "/etc/passwd"))),
                      ["outside", "/etc/passwd"]),
    "empty csv": (lambda r: (r / "train.csv").write_text(""), ["empty"]),
    "header only": (lambda r: (r / "train.csv").write_text("image_id,label\n"), ["no rows"]),
    "small class": (lambda r: _edit_csv(r, lambda f: f[~f["image_id"].isin([f"c1_{i:03d}.png" for i in range(1, 12)])]),
                    ["fewer images than the 2 folds", "'1': 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_clear_error_and_writes_nothing(case, tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "data")
    damage, words = BAD_CASES[case]
    damage(root)
    out = tmp_path / "run"
    assert _train_cli(root, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcls: error:") and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_error_lists_first_20_and_a_count(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", n_per_class=10)
    for i in range(9):
        for c in range(3):
            (root / "train_images" / f"c{c}_{i:03d}.png").unlink()
    with pytest.raises(DataError) as info:
        load_train_table(root)
    text = str(info.value)
    assert "(27)" in text and "… and 7 more" in text and text.count("row ") == 20


def test_image_modes_become_8bit_rgb(tmp_path):
    rng = np.random.default_rng()
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), np.repeat(grey[:, :, None], 3, 2))
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])
    pal = Image.fromarray(rng.integers(0, 4, (5, 7), dtype=np.uint8), "P")
    palette = rng.integers(0, 256, 12).tolist()
    pal.putpalette(palette + [0] * (768 - 12))
    pal.save(tmp_path / "p.png")
    expected = np.array(palette).reshape(4, 3)[np.asarray(pal)]
    assert np.array_equal(read_image(tmp_path / "p.png"), expected)
    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert np.abs(out[:, :, 0].astype(int) - np.round(deep / 65535 * 255)).max() <= 1


def test_soft_targets_must_sum_to_one(tmp_path):
    root = write_tiny_dataset(tmp_path / "data")
    frame = pd.read_csv(root / "train.csv")
    for k in range(3):
        frame[f"prob_{k}"] = 1 / 3
    frame.loc[4, "prob_0"] = 0.9
    frame.to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"sum to 1[\s\S]*row 6"):
        load_train_table(root)


def test_hwc_collate_gives_default_collates_values_with_channels_last_strides():
    """collate_hwc (the loader of a CUDA device): the same batch as default_collate, laid out
    channels_last; prepared on the device it is the same normalised input, in either format."""
    import torch
    from torch.utils.data import default_collate

    from mixcls.engine import prepare_images
    from mixcls.sampling import collate_hwc, make_loader
    from mixcls.transforms import Normalizer, build_train_transform

    rng = np.random.default_rng(41)
    transform = build_train_transform("light", 20)
    items = []
    for i in range(5):
        seed_transform(transform, i)
        items.append((transform(image=rng.integers(0, 256, (30, 26, 3), dtype=np.uint8))["image"], i))
    ours, theirs = collate_hwc(items), default_collate(items)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert ours[0].is_contiguous(memory_format=torch.channels_last) and not ours[0].is_contiguous()
    normalizer = Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    cpu = torch.device("cpu")
    for channels_last in (False, True):
        a = prepare_images(ours[0], device=cpu, normalizer=normalizer, channels_last=channels_last)
        b = prepare_images(theirs[0], device=cpu, normalizer=normalizer, channels_last=channels_last)
        assert torch.equal(a, b)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert a.is_contiguous(memory_format=layout)
    # anything else is default_collate's
    floats = [(torch.rand(3, 4, 4), 0), (torch.rand(3, 4, 4), 1)]
    assert torch.equal(collate_hwc(floats)[0], default_collate(floats)[0])
    chosen = {kind: make_loader(items, batch_size=2, workers=0, sampler=None, drop_last=False,
                                device=torch.device(kind), seed=0).collate_fn for kind in ("cpu", "cuda")}
    assert chosen["cuda"].keywords == {"hwc": True} and chosen["cpu"].keywords == {"hwc": False}
    assert chosen["cuda"](items)[0].is_contiguous(memory_format=torch.channels_last)
    assert chosen["cpu"](items)[0].is_contiguous()
