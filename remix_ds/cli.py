"""Shared command-line handling for the launch/ scripts."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from .errors import RemixError


def setup_logging() -> None:
    from . import dist

    level = logging.INFO if dist.rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{dist.rank()}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "accelerate", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING if dist.rank() == 0 else logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def recipe_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
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


def main_guard(fn) -> None:
    """Run fn(); print RemixError messages without a traceback and exit non-zero."""
    try:
        fn()
        from . import dist
        dist.shutdown()
    except RemixError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


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


def pipeline_main(argv: Optional[List[str]] = None) -> None:
    args = add_dry_run(recipe_parser("Run every stage of every variant of a recipe, evaluate, and write the "
                                     "forgetting report. With no --config, runs the bundled demo."),
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
    args = add_dry_run(recipe_parser(f"Train (and evaluate) stage {k} of each variant of a recipe.")
                       ).parse_intermixed_args(argv)

    def run():
        setup_logging()
        from . import dist
        from .config import load_recipe
        from .pipeline import check_recipe, run_stage

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
            res = run_stage(recipe, v, k)
            if dist.is_main():
                accs = ", ".join(f"{key}: {m.get('accuracy', m.get('exact_match')):.3f}"
                                 f" ({m.get('accuracy_metric', 'exact_match')})" for key, m in res["eval"].items())
                print(f"{v.name}/stage{k}: {res['summary']['epochs']} epochs, accuracy {accs}")
    main_guard(run)


def eval_main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Accuracy of a model (full directory, or an adapter directory on its "
                                            "base) on a factoid set: greedy generation (default) or teacher-forced.")
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
        from .engine import resolve_precision, torch_dtype
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

    from .stage import output_of

    return output_of(Path(path), cfg["spec"]["finetune"], cfg["spec"]["merge"],
                     lambda: (cfg["base_model"], list(cfg.get("frozen_adapters") or [])))


def build_tiny_main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Build the tiny pretrained Llama + tokenizer as a HF directory.")
    p.add_argument("out", nargs="?", default=None, help="output directory (default: the cache)")
    args = p.parse_args(argv)

    def run():
        setup_logging()
        from .tiny import build_tiny
        print(build_tiny(out_dir=args.out))
    main_guard(run)
