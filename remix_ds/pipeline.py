"""The launcher's work: for each variant, every stage (train, merge), evaluation after each, the report."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import dist, retention
from .config import Recipe, Variant
from .data import dataset_examples, is_factoid, stage_train_set
from .zero import load_ds_config, resolve_precision
from .files import read_json, write_json_atomic
from .errors import ConfigError
from .evaluate import METRICS_VERSION, check_scorer, evaluate
from .metrics import is_task_source
from .model import is_adapter_dir
from .batching import batch_plan
from .checkpoints import latest_checkpoint
from .stage import train_stage
from .stages import Stage
from .modes import mode_of
from .penalties import build_penalties

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
                ds_cfg = load_ds_config(spec.ds_config or recipe.ds_config)
                batch_plan(dist.world_size(), spec.global_batch_size, spec.micro_batch_size)
                stage_train_set(recipe, spec, k)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            check_combination(spec, ds_cfg, v.stages[k] if k < len(v.stages) else None, where)
            for p in build_penalties(spec):   # what a penalty cannot serve, before any stage trains
                p.check(Stage(recipe, v, k))
            from .tracking import check_trackers, requested
            check_trackers(requested(spec), where)
    check_model_dir(recipe.model, "model")
    retention.check_retention(recipe)


def check_model_dir(model: str, what: str, adapter_ok: bool = False) -> None:
    """Refuse, with what to do instead, a model path that is not a model: a missing directory, a remix_ds stage
    directory, a PEFT adapter (unless ``adapter_ok``) or a directory without a model config. A name that is not
    a local path (one '/' at most, not starting with / . ~) is taken for a hub id."""
    import json

    if model == "tiny":
        return
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        if path.startswith(("/", "./", "../")) or path.count("/") >= 2 or os.path.exists(path):
            raise ConfigError(f"{what} {model!r}: directory not found")
        from .data.hub import check_hub_model
        check_hub_model(model, what)   # a hub id: in the cache or reachable now (one short request)
        return
    cfg_path = os.path.join(path, "config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        try:
            cfg = json.load(open(cfg_path))
        except ValueError:
            raise ConfigError(f"{what} {model!r}: config.json is not valid JSON") from None
    if "model_type" in cfg:
        return
    if "variant" in cfg and "stage" in cfg:
        raise ConfigError(f"{what} {model!r} is a remix_ds stage directory: give the model in it "
                          f"({os.path.join(model, 'model')} or {os.path.join(model, 'merged')})")
    if is_adapter_dir(path):
        if adapter_ok:
            return
        raise ConfigError(f"{what} {model!r} is a PEFT adapter, not a model: give the stage's merged/ model, or "
                          f"merge the adapter into its base with launch/merge.py")
    raise ConfigError(f"{what} {model!r}: not a Hugging Face model directory (no config.json with a model_type)")


def check_combination(spec, ds_cfg: Dict[str, Any], next_spec, where: str) -> None:
    """Refuse, before training, the combinations DeepSpeed, PEFT or bitsandbytes cannot run: the stage's mode
    checks its own settings (``FineTuneMode.validate``)."""
    mode_of(spec).validate(spec, ds_cfg, next_spec, where)


def eval_keys(stage: Stage) -> List[str]:
    """Datasets scored after stage k: every factoid dataset of stages 1..k, and GSM8K / MATH sets (scored
    by their final answer) even though they are not factoid."""
    recipe = stage.recipe
    keys: List[str] = []
    for j in range(1, stage.k + 1):
        key = stage.variant.stages[j - 1].data
        if key not in keys and (is_factoid(recipe, key) or is_task_source(recipe.datasets[key].source)):
            keys.append(key)
    return keys


def _eval_is_current(prev: Optional[Dict[str, Any]], h: str, recipe: Recipe, scorer: str) -> bool:
    return bool(prev) and prev.get("hash") == h and prev.get("batch_size") == recipe.eval.batch_size \
        and prev.get("requested_scorer", prev.get("scorer")) == scorer \
        and prev.get("metrics_version") == METRICS_VERSION \
        and prev.get("requested_max_new_tokens") == recipe.eval.max_new_tokens


def eval_after_stage(stage: Stage, loader: Optional[retention.LazyModel] = None) -> Dict[str, Dict[str, Any]]:
    """Score every dataset of stages 1..k (see ``eval_keys``) on stage k's output model.

    ``eval.scorer``: ``generate`` (greedy generation, the study's metric; the default) or
    ``teacher-forced`` (one forward pass per batch, exact token match). Results are cached in
    ``stage<k>/eval/<key>.json`` and reused while the stage, the scorer and the eval settings are unchanged.
    ``loader``: the stage's model, loaded once for every scorer.
    """
    recipe, d, h = stage.recipe, stage.eval_dir, stage.hash
    scorer = check_scorer(getattr(recipe.eval, "scorer", "generate"))
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for key in eval_keys(stage):
        prev = read_json(d / f"{key}.json")
        if _eval_is_current(prev, h, recipe, scorer):
            results[key] = prev
        else:
            todo.append(key)
    todo = dist.broadcast_object(todo)
    if todo:
        path, _ = stage.output()
        own = loader is None
        loader = loader or retention.LazyModel(stage.output, recipe)
        model, tok = loader.get()
        for key in todo:
            metrics = evaluate(model, tok, dataset_examples(recipe, key), scorer=scorer,
                               batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
                               device=dist.device(), out_dir=str(d), name=key)
            metrics.update({"hash": h, "batch_size": recipe.eval.batch_size, "model": path,
                            "requested_scorer": scorer, "requested_max_new_tokens": recipe.eval.max_new_tokens})
            results[key] = metrics
            if dist.is_main():
                d.mkdir(parents=True, exist_ok=True)
                write_json_atomic(str(d / f"{key}.json"), metrics)
        del model
        if own:
            loader.close()
    dist.barrier()
    return results


def stored_results(recipe: Recipe, variant: Variant) -> Optional[List[Dict[str, Any]]]:
    """Every stage's summary and evaluation of a variant as its complete, current outputs hold them (no
    training, no scoring), or None if any stage or evaluation is missing or stale."""
    scorer = check_scorer(getattr(recipe.eval, "scorer", "generate"))
    results = []
    for k in range(1, recipe.num_stages + 1):
        stage = Stage(recipe, variant, k)
        if not stage.is_complete():
            return None
        ev = {}
        for key in eval_keys(stage):
            prev = read_json(stage.eval_dir / f"{key}.json")
            if not _eval_is_current(prev, stage.hash, recipe, scorer):
                return None
            ev[key] = prev
        res = {"summary": stage.done()["summary"], "eval": ev}
        if retention.enabled(recipe):
            res["retention"] = retention.stored_after_stage(stage)
        results.append(res)
    return results


def identical_stage(stage: Stage) -> Optional[Path]:
    """Another variant's complete stage k with this stage's fingerprint (the same stage and the same earlier
    stages, data and settings), if any: a grid whose variants share stage 1 (the paper's stage-2 grid: one D_A,
    eight D_B) trains it once."""
    for other in stage.recipe.variants:
        if other.name == stage.variant.name or len(other.stages) < stage.k:
            continue
        there = stage.other(other)
        if there.is_complete(stage.hash):   # its DONE.json has this hash and its output is there
            return there.dir
    return None


def reuse_stage(src: Path, dst: Path) -> None:
    """A complete stage directory copied to another variant's place: files hard-linked where the file system
    allows (no second copy of the weights), the checkpoints left out, DONE.json written last."""
    import shutil

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns("checkpoints", "DONE.json", "*.tmp-*"))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    shutil.copy2(src / "DONE.json", dst / "DONE.json")


def run_stage(stage: Stage, evaluate: bool = True) -> Dict[str, Any]:
    """Train a stage unless its complete output exists, then evaluate it."""
    prev, name = stage.previous, stage.variant.name
    if prev is not None and not dist.broadcast_object(prev.is_complete()):
        if prev.done():
            raise ConfigError(f"variant {name}: the output in {prev.dir} was trained with another config "
                              f"({prev.config_change() or 'no record of it'}); give stage{stage.k} the same recipe "
                              f"and overrides as stage{prev.k}, or rerun stage{prev.k}")
        raise ConfigError(f"variant {name}: stage{prev.k} has no complete output in {prev.dir}; run stage{prev.k} "
                          f"first")
    if not dist.broadcast_object(stage.is_complete()):
        donor = identical_stage(stage) if dist.is_main() else None
        if dist.broadcast_object(donor is not None):
            if dist.is_main():
                reuse_stage(donor, stage.dir)
                log.info("%s: the same stage (same fingerprint) is complete in %s: reused, not retrained",
                         stage.name, donor)
            dist.barrier()
    if dist.broadcast_object(stage.is_complete()):
        if dist.is_main():
            log.info("%s: complete output found, not retraining", stage.name)
        summary = stage.done()["summary"]
    else:
        summary = train_stage(stage)
    result = {"summary": summary}
    if evaluate:
        loader = retention.LazyModel(stage.output, stage.recipe)
        result["eval"] = eval_after_stage(stage, loader)
        if retention.enabled(stage.recipe):
            result["retention"] = retention.after_stage(stage, loader)
        loader.close()
    return result


EVAL_DETAIL_KEYS = ("n", "scorer", "accuracy", "accuracy_metric", "exact_match", "alias_exact_match", "rouge_l",
                    "seconds")


def _accuracy(metrics: Dict[str, Any]) -> Optional[float]:
    """The study's accuracy of one eval result (older results have only exact_match)."""
    return metrics.get("accuracy", metrics.get("exact_match"))


def spec_keys(variant: Variant) -> Dict[str, Any]:
    """Every training key of every stage, flattened (``stage1.lora.r``: 8): what tells two variants apart."""
    import dataclasses

    from .stages import OPERATIONAL_KEYS

    out: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, x in value.items():
                walk(f"{prefix}.{key}", x)
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value
    for k, spec in enumerate(variant.stages, 1):
        d = {key: v for key, v in dataclasses.asdict(spec).items() if key not in OPERATIONAL_KEYS + ("track", "probe")}
        if not mode_of(spec).trains_adapter:
            d.pop("lora")
        if d.get("mix") is None:
            d["mix"] = "none"
        walk(f"stage{k}", d)
    return out


def variant_row(recipe: Recipe, variant: Variant, results: List[Dict[str, Any]],
                base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One report row: modes and mixing per stage, D_A accuracy after every stage, each later dataset's
    accuracy after its own stage, forgetting, epochs and wall time per stage; ``stages`` holds the details
    (every dataset's metrics after every stage) for report.json; ``matrix`` the accuracy matrix (base model,
    when ``base`` holds its results, and every stage; every stage's dataset and every retention probe) with its
    summaries; ``retention`` every probe's and text set's value on the base model and after each stage."""
    row: Dict[str, Any] = {"name": variant.name}
    n = len(variant.stages)
    letters = {}
    for j, spec in enumerate(variant.stages, 1):
        letters.setdefault(spec.data, dataset_letter(j))
    for k, spec in enumerate(variant.stages, 1):
        reg = getattr(spec, "regularizer", None)   # the baseline's penalty, named in the mode: full+ewc(1e+03)
        row[f"finetune_stage{k}"] = mode_of(spec).describe(spec) \
            + (f"+{reg.method}({reg.weight:g})" if reg is not None else "")
        row[f"regularizer_stage{k}"] = reg.method if reg is not None else "none"
        row[f"mix_stage{k}"] = f"{spec.mix.source}:{spec.mix.ratio:g}" if spec.mix and spec.mix.ratio > 0 else "none"
    stages = []
    for k, res in enumerate(results, 1):
        spec = variant.stages[k - 1]
        ev = res.get("eval", {})
        for j in range(1, k + 1):
            key = variant.stages[j - 1].data
            if key in ev and letters[key] == dataset_letter(j):
                row[f"acc_{dataset_letter(j)}_after_stage{k}"] = _accuracy(ev[key])
                row[f"n_{dataset_letter(j)}"] = ev[key].get("n")
        s = res["summary"]
        row[f"epochs_stage{k}"] = s["epochs"]
        row[f"zero_stage_stage{k}"] = s.get("zero_stage")
        row[f"stopped_by_stage{k}"] = s["stopped_by"]
        row[f"train_seconds_stage{k}"] = s["train_seconds"]
        tps = s.get("padfree_tokens_per_s")   # padding-free, training steps only (None: an older summary)
        row[f"tokens_per_s_stage{k}"] = round(tps) if tps is not None else None
        row[f"eval_seconds_stage{k}"] = round(sum(m.get("seconds") or 0.0 for m in ev.values()), 3) if ev else None
        stages.append({"stage": k, "data": spec.data, "finetune": spec.finetune,
                       "regularizer": row[f"regularizer_stage{k}"],
                       "lora_r": spec.lora.r if mode_of(spec).trains_adapter else None,
                       "mix": row[f"mix_stage{k}"], "epochs": s["epochs"], "stopped_by": s["stopped_by"],
                       "train_seconds": s["train_seconds"], "n_data": s.get("n_data"), "n_mix": s.get("n_mix"),
                       "n_dropped": s.get("n_dropped"), "tokens": s.get("tokens"),
                       "tokens_per_s": s.get("padfree_tokens_per_s"), "padding": s.get("padding"),
                       "eval": {key: {"dataset": letters.get(key, key),
                                      **{m: v for m, v in metrics.items() if m in EVAL_DETAIL_KEYS}}
                                for key, metrics in ev.items()}})
    scorers = sorted({m.get("scorer", "generate") for st in stages for m in st["eval"].values()})
    row["scorer"] = "+".join(scorers) if scorers else None
    a1, an = row.get("acc_A_after_stage1"), row.get(f"acc_A_after_stage{n}")
    row["forgetting"] = (a1 - an) if a1 is not None and an is not None and n > 1 else None
    row["stages"] = stages
    row["spec"] = spec_keys(variant)
    add_matrix(row, variant, results, base, letters)
    return row


def add_matrix(row: Dict[str, Any], variant: Variant, results: List[Dict[str, Any]], base: Optional[Dict[str, Any]],
               letters: Dict[str, str]) -> None:
    """row["matrix"] (rows: base, stage1..N; columns: D_A..D_N, then the retention probes), its summaries
    (``retention.cl_summaries`` over the D_A..D_N block) and row["retention"] (probes and text sets)."""
    n = len(results)
    tasks = [(dataset_letter(j), variant.stages[j - 1].data) for j in range(1, n + 1)
             if letters.get(variant.stages[j - 1].data) == dataset_letter(j)]
    ret_after = [res.get("retention") or {} for res in results]
    base_ret = (base or {}).get("retention") or {}
    names: List[str] = []
    for r in [base_ret] + ret_after:
        names += [name for name in r if name not in names]
    probes = [x for x in names if any((r.get(x) or {}).get("kind") == "probe" for r in [base_ret] + ret_after)]
    texts = [x for x in names if x not in probes]

    def acc(m):
        return _accuracy(m) if m else None
    rows, values = [], []
    if base and (base.get("eval") or base_ret):
        rows.append("base")
        values.append([acc((base.get("eval") or {}).get(key)) for _, key in tasks]
                      + [(base_ret.get(x) or {}).get("accuracy") for x in probes])
    for k, res in enumerate(results, 1):
        rows.append(f"stage{k}")
        values.append([acc(res.get("eval", {}).get(key)) if j <= k else None for j, (_, key) in enumerate(tasks, 1)]
                      + [(ret_after[k - 1].get(x) or {}).get("accuracy") for x in probes])
    task_block = [v[:len(tasks)] for v, r in zip(values, rows) if r != "base"]
    summary = retention.cl_summaries(task_block) if len(tasks) == n else \
        {"average_accuracy": None, "backward_transfer": None, "forgetting": None}
    row["matrix"] = {"rows": rows, "columns": [f"D_{x}" for x, _ in tasks] + probes,
                     "datasets": [key for _, key in tasks] + probes, "values": values, **summary}
    row.update({"average_accuracy": summary["average_accuracy"], "backward_transfer": summary["backward_transfer"]})
    ret: Dict[str, Any] = {}
    for x in probes + texts:
        src = [base_ret.get(x)] + [r.get(x) for r in ret_after]
        field = "accuracy" if x in probes else "loss"
        first = next((m for m in src if m), {})
        ret[x] = {"kind": "probe" if x in probes else "text", "what": first.get("what"),
                  "n": first.get("n", first.get("passages")), "metric": field,
                  "base": (src[0] or {}).get(field), "after": [(m or {}).get(field) for m in src[1:]]}
        if x in texts:
            ret[x]["perplexity_base"] = (src[0] or {}).get("perplexity")
            ret[x]["perplexity_after"] = [(m or {}).get("perplexity") for m in src[1:]]
        row[f"{x}_base"] = ret[x]["base"]
        row[f"n_{x}"] = ret[x]["n"]
        for k, value in enumerate(ret[x]["after"], 1):
            row[f"{x}_after_stage{k}"] = value
    row["retention"] = ret


def plan(recipe: Recipe, variants: List[Variant], stages: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """What a run would do, without doing it: per variant and stage, ``complete`` (kept), ``resume`` (from a
    checkpoint of this config), ``retrain`` (an output of another config: what changed) or ``train`` (none
    yet); and whether its evaluation is cached. A stage after one that will (re)train is itself retrained."""
    scorer = check_scorer(getattr(recipe.eval, "scorer", "generate"))
    ret_names = ([p.name for p in retention.probe_defs(recipe)] + list(retention.text_sets(recipe))
                 if retention.enabled(recipe) else [])
    rows = []
    trained: Dict[Any, str] = {}   # (stage, hash) -> the variant whose run trains it first
    for v in variants:
        upstream_changes = False
        for k in stages or range(1, recipe.num_stages + 1):
            stage = Stage(recipe, v, k)
            d, h = stage.dir, stage.hash
            if stage.is_complete() and not upstream_changes:
                action, why = "complete", "kept"
                todo = [key for key in eval_keys(stage)
                        if not _eval_is_current(read_json(d / "eval" / f"{key}.json"), h, recipe, scorer)]
                todo += [x for x in ret_names if x not in retention.stored_after_stage(stage)]
                evaluation = "cached" if not todo else "to score: " + ", ".join(todo)
            else:
                first_change = not upstream_changes   # the first stage of the variant to (re)train
                upstream_changes = True
                spec, tag = stage.spec, None
                try:   # with the layout check of the run itself: a checkpoint it would refuse shows as such
                    if spec.resume == "auto":
                        tag = latest_checkpoint(stage.checkpoints, h, stage.checkpoint_layout(dist.world_size()))
                except ConfigError as e:
                    tag = f"? ({e})"
                donor = identical_stage(stage) if first_change else None
                if donor is not None:
                    action, why = "reuse", f"the same stage is complete in {donor}"
                    upstream_changes = False
                elif (k, h) in trained:
                    action, why = "reuse", f"the same stage as {trained[(k, h)]}/stage{k}, trained before it"
                elif tag:
                    action, why = "resume", f"from checkpoint {tag}"
                elif stage.done():
                    change = stage.config_change() or "no record of the earlier config"
                    if not first_change and change.startswith("the stage keys are the same"):
                        change = f"stage{k - 1} is (re)trained first"
                    action, why = "retrain", change
                else:
                    action, why = "train", "no output yet"
                if action != "reuse":
                    trained.setdefault((k, h), v.name)
                evaluation = "to score: " + ", ".join(eval_keys(stage) + ret_names)
            rows.append({"variant": v.name, "stage": k, "action": action, "why": why, "evaluation": evaluation,
                         "dir": str(d)})
    return rows


def shard_variants(variants: List[Variant], shard: Optional[str]) -> List[Variant]:
    """The variants of shard ``"i/N"`` (i from 0: every N-th variant from the i-th, so that a sweep spreads over
    the shards), or all of them. Shards of one recipe run at once, each as its own job, into one output_dir:
    every variant writes only under ``<output_dir>/<variant>/``, and the report is gathered after
    (``report_only``)."""
    if not shard:
        return variants
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected I/N, e.g. 0/4 (I from 0 to N-1; in a SLURM array: "
                          f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {shard!r}: I must be in 0..N-1")
    return variants[i::n]


def run_pipeline(recipe: Recipe, variant_names: Optional[List[str]] = None, stages: Optional[List[int]] = None,
                 shard: Optional[str] = None) -> Dict[str, Any]:
    """Every stage of the variants (all, or those named; of one shard with ``shard``), evaluation after each, and
    the report. A shard writes no report: shards of one recipe may finish at the same moment, and the report of
    all of them is gathered with ``report_only`` once every shard is done."""
    from .report import write_report

    variants = [recipe.variant(n) for n in variant_names] if variant_names else recipe.variants
    variants = shard_variants(variants, shard)
    check_recipe(recipe, variants)
    stages = stages or list(range(1, recipe.num_stages + 1))
    base = retention.base_results(recipe) if retention.enabled(recipe) else None
    rows = {}
    for v in variants:
        results = [run_stage(Stage(recipe, v, k)) for k in stages]
        if stages == list(range(1, recipe.num_stages + 1)):
            rows[v.name] = variant_row(recipe, v, results, base)
    if shard:
        report = report_dict(recipe, list(rows.values()), dist.world_size())
        if dist.is_main():
            log.info("shard %s: %d variant(s) done (%s); once every shard is done, gather the report with "
                     "--report-only", shard, len(variants), ", ".join(v.name for v in variants))
        dist.barrier()
        return report
    if rows and variant_names:
        # a run of some variants keeps the others' finished results in the report (in recipe order)
        for v in recipe.variants:
            if v.name not in rows:
                stored = stored_results(recipe, v) if dist.is_main() else None
                if stored is not None:
                    rows[v.name] = variant_row(recipe, v, stored, base)
        rows = {v.name: rows[v.name] for v in recipe.variants if v.name in rows}
    rows = list(rows.values())
    report = report_dict(recipe, rows, dist.world_size())
    if rows and dist.is_main():
        write_report(report, recipe.output_dir)
    dist.barrier()
    return report


def report_dict(recipe: Recipe, rows: List[Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    from .report import environment

    out = {"recipe": recipe.name, "output_dir": recipe.output_dir, "world_size": world_size,
           "precision": resolve_precision(recipe.precision), "ds_config": recipe.ds_config,
           "num_stages": recipe.num_stages, "variants": rows, "environment": environment()}
    if retention.enabled(recipe):
        import dataclasses
        out["retention"] = dataclasses.asdict(recipe.retention)
    return out


def report_only(recipe: Recipe, variant_names: Optional[List[str]] = None) -> Dict[str, Any]:
    """Rewrite report.json / report.md / forgetting.png from the finished, current results of the variants
    (all, or those named) without training or scoring anything; variants not finished are listed and left out."""
    from .report import write_report

    variants = [recipe.variant(n) for n in variant_names] if variant_names else recipe.variants
    base = retention.stored_base(recipe) if retention.enabled(recipe) else None
    rows, missing = [], []
    for v in variants:
        stored = stored_results(recipe, v)
        if stored is None:
            missing.append(v.name)
        else:
            rows.append(variant_row(recipe, v, stored, base))
    if not rows:
        raise ConfigError(f"no variant of {recipe.source_file or recipe.name} has finished, current results in "
                          f"{recipe.output_dir} (see --dry-run)")
    if missing:
        log.warning("left out of the report (not finished, or of another config): %s", ", ".join(missing))
    cfg = read_json(Stage(recipe, recipe.variant(rows[0]["name"]), 1).dir / "config.json") or {}
    report = report_dict(recipe, rows, cfg.get("world_size", 1))
    write_report(report, recipe.output_dir)
    return report
