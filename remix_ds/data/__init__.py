"""Data: source loaders -> Example -> cut to size -> + mixing -> shuffled by seed."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

from ..config import OVERLONG, Recipe, StageSpec
from ..errors import ConfigError, DataError
from .example import Example
from .formatting import encoded_length
from .mixing import (TEXT_SOURCES, num_mix_examples, random_word_examples, replay_examples,
                     text_passage_examples)
from .sources import FACTOID, SOURCES, describe, load_examples, load_fitting_examples, source_is_factoid

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
    return load_examples(spec, seed, key)


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
        return load_examples(spec, seed, key)
    lengths = _LENGTHS.setdefault(tokenizer, {})

    def fits(ex: Example) -> bool:
        text = (ex.prompt, ex.answer, tuple(map(tuple, ex.messages)) if ex.messages else None)
        n = lengths.get(text)
        if n is None:
            n = lengths[text] = encoded_length(tokenizer, ex)
        return n <= max_seq_length

    examples, n_over, refilled = load_fitting_examples(spec, seed, key, fits)
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
    return examples


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


def mixing_examples(recipe: Recipe, stage: StageSpec, n_data: int, stage_index: int) -> List[Example]:
    mix = stage.mix
    if mix is None:
        return []
    where = f"stage{stage_index} mix ({mix.source})"
    try:
        n = num_mix_examples(n_data, mix.ratio)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    seed = (recipe.seed if mix.seed is None else mix.seed) + 7919 * stage_index
    if mix.source == "random-words":
        return random_word_examples(n, seed, mix.prompt_words, mix.target_words)
    if mix.source in TEXT_SOURCES:
        if mix.prompt_words < 1 or mix.target_words < 1:
            raise ConfigError(f"{where}: prompt_words and target_words must be at least 1")
        fix = (f"set stage{stage_index}.mix.path in the recipe to a .json/.jsonl/.parquet file or a "
               f"save_to_disk directory of documents with a text (or content) field")
        return text_passage_examples(mix, n, seed, where, fix)
    if mix.source == "replay":
        key = replay_key(recipe, stage, stage_index)
        return replay_examples(dataset_examples(recipe, key), n, seed, key)
    raise ConfigError(f"{where}: unknown source {mix.source!r} (known: {', '.join(MIX_SOURCES)})")


def stage_train_set(recipe: Recipe, stage: StageSpec, stage_index: int) -> Tuple[List[Example], List[Example]]:
    """(the stage's dataset D, D + mixing). Mixing is added after D is cut to size."""
    data = dataset_examples(recipe, stage.data)
    return data, data + mixing_examples(recipe, stage, len(data), stage_index)


__all__ = ["Example", "FACTOID", "MIX_SOURCES", "SOURCES", "DataError", "dataset_examples", "fitting_examples",
           "is_factoid", "load_examples", "mixing_examples", "recipe_tokenizer", "stage_train_set"]
