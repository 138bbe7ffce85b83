"""Scoring a model on a factoid set: greedy generation, or teacher-forced exact match.

Two scorers, chosen by ``eval.scorer`` in a recipe (``--scorer`` for ``launch/eval.py``):

- ``generate`` (the default for final evaluation and the report, the study's metric): greedy
  decoding, then the answer rules of ``remix_ds.metrics`` (exact match after strip + lower-case,
  WebQuestions containment, alias-aware exact match, ROUGE-L, GSM8K / MATH final answers).
- ``teacher-forced``: one forward pass with the gold answer fed in; an example is right iff the argmax
  at every answer position and at the EOS position is the gold token. Greedy decoding produces exactly
  the gold answer tokens followed by EOS iff this holds (``tests/test_evaluate.py`` checks it on a
  trained model), so this is greedy exact *token* match at the cost of one forward pass. It is what
  training uses after every epoch (stopping, per-epoch curves).

Under the ``deepspeed`` launcher the examples are split across ranks (rank r takes r, r+W, ...) and
the results are gathered on every rank; rank 0 writes ``<name>.predictions.jsonl`` (prompt, gold,
prediction, correct, ...) and ``<name>.json`` (the metrics). Batches are grouped by length.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import dist
from .data.example import Example
from .data.formatting import (IGNORE, Encoded, collate, collate_prompts, encode_scored_example, pad_id_of,
                              prompt_ids)
from .objective import AnswerLoss
from .files import write_json_atomic
from .errors import ConfigError
from .metrics import aggregate, alias_match, exact_match, is_task_source, normalize, score_example  # noqa: F401

log = logging.getLogger(__name__)

SCORERS = ("generate", "teacher-forced")
# Bump when what an evaluation computes changes: cached eval/<key>.json files of older versions are redone.
METRICS_VERSION = 3


def check_scorer(scorer: str, where: str = "eval.scorer") -> str:
    if scorer not in SCORERS:
        raise ConfigError(f"{where}: must be one of {', '.join(SCORERS)}, got {scorer!r}")
    return scorer


def decode(tokenizer, ids) -> str:
    """Generated token ids as text, exactly: no "clean-up" of spaces (Llama-3's tokenizers turn " ." into "."
    and " 's" into "'s" by default, so a gold answer holding them could never match)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def default_max_new_tokens(tokenizer, examples: Sequence[Example]) -> int:
    """The longest gold answer or alias, in tokens, + 4: room for every form the alias match accepts."""
    return max(len(tokenizer.encode(g, add_special_tokens=False))
               for ex in examples for g in [ex.answer, *ex.aliases]) + 4


# ------------------------------------------------------------------ ZeRO-3 awareness

def is_partitioned(model) -> bool:
    """True for a model whose parameters are ZeRO-3 partitioned (``zero.Init`` / a ZeRO-3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gather_once_fits(model, device: torch.device) -> bool:
    """Whether the whole model, gathered, fits in 80% of the free memory of this device."""
    if device.type != "cuda":
        return True
    need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.8 * free


# ------------------------------------------------------------------ generation

@torch.no_grad()
def generate_token_ids(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                       device: torch.device, progress: bool = False, n_batches: Optional[int] = None
                       ) -> List[List[int]]:
    """Greedy continuations (token ids, cut after the first EOS, which is kept).

    Batched with left padding, longest prompts first. ``n_batches``: run exactly this many ``generate``
    calls (dummy ones when this rank has no prompts left), for ranks that must stay in step.
    """
    return generate_from_ids(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], batch_size,
                             max_new_tokens, device, progress, n_batches)


def generate_from_ids(model, tokenizer, ids: Sequence[List[int]], batch_size: int, max_new_tokens: int,
                      device: torch.device, progress: bool = False, n_batches: Optional[int] = None
                      ) -> List[List[int]]:
    """``generate_token_ids`` for prompts already tokenised (e.g. with few-shot turns before the question)."""
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    starts = list(range(0, len(order), batch_size))
    if n_batches is not None:
        starts += [None] * (n_batches - len(starts))
    partitioned = is_partitioned(model)
    out: List[Optional[List[int]]] = [None] * len(ids)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        chunk = order[start:start + batch_size] if start is not None else []
        rows = [ids[i] for i in chunk] or [prompt_ids(tokenizer, "")]
        batch = {k: v.to(device) for k, v in collate_prompts(rows, pad).items()}
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos, use_cache=True,
                             **({"synced_gpus": True} if partitioned else {}))
        new = gen[:, batch["input_ids"].shape[1]:].tolist()
        for i, row in zip(chunk, new):
            if eos in row:
                row = row[:row.index(eos) + 1]
            out[i] = row
    return out  # type: ignore[return-value]


def generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
             device: torch.device, progress: bool = False, n_batches: Optional[int] = None) -> List[str]:
    """Greedy continuations of the prompts as text (special tokens dropped)."""
    rows = generate_token_ids(model, tokenizer, prompts, batch_size, max_new_tokens, device, progress, n_batches)
    return [decode(tokenizer, r) for r in rows]


def score_predictions(examples: Sequence[Example], predictions: Sequence[str], rouge: bool = True
                      ) -> Dict[str, object]:
    """Dataset metrics (see ``metrics.aggregate``) plus ``rows``: per-example scores."""
    rows = [score_example(p, ex.answer, ex.aliases, ex.source, rouge=rouge) for ex, p in zip(examples, predictions)]
    scores = aggregate(rows, [ex.source for ex in examples])
    scores["rows"] = rows
    scores["correct"] = [bool(r["correct"]) for r in rows]
    return scores


def _write_outputs(out_dir: str, name: str, examples: Sequence[Example], predictions: Sequence[str],
                   rows: Sequence[Dict[str, object]], metrics: Dict[str, object]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"{name}.predictions.jsonl.tmp")
    with open(tmp, "w") as f:
        for ex, p, r in zip(examples, predictions, rows):
            rec = {"prompt": ex.prompt, "gold": ex.answer, "prediction": p}
            if ex.aliases:
                rec["aliases"] = list(ex.aliases)
            rec.update(r)
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, os.path.join(out_dir, f"{name}.predictions.jsonl"))
    write_json_atomic(os.path.join(out_dir, f"{name}.json"), metrics)


def evaluate_generation(model, tokenizer, examples: Sequence[Example], *, batch_size: int,
                        max_new_tokens: Optional[int], device: torch.device, out_dir: Optional[str] = None,
                        name: str = "eval") -> Dict[str, object]:
    """Greedy generation scored by the answer rules, over all ranks; returns the metrics on every rank.

    A ZeRO-3 partitioned model is gathered once for the whole evaluation where it fits on the device;
    otherwise every rank runs the same number of ``generate`` calls with ``synced_gpus``.
    """
    t0 = time.time()
    max_new = max_new_tokens or default_max_new_tokens(tokenizer, examples)
    r, w = dist.rank(), dist.world_size()
    mine = list(range(r, len(examples), w))
    n_batches = None
    ctx = contextlib.nullcontext()
    if is_partitioned(model):
        import deepspeed
        if dist.broadcast_object(_gather_once_fits(model, device)):  # the same choice on every rank
            ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        n_batches = (len(examples) + w * batch_size - 1) // (w * batch_size)
    with ctx:  # ranks stay in step (same number of generate calls, synced_gpus) whenever the model is ZeRO-3
        token_rows = generate_token_ids(model, tokenizer, [examples[i].prompt for i in mine], batch_size, max_new,
                                        device, progress=dist.is_main(), n_batches=n_batches)
    preds = [decode(tokenizer, t) for t in token_rows]
    gathered = dist.all_gather_object(list(zip(mine, preds)))
    predictions = [""] * len(examples)
    for part in gathered:
        for i, p in part:
            predictions[i] = p
    scores = score_predictions(examples, predictions)
    metrics = {"name": name, "scorer": "generate", "metrics_version": METRICS_VERSION}
    metrics.update({k: v for k, v in scores.items() if k not in ("rows", "correct")})
    metrics.update({"max_new_tokens": max_new, "seconds": round(time.time() - t0, 3)})
    if out_dir and dist.is_main():
        _write_outputs(out_dir, name, examples, predictions, scores["rows"], metrics)
    return metrics


# ------------------------------------------------------------------ teacher-forced

@torch.no_grad()
def teacher_forced_scores(logits_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                          encoded: Sequence[Encoded], batch_size: int, pad_id: int, prefixes: bool = True
                          ) -> List[Tuple[int, bool, List[int]]]:
    """This rank's share of ``encoded`` (positions rank, rank+W, ...), teacher-forced.

    Returns (position in ``encoded``, correct, greedy answer prefix) per example, in share order (with
    ``prefixes=False`` the prefix is left empty and only correctness is computed).
    ``correct``: the argmax at every answer position (answer tokens and EOS) is the gold token. The
    prefix is the gold answer up to the first wrong position plus the argmax there: exactly the first
    tokens greedy decoding produces (the whole gold answer + EOS when correct).

    Collective-safe: every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    inside each), with a dummy batch where its share has run out. Batches are grouped by length.
    """
    r, w = dist.rank(), dist.world_size()
    share = list(range(r, len(encoded), w))
    n_batches = (len(encoded) + w * batch_size - 1) // (w * batch_size)
    by_len = sorted(share, key=lambda i: len(encoded[i].input_ids))
    found: Dict[int, Tuple[bool, List[int]]] = {}
    pending: List[Tuple[List[int], torch.Tensor]] = []   # prefixes=False: results stay on the device till the end
    for b in range(n_batches):
        chunk = by_len[b * batch_size:(b + 1) * batch_size]
        batch = collate([encoded[i] for i in chunk] or [encoded[0]], pad_id)  # a dummy keeps collectives in step
        out = logits_fn(batch)
        labels = batch["labels"].to(out.device)
        # full logits [B, L, V], or a scorer's argmax already taken at the answer positions [B, L-1]
        pred = out[:, :-1].argmax(-1) if out.dim() == 3 else out
        gold = labels[:, 1:]
        answer = gold != IGNORE
        ok = ((pred == gold) | ~answer).all(dim=1)
        if not prefixes:  # only correctness wanted (the stopping rule, per-epoch curves): no per-row work,
            pending.append((chunk, ok[:len(chunk)]))   # and no host sync per batch: the next one is queued behind
            continue
        pred_c, gold_c, ans_c, ok_c = pred.cpu(), gold.cpu(), answer.cpu(), ok.cpu()
        for row, i in enumerate(chunk):
            g = gold_c[row][ans_c[row]].tolist()
            p = pred_c[row][ans_c[row]].tolist()
            first_wrong = next((t for t, (a, b_) in enumerate(zip(p, g)) if a != b_), len(g))
            prefix = g[:first_wrong] + ([p[first_wrong]] if first_wrong < len(g) else [])
            found[i] = (bool(ok_c[row]), prefix)
    if pending:
        flat = torch.cat([ok for _, ok in pending]).cpu().tolist()
        for i, o in zip((i for chunk, _ in pending for i in chunk), flat):
            found[i] = (o, [])
    return [(i, found[i][0], found[i][1]) for i in share]


def teacher_forced_correct(logits_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                           encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> torch.Tensor:
    """Per-example teacher-forced exact match over this rank's share (examples rank, rank+W, ...).

    Greedy decoding yields exactly the gold answer and EOS iff this holds. Collective-safe.
    """
    res = teacher_forced_scores(logits_fn, encoded, batch_size, pad_id, prefixes=False)
    return torch.tensor([ok for _, ok, _ in res], dtype=torch.bool)


def teacher_forced_accuracy(logits_fn, encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    ok = teacher_forced_correct(logits_fn, encoded, batch_size, pad_id)
    counts = torch.tensor([float(ok.sum()), float(ok.numel())], dtype=torch.float64)
    dist.all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


def encode_for_scoring(tokenizer, examples: Sequence[Example]) -> List[Encoded]:
    """The prompts as generation sees them, then the gold answers (``formatting.encode_scored_example``)."""
    return [encode_scored_example(tokenizer, ex, i) for i, ex in enumerate(examples)]


def model_logits_fn(model, device: torch.device) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """Full logits of a batch (what the logit lens and probes need)."""
    def fn(batch):
        return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     use_cache=False).logits
    return fn


def model_predict_fn(model, device: torch.device) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """Teacher-forced scoring's forward pass, the training loss's module (``objective.AnswerLoss``) in predict
    mode: the decoder over the batch, the LM head on answer positions only. Falls back to full logits for a
    model without a decoder / output layer to split."""
    try:
        scorer = AnswerLoss(model)
    except (AttributeError, NotImplementedError):
        scorer = None
    if scorer is None or scorer._decoder is None or scorer._head is None:
        return model_logits_fn(model, device)

    def fn(batch):
        return scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device),
                      predict=True)
    return fn


def evaluate_teacher_forced(model, tokenizer, examples: Sequence[Example], *, batch_size: int,
                            device: torch.device, out_dir: Optional[str] = None, name: str = "eval"
                            ) -> Dict[str, object]:
    """Teacher-forced exact token match over all ranks; returns the metrics on every rank.

    ``accuracy`` and ``exact_match`` are the share of examples whose greedy output would be exactly the
    gold answer tokens + EOS. Containment, aliases and ROUGE-L need free-running predictions and are
    not computed (None). ``predictions.jsonl`` holds the greedy output up to its first wrong token.
    """
    t0 = time.time()
    model.eval()
    enc = encode_for_scoring(tokenizer, examples)
    res = teacher_forced_scores(model_predict_fn(model, device), enc, batch_size, pad_id_of(tokenizer))
    mine = [(i, ok, decode(tokenizer, prefix)) for i, ok, prefix in res]
    correct = [False] * len(examples)
    predictions = [""] * len(examples)
    for part in dist.all_gather_object(mine):
        for i, ok, p in part:
            correct[i], predictions[i] = ok, p
    n = len(examples)
    acc = sum(correct) / n if n else 0.0
    metrics = {"name": name, "scorer": "teacher-forced", "metrics_version": METRICS_VERSION, "n": n,
               "accuracy": acc, "accuracy_metric": "teacher_forced_token_match", "exact_match": acc,
               "alias_exact_match": None, "rouge_l": None, "seconds": round(time.time() - t0, 3)}
    if out_dir and dist.is_main():
        rows = [{"correct": c} for c in correct]
        _write_outputs(out_dir, name, examples, predictions, rows, metrics)
    return metrics


def evaluate(model, tokenizer, examples: Sequence[Example], *, scorer: str = "generate", batch_size: int,
             max_new_tokens: Optional[int] = None, device: torch.device, out_dir: Optional[str] = None,
             name: str = "eval") -> Dict[str, object]:
    """Score with the chosen scorer. GSM8K / MATH sets are always generated (their answers are free text)."""
    check_scorer(scorer)
    if scorer == "teacher-forced" and not any(is_task_source(ex.source) for ex in examples):
        return evaluate_teacher_forced(model, tokenizer, examples, batch_size=batch_size, device=device,
                                       out_dir=out_dir, name=name)
    return evaluate_generation(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               device=device, out_dir=out_dir, name=name)
