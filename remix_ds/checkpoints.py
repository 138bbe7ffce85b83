"""A stage's DeepSpeed checkpoints on disk (the newest complete one of a config, pruning, the train log cut back to
it) and the Ctrl-C handler that stops a stage at a step boundary to write one."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from . import dist
from .errors import ConfigError
from .files import read_json

class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage, after its checkpoint was written: the message says where and what a rerun does."""


class InterruptAtStep:
    """The first SIGINT (Ctrl-C) asks the stage loop to stop at the next step boundary, where it writes a
    checkpoint (a rerun resumes from it exactly); a second one interrupts at once. Installed only in the main
    thread of the process; ``restore`` puts the previous handler back."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> "InterruptAtStep":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if dist.is_main():
            print("\ninterrupt: stopping at the end of this step to write a checkpoint (Ctrl-C again to stop at "
                  "once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def latest_checkpoint(root: Path, h: str, layout: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """The newest checkpoint tag with a completion marker of this config, or None.

    ``layout`` (world size, resolved precision): DeepSpeed cannot load a checkpoint written by another number of
    ranks; if the newest checkpoint of this config was, that is an error that says so (not a crash inside
    DeepSpeed, and not a silent fresh start that would delete it)."""
    best = None
    if root.is_dir():
        for d in root.iterdir():
            info = read_json(d / "COMPLETE.json")
            if info is None:
                continue
            if info.get("hash") == h and (best is None or info["step"] > best[0]):
                best = (info["step"], d.name, info)
    if best is None:
        return None
    for key, value in (layout or {}).items():
        if best[2].get(key) != value:
            written = f"{key} {best[2][key]!r}" if key in best[2] else f"no record of its {key} (an earlier release)"
            raise ConfigError(f"{root / best[1]}: this checkpoint was written with {written}, this run has {key} "
                              f"{value!r}; DeepSpeed cannot resume across that change. Rerun as it was written, or "
                              f"set resume: never to start the stage afresh (which deletes {root})")
    return best[1]


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove incomplete checkpoints and all but the newest `keep` complete ones."""
    if not root.is_dir():
        return
    complete = []
    for d in root.iterdir():
        if not d.is_dir():
            continue
        try:
            complete.append((json.load(open(d / "COMPLETE.json"))["step"], d))
        except (OSError, ValueError, KeyError):
            shutil.rmtree(d, ignore_errors=True)
    for _, d in sorted(complete, key=lambda x: x[0])[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(json.dumps(rec))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
