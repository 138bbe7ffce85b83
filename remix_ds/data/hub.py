"""Reading a dataset through the ``datasets`` library (the Hugging Face hub, or a local dataset directory).

Everything that is not a plain local file goes through ``datasets.load_dataset(id, config, split=...,
revision=..., streaming=...)``: the hub id of a source, or any other id or local dataset directory named
by a recipe's ``name:``. Failures become a DataError that names the dataset and says how to point the
recipe at local files instead.
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

from ..errors import DataError, RemixError
from .io import Row

log = logging.getLogger(__name__)

UNREACHABLE_HINTS = ("couldn't reach", "connection", "offline", "name or service not known", "timed out",
                     "max retries", "temporary failure")


def hub_label(hub_id: str, config: Optional[str], split: Optional[str], revision: Optional[str] = None) -> str:
    parts = [hub_id]
    if config:
        parts.append(f"config {config}")
    if split:
        parts.append(f"split {split}")
    if revision:
        parts.append(f"revision {revision}")
    return parts[0] + (f" [{', '.join(parts[1:])}]" if len(parts) > 1 else "")


def _failure(e: BaseException, what: str, label: str, fix: str) -> DataError:
    text = f"{type(e).__name__}: {e}".strip()
    unreachable = isinstance(e, (ConnectionError, TimeoutError)) or any(h in text.lower() for h in UNREACHABLE_HINTS)
    why = "the Hugging Face hub is unreachable" if unreachable else "datasets.load_dataset failed"
    if len(text) > 400:
        text = text[:400] + " ..."
    return DataError(f"{what}: cannot load {label}: {why} ({text}). To use local files instead, download the "
                     f"data where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR), or the "
                     f"dataset's own .json/.jsonl/.parquet files) and {fix}; see docs/datasets.md")


def hub_rows(hub_id: str, config: Optional[str], split: Optional[str], *, what: str, fix: str,
             revision: Optional[str] = None, streaming: bool = False, pool: Optional[int] = None,
             columns: Sequence[str] = ()) -> Iterator[Row]:
    """Rows of ``datasets.load_dataset(hub_id, config, split=split)``, the first ``pool`` only if given.

    ``what`` names the dataset in errors (e.g. "dataset A (source popqa)"); ``fix`` says which recipe key
    to set to local files (e.g. "set datasets.A.path: FILE_OR_DIR in the recipe").
    """
    import datasets

    label = hub_label(hub_id, config, split, revision)
    try:
        ds = datasets.load_dataset(hub_id, config, split=split, revision=revision, streaming=streaming)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise DataError(f"{what}: {label} has splits {', '.join(ds)}; choose one with split:")
        names = ds.column_names
        if columns and names:
            keep = [c for c in columns if c in names]
            if keep:
                ds = ds.select_columns(keep)
        if pool is not None:
            ds = ds.take(pool) if streaming else ds.select(range(min(pool, len(ds))))
        for i, rec in enumerate(ds, 1):
            yield label, i, rec
    except RemixError:
        raise
    except Exception as e:  # network, missing repo or config, scripts no longer supported, ...
        raise _failure(e, what, label, fix) from None
