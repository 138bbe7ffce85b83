"""The study's training semantics (``semantics: study``), as its released code runs them.

The study (princeton-nlp/continual-factoid-memorization) trains with ``src/train.py`` on FSDP. What remix_ds
reproduces of it here, each rule a function that the stage loop calls (docs/fidelity.md lists every difference,
with the study's file and line):

- **order** (``epoch_steps``): a ``DistributedSampler(shuffle=True, seed=seed)`` whose ``set_epoch`` is never
  called, so every epoch draws the permutation of epoch 0; the sampler pads the index list to a multiple of the
  number of ranks with its own first indices and deals it out round-robin; the ``DataLoader`` then cuts each
  rank's share into micro-batches with ``drop_last=True`` (training/training.py get_dataloader).
- **padding** (``collate``): every example is padded to the longest example of the whole training set with the
  pad token, which the study sets to EOS, and the labels of padding are that EOS id, not -100
  (sft.py encode_with_message_format: ``pad_sequence(labels, padding_value=pad_token_id)``), so the loss also
  trains "EOS after EOS" at every padding position. The attention mask is padded with the pad id too, a non-zero
  value that transformers' causal mask (4.46, eager) does not mask: padding positions attend like tokens.
- **loss**: the Hugging Face mean over a micro-batch's labelled positions, divided by the gradient accumulation
  steps, averaged over ranks by FSDP (``micro_batch_scale``).
- **stopping** (``StopCounter``): ``sc=loss`` counts optimizer steps whose loss (the last micro-batch's, divided
  by the accumulation steps, averaged over ranks) is below 1e-4; the counter never resets; training stops at the
  step that brings it to 10 (train.py ~272-284).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from .data.formatting import Encoded


def epoch_steps(n: int, world: int, micro: int, gas: int, seed: int) -> List[List[List[int]]]:
    """The example indices of one epoch as the study's sampler and loader deal them: a list of optimizer steps,
    each a list of ``gas * world`` micro-batch slots in the stage loop's order (slot ``a * world + rank`` is
    micro-batch ``a`` of ``rank``), each slot a list of indices (empty where the last step has fewer micro-batches
    than ``gas``). The same for every epoch: the study never calls ``set_epoch``."""
    g = torch.Generator()
    g.manual_seed(seed)   # DistributedSampler: seed + epoch, and the epoch stays 0
    indices = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world   # drop_last=False in the sampler: pad with the first indices
    pad = total - n
    indices += (indices * math.ceil(pad / max(1, len(indices))))[:pad]
    per_rank = [indices[r:total:world] for r in range(world)]
    n_batches = len(per_rank[0]) // micro   # DataLoader(drop_last=True): a short last batch is never trained
    batches = [[share[j * micro:(j + 1) * micro] for j in range(n_batches)] for share in per_rank]
    steps = []
    for s in range(math.ceil(n_batches / gas)):
        slots = []
        for a in range(gas):
            j = s * gas + a
            slots += [batches[r][j] if j < n_batches else [] for r in range(world)]
        steps.append(slots)
    return steps


def pad_width(encoded: Sequence[Encoded]) -> int:
    """The study pads every example to the longest of its training set."""
    return max(len(e.input_ids) for e in encoded)


def collate(batch: Sequence[Encoded], eos_id: int, width: int) -> Dict[str, torch.Tensor]:
    """A micro-batch as the study builds it: input_ids and labels padded with EOS to `width`, every position of
    the attention mask on (see the module docstring)."""
    ids = torch.full((len(batch), width), eos_id, dtype=torch.long)
    labels = torch.full((len(batch), width), eos_id, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def labelled_count(e: Encoded, width: int) -> int:
    """The positions of one example padded by ``collate`` to `width` that the loss averages over: its trained
    answer tokens (the label at position 0 is never predicted) and every padding position (EOS after EOS)."""
    return sum(1 for t in e.labels[1:] if t != -100) + width - len(e.input_ids)


def labelled_positions(batch: Dict[str, torch.Tensor]) -> int:
    """The positions whose next token the Hugging Face loss averages over (labels shifted by one, not -100)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class StopCounter:
    """The study's ``sc=loss``: +1 for every optimizer step whose loss is below `threshold`, never reset; stop
    once the count reaches `patience`."""
    threshold: float = 1e-4
    patience: int = 10
    count: int = 0

    def update(self, step_loss: float) -> bool:
        if step_loss < self.threshold:
            self.count += 1
        return self.count >= self.patience
