"""`mixcls export --run RUN --out DIR`: what predict needs, for an offline notebook."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="copy a run or blend's inference files into a new folder (offline notebooks)",
        description="Copy what mixcls predict reads from a finished run or blend: config.yaml, "
        "classes.json, dataset.json, metrics.json, tta.json and every fold_K/best.pt (and "
        "full/best.pt), not last.pt, OOF tables, logs or TensorBoard events. A blend's members "
        "go below it as members/NAME and its blend.json names them by relative paths, so the "
        "folder can be moved or uploaded (a Kaggle data set) as it is.")
    p.add_argument("--run", required=True, help="a finished run or blend folder")
    p.add_argument("--out", required=True, help="new folder to write")
    p.set_defaults(func=run_export)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def run_export(args: argparse.Namespace) -> int:
    from mixcls.export import export_folder

    result = export_folder(args.run, args.out)
    print(f"wrote {result.out}: {result.files} files, {_mib(result.bytes)} (the source folders: "
          f"{_mib(result.source_bytes)}); predict with: mixcls predict --run {args.out} --images …")
    return 0
