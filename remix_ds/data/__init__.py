"""Data: source loaders -> Example -> cut to size -> + mixing -> shuffled by seed."""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..config import Recipe, StageSpec
from ..errors import ConfigError, DataError
from .example import Example
from .mixing import (TEXT_SOURCES, num_mix_examples, random_word_examples, replay_examples,
                     text_passage_examples)
from .sources import FACTOID, SOURCES, load_examples, source_is_factoid

MIX_SOURCES = ("random-words",) + tuple(TEXT_SOURCES) + ("replay",)


def dataset_examples(recipe: Recipe, key: str) -> List[Example]:
    spec = recipe.datasets[key]
    seed = recipe.seed if spec.seed is None else spec.seed
    return load_examples(spec, seed, key)


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


__all__ = ["Example", "FACTOID", "MIX_SOURCES", "SOURCES", "DataError", "dataset_examples", "is_factoid",
           "load_examples", "mixing_examples", "stage_train_set"]
