"""The launcher's work: for each variant, every stage (train, merge), evaluation after each, the report."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import dist
from .config import Recipe, Variant, stage_hash
from .data import dataset_examples, is_factoid, stage_train_set
from .engine import load_ds_config, resolve_precision, torch_dtype, write_json_atomic
from .errors import ConfigError
from .evaluate import evaluate_generation
from .model import load_for_eval, load_tokenizer
from .stage import batch_plan, fingerprint, is_complete, output_model, read_done, stage_dir, train_stage

log = logging.getLogger(__name__)


def dataset_letter(j: int) -> str:
    """Stage j's dataset is D_A, D_B, D_C, ... in the report."""
    return chr(ord("A") + j - 1)


def check_recipe(recipe: Recipe, variants: List[Variant]) -> None:
    """Everything that can fail before training, checked before any training starts."""
    for v in variants:
        for k, spec in enumerate(v.stages, 1):
            where = f"variant {v.name}, stage{k}"
            try:
                load_ds_config(spec.ds_config or recipe.ds_config)
                batch_plan(dist.world_size(), spec.global_batch_size, spec.micro_batch_size)
                stage_train_set(recipe, spec, k)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            if spec.finetune == "qlora":
                raise ConfigError(f"{where}: finetune: qlora is not available yet (use full or lora)")
            if spec.finetune == "lora" and not spec.merge:
                raise ConfigError(f"{where}: merge: false is not available yet; use merge: true")
    looks_local = recipe.model.startswith(("/", "./", "../", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(recipe.model)):
        raise ConfigError(f"model {recipe.model!r}: directory not found")


def eval_after_stage(recipe: Recipe, variant: Variant, k: int) -> Dict[str, Dict[str, Any]]:
    """Generation exact match of every factoid dataset of stages 1..k on stage k's output model."""
    d = stage_dir(recipe, variant, k) / "eval"
    h = stage_hash(fingerprint(recipe, variant, k))
    keys = []
    for j in range(1, k + 1):
        key = variant.stages[j - 1].data
        if key not in keys and is_factoid(recipe, key):
            keys.append(key)
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for key in keys:
        prev = _read_json(d / f"{key}.json")
        if prev and prev.get("hash") == h and prev.get("batch_size") == recipe.eval.batch_size:
            results[key] = prev
        else:
            todo.append(key)
    todo = dist.broadcast_object(todo)
    if todo:
        path = output_model(recipe, variant, k)
        dtype = torch_dtype(resolve_precision(recipe.precision))
        model = load_for_eval(path, dtype, dist.device())
        tok = load_tokenizer(path)
        for key in todo:
            metrics = evaluate_generation(model, tok, dataset_examples(recipe, key),
                                          batch_size=recipe.eval.batch_size,
                                          max_new_tokens=recipe.eval.max_new_tokens, device=dist.device(),
                                          out_dir=str(d), name=key)
            metrics.update({"hash": h, "batch_size": recipe.eval.batch_size, "model": path})
            results[key] = metrics
            if dist.is_main():
                d.mkdir(parents=True, exist_ok=True)
                write_json_atomic(str(d / f"{key}.json"), metrics)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dist.barrier()
    return results


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_stage(recipe: Recipe, variant: Variant, k: int, evaluate: bool = True) -> Dict[str, Any]:
    """Train stage k of a variant unless its complete output exists, then evaluate it."""
    if k > 1 and not dist.broadcast_object(is_complete(recipe, variant, k - 1)):
        raise ConfigError(f"variant {variant.name}: stage{k - 1} has no complete output in "
                          f"{stage_dir(recipe, variant, k - 1)}; run stage{k - 1} first")
    if dist.broadcast_object(is_complete(recipe, variant, k)):
        if dist.is_main():
            log.info("%s/stage%d: complete output found, not retraining", variant.name, k)
        summary = read_done(stage_dir(recipe, variant, k))["summary"]
    else:
        summary = train_stage(recipe, variant, k)
    result = {"summary": summary}
    if evaluate:
        result["eval"] = eval_after_stage(recipe, variant, k)
    return result


def variant_row(recipe: Recipe, variant: Variant, results: List[Dict[str, Any]]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"name": variant.name}
    n = len(variant.stages)
    for k, spec in enumerate(variant.stages, 1):
        row[f"finetune_stage{k}"] = spec.finetune + (f"(r={spec.lora.r})" if spec.finetune != "full" else "")
        row[f"mix_stage{k}"] = f"{spec.mix.source}:{spec.mix.ratio:g}" if spec.mix and spec.mix.ratio > 0 else "none"
    for k, res in enumerate(results, 1):
        for j in range(1, k + 1):
            key = variant.stages[j - 1].data
            if key in res.get("eval", {}):
                row[f"acc_{dataset_letter(j)}_after_stage{k}"] = res["eval"][key]["exact_match"]
        s = res["summary"]
        row[f"epochs_stage{k}"] = s["epochs"]
        row[f"stopped_by_stage{k}"] = s["stopped_by"]
        row[f"train_seconds_stage{k}"] = s["train_seconds"]
    a1, an = row.get("acc_A_after_stage1"), row.get(f"acc_A_after_stage{n}")
    row["forgetting"] = (a1 - an) if a1 is not None and an is not None and n > 1 else None
    return row


def run_pipeline(recipe: Recipe, variant_names: Optional[List[str]] = None, stages: Optional[List[int]] = None
                 ) -> Dict[str, Any]:
    from .report import write_report

    variants = [recipe.variant(n) for n in variant_names] if variant_names else recipe.variants
    check_recipe(recipe, variants)
    stages = stages or list(range(1, recipe.num_stages + 1))
    rows = []
    for v in variants:
        results = [run_stage(recipe, v, k) for k in stages]
        if stages == list(range(1, recipe.num_stages + 1)):
            rows.append(variant_row(recipe, v, results))
    report = {"recipe": recipe.name, "output_dir": recipe.output_dir, "world_size": dist.world_size(),
              "precision": resolve_precision(recipe.precision), "ds_config": recipe.ds_config,
              "num_stages": recipe.num_stages, "variants": rows}
    if rows and dist.is_main():
        write_report(report, recipe.output_dir)
    dist.barrier()
    return report
