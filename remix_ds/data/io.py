"""Reading local record files with errors that name the file and line."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from ..errors import DataError


def read_records(path: str) -> List[Dict[str, Any]]:
    """Records from a .json (a list, or {"data": [...]}) or .jsonl file."""
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}")
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
                records.append(rec)
        return records
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of JSON objects")
        return data
    raise DataError(f"{path}: unsupported file type (use .json or .jsonl)")


def require_fields(rec: Dict[str, Any], fields, path: str, row: int) -> None:
    for name in fields:
        if name not in rec or rec[name] is None or (isinstance(rec[name], str) and not rec[name].strip()):
            raise DataError(f"{path}: row {row}: missing required field {name!r} (fields present: "
                            f"{', '.join(sorted(rec)) or 'none'})")
