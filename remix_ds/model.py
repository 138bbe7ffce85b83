"""Loading a base model for training (the mode chooses: ``modes``) or for evaluation, and merging adapters."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .config import LoraSpec
from .files import atomic_save
from .modes import mode_of
from .zero import uses_torch_autocast, zero_stage

if TYPE_CHECKING:
    from .modes import FineTuneMode

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def param_count(params) -> int:
    """Elements of the parameters, counting a ZeRO-3 partitioned one at its full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


def quantization_config(dtype: torch.dtype, ds_config: Optional[Dict[str, Any]] = None):
    """QLoRA: NF4 with double quantisation; under ZeRO-3 the 4-bit storage dtype equals the compute dtype
    (so DeepSpeed can partition the packed weights like any other tensor)."""
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if ds_config and zero_stage(ds_config) == 3:
        kwargs["bnb_4bit_quant_storage"] = dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, **kwargs)


def load_for_training(path: str, finetune: Union[str, "FineTuneMode"], lora: LoraSpec, ds_config: Dict[str, Any],
                      dtype: torch.dtype, frozen_adapters: Sequence[str] = (), gradient_checkpointing: bool = False
                      ) -> Tuple[torch.nn.Module, Any]:
    """The model to hand to DeepSpeed, and an object to keep alive while the engine lives.

    ``finetune``: the mode (``modes.mode_of``: a mode or its name); it loads the base (``load_base``: full
    fine-tuning in fp32 under torch autocast, QLoRA in NF4) and puts what trains on it (``attach``: a LoRA
    adapter, ``add_lora``). Under ZeRO-3 the weights are loaded partitioned (``zero.Init`` through
    HfDeepSpeedConfig), so a large model never materialises whole on one device. ``frozen_adapters`` (earlier
    stages trained with ``merge: false``) are loaded, kept active and frozen; a new adapter is trained on top.
    ``gradient_checkpointing``: recompute each decoder layer's activations in the backward pass
    (non-reentrant), trading about a third more compute for activation memory.
    """
    from transformers.integrations import HfDeepSpeedConfig

    mode = mode_of(finetune)
    keep = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = mode.load_base(path, ds_config, dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return mode.attach(model, lora, ds_config, frozen_adapters), keep


def add_lora(model: torch.nn.Module, lora: LoraSpec, ds_config: Dict[str, Any], frozen_adapters: Sequence[str] = (),
             label: str = "lora") -> torch.nn.Module:
    """A new trainable LoRA adapter (``lora``) on `model`, with the ``frozen_adapters`` loaded below it, all
    active in the forward pass and only the new one trainable. ``label``: the mode's name, for the log."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")
    if frozen_adapters:
        names = [f"frozen{i}" for i in range(len(frozen_adapters))]
        model = PeftModel.from_pretrained(model, frozen_adapters[0], adapter_name=names[0], is_trainable=False)
        for name, adapter in zip(names[1:], frozen_adapters[1:]):
            model.load_adapter(adapter, adapter_name=name, is_trainable=False)
        model.add_adapter("default", cfg)
        model.base_model.set_adapter(names + ["default"])  # all active in the forward pass
        for n, p in model.named_parameters():
            p.requires_grad = ".default." in n and "lora_" in n
    else:
        model = get_peft_model(model, cfg)
    if uses_torch_autocast(ds_config):
        skip_adapter_input_casts(model)
    # under ZeRO-3 the adapters' weights may be partitioned: only their own modules gather them
    if zero_stage(ds_config) != 3:
        fuse_lora_forward(model)
    n_train = param_count(p for p in model.parameters() if p.requires_grad)
    log.info("%s r=%d alpha=%d on %s: %d trainable parameters%s", label, lora.r, lora.alpha,
             ",".join(lora.target_modules), n_train,
             f" (+{len(frozen_adapters)} frozen adapter(s))" if frozen_adapters else "")
    return model


def load_4bit(path: str, dtype: torch.dtype, ds_config: Optional[Dict[str, Any]] = None, **kwargs):
    """A QLoRA base: the model at `path` with NF4 linear layers (``quantization_config``) computing in `dtype`
    on every device (``keep_4bit_compute_dtype``). `kwargs` go to ``from_pretrained`` (a device_map, say)."""
    from transformers import AutoModelForCausalLM

    q = quantization_config(dtype, ds_config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=q, **kwargs)
    keep_4bit_compute_dtype(model)
    return model


def keep_4bit_compute_dtype(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on their training kernels on CPU (returns how many layers).

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight in place at its first forward
    in eval mode without gradients, for a bf16 inference kernel (``gemv_4bit``); every later forward on the CPU,
    in training too, then takes that kernel, which has no backward: after one evaluation, QLoRA gradients of
    every layer below a 4-bit one are silently wrong (``tests/test_engine.py``), and evaluation itself computes
    in bf16 instead of the compute dtype training used. Off for every 4-bit layer of the model."""
    return _switch_off(model, "support_avx512bf16_for_cpu")


def skip_adapter_input_casts(model: torch.nn.Module) -> int:
    """Under torch autocast, let PEFT's LoRA layers take their input as it comes (returns how many layers).

    A LoRA layer casts its input to its adapters' dtype (fp32) before ``lora_A``, and autocast casts it straight
    back to bf16/fp16 for the matmul: two copies of every adapted activation in the forward pass and two of its
    gradient in the backward, the same values either way (a 16-bit value is exact in fp32). On an H100 these
    copies were about a fifth of an 8B LoRA step's kernel time (``aten::copy_``, docs/benchmarks.md).
    PEFT's 4-bit (QLoRA) layers already skip the cast under autocast."""
    return _switch_off(model, "cast_input_dtype_enabled")


def fuse_lora_forward(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear layer (16-bit or 4-bit base) a forward that adds its update in one GEMM:
    ``addmm(base(x), A(dropout(x)), B^T, alpha=scaling)`` instead of PEFT's ``base(x) + B(A(dropout(x))) * scaling``
    (returns how many layers).

    PEFT's form writes B's output, multiplies it by the scaling and adds it to the base output: three passes over
    a [tokens, out_features] activation in the forward pass and a fourth (the scaling's gradient) in the backward,
    and its 4-bit layers copy the base output first. Each pass is as large as the layer's output, for an update of
    rank r; the GEMM adds the update in its epilogue. The same function of the same weights (``tests/test_engine.py``:
    losses and adapter gradients equal to PEFT's); layers or calls outside the plain case (adapters disabled or
    merged, DoRA or other variants, a LoRA bias, per-example adapter names, dtypes that would need a cast
    without autocast) run PEFT's own forward. Saved adapters, merging and PEFT's API are unchanged."""
    import types

    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    kinds = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit
        kinds.append(Linear4bit)
    except (ImportError, AttributeError):
        pass
    n = 0
    for m in model.modules():
        if isinstance(m, tuple(kinds)) and "forward" not in vars(m):
            # the adapters the fused form can serve, fixed when they are created (PEFT's variants, lora bias, kind)
            m._remix_fusable = frozenset(a for a in m.lora_A if a not in m.lora_variant and m.lora_B[a].bias is None
                                         and isinstance(m.lora_A[a], torch.nn.Linear))
            m.forward = types.MethodType(_fused_lora_forward, m)
            n += 1
    return n


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [a for a in self.active_adapters if a in self.lora_A]   # as PEFT: adapters this layer has
    if args or kwargs or self.disable_adapters or self.merged or not names \
            or not all(a in self._remix_fusable for a in names):
        return type(self).forward(self, x, *args, **kwargs)   # PEFT's own
    pairs = [(self.lora_A[a], self.lora_B[a].weight) for a in names]
    if not torch.is_autocast_enabled(x.device.type) and any(x.dtype != A.weight.dtype or x.dtype != w.dtype
                                                            for A, w in pairs):
        return type(self).forward(self, x, *args, **kwargs)   # PEFT casts between dtypes
    result = self.base_layer(x)
    shape = result.shape
    out = result if result.dim() == 2 else result.reshape(-1, shape[-1])
    for a, (A, w) in zip(names, pairs):
        drop = self.lora_dropout[a]
        h = A(x if type(drop) is torch.nn.Identity else drop(x))   # lora_dropout 0 is an Identity: no module call
        out = torch.addmm(out, h if h.dim() == 2 else h.reshape(-1, h.shape[-1]), w.t(), alpha=self.scaling[a])
    if out.dtype != result.dtype:   # autocast's dtype where the base computes in another (PEFT keeps the base's)
        out = out.to(result.dtype)
    return out if len(shape) == 2 else out.view(shape)


def _switch_off(model: torch.nn.Module, flag: str) -> int:
    """Set the boolean attribute `flag` to False on every submodule that has it; how many had it."""
    n = 0
    for m in model.modules():
        if hasattr(m, flag):
            setattr(m, flag, False)
            n += 1
    return n


def release_zero3(keep: Any) -> None:
    """Stop transformers from constructing later models under zero.Init."""
    if keep is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()


def load_for_eval(path: str, dtype: torch.dtype, device: torch.device, base: Optional[str] = None,
                  adapters: Sequence[str] = ()):
    """A full model directory; or base + adapter (an adapter directory at `path`, its base from its own
    record unless `base` is given); or `path` as base with a stack of `adapters`, all active."""
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(path):
        from peft import PeftConfig

        base = base or PeftConfig.from_pretrained(path).base_model_name_or_path
        path, adapters = base, [path] + list(adapters)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapters:
        from peft import PeftModel

        names = [f"a{i}" for i in range(len(adapters))]
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            model.load_adapter(adapter, adapter_name=name)
        model.base_model.set_adapter(names)
    return model.to(device).eval()


def merge_adapter(base: str, adapter: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Merge a LoRA adapter into its base on CPU and save a safetensors HF directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok = load_tokenizer(adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base)
    atomic_save(out_dir, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True), tok.save_pretrained(tmp)))
    return out_dir
