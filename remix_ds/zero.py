"""The ZeRO policy: ds_configs by name, their "auto" values resolved from a stage's settings, and the ZeRO stage a
stage really runs (by world size, fine-tuning mode and precision). Pure functions of the config: no model, no
DeepSpeed engine, so a run can tell the ZeRO stage its checkpoints need before loading anything."""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

from . import dist
from .config import REPO_DIR
from .errors import ConfigError
from .modes import mode_of

log = logging.getLogger(__name__)
DS_CONFIG_DIRS = [Path.cwd() / "ds_configs", REPO_DIR / "ds_configs"]


def available_ds_configs():
    names = set()
    for d in DS_CONFIG_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def ds_config_path(name: str) -> Path:
    """A ds_config by name (ds_configs/<name>.json) or by path."""
    p = Path(name)
    if p.suffix == ".json" or os.sep in name:
        if not p.is_file():
            raise ConfigError(f"ds_config {name!r}: file not found")
        return p
    for d in DS_CONFIG_DIRS:
        cand = d / f"{name}.json"
        if cand.is_file():
            return cand
    raise ConfigError(f"ds_config {name!r}: unknown ZeRO config (known: {', '.join(available_ds_configs())}, "
                      f"or a path to a .json file)")


def load_ds_config(name: str) -> Dict[str, Any]:
    path = ds_config_path(name)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {stage!r}")
    return cfg


def zero_stage(cfg: Dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_params(cfg: Dict[str, Any]) -> bool:
    return cfg.get("zero_optimization", {}).get("offload_param", {}).get("device", "none") not in ("none", None)


def uses_torch_autocast(cfg: Dict[str, Any]) -> bool:
    return bool(cfg.get("torch_autocast", {}).get("enabled"))


def adapter_tensor_size(lora_r: int, model_config) -> int:
    """The largest LoRA tensor of a model: r x its widest projection dimension (for ZeRO-3 persistence)."""
    return lora_r * max(model_config.hidden_size, getattr(model_config, "intermediate_size", 0) or 0)


def offloads_optimizer(cfg: Dict[str, Any]) -> bool:
    return cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def resolve_precision(precision: str) -> str:
    """'auto': bf16 where the GPU has it, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# "bf16-pure": the study's precision (semantics: study, full fine-tuning): bf16 weights that AdamW steps with bf16
# moments, no fp32 master copy (its FSDP MixedPrecision keeps a bf16-loaded model in bf16). Without ZeRO the client
# AdamW steps the bf16 parameters (its states take their dtype); under ZeRO-1/2/3 DeepSpeed's
# bf16_master_weights_and_grads + bf16_optimizer_states do the same to the partitions.
PURE_BF16 = "bf16-pure"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, PURE_BF16: torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def resolve_ds_config(name: str, *, global_batch_size: int, micro_batch_size: int, grad_accum: int,
                      grad_clip: float, precision: str, hidden_size: int, finetune: Any = "full",
                      adapt: bool = True, adapter_tensor_size: int = 0) -> Dict[str, Any]:
    """Load a ds_config and replace every "auto" with a concrete value; refuse any left over.

    With ``adapt`` (a stage's ``adapt_zero``, on by default) the ZeRO stage is chosen by world size and
    mode (``finetune``: a ``modes`` mode or its name): ZeRO-3 on one process runs as ZeRO-2
    (``effective_zero_stage``), a LoRA/QLoRA stage at ZeRO-1/2 runs without ZeRO, under torch autocast
    (``adapter_zero_stage``), and so does full fine-tuning on one process, with fp32 weights
    (``single_process_full_stage``); the mode says which applies (``FineTuneMode.adapt_zero``).

    ``adapter_tensor_size``: the largest LoRA tensor (r x the widest projection dimension); a LoRA/QLoRA
    ZeRO-3 config's "auto" persistence threshold is raised above it, so that the adapters stay whole on every
    rank (a few MB) and only the frozen base weights are gathered layer by layer.
    """
    cfg = copy.deepcopy(load_ds_config(name))
    src = ds_config_path(name)

    def fill(d: Dict[str, Any], key: str, value):
        if d.get(key, "auto") == "auto":
            d[key] = value
    world = dist.world_size()
    if micro_batch_size * grad_accum * world != global_batch_size:
        raise ConfigError(f"global_batch_size {global_batch_size} != micro_batch_size {micro_batch_size} x "
                          f"gradient accumulation {grad_accum} x world size {world}")
    for key, value in (("train_batch_size", global_batch_size), ("train_micro_batch_size_per_gpu", micro_batch_size),
                       ("gradient_accumulation_steps", grad_accum), ("gradient_clipping", grad_clip)):
        fill(cfg, key, value)
    if (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) != \
            (global_batch_size, micro_batch_size, grad_accum):
        raise ConfigError(f"{src}: batch sizes are set by the recipe; use \"auto\" for train_batch_size, "
                          f"train_micro_batch_size_per_gpu and gradient_accumulation_steps")
    for key, on in (("bf16", precision in ("bf16", PURE_BF16)), ("fp16", precision == "fp16")):
        block = cfg.setdefault(key, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = on
        elif bool(block["enabled"]) != on:
            raise ConfigError(f"{src}: {key}.enabled={block['enabled']} contradicts precision {precision!r}")
    if precision == PURE_BF16:
        if offloads_optimizer(cfg):
            raise ConfigError(f"{src}: the study's pure bf16 (semantics: study, full fine-tuning) keeps AdamW's states "
                              f"in bf16, which DeepSpeed's optimizer offload cannot do with a client optimizer; use a "
                              f"ds_config without offload_optimizer (zero2, zero3), or keep fp32 masters with "
                              f"study_except: [precision]")
        cfg["bf16"].update({"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True})
    if precision == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)
    zo = cfg.setdefault("zero_optimization", {})
    # Several processes: buckets of h^2 elements overlap communication with the backward pass. One
    # process: there is nothing to communicate, so one large bucket and no overlap machinery.
    h2 = hidden_size * hidden_size if world > 1 else int(5e8)
    if world == 1:
        for key in ("overlap_comm", "contiguous_gradients"):
            if zo.get(key) is True:
                zo[key] = False
    for key, value in (("reduce_bucket_size", h2), ("allgather_bucket_size", h2),
                       ("stage3_prefetch_bucket_size", int(0.9 * h2)),
                       ("stage3_param_persistence_threshold",
                        max(10 * hidden_size, adapter_tensor_size + 1 if mode_of(finetune).trains_adapter else 0))):
        if zo.get(key) == "auto":
            zo[key] = value
    if offloads_optimizer(cfg):
        # A client torch optimizer steps the offloaded fp32 partitions on the CPU.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's throughput timer (on by default) synchronizes the device at the start of every forward
    # and the end of every step, which stalls the host from queuing the next kernels; the stage logs its own
    # throughput. A ds_config with its own "timers" block keeps it.
    cfg.setdefault("timers", {"throughput": {"enabled": False}})
    if adapt:
        notes: List[str] = []
        cfg = adapt_zero_stage(cfg, world, finetune, precision, notes)
        for text in notes[-1:]:   # the last change is the stage that runs (and says why)
            log.info("%s", text)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"{src}: cannot resolve \"auto\" for {', '.join(leftover)}")
    return cfg


def _walk(d: Dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def adapt_zero_stage(cfg: Dict[str, Any], world_size: int, finetune: Any, precision: str,
                     notes: List[str]) -> Dict[str, Any]:
    """The ZeRO stage a stage runs with ``adapt_zero`` (the default), by world size and mode: a ds_config
    with that stage applied; why each change was made is appended to ``notes``. ZeRO-3 on one process first
    becomes ZeRO-2 (``effective_zero_stage``); then the mode (``finetune``: a mode or its name) applies its own
    policy (``FineTuneMode.adapt_zero``: ``adapter_zero_stage`` or ``single_process_full_stage``). Depends only
    on the config's ZeRO block, the world size, the mode and the precision (not on the model), so a run can tell
    the stage its checkpoints need before loading anything (``stages.Stage.checkpoint_layout``)."""
    cfg = effective_zero_stage(cfg, world_size, notes)
    return mode_of(finetune).adapt_zero(cfg, world_size, precision, notes)


def effective_zero_stage(cfg: Dict[str, Any], world_size: int, notes: List[str]) -> Dict[str, Any]:
    """On one process ZeRO-3 partitions nothing and only adds parameter gathering to every module: run
    ZeRO-2 instead (optimizer offload kept), unless parameters are offloaded to save device memory."""
    if world_size == 1 and zero_stage(cfg) == 3 and not offloads_params(cfg):
        cfg = copy.deepcopy(cfg)
        zo = cfg["zero_optimization"]
        zo["stage"] = 2
        for key in list(zo):
            if key.startswith("stage3_") or key in ("sub_group_size",):
                zo.pop(key)
        notes.append("one process: ZeRO-3 would partition nothing; running ZeRO-2 (set offload_param to keep ZeRO-3)")
    return cfg


def adapter_zero_stage(cfg: Dict[str, Any], mode: str, precision: str, notes: List[str]) -> Dict[str, Any]:
    """LoRA/QLoRA (``mode``: its name, for the note) at ZeRO-1/2 without offload: run without ZeRO, the adapters
    in fp32 under torch autocast. The adapter modes apply it (``modes.Lora.adapt_zero``).

    ZeRO-1/2 partition optimizer state and gradients, which for a LoRA adapter are a few megabytes: there is
    nothing worth partitioning, yet DeepSpeed's bf16 mode would still cast the adapters to bf16, keep fp32
    master copies in flat buffers, hook every adapter gradient and copy the weights back after each step.
    Without ZeRO the engine steps the client optimizer (fused AdamW on a GPU) on PEFT's fp32 adapters, the
    frozen base stays in the dtype it was loaded in, and DeepSpeed's ``torch_autocast`` runs the forward in
    bf16/fp16: what a hand-written PEFT loop does. Several processes still average the adapter gradients
    (an all-reduce of a few megabytes). ZeRO-3 is kept: there it partitions the frozen base weights.
    """
    if zero_stage(cfg) not in (1, 2) or offloads_optimizer(cfg):
        return cfg
    notes.append(f"{mode}: adapter weights need no ZeRO partitioning; running without ZeRO"
                 f"{f', {precision} torch autocast' if precision != 'fp32' else ''} (set adapt_zero: false to run the "
                 f"ds_config as written)")
    return _without_zero(cfg, precision)


def single_process_full_stage(cfg: Dict[str, Any], world_size: int, precision: str,
                              notes: List[str]) -> Dict[str, Any]:
    """Full fine-tuning on one process at ZeRO-1/2 without offload: run without ZeRO, fp32 weights under torch
    autocast (``load_for_training`` loads them in fp32), as a hand-written loop does. Full fine-tuning applies
    it (``modes.FineTuneMode.adapt_zero``).

    On one process ZeRO-1/2 partition nothing, yet DeepSpeed's bf16 ZeRO optimizer still runs its per-parameter
    host-side bookkeeping every step (gradient hooks, a norm and an inf check per tensor, flat-buffer copies):
    on an H100 the 1B shape's step was bound by that host work (about 180 ms of host time against 112 ms of
    device time). Device memory per parameter is the same 16 bytes either way (fp32 weights, gradients and two
    Adam moments, against bf16 weights and gradients, fp32 master weights and moments); autocast adds the bf16
    weight copies of the forward pass. Offloading configs keep ZeRO: they trade that memory on purpose.
    """
    if world_size != 1 or zero_stage(cfg) not in (1, 2) or offloads_optimizer(cfg) \
            or offloads_params(cfg):
        return cfg
    how = {"fp32": "", PURE_BF16: ", bf16 weights and AdamW states (the study's pure bf16)"}.get(
        precision, f", fp32 weights under {precision} torch autocast")
    notes.append(f"full fine-tuning on one process: ZeRO would partition nothing; running without ZeRO{how} (set "
                 f"adapt_zero: false to run the ds_config as written)")
    return _without_zero(cfg, precision)


def _without_zero(cfg: Dict[str, Any], precision: str) -> Dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["zero_optimization"] = {"stage": 0}
    if precision == PURE_BF16:   # DeepSpeed's own bf16 at stage 0 keeps fp32 masters: the client AdamW steps bf16
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
        cfg.pop("torch_autocast", None)
    elif precision in ("bf16", "fp16"):
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return cfg


def describe_zero(cfg: Dict[str, Any], name: str) -> str:
    """The ZeRO stage a stage really runs, in words (the ds_config's name is only what was asked for)."""
    z = zero_stage(cfg)
    what = f"ZeRO-{z}" if z else "no ZeRO"
    off = [x for x, on in (("optimizer", offloads_optimizer(cfg)), ("parameters", offloads_params(cfg))) if on]
    if off:
        what += f", {' and '.join(off)} offloaded to CPU"
    if uses_torch_autocast(cfg):
        what += f", {cfg['torch_autocast'].get('dtype', '')} autocast"
    return f"{what} (ds_config {os.path.basename(str(name))})"
