"""Penalties added to a stage's answer loss: the continual-learning baselines of the study's comparison (KL to the
stage-start model, EWC, L2 to the stage start), chosen per stage by ``stageN.regularizer`` (docs/baselines.md).

The protocol a penalty follows (``Penalty``), in the order a stage calls it:

- ``check(stage)``      before any model loads: refuse a combination it cannot serve, with what to do instead;
- ``prepare(ctx)``      once per stage, before the trained model loads (EWC: its Fisher, computed or read back);
- ``attach(objective)`` once, after ``deepspeed.initialize``: anchors, module hooks, the reference model;
- ``term(fwd)``         inside every training forward: this micro-batch's raw value (a tensor with its gradient);
- ``after_step()``      after each optimizer step;
- ``state_dict()`` / ``load_state_dict()``: what a checkpoint must keep (the probe set's position for KL on a probe
  set; everything else is rebuilt from the stage's input);
- ``close()``           at the stage's end: hooks removed, the reference freed.

Scaling (``scaling``, applied by ``objective.penalty_factor``). KL on the answer tokens (``tokens``) is a sum over
the micro-batch's answer positions, scaled as the answer loss is (the global batch's mean per answer token). KL on a
probe set (``batch``) is the mean over one probe batch that every rank and micro-step of an optimizer step share, so
its value does not depend on the number of ranks. A parameter penalty (EWC, L2; ``slice``) is one value per
optimizer step: each rank holds and penalises only its own 1/world slice of every flattened weight (under ZeRO-3 the
same split as DeepSpeed's partitions), and its term is multiplied by the world size, which the data-parallel
gradient average divides out again, so the gradient is that of the whole penalty on any number of ranks. The
objective adds ``weight * factor * term`` to the loss.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import dist
from .config import stage_hash
from .errors import ConfigError
from .modes import mode_of

log = logging.getLogger(__name__)

METHODS = ("kl", "ewc", "l2")


@dataclass
class Forward:
    """What a penalty sees of one training forward: the (trimmed) inputs, the answer positions and the current
    model's logits there ([n, vocab], with their gradient); ``objective.answer_logits`` runs another model (or this
    one with its adapter off) on the same inputs."""
    objective: Any
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    answer_index: torch.Tensor
    logits: torch.Tensor


@dataclass
class PenaltyContext:
    """What ``prepare`` may use: the stage handle, the tokenizer, the stage's training dtype and device."""
    stage: Any
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device


class Penalty:
    """A term added to the answer loss (see the module docstring for the protocol)."""
    name = ""
    scaling = "slice"

    def __init__(self, spec) -> None:
        self.spec = spec
        self.weight = float(spec.weight)

    # why an adapter-trained stage above earlier unmerged adapters cannot be served (check)
    needs_merged_input = ""

    def check(self, stage) -> None:
        if mode_of(stage.spec).trains_adapter and unmerged_below(stage):
            raise ConfigError(f"{stage.name}: regularizer {self.name} on a LoRA stage whose input keeps earlier "
                              f"adapters unmerged: {self.needs_merged_input}. Set merge: true in the earlier LoRA "
                              f"stages")

    def prepare(self, ctx: PenaltyContext) -> None:
        pass

    def attach(self, objective) -> None:
        pass

    def begin(self) -> None:
        """A training forward starts (parameter penalties collect from their hooks until ``term``)."""

    def term(self, fwd: Forward) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def build_penalties(spec) -> List[Penalty]:
    """The penalties of a stage spec (none without ``regularizer``)."""
    reg = getattr(spec, "regularizer", None)
    if reg is None:
        return []
    return [{"kl": KLPenalty, "ewc": EWCPenalty, "l2": L2Penalty}[reg.method](reg)]


# ------------------------------------------------------------------ KL to the stage-start model

def kl_sum(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(reference || current) of the next-token distributions, in at least fp32."""
    ref = torch.log_softmax(_wide(reference_logits), -1)
    cur = torch.log_softmax(_wide(logits), -1)
    return (ref.exp() * (ref - cur)).sum()


class KLPenalty(Penalty):
    """weight x KL(stage-start model || current model) over a set of tokens: the stage's own answer positions
    (``tokens: answers``, the default: summed, scaled as the answer loss), or every next-token position of a probe
    set, a recipe dataset's examples, prompt and answer (``tokens: <dataset key>``, e.g. D_A or a generic-text set):
    one batch of ``probe_batch`` of them per optimizer step, in a seeded order, the mean over its positions; the
    probe batch costs one more forward and backward pass of the trained model per micro-batch.

    The reference is the model as the stage began. A LoRA/QLoRA stage's reference is the same model with its
    adapter disabled (PEFT's ``disable_adapter``): no second copy in memory. A full fine-tuning stage's reference is
    a frozen copy loaded from the stage's input: under ZeRO-3 it is a DeepSpeed engine of its own without an
    optimizer, partitioned across the ranks like the trained model (as OpenRLHF prepares its reference model), and
    otherwise a copy on the device in the trained weights' dtype."""
    name = "kl"
    needs_merged_input = "disabling the adapter would also drop theirs, so the reference would not be the " \
                         "stage-start model"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.tokens = getattr(spec, "tokens", "answers") or "answers"
        self.scaling = "tokens" if self.tokens == "answers" else "batch"
        self.reference: Optional[torch.nn.Module] = None
        self._ref_engine = None
        self._keep = None
        self._probe: List[Any] = []
        self._cursor = 0

    def check(self, stage) -> None:
        super().check(stage)
        if self.tokens != "answers" and self.tokens not in stage.recipe.datasets:
            raise ConfigError(f"{stage.name}: regularizer.tokens must be answers or a dataset of the recipe "
                              f"({', '.join(stage.recipe.datasets)}), got {self.tokens!r}")

    def prepare(self, ctx: PenaltyContext) -> None:
        self._ctx = ctx
        if self.tokens != "answers" and not self._probe:   # (a test may hand it its probe set: set_probe)
            from .data import dataset_examples
            from .data.formatting import encode_examples

            recipe = ctx.stage.recipe
            examples = dataset_examples(recipe, self.tokens)
            g = torch.Generator().manual_seed(recipe.seed * 17 + ctx.stage.k)
            order = torch.randperm(len(examples), generator=g).tolist()
            enc, _ = encode_examples(ctx.tokenizer, [examples[i] for i in order], recipe.max_seq_length)
            self.set_probe(enc, _pad_id(ctx.tokenizer))

    def set_probe(self, encoded: List[Any], pad: int) -> None:
        """The probe set's encoded examples, in the order their batches are taken."""
        if not encoded:
            raise ConfigError(f"regularizer kl: the probe set {self.tokens!r} has no example")
        self._probe, self._pad = list(encoded), pad

    def probe_batch(self) -> Dict[str, torch.Tensor]:
        """This step's probe batch: ``probe_batch`` examples from the cursor on (wrapping around), right-padded."""
        from .data.formatting import collate

        n = min(self.spec.probe_batch, len(self._probe))
        chosen = [self._probe[(self._cursor + i) % len(self._probe)] for i in range(n)]
        return collate(chosen, self._pad)

    def attach(self, objective) -> None:
        if mode_of(self._ctx.stage.spec).trains_adapter:
            return   # the adapter disabled is the reference
        from transformers import AutoModelForCausalLM

        base, _ = self._ctx.stage.input()
        trained = next(p for p in objective.lm.parameters())
        zero3 = hasattr(trained, "ds_id")
        dtype = _param_dtype(trained)
        if zero3:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": dist.world_size(),
                   "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                   "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
            # the copy is loaded partitioned (zero.Init); transformers' ZeRO-3 setting stays on (the trained model's
            # was) until the engine closes
            self._keep = HfDeepSpeedConfig(cfg)
            ref = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            self._ref_engine, *_ = deepspeed.initialize(model=ref, config=cfg)
            self._ref_engine.eval()
            ref = self._ref_engine.module
        else:
            ref = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(objective_device(objective)).eval()
        ref.config.use_cache = False
        for p in ref.parameters():
            p.requires_grad_(False)
        self.reference = ref

    def _reference(self, fwd: Forward) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is None:
                with fwd.objective.lm.disable_adapter():
                    return fwd.objective.answer_logits(fwd, None)
            return fwd.objective.answer_logits(fwd, self.reference)

    def term(self, fwd: Forward) -> torch.Tensor:
        if self.tokens == "answers":
            return kl_sum(self._reference(fwd), fwd.logits)
        probe = self.probe_fwd(fwd)
        return kl_sum(self._reference(probe), fwd.objective.answer_logits(probe, None)) / max(1, len(probe.answer_index))

    def probe_fwd(self, fwd: Forward) -> Forward:
        """A forward over this step's probe batch: every position whose next token is real (right padding)."""
        batch = self.probe_batch()
        device = fwd.input_ids.device
        ids = batch["input_ids"][:, :-1]
        real = batch["attention_mask"][:, 1:].reshape(-1).bool()
        index = real.nonzero().squeeze(1)
        return Forward(fwd.objective, ids.to(device), None, None, index.to(device), None)

    def after_step(self) -> None:
        if self._probe:
            self._cursor = (self._cursor + min(self.spec.probe_batch, len(self._probe))) % len(self._probe)

    def state_dict(self) -> Dict[str, Any]:
        return {"cursor": self._cursor}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._cursor = int(state.get("cursor", 0))

    def close(self) -> None:
        if self._ref_engine is not None and hasattr(self._ref_engine, "destroy"):
            self._ref_engine.destroy()
        self.reference = self._ref_engine = self._keep = None


def unmerged_below(stage) -> bool:
    """Whether the stage's input keeps earlier adapters unmerged (an earlier LoRA stage with merge: false), read from
    the specs alone (no model is resolved)."""
    return any(mode_of(s).trains_adapter and not s.merge for s in stage.variant.stages[:stage.k - 1])


def objective_device(objective) -> torch.device:
    return next(objective.lm.parameters()).device


def _param_dtype(p: torch.Tensor) -> torch.dtype:
    return p.ds_tensor.dtype if hasattr(p, "ds_tensor") else p.dtype


# ------------------------------------------------------------------ EWC and L2 to the stage start

def rank_slice(numel: int, world: int, rank: int) -> Tuple[int, int]:
    """The [lo, hi) range of a flattened tensor of `numel` elements this rank penalises: DeepSpeed ZeRO-3's own
    partition of a parameter (ceil(numel / world) elements per rank, the last rank's cut short)."""
    part = math.ceil(numel / world)
    lo = min(numel, rank * part)
    return lo, min(numel, lo + part)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least fp32 (16-bit weights are widened; a float64 model keeps float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lora_delta(module: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """A PEFT LoRA layer's effective weight change of `adapter`: scaling x B @ A, shaped like the base weight."""
    A = module.lora_A[adapter].weight
    B = module.lora_B[adapter].weight
    return (_wide(B) @ _wide(A)) * module.scaling[adapter]


class ParamPenalty(Penalty):
    """weight x sum_i F_i (theta_i - theta*_i)^2 over the trained weights, theta* the stage-start weights; F the
    diagonal Fisher (EWC) or 1 (L2). A LoRA/QLoRA stage penalises the adapter's effective change of each adapted
    base weight (scaling x B @ A), with that weight's F. Each term is taken in a forward pre-hook of the module
    that owns the weight, where ZeRO-3 has gathered it (the hook is registered after DeepSpeed's own)."""
    needs_fisher = False
    needs_merged_input = "the anchor would not be the stage-start weights"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._hooks: List[Any] = []
        self._collected: List[torch.Tensor] = []
        self._collecting = False
        self.fisher: Optional[Dict[str, torch.Tensor]] = None
        self._device: Optional[torch.device] = None   # where the Fisher's slices go (EWC's prepare sets it)

    def attach(self, objective) -> None:
        world, rank = dist.world_size(), dist.rank()
        lora = objective.lm is not objective.base
        n = 0
        seen = set()   # a weight two modules share (tied embeddings) is anchored and penalised once, under its first name
        for name, module in objective.lm.named_modules():
            if lora:
                if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
                    continue
                lo, hi = rank_slice(_numel(module.base_layer.weight), world, rank)
                # the Fisher's key for an adapted layer is the layer's name (penalties.fisher_names)
                entries = [(None, lo, hi, None, self._fisher_slice(name, lo, hi))]
            else:
                entries = []
                for pname, p in module.named_parameters(recurse=False):
                    if not p.requires_grad or id(p) in seen:
                        continue
                    seen.add(id(p))
                    lo, hi = rank_slice(_numel(p), world, rank)
                    full = f"{name}.{pname}" if name else pname
                    entries.append((pname, lo, hi, _gathered_slice(p, lo, hi),
                                    self._fisher_slice(full, lo, hi)))
            if not entries:
                continue
            self._hooks.append(module.register_forward_pre_hook(self._make_hook(module, entries)))
            n += 1
        if n == 0:
            raise RuntimeError(f"regularizer {self.name}: no trained weight found to anchor")

    def _fisher_slice(self, key: str, lo: int, hi: int) -> Optional[torch.Tensor]:
        if self.fisher is None:
            return None
        if key not in self.fisher:
            raise RuntimeError(f"regularizer {self.name}: the Fisher has no entry for {key}")
        f = _wide(self.fisher[key].reshape(-1)[lo:hi])
        return f.to(self._device) if self._device is not None else f

    def _make_hook(self, module: torch.nn.Module, entries) -> Callable:
        def hook(mod, args):
            if not self._collecting:   # evaluation, or gradient checkpointing's recomputation in the backward
                return None
            for pname, lo, hi, anchor, f in entries:
                if pname is None:   # LoRA: the adapter's change of the base weight (its anchor: no change)
                    diff = lora_delta(mod).reshape(-1)[lo:hi]
                else:
                    p = getattr(mod, pname)
                    diff = _wide(p.reshape(-1)[lo:hi]) - anchor.to(p.device)
                sq = diff * diff
                self._collected.append((sq * f.to(sq.device)).sum() if f is not None else sq.sum())
            return None
        return hook

    def begin(self) -> None:
        self._collected = []
        self._collecting = True

    def term(self, fwd: Forward) -> torch.Tensor:
        self._collecting = False
        total = torch.stack(self._collected).sum() if self._collected else fwd.logits.new_zeros((), dtype=torch.float32)
        self._collected = []
        return total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _numel(p: torch.Tensor) -> int:
    """A weight's element count, also under ZeRO-3 (where the local tensor is a partition)."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _gathered_slice(p: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """This rank's slice of a weight's flattened values (at least fp32), gathered first under ZeRO-3."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return _wide(p.detach().reshape(-1)[lo:hi]).clone()
    return _wide(p.detach().reshape(-1)[lo:hi]).clone()


class L2Penalty(ParamPenalty):
    """EWC with F = 1: weight x squared distance to the stage-start weights."""
    name = "l2"


class EWCPenalty(ParamPenalty):
    """EWC (Kirkpatrick et al. 2017): the diagonal Fisher of the previous stage's data at the stage-start model,
    F_i = mean over examples of (d log p(answer | prompt) / d theta_i)^2, one backward pass per example.

    Computed once, at the start of the stage that uses it (on the previous stage's output, which is the stage's
    input), by rank 0 on a plain copy of the model, and saved with the previous stage's output
    (``stage<k-1>/fisher/<key>.safetensors``, the key naming the previous stage's hash, the weights and the sample
    count) so that a rerun or a resume reads it back. Every rank then keeps its own slice."""
    name = "ewc"
    needs_fisher = True

    def check(self, stage) -> None:
        super().check(stage)
        if stage.k == 1:
            raise ConfigError(f"{stage.name}: regularizer ewc needs a previous stage (its Fisher is of the previous "
                              f"stage's data); use kl or l2 in stage 1")

    def prepare(self, ctx: PenaltyContext) -> None:
        stage = ctx.stage
        path = fisher_path(stage, ctx.dtype, self.spec.fisher_samples)
        if dist.is_main() and not path.is_file():
            examples = fisher_examples(stage, ctx.tokenizer, self.spec.fisher_samples)
            base, _ = stage.input()
            model = fisher_model(base, stage.spec, ctx.dtype, ctx.device)
            fisher = diagonal_fisher(model, examples, _pad_id(ctx.tokenizer), ctx.device)
            del model
            save_fisher(path, fisher, {"previous_hash": stage.previous.hash, "samples": len(examples),
                                       "finetune": stage.spec.finetune})
            log.info("%s: EWC Fisher of %s over %d examples saved to %s", stage.name, stage.previous.name,
                     len(examples), path)
        dist.barrier()
        self.fisher = LazyTensors(path)   # read tensor by tensor in attach: no rank holds the whole Fisher
        self._device = ctx.device

    def attach(self, objective) -> None:
        super().attach(objective)
        self.fisher = None   # every rank keeps only its slices (taken in attach)


def _pad_id(tok) -> int:
    from .data.formatting import pad_id_of
    return pad_id_of(tok)


def fisher_path(stage, dtype: torch.dtype, samples: int) -> Path:
    """Where the Fisher of ``stage``'s previous stage is kept: in that stage's directory, named by what it
    depends on (the previous stage's hash, the weights it covers and how it was computed)."""
    spec = stage.spec
    adapter = mode_of(spec).trains_adapter
    lora = [spec.lora.r, sorted(spec.lora.target_modules)] if adapter else None
    key = stage_hash({"previous": stage.previous.hash, "adapter": adapter, "lora": lora, "samples": samples,
                      "dtype": str(dtype)})[:12]
    return stage.previous.dir / "fisher" / f"{key}.safetensors"


def fisher_examples(stage, tokenizer, samples: int):
    """The previous stage's own training examples (its dataset, not its mixing), up to `samples` of them in a
    seeded order, encoded as the stage trains them."""
    from .data import stage_train_set
    from .data.formatting import encode_examples

    prev = stage.previous
    _, train = stage_train_set(stage.recipe, prev.spec, prev.k)
    own = [ex for ex in train if ex.role == "train"] or [ex for ex in train if ex.role != "mix"]
    g = torch.Generator().manual_seed(stage.recipe.seed * 31 + stage.k)
    order = torch.randperm(len(own), generator=g).tolist()[:samples]
    enc, _ = encode_examples(tokenizer, [own[i] for i in order], stage.recipe.max_seq_length)
    return enc


def fisher_model(path: str, spec, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A plain copy of the stage-start model whose weights the Fisher covers require gradients: every weight for
    full fine-tuning; for LoRA/QLoRA the base weights PEFT adapts (a 16-bit base: the Fisher is of the weights the
    adapter changes, not of their NF4 codes), found by applying the stage's LoRA config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if mode_of(spec).trains_adapter:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=0.0,
                         target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                m.base_layer.weight.requires_grad_(True)
    return model.to(device).eval()


def fisher_names(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The Fisher's keys and weights: parameter names for a plain model; for a PEFT model the names of its LoRA
    layers (the same names the trained PEFT model has), each for its base weight."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        return {n: m.base_layer.weight for n, m in model.named_modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A}
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: torch.nn.Module, examples, pad: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """mean over `examples` of the squared gradient of each example's answer log-likelihood (sum over its answer
    tokens), per weight of ``fisher_names`` (fp32, on the CPU)."""
    from .data.formatting import collate

    named = fisher_names(model)
    names, params = list(named), list(named.values())
    acc = [torch.zeros_like(_wide(p)) for p in params]
    for e in examples:
        batch = collate([e], pad)
        logits = model(input_ids=batch["input_ids"].to(device)).logits
        # the cross-entropy in at least fp32 (a float64 model keeps float64)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = batch["labels"].to(device)[:, 1:].flatten()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=-100,
                                                reduction="sum")
        grads = torch.autograd.grad(nll, params)
        for a, g in zip(acc, grads):
            a.add_(_wide(g) ** 2)
    n = max(1, len(examples))
    return {name: (a / n).cpu() for name, a in zip(names, acc)}


class LazyTensors:
    """A safetensors file as a read-only mapping whose tensors are read one at a time (an 8B model's Fisher is 16-32
    GB: each rank keeps only its slices, and never holds more of the file than one tensor)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = set(self._file.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def save_fisher(path: Path, fisher: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)
