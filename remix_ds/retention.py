"""Retention beyond D_A: what else a model forgets (recipe key ``retention:``, docs/evaluation.md).

Two measures, on the base model (before stage 1) and on every stage's output model:

- **probe sets** (known-fact retention): by default (``probes: auto``), for each stage-1 dataset from a factoid
  source, the examples of that source beyond the recipe's own (``known_pool`` of them) that the base model
  already answers correctly: filter-unknown's ``known`` split (``remix_ds/filter_unknown.py``), computed once
  and cached in ``<output_dir>/retention/known/<probe>/``. A list names recipe datasets instead (their known
  split; ``{data: KEY, known: false}``: the whole set). Every model is scored by filter-unknown's rule
  (``score_known``: greedy generation, answer extraction, alias match; or teacher-forced), so a known probe
  is 1.0 on the base model by construction and its value after stage k is the share of those facts still known.
- **generic text** (``text:``): the mean per-token negative log-likelihood (and its perplexity) of held-out
  plain-text passages (BOS + the passage, every token scored, no chat template): by default (``auto``) passages
  of the recipe's mixing sources that no stage mixes in (random words: another draw; knowledge-pile / fineweb /
  arxiv-pile: documents no mixing took), or a local file (.txt: paragraphs or lines; .json/.jsonl/.parquet: a
  ``text`` or ``content`` field).

Results are cached per model: ``<output_dir>/retention/base/<probe>.json`` and
``<output_dir>/<variant>/stage<k>/retention/<probe>.json``, reused while the stage hash, the probe's examples and
the scoring settings are unchanged. Nothing here is part of a stage's fingerprint: adding, changing or removing
``retention:`` never retrains a stage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import dist
from .config import Recipe, stage_hash
from .data.example import Example
from .files import read_json
from .errors import ConfigError

log = logging.getLogger(__name__)

VERSION = 1
DIR = "retention"          # <output_dir>/retention (known splits, base-model results) and <stage dir>/retention
SCORERS = ("generate", "teacher-forced")


def enabled(recipe: Recipe) -> bool:
    return getattr(recipe, "retention", None) is not None


# ------------------------------------------------------------------ what is measured

@dataclasses.dataclass
class ProbeDef:
    name: str            # column name in the report: known-A, known-P, P
    data: str            # recipe dataset key
    known: bool          # the base model's known split of it (else the whole set)
    pool: bool           # auto: the source's examples beyond the recipe's own (else the dataset as defined)

    def describe(self, n_pool: Optional[int] = None) -> str:
        what = (f"{n_pool} examples of dataset {self.data}'s source beyond the recipe's own" if self.pool
                else f"dataset {self.data}" + (f" ({n_pool} examples)" if n_pool is not None else ""))
        return f"the base model's known split of {what}" if self.known else what


def probe_defs(recipe: Recipe) -> List[ProbeDef]:
    from .data import is_factoid

    spec = recipe.retention
    if spec is None:
        return []
    probes = spec.probes
    out: List[ProbeDef] = []
    if probes in (None, False, "none", []):
        return []
    if probes == "auto":
        for v in recipe.variants:
            key = v.stages[0].data
            if is_factoid(recipe, key) and all(p.data != key for p in out):
                out.append(ProbeDef(f"known-{key}", key, True, True))
        return out
    if not isinstance(probes, list):
        raise ConfigError(f"retention.probes: auto, none or a list of dataset keys, got {probes!r}")
    for i, p in enumerate(probes):
        where = f"retention.probes[{i}]"
        if isinstance(p, str):
            key, known, name = p, True, None
        elif isinstance(p, dict):
            unknown = set(p) - {"data", "known", "name"}
            if unknown or "data" not in p:
                raise ConfigError(f"{where}: a dataset key or {{data: KEY, known: true|false, name: NAME}}, got {p!r}")
            key, known, name = str(p["data"]), p.get("known", True), p.get("name")
            if not isinstance(known, bool):
                raise ConfigError(f"{where}.known: true or false, got {known!r}")
        else:
            raise ConfigError(f"{where}: a dataset key or a mapping, got {p!r}")
        if key not in recipe.datasets:
            raise ConfigError(f"{where}: {key!r} is not a dataset of this recipe (known: {', '.join(recipe.datasets)})")
        if not is_factoid(recipe, key):
            raise ConfigError(f"{where}: dataset {key} (source {recipe.datasets[key].source}) is not a factoid set")
        name = str(name or (f"known-{key}" if known else key))
        if any(q.name == name for q in out):
            raise ConfigError(f"{where}: a second probe named {name!r}")
        out.append(ProbeDef(name, key, known, False))
    return out


def check_retention(recipe: Recipe) -> None:
    """Everything about ``retention:`` that can fail before training."""
    spec = recipe.retention
    if spec is None:
        return
    if spec.scorer not in SCORERS:
        raise ConfigError(f"retention.scorer: one of {', '.join(SCORERS)}, got {spec.scorer!r}")
    if spec.known_pool < 1 or spec.text_passages < 1 or spec.text_words < 2:
        raise ConfigError("retention: known_pool and text_passages must be >= 1, text_words >= 2")
    if any(v.name == DIR for v in recipe.variants):
        raise ConfigError(f"a variant named {DIR!r} would share {recipe.output_dir}/{DIR} with the retention results; "
                          f"rename it")
    probe_defs(recipe)
    text = spec.text
    if not (text in (None, False, "none", "auto") or isinstance(text, str)):
        raise ConfigError(f"retention.text: auto, none or a file path, got {text!r}")
    if isinstance(text, str) and text not in ("none", "auto") and not os.path.exists(os.path.expanduser(text)):
        raise ConfigError(f"retention.text: file not found: {text}")


def digest(items: List[Any]) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(json.dumps(x, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def examples_key(examples: List[Example]) -> str:
    return digest([[ex.prompt, ex.answer, list(ex.aliases), ex.source] for ex in examples])


def _used_prompts(recipe: Recipe) -> set:
    from .data import dataset_examples
    from .metrics import normalize

    return {normalize(ex.prompt) for key in recipe.datasets for ex in dataset_examples(recipe, key)}


def source_pool(recipe: Recipe, key: str, n: int) -> List[Example]:
    """``n`` examples of dataset ``key``'s source (its seed and order) that no dataset of the recipe holds."""
    from .data.sources import load_examples
    from .metrics import normalize

    spec = recipe.datasets[key]
    seed = recipe.seed if spec.seed is None else spec.seed
    used = _used_prompts(recipe)
    total = sum(d.num_examples for d in recipe.datasets.values())
    wide = dataclasses.replace(spec, num_examples=n + total + spec.num_examples, skip=0)
    out = [ex for ex in load_examples(wide, seed, key) if normalize(ex.prompt) not in used]
    return out[:n]


def pool_examples(recipe: Recipe, p: ProbeDef) -> List[Example]:
    from .data import dataset_examples

    if p.pool:
        return source_pool(recipe, p.data, recipe.retention.known_pool)
    return dataset_examples(recipe, p.data)


# ------------------------------------------------------------------ generic text

def _words_passages(docs: List[List[str]], n: int, words: int, rng_key: str) -> List[str]:
    eligible = [d for d in docs if len(d) >= words]
    order = list(range(len(eligible)))
    random.Random(rng_key).shuffle(order)
    return [" ".join(eligible[i][:words]) for i in order[:n]]


def _file_documents(path: str) -> List[List[str]]:
    path = os.path.expanduser(path)
    if path.endswith(".txt"):
        text = open(path, encoding="utf-8").read()
        parts = [p for p in text.split("\n\n") if p.strip()]
        if len(parts) <= 1:
            parts = [p for p in text.splitlines() if p.strip()]
        return [p.split() for p in parts]
    from .data.io import local_rows

    docs = []
    for origin, row, rec in local_rows(path):
        field = next((f for f in ("text", "content") if isinstance(rec.get(f), str)), None)
        if field is None:
            from .errors import DataError
            raise DataError(f"retention.text {origin}: row {row}: no text (or content) field")
        docs.append(rec[field].split())
    return docs


def text_sets(recipe: Recipe) -> Dict[str, Dict[str, Any]]:
    """name -> {"texts": [...], "what": description}: the held-out passages the text loss is measured on."""
    from .data import dataset_examples
    from .data.mixing import TEXT_SOURCES, num_mix_examples, text_documents, word_list

    spec = recipe.retention
    if spec is None or spec.text in (None, False, "none"):
        return {}
    n, words = spec.text_passages, spec.text_words
    if spec.text != "auto":
        texts = _words_passages(_file_documents(spec.text), n, words, f"retention-file-{recipe.seed}")
        return {f"text:{os.path.basename(spec.text)}": {"texts": texts, "what": f"{len(texts)} passages of {words} "
                                                        f"words of {spec.text}"}}
    out: Dict[str, Dict[str, Any]] = {}
    for v in recipe.variants:
        for k, st in enumerate(v.stages, 1):
            mix = st.mix
            if mix is None or mix.source in ("replay",) or f"text:{mix.source}" in out:
                continue
            if mix.source == "random-words":
                rng = random.Random(f"retention-random-words-{recipe.seed}")   # not a mixing draw's seed
                wl = word_list()
                texts = [" ".join(rng.choice(wl) for _ in range(words)) for _ in range(n)]
                out["text:random-words"] = {"texts": texts, "what": f"{n} held-out random-word passages of {words} "
                                                                    f"words (another draw than any mixing)"}
            elif mix.source in TEXT_SOURCES:
                where = f"retention.text (mixing source {mix.source})"
                docs = text_documents(mix, where, "set retention.text to a local file, or none")
                used = set()
                for v2 in recipe.variants:   # the documents every stage mixing this source took (mixing's own draw)
                    for k2, st2 in enumerate(v2.stages, 1):
                        m2 = st2.mix
                        if m2 is None or m2.source != mix.source or (m2.path, m2.name, m2.pool) != (mix.path, mix.name,
                                                                                                 mix.pool):
                            continue
                        need = m2.prompt_words + m2.target_words
                        eligible = [i for i, d in enumerate(docs) if len(d) >= need]
                        order = list(range(len(eligible)))
                        seed = (recipe.seed if m2.seed is None else m2.seed) + 7919 * k2
                        random.Random(f"{m2.source}-{seed}").shuffle(order)
                        n_mix = num_mix_examples(len(dataset_examples(recipe, st2.data)), m2.ratio)
                        used.update(eligible[i] for i in order[:n_mix])
                free = [d for i, d in enumerate(docs) if i not in used]
                texts = _words_passages(free, n, words, f"retention-{mix.source}-{recipe.seed}")
                if not texts:
                    log.warning("%s: no held-out document of at least %d words", where, words)
                    continue
                out[f"text:{mix.source}"] = {"texts": texts, "what": f"{len(texts)} passages of {words} words of "
                                                                     f"{mix.source} documents no stage mixes in"}
    return out


@torch.no_grad()
def text_loss(model, tokenizer, texts: List[str], batch_size: int, max_len: int, device) -> Dict[str, Any]:
    """Mean negative log-likelihood per token of plain-text passages (BOS + text, every text token scored; at most
    ``max_len`` tokens each), over all ranks; ``perplexity`` = exp(loss)."""
    from .data.formatting import pad_id_of

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [(bos + tokenizer.encode(t, add_special_tokens=False))[:max_len] for t in texts]
    r, w = dist.rank(), dist.world_size()
    mine = [rows[i] for i in range(r, len(rows), w)]
    pad = pad_id_of(tokenizer)
    nll, count = 0.0, 0
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        gold = ids[:, 1:]
        keep = mask[:, 1:].bool()
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), gold, reduction="none")
        nll += float(lp[keep].sum())
        count += int(keep.sum())
    tot = [0.0, 0]
    for a, b in dist.all_gather_object((nll, count)):
        tot[0] += a
        tot[1] += b
    loss = tot[0] / tot[1] if tot[1] else None
    return {"passages": len(texts), "tokens": tot[1], "loss": loss,
            "perplexity": math.exp(loss) if loss is not None else None}


# ------------------------------------------------------------------ scoring a model

class LazyModel:
    """A model (and its tokenizer) loaded on first use, shared by every scorer of one model directory."""

    def __init__(self, where: Callable[[], Tuple[str, List[str]]], recipe: Recipe):
        self.where, self.recipe = where, recipe
        self.model = self.tok = None

    def get(self):
        if self.model is None:
            from .zero import resolve_precision, torch_dtype
            from .model import load_for_eval, load_tokenizer

            path, adapters = self.where()
            # semantics: study evaluates as the study's run_eval.py loads the model: without a dtype, fp32
            dtype = torch.float32 if self.recipe.follows_study("precision") else \
                torch_dtype(resolve_precision(self.recipe.precision))
            self.model = load_for_eval(path, dtype, dist.device(), adapters=adapters)
            self.tok = load_tokenizer(path)
        return self.model, self.tok

    def close(self):
        if self.model is not None:
            self.model = self.tok = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def base_loader(recipe: Recipe) -> LazyModel:
    from .tiny import resolve_model_path

    return LazyModel(lambda: (resolve_model_path(recipe.model, recipe.tiny), []), recipe)


def base_hash(recipe: Recipe) -> str:
    return stage_hash({"model": recipe.model, "tiny": dataclasses.asdict(recipe.tiny) if recipe.model == "tiny"
                       else None, "precision": recipe.precision})


def score_probe(model, tok, examples: List[Example], recipe: Recipe) -> Dict[str, Any]:
    """filter-unknown's rule on one model: the share of ``examples`` it answers correctly."""
    from .filter_unknown import score_known

    if not examples:
        return {"n": 0, "correct": 0, "accuracy": None}
    known, _ = score_known(model, tok, examples, scorer=recipe.retention.scorer, match="alias",
                           batch_size=recipe.eval.batch_size, device=dist.device())
    c = sum(bool(k) for k in known)
    return {"n": len(examples), "correct": c, "accuracy": c / len(examples)}


def _write(path: Path, obj: Dict[str, Any]) -> None:
    from .files import write_json_atomic

    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(str(path), obj)


def _read_known(path: Path) -> List[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append(Example(prompt=r["prompt"], answer=r["answer"], aliases=list(r.get("aliases") or []),
                                   source=r.get("source", "")))
    return out


def probe_sets(recipe: Recipe, base: Optional[LazyModel] = None) -> Dict[str, Dict[str, Any]]:
    """name -> {"examples", "what", "pool"}: each probe's examples; a known split is computed with the base model
    (loaded through ``base`` when needed) and cached in <output_dir>/retention/known/<name>/."""
    from .filter_unknown import score_known, scoring_meta, write_split

    out: Dict[str, Dict[str, Any]] = {}
    for p in probe_defs(recipe):
        pool = pool_examples(recipe, p)
        if not p.known or not pool:
            if not pool:
                log.warning("retention probe %s: no example to put to the base model", p.name)
            out[p.name] = {"examples": pool if not p.known else [], "what": p.describe(), "pool": len(pool)}
            continue
        d = Path(recipe.output_dir) / DIR / "known" / p.name
        key = {"pool": examples_key(pool), "model": base_hash(recipe), "scorer": recipe.retention.scorer,
               "version": VERSION}
        counts = read_json(d / "counts.json")
        # rank 0 decides: another rank must not find the file rank 0 has just written and skip the collectives
        if dist.broadcast_object(bool(counts and counts.get("retention_key") == key and (d / "known.jsonl").is_file())):
            examples = _read_known(d / "known.jsonl")
        else:
            own = base is None
            base = base or base_loader(recipe)
            model, tok = base.get()
            known, preds = score_known(model, tok, pool, scorer=recipe.retention.scorer, match="alias",
                                       batch_size=recipe.eval.batch_size, device=dist.device())
            examples = [ex for ex, k in zip(pool, known) if k]
            if dist.is_main():
                meta = {"model": recipe.model, "dataset": p.data, "retention_key": key}
                meta.update(scoring_meta(tok, pool, scorer=recipe.retention.scorer, match="alias", shots=0,
                                         shots_seed=0, max_new_tokens=None))
                write_split(str(d), pool, known, preds, meta)
            dist.barrier()
            if own:
                base.close()
            log.info("retention probe %s: the base model knows %d of %d", p.name, len(examples), len(pool))
        out[p.name] = {"examples": examples, "what": p.describe(len(pool)), "pool": len(pool)}
    return out


def score_model(recipe: Recipe, out_dir: Path, h: str, loader: LazyModel,
                probes: Dict[str, Dict[str, Any]], texts: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Every probe and text set on one model (``loader``), cached in out_dir/<name>.json under the model's hash."""
    results: Dict[str, Dict[str, Any]] = {}
    for name, pset in list(probes.items()) + list(texts.items()):
        is_text = "texts" in pset
        items = pset["texts"] if is_text else pset["examples"]
        key = {"hash": h, "data": digest(items) if is_text else examples_key(items), "version": VERSION,
               "scorer": "text-loss" if is_text else recipe.retention.scorer,
               "max_seq_length": recipe.max_seq_length if is_text else None}
        fname = out_dir / f"{name.replace(':', '_')}.json"
        prev = read_json(fname)
        if dist.broadcast_object(bool(prev and prev.get("key") == key)):
            results[name] = dict(prev or {}, what=pset["what"])   # the description as this version words it
            continue
        model, tok = loader.get()
        if is_text:
            res = text_loss(model, tok, items, recipe.eval.batch_size, recipe.max_seq_length, dist.device())
        else:
            res = score_probe(model, tok, items, recipe)
        res.update({"name": name, "kind": "text" if is_text else "probe", "what": pset["what"], "key": key})
        if not is_text:
            res["pool"] = pset.get("pool")
        _write(fname, res)
        results[name] = res
    return results


def stored(recipe: Recipe, out_dir: Path, h: str) -> Dict[str, Dict[str, Any]]:
    """What ``score_model`` cached for the model of hash ``h`` (no scoring; stale files left out)."""
    out = {}
    if out_dir.is_dir():
        for f in sorted(out_dir.glob("*.json")):
            r = read_json(f)
            if r and isinstance(r.get("key"), dict) and r["key"].get("hash") == h and r["key"].get("version") == VERSION:
                out[r["name"]] = r
    return out


def base_results(recipe: Recipe) -> Dict[str, Any]:
    """The base model, before stage 1: every probe and text set, and (with the recipe's scorer) every stage
    dataset of every variant (the accuracy matrix's first row). Cached in <output_dir>/retention/base/."""
    from .data import dataset_examples, is_factoid
    from .evaluate import METRICS_VERSION, check_scorer, evaluate
    from .metrics import is_task_source

    loader = base_loader(recipe)
    d = Path(recipe.output_dir) / DIR / "base"
    h = base_hash(recipe)
    res = score_model(recipe, d, h, loader, probe_sets(recipe, loader), text_sets(recipe))
    scorer = check_scorer(recipe.eval.scorer)
    ev: Dict[str, Dict[str, Any]] = {}
    keys: List[str] = []
    for v in recipe.variants:
        for st in v.stages:
            if st.data not in keys and (is_factoid(recipe, st.data) or is_task_source(recipe.datasets[st.data].source)):
                keys.append(st.data)
    for key in keys:
        examples = dataset_examples(recipe, key)
        ck = {"hash": h, "data": examples_key(examples), "scorer": scorer, "batch_size": recipe.eval.batch_size,
              "max_new_tokens": recipe.eval.max_new_tokens, "metrics_version": METRICS_VERSION}
        prev = read_json(d / "eval" / f"{key}.json")
        if dist.broadcast_object(bool(prev and prev.get("key") == ck)):
            ev[key] = prev
            continue
        model, tok = loader.get()
        m = evaluate(model, tok, examples, scorer=scorer, batch_size=recipe.eval.batch_size,
                     max_new_tokens=recipe.eval.max_new_tokens, device=dist.device(), out_dir=str(d / "eval"), name=key)
        m["key"] = ck
        _write(d / "eval" / f"{key}.json", m)
        ev[key] = m
    loader.close()
    dist.barrier()
    return {"retention": res, "eval": ev}


def stored_base(recipe: Recipe) -> Optional[Dict[str, Any]]:
    """``base_results`` as cached, without scoring (None when nothing is)."""
    d = Path(recipe.output_dir) / DIR / "base"
    h = base_hash(recipe)
    res = stored(recipe, d, h)
    ev = {}
    for f in sorted((d / "eval").glob("*.json")) if (d / "eval").is_dir() else []:
        r = read_json(f)
        if r and isinstance(r.get("key"), dict) and r["key"].get("hash") == h:
            ev[f.stem] = r
    return {"retention": res, "eval": ev} if res or ev else None


def after_stage(stage, loader: LazyModel) -> Dict[str, Dict[str, Any]]:
    """Every probe and text set on a stage's output model (``stages.Stage``), cached in <stage dir>/retention/."""
    recipe = stage.recipe
    return score_model(recipe, stage.dir / DIR, stage.hash, loader, probe_sets(recipe), text_sets(recipe))


def stored_after_stage(stage) -> Dict[str, Dict[str, Any]]:
    return stored(stage.recipe, stage.dir / DIR, stage.hash)


# ------------------------------------------------------------------ the accuracy matrix

def cl_summaries(task_rows: List[List[Optional[float]]]) -> Dict[str, Any]:
    """Continual-learning summaries of ``task_rows[i][j]`` = accuracy on stage j+1's dataset after stage i+1
    (N x N; None where not evaluated: remix_ds scores a dataset from its own stage on).

    - ``average_accuracy`` (ACC, Lopez-Paz & Ranzato 2017): the mean over j of R[N][j], after the last stage;
    - ``backward_transfer`` (BWT): the mean over j < N of R[N][j] - R[j][j] (negative: forgetting);
    - ``forgetting`` (Chaudhry et al. 2018): the mean over j < N of max_{j<=l<N} R[l][j] - R[N][j].
    A summary with a missing term is None."""
    n = len(task_rows)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None
    last = task_rows[-1] if n else []
    acc = mean(last) if n and all(x is not None for x in last) else None
    bwt = fgt = None
    if n > 1:
        terms = [(last[j], task_rows[j][j]) for j in range(n - 1)]
        if all(a is not None and b is not None for a, b in terms):
            bwt = sum(a - b for a, b in terms) / (n - 1)
        peaks = []
        for j in range(n - 1):
            seen = [task_rows[l][j] for l in range(j, n - 1) if task_rows[l][j] is not None]
            peaks.append(max(seen) - last[j] if seen and last[j] is not None else None)
        fgt = mean(peaks) if all(p is not None for p in peaks) else None
    return {"average_accuracy": acc, "backward_transfer": bwt, "forgetting": fgt}
