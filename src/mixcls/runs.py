"""Run folders, atomic writes and checkpoints.

Every product of a run is written to a temporary name in the same folder and then renamed,
so a crash or a kill never leaves a half-written file behind: readers see the old file or the
new one, never a mix.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class RunError(RuntimeError):
    """A run folder that cannot be read or written; the message names the path."""

    user_facing = True


TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    An OSError while writing (disk full, folder gone) becomes a RunError naming `path`, and the
    temporary file is removed; a SIGKILL can leave only a `.NAME.*.tmp` file, never a torn NAME.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _create_temporary(path: Path) -> Path:
    """A new empty `.NAME.<random>.tmp` beside `path`.

    Not tempfile.mkstemp: its files are private (0600), and a renamed checkpoint or CSV should
    get the permissions of any other new file (0666 less the umask) so a team can share runs.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files a killed run left below `folder`; return them."""
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(path: str | Path, frame: Any, **kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(path)


def atomic_save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure; the format comes from `path`'s suffix."""
    path = Path(path)
    kwargs.setdefault("dpi", 110)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save through a temporary file; `state` must hold only weights_only-safe types."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain data, no code."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise RunError(f"checkpoint {path} cannot be loaded safely: {exc}") from None


def check_writable(folder: str | Path, *, min_free_mb: float = 50.0) -> Path:
    """Create `folder` if needed and fail early if it cannot be written or its disk is too full.

    On failure the folders this call created are removed again, so a refused run leaves nothing.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write_probe"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise RunError(f"run folder {folder} is not writable: {exc.strerror or exc}") from None
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < min_free_mb:
            raise RunError(f"run folder {folder}: only {free_mb:.0f} MiB free on its disk, the run "
                           f"needs about {min_free_mb:.0f} MiB (checkpoints of every fold)")
    except RunError:
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                pass
        raise
    return folder


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    return json.loads(path.read_text())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
