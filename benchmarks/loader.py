"""Does the input pipeline keep up with real photos? Images/s of decode + augment + collate.

On the clothing photos (a checkout of github.com/alexeygrigorev/clothing-dataset-small, ~400x533
JPEGs) and on copies of them upscaled to 800x600 JPEGs (Cassava's size; made once by this
script under --work), at 384 and 512 px, with 0, 1 and 2 loader workers, the training input
pipeline alone (mixcls's ImageDataset, the preset's albumentations, EpochSampler and DataLoader;
no model) is timed over one epoch after a warm-up epoch, in four ways:

- decode:  the original file decoded every epoch (no cache);
- ram:     decoded once, kept in RAM at full size (--cache-images yes);
- disk:    decoded once, shrunk to a short side of 1.15 x img_size and kept as .npy copies
           (--cache-images disk; the copies are written before the timing and their build
           time is shown apart);
- pil:     the reference limit of "decode" — the same files decoded by PIL alone (open, load,
           RGB), no augmentation, no batch of images (each item is the image's height), through
           the same DataLoader.

With --hwc-batches the loader collates as it does for a CUDA device (sampling.collate_hwc: the
images stay in their HWC memory order, the channel split is left to the device). With
--colour-on-device the preset's colour steps leave the loader (they run on the batch on the
device in training); the script then also times that step on this machine's CPU, per image, as
the cost it moves: on a GPU machine it runs on the GPU.
With --augment-on-device the whole preset
leaves it (mixcls.device_augment: the loader decodes or reads the cache, draws the parameters
and stacks the padded sources; the warp, colour and cutout run on the device), and the script
times that device step on this CPU in the same way, on batches of sources of the size each mode
hands it (the cached copies' size for disk, the photos' own for decode and ram).

Then the whole trainer (`fit_folds`, one fold, --cache-images disk) on tf_efficientnet_lite0 at
384 px against a bare loop fed by the same loader (same dataset, transform, cache, workers;
uint8 batches normalised by the same Normalizer; forward, cross-entropy, backward, AdamW step,
nothing else), their epochs taken in turn in one process after a warm-up epoch of each: each
timed trainer epoch is compared with the mean of the bare epochs before and after it, and the
ratio is the median over --trainer-rounds such rounds.

    python benchmarks/loader.py --data PATH [--images 256] [--work runs/bench_loader]
                                [--preset cassava] [--colour-on-device | --augment-on-device]
                                [--hwc-batches] [--skip-trainer] [--trainer-rounds 3]

Nothing is downloaded. Ends with
`disk_cache_speedup_512=… ram_cache_speedup_512=… trainer_ratio=…` (the speedups: images/s of
the cached pipeline over "decode", at 512 px from the 800x600 JPEGs, with --workers 2 — as many
workers as this machine has cores; the ratio: the median over the rounds of trainer images/s over the bare loop's).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from clothing import list_photos
from mixcls.config import load_config
from mixcls.data import ImageDataset, load_image_cache
from mixcls.device_augment import WarpBatch, build_augment_on_device, build_train_augment
from mixcls.image_cache import short_side_for, shrunk_size
from mixcls.sampling import EpochSampler, make_loader
from mixcls.transforms import build_device_colour

MODES = ("decode", "ram", "disk", "pil")
UPSCALED = (800, 600)  # width, height: Cassava's photos
DEVICE = torch.device("cpu")


def find_photos(data: Path, limit: int, seed: int) -> pd.DataFrame:
    """A class-stratified sample of `limit` photos: image_id (path below data), label (class folder)."""
    table = list_photos(data)
    if len(table) < limit:
        raise SystemExit(f"{data} holds {len(table)} photos; --images {limit} is more")
    if limit == len(table):
        return table.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    sample, _ = train_test_split(table, train_size=limit, stratify=table["label"], random_state=seed)
    return sample.reset_index(drop=True)


def make_upscaled(data: Path, table: pd.DataFrame, out: Path) -> Path:
    """Copies of the photos resized to 800x600 JPEGs (quality 90) under out/, once."""
    stamp = out / "done.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(table["image_id"]):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for image_id in table["image_id"]:
        target = out / image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(data / image_id) as image:
            image.convert("RGB").resize(UPSCALED, Image.BICUBIC).save(target, quality=90)
    stamp.write_text("\n".join(table["image_id"]))
    return out


class PilOnly(torch.utils.data.Dataset):
    """The reference limit: PIL's decode of each file to an RGB array, nothing else."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        with Image.open(self.paths[index]) as image:
            return np.asarray(image.convert("RGB")).shape[0]


def build_dataset(mode: str, paths: list[str], labels: np.ndarray, img_size: int, preset: str,
                  cache_dir: Path, colour_on_device: bool = False,
                  augment_on_device: bool = False) -> tuple[torch.utils.data.Dataset, float]:
    """The dataset of one mode and the seconds its cache took to build (0 without one)."""
    if mode == "pil":
        return PilOnly(paths), 0.0
    cache, seconds = None, 0.0
    if mode in ("ram", "disk"):
        start = time.perf_counter()
        cache = load_image_cache(paths, mode="yes" if mode == "ram" else "disk", img_size=img_size,
                                 cache_dir=cache_dir)
        seconds = time.perf_counter() - start
    transform, _ = build_train_augment(preset, img_size, colour_on_device=colour_on_device,
                                       augment_on_device=augment_on_device)
    return ImageDataset(paths, labels, transform, cache=cache), seconds


def device_colour_ms(preset: str, img_size: int, batch: int, *, repeats: int = 5) -> float:
    """CPU milliseconds per image of the preset's colour steps on a uint8 batch (DeviceColour),
    the median of `repeats` batches."""
    colour = build_device_colour(preset)
    if colour is None:
        return 0.0
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return _median_ms_per_image(lambda g: colour(images, g), batch, repeats)


def device_augment_ms(preset: str, img_size: int, batch: int, source: tuple[int, int], *,
                      repeats: int = 3) -> float:
    """CPU milliseconds per image of --augment-on-device's device step (warp, colour, cutout)
    on a batch of `source` (width, height) uint8 images with plans drawn by the loader's half,
    the median of `repeats` batches."""
    plan, augment = build_augment_on_device(preset, img_size)
    width, height = source
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    items = [plan(image=image) for _ in range(batch)]
    warp = WarpBatch(torch.stack([item["image"] for item in items]),
                     torch.stack([item["plan"] for item in items]))
    return _median_ms_per_image(lambda g: augment(warp, g), batch, repeats)


def _median_ms_per_image(step, batch: int, repeats: int) -> float:
    """Milliseconds per image of `step(generator)` on a batch: the median of `repeats` calls
    after one warm-up call."""
    generator = torch.Generator().manual_seed(1)
    step(generator)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(generator)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / batch


def batch_memory_ms(batch: int, img_size: int, *, repeats: int = 20) -> tuple[float, float]:
    """CPU milliseconds per image of copying a uint8 batch (batch, size, size, 3) into a new
    shared-memory storage (what torch's default_collate allocates for every batch inside a loader
    worker: `_typed_storage()._new_shared`, fresh pages that the copy faults in) and into a
    buffer used before (what mixcls's workers do since mixcls.batch_ring); one thread."""
    source = torch.randint(0, 256, (batch, img_size, img_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    reused = torch.empty_like(source)

    def fresh_shared() -> None:
        storage = source._typed_storage()._new_shared(source.numel(), device=source.device)
        torch.empty(0, dtype=torch.uint8).set_(storage).view(source.shape).copy_(source)

    times = []
    for step in (fresh_shared, lambda: reused.copy_(source)):
        step()  # warm-up
        start = time.process_time()
        for _ in range(repeats):
            step()
        times.append(1000 * (time.process_time() - start) / (repeats * batch))
    return times[0], times[1]


def time_epoch(loader, sampler: EpochSampler, epoch: int) -> float:
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live child processes
    (the loader's persistent workers), from /proc; NaN where /proc is not there. The
    standard library counts children only once they have exited (resource.RUSAGE_CHILDREN),
    and persistent workers are alive while an epoch is timed."""
    me = os.getpid()
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
        total = 0
        for pid in [str(me), *children]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total / os.sysconf("SC_CLK_TCK")


def pipeline_ips(dataset, n: int, *, batch: int, workers: int, seed: int,
                 hwc_batches: bool = False) -> tuple[float, float]:
    """Images/s of one epoch of `dataset` through mixcls's loader, after a warm-up epoch, and
    the CPU milliseconds per image that epoch took in all processes (main + workers): a cell
    whose images/s rise less than its workers do while its CPU per image rises is paying for
    the parallelism, not waiting on a core."""
    sampler = EpochSampler(n, seed=seed)
    loader = make_loader(dataset, batch_size=batch, workers=workers, sampler=sampler,
                         drop_last=False, device=DEVICE, seed=seed, hwc_batches=hwc_batches)
    time_epoch(loader, sampler, 0)  # warm-up: worker start, page cache, first allocations
    cpu_before = process_cpu_seconds()
    seconds = time_epoch(loader, sampler, 1)
    cpu_ms = 1000 * (process_cpu_seconds() - cpu_before) / n
    del loader  # persistent workers end here, not during the next cell's timing
    return n / seconds, cpu_ms


def trainer_vs_bare(photos: Path, table: pd.DataFrame, work: Path, *, img_size: int, batch: int,
                    workers: int, preset: str, seed: int, rounds: int = 3,
                    colour_on_device: bool = False,
                    augment_on_device: bool = False) -> tuple[list[float], list[float]]:
    """Images/s of the trainer's epochs and of a bare loop's, taken in turn in one process.

    The order is T1 B0 B1 T2 B2 … T(R+1) B(R+1) for R = `rounds`: T are the trainer's epochs
    (`fit_folds`, one fold), B the bare loop's, each run from the trainer's log line that ends
    its epoch (so between two trainer epochs). T1 and B0 warm up (workers, page cache, the
    allocator, oneDNN's kernels) and are not timed. Each timed trainer epoch T(k) is compared
    with the mean of the two bare epochs on either side of it, B(k-1) and B(k), so that a
    steady drift of the machine's speed during the measurement cancels (session 10 saw the same
    steps speed up over minutes, which favoured whichever loop was timed second).
    Returns (trainer images/s of T2 … T(R+1), bare images/s of B1 … B(R+1)).
    """
    from mixcls.train import fit_folds

    # Two folds over a table of twice the rows, the first trained: fold 0 trains on one half.
    data = work / "trainer_data"
    data.mkdir(parents=True, exist_ok=True)
    link = data / "train_images"
    if not link.exists():
        link.symlink_to(photos.resolve(), target_is_directory=True)
    table[["image_id", "label"]].to_csv(data / "train.csv", index=False)
    run = work / "trainer_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(None, {
        "data": str(data), "model": "tf_efficientnet_lite0", "img_size": img_size,
        "batch_size": batch, "epochs": rounds + 1, "folds": 2, "train_folds": [0],
        "workers": workers, "preset": preset, "colour_on_device": colour_on_device,
        "augment_on_device": augment_on_device, "cache_images": "disk",
        "cache_dir": str(work / "cache"),
        "optimizer": "adamw", "lr": 1e-3, "device": "cpu", "seed": seed})
    bare_epoch = None  # built at T1's end, once the run folder holds folds.csv
    bare_ips: list[float] = []

    def after_trainer_epoch(message: str) -> None:
        # fit_fold logs "fold 0 epoch k/E: …" once epoch k (and its evaluation) has ended.
        nonlocal bare_epoch
        if not message.startswith("fold 0 epoch "):
            return
        if bare_epoch is None:
            bare_epoch = bare_loop(run, data, table, work, img_size=img_size, batch=batch,
                                   workers=workers, preset=preset, seed=seed,
                                   colour_on_device=colour_on_device,
                                   augment_on_device=augment_on_device)
            bare_epoch()  # B0: the bare loop's warm-up
        bare_ips.append(bare_epoch())

    fit_folds(cfg, run, progress=False, log=after_trainer_epoch)
    history = pd.read_csv(run / "fold_0" / "history.csv")
    trainer_ips = history["images_per_s"].astype(float).tolist()[1:]  # T1 warmed up
    if len(trainer_ips) != rounds or len(bare_ips) != rounds + 1:
        raise RuntimeError(f"expected {rounds} timed trainer and {rounds + 1} bare epochs, got "
                           f"{len(trainer_ips)} and {len(bare_ips)}")
    return trainer_ips, bare_ips


def bare_loop(run: Path, data: Path, table: pd.DataFrame, work: Path, *, img_size: int, batch: int,
              workers: int, preset: str, seed: int, colour_on_device: bool,
              augment_on_device: bool) -> Callable[[], float]:
    """A bare training loop on the trainer's fold-0 training rows (from run/folds.csv), with the
    same dataset, transform, disk cache and workers: a function that runs one epoch of it and
    returns its images/s."""
    import timm

    from mixcls.models import model_mean_std, register_models
    from mixcls.transforms import Normalizer

    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})
    train_ids = folds.loc[folds["fold"] != 0, "image_id"].tolist()
    classes = sorted(table["label"].unique())
    by_id = table.set_index("image_id")["label"]
    paths = [str(data / "train_images" / i) for i in train_ids]
    labels = np.array([classes.index(by_id[i]) for i in train_ids], dtype=np.int64)
    dataset, _ = build_dataset("disk", paths, labels, img_size, preset, work / "cache",
                               colour_on_device=colour_on_device, augment_on_device=augment_on_device)
    _, on_device = build_train_augment(preset, img_size, colour_on_device=colour_on_device,
                                       augment_on_device=augment_on_device)
    generator = torch.Generator().manual_seed(seed)
    register_models()
    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=len(classes)).train()
    normalizer = Normalizer(*model_mean_std(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = EpochSampler(len(paths), seed=seed)
    loader = make_loader(dataset, batch_size=batch, workers=workers, sampler=sampler,
                         drop_last=False, device=DEVICE, seed=seed)
    epochs = itertools.count()

    def one_epoch() -> float:
        sampler.set_epoch(next(epochs))
        start = time.perf_counter()
        for images, targets in loader:
            x = normalizer.from_255(on_device(images, generator)) if on_device else normalizer(images)
            loss = torch.nn.functional.cross_entropy(model(x), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return len(paths) / (time.perf_counter() - start)

    return one_epoch


def round_ratios(trainer_ips: list[float], bare_ips: list[float]) -> list[float]:
    """Each timed trainer epoch over the mean of the bare epochs just before and after it."""
    return [t / ((bare_ips[k] + bare_ips[k + 1]) / 2) for k, t in enumerate(trainer_ips)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="checkout of alexeygrigorev/clothing-dataset-small")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_loader"))
    parser.add_argument("--images", type=int, default=256, help="photos timed per cell")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="cassava", help="the augmentation preset timed")
    parser.add_argument("--sizes", type=lambda v: [int(s) for s in v.split(",")], default=[384, 512])
    parser.add_argument("--workers", type=lambda v: [int(w) for w in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--trainer-images", type=int, default=128, help="rows fold 0 trains on")
    parser.add_argument("--trainer-batch", type=int, default=16)
    parser.add_argument("--trainer-workers", type=int, default=1)
    parser.add_argument("--trainer-rounds", type=int, default=3,
                        help="timed trainer epochs, each between two timed bare-loop epochs")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--hwc-batches", action="store_true",
                        help="collate as a CUDA device's loader does (channels_last, the channel "
                             "split left to the device)")
    parser.add_argument("--colour-on-device", action="store_true",
                        help="leave the preset's colour steps out of the loader (--colour-on-device)")
    parser.add_argument("--augment-on-device", action="store_true",
                        help="leave the whole preset out of the loader (--augment-on-device)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def time_cells(args: argparse.Namespace, table: pd.DataFrame, sources: dict[str, Path]) -> pd.DataFrame:
    """One row per (source, img size, mode, workers): images/s, CPU ms per image, cache build s."""
    labels = pd.factorize(table["label"], sort=True)[0].astype(np.int64)
    rows = []
    for source, root in sources.items():
        paths = [str(root / i) for i in table["image_id"]]
        with Image.open(paths[0]) as first:
            shape = f"{first.width}x{first.height}"
        for size in args.sizes:
            for mode in MODES:
                cache_dir = args.work / "cache" / source
                if mode == "disk":
                    shutil.rmtree(cache_dir, ignore_errors=True)  # the build is timed from scratch
                dataset, build_s = build_dataset(mode, paths, labels, size, args.preset, cache_dir,
                                                 colour_on_device=args.colour_on_device,
                                                 augment_on_device=args.augment_on_device)
                for workers in args.workers:
                    ips, cpu_ms = pipeline_ips(dataset, len(paths), batch=args.batch_size,
                                               workers=workers, seed=args.seed,
                                               hwc_batches=args.hwc_batches)
                    rows.append({"source": source, "first_image": shape, "img_size": size,
                                 "mode": mode, "workers": workers, "images_per_s": ips,
                                 "cpu_ms_per_image": cpu_ms, "cache_build_s": build_s})
                    print(f"  {source:8s} {size} {mode:6s} workers={workers}: {ips:8.1f} images/s",
                          file=sys.stderr, flush=True)
                del dataset
    return pd.DataFrame(rows)


def print_cells(result: pd.DataFrame, args: argparse.Namespace, photos: int) -> pd.DataFrame:
    """The images/s table with the caches' speed-ups (returned), CPU ms per image, build seconds."""
    wide = result.pivot_table(index=["source", "img_size", "workers"], columns="mode",
                              values="images_per_s").reindex(columns=list(MODES))
    wide["disk/decode"] = wide["disk"] / wide["decode"]
    wide["ram/decode"] = wide["ram"] / wide["decode"]
    builds = result[result["mode"].isin(["ram", "disk"])].groupby(
        ["source", "img_size", "mode"])["cache_build_s"].first().unstack()
    where = " (colour steps on the device, not in these cells)" if args.colour_on_device else ""
    if args.augment_on_device:
        where = " (geometry, colour and cutout on the device, not in these cells)"
    where += " (batches collated channels_last, as for a CUDA device)" if args.hwc_batches else ""
    print(f"clothing photos: {photos} per cell, preset {args.preset}{where}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; images/s of one epoch after a warm-up epoch")
    print(wide.to_string(float_format=lambda v: f"{v:.2f}"))
    cpu = result.pivot_table(index=["source", "img_size", "workers"], columns="mode",
                             values="cpu_ms_per_image").reindex(columns=list(MODES))
    print("\nCPU milliseconds per image of the same epochs, all processes (main + workers):")
    print(cpu.to_string(float_format=lambda v: f"{v:.2f}"))
    print("\ncache build seconds (decode every photo once, write the copies or keep the arrays):")
    print(builds.to_string(float_format=lambda v: f"{v:.1f}"))
    return wide


def print_one_core_costs(args: argparse.Namespace) -> None:
    """Batch memory, and the augmentation steps moved to the device, timed on one CPU thread."""
    torch.set_num_threads(1)  # one core's cost, comparable with a loader worker's
    print(f"\nbatch memory, one thread, ms per image of a batch of {args.batch_size}:")
    for size in args.sizes:
        shared_ms, reused_ms = batch_memory_ms(args.batch_size, size)
        print(f"  {size} px batches: new shared-memory batch (torch's collate in a worker) "
              f"{shared_ms:.3f}, a buffer used before (mixcls.batch_ring) {reused_ms:.3f}")
    if args.colour_on_device:
        print("\nthe colour steps moved to the device, timed on this CPU (1 thread), ms per image:")
        for size in args.sizes:
            print(f"  {size} px: {device_colour_ms(args.preset, size, args.batch_size):.2f}")
    if args.augment_on_device:
        print("\nthe whole augmentation moved to the device (warp, colour, cutout), timed on this "
              "CPU (1 thread), ms per image, by the sources' size:")
        for size in args.sizes:
            cached = shrunk_size(*UPSCALED, short_side_for(size)) or UPSCALED
            for name, source in (("an 800x600 photo (decode, ram)", UPSCALED), ("its disk copy", cached)):
                print(f"  {size} px from {name}, {source[0]}x{source[1]}: "
                      f"{device_augment_ms(args.preset, size, args.batch_size, source):.2f}")
    torch.set_num_threads(os.cpu_count() or 1)


def print_trainer_rounds(args: argparse.Namespace) -> float:
    """Trainer and bare-loop epochs in turn on other photos; the median of the rounds' ratios."""
    trainer_table = find_photos(args.data, 2 * args.trainer_images, args.seed + 1)
    trainer_photos = make_upscaled(args.data, trainer_table, args.work / "trainer_upscaled")
    trainer_ips, bare_ips = trainer_vs_bare(
        trainer_photos, trainer_table, args.work, img_size=384, batch=args.trainer_batch,
        workers=args.trainer_workers, preset=args.preset, seed=args.seed,
        rounds=args.trainer_rounds, colour_on_device=args.colour_on_device,
        augment_on_device=args.augment_on_device)
    ratios = round_ratios(trainer_ips, bare_ips)
    trainer_ratio = float(np.median(ratios))
    print(f"\ntf_efficientnet_lite0 at 384 px, 800x600 JPEGs, disk cache, batch "
          f"{args.trainer_batch}, {args.trainer_workers} worker(s), {args.trainer_images} "
          f"training rows; trainer and bare-loop epochs in turn, images/s (B0 and T1 warm-ups, "
          f"not shown):")
    print(f"  bare loop B1      {bare_ips[0]:8.2f}")
    for k, (t, b, r) in enumerate(zip(trainer_ips, bare_ips[1:], ratios), start=2):
        print(f"  mixcls trainer T{k} {t:8.2f}   ratio to the mean of B{k - 1} and B{k}: {r:.3f}")
        print(f"  bare loop B{k}      {b:8.2f}")
    print(f"  ratio, the median of the {len(ratios)} rounds: {trainer_ratio:.3f}")
    return trainer_ratio


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    table = find_photos(args.data, args.images, args.seed)
    upscaled = make_upscaled(args.data, table, args.work / "upscaled")
    result = time_cells(args, table, {"original": args.data, "800x600": upscaled})
    wide = print_cells(result, args, len(table))
    print_one_core_costs(args)
    at = wide.loc[("800x600", max(args.sizes), max(args.workers))]  # 512 px and 2 workers by default
    trainer_ratio = float("nan") if args.skip_trainer else print_trainer_rounds(args)
    print(f"disk_cache_speedup_512={at['disk/decode']:.2f} ram_cache_speedup_512={at['ram/decode']:.2f} "
          f"trainer_ratio={trainer_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
