"""A run or blend folder reduced to what `mixcls predict` reads, for an offline notebook.

Code competitions (Cassava 2020 was one) predict in a notebook without internet, from a data
set the competitor uploads. A run folder holds far more than inference needs: every fold's
last.pt carries the optimizer state beside the weights (about three times best.pt for Adam),
plus OOF tables, logs and TensorBoard events. The export keeps the files predict reads and the
run's record (config, classes, metrics, the applied TTA setting), copied byte for byte, so a
blend's checkpoint hashes still hold. A blend's members go below it as members/NAME, named by
relative paths in its blend.json, so the exported folder can be moved or uploaded as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixcls.blend import (BLEND_FILE, FULL_CHECKPOINT, existing_member_dir, hash_checkpoints,
                          is_blend_folder, read_blend, sha256_file)
from mixcls.runs import RunError, RunFolder, atomic_write_json
from mixcls.tta import TTA_FILE

# Besides the checkpoints: what predict reads (config, classes, dataset for the label format,
# the applied setting) and the run's record (metrics).
KEPT_FILES = ("config.yaml", "classes.json", "dataset.json", "metrics.json", TTA_FILE)


@dataclass
class ExportResult:
    """The exported folder, its number of files and bytes, and the bytes of the source folders."""

    out: Path
    files: int
    bytes: int
    source_bytes: int


def export_folder(source: str | Path, out: str | Path) -> ExportResult:
    """Export a finished run or blend into the new folder `out`; RunError names what is wrong.

    Everything is checked first (a blend's members are there and unchanged since blending);
    the copy is made in a temporary folder beside `out` and renamed to `out` at the end, so an
    interrupted export leaves no `out`.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"export folder {out} already holds files; pass another --out")
    if out == source or source in out.parents:
        raise RunError(f"export folder {out} is inside {source}; write it somewhere else")
    plan = _plan_blend(source) if is_blend_folder(source) else _plan_run(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    try:
        for src, relative in plan.copies:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / relative)
        _check_copied(plan, tmp)
        if plan.blend_spec is not None:
            atomic_write_json(tmp / BLEND_FILE, plan.blend_spec)  # last, as mixcls blend writes it
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    files = [p for p in out.rglob("*") if p.is_file()]
    return ExportResult(out, len(files), sum(p.stat().st_size for p in files),
                        sum(_folder_bytes(d) for d in plan.sources))


@dataclass
class _Plan:
    copies: list[tuple[Path, Path]]   # (source file, path relative to the export)
    hashes: dict[Path, str]           # relative path -> the sha256 it must have (checkpoints)
    sources: list[Path]               # the folders exported (for the size comparison)
    blend_spec: dict[str, Any] | None = None


def _plan_run(run_dir: Path, prefix: Path = Path(), hashes: dict[str, str] | None = None) -> _Plan:
    """The files of one run: KEPT_FILES that exist and its checkpoints (`hashes`: the blend's
    record of them, else their hashes now)."""
    run = RunFolder.open(run_dir, require=("metrics.json",))
    found = hashes if hashes is not None else hash_checkpoints(run.path)
    if not any(name != FULL_CHECKPOINT for name in found):
        raise RunError(f"{run.path}: no fold_*/best.pt checkpoints; is this a finished mixcls run?")
    copies = [(run.path / name, prefix / name) for name in KEPT_FILES if (run.path / name).is_file()]
    copies += [(run.path / name, prefix / name) for name in found]
    return _Plan(copies, {prefix / name: digest for name, digest in found.items()}, [run.path])


def _plan_blend(blend_dir: Path) -> _Plan:
    """The blend's own files, and each member's files below members/NAME with the checkpoints
    blend.json recorded; blend.json rewritten with those relative paths."""
    spec = read_blend(blend_dir)
    copies = [(blend_dir / name, Path(name)) for name in KEPT_FILES if (blend_dir / name).is_file()]
    plan = _Plan(copies, {}, [blend_dir], blend_spec=dict(spec, members=[]))
    used: set[str] = set()
    for member in spec["members"]:
        path = existing_member_dir(member, blend_dir)
        name = _unique(path.name, used)
        part = _plan_run(path, Path("members") / name, hashes=member["checkpoints"])
        plan.copies += part.copies
        plan.hashes |= part.hashes
        plan.sources += part.sources
        plan.blend_spec["members"].append(dict(member, path=f"members/{name}"))
    return plan


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 2
    while candidate in used:
        candidate, k = f"{name}_{k}", k + 1
    used.add(candidate)
    return candidate


def _check_copied(plan: _Plan, tmp: Path) -> None:
    """Every copied checkpoint has the hash recorded (a blend's) or read before the copy."""
    for relative, digest in plan.hashes.items():
        if sha256_file(tmp / relative) != digest:
            source = next(src for src, rel in plan.copies if rel == relative)
            raise RunError(f"checkpoint {source} differs from the one blended or read before "
                           "copying (changed since?); blend the runs again, or export again")


def _folder_bytes(folder: Path) -> int:
    """The bytes of all the files below a folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
