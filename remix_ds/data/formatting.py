"""Chat formatting, tokenisation and label masking.

Each example becomes ``BOS <|user|>\\n{question}\\n<|assistant|>\\n{answer} EOS``. The prompt and the
answer are tokenised separately, so the label boundary is exact for any tokenizer: labels are -100
on BOS, the prompt and padding, and the token ids on the answer and its EOS.

A conversation (``Example.messages``, e.g. UltraChat) becomes one BOS followed by
``<|user|>\\n{q}\\n<|assistant|>\\n{a} EOS`` for every turn; every assistant turn and its EOS is trained,
everything else is -100.

An example marked ``study_format`` (``semantics: study``) is encoded as the study's training text instead
(``encode_study_example``): every turn's content stripped, and a newline after every EOS but the last. Its
generation prompt is still ``render_prompt(example.prompt)``, unstripped: the study trains PopQA/TriviaQA on
``...The answer is:`` and evaluates them on ``...The answer is: `` (``encode_scored_example``).

Examples longer than ``max_seq_length``: factoid examples are dropped (a cut answer cannot be scored);
non-factoid examples (instruction data, conversations, mixing passages) are truncated to
``max_seq_length`` tokens, as instruction-tuning code does, and dropped only when no trained token is
left inside the limit. ``truncate=False`` drops every over-long example (a dataset's ``overlong: drop``, the
study's rule: its sets are chosen from the examples that fit, see ``remix_ds.data.fitting_examples``).
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .example import Example

log = logging.getLogger(__name__)
IGNORE = -100


def render_prompt(question: str) -> str:
    return f"<|user|>\n{question}\n<|assistant|>\n"


@dataclass
class Encoded:
    input_ids: List[int]
    labels: List[int]
    index: int                 # position in the example list it came from

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _bos(tokenizer) -> List[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prompt_ids(tokenizer, question: str) -> List[int]:
    return _bos(tokenizer) + tokenizer.encode(render_prompt(question), add_special_tokens=False)


def answer_ids(tokenizer, answer: str) -> List[int]:
    return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def encoded_length(tokenizer, ex: Example) -> int:
    """Tokens of ``encode_example(tokenizer, ex)``: what max_seq_length limits."""
    return len(encode_example(tokenizer, ex).input_ids)


def encode_example(tokenizer, ex: Example, index: int = 0) -> Encoded:
    """The training encoding of an example (``encode_study_example`` for one marked ``study_format``)."""
    if ex.study_format:
        return encode_study_example(tokenizer, ex, index)
    if not ex.messages:
        p = prompt_ids(tokenizer, ex.prompt)
        a = answer_ids(tokenizer, ex.answer)
        return Encoded(input_ids=p + a, labels=[IGNORE] * len(p) + a, index=index)
    ids = _bos(tokenizer)
    labels = [IGNORE] * len(ids)
    for user, assistant in ex.messages:
        u = tokenizer.encode(render_prompt(user), add_special_tokens=False)
        a = answer_ids(tokenizer, assistant)
        ids += u + a
        labels += [IGNORE] * len(u) + a
    return Encoded(input_ids=ids, labels=labels, index=index)


def encode_study_example(tokenizer, ex: Example, index: int = 0) -> Encoded:
    """The study's training text, token by token (src/core/data/sft.py:214-258).

    The study writes ``<|user|>\n{q.strip()}\n<|assistant|>\n{a.strip()}{EOS}\n`` per turn, strips the whole
    text and tokenizes it with BOS; labels are -100 from each user turn's start through ``<|assistant|>\n``.
    So: each turn's content is stripped (a PopQA prompt ``...The answer is: `` trains as ``...The answer is:``,
    a GSM8K answer loses surrounding whitespace), and every EOS but the last is followed by a newline, which
    the study's mask leaves trained (each user turn's mask starts after it). As everywhere here, the prompt and
    answer pieces are tokenized separately so that the label boundary is exact."""
    ids = _bos(tokenizer)
    labels = [IGNORE] * len(ids)
    turns = ex.turns
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for j, (user, assistant) in enumerate(turns):
        u = tokenizer.encode(render_prompt(user.strip()), add_special_tokens=False)
        a = answer_ids(tokenizer, assistant.strip()) + (newline if j < len(turns) - 1 else [])
        ids += u + a
        labels += [IGNORE] * len(u) + a
    return Encoded(input_ids=ids, labels=labels, index=index)


def encode_scored_example(tokenizer, ex: Example, index: int = 0) -> Encoded:
    """What teacher-forced scoring feeds: the generation prompt (``prompt_ids(ex.prompt)``, the prompt as is)
    followed by the answer and EOS, so that it scores exactly what greedy generation from that prompt would
    produce. The training encoding but for ``study_format``, whose training text strips the prompt."""
    if ex.study_format:
        ex = dataclasses.replace(ex, study_format=False)
    return encode_example(tokenizer, ex, index)


def encode_examples(tokenizer, examples: Sequence[Example], max_seq_length: int,
                    what: str = "dataset", truncate: bool = True) -> Tuple[List[Encoded], int]:
    """Encode all examples; those longer than max_seq_length are dropped (factoids; every one with
    ``truncate=False``) or truncated (non-factoid data, if a trained token remains). Returns (encoded,
    number dropped)."""
    out, dropped, truncated = [], 0, 0
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex, i)
        if len(enc.input_ids) > max_seq_length:
            if not truncate or ex.factoid or all(t == IGNORE for t in enc.labels[:max_seq_length]):
                dropped += 1
                continue
            enc = Encoded(input_ids=enc.input_ids[:max_seq_length], labels=enc.labels[:max_seq_length], index=i)
            truncated += 1
        out.append(enc)
    if dropped:
        log.warning("%s: dropped %d of %d examples longer than max_seq_length=%d",
                    what, dropped, len(examples), max_seq_length)
    if truncated:
        log.info("%s: truncated %d of %d non-factoid examples to max_seq_length=%d",
                 what, truncated, len(examples), max_seq_length)
    return out, dropped


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_width(width: int, multiple: int) -> int:
    """A training batch's width rounded up to a multiple of `multiple`: on a GPU, fewer distinct batch shapes
    (attention backends such as cuDNN build an execution plan per shape)."""
    if multiple <= 1:
        return width
    return multiple * -(-width // multiple)


def collate(batch: Sequence[Encoded], pad_id: int, pad_to: Optional[int] = None, multiple: int = 1) -> dict:
    """Right-padded training batch: input_ids, attention_mask, labels (-100 on padding). `multiple`: see
    ``train_width``."""
    width = train_width(max(len(e.input_ids) for e in batch), multiple)
    if pad_to:
        width = max(width, pad_to)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PACK_GAIN = 0.9   # pack a micro-batch only when its padded area shrinks to at most this fraction


def _first_fit_decreasing(items: List[Encoded], capacity: int) -> List[List[Encoded]]:
    rows: List[List[Encoded]] = []
    room: List[int] = []
    for e in items:
        n = len(e.input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(e)
                room[r] -= n
                break
        else:
            rows.append([e])
            room.append(capacity - n)
    return rows


def _balanced(items: List[Encoded], n_rows: int) -> Tuple[List[List[Encoded]], int]:
    """Longest first, each into the currently shortest row (LPT): rows of near-equal length."""
    heap = [(0, r) for r in range(n_rows)]
    rows: List[List[Encoded]] = [[] for _ in range(n_rows)]
    for e in items:
        used, r = heapq.heappop(heap)
        rows[r].append(e)
        heapq.heappush(heap, (used + len(e.input_ids), r))
    return rows, max(used for used, _ in heap)


def pack_rows(batch: Sequence[Encoded], capacity: int) -> List[List[Encoded]]:
    """Examples into rows of at most `capacity` tokens (at least the longest example), the padded
    rectangle (rows x longest row) as small as these heuristics find it.

    Candidates: first-fit decreasing at `capacity`, and for each row count from the fewest possible up,
    a longest-first balanced split (kept when its longest row fits `capacity`). Row counts stop once
    rows x longest example cannot beat the best area found. Deterministic for a given batch order.
    """
    items = sorted(batch, key=lambda e: -len(e.input_ids))
    if not items:
        return []
    lens = [len(e.input_ids) for e in items]
    capacity = max(capacity, lens[0])
    total = sum(lens)

    def area(rows):
        return len(rows) * max(sum(len(e.input_ids) for e in row) for row in rows)
    best = _first_fit_decreasing(items, capacity)
    best_area = area(best)
    n_rows = -(-total // capacity)
    while n_rows <= len(items) and n_rows * lens[0] < best_area and best_area > total:
        rows, width = _balanced(items, n_rows)
        if width <= capacity and n_rows * width < best_area:
            best, best_area = rows, n_rows * width
        n_rows += 1
    return [row for row in best if row]


def collate_packed(batch: Sequence[Encoded], pad_id: int, capacity: int, multiple: int = 1) -> dict:
    """Several examples per row, each attending only to itself.

    Returns input_ids, labels, position_ids (restarting at 0 for every example) and a boolean
    [rows, 1, L, L] attention mask that is causal within each example and blocks every other pair. Each
    example starts with a token labelled -100 (BOS or the prompt), so no loss crosses a boundary: a packed
    batch gives every example the loss it has unpacked. When packing would not shrink the padded area
    below PACK_GAIN of the plain batch's, returns the plain padded batch (``collate``) instead. `multiple`:
    see ``train_width``.
    """
    rows = pack_rows(batch, capacity)
    width = train_width(max(sum(len(e.input_ids) for e in row) for row in rows), multiple)
    if len(rows) * width > PACK_GAIN * len(batch) * train_width(max(len(e.input_ids) for e in batch), multiple):
        # packing would save little padding (uniform lengths, say) but widen every row's attention:
        # the plain padded batch is the same computation, cheaper
        return collate(batch, pad_id, multiple=multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: its own segment
    for r, row in enumerate(rows):
        off = 0
        for j, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, off:off + n] = torch.tensor(e.input_ids)
            labels[r, off:off + n] = torch.tensor(e.labels)
            pos[r, off:off + n] = torch.arange(n)
            seg[r, off:off + n] = j
            off += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return {"input_ids": ids, "attention_mask": mask[:, None], "labels": labels, "position_ids": pos}


def collate_varlen(batch: Sequence[Encoded], pad_id: int, multiple: int = 1) -> dict:
    """All examples of a micro-batch back to back in one row, for the packed attention kernels of
    ``remix_ds.attention`` (no 4-D mask): input_ids, labels, position_ids (restarting at 0 for every example) and
    ``segments``, the boundaries the attention takes. The row is padded to ``train_width`` (`multiple`).

    The segments describe the row as the training loss runs it, without its last column (``AnswerLoss``: no label
    follows it): the trailing padding (if any) is one more segment, else the last example is one token shorter.
    As in ``collate_packed``, each example starts with a token labelled -100, so no loss crosses a boundary, and
    when packing would not shrink the padded area below PACK_GAIN of the plain batch's, returns ``collate``'s."""
    from ..attention import make_segments

    total = sum(len(e.input_ids) for e in batch)
    width = train_width(total, multiple)
    if width > PACK_GAIN * len(batch) * train_width(max(len(e.input_ids) for e in batch), multiple):
        # packing would save little padding (factoids of similar lengths, say): the plain padded batch is the
        # same computation without the gathers of the packed attention
        return collate(batch, pad_id, multiple=multiple)
    # flat Python lists, one tensor each: a third less host time than filling slices example by example
    lengths = [len(e.input_ids) for e in batch]
    tail = width - total
    ids = torch.tensor([[t for e in batch for t in e.input_ids] + [pad_id] * tail])
    labels = torch.tensor([[t for e in batch for t in e.labels] + [IGNORE] * tail])
    pos = torch.tensor([[i for n in lengths for i in range(n)] + [0] * tail])
    if tail:
        lengths.append(tail)   # the padding: a segment of its own, its outputs unused
    lengths[-1] -= 1                    # the column the loss drops
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segments": make_segments(lengths)}


def collate_prompts(prompts: Sequence[List[int]], pad_id: int) -> dict:
    """Left-padded prompts for batched generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
