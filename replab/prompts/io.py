"""Reading user prompt files (JSONL, CSV, YAML) into raw row dicts.

Schema (one object / line / CSV row per prompt): ``prompt`` (required), optional
``answer``, ``foils`` (list; in CSV ``|``-separated or a JSON list),
``corrupt_prompt``, ``corrupt_answer``, ``template``, ``group``; every other key
is a label column, kept as given.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from replab.errors import ReplabError
from replab.io import read_text
from replab.prompts.schema import STANDARD_COLUMNS

USER_SUFFIXES = (".jsonl", ".csv", ".yaml", ".yml")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines are skipped); ReplabError with the line number on bad
    JSON or bytes that are not UTF-8 (:func:`replab.io.read_text`)."""
    rows: list[dict[str, Any]] = []
    text = read_text(path, "prompt file")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReplabError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ReplabError(f"{path}: line {n} is not a JSON object")
        rows.append(obj)
    return rows


def _csv_value(v: str) -> Any:
    """CSV cells: empty -> None; integers/floats kept as numbers for label columns."""
    if v is None or v == "":
        return None
    return v


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line. Empty cells are missing values.

    Label cells that look like integers or floats are converted to numbers.
    """

    text = read_text(path, "prompt file")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:
            return []
        rows = []
        for rec in reader:
            if None in rec:
                raise ReplabError(f"{path}: row {reader.line_num - 1} has more cells than the header")
            row = {}
            for k, v in rec.items():
                v = _csv_value(v)
                if k not in STANDARD_COLUMNS and isinstance(v, str):
                    v = _maybe_number(v)
                row[k] = v
            rows.append(row)
        return rows
    except csv.Error as e:
        raise ReplabError(f"{path}: malformed CSV ({e})") from None


def _maybe_number(v: str) -> Any:
    try:
        i = int(v)
        return i if str(i) == v else v  # only canonical integers ("007" stays a string)
    except ValueError:
        pass
    try:
        f = float(v)
    except ValueError:
        return v
    return f if v.strip().lower() not in ("nan", "inf", "-inf", "infinity") else v


def read_yaml(path: Path) -> Any:
    """Parsed YAML document; ReplabError on a syntax error."""
    text = read_text(path, "YAML file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = str(e).splitlines()[0] if str(e) else "syntax error"
        raise ReplabError(f"{path}: invalid YAML ({msg})") from None


def read_user_rows(path: Path) -> list[dict[str, Any]]:
    """Raw row dicts of a user JSONL or CSV file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    raise ReplabError(f"unsupported prompt file type {suffix!r} for {path} (use .jsonl, .csv or .yaml)")
