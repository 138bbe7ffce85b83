"""Reading local record files with errors that name the file and line.

A local dataset ``path`` may be:

- a ``.json`` file (a list of objects, or ``{"data": [...]}``) or a ``.jsonl`` file;
- a ``.parquet`` file;
- a directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict; the split is chosen
  by ``split``, ``a+b`` concatenates);
- a directory of such files: with a ``<split>/`` sub-directory (EntityQuestions' ``dataset/train/P17.train.json``
  layout) that sub-directory is read, otherwise every data file below the directory, in sorted path order;
  where the files' names carry their splits (``P19.train.json`` beside ``P19.dev.json``), only the split's
  files are read (a folder of several splits whose files do not all name theirs is refused);
- a glob pattern (``data/*.jsonl``).

Rows come back as ``(origin, row, record)``: the file (or directory and split) and the 1-based row number
within it, so that a bad row can be named exactly.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..errors import DataError

DATA_EXTS = (".json", ".jsonl", ".parquet")
Row = Tuple[str, int, Dict[str, Any]]


def read_records(path: str) -> List[Dict[str, Any]]:
    """Records from a .json (a list, or {"data": [...]}) or .jsonl file."""
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory where a data file was expected")
    if path.endswith((".jsonl", ".json")) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (0 bytes): no records to read")
    if path.endswith(".jsonl"):
        records = [rec for _, rec in iter_jsonl(path)]
        if not records:
            raise DataError(f"{path}: the file holds only blank lines: no records to read")
        return records
    if path.endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        if not text.strip():
            raise DataError(f"{path}: the file holds only whitespace: no records to read")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and _is_json_lines(text):
                raise DataError(f"{path}: holds one JSON object per line (JSON Lines), not one JSON document: "
                                f"rename it to {os.path.splitext(os.path.basename(path))[0]}.jsonl") from None
            line, col = _fault_position(text, e)
            raise DataError(f"{path}:{line}: malformed JSON: {json_fault(text, e)}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of JSON objects")
        return data
    if path.endswith(".parquet"):
        return read_parquet(path)
    raise DataError(f"{path}: unsupported file type (use .json, .jsonl, .parquet or a save_to_disk directory)")


def iter_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, record) for every non-blank line of a .jsonl file; a bad line is a DataError naming it."""
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # decoded again without the line break, so that a value missing at the end of the line is
                # reported there, not at "line 2 column 1" of the line
                text = line.rstrip("\r\n")
                try:
                    json.loads(text)
                    raise DataError(f"{path}:{lineno}: malformed JSON line") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line: {json_fault(text, e, False)}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            yield lineno, rec


def _is_json_lines(text: str) -> bool:
    try:
        return all(isinstance(json.loads(line), dict) for line in text.splitlines() if line.strip())
    except json.JSONDecodeError:
        return False


def _fault_position(text: str, e: json.JSONDecodeError) -> Tuple[int, int]:
    """Where the fault is: the decoder's position, or, when it stopped at what follows a trailing comma or
    at the start of a line after one (``[{...},\n]``), the comma itself."""
    pos = e.pos
    if e.msg.startswith(("Expecting value", "Expecting property name")):
        back = pos - 1
        while back >= 0 and text[back] in " \t\r\n":
            back -= 1
        if back >= 0 and text[back] == "," and pos < len(text) and text[pos] in "]}":
            pos = back
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def json_fault(text: str, e: json.JSONDecodeError, with_line: bool = True) -> str:
    """The decoder's complaint at the fault's line and column, with the text there and a caret under it."""
    line, col = _fault_position(text, e)
    what = "trailing comma (nothing follows it)" if _fault_position(text, e) != (e.lineno, e.colno) else e.msg
    lines = text.splitlines()
    src = lines[line - 1] if line <= len(lines) else ""
    start = max(0, col - 40)
    snippet = src[start:col + 30]
    at = f"line {line} column {col}" if with_line else f"column {col}"
    return f"{what} at {at}:\n    {snippet}\n    {' ' * (col - 1 - start)}^"


def read_parquet(path: str) -> List[Dict[str, Any]]:
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read parquet file ({type(e).__name__}: {e})") from None


def require_fields(rec: Dict[str, Any], fields, path: str, row: int) -> None:
    for name in fields:
        if name not in rec or rec[name] is None or (isinstance(rec[name], str) and not rec[name].strip()):
            raise DataError(f"{path}: row {row}: missing required field {name!r} (fields present: "
                            f"{', '.join(sorted(rec)) or 'none'})")


# ---------------------------------------------------------------- local paths of every kind

def is_saved_dataset(path: str) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(path, "state.json")))


def data_files(path: str, split: Optional[str] = None, exclude: Sequence[str] = ()) -> List[str]:
    """The data files a local directory or glob stands for, in sorted order."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if f.endswith(DATA_EXTS))
        if not files:
            raise DataError(f"{path}: the pattern matches no .json/.jsonl/.parquet file")
        return files
    if split and "+" in split:
        parts = [os.path.join(path, s) for s in split.split("+")]
        if all(os.path.isdir(p) for p in parts):
            return [f for p in parts for f in data_files(p, None, exclude)]
    root = path
    if split and "+" not in split and os.path.isdir(os.path.join(path, split)):
        root = os.path.join(path, split)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.endswith(DATA_EXTS) and f not in exclude and not f.startswith("."):
                files.append(os.path.join(dirpath, f))
    files.sort(key=lambda f: os.path.relpath(f, root))
    if not files:
        raise DataError(f"{path}: no .json, .jsonl or .parquet files in this directory"
                        + (f" (looked in {root})" if root != path else ""))
    return select_split_files(files, root, split)


# split names a file name may carry: P19.train.json, P19.dev.json, train.jsonl, test-00000-of-00001.parquet
SPLIT_NAMES = ("train", "dev", "test", "validation", "valid", "val", "eval")


def file_split(path: str) -> Optional[str]:
    """The split a data file's name names (``P19.dev.json`` -> dev, ``train.jsonl`` -> train), or None."""
    name = os.path.basename(path)
    for ext in DATA_EXTS:
        if name.endswith(ext):
            name = name[:-len(ext)]
    parts = name.split(".")
    for token in (parts[-1], parts[0].split("-")[0]) if len(parts) > 1 else (parts[0].split("-")[0],):
        if token.lower() in SPLIT_NAMES:
            return token.lower()
    return None


def select_split_files(files: List[str], root: str, split: Optional[str]) -> List[str]:
    """The files of ``split`` when the files name their splits (``P19.train.json`` beside ``P19.dev.json``):
    a folder holding several splits side by side is never read as all of them at once. A folder whose files
    name one split (or none) is read whole, as before; one where the split of some files cannot be told
    beside files of several splits is refused."""
    splits = {f: file_split(f) for f in files}
    named = sorted({s for s in splits.values() if s})
    if len(named) < 2:
        return files
    unnamed = [f for f, s in splits.items() if s is None]
    if unnamed:
        raise DataError(f"{root}: files of several splits ({', '.join(named)}) side by side with files whose split "
                        f"cannot be told from their name (e.g. {os.path.relpath(unnamed[0], root)}): put each "
                        f"split's files in a folder of its own (train/, dev/, test/) or name them NAME.SPLIT.json")
    if not split:
        raise DataError(f"{root}: holds files of several splits ({', '.join(named)}): choose one with split:")
    want = [p.strip().lower() for p in split.split("+")]
    missing = [p for p in want if p not in named]
    if missing:
        raise DataError(f"{root}: no {missing[0]!r} files (the file names name the splits {', '.join(named)}); "
                        f"choose one with split:")
    return [f for f in files if splits[f] in want]


def _saved_dataset_rows(path: str, split: Optional[str], default_split: Optional[str]) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read the save_to_disk directory ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        want = split or (default_split if default_split in names else None)
        if want is None:
            if len(names) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {', '.join(names)}; choose one with split:")
            want = names[0]
        parts = want.split("+")
        for p in parts:
            if p not in names:
                raise DataError(f"{path}: no split {p!r} (splits: {', '.join(names)})")
        for p in parts:
            where = f"{path} [split {p}]"
            for i, rec in enumerate(ds[p], 1):
                yield where, i, rec
    else:
        for i, rec in enumerate(ds, 1):
            yield path, i, rec


def local_rows(path: str, split: Optional[str] = None, default_split: Optional[str] = None,
               exclude: Sequence[str] = ()) -> Iterator[Row]:
    """Every record of a local file, save_to_disk directory, directory of files or glob."""
    path = os.path.expanduser(path)
    if is_saved_dataset(path):
        yield from _saved_dataset_rows(path, split, default_split)
        return
    if os.path.isdir(path) or any(ch in path for ch in "*?["):
        files = data_files(path, split or default_split, exclude)
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"dataset file not found: {path}")
    for f in files:
        for i, rec in enumerate(read_records(f), 1):
            yield f, i, rec


def tree_mtime(path: str) -> float:
    """A cheap change marker for a local path (file, directory or glob): the newest mtime below it."""
    path = os.path.expanduser(path)
    if any(ch in path for ch in "*?["):
        return max([os.path.getmtime(f) for f in glob.glob(path, recursive=True)] or [0.0])
    if not os.path.exists(path):
        return 0.0
    if os.path.isfile(path):
        return os.path.getmtime(path)
    newest = os.path.getmtime(path)
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            newest = max(newest, os.path.getmtime(os.path.join(dirpath, f)))
    return newest


def iter_with_rows(records: Iterable[Dict[str, Any]], origin: str) -> Iterator[Row]:
    for i, rec in enumerate(records, 1):
        yield origin, i, rec
