"""REMIX mixing data: random word sequences, generic pretraining text, and replay of an earlier dataset.

Random words and generic text share the study's passage shape: the prompt is
``Complete the following partial passage:\\n\\n`` followed by ``prompt_words`` words, the target the next
``target_words`` words (50 and 50 by default).

- ``random-words``: words drawn uniformly, with replacement, from the ``web2`` word list of the
  ``english-words`` package (lower-cased, alphabetic words of 2 to 12 letters, sorted so the draw is
  reproducible from the seed). With ``path:``, the passages of a file in the schema of the study's
  ``random_pretraining.jsonl`` instead (``datapoint_idx``, ``input_text``, ``target_text`` per line; prompt
  and target used verbatim, ``prompt_words``/``target_words`` unused): shuffled by the seed, first ``n``
  (``random_file_examples``).
- ``knowledge-pile``, ``fineweb``, ``arxiv-pile``: documents of generic text. The first ``pool`` documents
  (20,000, as in the study) are read; those of at least ``prompt_words + target_words`` whitespace-separated
  words (100 by default) become passages (their first words, split as above); the passages are shuffled by
  the seed and the first ``n`` are used. Sizes are counted in documents.
- ``replay``: examples of an earlier stage's dataset (by default stage 1's, D_A), shuffled by the seed and
  repeated in a new shuffle if more are needed than the dataset holds (the paper's replay baseline).

Every mixing example has role "mix": it is trained on and never evaluated.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass
from itertools import islice
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..errors import DataError
from .example import Example

log = logging.getLogger(__name__)
PASSAGE_PROMPT = "Complete the following partial passage:\n\n"
TEXT_POOL = 20000


@functools.lru_cache(maxsize=1)
def word_list() -> List[str]:
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=True, alpha=True)
    return sorted(w for w in words if 2 <= len(w) <= 12)


def num_mix_examples(n_data: int, ratio: float) -> int:
    """The study's count: int(len(D) * mix_ratio)."""
    if ratio < 0:
        raise ValueError(f"mix ratio must be >= 0, got {ratio}")
    return int(n_data * ratio)


def passage(words: Sequence[str], prompt_words: int, target_words: int, source: str) -> Example:
    return Example(prompt=PASSAGE_PROMPT + " ".join(words[:prompt_words]),
                   answer=" ".join(words[prompt_words:prompt_words + target_words]), role="mix", source=source,
                   factoid=False)


PASSAGE_FILE_FIELDS = ("datapoint_idx", "input_text", "target_text")


def read_passage_file(path: str, where: str) -> List[Example]:
    """The passages of a file in the schema of the study's ``random_pretraining.jsonl`` (read by its
    ``load_random_pretraining``, src/datasets.py:606-635): one JSON object per line with ``datapoint_idx`` (an
    integer), ``input_text`` (the prompt) and ``target_text`` (the target), in file order. Blank lines are
    skipped. A malformed line is a DataError naming the file and line. A .json or .parquet file of such
    records works too (errors then name the record's 1-based row)."""
    from .io import iter_jsonl, local_rows

    path = os.path.expanduser(path)
    if path.endswith(".jsonl") and os.path.isfile(path):
        rows: Iterable = ((path, lineno, rec) for lineno, rec in iter_jsonl(path))
        unit = "line"
    else:
        rows, unit = local_rows(path), "row"
    try:
        out = _passages(rows, unit, where)
    except DataError as e:   # io's own errors (malformed JSON, a missing file) name the file and line already
        if str(e).startswith(where):
            raise
        raise DataError(f"{where}: {e}") from None
    if not out:
        raise DataError(f"{where}: {path}: the passage file is empty (no rows)")
    return out


def _passages(rows: Iterable, unit: str, where: str) -> List[Example]:
    out = []
    for origin, n, rec in rows:
        at = f"{where}: {origin}: {unit} {n}"
        if not isinstance(rec, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(rec).__name__}")
        missing = [f for f in PASSAGE_FILE_FIELDS if f not in rec]
        if missing:
            raise DataError(f"{at}: missing field {missing[0]!r} (a random_pretraining.jsonl row holds "
                            f"{', '.join(PASSAGE_FILE_FIELDS)}; fields present: {', '.join(sorted(rec)) or 'none'})")
        idx = rec["datapoint_idx"]
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise DataError(f"{at}: datapoint_idx must be an integer, got {idx!r}")
        for f in ("input_text", "target_text"):
            if not isinstance(rec[f], str) or not rec[f].strip():
                raise DataError(f"{at}: {f} must be a non-empty string, got {rec[f]!r}")
        out.append(Example(prompt=rec["input_text"], answer=rec["target_text"], role="mix", source="random-words",
                           factoid=False))
    return out


_FILE_CACHE: Dict[tuple, List[Example]] = {}


def random_file_examples(path: str, n: int, rng_seed: Union[int, str], where: str, strict: bool = True
                         ) -> List[Example]:
    """n passages of a ``random_pretraining.jsonl``-style file (``read_passage_file``): the file's rows shuffled
    by ``random.Random(rng_seed)``, the first n. The study shuffles the whole list with Python's ``random`` seeded
    by the run seed and takes the first int(len(D) * ratio) (src/datasets.py:508-525, seed: src/train.py:102);
    ``random.Random(seed)`` draws the same permutation. A longer n takes the same first passages, and more.
    Fewer rows than n: a DataError when ``strict``, else (the study's slice) all of them, with a warning."""
    from .io import tree_mtime

    key = (os.path.expanduser(path), tree_mtime(path))
    rows = _FILE_CACHE.get(key)
    if rows is None:
        rows = read_passage_file(path, where)
        if len(_FILE_CACHE) >= 4:
            _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
        _FILE_CACHE[key] = rows
    if n > len(rows):
        if strict:
            raise DataError(f"{where}: {n} mixing examples needed but {path} holds only {len(rows)} passages; "
                            f"lower mix.ratio or give a longer file")
        log.warning("%s: %d mixing examples wanted but %s holds only %d passages; all of them are used (as the "
                    "study's slice does)", where, n, path, len(rows))
    order = list(range(len(rows)))
    random.Random(rng_seed).shuffle(order)
    return [dataclasses.replace(rows[i]) for i in order[:n]]


def random_word_examples(n: int, seed: int, prompt_words: int = 50, target_words: int = 50) -> List[Example]:
    words = word_list()
    rng = random.Random(f"random-words-{seed}")
    out = []
    for _ in range(n):
        seq = [rng.choice(words) for _ in range(prompt_words + target_words)]
        out.append(passage(seq, prompt_words, target_words, "random-words"))
    return out


# ---------------------------------------------------------------- generic text

@dataclass(frozen=True)
class TextSource:
    name: str
    hub: str
    fields: Sequence[str]            # text column, first present wins
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = True


TEXT_SOURCES: Dict[str, TextSource] = {
    "knowledge-pile": TextSource("knowledge-pile", "Query-of-CC/Knowledge_Pile", ("content", "text")),
    "fineweb": TextSource("fineweb", "kh4dien/fineweb-100m-sample", ("text", "content")),
    "arxiv-pile": TextSource("arxiv-pile", "haritzpuerto/the_pile_arxiv_50k_sample", ("text", "content")),
}


def text_documents(mix, where: str, fix: str) -> List[List[str]]:
    """The whitespace-split documents of the first `pool` rows of a text source (local path or hub)."""
    from .hub import hub_rows
    from .io import local_rows

    info = TEXT_SOURCES[mix.source]
    pool = mix.pool if mix.pool is not None else TEXT_POOL
    if pool < 1:
        raise DataError(f"{where}: pool must be at least 1, got {pool}")
    fields = (mix.text_field,) if mix.text_field else tuple(info.fields)
    if mix.path:
        rows = islice(local_rows(mix.path, mix.split, info.split), pool)
    else:
        own = mix.name is None
        rows = hub_rows(mix.name or info.hub, mix.config if mix.config is not None else (info.config if own else None),
                        mix.split or info.split, what=where, fix=fix, revision=mix.revision,
                        streaming=info.streaming if mix.streaming is None else mix.streaming, pool=pool,
                        columns=fields)
    docs, n_rows = [], 0
    for origin, row, rec in rows:
        n_rows += 1
        field = next((f for f in fields if f in rec), None)
        if field is None or not isinstance(rec[field], str):
            raise DataError(f"{where}, {origin}: row {row}: missing required text field "
                            f"{' or '.join(repr(f) for f in fields)} (fields present: {', '.join(sorted(rec)) or 'none'})")
        docs.append(rec[field].split())
    if n_rows == 0:
        raise DataError(f"{where}: the text source is empty (no rows)")
    return docs


_DOC_CACHE: Dict[tuple, List[List[str]]] = {}


def text_passage_examples(mix, n: int, seed: int, where: str, fix: str,
                          rng_seed: Optional[Union[int, str]] = None) -> List[Example]:
    """n passages from documents of at least prompt_words + target_words words, shuffled by the seed
    (``random.Random(rng_seed)`` when given: the study's draw, see ``random_file_examples``). A longer n takes
    the same first passages, and more."""
    if n == 0:
        return []
    from .io import tree_mtime

    key = (mix.source, mix.path, tree_mtime(mix.path) if mix.path else None, mix.name, mix.config, mix.split,
           mix.revision, mix.streaming, mix.pool, mix.text_field)
    docs = _DOC_CACHE.get(key)
    if docs is None:
        docs = text_documents(mix, where, fix)
        if len(_DOC_CACHE) >= 8:
            _DOC_CACHE.pop(next(iter(_DOC_CACHE)))
        _DOC_CACHE[key] = docs
    need = mix.prompt_words + mix.target_words
    eligible = [d for d in docs if len(d) >= need]
    if len(eligible) < n:
        raise DataError(f"{where}: {n} mixing examples needed but only {len(eligible)} of the {len(docs)} documents "
                        f"read have at least {need} words; raise mix.pool, lower mix.ratio, or give more text")
    order = list(range(len(eligible)))
    random.Random(f"{mix.source}-{seed}" if rng_seed is None else rng_seed).shuffle(order)
    return [passage(eligible[i], mix.prompt_words, mix.target_words, mix.source) for i in order[:n]]


def clear_cache() -> None:
    _DOC_CACHE.clear()
    _FILE_CACHE.clear()


# ---------------------------------------------------------------- replay

def replay_examples(data: Sequence[Example], n: int, seed: int, source: str) -> List[Example]:
    """n examples of an earlier dataset, as mixing: shuffled by the seed, reshuffled per pass if n > len."""
    if n and not data:
        raise DataError(f"replay of {source}: the dataset is empty")
    out: List[Example] = []
    rng = random.Random(f"replay-{seed}")
    while len(out) < n:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in order[:n - len(out)]:
            ex = data[i]
            out.append(dataclasses.replace(ex, aliases=list(ex.aliases), role="mix", factoid=False,
                                           source=f"replay:{source}",
                                           messages=list(ex.messages) if ex.messages else None))
    return out
