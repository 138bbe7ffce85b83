"""One training stage on DeepSpeed: data -> engine -> steps -> stopping rule -> save.

Every rank runs this function; only rank 0 writes shared files. Outputs of stage k of a variant live
in ``<output_dir>/<variant>/stage<k>/``:

- ``config.json``      the resolved stage config, ds_config and fingerprint
- ``train_log.jsonl``  one line per logged step (loss, lr, tokens/s, padding) and per epoch (accuracies)
- ``model/``           full fine-tuning: the whole model (safetensors HF directory)
- ``adapter/``         LoRA: the PEFT adapter; ``merged/`` the adapter merged into the base
- ``tensorboard/``     with ``tensorboard: true``: the train_log scalars as TensorBoard events
- ``DONE.json``        written last: the fingerprint and the training summary
"""
from __future__ import annotations

import json
import re
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from . import dist, study, tracking
from .config import Recipe, StageSpec, Variant, stage_hash
from .data import dataset_examples, is_factoid, stage_train_set
from .data.formatting import Encoded, collate, collate_packed, collate_varlen, encode_examples, pad_id_of
from .zero import (PURE_BF16, adapt_zero_stage, adapter_tensor_size, describe_zero, load_ds_config, resolve_ds_config,
                   resolve_precision, torch_dtype, zero_stage)
from .engine import Engine
from .files import read_json, write_json_atomic
from .errors import ConfigError
from .evaluate import teacher_forced_accuracy
from .adapters import local_model_dir, streaming_merge
from .model import load_for_training, load_tokenizer, param_count, release_zero3
from .tiny import resolve_model_path

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ paths and fingerprints

def stage_dir(recipe: Recipe, variant: Variant, k: int) -> Path:
    return Path(recipe.output_dir) / variant.name / f"stage{k}"


def stage_output(recipe: Recipe, variant: Variant, k: int) -> Tuple[str, List[str]]:
    """(model directory, adapters kept active on it) that stage k hands on to stage k+1 and evaluation."""
    spec = variant.stages[k - 1]
    return output_of(stage_dir(recipe, variant, k), spec.finetune, spec.merge, lambda: stage_input(recipe, variant, k))


def output_of(d: Path, finetune: str, merge: bool, stage_in: Callable[[], Tuple[str, List[str]]]
              ) -> Tuple[str, List[str]]:
    """``stage_output`` for the stage directory `d`: its full or merged model, or (LoRA with merge: false) the
    stage's input (``stage_in()``: base directory, adapters already on it) with its own adapter on top."""
    if finetune == "full":
        return str(d / "model"), []
    if merge:
        return str(d / "merged"), []
    base, adapters = stage_in()
    return base, adapters + [str(d / "adapter")]


def stage_input(recipe: Recipe, variant: Variant, k: int) -> Tuple[str, List[str]]:
    if k == 1:
        return resolve_model_path(recipe.model, recipe.tiny), []
    return stage_output(recipe, variant, k - 1)


def output_model(recipe: Recipe, variant: Variant, k: int) -> str:
    """The directory stage k writes last (the merged or full model, or the unmerged adapter)."""
    base, adapters = stage_output(recipe, variant, k)
    return adapters[-1] if adapters else base


# stage keys that change how a run is logged, checkpointed or batched, not what it trains: changing one neither
# retrains a complete stage nor stops a resume from the checkpoints of an interrupted one (packing gives every
# example the loss it has padded, as the world size does, to floating-point rounding)
OPERATIONAL_KEYS = ("log_every", "save_every", "keep_checkpoints", "resume", "tensorboard", "packing",
                    "checkpoint_minutes", "report_to")


WIDTH_MULTIPLE_CUDA = 8


def packs(packing, device: Optional[torch.device] = None) -> bool:
    """Whether a stage's ``packing`` setting may pack: true and auto (which then measures, once the engine is built:
    ``remix_ds.attention.choose_packing``); false pads."""
    return packing == "auto" or bool(packing)


def examples_digest(examples) -> str:
    """A hash of the examples a stage trains on (its dataset and mixing, in order): a regenerated data file, a
    filter_unknown rerun into the same path, another hub revision or word list changes it, and so the stage."""
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.answer, list(ex.aliases), ex.role, ex.source, ex.factoid,
                             ex.messages], ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# The keys every stage fingerprint has hashed since before 2026-12-04, per spec class. A key added to one of these
# classes later is hashed only where a recipe sets it away from its default, so a release that adds a key
# retrains no finished stage (a stage that never set it keeps its hash). Never add a key to these sets.
HASHED_KEYS = {
    "StageSpec": frozenset({"data", "finetune", "lora", "mix", "stop", "epochs", "lr", "weight_decay", "betas",
                            "warmup_ratio", "grad_clip", "global_batch_size", "micro_batch_size", "ds_config",
                            "merge", "loss_threshold", "loss_patience", "save_dtype", "gradient_checkpointing",
                            "adapt_zero", "track", "probe"}),
    "LoraSpec": frozenset({"r", "alpha", "dropout", "target_modules"}),
    "MixSpec": frozenset({"source", "ratio", "prompt_words", "target_words", "seed", "path", "name", "config", "split",
                          "revision", "streaming", "pool", "text_field", "data"}),
    "DatasetSpec": frozenset({"source", "num_examples", "seed", "path", "name", "config", "split", "revision",
                              "streaming", "pool", "skip", "shuffle", "format", "factoid", "overlong"}),
}


def _field_default(f) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        return f.default_factory()                     # type: ignore[misc]
    return dataclasses.MISSING


def stable_asdict(obj: Any) -> Any:
    """``dataclasses.asdict`` of a spec for its fingerprint: every key of ``HASHED_KEYS``, and a key added since
    only when it differs from its default (the same dict as asdict for a spec that sets no new key)."""
    import copy
    import dataclasses

    if not dataclasses.is_dataclass(obj):
        return copy.deepcopy(obj)
    legacy = next((HASHED_KEYS[c.__name__] for c in type(obj).__mro__ if c.__name__ in HASHED_KEYS), None)
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = _field_default(f)
        if legacy is not None and f.name not in legacy and default is not dataclasses.MISSING:
            if (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value) == \
                    (dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default):
                continue
        out[f.name] = stable_asdict(value)
    return out


def fingerprint(recipe: Recipe, variant: Variant, k: int) -> Dict[str, Any]:
    """Everything that determines stage k's output (including all earlier stages): the stage's keys but the
    operational ones, what it trains on (the examples themselves, not only the data spec), the recipe-wide
    settings and the previous stage's fingerprint."""
    import dataclasses

    spec = variant.stages[k - 1]
    stage = {key: v for key, v in stable_asdict(spec).items() if key not in OPERATIONAL_KEYS}
    # packing was a training key with default true before it became operational: hashed at that value, so
    # the stages of earlier runs keep their hashes (and are not retrained)
    stage["packing"] = True
    fp = {"stage": stage, "examples": examples_digest(stage_train_set(recipe, spec, k)[1]),
          "data": stable_asdict(recipe.datasets[spec.data]),
          "seed": recipe.seed, "precision": recipe.precision, "max_seq_length": recipe.max_seq_length,
          "ds_config": load_ds_config(spec.ds_config or recipe.ds_config)}
    if recipe.study:   # only then: the fingerprints of remix_ds's own semantics are those of earlier releases
        fp["semantics"] = {"semantics": recipe.semantics, "except": sorted(recipe.study_except)}
    if k == 1:
        fp["model"] = recipe.model
        if recipe.model == "tiny":
            fp["tiny"] = dataclasses.asdict(recipe.tiny)
    else:
        fp["previous"] = fingerprint(recipe, variant, k - 1)
    return fp


def read_done(d: Path) -> Optional[Dict[str, Any]]:
    return read_json(d / "DONE.json")


def config_change(recipe: Recipe, variant: Variant, k: int) -> Optional[str]:
    """How stage k's current config differs from the one its directory was last started with (from its
    config.json), in words; None when there is no record of an earlier start."""
    import dataclasses

    old = read_json(stage_dir(recipe, variant, k) / "config.json")
    if old is None:
        return None
    new = json.loads(json.dumps(dataclasses.asdict(variant.stages[k - 1]), default=str))
    keys = sorted(key for key in set(new) | set(old.get("spec", {}))
                  if key not in OPERATIONAL_KEYS and old.get("spec", {}).get(key) != new.get(key))
    parts = []
    if keys:
        parts.append("changed stage keys: " + ", ".join(f"{key} {old.get('spec', {}).get(key)!r} -> "
                                                        f"{new.get(key)!r}" for key in keys))
    if "recipe" in old:   # recorded since the recipe-wide settings are (older stage directories lack them)
        diffs = _changes(old["recipe"], recipe_settings(recipe, variant, k))
        if diffs:
            parts.append("changed recipe settings: " + ", ".join(f"{key} {a!r} -> {b!r}" for key, a, b in diffs))
    if parts:
        return "; ".join(parts)
    if "recipe" in old:
        return "the stage keys are the same, and the recipe-wide settings: an earlier stage, a data file's or " \
               "ds_config file's contents, or remix_ds's fingerprint changed"
    return "the stage keys are the same: a dataset or its contents, the seed, precision, max_seq_length, the " \
           "ds_config, the model, an earlier stage or remix_ds's fingerprint changed"


def stage_precision(recipe: Recipe, spec: StageSpec) -> str:
    """The precision a stage trains in: the recipe's, resolved; under ``semantics: study`` a full fine-tuning stage
    in bf16 (or auto) trains in the study's pure bf16 (no fp32 master weights: ``zero.PURE_BF16``). LoRA has no
    study counterpart and keeps remix_ds's precision."""
    if spec.finetune == "full" and recipe.follows_study("precision") and recipe.precision in ("auto", "bf16"):
        return PURE_BF16
    return resolve_precision(recipe.precision)


def recipe_settings(recipe: Recipe, variant: Variant, k: int) -> Dict[str, Any]:
    """The recipe-wide settings stage k depends on, as its config.json records them (so that a retrain can name
    the one that changed): seed, precision, max_seq_length, the stage's ds_config, the model (and the tiny
    model's shape) and the datasets its stages up to k train on or replay."""
    import dataclasses

    used = []
    for spec in variant.stages[:k]:
        for key in (spec.data, spec.mix.data if spec.mix is not None else None):
            if key and key in recipe.datasets and key not in used:
                used.append(key)
    spec = variant.stages[k - 1]
    settings = {"seed": recipe.seed, "precision": recipe.precision, "max_seq_length": recipe.max_seq_length,
                "semantics": recipe.semantics, "study_except": sorted(recipe.study_except),
                "ds_config": spec.ds_config or recipe.ds_config,
                "model": recipe.model, "datasets": {key: dataclasses.asdict(recipe.datasets[key]) for key in used}}
    if recipe.model == "tiny":
        settings["tiny"] = dataclasses.asdict(recipe.tiny)
    return json.loads(json.dumps(settings, default=str))


def _changes(old: Any, new: Any, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def checkpoint_layout(recipe: Recipe, spec: StageSpec, world: int) -> Dict[str, Any]:
    """What a DeepSpeed checkpoint of the stage cannot change (its completion marker records it): the number of
    ranks, the resolved precision and the ZeRO stage the engine runs (``zero.adapt_zero_stage``)."""
    precision = stage_precision(recipe, spec)
    cfg = load_ds_config(spec.ds_config or recipe.ds_config)
    if spec.adapt_zero:
        cfg = adapt_zero_stage(cfg, world, spec.finetune, precision, [])
    return {"world_size": world, "precision": precision, "zero_stage": zero_stage(cfg)}


def is_complete(recipe: Recipe, variant: Variant, k: int, h: Optional[str] = None) -> bool:
    """Stage k's output is there and of its current config (``h``: the stage hash, if the caller has it: the
    fingerprint loads and hashes the data of every stage up to k)."""
    done = read_done(stage_dir(recipe, variant, k))
    return bool(done) and done.get("hash") == (h or stage_hash(fingerprint(recipe, variant, k))) \
        and os.path.isdir(output_model(recipe, variant, k))


# ------------------------------------------------------------------ batching

def batch_plan(world: int, global_batch_size: int, micro_batch_size: Optional[int]):
    if not micro_batch_size:
        if global_batch_size % world:
            raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of the world size {world} "
                              f"(each rank takes an equal share); change global_batch_size or the number of ranks")
        return global_batch_size // world, 1
    micro = micro_batch_size
    if micro < 1 or global_batch_size % (micro * world):
        raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                          f"{micro} x world size {world}; change global_batch_size or micro_batch_size")
    return micro, global_batch_size // (micro * world)


def split_global_batch(chunk: List[Encoded], slots: int, by_tokens: bool = False) -> List[List[Encoded]]:
    """Deal a global batch into `slots` micro-batches.

    Padded batches (default): near-equal example counts, grouped by length so each pads little.
    Packed batches (`by_tokens`): near-equal token counts (longest first into the lightest slot), so no
    rank waits on another's longer micro-batch.
    """
    chunk = sorted(chunk, key=lambda e: len(e.input_ids))
    if by_tokens:
        out: List[List[Encoded]] = [[] for _ in range(slots)]
        load = [0] * slots
        for e in reversed(chunk):
            j = min(range(slots), key=lambda s: (load[s], len(out[s])))
            out[j].append(e)
            load[j] += len(e.input_ids)
        return out
    base, extra = divmod(len(chunk), slots)
    out, start = [], 0
    for j in range(slots):
        n = base + (1 if j < extra else 0)
        out.append(chunk[start:start + n])
        start += n
    return out


def epoch_order(n: int, seed: int, k: int, epoch: int) -> List[int]:
    """A fresh permutation per epoch, reproducible from (seed, stage, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


class TokenCount:
    """Host-side count of the token positions this rank's micro-batches ran, padding included (batch shapes
    are known on the host: counting needs no device sync)."""

    def __init__(self) -> None:
        self.ran = 0


def throughput(real: int, ran: float, seconds: float) -> Dict[str, Any]:
    """Log fields of `real` padding-free tokens trained on in `seconds`, `ran` token positions run."""
    if seconds <= 0 or ran <= 0:
        return {"tokens_per_s": None, "padfree_tokens_per_s": None, "padding": None}
    return {"tokens_per_s": round(ran / seconds, 1), "padfree_tokens_per_s": round(real / seconds, 1),
            "padding": round(max(0.0, 1.0 - real / ran), 4)}


def batch_maker(eng: Engine, pad: int, pack: int = 0) -> Callable[[List[Encoded]], Dict[str, torch.Tensor]]:
    """How global_step collates a micro-batch: padded, or with `pack` > 0 packed, into one row with sequence
    boundaries where the engine's model takes them (``collate_varlen``, ``remix_ds.attention``), else into rows of at
    most `pack` tokens with a 4-D mask (``collate_packed``)."""
    # on a GPU, batch widths round up to a multiple of 8 (formatting.train_width): fewer distinct shapes
    multiple = WIDTH_MULTIPLE_CUDA if eng.device.type == "cuda" else 1
    if not pack:
        return lambda mb: collate(mb, pad, multiple=multiple)
    if getattr(eng, "packed_varlen", False):
        return lambda mb: collate_varlen(mb, pad, multiple)
    return lambda mb: collate_packed(mb, pad, pack, multiple)


def global_step_batches(eng: Engine, chunk: List[Encoded], world: int, gas: int, rank: int, pad: int,
                        pack: int = 0) -> List[Dict[str, torch.Tensor]]:
    """The micro-batches global_step would run on this rank for `chunk` (its non-empty ones)."""
    make = batch_maker(eng, pad, pack)
    slots = split_global_batch(chunk, world * gas, by_tokens=bool(pack))
    return [make(slots[a * world + rank]) for a in range(gas) if slots[a * world + rank]]


def global_step(eng: Engine, chunk: List[Encoded], world: int, gas: int, rank: int, pad: int,
                pack: int = 0, count: Optional[TokenCount] = None,
                collate_fn: Optional[Callable[[List[Encoded]], Dict[str, torch.Tensor]]] = None,
                labelled: Optional[Callable[[Encoded], int]] = None) -> torch.Tensor:
    """One optimizer step on one global batch (every rank passes the same `chunk`).

    The loss is the mean over all answer tokens of the global batch: each micro-batch's token-loss
    sum is scaled by world*gas/N, which DeepSpeed's 1/gas scaling and data-parallel averaging turn into
    sum/N exactly. With `pack` > 0 each micro-batch is packed into rows of at most `pack` tokens, every
    example attending only to itself (the same losses, far less padding). Returns this rank's unscaled
    token-loss sum (detached, on device). `count`, if given, adds the token positions this rank ran.
    `collate_fn` / `labelled` replace the padded collation and the count of an example's trained positions (the
    study's EOS-labelled padding with remix_ds's order: ``study_except: [order]``).
    """
    make = collate_fn or batch_maker(eng, pad, pack)
    n_tok = sum(labelled(e) for e in chunk) if labelled else sum(e.num_answer_tokens for e in chunk)
    slots = split_global_batch(chunk, world * gas, by_tokens=bool(pack))
    scale = world * gas / n_tok
    local = torch.zeros((), dtype=torch.float64, device=eng.device)
    for a in range(gas):
        mb = slots[a * world + rank]
        batch = make(mb or chunk[:1])   # a short last batch: a rank with no examples still takes part
        if count is not None:
            count.ran += batch["input_ids"].numel()
        if mb:
            local += eng.micro_step(batch, scale)
        else:
            eng.micro_step(batch, 0.0)
        eng.step()
    return local


def study_global_step(eng: Engine, slots: List[List[Encoded]], world: int, gas: int, rank: int,
                      make: Callable[[List[Encoded]], Dict[str, torch.Tensor]], count: Optional[TokenCount] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step of ``semantics: study`` on the micro-batches the study's loader deals (``study.epoch_steps``:
    slot ``a * world + rank``). Each micro-batch's loss is its own mean over its labelled positions (the Hugging
    Face loss), which DeepSpeed's 1/gas scaling and rank averaging turn into the study's gradient; an empty slot (a
    short last step) runs a zero-scaled micro-batch so that every rank takes part. Returns this rank's sum of
    micro-batch means, its last micro-batch's mean divided by gas (what the study's stopping rule reads) and the
    number of micro-batches it trained (detached, on device)."""
    means = torch.zeros((), dtype=torch.float64, device=eng.device)
    last = torch.zeros((), dtype=torch.float64, device=eng.device)
    n_mb = 0
    fallback = [e for slot in slots for e in slot][:1]
    for a in range(gas):
        mb = slots[a * world + rank]
        batch = make(mb or fallback)
        if count is not None:
            count.ran += batch["input_ids"].numel()
        if mb:
            n = study.labelled_positions(batch)
            mean = eng.micro_step(batch, 1.0 / n) / n
            means += mean
            last = mean / gas
            n_mb += 1
        else:
            eng.micro_step(batch, 0.0)
        eng.step()
    return means, last, n_mb


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


# ------------------------------------------------------------------ checkpoints

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


# ------------------------------------------------------------------ the stage

def train_stage(recipe: Recipe, variant: Variant, k: int, h: Optional[str] = None) -> Dict[str, Any]:
    """Train stage k of a variant (resuming from a checkpoint of its config) and write its outputs. ``h``: the
    stage hash, if the caller has it (the fingerprint loads the data of every stage up to k)."""
    spec: StageSpec = variant.stages[k - 1]
    trackers_asked = tracking.requested(spec)
    tracking.check_trackers(trackers_asked, f"{variant.name}/stage{k}")
    out = stage_dir(recipe, variant, k)
    h = h or stage_hash(fingerprint(recipe, variant, k))
    world, rank = dist.world_size(), dist.rank()
    micro, gas = batch_plan(world, spec.global_batch_size, spec.micro_batch_size)
    precision = stage_precision(recipe, spec)
    layout = checkpoint_layout(recipe, spec, world)

    ckpt_root = out / "checkpoints"
    found = None
    if dist.is_main() and spec.resume == "auto":
        try:
            found = latest_checkpoint(ckpt_root, h, layout)
        except ConfigError as e:
            found = e
    found = dist.broadcast_object(found)
    if isinstance(found, ConfigError):   # every rank raises it, none waits in a collective
        raise found
    resume_tag = found
    if dist.is_main():
        if resume_tag is None and spec.resume == "auto" and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
            log.warning("%s/stage%d: the checkpoints in %s are of another config (%s); deleting them and "
                        "starting the stage afresh", variant.name, k, ckpt_root,
                        config_change(recipe, variant, k) or "no record of it")
        elif (out / "DONE.json").exists():
            log.info("%s/stage%d: retraining (%s)", variant.name, k,
                     config_change(recipe, variant, k) or "no record of the earlier config")
        out.mkdir(parents=True, exist_ok=True)
        stale = ["DONE.json", "model", "adapter", "merged", "eval"]
        if resume_tag is None:
            stale += ["train_log.jsonl", "checkpoints", "probe_logits.pt", "tensorboard", "wandb", "mlflow_run_id"]
        # and what a killed save left: <name>.tmp-<pid> directories and files (files.atomic_save)
        for p in [out / name for name in stale] + sorted(out.glob("*.tmp-*")):
            shutil.rmtree(p) if p.is_dir() else (p.unlink() if p.exists() else None)
    dist.barrier()

    base, frozen = stage_input(recipe, variant, k)
    tok = load_tokenizer(base)
    pad = pad_id_of(tok)
    data, train = stage_train_set(recipe, spec, k)
    # overlong: drop chose examples that fit already; nothing of such a stage is ever truncated
    enc, dropped = encode_examples(tok, train, recipe.max_seq_length, what=f"{variant.name}/stage{k}",
                                   truncate=recipe.datasets[spec.data].overlong != "drop")
    if not enc:
        raise ConfigError(f"{variant.name}/stage{k}: every example is longer than max_seq_length="
                          f"{recipe.max_seq_length}")
    factoid = is_factoid(recipe, spec.data)
    own_eval = [e for e in enc if train[e.index].role == "train"] if factoid else []
    if spec.stop == "accuracy" and not own_eval:
        raise ConfigError(f"{variant.name}/stage{k}: stop: accuracy needs a factoid dataset; {spec.data!r} is not")
    tracked: Dict[str, List[Encoded]] = {}
    if spec.track:
        for j in range(1, k + 1):
            key = variant.stages[j - 1].data
            if key not in tracked and is_factoid(recipe, key):
                tracked[key] = own_eval if j == k and key == spec.data else \
                    encode_examples(tok, dataset_examples(recipe, key), 10 ** 9)[0]

    dtype = torch_dtype(precision)
    from transformers import AutoConfig
    mcfg = AutoConfig.from_pretrained(base)
    ds_cfg = resolve_ds_config(spec.ds_config or recipe.ds_config, global_batch_size=spec.global_batch_size,
                               micro_batch_size=micro, grad_accum=gas, grad_clip=spec.grad_clip,
                               precision=precision, hidden_size=mcfg.hidden_size, finetune=spec.finetune,
                               adapt=spec.adapt_zero, adapter_tensor_size=adapter_tensor_size(spec.lora.r, mcfg))
    G = spec.global_batch_size
    # semantics: study (remix_ds/study.py): the study's sampler order and micro-batches, its EOS-labelled padding
    # to the longest example of the set, its per-micro-batch mean loss and its never-reset stopping counter
    study_order, study_pad = recipe.follows_study("order"), recipe.follows_study("padding")
    study_stop = spec.stop == "loss" and recipe.follows_study("stopping")
    plan = study.epoch_steps(len(enc), world, micro, gas, recipe.seed) if study_order else None
    if plan is not None and not plan:
        raise ConfigError(f"{variant.name}/stage{k}: {len(enc)} examples fill no micro-batch of {micro} on each of "
                          f"{world} ranks (the study's loader drops a short last batch); lower global_batch_size")
    width = study.pad_width(enc) if study_pad else 0
    eos = tok.eos_token_id
    # the study's EOS-labelled padding to `width`, and the positions it trains per example (with remix_ds's order,
    # study_except: [order], global_step takes both); the study's micro-batches are padded one way or the other
    study_make = (lambda mb: study.collate(mb, eos, width)) if width else None
    study_count = (lambda e: study.labelled_count(e, width)) if width else None
    plan_make = study_make or (lambda mb: collate(mb, pad))
    # rows of at most this many tokens (0: padding); the study's batches are padded
    pack = recipe.max_seq_length if packs(spec.packing) and not (study_order or study_pad) else 0
    steps_per_epoch = len(plan) if plan is not None else math.ceil(len(enc) / G)
    total_steps = steps_per_epoch * spec.epochs
    n_mix = sum(1 for ex in train if ex.role == "mix")
    if dist.is_main():
        import dataclasses
        write_json_atomic(str(out / "config.json"), {
            "variant": variant.name, "stage": k, "hash": h, "base_model": base, "frozen_adapters": frozen,
            "world_size": world,
            "precision": precision, "micro_batch_size": micro, "gradient_accumulation_steps": gas,
            "steps_per_epoch": steps_per_epoch, "spec": dataclasses.asdict(spec), "ds_config": ds_cfg,
            "recipe": recipe_settings(recipe, variant, k),
            "packing": bool(pack),
            "n_data": len(data), "n_mix": n_mix, "n_dropped": dropped})
        log.info("%s/stage%d: %s on %s (%d examples + %d mixing, %d dropped), %s, %d steps/epoch, "
                 "global batch %d = %d x %d x %d ranks", variant.name, k, spec.finetune, spec.data, len(data),
                 n_mix, dropped, describe_zero(ds_cfg, spec.ds_config or recipe.ds_config), steps_per_epoch, G,
                 micro, gas, world)

    torch.manual_seed(recipe.seed * 7 + k)  # adapter initialisation (and any dropout) is reproducible
    model, keep = load_for_training(base, spec.finetune, spec.lora, ds_cfg, dtype, frozen_adapters=frozen,
                                    gradient_checkpointing=spec.gradient_checkpointing)
    eng = Engine(model, ds_cfg, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                 total_steps=total_steps, warmup_ratio=spec.warmup_ratio,
                 warmup_from_zero=recipe.follows_study("schedule"))
    # --- packing: auto times packed against padded forwards of one global batch and keeps the faster
    if pack and spec.packing == "auto" and plan is None:
        from .attention import choose_packing
        sample = [enc[i] for i in epoch_order(len(enc), recipe.seed, k, 0)[:G]]
        packed, how = choose_packing(eng, sample, world, gas, rank, pad, pack)
        pack = pack if packed else 0
        if dist.is_main():
            from .files import read_json
            written = read_json(out / "config.json")
            write_json_atomic(str(out / "config.json"), {**written, "packing": bool(pack), "packing_auto": how})
            log.info("%s/stage%d: packing: auto chose %s (forward of one global batch: packed %.4fs with %s, padded "
                     "%.4fs)", variant.name, k, "packing" if packed else "padding", how["packed_forward_s"],
                     how["packed_kernel"], how["padded_forward_s"])
    # ---
    trainable = [p for p in eng.module.parameters() if p.requires_grad]
    n_trainable = param_count(trainable)
    trainable_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    # "tokens": padding-free tokens trained on, token positions run (padding included) and the seconds spent in
    # training steps (evaluation and checkpoints left out), over the whole stage
    state = {"step": 0, "epoch": 0, "s": 0, "below": 0, "accs": {}, "last_loss": float("nan"), "t": 0.0,
             "tokens": {"real": 0, "ran": 0, "seconds": 0.0}}
    if resume_tag is not None:
        cs = eng.load_checkpoint(str(ckpt_root), resume_tag)
        state.update(cs["loop"])
        torch.set_rng_state(cs["rng"])
        if torch.cuda.is_available() and len(cs.get("cuda_rng", ())) == world:   # each rank its own device's
            torch.cuda.set_rng_state(cs["cuda_rng"][rank])
        if dist.is_main():
            truncate_log(out / "train_log.jsonl", state["step"])
            log.info("%s/stage%d: resumed from checkpoint %s (step %d, epoch %d)", variant.name, k, resume_tag,
                     state["step"], state["epoch"])
        dist.barrier()
    log_f = open(out / "train_log.jsonl", "a") if dist.is_main() else None
    import dataclasses as _dc
    tb = tracking.open_trackers(trackers_asked, out, state["step"], f"{variant.name}/stage{k}", recipe.name,
                                {"stage": k, "variant": variant.name, "spec": _dc.asdict(spec)},
                                re.sub(r"[^A-Za-z0-9_-]", "_", f"{recipe.name}-{variant.name}-stage{k}-{h}"),
                                recipe.output_dir, dist.is_main())

    def record(obj):
        if log_f:
            log_f.write(json.dumps(obj) + "\n")
            log_f.flush()
        if tb is not None:
            tb.log(obj)

    t0 = time.time() - state["t"]
    step, below, last_loss, accs = state["step"], state["below"], state["last_loss"], state["accs"]
    stopped_by = "epochs"
    window_loss = torch.zeros((), dtype=torch.float64, device=eng.device)
    window_last = torch.zeros((), dtype=torch.float64, device=eng.device)   # study: the step's last micro-batch
    window_tokens = 0              # answer tokens of the window (the loss's denominator)
    window_real = 0                # prompt + answer tokens of the window, all ranks
    ran = TokenCount()             # token positions this rank ran in the window, padding included
    tokens = dict(state["tokens"])
    t_win = time.time()
    log_every = 1 if spec.stop == "loss" else spec.log_every
    epochs_run = state["epoch"]

    def checkpoint_due() -> bool:
        return bool(spec.save_every) and step % spec.save_every == 0

    last_ckpt = [time.time()]

    def checkpoint(next_epoch: int, next_s: int, force: bool = False) -> bool:
        if not (force or checkpoint_due()):
            return False
        last_ckpt[0] = time.time()
        loop = {"step": step, "epoch": next_epoch, "s": next_s, "below": below, "accs": accs,
                "last_loss": last_loss, "t": time.time() - t0, "tokens": tokens}
        # make room first, so that no more than keep_checkpoints complete ones exist at any moment (a kill
        # between the new marker and a later prune would leave one too many); keep 1: prune after instead
        if dist.is_main():
            prune_checkpoints(ckpt_root, max(1, spec.keep_checkpoints - 1))
            if tb is not None:
                tb.flush()   # a resume starts after this step: events up to it must be on disk
        dist.barrier()   # no rank starts writing the new tag while rank 0 removes incomplete ones
        client = {"loop": loop, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():   # LoRA dropout on a GPU draws from each rank's CUDA generator
            client["cuda_rng"] = dist.all_gather_object(torch.cuda.get_rng_state())
        eng.save_checkpoint(str(ckpt_root), f"step{step}", client, marker={"step": step, "hash": h, **layout})
        if dist.is_main() and spec.keep_checkpoints == 1:
            prune_checkpoints(ckpt_root, 1)
        return True

    # a stopping rule ends the stage at an epoch no one knows in advance: the bar counts the epoch's steps (its
    # ETA is the epoch's) and says how far the rule is; a fixed stage counts every step of the stage
    open_ended = spec.stop != "fixed"

    def new_bar(epoch: int, first: int):
        desc = f"{variant.name}/stage{k}" + (f" epoch {epoch + 1} (at most {spec.epochs})" if open_ended else "")
        return tqdm(total=steps_per_epoch if open_ended else total_steps,
                    initial=first if open_ended else step, desc=desc, disable=not dist.is_main(),
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def rule_status() -> Dict[str, str]:
        if spec.stop == "accuracy":
            acc = accs.get(spec.data)
            return {"acc": f"{acc:.3f}/1.000" if acc is not None else "-/1.000"}
        if spec.stop == "loss":
            return {"below": f"{below}/{spec.loss_patience}"}
        return {}

    interrupt = InterruptAtStep().install()
    stop_asked = False

    def stop_interrupted(next_epoch: int, next_s: int) -> None:
        """Ctrl-C: a checkpoint at this step boundary, then out of the stage with where it stopped."""
        bar.close()
        interrupt.restore()
        checkpoint(next_epoch, next_s, force=True)
        raise StageInterrupted(
            f"{variant.name}/stage{k} interrupted after step {step} (epoch {epoch + 1}); checkpoint "
            f"{ckpt_root / f'step{step}'} written: the same command resumes the stage from there")
    bar = new_bar(state["epoch"], state["s"])
    for epoch in range(state["epoch"], spec.epochs):
        order = epoch_order(len(enc), recipe.seed, k, epoch) if plan is None else None
        if open_ended and epoch > state["epoch"]:
            bar.close()
            bar = new_bar(epoch, 0)
        for s in range(state["s"] if epoch == state["epoch"] else 0, steps_per_epoch):
            if plan is None:
                chunk = [enc[i] for i in order[s * G:(s + 1) * G]]
                window_loss += global_step(eng, chunk, world, gas, rank, pad, pack, ran, study_make, study_count)
                window_tokens += sum(study_count(e) if study_count else e.num_answer_tokens for e in chunk)
            else:
                slots = [[enc[i] for i in slot] for slot in plan[s]]
                chunk = [e for slot in slots for e in slot]
                means, last, n_mb = study_global_step(eng, slots, world, gas, rank, plan_make, ran)
                window_loss += means
                window_last = last
                window_tokens += n_mb   # the loss is a mean of micro-batch means: count micro-batches
            step += 1
            window_real += sum(len(e.input_ids) for e in chunk)
            bar.update(1)
            # a checkpoint keeps no open loss window: flush it at every checkpoint step too (and at a Ctrl-C on one
            # process; several ranks agree on it in the window's collective)
            stop_asked = False
            if step % log_every == 0 or s == steps_per_epoch - 1 or checkpoint_due() or \
                    (interrupt.requested and world == 1):
                # one collective and one host sync per window: the loss sum and the positions run, all ranks
                sums = torch.stack([window_loss, torch.tensor(float(ran.ran), dtype=torch.float64,
                                                              device=eng.device), window_last,
                                    torch.tensor(float(interrupt.requested), dtype=torch.float64, device=eng.device)])
                loss_sum, ran_all, last_sum, asked = dist.all_reduce_sum(sums).tolist()
                stop_asked = asked > 0
                secs = max(time.time() - t_win, 1e-9)
                # study order: each rank counted its own micro-batches (the same number on every rank)
                last_loss = loss_sum / max(1, window_tokens * (world if plan is not None else 1))
                tp = throughput(window_real, ran_all, secs)
                record({"step": step, "epoch": epoch + (s + 1) / steps_per_epoch, "loss": last_loss,
                        "lr": eng.lr(), "time": round(time.time() - t0, 3), **tp})
                tokens = {"real": tokens["real"] + window_real, "ran": tokens["ran"] + int(ran_all),
                          "seconds": tokens["seconds"] + secs}
                bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{eng.lr():.2g}",
                                tok_s=f"{tp['padfree_tokens_per_s']:.0f}", **rule_status())
                window_loss.zero_()
                window_tokens = window_real = ran.ran = 0
                t_win = time.time()
                if study_stop:   # the study's rule on its step loss: the last micro-batch's, averaged over ranks
                    counter = study.StopCounter(spec.loss_threshold, spec.loss_patience, below)
                    # (remix_ds's order, study_except: [order]: the step's loss over its trained positions)
                    stop_now = counter.update(last_sum / world if plan is not None else last_loss)
                    below = counter.count
                    if stop_now:
                        stopped_by = "loss"
                        break
                elif spec.stop == "loss":
                    below = below + 1 if last_loss < spec.loss_threshold else 0
                    if below >= spec.loss_patience:
                        stopped_by = "loss"
                        break
            if stop_asked and s < steps_per_epoch - 1:
                stop_interrupted(epoch, s + 1)
            if stop_asked:   # at an epoch's last step: after the epoch's evaluation and stopping rule
                break
            if s < steps_per_epoch - 1 and checkpoint(epoch, s + 1):
                t_win = time.time()
        epochs_run = epoch + 1
        if tracked:
            eng.eval()
            accs = {key: teacher_forced_accuracy(eng.predict, e, max(micro, 16), pad) for key, e in tracked.items()}
            record({"epoch": epochs_run, "step": step, "teacher_forced_accuracy": accs,
                    "time": round(time.time() - t0, 3)})
            if dist.is_main():
                target = " (stops at 1.000)" if spec.stop == "accuracy" else ""
                bar.write(f"{variant.name}/stage{k} epoch {epochs_run}: loss {last_loss:.4g}, "
                          + ", ".join(f"acc[{key}] {v:.3f}" for key, v in accs.items()) + target)
        if stopped_by == "loss":
            break
        if spec.stop == "accuracy":
            acc = accs.get(spec.data)
            if acc is None:
                eng.eval()
                acc = teacher_forced_accuracy(eng.predict, own_eval, max(micro, 16), pad)
            if acc >= 1.0:
                stopped_by = "accuracy"
                break
        # every save_every steps, and at an epoch end once checkpoint_minutes passed since the last checkpoint
        # (a bounded cost: one save per that many minutes; a kill loses at most that much and an epoch)
        minutes = spec.checkpoint_minutes > 0 and epoch + 1 < spec.epochs and \
            time.time() - last_ckpt[0] >= 60 * spec.checkpoint_minutes
        if stop_asked:
            stop_interrupted(epoch + 1, 0)
        checkpoint(epoch + 1, 0, force=bool(minutes))
        t_win = time.time()   # the epoch's evaluation and checkpoint are not training time
    bar.close()
    interrupt.restore()
    train_seconds = time.time() - t0
    tp = throughput(tokens["real"], tokens["ran"], tokens["seconds"])   # the whole stage
    if dist.is_main() and tp["tokens_per_s"] is not None:
        log.info("%s/stage%d: %d steps, %d tokens in %.1f s of training steps: %.0f tokens/s (%.0f run, padding "
                 "%.1f%%)", variant.name, k, step, tokens["real"], tokens["seconds"], tp["padfree_tokens_per_s"],
                 tp["tokens_per_s"], 100 * tp["padding"])
    if spec.stop == "accuracy" and stopped_by != "accuracy" and dist.is_main():
        log.warning("%s/stage%d: accuracy stop not reached in %d epochs (last accuracy %.3f); "
                    "raise epochs or lr", variant.name, k, spec.epochs, accs.get(spec.data, float("nan")))

    save_dtype = dtype if spec.save_dtype == "auto" else torch_dtype(spec.save_dtype)
    if spec.probe:
        eng.eval()
        probe = collate(own_eval[:8] or enc[:8], pad)
        with torch.no_grad():
            logits = eng.logits(probe).float().cpu()
        if dist.is_main():
            torch.save({"batch": probe, "logits": logits}, out / "probe_logits.pt")
    if spec.finetune == "full":
        eng.save_full(str(out / "model"), tok, save_dtype)
    else:
        eng.save_adapter(str(out / "adapter"), tok)
    eng.close()
    model = eng = None  # free the engine before merging
    release_zero3(keep)
    if spec.finetune != "full" and spec.merge:
        if dist.is_main():
            # shard by shard on CPU; a QLoRA adapter goes into the NF4-dequantised 16-bit weights
            stats = streaming_merge(local_model_dir(base), frozen + [str(out / "adapter")], str(out / "merged"),
                                    dtype=save_dtype, nf4=spec.finetune == "qlora", nf4_dtype=dtype)
            log.info("%s/stage%d: merged %d adapted weights into %s (peak RSS %.2f GiB)", variant.name, k,
                     stats["merged"], out / "merged", stats["peak_rss_gib"])
        dist.barrier()

    summary = {"variant": variant.name, "stage": k, "finetune": spec.finetune, "epochs": epochs_run,
               "steps": step, "stopped_by": stopped_by, "final_loss": last_loss, "train_seconds": round(train_seconds, 6),
               "teacher_forced_accuracy": accs, "n_data": len(data), "n_mix": n_mix, "n_dropped": dropped,
               "zero_stage": zero_stage(ds_cfg), "trainable_parameters": n_trainable,
               "trainable_dtypes": trainable_dtypes, "tokens": tokens["real"], "tokens_run": tokens["ran"],
               "step_seconds": round(tokens["seconds"], 6), **tp}
    if dist.is_main():
        if log_f:
            log_f.close()
        if tb is not None:
            tb.close()
        write_json_atomic(str(out / "DONE.json"), {"hash": h, "summary": summary})
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the final output supersedes them
    dist.barrier()
    return summary
