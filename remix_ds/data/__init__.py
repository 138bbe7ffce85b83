"""Data: source loaders -> Example -> cut to size -> + mixing -> shuffled by seed."""
from __future__ import annotations

from typing import List, Tuple

from ..config import Recipe, StageSpec
from ..errors import ConfigError
from .example import Example
from .mixing import num_mix_examples, random_word_examples
from .sources import FACTOID, SOURCES, load_examples

MIX_SOURCES = ("random-words",)


def dataset_examples(recipe: Recipe, key: str) -> List[Example]:
    spec = recipe.datasets[key]
    seed = recipe.seed if spec.seed is None else spec.seed
    return load_examples(spec, seed, key)


def is_factoid(recipe: Recipe, key: str) -> bool:
    return FACTOID.get(recipe.datasets[key].source, True)


def mixing_examples(recipe: Recipe, stage: StageSpec, n_data: int, stage_index: int) -> List[Example]:
    mix = stage.mix
    if mix is None:
        return []
    n = num_mix_examples(n_data, mix.ratio)
    seed = (recipe.seed if mix.seed is None else mix.seed) + 7919 * stage_index
    if mix.source == "random-words":
        return random_word_examples(n, seed, mix.prompt_words, mix.target_words)
    raise ConfigError(f"stage{stage_index} mix: unknown source {mix.source!r} (known: {', '.join(MIX_SOURCES)})")


def stage_train_set(recipe: Recipe, stage: StageSpec, stage_index: int) -> Tuple[List[Example], List[Example]]:
    """(the stage's dataset D, D + mixing). Mixing is added after D is cut to size."""
    data = dataset_examples(recipe, stage.data)
    return data, data + mixing_examples(recipe, stage, len(data), stage_index)
