"""Run folders, atomic writes and checkpoints.

Every product of a run is written to a temporary name in the same folder and then renamed,
so a crash or a kill never leaves a half-written file behind: readers see the old file or the
new one, never a mix. `RunFolder` is the one reader of a finished run's files (noise, active,
predict and the report all go through it; only the trainer reads back what it writes itself).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    import pandas as pd

    from mixcls.config import Config


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


# ---------------------------------------------------------------- reading a run folder

RUN_FILES = ("config.yaml", "classes.json")  # what every `mixcls train` writes first


@dataclass(frozen=True)
class RunFolder:
    """The files of a run folder (docs/architecture.md), read once each and checked.

    config and data are imported inside the methods: both sit above this module, and a later
    `from mixcls.runs import ...` in either must not become an import cycle.
    """

    path: Path

    @classmethod
    def open(cls, path: str | Path, *, require: tuple[str, ...] = ()) -> RunFolder:
        """Check that `path` is a run folder holding config.yaml, classes.json and `require`.

        RunError names the folder and every missing file at once.
        """
        path = Path(path)
        if not path.exists():
            raise RunError(f"run folder {path} does not exist")
        if not path.is_dir():
            raise RunError(f"run folder {path} is not a folder")
        missing = [name for name in (*RUN_FILES, *require) if not (path / name).is_file()]
        if missing:
            raise RunError(f"{path} is not a finished run folder: {', '.join(missing)} missing "
                           f"(train it first: mixcls train --out {path})")
        return cls(path)

    @cached_property
    def config(self) -> Config:
        """The run's resolved config; ConfigError names config.yaml when it cannot be used."""
        from mixcls.config import ConfigError, load_config

        path = self.path / "config.yaml"
        try:
            return load_config(path)
        except ConfigError as exc:
            if str(path) in str(exc):
                raise
            # validate() names the key only; here the key came from this file.
            raise ConfigError(f"{path}: {exc}") from None

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        """The config as flat key -> value (the keys of config.yaml and the CLI flags)."""
        from mixcls.config import config_to_flat

        return config_to_flat(self.config)

    @cached_property
    def classes(self) -> list[str]:
        """The K class names of classes.json, index = label."""
        path = self.path / "classes.json"
        classes = _read_json_checked(path)
        # Integers are accepted as names too: hand-made runs write [0, 1, 2].
        if (not isinstance(classes, list) or len(classes) < 2
                or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)):
            raise _data_error(f"{path}: expected a list of at least 2 class names")
        return [str(c) for c in classes]

    @cached_property
    def dataset(self) -> dict[str, Any]:
        """dataset.json (images, csv, rows, integer_labels); {} for a hand-made run without it."""
        path = self.path / "dataset.json"
        return _read_json_object(path) if path.is_file() else {}

    @property
    def integer_labels(self) -> bool:
        """Whether the training table's labels were integers (submissions write them so)."""
        if (self.path / "dataset.json").is_file():
            return bool(self.dataset.get("integer_labels", False))
        # Without dataset.json, names "0" … "K-1" are what `train` writes for integer labels.
        return self.classes == [str(k) for k in range(len(self.classes))]

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """metrics.json as written at the end of training; RunError when it is missing."""
        return _read_json_object(self.path / "metrics.json")

    @property
    def oof_path(self) -> Path:
        return self.path / "oof.csv"

    @property
    def fold_dirs(self) -> dict[int, Path]:
        """{fold: RUN/fold_K} for every fold folder on disk, in fold order (fold_10 after fold_9)."""
        found = {int(p.name.removeprefix("fold_")): p for p in self.path.glob("fold_*")
                 if p.is_dir() and p.name.removeprefix("fold_").isdigit()}
        return dict(sorted(found.items()))

    def read_oof(self, path: Path | None = None) -> "pd.DataFrame":
        """oof.csv (or another OOF table of the run at `path`, e.g. tta_oof.csv) checked against
        classes.json (data.check_oof), with a `pred` column (argmax of the probabilities) added
        when a hand-made table lacks it."""
        from mixcls.data import check_oof, prob_columns, read_csv

        path, num_classes = path or self.oof_path, len(self.classes)
        if not path.is_file():
            raise RunError(f"{path} does not exist (train the run first: mixcls train --out {self.path})")
        oof = read_csv(path, dtype={"image_id": str})
        check_oof(oof, num_classes=num_classes, source=f"{path} (classes from classes.json: {num_classes})")
        if "pred" not in oof.columns:
            oof = oof.assign(pred=oof[prob_columns(num_classes)].to_numpy().argmax(1))
        return oof

    def read_oof_ids(self) -> list[str]:
        """The image ids of oof.csv in file order, unchecked ([] without oof.csv): what the run
        scored, for readers that need the ids only (a hand-made oof.csv may hold nothing else)."""
        from mixcls.data import DataError, read_text_table

        if not self.oof_path.is_file():
            return []
        oof = read_text_table(self.oof_path, allow_empty=True)
        if "image_id" not in oof.columns:
            raise DataError(f"{self.oof_path}: missing column 'image_id'")
        return oof["image_id"].str.strip().tolist()

    def read_folds(self) -> "pd.DataFrame":
        """folds.csv (image_id, fold as written by the trainer, and group, the `--group-col` id,
        when the run was grouped); DataError when image_id or fold is missing."""
        from mixcls.data import DataError, read_csv

        path = self.path / "folds.csv"
        if not path.is_file():
            raise RunError(f"{path} does not exist")
        folds = read_csv(path, dtype={"image_id": str, "group": str},
                         keep_default_na=False)  # an id "NA" stays "NA", a group "007" stays "007"
        if not {"image_id", "fold"} <= set(folds.columns):
            raise DataError(f"{path}: expected columns image_id, fold; found {', '.join(folds.columns)}")
        return folds

    def layout(self) -> tuple[Path | None, Path]:
        """(training table, or None for a class-per-folder tree; images folder) from config.yaml.

        DataError names the path that is gone (data.resolve_layout's checks).
        """
        from mixcls.data import resolve_layout

        data = self.config.data
        return resolve_layout(data.data, data.csv, data.images)

    def find_images_dir(self) -> Path:
        """The training images folder; DataError names where it was looked for when it is gone.

        dataset.json's `images` (the absolute folder the run trained on) when the run has one;
        config.yaml's data / csv / images only for a run without it. A gone dataset.json folder
        is not replaced by config.yaml's: its paths may be relative to another working folder,
        and a wrong folder would show other images under the run's image ids.
        """
        images = self.dataset.get("images")
        if not images:
            return self.layout()[1]
        folder = Path(images)
        if not folder.is_dir():
            raise _data_error(f"images folder {folder} (from {self.path / 'dataset.json'}) "
                              "does not exist")
        return folder

    def find_images(self, image_ids: list[str]) -> list[Path]:
        """The files of `image_ids` in find_images_dir(); DataError counts the missing ones and
        names the first and the folder."""
        folder = self.find_images_dir()
        paths = [folder / image_id for image_id in image_ids]
        missing = [i for i, p in zip(image_ids, paths) if not p.is_file()]
        if missing:
            raise _data_error(f"{len(missing)} image(s) of the run {self.path} are not in its "
                              f"images folder {folder}, first {missing[0]!r}")
        return paths

    @property
    def images_dir(self) -> Path | None:
        """`find_images_dir()`, or None when the folder is gone (for readers that can do without)."""
        from mixcls.data import DataError

        try:
            return self.find_images_dir()
        except DataError:
            return None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; DataError names the file otherwise."""
    values = _read_json_checked(path)
    if not isinstance(values, dict):
        raise _data_error(f"{path}: expected a JSON object")
    return values


def _read_json_checked(path: Path) -> Any:
    """read_json with a message that names the file for bad JSON (the decoder names a line only)."""
    try:
        return read_json(path)
    except ValueError as exc:
        raise _data_error(f"{path}: not valid JSON ({exc})") from None


def _data_error(message: str) -> Exception:
    from mixcls.data import DataError

    return DataError(message)
