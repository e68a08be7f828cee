"""Access to the vendored benchmark data (``biaslab/data/<source>/``, each with its README and license),
with row-level validation: a corrupt row raises DataError naming file, line and field."""
from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from .errors import DataError

DATA_ROOT = Path(__file__).resolve().parent / "data"


def data_path(*parts: str) -> Path:
    p = DATA_ROOT.joinpath(*parts)
    if not p.exists():
        raise DataError(p, None, None, "vendored data file is missing (reinstall biaslab)")
    return p


def open_data(path: Path):
    """A data file opened for binary reading; ``*.gz`` is decompressed on the fly."""
    if str(path).endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def sha256_file(path: Path, *, content: bool = False) -> str:
    """sha256 of a file's bytes, or with ``content`` of what it holds (a ``*.gz`` file decompressed)."""
    h = hashlib.sha256()
    with (open_data(path) if content else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_fields(row: dict, required: Iterable[str], path, line: int) -> None:
    for f in required:
        if f not in row or row[f] is None or (isinstance(row[f], str) and row[f] == "" and f != "text"):
            raise DataError(path, line, f, "missing or empty")


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict]:
    rows = []
    if not Path(path).is_file():
        raise DataError(path, None, None, "data file is missing")
    with open_data(path) as f:
        for n, raw_bytes in enumerate(f, 1):
            try:
                raw = raw_bytes.decode("utf-8-sig" if n == 1 else "utf-8")   # a leading BOM is not an error
            except UnicodeDecodeError as e:
                raise DataError(path, n, None, f"not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(path, n, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, n, None, "expected a JSON object")
            if "_line" in row:
                raise DataError(path, n, "_line", "this field name is reserved (biaslab records each row's line "
                                "number in it); rename the field")
            check_fields(row, required, path, n)
            row["_line"] = n
            rows.append(row)
    return rows


def read_csv(path: Path, required: Iterable[str] = (), *, delimiter: str = ",", fieldnames=None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, fieldnames=fieldnames)
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(path, line, None, f"has more columns than the header ({len(reader.fieldnames)})")
            check_fields(row, required, path, line)
            row["_line"] = line
            rows.append(row)
    return rows
