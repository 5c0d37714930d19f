"""A `mixcls train` killed with SIGKILL and resumed gives the run an unbroken one gives.

The killed processes are real `python -m mixcls train` subprocesses. Each is killed at an exact
point by an audit hook that a sitecustomize.py (on PYTHONPATH, test-only) installs: at the N-th
rename onto `fold_K/last.pt` the process sends itself SIGKILL, *before* the rename, so the
checkpoint it was about to publish is left behind as a `.last.pt.*.tmp` file and the previous
one is what --resume finds. SIGKILL cannot be caught: no cleanup code runs, as in an OOM kill.

The comparison with an unbroken run (made in this process, like the last resume) is exact:
bitwise equal OOF probabilities, metrics, history and weights, except wall-clock fields. Every
generator is re-seeded from (seed, fold, epoch) at an epoch start or restored from the step
checkpoint, each image's augmentation depends only on (seed, fold, epoch, row), and all runs
use one intra-op thread, so float reductions happen in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.runs import load_checkpoint

pytestmark = pytest.mark.slow

# 36 images, 2 folds: 18 training rows per fold, batch 4 -> 4 batches (drop_last); with
# --save-every-steps 1 each epoch renames last.pt after batches 1, 2, 3 and at its end.
# Dropout, mixup and EMA make the torch RNG, the mixing generator and the EMA weights matter;
# --augment-on-device: the light preset's crop and flip are drawn in the loader from the item seeds
# and its brightness/contrast from the mixing generator (as --colour-on-device does), and all
# run on the batch in the step. --sam asam: its second pass draws dropout masks of its own.
FLAGS = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "4", "--folds", "2",
         "--epochs", "2", "--lr", "3e-3", "--drop-rate", "0.3", "--drop-path-rate", "0.2", "--mix",
         "mixup", "--ema", "--sam", "asam",
         "--ema-decay", "0.5", "--scheduler", "cosine", "--augment-on-device", "--no-progress"]
WALL_CLOCK = ["seconds", "images_per_s"]

KILL_HOOK = textwrap.dedent('''
    import os, signal, sys
    _spec = os.environ.get("MIXCLS_TEST_KILL_AT_RENAME")
    if _spec:
        _suffix, _nth = _spec.rsplit(":", 1)
        _seen = [0]

        def _kill_before_rename(event, args):
            if event == "os.rename" and os.fsdecode(args[1]).endswith(_suffix):
                _seen[0] += 1
                if _seen[0] == int(_nth):
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(_kill_before_rename)
''')


@contextmanager
def one_thread():
    """In-process runs use one intra-op thread, like the OMP_NUM_THREADS=1 subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_tiny_dataset(root / "data", size=16)
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)
    reference = root / "reference"  # unbroken, in this process (only killed runs need their own)
    with one_thread():
        assert main(["train", "--data", str(data), "--out", str(reference), "--workers", "0", *FLAGS]) == 0
    return root, data, hook_dir, reference


def _train(args: list[str], hook_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]))
    env.pop("MIXCLS_TEST_KILL_AT_RENAME", None)
    if kill_at:
        env["MIXCLS_TEST_KILL_AT_RENAME"] = kill_at
    return subprocess.run([sys.executable, "-m", "mixcls", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _resume(run: Path, hook_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    # workers 2 (persistent): the resumed epoch's skip and the next epoch's reset go through
    # the sampler in the main process; the reference used 0 workers.
    return _train(["--resume", str(run), "--workers", "2", "--no-progress"], hook_dir, kill_at)


def _where(run: Path, fold: int) -> tuple[int, int]:
    ckpt = load_checkpoint(run / f"fold_{fold}" / "last.pt")
    return ckpt["epoch"], ckpt["batch"]


def _assert_same_run(run: Path, reference: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_csv(run / "oof.csv"), pd.read_csv(reference / "oof.csv"),
                                  check_exact=True)
    metrics, expected = (json.loads((p / "metrics.json").read_text()) for p in (run, reference))
    for m in (metrics, expected):
        m.pop("seconds")
    assert metrics == expected
    for fold in (0, 1):
        a, b = (pd.read_csv(p / f"fold_{fold}" / "history.csv").drop(columns=WALL_CLOCK)
                for p in (run, reference))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        for name in ("best.pt", "last.pt"):
            got, want = (load_checkpoint(p / f"fold_{fold}" / name)["model"] for p in (run, reference))
            assert all(torch.equal(got[k], want[k]) for k in want), f"fold {fold} {name} weights differ"
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"


def test_killed_mid_epoch_then_between_epochs_of_a_later_fold_resumes_exactly(setup, capsys):
    root, data, hook_dir, reference = setup
    run = root / "killed"
    # 1. killed while publishing fold 0's 7th checkpoint (epoch 2 after batch 3): the 6th, made
    #    after 2 of epoch 2's 4 batches, is what survives -> a resume in the middle of an epoch.
    first = _train(["--data", str(data), "--out", str(run), "--workers", "0", *FLAGS,
                    "--save-every-steps", "1"], hook_dir, kill_at="fold_0/last.pt:7")
    assert first.returncode == -9, first.stderr
    assert _where(run, 0) == (1, 2)
    ckpt = load_checkpoint(run / "fold_0" / "last.pt")
    assert ckpt["epoch_stats"]["rank_sums"][0][2] == 2 * 4 and ckpt["epoch_stats"]["steps"] == 2
    assert list((run / "fold_0").glob(".last.pt.*.tmp")), "the killed write should leave its .tmp"
    assert not (run / "fold_0" / "oof.csv").exists()
    # 2. resumed (skips 2 batches = 8 rows of epoch 2), finishes fold 0, then is killed while
    #    publishing fold 1's 5th checkpoint: the 4th, from the end of epoch 1, survives.
    second = _resume(run, hook_dir, kill_at="fold_1/last.pt:5")
    assert second.returncode == -9, second.stderr
    assert "fold 0: resuming at epoch 2, batch 2 of 4" in second.stdout
    assert (run / "fold_0" / "oof.csv").is_file() and _where(run, 1) == (1, 0)
    assert not list((run / "fold_0").glob("*.tmp")), "the resume should remove stale temporaries"
    fold_0 = {p.name: p.read_bytes() for p in (run / "fold_0").iterdir()}
    # 3. resumed to the end (in this process; nothing kills it): fold 0 is not trained again.
    capsys.readouterr()
    with one_thread():
        assert main(["train", "--resume", str(run), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fold 0: already finished, skipped" in out
    assert "fold 1: resuming at epoch 2, batch 0 of 4" in out
    assert {p.name: p.read_bytes() for p in (run / "fold_0").iterdir()} == fold_0
    _assert_same_run(run, reference)


def test_resume_refuses_changed_options_other_data_and_a_foreign_folder(setup, tmp_path, capsys):
    root, data, hook_dir, reference = setup
    assert main(["train", "--resume", str(reference), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    # The same run folder over a table whose rows changed: refused before any training.
    other = write_tiny_dataset(tmp_path / "other", size=16, n_per_class=11)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = (run / "config.yaml").read_text().replace(str(data), str(other))
    (run / "config.yaml").write_text(config)
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--resume", str(run), "--workers", "0"]) == 2
    assert "the data changed since the run started" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before
