"""Images as CSV rows of pixel values: what ``normres predict`` labels.

One image a row, C*H*W integers 0-255 in CHW order, an optional header row of column names. Every
bad row is a :class:`~normres.errors.DataError` naming its line and column.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor

from normres import registry as R
from normres.errors import DataError

__all__ = ["read_pixel_csv", "write_pixel_csv"]


def read_pixel_csv(path: str | Path, spec: R.DatasetDef) -> Tensor:
    """Images from a CSV file, one per row, C*H*W integers 0-255 in CHW order; uint8 (N, C, H, W).

    A first row without a single number in it is a header (``p0,p1,...``); any other row is data,
    so a row with one bad value (``x``, ``0.5``) is an error naming its line and column, never taken
    for a header. :class:`DataError` for every bad row, and for a file that is not text.
    """
    path = Path(path)
    n_values = spec.channels * spec.height * spec.width
    shape_text = " x ".join(map(str, spec.shape))
    rows: list[list[int]] = []
    header = False
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if line == 1 and not any(_is_number(cell) for cell in row):
                    if len(row) != n_values:
                        raise DataError(f"{path}, line 1 (header): expected {n_values} columns ({spec.name}: "
                                        f"{shape_text}), got {len(row)}")  # fmt: skip
                    header = True
                    continue
                if bad := next((c for c in row if not _is_int(c)), None):
                    col = row.index(bad) + 1
                    raise DataError(f"{path}, line {line}, column {col}: {bad.strip()!r} is not an integer 0-255")
                values = [int(cell) for cell in row]
                if len(values) != n_values:
                    raise DataError(
                        f"{path}, line {line}: expected {n_values} values ({spec.name}: {shape_text}), got {len(values)}"
                    )
                if (lo := min(values)) < 0 or (hi := max(values)) > 255:
                    col = values.index(lo if lo < 0 else hi) + 1
                    raise DataError(f"{path}, line {line}, column {col}: {lo if lo < 0 else hi} is outside 0-255")
                rows.append(values)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text (UTF-8) CSV file ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no image rows" + (" (only a header)" if header else " (the file is empty)"))
    return torch.tensor(rows, dtype=torch.uint8).view(len(rows), *spec.shape)


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def write_pixel_csv(path: str | Path, x: Tensor) -> Path:
    """Write a uint8 batch (N, C, H, W) as CSV rows with a header ``p0,p1,...`` (see read_pixel_csv)."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    path = Path(path)
    flat = x.reshape(len(x), -1).tolist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"p{i}" for i in range(x[0].numel() if len(x) else 0)])
        writer.writerows(flat)
    return path
