"""Atomic file helpers: a directory or JSON file that marks work as done is written under a temporary name and
renamed into place, so a killed run never leaves a half-written one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def atomic_save(out_dir: str, write: Callable[[str], Any]) -> None:
    """Write into a temporary sibling directory, then rename it into place."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_json(path: Any) -> Any:
    """A JSON file's content, or None where it is missing or unreadable (a killed write, another format)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
