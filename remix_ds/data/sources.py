"""One loader per dataset source. Each returns a list of Example, cut to ``num_examples``.

Register new sources with ``@source("name", factoid=True)``.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List

from ..config import DatasetSpec
from ..errors import ConfigError, DataError
from .example import Example
from .io import read_records, require_fields
from .kvr import kvr_examples

Loader = Callable[[DatasetSpec, int], List[Example]]
SOURCES: Dict[str, Loader] = {}
FACTOID: Dict[str, bool] = {}


def source(name: str, factoid: bool = True):
    def deco(fn: Loader) -> Loader:
        SOURCES[name] = fn
        FACTOID[name] = factoid
        return fn
    return deco


def shuffled_head(items: List[Example], n: int, seed: int) -> List[Example]:
    """The first n items after a deterministic shuffle by the seed."""
    order = list(range(len(items)))
    random.Random(f"shuffle-{seed}").shuffle(order)
    return [items[i] for i in order[:n]]


@source("kvr")
def load_kvr(spec: DatasetSpec, seed: int) -> List[Example]:
    if spec.path:
        return load_json(spec, seed)
    return kvr_examples(spec.num_examples, seed, "A")


@source("kvrB")
def load_kvr_b(spec: DatasetSpec, seed: int) -> List[Example]:
    if spec.path:
        return load_json(spec, seed)
    return kvr_examples(spec.num_examples, seed, "B")


@source("json")
def load_json(spec: DatasetSpec, seed: int) -> List[Example]:
    """Local factoid records: {"prompt"|"question": ..., "answer": ..., "aliases": [...]} per row."""
    if not spec.path:
        raise ConfigError(f"source {spec.source!r} needs a path to a .json or .jsonl file")
    records = read_records(spec.path)
    out = []
    seen_prompts = set()
    for row, rec in enumerate(records, 1):
        qkey = "prompt" if "prompt" in rec else "question"
        require_fields(rec, [qkey, "answer"], spec.path, row)
        if spec.source.startswith("kvr"):
            if rec[qkey] in seen_prompts:
                raise DataError(f"{spec.path}: row {row}: duplicate KVR key in {rec[qkey]!r}")
            seen_prompts.add(rec[qkey])
        aliases = rec.get("aliases") or []
        out.append(Example(prompt=str(rec[qkey]), answer=str(rec["answer"]), aliases=[str(a) for a in aliases],
                           source=spec.source))
    if not out:
        raise DataError(f"{spec.path}: the dataset is empty")
    return shuffled_head(out, spec.num_examples, seed)


def load_examples(spec: DatasetSpec, seed: int, name: str = "") -> List[Example]:
    if spec.source not in SOURCES:
        raise ConfigError(f"dataset {name or spec.source}: unknown source {spec.source!r} "
                          f"(known: {', '.join(sorted(SOURCES))})")
    examples = SOURCES[spec.source](spec, seed)
    if not examples:
        raise DataError(f"dataset {name or spec.source} ({spec.source}): no examples")
    factoid = FACTOID[spec.source]
    for ex in examples:
        ex.factoid = factoid
    return examples
