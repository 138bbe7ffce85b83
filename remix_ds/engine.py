"""The DeepSpeed runtime: ``deepspeed.initialize`` on the stage's objective, stepping, checkpoints and saving.

The rest of the code never touches engine internals: it calls ``Engine.micro_step``, ``Engine.step``,
``Engine.logits`` and the ``save_*`` methods. The ZeRO policy (which ds_config, which ZeRO stage) is ``zero.py``;
the loss is ``objective.py``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import dist
from .files import atomic_save, write_json_atomic
from .objective import AnswerLoss, answer_positions, combine, penalty_factor
from .zero import offloads_optimizer, uses_torch_autocast, zero_stage

log = logging.getLogger(__name__)


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
                 total_steps: int, warmup_ratio: float, warmup_from_zero: bool = False, penalties: Sequence[Any] = ()):
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
            model=AnswerLoss(model, penalties), optimizer=opt, lr_scheduler=sched, config=init_cfg)
        # penalties attach after DeepSpeed's own module hooks (a forward pre-hook then sees ZeRO-3's gathered weights)
        self.penalties = list(penalties)
        for p in self.penalties:
            p.attach(self.engine.module)
        # each penalty's value summed over the micro-steps since the last take_penalty_log(), in units that sum over
        # ranks to the step's value (see micro_step)
        self._penalty_log: Dict[str, torch.Tensor] = {}
        self._world, self._gas = dist.world_size(), int(ds_config.get("gradient_accumulation_steps", 1))
        self.keep: Any = None   # set by build_engine: what keeps transformers' ZeRO-3 loading on while the engine lives
        # from_pretrained leaves the model in eval mode while the new AnswerLoss around it is in train mode, and
        # micro_step calls train() only after an eval(): without this, the first epoch would run in eval mode
        # (no gradient checkpointing, no dropout of the base model)
        self.engine.train()
        self.zero_stage = zero_stage(ds_config)
        self.device = self.engine.device
        # SDPA backends for packed micro-batches (None: torch's choice); padded ones always take torch's choice
        self.packed_sdpa: Optional[list] = packed_sdpa_backends(self.device)
        # --- packed micro-batches without a 4-D mask (remix_ds.attention): when the model's attention layers take
        # sequence boundaries, global_step collates packed micro-batches with collate_varlen. Penalties keep the
        # 4-D mask: their reference forwards (penalties.Forward) take the batch's attention mask, not boundaries
        from . import attention
        why = "penalties" if self.penalties else attention.supports(model)
        self.packed_varlen: bool = why is None
        self.packed_kernel: str = attention.kernel_name(self.device, self.compute_dtype()) if why is None \
            else f"4-D mask ({why})"
        self._attn_configs = attention.model_configs(model) if why is None else []
        # ---
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

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations have in training: autocast's, DeepSpeed's bf16/fp16, else the trained weights'."""
        cfg = self.ds_config
        ac = cfg.get("torch_autocast", {})
        if ac.get("enabled"):
            return {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16}.get(
                str(ac.get("dtype", "bfloat16")), torch.bfloat16)
        if cfg.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        if cfg.get("fp16", {}).get("enabled"):
            return torch.float16
        return self._params[0].dtype if self._params else torch.float32

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
        mask = batch.get("attention_mask")
        seg = batch.get("segments")   # collate_varlen: packed attention without a 4-D mask (remix_ds.attention)
        extra = {} if seg is None else {"segments": seg.to(self.device)}
        # the backward too: gradient checkpointing recomputes each layer's forward there, and a recomputation
        # under other SDPA backends (or another attention implementation) saves other tensors
        # (torch.utils.checkpoint raises CheckpointError)
        with self.attention_context(batch):
            out = self.engine(dev(batch["input_ids"]), None if mask is None else dev(mask), dev(labels),
                              None if pos is None else dev(pos), False,
                              None if index is None else dev(index), None if target is None else dev(target), **extra)
            if self.penalties:
                loss_sum, terms = out
                self.engine.backward(combine(loss_sum, terms, self.penalties, scale, self._world))
                self._log_penalties(terms, scale)
            else:
                loss_sum = out
                self.engine.backward(loss_sum * scale)
        return loss_sum.detach()

    def attention_context(self, batch: Dict[str, torch.Tensor]):
        """What a micro-batch attends through: packed_attention for collate_varlen's batches, the packed SDPA
        backends for a 4-D mask, torch's choice for padded ones."""
        if batch.get("segments") is not None:
            if not self.packed_varlen:
                raise RuntimeError(f"a varlen-packed batch on an engine without packed attention: {self.packed_kernel}")
            from .attention import packed_attention
            return packed_attention(self._attn_configs)
        mask = batch.get("attention_mask")
        return sdpa_context(self.packed_sdpa if mask is not None and mask.dim() == 4 else None)

    def _log_penalties(self, terms: Dict[str, torch.Tensor], scale: float) -> None:
        """Add this micro-batch's penalty values so that their sum over the step's micro-batches and the ranks is the
        step's value: what the term adds to the loss (``objective.penalty_factor``) after DeepSpeed's 1/gas and the
        rank average, i.e. the factor / (world x gas): a per-token penalty in the loss's normalisation (the global
        batch's mean per answer token), a parameter penalty (this rank's slice) once per step, a shared batch's mean
        averaged over micro-steps and ranks."""
        for p in self.penalties:
            share = penalty_factor(p.scaling, scale, self._world) / (self._world * self._gas)
            value = terms[p.name].detach().double() * share
            self._penalty_log[p.name] = self._penalty_log[p.name] + value if p.name in self._penalty_log else value

    def take_penalty_log(self) -> Dict[str, torch.Tensor]:
        """The penalties' values summed since the last call (on device; sum over ranks, divide by the steps)."""
        out, self._penalty_log = self._penalty_log, {}
        return {p.name: out.get(p.name, torch.zeros((), dtype=torch.float64, device=self.device))
                for p in self.penalties}

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch tensor on the engine's device without a device sync: a blocking host-to-GPU copy
        waits for every kernel queued before it, which would stall the host at each micro-batch; from pinned
        memory the copy is queued like a kernel (the caching host allocator keeps the buffer until it is done)."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self._clip and boundary:
            clip_grad_norm(self._params, self._clip)
        self.engine.step()
        if boundary:
            for p in self.penalties:
                p.after_step()

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
        for p in self.penalties:
            p.close()
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
        from .model import release_zero3
        release_zero3(self.keep)
        self.keep = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_engine(path: str, finetune: str, lora, ds_config: Dict[str, Any], dtype: torch.dtype, *, lr: float, betas,
                 weight_decay: float, total_steps: int, warmup_ratio: float, warmup_from_zero: bool = False,
                 frozen_adapters: Sequence[str] = (), gradient_checkpointing: bool = False,
                 penalties: Sequence[Any] = ()) -> Engine:
    """The model of a stage loaded for training (``model.load_for_training``) in a DeepSpeed engine on its objective:
    the one set-up the stage and the bench share. If anything fails, later models are not left under ZeRO-3's
    partitioned loading."""
    from .model import load_for_training, release_zero3

    keep = True if zero_stage(ds_config) == 3 else None
    try:
        model, keep = load_for_training(path, finetune, lora, ds_config, dtype, frozen_adapters=frozen_adapters,
                                        gradient_checkpointing=gradient_checkpointing)
        eng = Engine(model, ds_config, lr=lr, betas=betas, weight_decay=weight_decay, total_steps=total_steps,
                     warmup_ratio=warmup_ratio, warmup_from_zero=warmup_from_zero, penalties=penalties)
    except BaseException:
        release_zero3(keep)
        raise
    eng.keep = keep
    return eng


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
