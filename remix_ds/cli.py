"""Shared command-line handling for the launch/ scripts."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from .helptext import decorate
from .runlog import main_guard, quiet_cpu_accelerator, setup_logging  # noqa: F401  (the commands' shared set-up)


def recipe_parser(description: str, command: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if command:
        decorate(p, command)
    p.add_argument("--config", "-c", default=None, help="recipe YAML (default: the bundled demo recipe)")
    p.add_argument("--variant", "-v", action="append", default=None,
                   help="run only this variant (repeatable or comma-separated; a quoted pattern such as 'lora-r*' "
                        "selects every variant it matches, e.g. a whole sweep; default: all variants)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run every N-th variant from the I-th (I from 0; in a SLURM array "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT): shards of one recipe run at once, each its own "
                        "job, into one output_dir; gather the report after with --report-only")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage1.epochs=5 ds_config=zero3")
    return p


def split_variants(values: Optional[List[str]], recipe=None) -> Optional[List[str]]:
    """--variant values (repeatable, comma-separated) as variant names; with the recipe, a shell-style pattern
    (``'lora-r*'``: a whole sweep) stands for every variant it matches, in the recipe's order."""
    if not values:
        return None
    names = [v for item in values for v in item.split(",") if v]
    if recipe is None:
        return names
    import fnmatch

    out: List[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            hits = [v.name for v in recipe.variants if fnmatch.fnmatchcase(v.name, name)]
            if not hits:
                from .errors import ConfigError
                raise ConfigError(f"--variant {name!r} matches no variant; known: "
                                  f"{', '.join(v.name for v in recipe.variants)}")
            out += [h for h in hits if h not in out]
        elif name not in out:
            out.append(name)
    return out


# ---------------------------------------------------------------- entry points (launch/*.py call these)

def add_dry_run(p: argparse.ArgumentParser, report_only: bool = False) -> argparse.ArgumentParser:
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="check the recipe and its data, print what would be trained, resumed, kept or scored "
                        "(and why), and stop: nothing is trained or written")
    if report_only:
        p.add_argument("--report-only", action="store_true",
                       help="rewrite the report from the finished, current results of the variants (all, or "
                            "--variant); nothing is trained or scored")
    return p


def print_plan(recipe, variants, stages=None) -> None:
    from .pipeline import check_recipe, plan

    check_recipe(recipe, variants)
    rows = plan(recipe, variants, stages)
    print(f"recipe {recipe.name}: {len(variants)} variant(s), output in {recipe.output_dir}")
    print("| variant | stage | action | why | evaluation |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['stage']} | {r['action']} | {r['why']} | {r['evaluation']} |")


def pipeline_main(argv: Optional[List[str]] = None, report: bool = False) -> None:
    if report:
        p = recipe_parser("Rewrite a recipe's forgetting report from the finished, current results of its variants "
                          "(all, or --variant): nothing is trained or scored.", "report")
        args = p.parse_intermixed_args(argv)
        args.dry_run, args.report_only = False, True
    else:
        args = add_dry_run(recipe_parser("Run every stage of every variant of a recipe, evaluate, and write the "
                                         "forgetting report. With no --config, runs the bundled demo.", "train"),
                           report_only=True).parse_intermixed_args(argv)

    def run():
        setup_logging()
        from . import dist
        from .config import load_recipe
        from .pipeline import run_pipeline
        from .report import markdown_table

        from .pipeline import shard_variants

        recipe = load_recipe(args.config, args.overrides)
        if args.dry_run:
            names = split_variants(args.variant, recipe)
            print_plan(recipe, shard_variants([recipe.variant(n) for n in names] if names else recipe.variants,
                                              args.shard))
            return
        if args.report_only:
            from .pipeline import report_only
            report = report_only(recipe, split_variants(args.variant, recipe))
            print(markdown_table(report))
            print(f"\nreport: {os.path.join(recipe.output_dir, 'report.md')}")
            return
        dist.init()
        report = run_pipeline(recipe, split_variants(args.variant, recipe), shard=args.shard)
        if dist.is_main() and report["variants"]:
            print(markdown_table(report))
            print(f"\nreport: {os.path.join(recipe.output_dir, 'report.md')}" if not args.shard else
                  f"\nshard {args.shard} done; gather the report of every shard with --report-only")
    main_guard(run)


def stage_main(k: int, argv: Optional[List[str]] = None) -> None:
    args = add_dry_run(recipe_parser(f"Train (and evaluate) stage {k} of each variant of a recipe.", "stage")
                       ).parse_intermixed_args(argv)

    def run():
        setup_logging()
        from . import dist
        from .config import load_recipe
        from .pipeline import check_recipe, run_stage
        from .stages import Stage

        recipe = load_recipe(args.config, args.overrides)
        if k > recipe.num_stages:
            from .errors import ConfigError
            raise ConfigError(f"the recipe has {recipe.num_stages} stages; there is no stage{k}")
        from .pipeline import shard_variants

        variants = [recipe.variant(n) for n in split_variants(args.variant, recipe)] if args.variant else recipe.variants
        variants = shard_variants(variants, args.shard)
        if args.dry_run:
            print_plan(recipe, variants, [k])
            return
        dist.init()
        check_recipe(recipe, variants)
        for v in variants:
            res = run_stage(Stage(recipe, v, k))
            if dist.is_main():
                accs = ", ".join(f"{key}: {m.get('accuracy', m.get('exact_match')):.3f}"
                                 f" ({m.get('accuracy_metric', 'exact_match')})" for key, m in res["eval"].items())
                print(f"{v.name}/stage{k}: {res['summary']['epochs']} epochs, accuracy {accs}")
    main_guard(run)


def eval_main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Accuracy of a model (full directory, or an adapter directory on its "
                                            "base) on a factoid set: greedy generation (default) or teacher-forced.")
    decorate(p, "eval")
    p.add_argument("--model", required=True, help="model directory, a PEFT adapter directory, or a stage directory "
                                                  "(<output_dir>/<variant>/stage<k>: the model its evaluation scores)")
    p.add_argument("--base", default=None, help="base model for an adapter (default: the adapter's own record)")
    p.add_argument("--data", default=None, help=".json/.jsonl records with prompt (or question) and answer")
    p.add_argument("--config", "-c", default=None, help="a recipe, to score one of its datasets (with --dataset)")
    p.add_argument("--dataset", default=None, help="dataset name in the recipe (e.g. A)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--scorer", default="generate", choices=["generate", "teacher-forced"],
                   help="generate: greedy decoding + answer rules (the study's metric); teacher-forced: one forward "
                        "pass, exact token match (same verdict as greedy exact token match, much faster)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--out", default=None, help="directory for predictions.jsonl and metrics (rank 0)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --config)")
    args = p.parse_intermixed_args(argv)

    def run():
        setup_logging()
        import json

        from . import dist
        from .config import DatasetSpec, load_recipe
        from .data import dataset_examples
        from .data.sources import load_examples
        from .zero import resolve_precision, torch_dtype
        from .errors import ConfigError
        from .evaluate import evaluate
        from .model import load_for_eval, load_tokenizer

        if args.data:
            examples = load_examples(DatasetSpec(source="json", path=args.data, num_examples=10 ** 9), 0, args.data)
            name = os.path.splitext(os.path.basename(args.data))[0]
        elif args.config and args.dataset:
            recipe = load_recipe(args.config, args.overrides)
            if args.dataset not in recipe.datasets:
                raise ConfigError(f"--dataset {args.dataset!r}: not in {args.config} "
                                  f"(known: {', '.join(recipe.datasets)})")
            examples, name = dataset_examples(recipe, args.dataset), args.dataset
        else:
            raise ConfigError("give --data FILE, or --config RECIPE with --dataset NAME")
        from .pipeline import check_model_dir
        path, adapters = stage_dir_model(args.model) or (args.model, [])
        if not os.path.isdir(path):
            raise ConfigError(f"--model {args.model!r}: directory not found")
        check_model_dir(path, "--model", adapter_ok=True)
        dist.init()
        model = load_for_eval(path, torch_dtype(resolve_precision(args.precision)), dist.device(), base=args.base,
                              adapters=adapters)
        tok = load_tokenizer(path)
        metrics = evaluate(model, tok, examples, scorer=args.scorer, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, device=dist.device(), out_dir=args.out, name=name)
        if dist.is_main():
            print(json.dumps(metrics, indent=2))
    main_guard(run)


def stage_dir_model(path: str):
    """For a remix_ds stage directory: the model its evaluation scores, as (directory, adapters on it) — the
    full or merged model, or with merge: false the base and the whole adapter stack. None for anything else."""
    import json

    from .errors import ConfigError

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not ("variant" in cfg and "stage" in cfg and "base_model" in cfg and "spec" in cfg):
        return None
    if not os.path.isfile(os.path.join(path, "DONE.json")):
        raise ConfigError(f"--model {path!r}: the stage has no complete output (no DONE.json)")
    from pathlib import Path

    from .stages import output_of

    return output_of(Path(path), cfg["spec"]["finetune"], cfg["spec"]["merge"],
                     lambda: (cfg["base_model"], list(cfg.get("frozen_adapters") or [])))


def build_tiny_main(argv: Optional[List[str]] = None) -> None:
    p = decorate(argparse.ArgumentParser(description="Build the tiny pretrained Llama + tokenizer as a HF "
                                                     "directory."), "build-tiny")
    p.add_argument("out", nargs="?", default=None, help="output directory (default: the cache)")
    args = p.parse_args(argv)

    def run():
        setup_logging()
        from .tiny import build_tiny
        print(build_tiny(out_dir=args.out))
    main_guard(run)


def merge_main(argv: Optional[List[str]] = None) -> None:
    p = decorate(argparse.ArgumentParser(
        description="Merge a LoRA adapter (or a stack of them) into its base on CPU, shard by shard, and write a "
                    "safetensors Hugging Face directory."), "merge")
    p.add_argument("paths", nargs="+", metavar="[BASE] ADAPTER OUT",
                   help="ADAPTER: a PEFT LoRA adapter directory or a remix_ds stage directory "
                        "(<output_dir>/<variant>/stage<k>); BASE (optional): the base model directory (default: "
                        "the adapter's adapter_config.json base_model_name_or_path, or the stage's own input); "
                        "OUT: the output directory")
    p.add_argument("--base", default=None, help="the base model directory (same as the optional first path)")
    p.add_argument("--force", "-f", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="output dtype (default: base's)")
    p.add_argument("--nf4", action="store_true", help="the adapter is a QLoRA adapter: merge into the NF4-"
                                                      "dequantised base weights it was trained against (a QLoRA "
                                                      "stage directory sets this itself)")
    p.add_argument("--nf4-dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="with --nf4: the dtype the base was loaded in for QLoRA training (the recipe's precision; "
                        "bitsandbytes quantised that cast; default: the stage's recorded precision, else the base "
                        "file's dtype)")
    args = p.parse_args(argv)
    if len(args.paths) not in (2, 3):
        p.error("give ADAPTER OUT, or BASE ADAPTER OUT")
    if len(args.paths) == 3 and args.base:
        p.error("give the base either as the first path or as --base, not both")

    def run():
        setup_logging()
        import json
        import time

        import torch

        from .adapters import local_model_dir, streaming_merge
        from .errors import ConfigError

        base, adapter, out = args.paths if len(args.paths) == 3 else (args.base, *args.paths)
        check_output_dir(out, "OUT", args.force)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        nf4, nf4_dtype = args.nf4, args.nf4_dtype
        stage = stage_dir_model(adapter)
        if stage is not None:
            stage_base, adapters = stage
            if not adapters:
                raise ConfigError(f"{adapter}: this stage's model is a full model already ({stage_base}); there is "
                                  f"no adapter to merge")
            with open(os.path.join(adapter, "config.json")) as f:
                cfg = json.load(f)
            if cfg["spec"]["finetune"] == "qlora":
                nf4 = True
                nf4_dtype = nf4_dtype or cfg.get("precision")
        else:
            adapters = [adapter]
            stage_base = None
        if base is None:
            base = stage_base or adapter_base(adapters[0])
        base = local_model_dir(base)
        t0 = time.time()
        stats = streaming_merge(base, adapters, out, dtype=dtypes.get(args.dtype or ""), nf4=nf4,
                                nf4_dtype=dtypes.get(nf4_dtype or ""))
        print(json.dumps({**stats, "seconds": round(time.time() - t0, 2), "base": base, "out": out}))
    main_guard(run)


def adapter_base(adapter_dir: str) -> str:
    """The base model a PEFT adapter records (adapter_config.json base_model_name_or_path)."""
    import json

    from .errors import ConfigError

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        with open(path) as f:
            recorded = json.load(f).get("base_model_name_or_path")
    except ValueError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not recorded:
        raise ConfigError(f"{path} records no base_model_name_or_path: give the base model (BASE ADAPTER OUT)")
    return recorded


def check_output_dir(path: str, what: str, force: bool = False) -> None:
    """An output directory that can be written: refused when it is a file, exists (without force), or its
    parent cannot be created."""
    from .errors import ConfigError

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a directory: give a directory path")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise ConfigError(f"{what} {path!r} exists and is not empty: give another path, or --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    node = parent
    while not os.path.exists(node):
        node = os.path.dirname(node)
    if not os.path.isdir(node):
        raise ConfigError(f"{what} {path!r}: {node} is a file, not a directory")


def analyze_main(argv: Optional[List[str]] = None) -> None:
    p = recipe_parser(
        "Logit lens of every variant's stage models on D_A: per layer, the share of factoids whose first "
        "answer token is top-1 and its mean rank; writes logit_lens.{json,md,png}.", "analyze")
    p.add_argument("--stage", "-s", type=int, action="append", default=None,
                   help="analyse only this stage's models (repeatable; default: every stage)")
    p.add_argument("--dataset", default=None, help="dataset to probe (default: each variant's stage-1 data, D_A)")
    p.add_argument("--adapter", action="store_true",
                   help="load base + adapter where a stage has adapter/ (default: the merged model)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    p.add_argument("--max-examples", type=int, default=None, help="probe only the first N examples")
    p.add_argument("--out", default=None, help="output directory (default: <output_dir>/analysis)")
    args = p.parse_intermixed_args(argv)

    def run():
        setup_logging()
        from . import dist
        from .analysis import analyze, markdown
        from .config import load_recipe

        recipe = load_recipe(args.config, args.overrides)
        dist.init()
        res = analyze(recipe, split_variants(args.variant, recipe), args.stage, dataset=args.dataset,
                      adapter=args.adapter, batch_size=args.batch_size or recipe.eval.batch_size,
                      max_examples=args.max_examples, out_dir=args.out)
        if dist.is_main():
            print(markdown(res))
            print(f"written to {args.out or os.path.join(recipe.output_dir, 'analysis')}")
    main_guard(run)
