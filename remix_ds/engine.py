"""Everything DeepSpeed: resolving a ds_config, ``deepspeed.initialize``, stepping and saving.

The rest of the code never touches engine internals: it calls ``Engine.micro_step``, ``Engine.step``,
``Engine.logits`` and the ``save_*`` methods.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import dist
from .config import REPO_DIR
from .errors import ConfigError

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
                      grad_clip: float, precision: str, hidden_size: int, finetune: str = "full",
                      adapt: bool = True, adapter_tensor_size: int = 0) -> Dict[str, Any]:
    """Load a ds_config and replace every "auto" with a concrete value; refuse any left over.

    With ``adapt`` (a stage's ``adapt_zero``, on by default) the ZeRO stage is chosen by world size and
    mode: ZeRO-3 on one process runs as ZeRO-2 (``effective_zero_stage``), a LoRA/QLoRA stage at
    ZeRO-1/2 runs without ZeRO, under torch autocast (``adapter_zero_stage``), and so does full fine-tuning
    on one process, with fp32 weights (``single_process_full_stage``).

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
                        max(10 * hidden_size, adapter_tensor_size + 1 if finetune in ("lora", "qlora") else 0))):
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


def cosine_schedule(total_steps: int, warmup_ratio: float, warmup_from_zero: bool = False
                    ) -> Callable[[int], float]:
    """The lr factor of optimizer step `step` (from 0): a linear warmup over ceil(total * warmup_ratio) steps,
    then a cosine decay to 0. The warmup's first step runs at lr / warmup; with ``warmup_from_zero`` (the study's
    transformers get_cosine_schedule_with_warmup) at 0, reaching lr / warmup only at the second step."""
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step if warmup_from_zero else step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not -100 (fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def answer_positions(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the [B, L-1] positions whose next token is trained, those next tokens). Computed on
    the host, before the batch goes to the device (``Engine.micro_step``), they select the answer positions on
    the device without a device-to-host sync; on the device they cost one (the count sizes the output)."""
    target = labels[:, 1:]
    keep = (target != -100).reshape(-1)
    index = keep.nonzero().squeeze(1)
    return index, target.reshape(-1)[index]


def _answer_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of `hidden` [B, L-1, H] at the flat positions `index`: [n, H]."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def answer_argmax(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Greedy next tokens [B, L-1] where the next label is trained (-1 elsewhere): the output layer and the
    argmax run only over those positions, never over the full [B, L, vocab] logits. `hidden`: [B, L-1, H]."""
    index, _ = answer_positions(labels)
    pred = torch.full(labels[:, 1:].shape, -1, dtype=torch.long, device=hidden.device)
    pred.view(-1)[index] = head(_answer_rows(hidden, index)).argmax(-1)
    return pred


def logit_transform(config) -> Optional[str]:
    """The name of the config field by which a model transforms its logits after the output layer, if any."""
    for name, neutral in (("logits_scaling", 1.0), ("logit_scale", 1.0), ("final_logit_softcapping", None)):
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return name
    return None


class AnswerLoss(torch.nn.Module):
    """The causal LM with its output layer applied only where it is needed.

    With labels, the decoder runs over the whole batch but the LM head and the cross-entropy only over the
    positions whose next token is trained (the answers: often a handful of a factoid's 20-60 tokens), so
    the full [batch, length, vocab] logits are never formed. Without labels it returns the full logits.

    Batches are right-padded (``collate``) or packed (``collate_packed``, a 4-D mask). A right-padded batch
    needs no attention mask in a causal model: every real token sits before the padding of its row and never
    attends to it, so its outputs are exactly those with the mask (``tests/test_packing.py``), and attention
    runs as plain causal attention (SDPA's ``is_causal`` path: flash kernels on a GPU, no mask to build;
    25% faster on a CPU for a factoid + passage mix). Outputs at padding positions are meaningless and unused.

    With labels the decoder also skips the last column: no label follows it, so its output is never used,
    and in a causal model no earlier position depends on it (one position fewer of L, forward and backward).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._decoder = base.get_decoder()
        self._head = base.get_output_embeddings()
        # families that transform the logits after the output layer (Granite divides by logits_scaling, Cohere
        # multiplies by logit_scale, Gemma 2/3 soft-cap them): run the model's own forward, which applies
        # them, and take its logits at the answer positions (exact; the full logits are formed there)
        self._own_forward = logit_transform(getattr(base, "config", None)) is not None

    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, predict=False, answer_index=None,
                answer_target=None):
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = None   # right padding: see the class docstring
        if labels is not None and input_ids.shape[1] > 1:   # the last position predicts nothing trained
            input_ids = input_ids[:, :-1]
            if attention_mask is not None:   # a packed batch's [rows, 1, L, L] mask
                attention_mask = attention_mask[..., :-1, :-1].contiguous()
            if position_ids is not None:
                position_ids = position_ids[:, :-1]
        if self._own_forward:   # "hidden" is then the logits themselves, and the head the identity
            head = torch.nn.Identity()
            hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
        else:
            head = self._head
            hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        if labels is None:
            return head(hidden)
        hidden = hidden[:, :labels.shape[1] - 1]   # [B, L-1, H] (a one-token batch: no position to train)
        if predict:   # teacher-forced scoring: the greedy token at each answer position
            return answer_argmax(hidden, head, labels)
        if answer_index is None:   # Engine.micro_step passes them computed on the host (no device sync)
            answer_index, answer_target = answer_positions(labels)
        logits = head(_answer_rows(hidden, answer_index))
        return F.cross_entropy(logits.float(), answer_target, reduction="sum")


def adapt_zero_stage(cfg: Dict[str, Any], world_size: int, finetune: str, precision: str,
                     notes: List[str]) -> Dict[str, Any]:
    """The ZeRO stage a stage runs with ``adapt_zero`` (the default), by world size and mode: a ds_config
    with that stage applied; why each change was made is appended to ``notes``. Depends only on the config's
    ZeRO block, the world size, the mode and the precision (not on the model), so a run can tell the stage its
    checkpoints need before loading anything (``stage.checkpoint_layout``)."""
    cfg = effective_zero_stage(cfg, world_size, notes)
    cfg = adapter_zero_stage(cfg, finetune, precision, notes)
    return single_process_full_stage(cfg, world_size, finetune, precision, notes)


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


def adapter_zero_stage(cfg: Dict[str, Any], finetune: str, precision: str, notes: List[str]) -> Dict[str, Any]:
    """LoRA/QLoRA at ZeRO-1/2 without offload: run without ZeRO, the adapters in fp32 under torch autocast.

    ZeRO-1/2 partition optimizer state and gradients, which for a LoRA adapter are a few megabytes: there is
    nothing worth partitioning, yet DeepSpeed's bf16 mode would still cast the adapters to bf16, keep fp32
    master copies in flat buffers, hook every adapter gradient and copy the weights back after each step.
    Without ZeRO the engine steps the client optimizer (fused AdamW on a GPU) on PEFT's fp32 adapters, the
    frozen base stays in the dtype it was loaded in, and DeepSpeed's ``torch_autocast`` runs the forward in
    bf16/fp16: what a hand-written PEFT loop does. Several processes still average the adapter gradients
    (an all-reduce of a few megabytes). ZeRO-3 is kept: there it partitions the frozen base weights.
    """
    if finetune not in ("lora", "qlora") or zero_stage(cfg) not in (1, 2) or offloads_optimizer(cfg):
        return cfg
    notes.append(f"{finetune}: adapter weights need no ZeRO partitioning; running without ZeRO"
                 f"{f', {precision} torch autocast' if precision != 'fp32' else ''} (set adapt_zero: false to run the "
                 f"ds_config as written)")
    return _without_zero(cfg, precision)


def single_process_full_stage(cfg: Dict[str, Any], world_size: int, finetune: str, precision: str,
                              notes: List[str]) -> Dict[str, Any]:
    """Full fine-tuning on one process at ZeRO-1/2 without offload: run without ZeRO, fp32 weights under torch
    autocast (``load_for_training`` loads them in fp32), as a hand-written loop does.

    On one process ZeRO-1/2 partition nothing, yet DeepSpeed's bf16 ZeRO optimizer still runs its per-parameter
    host-side bookkeeping every step (gradient hooks, a norm and an inf check per tensor, flat-buffer copies):
    on an H100 the 1B shape's step was bound by that host work (about 180 ms of host time against 112 ms of
    device time). Device memory per parameter is the same 16 bytes either way (fp32 weights, gradients and two
    Adam moments, against bf16 weights and gradients, fp32 master weights and moments); autocast adds the bf16
    weight copies of the forward pass. Offloading configs keep ZeRO: they trade that memory on purpose.
    """
    if world_size != 1 or finetune != "full" or zero_stage(cfg) not in (1, 2) or offloads_optimizer(cfg) \
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


def packed_sdpa_backends(device: torch.device) -> Optional[list]:
    """The SDPA backends a packed micro-batch (a [rows, 1, L, L] block-diagonal mask) trains with on `device`:
    on CUDA every backend but cuDNN attention; elsewhere None (torch's own choice).

    torch prefers cuDNN attention on sm90/sm100 GPUs (H100, H200) when the cuDNN is 9.15 or newer, and cuDNN
    builds an execution graph on the host for every new problem shape (rows, heads, lengths, mask); packed
    micro-batches change rows and width at nearly every step, so each step would pay a graph build. The
    memory-efficient kernel takes the same mask with no per-shape graph. (An H100 run of 2026-11-27 measured packed steps
    at 0.49x the speed of padded ones with torch's choice; the cause is not yet confirmed: launch/bench.py times
    both, docs/benchmarks.md.)"""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float) -> None:
    """Scale the gradients so that their global norm is at most `max_norm`: torch's clip_grad_norm_ for fp32
    gradients; for 16-bit ones (the study's pure bf16) the norm is taken in fp32 and the factor applied as
    FSDP's clip_grad_norm_ does (torch's foreach norm of bf16 gradients would round each norm to bf16)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if all(g.dtype == torch.float32 for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))


class Engine:
    """Owns one ``deepspeed.initialize`` for one stage."""

    def __init__(self, model: torch.nn.Module, ds_config: Dict[str, Any], *, lr: float, betas, weight_decay: float,
                 total_steps: int, warmup_ratio: float, warmup_from_zero: bool = False):
        import deepspeed

        self.ds_config = ds_config
        params = [p for p in model.parameters() if p.requires_grad]
        fused = torch.cuda.is_available() and not offloads_optimizer(ds_config)
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                **({"fused": True} if fused else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total_steps, warmup_ratio, warmup_from_zero))
        # Without ZeRO and without a loss scaler, DeepSpeed clips with a per-parameter norm loop and builds
        # small tensors from host floats (a device sync every step); torch's foreach clip_grad_norm_ on the
        # same (already all-reduced) gradients is the same arithmetic without the sync.
        self._clip, self._params = 0.0, params
        init_cfg = ds_config
        if zero_stage(ds_config) == 0 and not any(ds_config.get(k, {}).get("enabled") for k in ("fp16", "bf16")) \
                and ds_config.get("torch_autocast", {}).get("dtype") not in ("float16", "fp16", "half") \
                and float(ds_config.get("gradient_clipping", 0) or 0) > 0:
            self._clip = float(ds_config["gradient_clipping"])
            init_cfg = {**ds_config, "gradient_clipping": 0.0}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=AnswerLoss(model), optimizer=opt, lr_scheduler=sched, config=init_cfg)
        # from_pretrained leaves the model in eval mode while the new AnswerLoss around it is in train mode, and
        # micro_step calls train() only after an eval(): without this, the first epoch would run in eval mode
        # (no gradient checkpointing, no dropout of the base model)
        self.engine.train()
        self.zero_stage = zero_stage(ds_config)
        self.device = self.engine.device
        # SDPA backends for packed micro-batches (None: torch's choice); padded ones always take torch's choice
        self.packed_sdpa: Optional[list] = packed_sdpa_backends(self.device)
        if self.zero_stage == 0 and dist.world_size() == 1:
            # nothing to average on one process, but DeepSpeed would still flatten every gradient into a
            # bucket, "all-reduce" it and copy it back after each backward (host time on every step)
            self.engine.enable_backward_allreduce = False
        if self.zero_stage == 0:
            # without ZeRO, DeepSpeed clears gradients by walking every named parameter of the module (the frozen
            # base of a LoRA model too) after each step: clear the trained ones only, as a hand-written loop does
            def zero_grad(*_, params=tuple(params), **__) -> None:
                for p in params:
                    p.grad = None
            self.engine.zero_grad = zero_grad

    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face (or PEFT) model being trained."""
        return self.engine.module.lm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def logits(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    def predict(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy next tokens at the answer positions of a labelled batch ([B, L-1], -1 elsewhere)."""
        with torch.no_grad():
            return self.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                               batch["labels"].to(self.device), None, True)

    def micro_step(self, batch: Dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; the loss is the token-loss sum times ``scale``.

        Returns the unscaled token-loss sum (detached, on device).
        """
        # Module.train() walks every submodule (thousands of calls on an 8B model): only after eval(). DeepSpeed's
        # engine passes train()/eval() to its module and never changes its own flag: ask the module
        if not self.engine.module.training:
            self.engine.train()
        labels = batch["labels"]
        index, target = answer_positions(labels) if labels.device.type == "cpu" else (None, None)
        dev = self.to_device
        pos = batch.get("position_ids")
        mask = batch["attention_mask"]
        # the backward too: gradient checkpointing recomputes each layer's forward there, and a recomputation
        # under other SDPA backends saves other tensors (torch.utils.checkpoint raises CheckpointError)
        with sdpa_context(self.packed_sdpa if mask.dim() == 4 else None):
            loss_sum = self.engine(dev(batch["input_ids"]), dev(mask), dev(labels),
                                   None if pos is None else dev(pos), False,
                                   None if index is None else dev(index), None if target is None else dev(target))
            self.engine.backward(loss_sum * scale)
        return loss_sum.detach()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch tensor on the engine's device without a device sync: a blocking host-to-GPU copy
        waits for every kernel queued before it, which would stall the host at each micro-batch; from pinned
        memory the copy is queued like a kernel (the caching host allocator keeps the buffer until it is done)."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def step(self) -> None:
        if self._clip and self.engine.is_gradient_accumulation_boundary():
            clip_grad_norm(self._params, self._clip)
        self.engine.step()

    def eval(self):
        self.engine.eval()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: str, tag: str, client_state: Dict[str, Any], marker: Dict[str, Any]) -> None:
        """A DeepSpeed checkpoint (model, optimizer, scheduler; every rank writes its partition), then a
        completion marker written by rank 0 once every rank has finished. The GradScaler of fp16 autocast
        without ZeRO (which DeepSpeed's checkpoint leaves out) goes into the client state."""
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            client_state = {**client_state, "grad_scaler": scaler.state_dict()}
        self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()
        if dist.is_main():
            write_json_atomic(os.path.join(root, tag, "COMPLETE.json"), marker)
        dist.barrier()

    def load_checkpoint(self, root: str, tag: str) -> Dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"could not load checkpoint {root}/{tag}")
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None and client_state.get("grad_scaler"):
            scaler.load_state_dict(client_state["grad_scaler"])
        return client_state

    # ------------------------------------------------------------------ saving
    def gather_state_dict(self, keep: Callable[[str, torch.nn.Parameter], bool], dtype: torch.dtype
                          ) -> Optional[Dict[str, torch.Tensor]]:
        """Full tensors of the kept parameters on rank 0 (every rank must call this under ZeRO-3)."""
        import deepspeed

        sd: Dict[str, torch.Tensor] = {}
        main = dist.is_main()
        for mod_name, mod in self.module.named_modules():
            local = [(n, p) for n, p in mod.named_parameters(recurse=False) if keep(f"{mod_name}.{n}".lstrip("."), p)]
            if not local:
                continue
            params = [p for _, p in local]
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero_stage == 3 \
                else _nullcontext()
            with ctx:
                if main:
                    for n, p in local:
                        sd[f"{mod_name}.{n}".lstrip(".")] = p.detach().to("cpu", dtype).clone()
        return sd if main else None

    def save_full(self, out_dir: str, tokenizer, dtype: torch.dtype) -> None:
        """The whole model as a safetensors Hugging Face directory (written by rank 0)."""
        sd = self.gather_state_dict(lambda n, p: True, dtype)
        if dist.is_main():
            model = self.module

            def write(tmp: str) -> None:
                model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                # save_pretrained records the dtype of the parameters it holds (fp32 weights trained under
                # autocast, say), not of the state dict it wrote: record the written one
                path = os.path.join(tmp, "config.json")
                with open(path) as f:
                    cfg = json.load(f)
                cfg["dtype"] = str(dtype).replace("torch.", "")
                with open(path, "w") as f:
                    json.dump(cfg, f, indent=2, sort_keys=True)
                    f.write("\n")
            atomic_save(out_dir, write)
        dist.barrier()

    def save_adapter(self, out_dir: str, tokenizer, dtype: torch.dtype = torch.float32) -> None:
        """The trained PEFT adapter (gathered from every rank under ZeRO-3), written by rank 0."""
        sd = self.gather_state_dict(lambda n, p: "lora_" in n, dtype)
        if dist.is_main():
            if not sd or any(t.numel() == 0 for t in sd.values()):
                raise RuntimeError("gathered LoRA state dict is empty: refusing to save an empty adapter")
            atomic_save(out_dir, lambda tmp: (self.module.save_pretrained(tmp, state_dict=sd, safe_serialization=True),
                                              tokenizer.save_pretrained(tmp)))
        dist.barrier()

    def close(self) -> None:
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        if uses_torch_autocast(self.ds_config):
            # DeepSpeed records torch_autocast in module globals that a later engine of this process (the next
            # stage, say full fine-tuning in DeepSpeed's own bf16) would read as its own: reset them
            try:
                from deepspeed.runtime import torch_autocast as ds_autocast
                ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
                ds_autocast.TORCH_AUTOCAST_DTYPE = None
            except ImportError:
                pass
        del self.engine, self.optimizer, self.scheduler
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def sdpa_context(backends: Optional[list]):
    """torch.nn.attention.sdpa_kernel(backends), or nothing for None."""
    if not backends:
        return _nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(backends)


def atomic_save(out_dir: str, write: Callable[[str], Any]) -> None:
    """Write into a temporary sibling directory, then rename it into place."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_json(path: Any) -> Any:
    """A JSON file's content, or None where it is missing or unreadable (a killed write, another format)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
