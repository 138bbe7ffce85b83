"""Key-value recall (KVR): random 8-character keys and values, the study's synthetic factoids.

One seeded stream of unique keys is dealt round-robin into three disjoint parts:
``A`` (the ``kvr`` source, used as D_A), ``B`` (``kvrB``, D_B) and ``P`` (the pairs the tiny
model is pretrained on). A part's first N pairs do not depend on N, and no key appears in two
parts, whatever their sizes.
"""
from __future__ import annotations

import random
import string
from typing import List, Tuple

from .example import Example

ALPHABET = string.ascii_lowercase + string.digits
KEY_LEN = 8
PARTS = {"A": 0, "B": 1, "P": 2}
PROMPT = "The value of key {key} is?"


def _random_token(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(KEY_LEN))


def kvr_pairs(n: int, seed: int, part: str = "A") -> List[Tuple[str, str]]:
    if part not in PARTS:
        raise ValueError(f"unknown KVR part {part!r}; known: {sorted(PARTS)}")
    rng = random.Random(f"kvr-{seed}")
    seen = set()
    out: List[Tuple[str, str]] = []
    index = 0
    while len(out) < n:
        key, value = _random_token(rng), _random_token(rng)
        if key in seen:
            continue
        seen.add(key)
        if index % len(PARTS) == PARTS[part]:
            out.append((key, value))
        index += 1
    return out


def kvr_examples(n: int, seed: int, part: str = "A") -> List[Example]:
    src = "kvr" if part == "A" else f"kvr{part}"
    return [Example(prompt=PROMPT.format(key=k), answer=v, source=src) for k, v in kvr_pairs(n, seed, part)]
