"""benchmarks/teachers.py end to end on a tiny generated set: every row trained, the table read
back from the run folders, the final line recomputed from the table, and a rerun that trains
nothing. The script's `mixcls` subprocesses run in this process (its `run` patched) to save the
~5 s start of each of its ~25 commands."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest

from conftest import add_test_split, final_figures, load_benchmark, write_tiny_dataset

ROWS = ["baseline", "pseudo_hard", "pseudo_soft", "pseudo_round2", "pseudo_blend_round2",
        "distill", "leaky_pseudo_hard", "leaky_distill"]


def _fashion_layout(root: Path) -> Path:
    """A `mixcls data fashion-mnist` layout of generated images: 3 classes x 110 training images
    (50 labelled + 60 unlabelled per class are drawn), 3 x 12 test images of another seed."""
    return add_test_split(write_tiny_dataset(root / "data", n_per_class=110, num_classes=3),
                          n_per_class=12, seed=7)


def _parse(out: str) -> tuple[pd.DataFrame, str, dict[str, float]]:
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["row", "cv"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("pseudo row chosen by CV:"):
            chosen = line.split(":")[1].split(";")[0].strip()
            break
        tokens = line.split()
        rows.append({"row": tokens[0], **{h: float(t) for h, t in zip(header[1:], tokens[1:])}})
    figures = final_figures(lines)
    return pd.DataFrame(rows).set_index("row"), chosen, {k: float(v) for k, v in figures.items()}


@pytest.mark.slow
def test_teachers_benchmark_rows_table_and_final_line(tmp_path, capsys, monkeypatch, one_thread):
    from mixcls.cli import main as mixcls_main
    from mixcls.runs import read_json

    teachers = load_benchmark("teachers")
    calls: list[str] = []

    def in_process(*args: str, threads: int, log: Path | None = None) -> None:
        calls.append(args[0])
        with contextlib.redirect_stdout(io.StringIO()) as said:  # the script logs, never prints it
            code = mixcls_main(list(args))
        if code != 0:
            raise SystemExit(f"mixcls {' '.join(args)} failed: {said.getvalue()}")

    monkeypatch.setattr(teachers, "run", in_process)
    data, work = _fashion_layout(tmp_path), tmp_path / "work"
    argv = ["--data", str(data), "--work", str(work), "--labelled", "150", "--unlabelled", "180",
            "--epochs", "2", "--rounds", "2", "--threshold", "0.0", "--max-per-class", "40",
            "--threads", "1"]  # 2 epochs learn little: every row passes, capped at 40 per class
    assert teachers.main(argv) == 0
    first = capsys.readouterr().out
    table, chosen, figures = _parse(first)
    assert list(table.index) == ROWS
    assert [calls.count(c) for c in ("train", "pseudo", "blend", "predict")] == [8, 5, 1, 8]

    labelled = pd.read_csv(work / "labelled.csv", dtype={"image_id": str})
    unlabelled = pd.read_csv(work / "unlabelled.csv", dtype={"image_id": str})
    assert len(labelled) == 150 and len(unlabelled) == 180
    assert not set(labelled["image_id"]) & set(unlabelled["image_id"])
    test = pd.read_csv(data / "test.csv")
    for name in ROWS:  # each figure read back from the run folder and its own predict output
        metrics = read_json(work / name / "metrics.json")
        assert table.loc[name, "cv"] == pytest.approx(100 * metrics["cv_accuracy"], abs=0.006)
        probs = pd.read_csv(work / f"test_{name}.csv")
        probs = probs.set_index("image_id").loc[test["image_id"], [f"prob_{k}" for k in range(3)]]
        accuracy = 100 * (probs.to_numpy().argmax(1) == test["label"].to_numpy()).mean()
        assert table.loc[name, "test"] == pytest.approx(accuracy, abs=0.006)
        used = sum(f["rows"] for f in metrics.get("pseudo", {}).get("folds", {}).values())
        assert table.loc[name, "pseudo_rows_per_fold"] == pytest.approx(used / 5, abs=0.006)
        assert (0 < used <= 5 * 3 * 40) if "pseudo" in name else used == 0

    # round 2 learns from the round-1 student with the better CV; the blend chain from both
    hard, soft = (table.loc[f"pseudo_{k}", "cv"] for k in ("hard", "soft"))
    expect = "pseudo_soft" if soft > hard else "pseudo_hard"
    assert Path(read_json(work / "table_pseudo_round2.csv.json")["teacher"]).name == expect
    assert read_json(work / "table_pseudo_round2.csv.json")["soft"] == (soft > hard)
    members = read_json(work / "teacher_blend_round2" / "blend.json")["members"]
    assert [m["name"] for m in members] == ["pseudo_hard", "pseudo_soft"]
    leaky = work / "leaky_teacher"  # every fold model of the leaky teacher saw every row
    full = (work / "baseline" / "full" / "best.pt").read_bytes()
    assert all((leaky / f"fold_{g}" / "best.pt").read_bytes() == full for g in range(5))
    assert Path(read_json(work / "table_leaky_pseudo_hard.csv.json")["teacher"]).name == "leaky_teacher"

    pseudo_rows = [r for r in ROWS if r.startswith("pseudo")]
    assert chosen == table.loc[pseudo_rows, "cv"].idxmax()
    honest = table.drop(index=["leaky_pseudo_hard", "leaky_distill"])
    expected = {
        "baseline": table.loc["baseline", "test"], "pseudo": table.loc[chosen, "test"],
        "distill": table.loc["distill", "test"],
        "pseudo_gain_points": table.loc[chosen, "test"] - table.loc["baseline", "test"],
        "max_cv_test_gap_points": (honest["cv"] - honest["test"]).abs().max(),
        "leaky_gap_points": (table["cv"] - table["test"])[["leaky_pseudo_hard", "leaky_distill"]].max(),
        "max_cv_single_test_gap_points": (honest["cv"] - honest["test_single"]).abs().max(),
    }
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, abs=0.011), key
    lines = first.strip().splitlines()  # the other rows' CV minus the chosen row's, paired
    start = next(i for i, x in enumerate(lines) if x.startswith("CV of each other per-fold row"))
    assert lines[start + 1].split() == ["row", "cv_diff_points", "paired_se_points", "rows"]
    leads = {t[0]: [float(v) for v in t[1:]] for t in map(str.split, lines[start + 2:-1])}
    assert sorted(leads) == sorted(r for r in honest.index if r != chosen)
    for name, (diff, se, rows) in leads.items():  # every OOF row is shared: CV minus CV
        assert diff == pytest.approx(table.loc[name, "cv"] - table.loc[chosen, "cv"], abs=0.011)
        assert rows == 150 and se >= 0

    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    calls.clear()
    assert teachers.main(argv) == 0  # a rerun: every run, table and prediction is cached
    assert capsys.readouterr().out == first
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_teachers_refuses_bad_sizes_before_any_work(tmp_path):
    teachers = load_benchmark("teachers")
    data = _fashion_layout(tmp_path)
    with pytest.raises(SystemExit, match="--labelled must be at least 1, got 0"):
        teachers.main(["--data", str(data), "--work", str(tmp_path / "w"), "--labelled", "0"])
    with pytest.raises(SystemExit, match="does not exist"):
        teachers.main(["--data", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_teachers_split_is_written_once_and_another_split_is_refused(tmp_path):
    """The runs cached in WORK were trained on WORK's split: a rerun with other sizes or seed
    must not silently reuse them."""
    teachers = load_benchmark("teachers")
    data, work = _fashion_layout(tmp_path), tmp_path / "work"
    sizes = teachers.Sizes(labelled=60, unlabelled=90, epochs=1)
    lab, unl = teachers.split_rows(data, work, sizes, seed=0)
    stamps = (lab.stat().st_mtime_ns, unl.stat().st_mtime_ns)
    assert teachers.split_rows(data, work, sizes, seed=0) == (lab, unl)
    assert (lab.stat().st_mtime_ns, unl.stat().st_mtime_ns) == stamps
    labelled = pd.read_csv(lab)
    assert len(labelled) == 60 and len(pd.read_csv(unl)) == 90
    with pytest.raises(SystemExit, match="labelled.csv holds another split"):
        teachers.split_rows(data, work, sizes, seed=1)
    with pytest.raises(SystemExit, match="labelled.csv holds another split"):
        teachers.split_rows(data, work, teachers.Sizes(61, 90, 1), seed=0)
    assert pd.read_csv(lab).equals(labelled)
