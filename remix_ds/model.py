"""Loading a base model for training (full or LoRA) or for evaluation, and merging adapters."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .config import LoraSpec
from .engine import atomic_save, zero_stage

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_for_training(path: str, finetune: str, lora: LoraSpec, ds_config: Dict[str, Any], dtype: torch.dtype
                      ) -> Tuple[torch.nn.Module, Any]:
    """The model to hand to DeepSpeed, and an object to keep alive while the engine lives.

    Under ZeRO-3 the weights are loaded partitioned (``zero.Init`` through HfDeepSpeedConfig), so a
    large model never materialises whole on one device.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, cfg)
        n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                      for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d alpha=%d on %s: %d trainable parameters", lora.r, lora.alpha,
                 ",".join(lora.target_modules), n_train)
    return model, keep


def release_zero3(keep: Any) -> None:
    """Stop transformers from constructing later models under zero.Init."""
    if keep is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()


def load_for_eval(path: str, dtype: torch.dtype, device: torch.device, base: Optional[str] = None):
    """A full model directory, or base + adapter (adapter directory at `path`, base from its config)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(path):
        from peft import PeftConfig, PeftModel

        base = base or PeftConfig.from_pretrained(path).base_model_name_or_path
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
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
