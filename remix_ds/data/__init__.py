"""Data: source loaders -> Example -> cut to size -> + mixing -> shuffled by seed.

``semantics: study`` (``Recipe.study``) changes what the data layer hands the training side, as the study's
released code does it (docs/fidelity.md):

- every example is marked ``study_format``: it trains on the study's training text (each turn stripped,
  ``formatting.encode_study_example``) while generation and scoring keep its prompt as is;
- every row of a source is kept, repeated prompts and KVR keys included (``sources.keep_every_row``);
- a stage with mixing trains on the first num_examples * (1 + ratio) examples of its dataset's pool followed
  by int(len(pool) * ratio) mixing examples (``study_train_set``): for a non-factoid dataset, whose pool is the
  whole source, mixing reaches training only when the pool is shorter than that;
- mixing passages are drawn as the study draws them (``random.Random(seed)``, the run seed).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..config import OVERLONG, Recipe, StageSpec
from ..errors import ConfigError, DataError
from .example import Example
from .formatting import encoded_length
from .mixing import (TEXT_SOURCES, num_mix_examples, random_file_examples, random_word_examples, replay_examples,
                     text_passage_examples)
from .sources import (FACTOID, SOURCES, describe, load_examples, load_fitting_examples, load_pool,
                      source_is_factoid)

log = logging.getLogger(__name__)
MIX_SOURCES = ("random-words",) + tuple(TEXT_SOURCES) + ("replay",)


def dataset_examples(recipe: Recipe, key: str) -> List[Example]:
    """The examples of dataset ``key``, cut to size: what a stage trains on, evaluation scores, replay replays and
    the stage fingerprint hashes. With ``overlong: drop`` they are chosen among the examples whose encoding fits
    the recipe's max_seq_length, counted with the recipe model's tokenizer (``fitting_examples``)."""
    spec = recipe.datasets[key]
    if _overlong(recipe, key) == "drop":
        return fitting_examples(recipe, key, recipe_tokenizer(recipe, key), recipe.max_seq_length)
    seed = recipe.seed if spec.seed is None else spec.seed
    return in_semantics(recipe, load_examples(spec, seed, key, keep_repeats=recipe.follows_study("rows")))


def in_semantics(recipe: Recipe, examples: List[Example]) -> List[Example]:
    """The examples (fresh objects) marked ``study_format`` under ``semantics: study``, so that they train on the
    study's training text (``formatting.encode_example``); unchanged under ``semantics: remix``."""
    if recipe.follows_study("prompts"):
        for ex in examples:
            ex.study_format = True
    return examples


def _overlong(recipe: Recipe, key: str) -> str:
    rule = recipe.datasets[key].overlong
    if rule not in OVERLONG:
        raise ConfigError(f"datasets.{key}.overlong must be one of {', '.join(OVERLONG)}, got {rule!r}")
    return rule


_TOKENIZERS: Dict[str, Any] = {}
_LENGTHS: "weakref.WeakKeyDictionary[Any, Dict[Tuple, int]]" = weakref.WeakKeyDictionary()
_LOGGED: Set[Tuple] = set()


def recipe_tokenizer(recipe: Recipe, key: str = "") -> Any:
    """The tokenizer of the recipe's model, loaded once per process and model path. Every stage trains with it
    (stage 1 loads it from the model, later stages from the earlier stage's output, which saves it)."""
    from ..model import load_tokenizer
    from ..tiny import resolve_model_path

    path = resolve_model_path(recipe.model, recipe.tiny)
    tok = _TOKENIZERS.get(path)
    if tok is None:
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"datasets.{key or '<name>'}.overlong: drop counts each example's tokens with the "
                              f"model's tokenizer, which could not be loaded from {path!r}: {e}") from None
        _TOKENIZERS[path] = tok
    return tok


def _log_once(level: int, msg: str, *args) -> None:
    if (msg, args) not in _LOGGED:
        _LOGGED.add((msg, args))
        log.log(level, msg, *args)


def fitting_examples(recipe: Recipe, key: str, tokenizer: Any, max_seq_length: int) -> List[Example]:
    """Dataset ``key``'s examples with its ``overlong`` rule applied to the choice of examples.

    ``overlong: drop`` (the study's rule: its encoder returns None for an example longer than max_seq_length
    and it takes further examples until it has train_num_examples): the dataset's order (seed-shuffled, or the
    file order with ``shuffle: false``) is walked, every example encoded (``formatting.encode_example``), and
    those that fit max_seq_length are kept until num_examples are: the set always has num_examples examples
    while the source holds enough, none over-long. ``skip`` counts fitting examples, so a ``...B`` source takes
    the num_examples fitting examples after those its A counterpart (same source, seed and rule) took. A
    generated set (kvr without a path) loses its over-long examples without replacement. Logs how many were
    skipped; warns when fewer than num_examples fit.

    ``overlong: truncate``: exactly ``load_examples``' cut (over-long examples are handled by
    ``encode_examples``: factoids dropped, other data truncated)."""
    spec = recipe.datasets[key]
    seed = recipe.seed if spec.seed is None else spec.seed
    if _overlong(recipe, key) != "drop":
        return in_semantics(recipe, load_examples(spec, seed, key, keep_repeats=recipe.follows_study("rows")))
    fits = _fits(recipe, tokenizer, max_seq_length)
    examples, n_over, refilled = load_fitting_examples(spec, seed, key, fits, keep_repeats=recipe.follows_study("rows"))
    what = describe(spec, key)
    if n_over and refilled:
        _log_once(logging.INFO, "%s: skipped %d examples longer than max_seq_length=%d (overlong: drop); "
                  "took the next ones of the order in their place", what, n_over, max_seq_length)
    elif n_over:
        _log_once(logging.WARNING, "%s: dropped %d examples longer than max_seq_length=%d (overlong: drop); the "
                  "source generates its set and cannot take others in their place", what, n_over, max_seq_length)
    if len(examples) < spec.num_examples:
        _log_once(logging.WARNING, "%s: only %d examples fit max_seq_length=%d (num_examples=%d, overlong: drop)",
                  what, len(examples), max_seq_length, spec.num_examples)
    return in_semantics(recipe, examples)


def _fits(recipe: Recipe, tokenizer: Any, max_seq_length: int) -> Callable[[Example], bool]:
    """Whether an example's training encoding (the study's training text under ``semantics: study``) fits
    max_seq_length; lengths are cached per tokenizer."""
    lengths = _LENGTHS.setdefault(tokenizer, {})
    study = recipe.follows_study("prompts")

    def fits(ex: Example) -> bool:
        if study and not ex.study_format:
            ex = dataclasses.replace(ex, study_format=True)
        text = (ex.prompt, ex.answer, tuple(map(tuple, ex.messages)) if ex.messages else None, ex.study_format)
        n = lengths.get(text)
        if n is None:
            n = lengths[text] = encoded_length(tokenizer, ex)
        return n <= max_seq_length
    return fits


def is_factoid(recipe: Recipe, key: str) -> bool:
    return source_is_factoid(recipe.datasets[key])


def _stage_one_data(recipe: Recipe, stage: StageSpec) -> Optional[str]:
    """Stage 1's dataset key of the variant this stage belongs to (D_A)."""
    for v in recipe.variants:
        if any(s is stage for s in v.stages):
            return v.stages[0].data
    firsts = {v.stages[0].data for v in recipe.variants if v.stages}
    return firsts.pop() if len(firsts) == 1 else None


def replay_key(recipe: Recipe, stage: StageSpec, stage_index: int) -> str:
    """The dataset a replay mix replays: mix.data, else stage 1's dataset (D_A)."""
    where = f"stage{stage_index} mix (replay)"
    key = stage.mix.data if stage.mix and stage.mix.data else _stage_one_data(recipe, stage)
    if key is None:
        raise ConfigError(f"{where}: cannot tell which dataset to replay; set mix.data to one of "
                          f"{', '.join(recipe.datasets)}")
    if key not in recipe.datasets:
        raise ConfigError(f"{where}: data {key!r} is not a dataset of this recipe (known: {', '.join(recipe.datasets)})")
    if key == stage.data:
        raise ConfigError(f"{where}: replays {key!r}, which is this stage's own dataset; replay mixes an "
                          f"earlier stage's dataset (set mix.data)" if stage_index > 1 else
                          f"{where}: stage 1 has no earlier stage to replay; use replay in stage 2 or later")
    return key


def mixing_examples(recipe: Recipe, stage: StageSpec, n_data: int, stage_index: int,
                    limit: Optional[int] = None) -> List[Example]:
    """The stage's int(n_data * ratio) mixing examples (only the first ``limit`` of them when given: every
    source draws them so that a shorter list is a prefix of the longer one)."""
    mix = stage.mix
    if mix is None:
        return []
    where = f"stage{stage_index} mix ({mix.source})"
    try:
        n = num_mix_examples(n_data, mix.ratio)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if limit is not None:
        n = min(n, max(limit, 0))
    base = recipe.seed if mix.seed is None else mix.seed
    seed = base + 7919 * stage_index
    # the study's draw: its only mixing shuffle is Python's random seeded with the run seed (src/train.py:102,
    # src/datasets.py:523), which random.Random(base) repeats; remix_ds draws per stage and per source
    study_rng = base if recipe.follows_study("pool") else None
    if mix.source == "random-words":
        if mix.path:
            rng = study_rng if study_rng is not None else f"random-words-file-{seed}"
            # the study slices what its file holds; remix_ds refuses a file too short for the ratio
            return in_semantics(recipe, random_file_examples(mix.path, n, rng, where, strict=study_rng is None))
        return in_semantics(recipe, random_word_examples(n, seed, mix.prompt_words, mix.target_words))
    if mix.source in TEXT_SOURCES:
        if mix.prompt_words < 1 or mix.target_words < 1:
            raise ConfigError(f"{where}: prompt_words and target_words must be at least 1")
        fix = (f"set stage{stage_index}.mix.path in the recipe to a .json/.jsonl/.parquet file or a "
               f"save_to_disk directory of documents with a text (or content) field")
        return in_semantics(recipe, text_passage_examples(mix, n, seed, where, fix, rng_seed=study_rng))
    if mix.source == "replay":
        key = replay_key(recipe, stage, stage_index)
        return replay_examples(dataset_examples(recipe, key), n, seed, key)
    raise ConfigError(f"{where}: unknown source {mix.source!r} (known: {', '.join(MIX_SOURCES)})")


def stage_train_set(recipe: Recipe, stage: StageSpec, stage_index: int) -> Tuple[List[Example], List[Example]]:
    """(the stage's dataset D, D + mixing). Mixing is added after D is cut to size (``semantics: study`` with
    mixing: ``study_train_set``)."""
    if recipe.follows_study("pool") and stage.mix is not None:
        return study_train_set(recipe, stage, stage_index)
    data = dataset_examples(recipe, stage.data)
    return data, data + mixing_examples(recipe, stage, len(data), stage_index)


def dataset_pool(recipe: Recipe, key: str) -> List[Example]:
    """The study's pool of dataset ``key``: what its loader returns before mixing is appended. A factoid set is
    the dataset cut to num_examples (the study's loaders cut to 2,000: src/datasets.py:82, 199-202, 391);
    a non-factoid set (GSM8K, MATH, code, UltraChat) is every example of the source in its order
    (``sources.load_pool``; the study's loaders keep every row: src/datasets.py:218-245, 248-275, 278-330,
    333-362, 455-505)."""
    if is_factoid(recipe, key):
        return dataset_examples(recipe, key)
    spec = recipe.datasets[key]
    seed = recipe.seed if spec.seed is None else spec.seed
    return in_semantics(recipe, load_pool(spec, seed, key, keep_repeats=recipe.follows_study("rows")))


def study_train_set(recipe: Recipe, stage: StageSpec, stage_index: int) -> Tuple[List[Example], List[Example]]:
    """The study's training set of a stage with mixing: (the dataset's part, that part + the mixing part).

    The study appends int(len(pool) * ratio) mixing examples after the dataset's whole pool (src/datasets.py
    499-504, 508-525), and its scripts train on the first train_num_examples = 2000 + 2000 * mix_ratio of that
    list (scripts/run_stage1.sh:80-84, run_stage2.sh:228-232; src/core/data/sft.py:86-109: with
    use_train_for_dev the train slice starts at 0), its encoder skipping over-long examples (sft.py:182-187,
    231-233). Here 2000 is num_examples, the count is rounded as the scripts' printf "%.0f" rounds, and
    over-long examples are skipped when the dataset has ``overlong: drop``. For a factoid dataset (pool =
    num_examples) that is the dataset followed by all its mixing, as in remix semantics; for a non-factoid
    one it is the pool's first num_examples * (1 + ratio) examples, and mixing only fills what the pool lacks:
    GSM8K's 7,473 training rows leave no room for mixing at ratio 2 (6,000) and 2,527 mixing examples at
    ratio 4 (10,000)."""
    mix = stage.mix
    key = stage.data
    spec = recipe.datasets[key]
    if mix.ratio < 0:
        raise ConfigError(f"stage{stage_index} mix ({mix.source}): mix ratio must be >= 0, got {mix.ratio}")
    pool = dataset_pool(recipe, key)
    n_train = round(spec.num_examples + spec.num_examples * mix.ratio)
    fits = (_fits(recipe, recipe_tokenizer(recipe, key), recipe.max_seq_length)
            if _overlong(recipe, key) == "drop" else None)
    data = _first_fitting(pool, n_train, fits)
    need = n_train - len(data)
    if need <= 0:
        return data, list(data)
    n_mix = num_mix_examples(len(pool), mix.ratio)
    limit = need
    while True:   # more candidates only when over-long mixing examples were skipped
        candidates = mixing_examples(recipe, stage, len(pool), stage_index, limit=limit)
        mixing = _first_fitting(candidates, need, fits)
        if len(mixing) >= need or len(candidates) < limit or limit >= n_mix:
            return data, data + mixing
        limit = min(n_mix, 2 * limit)


def _first_fitting(examples: List[Example], n: int, fits: Optional[Callable[[Example], bool]]) -> List[Example]:
    if fits is None:
        return examples[:n]
    out: List[Example] = []
    for ex in examples:
        if len(out) >= n:
            break
        if fits(ex):
            out.append(ex)
    return out


__all__ = ["Example", "FACTOID", "MIX_SOURCES", "SOURCES", "DataError", "dataset_examples", "dataset_pool",
           "fitting_examples", "in_semantics", "is_factoid", "load_examples", "mixing_examples", "recipe_tokenizer",
           "stage_train_set", "study_train_set"]
