"""Scoring a model on a factoid set: greedy generation + exact match, and teacher-forced exact match.

Under the ``deepspeed`` launcher the examples are split across ranks (rank r takes r, r+W, ...)
and the predictions are gathered on every rank; rank 0 writes ``predictions.jsonl`` and metrics.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import dist
from .data.example import Example
from .data.formatting import IGNORE, Encoded, collate, collate_prompts, encode_example, pad_id_of, prompt_ids
from .engine import write_json_atomic

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    """The study's normalisation: strip surrounding whitespace, lower-case."""
    return text.strip().lower()


def exact_match(prediction: str, gold: str) -> bool:
    return normalize(prediction) == normalize(gold)


def alias_match(prediction: str, golds: Sequence[str]) -> bool:
    return any(exact_match(prediction, g) for g in golds)


def default_max_new_tokens(tokenizer, examples: Sequence[Example]) -> int:
    return max(len(tokenizer.encode(ex.answer, add_special_tokens=False)) for ex in examples) + 4


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
             device: torch.device, progress: bool = False) -> List[str]:
    """Greedy continuations of the prompts, batched with left padding, longest prompts first."""
    pad = pad_id_of(tokenizer)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: List[Optional[str]] = [None] * len(ids)
    bar = tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False)
    for start in bar:
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_prompts([ids[i] for i in chunk], pad).items()}
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        new = gen[:, batch["input_ids"].shape[1]:]
        for i, row in zip(chunk, new):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out  # type: ignore[return-value]


def score_predictions(examples: Sequence[Example], predictions: Sequence[str]) -> Dict[str, object]:
    correct = [exact_match(p, ex.answer) for ex, p in zip(examples, predictions)]
    alias = [alias_match(p, [ex.answer] + list(ex.aliases)) for ex, p in zip(examples, predictions)]
    n = len(examples)
    return {"n": n, "exact_match": sum(correct) / n if n else 0.0, "alias_exact_match": sum(alias) / n if n else 0.0,
            "correct": correct}


def evaluate_generation(model, tokenizer, examples: Sequence[Example], *, batch_size: int,
                        max_new_tokens: Optional[int], device: torch.device, out_dir: Optional[str] = None,
                        name: str = "eval") -> Dict[str, object]:
    """Greedy-generation exact match over all ranks; returns the metrics on every rank."""
    t0 = time.time()
    max_new = max_new_tokens or default_max_new_tokens(tokenizer, examples)
    r, w = dist.rank(), dist.world_size()
    mine = list(range(r, len(examples), w))
    preds = generate(model, tokenizer, [examples[i].prompt for i in mine], batch_size, max_new, device,
                     progress=dist.is_main())
    gathered = dist.all_gather_object(list(zip(mine, preds)))
    predictions = [""] * len(examples)
    for part in gathered:
        for i, p in part:
            predictions[i] = p
    scores = score_predictions(examples, predictions)
    metrics = {"name": name, "n": scores["n"], "exact_match": scores["exact_match"],
               "alias_exact_match": scores["alias_exact_match"], "scorer": "generate",
               "max_new_tokens": max_new, "seconds": round(time.time() - t0, 3)}
    if out_dir and dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f"{name}.predictions.jsonl.tmp")
        with open(tmp, "w") as f:
            for ex, p, c in zip(examples, predictions, scores["correct"]):
                f.write(json.dumps({"prompt": ex.prompt, "gold": ex.answer, "prediction": p, "correct": c}) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{name}.predictions.jsonl"))
        write_json_atomic(os.path.join(out_dir, f"{name}.json"), metrics)
    return metrics


@torch.no_grad()
def teacher_forced_correct(logits_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                           encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> torch.Tensor:
    """Per-example exact match with the gold answer fed in: every answer position's argmax is gold.

    Greedy decoding yields exactly the gold answer and EOS iff this holds. Collective-safe: every
    rank runs the same number of forward passes (ZeRO-3 gathers parameters inside each).
    Returns a bool tensor over this rank's share (examples rank, rank+W, ...).
    """
    r, w = dist.rank(), dist.world_size()
    mine = [encoded[i] for i in range(r, len(encoded), w)]
    n_batches = (len(encoded) + w * batch_size - 1) // (w * batch_size)
    mine.sort(key=lambda e: len(e.input_ids))
    result = []
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        if not chunk:
            chunk = [encoded[0]]  # keep collectives in step; the result is discarded
        batch = collate(chunk, pad_id)
        logits = logits_fn(batch)
        labels = batch["labels"].to(logits.device)
        pred = logits[:, :-1].argmax(-1)
        gold = labels[:, 1:]
        ok = ((pred == gold) | (gold == IGNORE)).all(dim=1)
        result.append(ok[:real].cpu())
    return torch.cat(result) if result else torch.zeros(0, dtype=torch.bool)


def teacher_forced_accuracy(logits_fn, encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    ok = teacher_forced_correct(logits_fn, encoded, batch_size, pad_id)
    counts = torch.tensor([float(ok.sum()), float(ok.numel())], dtype=torch.float64)
    dist.all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


def encode_for_scoring(tokenizer, examples: Sequence[Example]) -> List[Encoded]:
    return [encode_example(tokenizer, ex, i) for i, ex in enumerate(examples)]
