"""Reading a task's rows from a local JSON / JSON-lines file or a Hugging Face dataset name.

One place for what every task's loader needs: the rows as dicts, and a name for each row
("FILE, row N") so that a bad row is reported where the user can find it.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows of a JSON list, a JSON-lines file, or a Hugging Face dataset (needs ``datasets``).

    An empty file is an error: a task evaluated on no rows would report a meaningless figure.
    A row that is not an object is named with its index.
    """
    path = Path(source)
    if path.is_file():
        rows = _parse_file(path)
    elif path.suffix in {".json", ".jsonl"} or path.exists():
        raise ValueError(f"data file {path} does not exist")
    else:
        rows = _load_hub_dataset(str(source), split)
    if not rows:
        raise ValueError(f"{source}: no rows")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{row_name(source, index)}: expected an object, got {type(row).__name__}")
    return rows


def row_name(source: str | Path, index: int) -> str:
    """How errors name a row: the file and the row's index (its line for JSON lines)."""
    return f"{source}, row {index}"


def _parse_file(path: Path) -> list:
    text = path.read_text()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: neither a JSON list nor JSON lines (line {number + 1}: {err})") from None
        return rows
    if isinstance(rows, dict):  # JSON lines with a single row
        return [rows]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    return rows


def _load_hub_dataset(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{name!r} is not a file; loading a Hugging Face dataset needs `pip install datasets`") from None
    return list(datasets.load_dataset(name, split=split))


def read_lines(source: str | Path, split: str = "train", column: str = "text") -> list[str]:
    """The lines of a text file (one item a line, newline removed), or a Hugging Face dataset's ``column``.

    An empty source, or an empty line, is an error that names the file and line.
    """
    path = Path(source)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
    elif path.suffix == ".txt" or path.exists():
        raise ValueError(f"text file {path} does not exist" if not path.exists() else f"{path} is not a file")
    else:
        rows = _load_hub_dataset(str(source), split)
        if rows and column not in rows[0]:
            raise ValueError(f"dataset {source!r} has no column {column!r} (columns: {', '.join(rows[0])})")
        lines = [str(row[column]) for row in rows]
    if not lines:
        raise ValueError(f"{source}: no lines")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{source}, line {number}: empty")
    return lines
