"""`mixcls train --nproc 2` (torchrun, gloo on the CPU) against one process on the same data.

Single writer: every process of the job runs with a test-only sitecustomize.py on PYTHONPATH
whose audit hook (sys.addaudithook) logs each open / rename / remove / mkdir / listdir under
the run folder, per process and rank. The atomic writers create their temporary file with
os.open and publish it with os.replace, both audited, whatever then writes the bytes (torch's
C++ zip writer included). So the logs show who created, renamed or even looked at every file.

Same numbers: the model has no batch norm (test_efficientnet_gn, GroupNorm), so 2 ranks x
batch 4 do the arithmetic of 1 process x batch 8: EpochSampler gives step s of the two ranks
together the same 8 rows as step s of the single process (18 rows, 2 batches, the same 2 rows
dropped), each row's augmentation depends only on its seed, and DDP averages the two half-batch
mean gradients = the mean over 8. What differs is float32 summation order (all-reduce vs one
sum), ~1e-7 relative per step.

The two-rank run also recomputes its blocks in the backward pass (--grad-checkpointing, timm's
non-reentrant checkpointing under DDP), which must change none of the numbers. Both average
the weights of their last 2 epochs (--swa-epochs 2): every rank keeps the average, rank 0
alone writes it. Both take SAM's steps (--sam sam): the ranks climb along the all-reduced
gradient, so to the same w + e(w) as the single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.commands import train as train_command

pytestmark = pytest.mark.slow

EPOCHS = 3
FLAGS = ["--model", "test_efficientnet_gn", "--img-size", "16", "--folds", "2", "--epochs",
         str(EPOCHS), "--lr", "3e-3", "--swa-epochs", "2", "--sam", "sam", "--workers", "0",
         "--no-progress"]
# Rounding differences of ~1e-7 pass through 6 AdamW steps per fold; Adam divides by the root
# of the second moment, so a gradient component near zero can turn a 1e-7 difference into a
# larger relative one (measured: up to 4e-6 on a probability). 2e-4 leaves a 50x margin and is
# still far below a change that matters; predictions must agree where the top-2 margin > 1e-3.
PROB_ATOL = 2e-4

AUDIT_HOOK = textwrap.dedent('''
    import os, sys
    _run = os.environ.get("MIXCLS_AUDIT_RUN")
    if _run:
        _run = os.path.abspath(_run)
        _name = f"rank{os.environ.get('RANK', '-')}-pid{os.getpid()}.log"
        _fd = os.open(os.path.join(os.environ["MIXCLS_AUDIT_LOG"], _name),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _EVENTS = {"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.listdir",
                   "os.scandir", "os.truncate", "shutil.rmtree"}

        def _path(value):
            if isinstance(value, int) or value is None:
                return None
            return os.path.abspath(os.fsdecode(value))

        def _audit(event, args):
            if event not in _EVENTS or not args:
                return
            paths = [_path(a) for a in args[:2 if event == "os.rename" else 1]]
            if not any(p and (p == _run or p.startswith(_run + os.sep)) for p in paths):
                return
            detail = ""
            if event == "open":
                mode, flags = args[1], args[2]
                writes = (mode is not None and any(c in mode for c in "wax+")) or \\
                    (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                detail = "write" if writes else "read"
            os.write(_fd, ("\\t".join([event, detail] + [p or "" for p in paths]) + "\\n").encode())

        sys.addaudithook(_audit)
''')


def _events(log_dir: Path, run: Path) -> dict[str, list[list[str]]]:
    """Audit lines per rank ('0', '1', '-' for the launcher and torchrun's agent)."""
    out: dict[str, list[list[str]]] = {}
    for log in log_dir.glob("rank*.log"):
        rank = log.name[4:log.name.index("-pid")]
        lines = [line.split("\t") for line in log.read_text().splitlines()]
        out.setdefault(rank, []).extend(lines)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_tiny_dataset(root / "data", size=16)
    single = root / "single"
    assert main(["train", "--data", str(data), "--out", str(single), *FLAGS, "--batch-size", "8"]) == 0
    hook, logs, ddp = root / "hook", root / "audit", root / "ddp"
    hook.mkdir()
    logs.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    launched = []

    def call_and_capture(cmd, env):  # the launcher's subprocess.call, with the output kept
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        launched.append((cmd, done))
        return done.returncode

    with pytest.MonkeyPatch.context() as mp:  # the launcher runs here; torchrun's children inherit
        for name, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MIXCLS_AUDIT_RUN": str(ddp),
                            "MIXCLS_AUDIT_LOG": str(logs),
                            "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
                            }.items():
            mp.setenv(name, value)
        mp.setattr(train_command.subprocess, "call", call_and_capture)
        code = main(["train", "--nproc", "2", "--data", str(data), "--out", str(ddp), *FLAGS,
                     "--batch-size", "4", "--grad-checkpointing"])
    (cmd, done), = launched
    assert code == 0, done.stdout + done.stderr
    return single, ddp, _events(logs, ddp), cmd, done


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def test_launched_two_ranks_with_torchrun(runs):
    single, ddp, events, cmd, done = runs
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[cmd.index("-m", 3):][:3] == ["-m", "mixcls", "train"] and "--nproc" not in cmd
    assert set(events) >= {"0", "1", "-"}, "a process left no audit log: was the hook loaded?"
    assert json.loads((ddp / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((single / "metrics.json").read_text())["world_size"] == 1
    assert done.stdout.count("CV accuracy") == 1  # only rank 0 speaks


def test_run_folder_is_complete_and_written_once_by_rank_0(runs):
    single, ddp, events, _, _ = runs
    assert _files(ddp) == _files(single)
    assert not [f for f in _files(ddp) if f.endswith(".tmp")]
    others = {rank: lines for rank, lines in events.items() if rank != "0"}
    assert all(not lines for lines in others.values()), f"other processes touched the run: {others}"
    renames = Counter(Path(line[3]).relative_to(ddp).as_posix()
                      for line in events["0"] if line[0] == "os.rename")
    assert set(renames) == _files(ddp)  # every file was published by one atomic rename of rank 0
    once = ["config.yaml", "classes.json", "dataset.json", "folds.csv", "oof.csv", "metrics.json",
            "fold_0/oof.csv", "fold_1/oof.csv"]
    assert all(renames[name] == 1 for name in once), renames
    for fold in (0, 1):
        assert renames[f"fold_{fold}/last.pt"] == EPOCHS
        assert renames[f"fold_{fold}/history.csv"] == EPOCHS
        # the weights' average (--swa-epochs) is written once, when the fold ends
        assert renames[f"fold_{fold}/best.pt"] == renames[f"fold_{fold}/swa.json"] == 1
    created = [line for line in events["0"] if line[0] == "open" and line[1] == "write"]
    assert all(Path(line[2]).name.endswith(".tmp") or Path(line[2]).name == ".write_probe"
               for line in created), "a file was opened for writing in place, not atomically"


def test_two_ranks_compute_what_one_process_computes(runs):
    single, ddp, _, _, _ = runs
    a, b = pd.read_csv(single / "oof.csv"), pd.read_csv(ddp / "oof.csv")
    assert a[["image_id", "label", "fold"]].equals(b[["image_id", "label", "fold"]])
    probs = [f"prob_{k}" for k in range(3)]
    np.testing.assert_allclose(b[probs].to_numpy(), a[probs].to_numpy(), rtol=0, atol=PROB_ATOL)
    top2 = np.sort(a[probs].to_numpy(), axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert (a["pred"][clear] == b["pred"][clear]).all()
    metrics = [json.loads((p / "metrics.json").read_text()) for p in (single, ddp)]
    assert abs(metrics[0]["cv_accuracy"] - metrics[1]["cv_accuracy"]) <= (~clear).mean() + 1e-12
    for fold in (0, 1):  # the train loss is summed over both ranks' images: the whole epoch
        h = [pd.read_csv(p / f"fold_{fold}" / "history.csv") for p in (single, ddp)]
        np.testing.assert_allclose(h[1]["train_loss"], h[0]["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(h[1]["valid_loss"], h[0]["valid_loss"], rtol=1e-4)
        np.testing.assert_allclose(h[1]["lr"], h[0]["lr"], rtol=1e-12)


COLLECTIVES = textwrap.dedent('''
    import sys, tempfile
    import numpy as np, torch
    import torch.distributed as tdist
    import torch.multiprocessing as mp
    from mixcls import distributed as dist

    def rank_main(rank, world, init_file, seed):
        tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        rng = np.random.default_rng(seed)  # the same draws on every rank
        for n in (0, 1, 2, 5, 7, 8, int(rng.integers(9, 50))):
            full = rng.normal(size=(n, 3)).astype(np.float32)
            back = dist.gather_shards(full[dist.shard_indices(n)], n)
            assert back.shape == full.shape and np.array_equal(back, full), n
        assert dist.all_gather_floats([rank + 0.5, 10.0 * rank]) == [[r + 0.5, 10.0 * r] for r in range(world)]
        assert dist.all_reduce_sum([1.0, rank]) == [world, sum(range(world))]
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model(torch.randn(8, 3, 6, 6) + rank)  # each rank its own running statistics
        def gathered():
            parts = [torch.empty(4) for _ in range(world)]
            tdist.all_gather(parts, model[1].running_mean.clone())
            return parts
        assert not torch.equal(*gathered()[:2])
        expected = torch.stack(gathered()).mean(0)
        dist.average_running_stats(model)  # the mean over ranks, on every rank
        assert all(torch.allclose(p, expected, atol=1e-6) for p in gathered())
        model(torch.randn(8, 3, 6, 6) + rank)
        dist.broadcast_buffers(model)
        assert all(torch.equal(p, gathered()[0]) for p in gathered())
        def fails_on_rank_0():
            raise ValueError("bad table")
        try:
            dist.run_on_main(fails_on_rank_0)
        except ValueError as exc:
            assert str(exc) == "bad table"
        else:
            raise AssertionError(f"rank {rank} did not get rank 0's error")
        assert dist.run_on_main(lambda: {"from": tdist.get_rank()}) == {"from": 0}
        tdist.destroy_process_group()
        print(f"rank {rank} ok", flush=True)

    if __name__ == "__main__":
        mp.start_processes(rank_main, args=(2, tempfile.mktemp(), int(sys.argv[1])), nprocs=2,
                           start_method="fork")
''')


def test_collectives_on_two_gloo_ranks(tmp_path):
    """gather_shards inverts shard_indices; sums, gathers, buffers and errors reach every rank."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    seed = int(np.random.default_rng().integers(2**31))
    done = subprocess.run([sys.executable, str(script), str(seed)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout, \
        f"seed {seed}\n{done.stdout}\n{done.stderr}"
