"""The ``remix-ds`` command: one entry point with a subcommand per task (the launch/*.py scripts stay)."""
from __future__ import annotations

import sys
from typing import List, Optional

from .helptext import HELP, version_string

COMMANDS = {
    "train": "run every stage of every variant of a recipe, evaluate, write the report",
    "stage": "train (and evaluate) one stage: remix-ds stage K -c RECIPE",
    "eval": "score a model, adapter or stage directory on a factoid set",
    "merge": "merge a LoRA adapter (or a stage's adapters) into its base",
    "analyze": "logit lens of the stage models on D_A",
    "filter-unknown": "split a factoid set into what a model knows and does not yet know",
    "bench": "time remix_ds's training step against a plain PyTorch/PEFT loop",
    "report": "rewrite a recipe's report from its finished results",
    "build-tiny": "build the tiny pretrained model and tokenizer the demo uses",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: remix-ds COMMAND [options]   (remix-ds COMMAND --help: its options, an example, its outputs)",
             "", "Continual memorization of factoids (REMIX) on DeepSpeed.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "first run: `remix-ds train` runs the bundled demo (it builds a tiny model first; a few minutes "
                  "on a CPU).", "multi-GPU: deepspeed --num_gpus N launch/pipeline.py -c RECIPE (launch/*.py take "
                  "the same options)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(version_string())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"remix-ds: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"remix-ds {command}"   # argparse's prog in usage lines and errors
    assert command in HELP
    if command == "train":
        from .cli import pipeline_main
        pipeline_main(rest)
    elif command == "report":
        from .cli import pipeline_main
        pipeline_main(rest, report=True)
    elif command == "stage":
        if rest and rest[0] in ("-h", "--help", "--version"):
            from .cli import stage_main
            stage_main(1, rest)
        if not rest or not rest[0].isdigit() or int(rest[0]) < 1:
            print("usage: remix-ds stage K [-c RECIPE] [options]: K is the stage number (1, 2, ...)\n"
                  "remix-ds stage: error: give the stage number first, e.g. remix-ds stage 1 -c my.yaml",
                  file=sys.stderr)
            sys.exit(2)
        from .cli import stage_main
        sys.argv[0] = f"remix-ds stage {rest[0]}"
        stage_main(int(rest[0]), rest[1:])
    elif command == "eval":
        from .cli import eval_main
        eval_main(rest)
    elif command == "merge":
        from .cli import merge_main
        merge_main(rest)
    elif command == "analyze":
        from .cli import analyze_main
        analyze_main(rest)
    elif command == "filter-unknown":
        from .filter_unknown import main as filter_main
        filter_main(rest)
    elif command == "bench":
        from .bench import main as bench_main
        sys.exit(bench_main(rest))
    elif command == "build-tiny":
        from .cli import build_tiny_main
        build_tiny_main(rest)


if __name__ == "__main__":
    main()
