"""filter-unknown: split a factoid set into what a base model already knows and what it does not yet know.

The study trained only on factoids its base model could not already answer (its ``yet_to_learn`` sets)
but did not release the filter. This is one. Every example of the set is put to the model in the training
chat format, ``<|user|>\\n{prompt}\\n<|assistant|>\\n`` after BOS, optionally after ``--shots K`` solved
demonstrations (other questions of the same set, each a ``<|user|>\\n{q}\\n<|assistant|>\\n{a}`` EOS turn,
exactly as a conversation is encoded for training), and scored

- ``generate`` (default): greedy generation; the answer is extracted from it (``extract_answer``: leading
  whitespace dropped, cut at the first line break and at the first chat-template marker ``<|``, stripped),
  since a base model seldom stops right after the answer ("Paris\\n<|user|>..." or "Paris. It is the
  capital"). The fact is known when the extract matches the gold answer by the study's rule for the source
  (exact match after strip + lower-case; containment for WebQuestions; see remix_ds/metrics.py), or starts
  with it followed immediately by sentence punctuation (``. , ; : ! ?``: "Paris." and "Paris, France" count,
  "Paris Hilton" does not); with ``--match alias`` (the default) any alias counts as the gold answer;
- ``teacher-forced``: the gold answer is fed in and every answer token must be the argmax. The position
  after the answer is not scored: a base model is not expected to stop (EOS) there. Gold answer only.

Written to ``--out``: ``yet_to_learn.jsonl`` and ``known.jsonl`` (one ``{"prompt", "answer", "aliases",
"source", "prediction"}`` per line, in the set's order, ``prediction`` the raw generation; a recipe reads them
back with ``path:``, using the prompts verbatim, without the demonstrations) and ``counts.json`` (the counts,
the model and how it was scored: scorer, match, shots, extraction rule, generation budget).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)
SCORERS = ("generate", "teacher-forced")
MATCHES = ("alias", "exact")
ALL_ROWS = 10 ** 9
SENTENCE_PUNCT = ".,;:!?"
TEMPLATE_MARKER = "<|"
# how a generation is scored (counts.json "extraction")
EXTRACTION_RULE = ("extract: leading whitespace dropped, cut at the first line break and at the first '<|', "
                   "stripped; known: the extract matches a gold answer by the source's rule (metrics.score_example: "
                   "strip + lower-case exact match, containment for WebQuestions), or starts with one followed "
                   "immediately by one of . , ; : ! ?")
TEACHER_FORCED_RULE = ("teacher-forced: every gold answer token is the argmax; the position after the answer (EOS) "
                       "is not scored")


# ------------------------------------------------------------------ answer extraction (generate)

def extract_answer(text: Optional[str]) -> str:
    """The answer a base model's continuation gives: its first line, cut before any chat-template marker.

    ``"Paris\\n<|user|>\\nWhat is"`` -> ``"Paris"``; ``" Paris<|user|>"`` -> ``"Paris"``;
    ``"Paris. It is the capital"`` -> ``"Paris. It is the capital"`` (the sentence punctuation rule of
    ``is_known`` deals with that)."""
    t = (text or "").lstrip()
    t = re.split(r"[\r\n]", t, maxsplit=1)[0]
    return t.split(TEMPLATE_MARKER, 1)[0].strip()


def _starts_with_answer(extract: str, gold: str) -> bool:
    """Normalised ``extract`` is ``gold`` followed immediately by sentence punctuation ("paris." / "paris, france")."""
    return bool(gold) and extract.startswith(gold) and len(extract) > len(gold) and extract[len(gold)] in SENTENCE_PUNCT


def _first_clause(extract: str) -> str:
    """The extract up to its first sentence punctuation that ends a word ("Padme. She" -> "Padme")."""
    m = re.search(r"[.,;:!?](?=\s|$)", extract)
    return extract[:m.start()].strip() if m else extract


def is_known(prediction: Optional[str], gold: str, aliases: Sequence[str] = (), source: str = "",
             match: str = "alias") -> bool:
    """Whether a generation states the fact: see the module docstring and ``EXTRACTION_RULE``.

    The per-source rules of ``metrics.score_example`` apply to the extract (WebQuestions: the non-empty
    extract is contained in a gold answer; there the extract's first clause is also tried, so "Padme." and
    "Padme. She was" count for "Padme Amidala" as "Padme" does)."""
    from .metrics import CONTAINS, alias_match, normalize, score_example, task_of

    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    extract = extract_answer(prediction)
    aliases = list(aliases) if match == "alias" else []
    golds = [gold] + aliases
    row = score_example(extract, gold, aliases, source, rouge=False)   # the study's rule per source
    if row["correct"] or row.get("alias_match"):
        return True
    norm = normalize(extract)
    if any(_starts_with_answer(norm, normalize(g)) for g in golds):
        return True
    if task_of(source) == CONTAINS:
        clause = _first_clause(extract)
        if clause != extract and alias_match(clause, golds, CONTAINS):
            return True
    return False


# ------------------------------------------------------------------ few-shot demonstrations

def pick_demonstrations(examples, shots: int, seed: int = 0) -> List[List[int]]:
    """Per example, the indices of ``shots`` other examples of the set shown before it as solved turns.

    Drawn per example from ``random.Random(f"filter-shots-{seed}-{i}")``: deterministic for a set and a
    seed. A demonstration is never the question itself nor another row with the same question (strip +
    lower-case), and, where the set allows, never shares a gold answer or alias with the question (a
    demonstration that shows the answer would make the fact look known)."""
    from .errors import ConfigError
    from .metrics import normalize

    n = len(examples)
    if shots <= 0:
        return [[] for _ in range(n)]
    prompts = [normalize(ex.prompt) for ex in examples]
    answers = [{normalize(a) for a in [ex.answer, *ex.aliases]} for ex in examples]
    if len(set(prompts)) <= shots:
        raise ConfigError(f"--shots {shots}: the set has {len(set(prompts))} distinct questions; "
                          f"each needs {shots} others as demonstrations")
    def usable(i: int, j: int, chosen: List[int], strict: bool) -> bool:
        return (j != i and j not in chosen and prompts[j] != prompts[i]
                and not (strict and answers[j] & answers[i]))
    out: List[List[int]] = []
    shared = 0
    for i in range(n):
        rng = random.Random(f"filter-shots-{seed}-{i}")
        chosen: List[int] = []
        for _ in range(20 * shots):           # rejection sampling: fast on large sets
            if len(chosen) == shots:
                break
            j = rng.randrange(n)
            if usable(i, j, chosen, True):
                chosen.append(j)
        if len(chosen) < shots:               # small or uniform sets: a full scan, in a seeded order
            order = list(range(n))
            rng.shuffle(order)
            for strict in (True, False):
                for j in order:
                    if len(chosen) == shots:
                        break
                    if usable(i, j, chosen, strict):
                        chosen.append(j)
                        shared += not strict
        out.append(chosen)
    if shared:
        log.warning("--shots %d: %d demonstrations share a gold answer with their question (too few others)",
                    shots, shared)
    return out


def prompt_token_ids(tokenizer, examples, demos: Sequence[Sequence[int]]) -> List[List[int]]:
    """Per example: BOS, each demonstration as ``<|user|>\\n{q}\\n<|assistant|>\\n{a}`` EOS, then
    ``<|user|>\\n{question}\\n<|assistant|>\\n``: the token ids ``encode_example`` gives the same conversation
    up to its last answer (and, without demonstrations, ``prompt_ids``)."""
    from .data.formatting import answer_ids, render_prompt

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    turn: Dict[int, List[int]] = {}

    def user(i: int) -> List[int]:
        if i not in turn:
            turn[i] = tokenizer.encode(render_prompt(examples[i].prompt), add_special_tokens=False)
        return turn[i]
    solved: Dict[int, List[int]] = {}
    rows = []
    for i in range(len(examples)):
        ids = list(bos)
        for j in demos[i]:
            if j not in solved:
                solved[j] = user(j) + answer_ids(tokenizer, examples[j].answer)
            ids += solved[j]
        rows.append(ids + user(i))
    return rows


def teacher_forced_encoded(tokenizer, examples, prompt_rows: Sequence[List[int]]):
    """Teacher-forced inputs for the filter: the prompt then the gold answer tokens, labelled; no EOS (the
    position after the answer is not scored: a base model is not expected to stop there)."""
    from .data.formatting import IGNORE, Encoded

    out = []
    for i, (ex, p) in enumerate(zip(examples, prompt_rows)):
        a = tokenizer.encode(ex.answer, add_special_tokens=False)
        out.append(Encoded(input_ids=list(p) + a, labels=[IGNORE] * len(p) + a, index=i))
    return out


# ------------------------------------------------------------------ scoring

def score_known(model, tokenizer, examples, *, scorer: str = "generate", match: str = "alias",
                batch_size: int = 64, max_new_tokens: Optional[int] = None, device=None, shots: int = 0,
                shots_seed: int = 0, predict_fn: Optional[Callable] = None
                ) -> Tuple[List[bool], List[Optional[str]]]:
    """Per example: whether the model already knows it, and its greedy prediction (None if teacher-forced).

    ``shots``: solved demonstrations before each question (``pick_demonstrations``). ``predict_fn``: the
    teacher-forced forward pass (default: ``evaluate.model_predict_fn`` of the model)."""
    from .data.formatting import pad_id_of
    from .evaluate import decode, default_max_new_tokens, generate_from_ids, model_predict_fn, teacher_forced_scores

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    rows = prompt_token_ids(tokenizer, examples, pick_demonstrations(examples, shots, shots_seed))
    if scorer == "generate":
        device = device or next(model.parameters()).device
        max_new = max_new_tokens or default_max_new_tokens(tokenizer, examples)
        generated = generate_from_ids(model, tokenizer, rows, batch_size, max_new, device)   # (generate: no_grad)
        preds = [decode(tokenizer, r) for r in generated]
        known = [is_known(p, ex.answer, ex.aliases, ex.source, match) for ex, p in zip(examples, preds)]
        return known, list(preds)
    encoded = teacher_forced_encoded(tokenizer, examples, rows)
    if predict_fn is None:
        predict_fn = model_predict_fn(model, device or next(model.parameters()).device)
    known = [False] * len(encoded)
    scorable = [e for e in encoded if e.num_answer_tokens]   # an empty answer is never known
    for pos, ok, _ in teacher_forced_scores(predict_fn, scorable, batch_size, pad_id_of(tokenizer), prefixes=False):
        known[scorable[pos].index] = bool(ok)
    return known, [None] * len(encoded)


def scoring_meta(tokenizer, examples, *, scorer: str, match: str, shots: int, shots_seed: int,
                 max_new_tokens: Optional[int]) -> Dict[str, Any]:
    """How the set was scored, for counts.json."""
    from .evaluate import default_max_new_tokens

    meta: Dict[str, Any] = {"scorer": scorer, "match": match if scorer == "generate" else "exact", "shots": shots,
                            "prompt": "chat format" + (f", {shots} solved demonstrations of the same set "
                                                       f"(seed {shots_seed})" if shots else ", zero-shot")}
    if shots:
        meta["shots_seed"] = shots_seed
    if scorer == "generate":
        meta["extraction"] = EXTRACTION_RULE
        meta["max_new_tokens"] = max_new_tokens or default_max_new_tokens(tokenizer, examples)
    else:
        meta["extraction"] = TEACHER_FORCED_RULE
    return meta


def write_split(out_dir: str, examples, known: Sequence[bool], predictions: Sequence[Optional[str]],
                meta: Dict[str, Any]) -> Dict[str, Any]:
    """yet_to_learn.jsonl, known.jsonl and counts.json in out_dir; returns the counts."""
    from .files import write_json_atomic

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
    from .helptext import decorate

    p = argparse.ArgumentParser(
        description="Score a factoid set with a base model and write the subsets it already knows and does "
                    "not yet know (known.jsonl, yet_to_learn.jsonl, counts.json). Train on yet_to_learn.jsonl "
                    "with `path:` in a recipe. generate: the answer is the generation's first line, cut before "
                    "'<|'; known when it matches a gold answer or starts with one followed by . , ; : ! ? "
                    "(docs/datasets.md).")
    decorate(p, "filter-unknown")
    p.add_argument("--model", default=None, help="base model: 'tiny', a local HF directory or a hub id (default: "
                                                 "the recipe's model, with --config)")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("the factoid set (one of)")
    g.add_argument("--config", "-c", default=None, help="a recipe; with --dataset, score that dataset (every row)")
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
    p.add_argument("--shots", type=int, default=0,
                   help="solved demonstrations (other questions of the same set, in the chat format) before each "
                        "question; default 0: zero-shot")
    p.add_argument("--shots-seed", type=int, default=0, help="seed of the demonstrations' draw")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate: new tokens per question (default: the longest gold answer or alias + 4)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --config)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.shots < 0:
        p.error(f"--shots must be >= 0, got {args.shots}")
    if args.model is None and not args.config:
        p.error("give --model (or --config RECIPE, whose model is the default)")
    from .runlog import main_guard, setup_logging

    def run():
        setup_logging()
        import torch

        from .config import TinySpec
        from .zero import resolve_precision, torch_dtype
        from .model import load_for_eval, load_tokenizer
        from .tiny import resolve_model_path

        examples, name = select_examples(args)
        model_name, tiny = args.model, TinySpec()
        if model_name is None:   # the recipe's model
            from .config import load_recipe
            recipe = load_recipe(args.config, args.overrides)
            model_name, tiny = recipe.model, recipe.tiny
        model_path = resolve_model_path(model_name, tiny)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(args.precision)
        model = load_for_eval(model_path, torch_dtype(precision), device)
        tok = load_tokenizer(model_path)
        known, preds = score_known(model, tok, examples, scorer=args.scorer, match=args.match,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device,
                                   shots=args.shots, shots_seed=args.shots_seed)
        meta = {"model": model_name, "dataset": name, "precision": precision}
        meta.update(scoring_meta(tok, examples, scorer=args.scorer, match=args.match, shots=args.shots,
                                 shots_seed=args.shots_seed, max_new_tokens=args.max_new_tokens))
        counts = write_split(args.out, examples, known, preds, meta)
        print(json.dumps({k: counts[k] for k in ("dataset", "n", "known", "yet_to_learn", "known_fraction")}))
        print(f"written: {counts['files']['yet_to_learn']} ({counts['yet_to_learn']}), "
              f"{counts['files']['known']} ({counts['known']})")
    main_guard(run)


if __name__ == "__main__":
    main()
