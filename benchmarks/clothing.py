"""The clothing photos of github.com/alexeygrigorev/clothing-dataset-small, as the benchmarks read them.

Imported by loader.py and finetune.py (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def list_photos(data: Path) -> pd.DataFrame:
    """Every DATA/SPLIT/CLASS/*.jpg, sorted: image_id (path below data), label (the class folder).

    The repository's own train/validation/test folders are pooled; SystemExit when none is found.
    """
    rows = [{"image_id": p.relative_to(data).as_posix(), "label": p.parent.name}
            for p in sorted(data.glob("*/*/*.jpg"))]
    if not rows:
        raise SystemExit(f"{data}: no */CLASS/*.jpg files; pass a checkout of "
                         "alexeygrigorev/clothing-dataset-small")
    return pd.DataFrame(rows)
