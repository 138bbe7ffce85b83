"""Global batches into micro-batches, and one optimizer step over them.

Every rank deals the same global batch the same way and takes its own slots (``split_global_batch``); the loss is
the mean over the global batch's answer tokens however it is dealt (``global_step``). ``study_global_step`` is the
study's per-micro-batch mean (``semantics: study``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import study
from .data.formatting import Encoded, collate, collate_packed, collate_varlen
from .engine import Engine
from .errors import ConfigError

WIDTH_MULTIPLE_CUDA = 8


def packs(packing) -> bool:
    """Whether a stage's ``packing`` setting may pack: true and auto (which then measures, once the engine is built:
    ``remix_ds.attention.choose_packing``); false pads."""
    return packing == "auto" or bool(packing)


def batch_plan(world: int, global_batch_size: int, micro_batch_size: Optional[int]):
    if not micro_batch_size:
        if global_batch_size % world:
            raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of the world size {world} "
                              f"(each rank takes an equal share); change global_batch_size or the number of ranks")
        return global_batch_size // world, 1
    micro = micro_batch_size
    if micro < 1 or global_batch_size % (micro * world):
        raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                          f"{micro} x world size {world}; change global_batch_size or micro_batch_size")
    return micro, global_batch_size // (micro * world)


def split_global_batch(chunk: List[Encoded], slots: int, by_tokens: bool = False) -> List[List[Encoded]]:
    """Deal a global batch into `slots` micro-batches.

    Padded batches (default): near-equal example counts, grouped by length so each pads little.
    Packed batches (`by_tokens`): near-equal token counts (longest first into the lightest slot), so no
    rank waits on another's longer micro-batch.
    """
    chunk = sorted(chunk, key=lambda e: len(e.input_ids))
    if by_tokens:
        out: List[List[Encoded]] = [[] for _ in range(slots)]
        load = [0] * slots
        for e in reversed(chunk):
            j = min(range(slots), key=lambda s: (load[s], len(out[s])))
            out[j].append(e)
            load[j] += len(e.input_ids)
        return out
    base, extra = divmod(len(chunk), slots)
    out, start = [], 0
    for j in range(slots):
        n = base + (1 if j < extra else 0)
        out.append(chunk[start:start + n])
        start += n
    return out


def epoch_order(n: int, seed: int, k: int, epoch: int) -> List[int]:
    """A fresh permutation per epoch, reproducible from (seed, stage, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


class TokenCount:
    """Host-side count of the token positions this rank's micro-batches ran, padding included (batch shapes
    are known on the host: counting needs no device sync)."""

    def __init__(self) -> None:
        self.ran = 0


def throughput(real: int, ran: float, seconds: float) -> Dict[str, Any]:
    """Log fields of `real` padding-free tokens trained on in `seconds`, `ran` token positions run."""
    if seconds <= 0 or ran <= 0:
        return {"tokens_per_s": None, "padfree_tokens_per_s": None, "padding": None}
    return {"tokens_per_s": round(ran / seconds, 1), "padfree_tokens_per_s": round(real / seconds, 1),
            "padding": round(max(0.0, 1.0 - real / ran), 4)}


def batch_maker(eng: Engine, pad: int, pack: int = 0) -> Callable[[List[Encoded]], Dict[str, torch.Tensor]]:
    """How global_step collates a micro-batch: padded, or with `pack` > 0 packed, into one row with sequence
    boundaries where the engine's model takes them (``collate_varlen``, ``remix_ds.attention``), else into rows of at
    most `pack` tokens with a 4-D mask (``collate_packed``)."""
    # on a GPU, batch widths round up to a multiple of 8 (formatting.train_width): fewer distinct shapes
    multiple = WIDTH_MULTIPLE_CUDA if eng.device.type == "cuda" else 1
    if not pack:
        return lambda mb: collate(mb, pad, multiple=multiple)
    if getattr(eng, "packed_varlen", False):
        return lambda mb: collate_varlen(mb, pad, multiple)
    return lambda mb: collate_packed(mb, pad, pack, multiple)


def global_step_batches(eng: Engine, chunk: List[Encoded], world: int, gas: int, rank: int, pad: int,
                        pack: int = 0) -> List[Dict[str, torch.Tensor]]:
    """The micro-batches global_step would run on this rank for `chunk` (its non-empty ones)."""
    make = batch_maker(eng, pad, pack)
    slots = split_global_batch(chunk, world * gas, by_tokens=bool(pack))
    return [make(slots[a * world + rank]) for a in range(gas) if slots[a * world + rank]]


def global_step(eng: Engine, chunk: List[Encoded], world: int, gas: int, rank: int, pad: int,
                pack: int = 0, count: Optional[TokenCount] = None,
                collate_fn: Optional[Callable[[List[Encoded]], Dict[str, torch.Tensor]]] = None,
                labelled: Optional[Callable[[Encoded], int]] = None) -> torch.Tensor:
    """One optimizer step on one global batch (every rank passes the same `chunk`).

    The loss is the mean over all answer tokens of the global batch: each micro-batch's token-loss
    sum is scaled by world*gas/N, which DeepSpeed's 1/gas scaling and data-parallel averaging turn into
    sum/N exactly. With `pack` > 0 each micro-batch is packed into rows of at most `pack` tokens, every
    example attending only to itself (the same losses, far less padding). Returns this rank's unscaled
    token-loss sum (detached, on device). `count`, if given, adds the token positions this rank ran.
    `collate_fn` / `labelled` replace the padded collation and the count of an example's trained positions (the
    study's EOS-labelled padding with remix_ds's order: ``study_except: [order]``).
    """
    make = collate_fn or batch_maker(eng, pad, pack)
    n_tok = sum(labelled(e) for e in chunk) if labelled else sum(e.num_answer_tokens for e in chunk)
    slots = split_global_batch(chunk, world * gas, by_tokens=bool(pack))
    scale = world * gas / n_tok
    local = torch.zeros((), dtype=torch.float64, device=eng.device)
    for a in range(gas):
        mb = slots[a * world + rank]
        batch = make(mb or chunk[:1])   # a short last batch: a rank with no examples still takes part
        if count is not None:
            count.ran += batch["input_ids"].numel()
        if mb:
            local += eng.micro_step(batch, scale)
        else:
            eng.micro_step(batch, 0.0)
        eng.step()
    return local


def study_global_step(eng: Engine, slots: List[List[Encoded]], world: int, gas: int, rank: int,
                      make: Callable[[List[Encoded]], Dict[str, torch.Tensor]], count: Optional[TokenCount] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step of ``semantics: study`` on the micro-batches the study's loader deals (``study.epoch_steps``:
    slot ``a * world + rank``). Each micro-batch's loss is its own mean over its labelled positions (the Hugging
    Face loss), which DeepSpeed's 1/gas scaling and rank averaging turn into the study's gradient; an empty slot (a
    short last step) runs a zero-scaled micro-batch so that every rank takes part. Returns this rank's sum of
    micro-batch means, its last micro-batch's mean divided by gas (what the study's stopping rule reads) and the
    number of micro-batches it trained (detached, on device)."""
    means = torch.zeros((), dtype=torch.float64, device=eng.device)
    last = torch.zeros((), dtype=torch.float64, device=eng.device)
    n_mb = 0
    fallback = [e for slot in slots for e in slot][:1]
    for a in range(gas):
        mb = slots[a * world + rank]
        batch = make(mb or fallback)
        if count is not None:
            count.ran += batch["input_ids"].numel()
        if mb:
            n = study.labelled_positions(batch)
            mean = eng.micro_step(batch, 1.0 / n) / n
            means += mean
            last = mean / gas
            n_mb += 1
        else:
            eng.micro_step(batch, 0.0)
        eng.step()
    return means, last, n_mb
