"""Examples and output locations for each command's --help, and the version line (no imports: the library
modules that build a command's parser use it without importing the command-line module)."""
from __future__ import annotations

import argparse

from . import __version__

HELP = {
    "train": ("remix-ds train                                # the bundled demo (builds the tiny model first)\n"
              "  remix-ds train -c my.yaml -v lora stage1.epochs=5\n"
              "  remix-ds train -c my.yaml --dry-run           # what would be trained, and why",
              "<output_dir>/<variant>/stage<k>/ (models, adapters, eval/), <output_dir>/report.md"),
    "stage": ("remix-ds stage 1 -c my.yaml                   # stage 1 of every variant\n"
              "  remix-ds stage 2 -c my.yaml -v full --dry-run",
              "<output_dir>/<variant>/stage<k>/ (model/ or adapter/ and merged/, eval/, train_log.jsonl)"),
    "eval": ("remix-ds eval --model runs/demo/full/stage2 -c my.yaml --dataset A\n"
             "  remix-ds eval --model path/to/model --data facts.jsonl --out scores/",
             "the metrics on stdout; with --out DIR: DIR/predictions.jsonl and the metrics"),
    "merge": ("remix-ds merge runs/demo/lora/stage2 merged/     # a stage directory\n"
              "  remix-ds merge path/to/adapter merged/          # base: the adapter's recorded base\n"
              "  remix-ds merge base/ path/to/adapter merged/",
              "OUT: a Hugging Face model directory (safetensors); an existing OUT only with --force"),
    "analyze": ("remix-ds analyze -c my.yaml -v full --stage 2",
                "<output_dir>/analysis/logit_lens.{json,md,png} (or --out DIR)"),
    "filter-unknown": ("remix-ds filter-unknown -c my.yaml --dataset A --out filtered/\n"
                       "  remix-ds filter-unknown --model tiny --source popqa --path popqa.jsonl --out filtered/",
                       "--out DIR: known.jsonl, yet_to_learn.jsonl, counts.json"),
    "bench": ("remix-ds bench --shape tiny\n"
              "  remix-ds bench --summarize bench.jsonl",
              "one JSON record per case appended to --out (see docs/benchmarks.md)"),
    "report": ("remix-ds report -c my.yaml                    # rewrite the report from finished results",
               "<output_dir>/report.md (and the table on stdout); nothing is trained"),
    "build-tiny": ("remix-ds build-tiny\n  remix-ds build-tiny models/tiny",
                   "the cache ($REMIX_DS_CACHE, default ~/.cache/remix_ds) or the given directory"),
}


def version_string() -> str:
    return f"remix-ds {__version__}"


def epilog(command: str) -> str:
    example, outputs = HELP[command]
    return f"example:\n  {example}\n\noutputs: {outputs}"


class Formatter(argparse.HelpFormatter):
    """Wraps the description as usual; keeps the example block's lines as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def decorate(p: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """Add the command's example and output locations to its --help, and --version."""
    p.epilog = epilog(command)
    p.formatter_class = Formatter
    p.add_argument("--version", action="version", version=version_string())
    return p
