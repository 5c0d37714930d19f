"""mixcls export: the inference files of a run or blend, byte for byte, in a folder that can move."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
from mixcls.blend import predict_blend
from mixcls.cli import main
from mixcls.export import export_folder
from mixcls.predict import predict_run
from mixcls.pseudo import predict_teacher_folds
from mixcls.runs import RunError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Two runs on shared folds (the first with --full-fit), in folders both named "b4", and
    their weighted blend."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_dataset(root / "data", n_per_class=6)
    first, second = root / "a" / "b4", root / "b" / "b4"
    assert main(["train", "--data", str(data), "--out", str(first), *TINY_TRAIN_FLAGS,
                 "--folds", "2", "--full-fit", "--tta", "2"]) == 0
    assert main(["train", "--data", str(data), "--out", str(second), *TINY_TRAIN_FLAGS,
                 "--folds-from", str(first), "--seed", "3"]) == 0
    blend = root / "blend"
    assert main(["blend", str(first), str(second), "--out", str(blend), "--method", "weighted"]) == 0
    paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[:7]
    return root, first, second, blend, paths


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_run_exports_its_inference_files_and_predicts_the_same(runs, tmp_path):
    root, first, _, _, paths = runs
    result = export_folder(first, tmp_path / "out")
    assert _files(tmp_path / "out") == ["classes.json", "config.yaml", "dataset.json",
                                        "fold_0/best.pt", "fold_1/best.pt", "full/best.pt",
                                        "metrics.json"]
    assert result.files == 7 and result.bytes < result.source_bytes
    for name in ("fold_0/best.pt", "full/best.pt", "config.yaml"):
        assert (tmp_path / "out" / name).read_bytes() == (first / name).read_bytes()
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "out", moved)
    for models in ("folds", "all"):
        np.testing.assert_array_equal(predict_run(moved, paths, device="cpu", models=models),
                                      predict_run(first, paths, device="cpu", models=models))


def test_a_blend_exports_its_members_below_it_and_can_move(runs, tmp_path, capsys):
    root, first, second, blend, paths = runs
    export_folder(blend, tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "blend.json").read_text())
    # two members named b4: the second becomes b4_2
    assert [m["path"] for m in spec["members"]] == ["members/b4", "members/b4_2"]
    assert (tmp_path / "out" / "members" / "b4_2" / "fold_1" / "best.pt").read_bytes() == \
        (second / "fold_1" / "best.pt").read_bytes()
    assert not list((tmp_path / "out").rglob("last.pt")) and not list((tmp_path / "out").rglob("oof.csv"))
    moved = tmp_path / "kaggle" / "input"
    moved.parent.mkdir()
    shutil.move(tmp_path / "out", moved)
    np.testing.assert_array_equal(predict_blend(moved, paths, device="cpu"),
                                  predict_blend(blend, paths, device="cpu"))
    folds_moved, probs_moved = predict_teacher_folds(moved, paths, device="cpu")
    folds_there, probs_there = predict_teacher_folds(blend, paths, device="cpu")
    assert folds_moved == folds_there
    np.testing.assert_array_equal(probs_moved, probs_there)
    capsys.readouterr()
    assert main(["predict", "--run", str(moved), "--images", str(root / "data" / "train_images"),
                 "--out", str(tmp_path / "sub.csv")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {tmp_path / 'sub.csv'}: 18 rows; predicted in ")
    assert line.endswith(" images/s)")


def test_a_member_changed_since_blending_is_refused_and_nothing_is_written(runs, tmp_path):
    root, first, second, blend, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    spec = json.loads((copy / "blend" / "blend.json").read_text())
    for member, source in zip(spec["members"], ("a", "b")):
        member["path"] = str(copy / source / "b4")
    (copy / "blend" / "blend.json").write_text(json.dumps(spec))
    # another fold 1 model in the second member: bytes of the first member's
    shutil.copyfile(copy / "a" / "b4" / "fold_0" / "best.pt", copy / "b" / "b4" / "fold_1" / "best.pt")
    with pytest.raises(RunError, match=r"b/b4/fold_1/best\.pt differs from the one blended"):
        export_folder(copy / "blend", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_interrupted_copy_leaves_no_folder(runs, tmp_path, monkeypatch):
    _, first, _, _, _ = runs
    calls, real_copy = [], shutil.copyfile

    def failing(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, **kwargs)
    monkeypatch.setattr("mixcls.export.shutil.copyfile", failing)
    with pytest.raises(OSError):
        export_folder(first, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_targets_and_unfinished_runs_are_refused(runs, tmp_path, capsys):
    root, first, _, _, _ = runs
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "full")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["export", "--run", str(first), "--out", str(first / "exported")]) == 2
    assert "is inside" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(first, unfinished)
    for checkpoint in unfinished.glob("fold_*/best.pt"):
        checkpoint.unlink()
    assert main(["export", "--run", str(unfinished), "--out", str(tmp_path / "o")]) == 2
    assert "no fold_*/best.pt" in capsys.readouterr().err
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "ok")]) == 0
    assert "predict with: mixcls predict --run" in capsys.readouterr().out
