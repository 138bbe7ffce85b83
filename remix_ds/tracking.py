"""Experiment tracking: the scalars of ``train_log.jsonl`` sent to TensorBoard, Weights & Biases or MLflow.

A stage's ``report_to: [tensorboard, wandb, mlflow]`` (``tensorboard: true`` is the same as naming tensorboard)
opens one run per variant and stage, on rank 0 only, and logs every train_log row's numbers under the same tags
(``train/loss``, ``train/lr``, ``train/penalty_<name>``, ..., ``teacher_forced_accuracy/<dataset>``) at its optimizer step:

- **tensorboard**: event files in ``<stage dir>/tensorboard`` (a resume drops the events after its checkpoint);
- **wandb**: a run named ``<variant>/stage<k>`` in the project ``$WANDB_PROJECT`` (default: the recipe's name),
  its files under ``<stage dir>``; ``WANDB_MODE=offline`` keeps it local (``wandb sync`` uploads it later);
  a resume continues the same run id;
- **mlflow**: a run named ``<variant>/stage<k>`` in the experiment named after the recipe, at
  ``$MLFLOW_TRACKING_URI`` (default: the file store ``<output_dir>/mlruns``, which MLflow 3 keeps in maintenance
  mode: set a ``sqlite:///...`` URI or a server for MLflow's newer features); a resume continues the same run.

The packages are optional extras (``pip install -e '.[tracking]'``); a stage that asks for one that is not
installed is refused before anything loads (``check_trackers``).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow)"}


def requested(spec) -> List[str]:
    """The trackers a stage spec asks for, in TRACKERS order."""
    names = set(spec.report_to or []) | ({"tensorboard"} if spec.tensorboard else set())
    return [t for t in TRACKERS if t in names]


def check_trackers(names: List[str], where: str) -> None:
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{where}: report_to: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            raise ConfigError(f"{where}: report_to: {name} needs the {_PACKAGES[name]} package (pip install "
                              f"{_PACKAGES[name].split()[0]}, or pip install -e '.[tracking]')") from None


def scalars(row: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of one train_log.jsonl row under tracker tags (train/*, teacher_forced_accuracy/*)."""
    if "loss" in row:
        keys = ("loss", "lr", "epoch", "tokens_per_s", "padfree_tokens_per_s", "padding")
        out = {f"train/{key}": float(row[key]) for key in keys if row.get(key) is not None}
        out.update({f"train/penalty_{key}": float(v) for key, v in row.get("penalties", {}).items()})
        return out
    return {f"teacher_forced_accuracy/{key}": float(v) for key, v in row.get("teacher_forced_accuracy", {}).items()}


class _Tracker:
    """What the stage calls on a tracker; flush (before a checkpoint) does nothing where the tracker's own client
    writes as it goes."""

    def log(self, values: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    def __init__(self, out: Path, step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    def log(self, values: Dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.w.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _WandB(_Tracker):
    def __init__(self, out: Path, step: int, run_name: str, project: str, config: Dict[str, Any], run_id: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, id=run_id,
                              dir=str(out), config=config, resume="allow", reinit="finish_previous")

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow(_Tracker):
    def __init__(self, out: Path, step: int, run_name: str, project: str, config: Dict[str, Any], run_id: str,
                 output_dir: str):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(output_dir, "mlruns").resolve().as_uri()
        if uri.startswith("file:"):   # MLflow 3 keeps its file store working only when asked (no server to run)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(project)
        marker = out / "mlflow_run_id"   # a resume continues the run it started
        previous = marker.read_text().strip() if step and marker.exists() else None
        self.active = mlflow.start_run(run_id=previous, run_name=None if previous else run_name)
        marker.write_text(self.active.info.run_id)
        if not previous:
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def log(self, values: Dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class Trackers:
    """The stage's open trackers (none: every call does nothing)."""

    def __init__(self, names: List[str], out: Path, step: int, run_name: str, project: str,
                 config: Dict[str, Any], run_id: str, output_dir: str):
        self.items: List[_Tracker] = []
        kw = dict(run_name=run_name, project=project, config=config, run_id=run_id)
        for name in names:
            if name == "tensorboard":
                self.items.append(_TensorBoard(out, step))
            elif name == "wandb":
                self.items.append(_WandB(out, step, **kw))
            elif name == "mlflow":
                self.items.append(_MLflow(out, step, output_dir=output_dir, **kw))

    def log(self, row: Dict[str, Any]) -> None:
        values = scalars(row)
        if values:
            for t in self.items:
                t.log(values, row["step"])

    def flush(self) -> None:
        for t in self.items:
            t.flush()

    def close(self) -> None:
        for t in self.items:
            t.close()
        self.items = []


def open_trackers(names: List[str], out: Path, step: int, run_name: str, project: str, config: Dict[str, Any],
                  run_id: str, output_dir: str, main: bool) -> Optional[Trackers]:
    """Rank 0's trackers for one stage, or None elsewhere and when none is asked for."""
    if not names or not main:
        return None
    return Trackers(names, out, step, run_name, project, config, run_id, output_dir)
