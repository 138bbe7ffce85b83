"""What every command does around its work: the log (what a user needs, without the libraries' noise) and
exiting with one message on a RemixError. Library modules and commands import it; it imports no command."""
from __future__ import annotations

import logging
import os
import sys
import warnings

from .errors import RemixError


def setup_logging() -> None:
    from . import dist

    quiet_cpu_accelerator()
    level = logging.INFO if dist.rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{dist.rank()}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "accelerate", "httpx", "filelock",
                  "absl", "matplotlib", "PIL", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if dist.rank() == 0 else logging.ERROR)
    # bitsandbytes warns at import (peft imports it on every run) that the kernels hub's CPU 4-bit kernel is not
    # trusted: a plain LoRA or full stage never uses it, and QLoRA falls back to bitsandbytes' own CPU kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        ds_logger.addFilter(_DropDeepSpeedChatter())
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


def quiet_cpu_accelerator() -> None:
    """On a machine without any accelerator, name DeepSpeed's CPU accelerator up front (DS_ACCELERATOR=cpu):
    DeepSpeed would detect the same, with a warning at import on every rank of every run."""
    import importlib.util

    import torch

    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return
    others = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_sdaa", "torch_mlu")
    if any(importlib.util.find_spec(m) is not None for m in others) or \
            (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


class _DropDeepSpeedChatter(logging.Filter):
    """DeepSpeed's warnings that say nothing a user must act on (a CPU machine runs on the CPU accelerator)."""
    DROP = ("Setting accelerator to CPU",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.DROP)


def main_guard(fn) -> None:
    """Run fn(); print RemixError messages without a traceback and exit non-zero."""
    try:
        fn()
        from . import dist
        dist.shutdown()
    except RemixError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        # a stage's own message (StageInterrupted: where it stopped, its checkpoint), else what a rerun does
        msg = str(e) or ("interrupted: the same command again keeps every finished stage and resumes an "
                         "unfinished one from its newest checkpoint, if it has one (else starts it afresh)")
        print(f"\n{msg}", file=sys.stderr)
        sys.exit(130)
