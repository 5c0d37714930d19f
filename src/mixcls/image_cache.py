"""Decode each image once: a disk cache of resized copies and an index of the files already checked.

Decoding an 800×600 JPEG every epoch costs more CPU than a small network's step, and the
full check of the table decodes every image before the first batch. `ImageCache` keeps the
decoded images between epochs (nowhere, in RAM at full size, or on disk shrunk so the short
side is `cache_scale × img_size`), lets the check's decode feed that cache, and remembers in
`CACHE_DIR/index.sqlite3` which files were checked and hashed, keyed by (path, size,
mtime_ns), so that a rerun on unchanged files neither decodes nor hashes them again.

Cached copies are raw `.npy` arrays of the uint8 image, keyed by the sha256 of the source's
bytes and the short side. Why not PNG: measured on 50 clothing photos upscaled to 800×600
(copies of 442×589 and 589×785 px; CPU time of one thread), np.load reads a copy in 0.1–0.3
ms, a PNG of the same pixels decodes in 7–12 ms, slower than the original JPEG (2.3–2.5 ms):
PNG would save disk (about 2.5× smaller) and lose the point of the cache.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from mixcls.config import ConfigError
from mixcls.runs import RunError, atomic_path

CACHE_MODES = ("auto", "yes", "no", "disk")
CACHE_SCALE = 1.15
DEFAULT_CACHE_DIR = "~/.cache/mixcls/images"
# Above this the decoded set is better left on disk (auto) and the RAM to the page cache and
# the loader workers.
RAM_LIMIT_BYTES = 2 * 2**30
INDEX_NAME = "index.sqlite3"
# Bump when decode_image changes what it returns, so old copies are not served.
COPY_FORMAT = "v1"
# A file checked at a level also passes every lower one.
CHECK_LEVELS = {None: 0, "header": 1, "full": 2}
_INDEX_CHUNK = 500  # paths per SELECT … IN (…): under sqlite's old 999-variable limit


def shrunk_size(width: int, height: int, short_side: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side `short_side`, or None when it is no larger already."""
    short = min(width, height)
    if short <= short_side:
        return None  # never upscale: the crops would only see interpolated pixels
    scale = short_side / short
    size = (round(width * scale), round(height * scale))
    return (short_side, size[1]) if width == short else (size[0], short_side)


def short_side_for(img_size: int, cache_scale: float = CACHE_SCALE) -> int:
    """Short side in pixels of a cached copy for a model input of `img_size` pixels."""
    return math.ceil(img_size * cache_scale)


def decode_image(source: str | Path | BinaryIO, *, short_side: int | None = None) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB, whatever the mode (grey, RGBA, palette, 16-bit).

    With `short_side`, the image is shrunk (never enlarged) so its shorter side is `short_side`
    pixels: a JPEG at least twice that size is decoded at a reduced DCT scale first (1/2, 1/4
    or 1/8: several times fewer pixels to transform), then area-resized to the exact size.
    """
    with Image.open(source) as image:
        target = None if short_side is None else shrunk_size(image.width, image.height, short_side)
        if target is not None and image.format == "JPEG" and min(
                image.width // target[0], image.height // target[1]) >= 2:
            # Scaled decoding still entropy-decodes every block: a truncated file fails here too.
            image.draft("RGB", target)
        image.load()  # decodes fully: a truncated file raises here, not in a worker later
        array = _to_rgb(image)
    if target is not None and array.shape[:2] != (target[1], target[0]):
        array = cv2.resize(array, target, interpolation=cv2.INTER_AREA)
    return array


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def load_copy(path: str | Path) -> np.ndarray:
    """A cached copy written by ImageCache: (H, W, 3) uint8 RGB."""
    return np.load(path, allow_pickle=False)


def prepare_cache_dir(cache_dir: str | Path) -> Path:
    """The cache folder, created; ConfigError naming it when it cannot be written."""
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise ConfigError(f"cache_dir: {folder} is not a writable folder "
                          f"({exc.strerror or exc})") from None
    return folder


@dataclass(frozen=True)
class FileRecord:
    """What the index knows of one file: its stamp, the sha256 of its bytes, the check it passed."""

    size: int
    mtime_ns: int
    sha256: str
    checked: str | None  # "full", "header" or None (hashed only)


class CheckIndex:
    """path -> FileRecord of the files already checked and hashed: an sqlite3 file.

    sqlite3 serialises writers across processes (a second run or another rank waits up to
    `timeout_seconds`) and a transaction is all or nothing, so a killed run never leaves a torn
    index behind.
    """

    def __init__(self, path: str | Path, *, timeout_seconds: float = 60.0):
        self.path = Path(path)
        self.timeout_seconds = timeout_seconds
        self._execute(lambda db: db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
            "mtime_ns INTEGER, sha256 TEXT, checked TEXT)"))

    def _execute(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            with closing(sqlite3.connect(self.path, timeout=self.timeout_seconds)) as db, db:
                return work(db)
        except sqlite3.Error as exc:
            raise RunError(f"cache index {self.path}: {exc} (delete the file to start afresh)") from None

    def lookup(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """The records of those `paths` the index holds (stale ones included: the caller stats)."""
        def select(db: sqlite3.Connection) -> dict[str, FileRecord]:
            found = {}
            for start in range(0, len(paths), _INDEX_CHUNK):
                chunk = list(paths[start:start + _INDEX_CHUNK])
                rows = db.execute("SELECT path, size, mtime_ns, sha256, checked FROM files WHERE "
                                  f"path IN ({','.join('?' * len(chunk))})", chunk)
                found.update({row[0]: FileRecord(*row[1:]) for row in rows})
            return found
        return self._execute(select)

    def record(self, records: dict[str, FileRecord]) -> None:
        """Insert or replace these records in one transaction."""
        rows = [(p, r.size, r.mtime_ns, r.sha256, r.checked) for p, r in records.items()]
        if rows:
            self._execute(lambda db: db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows))


class ImageCache:
    """Where decoded images live between epochs, and which files are already checked.

    `mode`: "yes" keeps full-size decoded images in RAM, "disk" writes copies shrunk to a short
    side of `cache_scale × img_size` into `cache_dir`, "no" keeps nothing, "auto" picks RAM
    when the decoded set fits in `ram_limit_bytes`, else disk (with `img_size` and
    `cache_dir`), else nothing. With `cache_dir` the check index lives there too.
    Use: `plan(paths)` once, `admit(path, check)` per image (threads welcome), `commit()`,
    then `sources(paths)` for the datasets.
    """

    def __init__(self, mode: str = "auto", *, img_size: int | None = None,
                 cache_dir: str | Path | None = None, cache_scale: float = CACHE_SCALE,
                 ram_limit_bytes: int = RAM_LIMIT_BYTES):
        if mode not in CACHE_MODES:
            raise ValueError(f"unknown cache mode {mode!r}; use one of {', '.join(CACHE_MODES)}")
        if mode == "disk" and (img_size is None or cache_dir is None):
            raise ValueError("cache mode 'disk' needs img_size and cache_dir")
        if not (math.isfinite(cache_scale) and cache_scale >= 1.0):
            raise ValueError(f"cache_scale {cache_scale!r} must be a finite number >= 1")
        self.folder = prepare_cache_dir(cache_dir) if cache_dir is not None else None
        self.index = CheckIndex(self.folder / INDEX_NAME) if self.folder is not None else None
        self.short_side = short_side_for(img_size, cache_scale) if img_size is not None else None
        self.mode = mode
        self.ram_limit_bytes = ram_limit_bytes
        self._known: dict[str, FileRecord] = {}
        self._dirty: set[str] = set()
        self._arrays: dict[str, np.ndarray] = {}

    def plan(self, paths: Sequence[str]) -> str:
        """Resolve "auto" for these paths and read their index records; the mode chosen."""
        if self.mode == "auto" and paths:
            self.mode = self._choose_mode(paths)
        if self.index is not None:
            self._known.update(self.index.lookup([p for p in paths if p not in self._known]))
        return self.mode

    def _choose_mode(self, paths: Sequence[str]) -> str:
        estimate = _estimate_bytes(paths)
        if estimate is not None and estimate <= self.ram_limit_bytes:
            return "yes"
        return "disk" if self.short_side is not None and self.folder is not None else "no"

    def admit(self, path: str, check: str | None = None) -> None:
        """Make one image ready: checked at least at level `check` and cached (unless mode "no").

        Decodes at most once (the check's decode feeds the cache); a file the index knows with
        the same size and mtime_ns is neither hashed nor checked again. Raises what PIL or the
        OS raises for a bad or missing file.
        """
        if self.mode == "auto":
            raise RuntimeError("ImageCache.plan(paths) must run before admit")
        stat = os.stat(path)  # before reading: a file changed meanwhile gets a stale stamp
        known = self._known.get(path)
        if known is not None and (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            known = None
        passed = known is not None and CHECK_LEVELS[known.checked] >= CHECK_LEVELS[check]
        if passed and self._has_copy(path, known.sha256):
            return
        data = Path(path).read_bytes()
        sha256 = known.sha256 if known is not None else hash_bytes(data)
        needs_copy = not self._has_copy(path, sha256)
        level = known.checked if passed else None
        if needs_copy or (check == "full" and not passed):
            shrink = self.short_side if self.mode == "disk" else None
            array = _named_errors(path, lambda source: decode_image(source, short_side=shrink), data)
            if needs_copy:
                self._keep(path, sha256, array)
            level = "full"
        elif check == "header" and not passed:
            _named_errors(path, _verify, data)
            level = "header"
        self._known[path] = FileRecord(stat.st_size, stat.st_mtime_ns, sha256, level)
        self._dirty.add(path)

    def _copy_path(self, sha256: str) -> Path:
        assert self.folder is not None and self.short_side is not None
        return self.folder / COPY_FORMAT / sha256[:2] / f"{sha256}_{self.short_side}.npy"

    def _has_copy(self, path: str, sha256: str) -> bool:
        if self.mode == "yes":
            return path in self._arrays
        if self.mode == "disk":
            return self._copy_path(sha256).is_file()
        return True

    def _keep(self, path: str, sha256: str, array: np.ndarray) -> None:
        if self.mode == "yes":
            self._arrays[path] = array
        else:
            write_copy(self._copy_path(sha256), array)

    def commit(self) -> None:
        """Write the records of the files admitted since the last commit into the index."""
        if self.index is not None and self._dirty:
            self.index.record({p: self._known[p] for p in sorted(self._dirty)})
        self._dirty.clear()

    def sources(self, paths: Sequence[str]) -> list[np.ndarray | Path] | None:
        """Per admitted path its decoded image (RAM) or its cached copy (disk); None for "no"."""
        if self.mode == "yes":
            return [self._arrays[p] for p in paths]
        if self.mode == "disk":
            return [self._copy_path(self._known[p].sha256) for p in paths]
        return None


def hash_bytes(data: bytes) -> str:
    """sha256 hex digest: the key of a file's content in the cache."""
    return hashlib.sha256(data).hexdigest()


def write_copy(path: Path, array: np.ndarray) -> None:
    """Save a uint8 image as .npy through a temporary name, so readers never see a torn copy."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _verify(source: str | Path | BinaryIO) -> None:
    with Image.open(source) as image:
        image.verify()


def _named_errors(path: str, read: Callable[[Any], Any], data: bytes) -> Any:
    """`read(bytes of path)`; if it fails, the error of `read(path)`, which names the file."""
    try:
        return read(io.BytesIO(data))
    except Exception:
        # PIL names a file object by its repr; reading the path again gives today's message.
        read(path)
        raise


def _estimate_bytes(paths: Sequence[str]) -> int | None:
    """Decoded bytes of all `paths`, guessed from the first readable header (None: none readable)."""
    for path in paths[:10]:
        try:
            with Image.open(path) as image:
                return image.width * image.height * 3 * len(paths)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # the check names the bad file; the estimate only needs one good one
    return None
