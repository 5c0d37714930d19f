"""Training images/s of `mixcls train` against a bare loop on pre-loaded tensors.

The bare loop is the ceiling: same model, same optimizer, batches already in memory, nothing
but forward + backward + step. mixcls adds decoding (or the RAM cache), albumentations, the
sampler, the loss on soft targets, the scheduler and the progress bookkeeping; the ratio says
what that costs. Inference images/s is `predict_run` (one fold, one view) over the same images.

    python benchmarks/train_throughput.py --model resnet18 --img-size 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mixcls.config import load_config
from mixcls.predict import predict_run
from mixcls.train import fit_folds


def write_images(root: Path, n: int, size: int, num_classes: int, seed: int) -> Path:
    """n random-texture PNGs of `size` px in the Kaggle layout (content does not change speed)."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train_images" / f"{i:05d}.png")
        rows.append({"image_id": f"{i:05d}.png", "label": i % num_classes})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def bare_loop_ips(model_name: str, img_size: int, batch: int, steps: int, num_classes: int) -> float:
    import timm
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch,))
    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1280, help="training images (two folds use half)")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is timed")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", args.images * 2, args.img_size, args.num_classes, 0)
        cfg = load_config(None, {
            "data": str(data), "model": args.model, "img_size": args.img_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "folds": 2, "train_folds": [0],
            "workers": args.workers, "preset": "light", "cache_images": "yes", "device": "cpu"})
        run = Path(tmp) / "run"
        fit_folds(cfg, run, progress=False, log=lambda msg: None)
        history = pd.read_csv(run / "fold_0" / "history.csv")
        train_ips = float(history["images_per_s"].iloc[-1])
        steps = int(args.images // args.batch_size)
        bare_ips = bare_loop_ips(args.model, args.img_size, args.batch_size, steps, args.num_classes)
        paths = sorted(str(p) for p in (data / "train_images").glob("*.png"))[: args.images]
        start = time.perf_counter()
        predict_run(run, paths, tta=1, device="cpu", batch_size=args.batch_size * 2)
        infer_ips = len(paths) / (time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratio = train_ips / bare_ips
    rows = [("mixcls train (last epoch)", f"{train_ips:.1f}"), ("bare loop (pre-loaded tensors)", f"{bare_ips:.1f}"),
            ("ratio", f"{ratio:.3f}"), ("predict (1 fold, 1 view)", f"{infer_ips:.1f}"),
            ("peak resident memory (MiB)", f"{peak_mb:.0f}")]
    print(f"model={args.model} img_size={args.img_size} batch={args.batch_size} workers={args.workers} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'measure':34s} {'images/s':>10s}")
    for name, value in rows:
        print(f"{name:34s} {value:>10s}")
    print(f"train_ips={train_ips:.1f} bare_ips={bare_ips:.1f} ratio={ratio:.3f} infer_ips={infer_ips:.1f} "
          f"peak_mb={peak_mb:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
