"""A benchmark's split of its rows, written once into its work folder.

The runs a benchmark caches in WORK were trained on WORK's split, so a later call with other
sizes, seed or data must not reuse them: it is refused instead of the file being rewritten.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_split_once(path: Path, rows: pd.DataFrame, *, flags: str) -> Path:
    """Write ROWS to PATH as CSV (a temporary name, then renamed) unless PATH holds them already;
    SystemExit when it holds another split (FLAGS names what changes a split)."""
    text = rows.to_csv(index=False)
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    elif path.read_text() != text:
        raise SystemExit(f"{path} holds another split (other {flags}); give a new --work")
    return path
