"""Peak memory of one training step per (batch, AMP mode), and the largest batch under a limit.

A wrapper of `mixcls.memory`, the code behind `mixcls explain memory`: every setting is measured
by `measure_memory` (forward + backward + AdamW step in a fresh child process; on CPU the peak
resident set, on CUDA max_memory_allocated), then `find_max_batch` searches, per AMP mode, the
largest micro-batch whose step fits --limit-mib (it measures again, in fresh children), and
`plan_batch` turns that into micro-batch x accumulation steps for --effective-batch.

    nice -n 5 .venv/bin/python benchmarks/memory.py          # the settings of docs/benchmarks.md
    nice -n 10 .venv/bin/python benchmarks/memory.py --img-size 32 --batch 8,16 --accum ""
    nice -n 5 .venv/bin/python benchmarks/memory.py --grad-checkpointing both   # off beside on

With `--grad-checkpointing both` every setting is measured without and with the model's
gradient checkpointing (timm's set_grad_checkpointing, what `mixcls train --grad-checkpointing`
turns on), and the final line adds, per setting, how much of the step's activation memory
checkpointing saved.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Sequence

from mixcls.config import AMP_MODES
from mixcls.explain import parse_memory_settings
from mixcls.memory import (MeasureError, MemoryResult, find_max_batch, format_memory_table,
                           measure_memory, plan_batch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--batch", default="8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--amp", default="none,bf16", help=f"comma-separated of {', '.join(AMP_MODES)}")
    p.add_argument("--accum", default="8x8",
                   help="comma-separated MICROxSTEPS (micro-batch x accumulation steps); '' for none")
    p.add_argument("--limit-mib", type=float, default=256.0,
                   help="memory limit of find_max_batch, MiB of one step's peak; 0 skips the search")
    p.add_argument("--effective-batch", type=int, default=64,
                   help="batch that plan_batch splits into micro-batch x accumulation steps")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--grad-checkpointing", default="off", choices=["off", "on", "both"],
                   help="measure with the model's gradient checkpointing off, on, or both")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def parse_settings(args: argparse.Namespace) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """(batch sizes, AMP modes, (micro_batch, accum_steps) pairs): `mixcls explain memory`'s own
    checks of the flags, then this script's; SystemExit naming the bad flag, before any measuring."""
    try:
        *settings, args.device = parse_memory_settings(
            batch=args.batch, amp=args.amp, accum=args.accum, img_size=args.img_size,
            num_classes=args.num_classes, model=args.model, device=args.device,
            grad_checkpointing=args.grad_checkpointing != "off")
    except ValueError as exc:  # ConfigError, ModelError
        raise SystemExit(str(exc)) from None
    if args.limit_mib < 0 or args.effective_batch < 1:
        raise SystemExit(f"--limit-mib ({args.limit_mib:g}) must be >= 0 and --effective-batch "
                         f"({args.effective_batch}) >= 1")
    return tuple(settings)


def amp_name(amp: str) -> str:
    """'none' runs in float32; name it so."""
    return "fp32" if amp == "none" else amp


def checkpoint_modes(text: str) -> list[bool]:
    """--grad-checkpointing off|on|both as the modes to measure, off first."""
    return {"off": [False], "on": [True], "both": [False, True]}[text]


def setting_name(result: MemoryResult) -> str:
    """b64_fp32, b8x8_bf16, b64_fp32_ckpt: a setting in the final line's names."""
    batch = str(result.micro_batch) if result.accum_steps == 1 else f"{result.micro_batch}x{result.accum_steps}"
    return f"b{batch}_{amp_name(result.amp)}" + ("_ckpt" if result.grad_checkpointing else "")


def peak_name(result: MemoryResult) -> str:
    """Name of a setting's peak in the final line: peak_mib_b64_fp32, peak_mib_b8x8_bf16_ckpt."""
    return f"peak_mib_{setting_name(result)}"


def checkpointing_savings(results: Sequence[MemoryResult]) -> list[str]:
    """For each setting measured both ways: the share of its activation memory (act+work) that
    checkpointing saved, in percent, as activations_saved_pct_SETTING=… A setting whose act+work
    without checkpointing is not positive is left out: on a CPU a step that small is below what
    the resident set can resolve (its peak falls under parameters + gradients + optimizer)."""
    plain = {setting_name(r): r for r in results if not r.grad_checkpointing}
    pairs = []
    for r in results:
        base = plain.get(setting_name(r).removesuffix("_ckpt")) if r.grad_checkpointing else None
        if base is None or r.oom or base.oom or not base.activations_mb > 0:
            continue
        saved = 100.0 * (1.0 - r.activations_mb / base.activations_mb)
        pairs.append(f"activations_saved_pct_{setting_name(base)}={saved:.1f}")
    return pairs


def search_max_batch(args: argparse.Namespace, amps: Sequence[str]) -> dict[str, int | None]:
    """Per AMP mode (and checkpointing mode), find_max_batch at --limit-mib; None where even the
    smallest batch does not fit. Keys: the AMP name, with ' ckpt' when checkpointing."""
    found = {}
    for checkpointing in checkpoint_modes(args.grad_checkpointing):
        for amp in amps:
            key = amp_name(amp) + (" ckpt" if checkpointing else "")
            try:
                found[key] = find_max_batch(args.model, args.img_size, num_classes=args.num_classes,
                                            budget_mb=args.limit_mib, device=args.device, amp=amp,
                                            seed=args.seed, grad_checkpointing=checkpointing)
            except MeasureError as exc:  # a child that failed is an error, not "nothing fits"
                raise SystemExit(f"error: {exc}") from None
            except ValueError as exc:  # nothing fits: a result, not a failure of the benchmark
                print(f"{key}: {exc}")
                found[key] = None
    return found


def print_search(found: dict[str, int | None], *, limit_mib: float, effective_batch: int) -> list[str]:
    """Print the search table; return its name=value pairs for the final line."""
    limit = f"{limit_mib:g}mib"
    print(f"\nlargest micro-batch whose step peak <= {limit_mib:g} MiB (find_max_batch), and the "
          f"plan for an effective batch of {effective_batch} (plan_batch):")
    print(f"{'amp':>10} {'max batch':>10} {'micro x accum':>14}")
    pairs = []
    for key, max_batch in found.items():
        name = key.replace(" ", "_")  # fp32, bf16_ckpt
        if max_batch is None:
            print(f"{key:>10} {'none fits':>10} {'-':>14}")
            pairs.append(f"max_batch_{name}_at_{limit}=nan")
            continue
        micro, steps = plan_batch(effective_batch, max_batch)
        print(f"{key:>10} {max_batch:>10} {f'{micro} x {steps}':>14}")
        pairs += [f"max_batch_{name}_at_{limit}={max_batch}",
                  f"plan_micro_batch_{name}_eff{effective_batch}={micro}",
                  f"plan_accum_steps_{name}_eff{effective_batch}={steps}"]
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches, amps, accum = parse_settings(args)
    start = time.perf_counter()
    results = []
    try:
        for checkpointing in checkpoint_modes(args.grad_checkpointing):
            results += measure_memory(args.model, args.img_size, num_classes=args.num_classes,
                                      batch_sizes=batches, amp_modes=amps, accum=accum,
                                      device=args.device, seed=args.seed,
                                      grad_checkpointing=checkpointing,
                                      log=lambda line: print(line, flush=True))
    except MeasureError as exc:  # the child's error, one line, names the setting
        raise SystemExit(f"error: {exc}") from None
    print(f"\n{args.model} at {args.img_size} px, {args.num_classes} classes, on {args.device}: "
          "one training step, MiB")
    print(format_memory_table(results))
    pairs = [f"{peak_name(r)}={'nan' if math.isnan(r.peak_mb) else f'{r.peak_mb:.1f}'}" for r in results]
    pairs += checkpointing_savings(results)
    if args.limit_mib > 0:
        found = search_max_batch(args, amps)
        pairs += print_search(found, limit_mib=args.limit_mib, effective_batch=args.effective_batch)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    print(" ".join(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
