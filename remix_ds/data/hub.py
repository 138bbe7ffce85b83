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


def _short(e: BaseException, limit: int) -> str:
    """An exception as one line of at most `limit` characters (and " ...")."""
    text = f"{type(e).__name__}: {e}".strip()
    return text[:limit] + " ..." if len(text) > limit else text


def _failure(e: BaseException, what: str, label: str, fix: str) -> DataError:
    full = f"{type(e).__name__}: {e}".lower()
    unreachable = isinstance(e, (ConnectionError, TimeoutError)) or any(h in full for h in UNREACHABLE_HINTS)
    text = _short(e, 400)
    why = "the Hugging Face hub is unreachable" if unreachable else "datasets.load_dataset failed"
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


HUB_TIMEOUT_S = 10.0


def check_hub_model(model_id: str, what: str = "model", timeout: float = HUB_TIMEOUT_S) -> None:
    """A hub model id is usable: in the local hub cache, or its config.json reachable on the hub now (one
    request, ``timeout`` seconds, no retries). Otherwise one ConfigError that says why and what to do — before
    a run starts, rather than a long traceback after a dozen retries once it loads the model."""
    import os

    from ..errors import ConfigError

    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
        from huggingface_hub import errors as hf_errors
    except ImportError:
        return
    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return
    fix = (f"download it where the hub is reachable (huggingface-cli download {model_id}, or "
           f"snapshot_download) and give its local directory as {what}")
    if str(os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{what} {model_id!r}: not a local directory, not in the local hub cache, and "
                          f"HF_HUB_OFFLINE is set: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(model_id, "config.json"), timeout=timeout)
    except hf_errors.GatedRepoError:
        raise ConfigError(f"{what} {model_id!r}: a gated model on the hub: accept its terms on its hub page and "
                          f"log in (hf auth login / HF_TOKEN), or {fix}") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(f"{what} {model_id!r}: no such local directory, and no model of that id on the hub (or "
                          f"a private one: log in with hf auth login / HF_TOKEN)") from None
    except hf_errors.EntryNotFoundError:
        raise ConfigError(f"{what} {model_id!r}: the hub repository has no config.json: not a transformers "
                          f"model") from None
    except Exception as e:  # no network, DNS, timeout, proxy, server error
        raise ConfigError(f"{what} {model_id!r}: not a local directory and not in the local hub cache, and the "
                          f"Hugging Face hub is unreachable ({_short(e, 200)}): {fix}") from None
