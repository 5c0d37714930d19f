"""Fuzzing `mixcls train` with broken competition folders: always one clear line, never a run.

Each case starts from a valid tiny folder (3 classes x 4 images, 16 px) and applies 1-3 random
defects drawn from DEFECTS. Every defect on its own makes the folder unusable, and the
generator keeps them unusable in combination (fresh label values, ids that exist nowhere), so
the only right answer is exit code 2 with `mixcls: error: ...` naming the table or images
folder, no traceback, and no --out folder. The base seed is drawn fresh on every run and printed
with any failure; `MIXCLS_FUZZ_SEED=<seed> pytest tests/test_fuzz.py` replays it.
"""

from __future__ import annotations

import os
import secrets
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_dataset
from mixcls.cli import main

N_CASES = 30
BASE_SEED = int(os.environ.get("MIXCLS_FUZZ_SEED") or secrets.randbits(32))
FLAGS = ["--epochs", "1", "--folds", "2", "--model", "test_resnet", "--img-size", "16",
         "--batch-size", "4", "--workers", "0", "--no-progress"]
UNICODE = "éß漢字🙂\u202e\u200bЖ\t\\\"',;"


def _text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(UNICODE + "abcXYZ019 .-_/"), size=n))


def _fresh_label(rng: np.random.Generator) -> str:
    """A label value no other row has: a class with one image can never be split in 2 folds."""
    kinds = [lambda: str(int(rng.integers(3, 10**6))) + "0" * int(rng.integers(0, 30)),
             lambda: "-" + str(int(rng.integers(1, 10**9))), lambda: f"{rng.random():.6f}",
             lambda: "1e" + str(int(rng.integers(300, 400))), lambda: _text(rng, 6) + "!",
             lambda: "", lambda: "0" + str(int(rng.integers(0, 3))),
             lambda: str(rng.choice(["nan", "NaN", "inf", "-inf", "None", "null", "True"]))
             + str(int(rng.integers(10**6)))]
    return kinds[int(rng.integers(len(kinds)))]()


def _missing_id(rng: np.random.Generator, frame: pd.DataFrame, row: int) -> str:
    """For `row`, an id no file answers to, that points outside the images folder, or that
    names another row's image in other words ('./a.png', 'a.png/')."""
    existing = str(rng.choice(frame["image_id"].drop(index=row)))
    kinds = [lambda: "", lambda: "   ", lambda: "../" + existing, lambda: "/etc/passwd",
             lambda: "/" + existing, lambda: existing + "\x00.png", lambda: _text(rng, 12) + ".png",
             lambda: "1e309", lambda: "nan", lambda: "x" * 300 + ".png", lambda: "a/../../" + existing,
             lambda: "./" + existing, lambda: existing + "/", lambda: "C:\\" + existing,
             lambda: existing.upper() if existing.upper() != existing else existing + "~"]
    return kinds[int(rng.integers(len(kinds)))]()


def _png_with_size(width: int, height: int) -> bytes:
    """A well-formed PNG that declares width x height pixels and holds almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


# Defects on the table (a DataFrame of strings) ---------------------------------------------

def bad_id(rng, frame, root):
    row = int(rng.integers(len(frame)))
    frame.loc[row, "image_id"] = _missing_id(rng, frame, row)


def bad_label(rng, frame, root):
    frame.loc[int(rng.integers(len(frame))), "label"] = _fresh_label(rng)


def one_class_only(rng, frame, root):
    frame["label"] = str(rng.choice(frame["label"]))


def duplicate_row(rng, frame, root):
    frame.loc[len(frame)] = frame.loc[int(rng.integers(len(frame)))]


def bad_fold_column(rng, frame, root):
    frame["fold"] = [str(i % 2) for i in range(len(frame))]
    frame.loc[int(rng.integers(len(frame))), "fold"] = str(rng.choice(
        ["x", "-2", "0.5", "1e400", "99999999999999999999", "", "２", "7", "nan"]))  # -1: train-only


def bad_keep_column(rng, frame, root):
    frame["keep"] = "1"
    frame.loc[int(rng.integers(len(frame))), "keep"] = str(rng.choice(["2", "yes", "-1", "", "0.5"]))


def bad_soft_targets(rng, frame, root):
    probs = rng.dirichlet(np.ones(3), size=len(frame))
    for k in range(3):
        frame[f"prob_{k}"] = [f"{p:.6f}" for p in probs[:, k]]
    row, col = int(rng.integers(len(frame))), f"prob_{int(rng.integers(3))}"
    frame.loc[row, col] = str(rng.choice(["-0.5", "abc", "", "1e400", "2"]))


def bad_label_given(rng, frame, root):
    frame["label_given"] = frame["label"]
    frame.loc[int(rng.integers(len(frame))), "label_given"] = _fresh_label(rng) or "?"


# Defects on the CSV file as written ---------------------------------------------------------

def renamed_column(rng, text, root):
    column = str(rng.choice(["image_id", "label"]))
    return text.replace(column, _text(rng, int(rng.integers(0, 8))) + column[:-1], 1)


def ragged_row(rng, text, root):
    return text + ",".join(_text(rng, 3) for _ in range(int(rng.integers(4, 9)))) + "\n"


def random_bytes_csv(rng, text, root):
    return rng.bytes(int(rng.integers(0, 400)))


def header_only(rng, text, root):
    return text.splitlines()[0] + "\n" if rng.random() < 0.5 else ""


def latin1_csv(rng, text, root):
    lines = (text.splitlines() or ["image_id,label"]) + ["x.png,0"]  # at least one row
    lines[1] = "é" + lines[1]  # an id that would not exist, in an encoding that is not UTF-8
    return "\n".join(lines).encode("latin-1", errors="replace")


# Defects on the image files -----------------------------------------------------------------

def _some_image(rng, root):
    files = sorted(p for p in (root / "train_images").iterdir() if p.is_file() and not p.is_symlink())
    return files[int(rng.integers(len(files)))]


def garbage_image(rng, root):
    head = b"\x89PNG\r\n\x1a\n" if rng.random() < 0.5 else b""
    _some_image(rng, root).write_bytes(head + rng.bytes(int(rng.integers(0, 2000))))


def truncated_image(rng, root):
    path = _some_image(rng, root)
    data = path.read_bytes()
    path.write_bytes(data[:int(rng.integers(8, len(data) // 2))])


def bomb_image(rng, root):
    side = int(rng.integers(50_000, 2**31 - 1))
    _some_image(rng, root).write_bytes(_png_with_size(side, side))


def image_is_a_folder(rng, root):
    path = _some_image(rng, root)
    path.unlink()
    path.mkdir()


def image_links_outside(rng, root):
    path = _some_image(rng, root)
    outside = root.parent / f"outside_{path.name}"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)


TABLE = [bad_id, bad_label, one_class_only, duplicate_row, bad_fold_column, bad_keep_column,
         bad_soft_targets, bad_label_given]
FILE = [renamed_column, ragged_row, random_bytes_csv, header_only, latin1_csv]
IMAGES = [garbage_image, truncated_image, bomb_image, image_is_a_folder, image_links_outside]
DEFECTS = TABLE + FILE + IMAGES


def make_broken_folder(seed: int, root: Path) -> list[str]:
    """Write a broken competition folder at `root`; return the names of its defects."""
    rng = np.random.default_rng(seed)
    write_tiny_dataset(root, n_per_class=4, size=16, seed=seed % 1000)
    frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    chosen = [DEFECTS[i] for i in rng.choice(len(DEFECTS), size=int(rng.integers(1, 4)), replace=False)]
    for defect in (d for d in chosen if d in TABLE):
        defect(rng, frame, root)
    text = frame.to_csv(index=False)
    for defect in (d for d in chosen if d in FILE):
        text = defect(rng, text, root) if isinstance(text, str) else text
    (root / "train.csv").write_bytes(text.encode() if isinstance(text, str) else text)
    for defect in (d for d in chosen if d in IMAGES):
        defect(rng, root)
    return [d.__name__ for d in chosen]


@pytest.mark.parametrize("case", range(N_CASES))
def test_broken_folder_gives_one_clear_error_and_no_output(case, tmp_path, capsys):
    seed = BASE_SEED + case
    root = tmp_path / "data"
    defects = make_broken_folder(seed, root)
    out = tmp_path / "run"
    replay = f"replay: MIXCLS_FUZZ_SEED={BASE_SEED} (case {case}, seed {seed}, defects {defects})"
    try:
        code = main(["train", "--data", str(root), "--out", str(out), *FLAGS])
    except BaseException as exc:  # a traceback is the failure this test looks for
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{replay}") from exc
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr {err!r}\n{replay}"
    assert err.startswith("mixcls: error: ") and "Traceback" not in err, f"{err!r}\n{replay}"
    assert str(root) in err, f"the message does not name the table or images folder: {err!r}\n{replay}"
    assert not out.exists(), f"{out} was created\n{replay}"


def test_every_defect_is_drawn_and_each_breaks_the_folder_alone(tmp_path, capsys):
    """Each defect alone is an error too (so a defect that stopped breaking would be noticed)."""
    for i, defect in enumerate(DEFECTS):
        rng = np.random.default_rng(BASE_SEED + 1000 + i)
        root = tmp_path / defect.__name__
        write_tiny_dataset(root, n_per_class=4, size=16, seed=i)
        frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
        if defect in TABLE:
            defect(rng, frame, root)
            frame.to_csv(root / "train.csv", index=False)
        elif defect in FILE:
            text = defect(rng, frame.to_csv(index=False), root)
            (root / "train.csv").write_bytes(text.encode() if isinstance(text, str) else text)
        else:
            defect(rng, root)
        out = tmp_path / f"run_{i}"
        code = main(["train", "--data", str(root), "--out", str(out), *FLAGS])
        err = capsys.readouterr().err
        assert code == 2 and str(root) in err and not out.exists(), \
            f"{defect.__name__}: exit {code}, {err!r}, replay MIXCLS_FUZZ_SEED={BASE_SEED}"
