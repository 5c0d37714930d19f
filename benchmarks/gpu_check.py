"""One prepared device check: fp16 + GradScaler + channels_last training on CUDA, then DDP over nccl.

Run on a machine with CUDA (takes a few minutes, most of it imports and process start-up):

    python benchmarks/gpu_check.py                    # resnet18, 128 px, 2,048 generated images
    python benchmarks/gpu_check.py --smoke-cpu        # the same steps, tiny, on the CPU (gloo, fp32)

Steps:
1. `fit_folds` on generated images for 1 epoch of 1 fold with --amp fp16 (a GradScaler) and
   --channels-last: train images/s (from history.csv), peak GPU memory, whether every loss
   was finite and the scaler's final scale.
2. The cassava preset three times, the same run otherwise: its colour steps in the loader, then
   on the device (--colour-on-device), then the whole preset on the device (--augment-on-device):
   train images/s of each, what moving them to the GPU gives. Then the device half of
   --augment-on-device alone (mixcls.device_augment: warp, colour, cutout) on batches of 32
   800x600 sources to 512 px, Cassava's case: images/s on the GPU, synchronised timing.
3. `mixcls tta` on step 1's run, on the device under its AMP: fold 0's validation rows under
   4 views at the training size and 1.25 times it (images/s of the re-scoring, and how far the
   training setting scored again lies from oof.csv), then `mixcls export` of the run and a
   prediction from the export, which must equal the run's own exactly.
4. The step-1 run again with --grad-checkpointing: train images/s and peak GPU memory beside
   step 1's (what recomputing the blocks costs and saves at this size), and its valid accuracy.
5. The step-1 run again with --sam sam (two passes per step, fp16 GradScaler between them):
   train images/s, peak GPU memory, whether every loss was finite.
6. DDP: with 2 or more GPUs, `mixcls train --nproc 2 --sync-bn --swa-epochs 1` (torchrun, nccl;
   the fold's model then has its BatchNorm statistics measured by both ranks); with one GPU,
   NCCL refuses two ranks on one device, so it probes nccl with 2 processes on that GPU and
   reports the refusal, then checks a 1-rank nccl all_reduce.

Prints a table, then one line of name=value pairs. Without CUDA (and no --smoke-cpu) it says so
and exits 0 without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

NCCL_PROBE = textwrap.dedent('''
    import os, torch, torch.distributed as dist
    torch.cuda.set_device(0)  # every rank on the one GPU
    dist.init_process_group("nccl")
    x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    expected = sum(range(1, dist.get_world_size() + 1))
    assert x.eq(expected).all().item(), x
    print("nccl all_reduce ok", dist.get_world_size(), "rank(s)")
    dist.destroy_process_group()
''')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--images", type=int, default=2048, help="generated images (half train one fold)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--timeout", type=int, default=300, help="seconds for each DDP subprocess")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run every step on the CPU with tiny settings (bf16, gloo): checks the script")
    return p.parse_args()


def write_images(root: Path, n: int, size: int, num_classes: int = 4, seed: int = 0) -> Path:
    """n PNGs in the Kaggle layout, each class a colour plus noise (so the loss can fall)."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True)
    colours = rng.integers(30, 225, size=(num_classes, 3))
    rows = []
    for i in range(n):
        label = i % num_classes
        pixels = colours[label] + rng.normal(0, 40, size=(size, size, 3))
        name = f"{i:05d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "train_images" / name)
        rows.append({"image_id": name, "label": label})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def settings(args: argparse.Namespace) -> dict:
    if args.smoke_cpu:
        # fp32: CPU bf16 backward kernels differ by CPU, and on some (a CI machine, 2026-12-07)
        # every step of a cassava-preset run at this size had non-finite gradients for a finite
        # loss; the smoke checks the script's steps, not a CPU's bf16 numerics.
        return {"model": "test_resnet", "img_size": 16, "batch_size": 8, "workers": 0, "amp": "none",
                "device": "cpu", "channels_last": True}
    return {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
            "workers": args.workers, "amp": "fp16", "device": "cuda", "channels_last": True}


def single_device_run(data: Path, run: Path, opts: dict) -> dict:
    """1 epoch of fold 0 in this process; what it measured."""
    from mixcls.config import load_config
    from mixcls.runs import load_checkpoint
    from mixcls.train import fit_folds

    cfg = load_config(None, dict(opts, data=str(data), epochs=1, folds=2, train_folds="0", lr=1e-3,
                                 cache_images="yes"))
    cuda = opts["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    fit_folds(cfg, run, progress=False, log=lambda message: None)
    history = pd.read_csv(run / "fold_0" / "history.csv")
    scaler = load_checkpoint(run / "fold_0" / "last.pt").get("scaler")
    return {"seconds": time.perf_counter() - started,
            "train_images_per_s": float(history["images_per_s"].iloc[-1]),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
            "loss_finite": bool(np.isfinite(history[["train_loss", "valid_loss"]].to_numpy()).all()),
            "grad_scale": float(scaler["scale"]) if scaler else float("nan"),
            "valid_accuracy": float(history["valid_accuracy"].iloc[-1])}


def tta_and_export(run: Path, out: Path, opts: dict) -> dict:
    """`mixcls tta`'s re-scoring of fold 0 on the device, then predict from `mixcls export`."""
    from mixcls.data import prob_columns
    from mixcls.export import export_folder
    from mixcls.predict import predict_run
    from mixcls.tta import make_settings, score_run_settings

    size = opts["img_size"]
    settings = make_settings([round(size * 1.25)], [1, 2, 3, 4],
                             ["orig", "hflip", "vflip", "transpose"], train_size=size)
    started = time.perf_counter()
    grid = score_run_settings(run, settings, device=opts["device"], amp=opts["amp"],
                              batch_size=opts["batch_size"], workers=opts["workers"])
    seconds = time.perf_counter() - started
    forwards = len(grid.image_ids) * 8  # 4 views at each of 2 sizes
    export_folder(run, out)
    oof = pd.read_csv(run / "oof.csv")
    paths = [str(Path(json.loads((run / "dataset.json").read_text())["images"]) / i)
             for i in oof["image_id"][:64]]
    same = np.array_equal(predict_run(out, paths, device=opts["device"], amp=opts["amp"]),
                          predict_run(run, paths, device=opts["device"], amp=opts["amp"]))
    return {"images_per_s": forwards / seconds, "seconds": seconds,
            "max_diff": float(np.abs(grid.probs[0] - oof[prob_columns(grid.probs.shape[2])]
                                     .to_numpy()).max()),
            "export_same": bool(same)}


def device_augment_ips(device: str, *, batch: int = 32, img_size: int = 512,
                       source: tuple[int, int] = (800, 600), repeats: int = 20) -> float:
    """Images/s of --augment-on-device's device step (cassava preset) on `device`: uint8
    sources of `source` (width, height) with plans drawn by the loader's half, the median of
    `repeats` batches, each timed to its end (torch.cuda.synchronize)."""
    from mixcls.device_augment import WarpBatch, build_augment_on_device

    plan, augment = build_augment_on_device("cassava", img_size)
    width, height = source
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    items = [plan(image=image) for _ in range(batch)]
    images = torch.stack([item["image"] for item in items]).to(device)
    plans = torch.stack([item["plan"] for item in items])
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 2):  # two warm-up batches
        sync()
        start = time.perf_counter()
        augment(WarpBatch(images, plans), generator)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def ddp_run(data: Path, run: Path, opts: dict, timeout: int) -> dict:
    """`mixcls train --nproc 2` (nccl on CUDA with --sync-bn, gloo on the CPU)."""
    cmd = [sys.executable, "-m", "mixcls", "train", "--nproc", "2", "--data", str(data), "--out", str(run),
           "--epochs", "1", "--folds", "2", "--train-folds", "0", "--no-progress",
           "--cache-images", "yes", "--swa-epochs", "1"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    if opts["device"] == "cuda":
        cmd.append("--sync-bn")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"timed out after {timeout}s"}
    if done.returncode != 0:
        return {"ok": False, "reason": _last_error(done.stdout + done.stderr)}
    metrics = json.loads((run / "metrics.json").read_text())
    history = pd.read_csv(run / "fold_0" / "history.csv")
    swa = run / "fold_0" / "swa.json"
    swa_ok = swa.is_file() and math.isfinite(json.loads(swa.read_text())["valid_accuracy"])
    return {"ok": metrics.get("world_size") == 2, "seconds": time.perf_counter() - started,
            "swa_ok": swa_ok,
            "train_images_per_s": float(history["images_per_s"].iloc[-1]),
            "loss_finite": bool(np.isfinite(history["train_loss"]).all()),
            "reason": "" if metrics.get("world_size") == 2 else f"world_size {metrics.get('world_size')}"}


def nccl_probe(nproc: int, timeout: int) -> dict:
    """torchrun a bare nccl all_reduce with `nproc` ranks on GPU 0."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(NCCL_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           handle.name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"timed out after {timeout}s"}
    finally:
        os.unlink(handle.name)
    ok = done.returncode == 0 and "nccl all_reduce ok" in done.stdout
    return {"ok": ok, "reason": "" if ok else _last_error(done.stdout + done.stderr)}


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "no output")[:160]


def run_steps(args: argparse.Namespace, opts: dict, gpus: int) -> dict:
    """Every step on generated images in a temporary folder: the runs' results by name."""
    n_images = 64 if args.smoke_cpu else args.images
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        data = write_images(Path(tmp) / "data", n_images, opts["img_size"])
        single = single_device_run(data, Path(tmp) / "single", opts)
        tta = tta_and_export(Path(tmp) / "single", Path(tmp) / "exported", opts)
        checkpointed = single_device_run(data, Path(tmp) / "checkpointed",
                                         dict(opts, grad_checkpointing=True))
        sam = single_device_run(data, Path(tmp) / "sam", dict(opts, sam="sam"))
        cassava = {where: single_device_run(data, Path(tmp) / f"cassava_{where}",
                                            dict(opts, preset="cassava", colour_on_device=where == "device",
                                                 augment_on_device=where == "augment"))
                   for where in ("loader", "device", "augment")}
        warp_case = dict(batch=4, img_size=64, source=(100, 75)) if args.smoke_cpu else {}
        warp_ips = device_augment_ips(opts["device"], **warp_case)
        warp_case = {**dict(img_size=512, source=(800, 600)), **warp_case}
        if args.smoke_cpu or gpus >= 2:
            ddp = ddp_run(data, Path(tmp) / "ddp", opts, args.timeout)
            two_on_one = {"ok": False, "reason": "not tried"}
            one_rank = {"ok": None, "reason": "not needed"}
        else:
            ddp = {"ok": False, "reason": "one GPU: mixcls gives each rank its own device"}
            two_on_one = nccl_probe(2, args.timeout)
            one_rank = nccl_probe(1, args.timeout)
    return dict(single=single, tta=tta, checkpointed=checkpointed, sam=sam, cassava=cassava, warp_case=warp_case, warp_ips=warp_ips,
                ddp=ddp, two_on_one=two_on_one, one_rank=one_rank)


def table_rows(r: dict, opts: dict, device: str, gpus: int) -> list[tuple[str, object]]:
    """The printed table: (what, value) per line."""
    single, cassava, ddp, warp_case = r["single"], r["cassava"], r["ddp"], r["warp_case"]
    return [("device", device), ("gpus", gpus),
            ("model / img / batch", f"{opts['model']} / {opts['img_size']} / {opts['batch_size']}"),
            ("amp / channels_last", f"{opts['amp']} / {opts['channels_last']}"),
            ("single: train images/s", f"{single['train_images_per_s']:.1f}"),
            ("single: peak GPU MiB", f"{single['peak_gpu_mib']:.0f}"),
            ("single: losses finite", single["loss_finite"]),
            ("single: final grad scale", single["grad_scale"]),
            ("single: valid accuracy", f"{single['valid_accuracy']:.3f}"),
            ("tta: re-scoring images/s (8 forwards per row)", f"{r['tta']['images_per_s']:.1f}"),
            ("tta: training setting vs oof.csv, max |diff|", f"{r['tta']['max_diff']:.2e}"),
            ("export: predicts exactly as the run", r["tta"]["export_same"]),
            ("grad checkpointing: train images/s", f"{r['checkpointed']['train_images_per_s']:.1f}"),
            ("grad checkpointing: peak GPU MiB", f"{r['checkpointed']['peak_gpu_mib']:.0f}"),
            ("grad checkpointing: valid accuracy", f"{r['checkpointed']['valid_accuracy']:.3f}"),
            ("sam: train images/s", f"{r['sam']['train_images_per_s']:.1f}"),
            ("sam: peak GPU MiB", f"{r['sam']['peak_gpu_mib']:.0f}"),
            ("sam: losses finite", r["sam"]["loss_finite"]),
            ("cassava, colour in loader: images/s", f"{cassava['loader']['train_images_per_s']:.1f}"),
            ("cassava, colour on device: images/s", f"{cassava['device']['train_images_per_s']:.1f}"),
            ("cassava, all augmentation on device: images/s", f"{cassava['augment']['train_images_per_s']:.1f}"),
            (f"device augment alone, {warp_case['source'][0]}x{warp_case['source'][1]} -> "
             f"{warp_case['img_size']}: images/s", f"{r['warp_ips']:.1f}"),
            ("ddp 2 ranks: ok", ddp["ok"]),
            ("ddp 2 ranks: images/s", f"{ddp.get('train_images_per_s', float('nan')):.1f}"),
            ("ddp 2 ranks: SWA model validated", ddp.get("swa_ok", False)),
            ("ddp: reason", ddp.get("reason", "")),
            ("nccl 2 ranks on 1 GPU", f"{r['two_on_one']['ok']} {r['two_on_one']['reason']}".strip()),
            ("nccl 1 rank all_reduce", f"{r['one_rank']['ok']} {r['one_rank']['reason']}".strip())]


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); nothing measured. Run it on a CUDA machine, or "
              "with --smoke-cpu to check the script on the CPU.")
        print("cuda=none")
        return 0
    opts = settings(args)
    gpus = torch.cuda.device_count() if opts["device"] == "cuda" else 0
    r = run_steps(args, opts, gpus)
    single, cassava, ddp = r["single"], r["cassava"], r["ddp"]
    device = torch.cuda.get_device_name(0) if opts["device"] == "cuda" else "cpu (smoke)"
    rows = table_rows(r, opts, device, gpus)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    nccl_ok = ddp["ok"] if gpus >= 2 else r["one_rank"]["ok"]
    fp16_finite = single["loss_finite"] and (args.smoke_cpu or math.isfinite(single["grad_scale"]))
    print(f"device={device.replace(' ', '_')} images_per_s={single['train_images_per_s']:.1f} "
          f"peak_gpu_mib={single['peak_gpu_mib']:.0f} fp16_loss_finite={int(fp16_finite)} "
          f"cassava_loader_ips={cassava['loader']['train_images_per_s']:.1f} "
          f"cassava_device_colour_ips={cassava['device']['train_images_per_s']:.1f} "
          f"cassava_device_augment_ips={cassava['augment']['train_images_per_s']:.1f} "
          f"device_augment_512_ips={r['warp_ips']:.1f} "
          f"tta_rescore_ips={r['tta']['images_per_s']:.1f} tta_oof_max_diff={r['tta']['max_diff']:.2e} "
          f"export_same={int(r['tta']['export_same'])} "
          f"ckpt_images_per_s={r['checkpointed']['train_images_per_s']:.1f} "
          f"ckpt_peak_gpu_mib={r['checkpointed']['peak_gpu_mib']:.0f} "
          f"sam_images_per_s={r['sam']['train_images_per_s']:.1f} "
          f"sam_peak_gpu_mib={r['sam']['peak_gpu_mib']:.0f} sam_loss_finite={int(r['sam']['loss_finite'])} "
          f"ddp_images_per_s={ddp.get('train_images_per_s', float('nan')):.1f} "
          f"nccl_ok={int(bool(nccl_ok)) if not args.smoke_cpu else 'n/a'} ddp_ok={int(bool(ddp['ok']))} "
          f"ddp_swa_ok={int(bool(ddp.get('swa_ok', False)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
