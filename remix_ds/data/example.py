"""The one record type every loader produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

Turn = Tuple[str, str]   # (user, assistant)


@dataclass
class Example:
    prompt: str                 # the user turn (question); for a conversation, its first user turn
    answer: str                 # the assistant turn (target); for a conversation, its first assistant turn
    aliases: List[str] = field(default_factory=list)   # extra gold answers accepted by alias-aware scoring
    role: str = "train"         # "train": part of the stage's dataset; "mix": REMIX data, never evaluated
    source: str = ""
    factoid: bool = True        # evaluated by exact match
    # A multi-turn conversation (UltraChat): every (user, assistant) turn, in order; every assistant turn
    # is trained. None for single-turn examples (prompt -> answer).
    messages: Optional[List[Turn]] = None
    # ``semantics: study`` (set by ``remix_ds.data.dataset_examples`` / ``stage_train_set``): train on the study's
    # training text, which strips every turn's content (its ``_concat_messages``, src/core/data/sft.py:214-226),
    # so PopQA/TriviaQA train on "...The answer is:" while generation and scoring keep ``prompt`` as is
    # ("...The answer is: ", the study's evaluation string, sft.py:313-318). See ``formatting.encode_example``.
    study_format: bool = False

    @property
    def turns(self) -> List[Turn]:
        return list(self.messages) if self.messages else [(self.prompt, self.answer)]

    def to_dict(self):
        d = {"prompt": self.prompt, "answer": self.answer, "aliases": self.aliases, "role": self.role,
             "source": self.source}
        if self.messages:
            d["messages"] = [{"role": r, "content": c} for u, a in self.messages
                             for r, c in (("user", u), ("assistant", a))]
        return d
