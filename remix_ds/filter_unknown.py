"""filter-unknown: split a factoid set into what a base model already knows and what it does not yet know.

The study trained only on factoids its base model could not already answer (its ``yet_to_learn`` sets)
but did not release the filter. This is one: every example of the set is put to the model in the
training format (``<|user|>\\n{prompt}\\n<|assistant|>\\n``) and scored

- ``generate`` (default): greedy generation, scored by the study's rule for the source (exact match after
  strip + lower-case; containment for WebQuestions; see remix_ds/metrics.py) against the gold answer or
  (``--match alias``, the default) any of its aliases: a fact the model states under any of its names
  counts as known;
- ``teacher-forced``: the gold answer is fed in and every answer token (and EOS) must be the argmax. This is
  what greedy generation of exactly the gold answer means, and faster (no generation); gold answer only.

Written to ``--out``: ``yet_to_learn.jsonl`` and ``known.jsonl`` (one ``{"prompt", "answer", "aliases",
"source", "prediction"}`` per line, in the set's order; a recipe reads them back with ``path:``, using the
prompts verbatim) and ``counts.json`` (the counts, the model and how it was scored).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)
SCORERS = ("generate", "teacher-forced")
MATCHES = ("alias", "exact")
ALL_ROWS = 10 ** 9


def score_known(model, tokenizer, examples, *, scorer: str = "generate", match: str = "alias",
                batch_size: int = 64, max_new_tokens: Optional[int] = None, device=None
                ) -> Tuple[List[bool], List[Optional[str]]]:
    """Per example: whether the model already knows it, and its greedy prediction (None if teacher-forced)."""
    from .data.formatting import encode_example, pad_id_of
    from .evaluate import generate, model_predict_fn, teacher_forced_scores
    from .metrics import score_example

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    device = device or next(model.parameters()).device
    if scorer == "generate":
        max_new = max_new_tokens or max(len(tokenizer.encode(g, add_special_tokens=False))
                                        for ex in examples for g in [ex.answer] + list(ex.aliases)) + 4
        preds = generate(model, tokenizer, [ex.prompt for ex in examples], batch_size, max_new, device)
        known = []
        for ex, p in zip(examples, preds):
            row = score_example(p, ex.answer, ex.aliases, ex.source, rouge=False)   # the study's rule per source
            known.append(bool(row["correct"]) or (match == "alias" and bool(row.get("alias_match"))))
        return known, list(preds)
    encoded = [encode_example(tokenizer, ex, i) for i, ex in enumerate(examples)]
    known = [False] * len(encoded)
    for i, ok, _ in teacher_forced_scores(model_predict_fn(model, device), encoded, batch_size,
                                          pad_id_of(tokenizer)):
        known[i] = bool(ok)
    return known, [None] * len(encoded)


def write_split(out_dir: str, examples, known: Sequence[bool], predictions: Sequence[Optional[str]],
                meta: Dict[str, Any]) -> Dict[str, Any]:
    """yet_to_learn.jsonl, known.jsonl and counts.json in out_dir; returns the counts."""
    from .engine import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    files = {True: os.path.join(out_dir, "known.jsonl"), False: os.path.join(out_dir, "yet_to_learn.jsonl")}
    handles = {k: open(v + ".tmp", "w", encoding="utf-8") for k, v in files.items()}
    try:
        for ex, k, p in zip(examples, known, predictions):
            rec = {"prompt": ex.prompt, "answer": ex.answer, "aliases": list(ex.aliases), "source": ex.source}
            if p is not None:
                rec["prediction"] = p
            handles[bool(k)].write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for h in handles.values():
            h.close()
    for v in files.values():
        os.replace(v + ".tmp", v)
    n_known = sum(1 for k in known if k)
    counts = dict(meta, n=len(examples), known=n_known, yet_to_learn=len(examples) - n_known,
                  known_fraction=n_known / len(examples) if examples else 0.0,
                  files={"known": files[True], "yet_to_learn": files[False]})
    write_json_atomic(os.path.join(out_dir, "counts.json"), counts)
    return counts


def select_examples(args) -> Tuple[list, str]:
    """The factoid set to score, from --config/--dataset, --source or --data (every row, in order)."""
    from .config import DatasetSpec, load_recipe
    from .data.sources import INFO, load_examples, source_is_factoid
    from .errors import ConfigError

    if args.config and args.dataset:
        recipe = load_recipe(args.config, args.overrides)
        if args.dataset not in recipe.datasets:
            raise ConfigError(f"--dataset {args.dataset!r}: not in {args.config} (known: {', '.join(recipe.datasets)})")
        spec = recipe.datasets[args.dataset]
        seed = recipe.seed if spec.seed is None else spec.seed
        name = args.dataset
    elif args.source or args.data:
        if args.config or args.dataset:
            raise ConfigError("give either --config with --dataset, or --source/--data, not both")
        spec = DatasetSpec(source=args.source or "json", path=args.data or args.path, name=args.hub_id,
                           config=args.hub_config, split=args.split, format=args.format)
        seed, name = 0, spec.source
    else:
        raise ConfigError("give --config RECIPE with --dataset NAME, or --source NAME (with --path/--name), "
                          "or --data FILE")
    if not source_is_factoid(spec):
        raise ConfigError(f"dataset {name} (source {spec.source}) is not a factoid set; filter-unknown scores "
                          f"factoids by exact match")
    rows_backed = spec.source in INFO or spec.source == "json" or bool(spec.path)
    if args.num_examples is not None:
        spec = dataclasses.replace(spec, num_examples=args.num_examples, skip=None if rows_backed else spec.skip)
    elif rows_backed:   # every row, in the set's own order
        spec = dataclasses.replace(spec, num_examples=ALL_ROWS, skip=0, shuffle=False)
    return load_examples(spec, seed, name), name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="filter_unknown.py",
        description="Score a factoid set with a base model and write the subsets it already knows and does "
                    "not yet know (known.jsonl, yet_to_learn.jsonl, counts.json). Train on yet_to_learn.jsonl "
                    "with `path:` in a recipe.")
    p.add_argument("--model", required=True, help="base model: 'tiny', a local HF directory or a hub id")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("the factoid set (one of)")
    g.add_argument("--config", default=None, help="a recipe; with --dataset, score that dataset (every row)")
    g.add_argument("--dataset", default=None, help="dataset name in the recipe (e.g. A)")
    g.add_argument("--source", default=None, help="a source name (popqa, triviaqa, lama, entityquestions, webqa, "
                                                  "kvr, json, ...)")
    g.add_argument("--path", default=None, help="local file or directory for --source")
    g.add_argument("--name", dest="hub_id", default=None, help="hub id or dataset directory for --source "
                                                               "(default: the source's own)")
    g.add_argument("--hf-config", dest="hub_config", default=None, help="hub config name for --source")
    g.add_argument("--split", default=None, help="split for --source")
    g.add_argument("--format", default="auto", choices=["auto", "native", "released", "simple"])
    g.add_argument("--data", default=None, help="a .json/.jsonl/.parquet file of prompt/answer records")
    p.add_argument("--num-examples", type=int, default=None,
                   help="score only this many (after the recipe's shuffle); default: every row in order")
    p.add_argument("--scorer", default="generate", choices=SCORERS)
    p.add_argument("--match", default="alias", choices=MATCHES,
                   help="generate: known if the answer matches the gold answer or any alias (alias) or the "
                        "gold answer only (exact)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --config)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    from .cli import main_guard, setup_logging

    def run():
        setup_logging()
        import torch

        from .config import TinySpec
        from .engine import resolve_precision, torch_dtype
        from .model import load_for_eval, load_tokenizer
        from .tiny import resolve_model_path

        examples, name = select_examples(args)
        model_path = resolve_model_path(args.model, TinySpec())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(args.precision)
        model = load_for_eval(model_path, torch_dtype(precision), device)
        tok = load_tokenizer(model_path)
        known, preds = score_known(model, tok, examples, scorer=args.scorer, match=args.match,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device)
        counts = write_split(args.out, examples, known, preds,
                             {"model": args.model, "dataset": name, "scorer": args.scorer,
                              "match": args.match if args.scorer == "generate" else "exact",
                              "precision": precision})
        print(json.dumps({k: counts[k] for k in ("dataset", "n", "known", "yet_to_learn", "known_fraction")}))
        print(f"written: {counts['files']['yet_to_learn']} ({counts['yet_to_learn']}), "
              f"{counts['files']['known']} ({counts['known']})")
    main_guard(run)


if __name__ == "__main__":
    main()
