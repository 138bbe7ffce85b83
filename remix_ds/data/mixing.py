"""REMIX mixing data: random word sequences (and, through data.sources, generic text).

A random-words example has the generic-passage shape of the study: the prompt is
``Complete the following partial passage:\n\n`` followed by ``prompt_words`` words, the target the
next ``target_words`` words. Words are drawn uniformly, with replacement, from the ``web2`` word list
of the ``english-words`` package (lower-cased, alphabetic words of 2 to 12 letters, sorted so the draw
is reproducible from the seed).
"""
from __future__ import annotations

import functools
import random
from typing import List

from .example import Example

PASSAGE_PROMPT = "Complete the following partial passage:\n\n"


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


def random_word_examples(n: int, seed: int, prompt_words: int = 50, target_words: int = 50) -> List[Example]:
    words = word_list()
    rng = random.Random(f"random-words-{seed}")
    out = []
    for _ in range(n):
        seq = [rng.choice(words) for _ in range(prompt_words + target_words)]
        out.append(Example(prompt=PASSAGE_PROMPT + " ".join(seq[:prompt_words]),
                           answer=" ".join(seq[prompt_words:]), role="mix", source="random-words",
                           factoid=False))
    return out
