"""The user's own table: a ``.csv`` file with a header row, or a 2-D ``.npy`` array, read into
``x: [N, D]`` float32. Every mistake raises :class:`~zoo.errors.ZooError` naming the place
(file, data row, column) and the fix.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zoo.errors import ZooError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)",
                     re.ASCII | re.IGNORECASE)
"""A number in a csv cell: ASCII digits with an optional sign, point and exponent (Python's
``float`` also reads ``1_000`` and non-ASCII digits, which a table should not hold). nan and inf
are read so that the error can name them."""

def read_csv(path: Path) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The numbers of a csv file with a header row; blank lines are skipped."""
    lines, rows = [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.reader(stream)
            for row in reader:
                if row:
                    lines.append(reader.line_num)
                    rows.append([cell.strip() for cell in row])
    except UnicodeDecodeError as err:
        raise ZooError(f"{path} is not a UTF-8 text file ({err.reason}): save it as csv "
                       "in UTF-8") from err
    except csv.Error as err:
        raise ZooError(f"{path}, line {reader.line_num}: not valid csv ({err})") from err
    except OSError as err:
        raise ZooError(f"{path} could not be read ({err.strerror or err})") from err
    if not rows:
        raise ZooError(f"{path} is empty: expected a header row of column names, then numbers")
    columns, body = tuple(rows[0]), rows[1:]
    for j, column in enumerate(columns, 1):
        if not column:
            raise ZooError(f"{path}: column {j} of the header has no name: name every column")
    if len(set(columns)) < len(columns):
        repeated = sorted({column for column in columns if columns.count(column) > 1})
        raise ZooError(f"{path}: the header repeats the column name(s) {', '.join(repeated)}: "
                       "make every name unique")
    if all(_is_number(column) for column in columns):
        raise ZooError(f"{path}: the first line ({', '.join(columns)}) is numbers, not a header: "
                       "add a header row of column names")
    if not body:
        raise ZooError(f"{path} has a header but no data rows")
    values = np.empty((len(body), len(columns)), dtype=np.float64)
    for i, row in enumerate(body):
        place = f"{path}: data row {i + 1} (line {lines[i + 1]})"
        if len(row) != len(columns):
            raise ZooError(f"{place} has {len(row)} cells, the header has {len(columns)}: "
                           "give every row one cell per column")
        for j, cell in enumerate(row):
            if not cell:
                raise ZooError(f"{place}, column {columns[j]!r} is empty: remove or impute "
                               "missing values")
            if not _is_number(cell):
                raise ZooError(f"{place}, column {columns[j]!r}: {cell!r} is not a number: the "
                               "table must be all numbers written with the digits 0-9 (drop or "
                               "encode text columns)")
            values[i, j] = float(cell)

    def where(i: int, j: int) -> str:
        return f"{path}: data row {i + 1} (line {lines[i + 1]}), column {columns[j]!r}"

    return _to_table(values, where, path), columns


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def read_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ZooError(f"{path} could not be read as a .npy array ({err}): save a numeric "
                       "array with numpy.save") from err
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ZooError(f"{path}: expected a numeric array, got {kind}: save a float array")
    if array.ndim == 1:
        raise ZooError(f"{path}: expected a table [rows, columns], got shape {array.shape}; save "
                       "it as x[:, None] for one column")
    if array.ndim != 2:
        raise ZooError(f"{path}: expected a table [rows, columns], got shape {array.shape}; "
                       "reshape it to 2-D (images as x.reshape(len(x), -1))")

    def where(i: int, j: int) -> str:
        return f"{path}: entry [{i}, {j}] (0-based row, column)"

    return _to_table(array.astype(np.float64), where, path)


def _to_table(values: np.ndarray, where: Callable[[int, int], str], path: Path) -> torch.Tensor:
    """A float32 tensor of a [rows, columns] array, refusing non-finite and too few rows."""
    rows, cols = values.shape
    if cols == 0:
        raise ZooError(f"{path} has no columns: expected a table [rows, columns]")
    if rows < 2:
        raise ZooError(f"{path} has {rows} data row(s): need at least 2")
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        i, j = bad[0]
        fix = "remove or impute missing values" if np.isnan(values[i, j]) else "replace it"
        raise ZooError(f"{where(i, j)} is {values[i, j]}: {fix}")
    x = torch.from_numpy(values).float()
    bad = torch.nonzero(~torch.isfinite(x))
    if len(bad):
        i, j = bad[0].tolist()
        raise ZooError(f"{where(i, j)} is {values[i, j]:g}, beyond the float32 range: rescale "
                       "the column")
    return x.contiguous()
