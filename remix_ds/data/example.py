"""The one record type every loader produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class Example:
    prompt: str                 # the user turn (question)
    answer: str                 # the assistant turn (target)
    aliases: List[str] = field(default_factory=list)   # extra gold answers accepted by alias-aware scoring
    role: str = "train"         # "train": part of the stage's dataset; "mix": REMIX data, never evaluated
    source: str = ""
    factoid: bool = True        # evaluated by exact match

    def to_dict(self):
        return {"prompt": self.prompt, "answer": self.answer, "aliases": self.aliases, "role": self.role,
                "source": self.source}
