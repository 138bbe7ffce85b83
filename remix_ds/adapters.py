"""Merging LoRA adapters into their base: in memory (PEFT) or streaming, shard by shard.

The streaming merge reads the base's safetensors shards one at a time, adds ``scale * B @ A`` (computed
in fp32) to each adapted weight and writes the shard, so peak memory is about one shard plus the adapter,
not the whole model. For a QLoRA adapter (``nf4=True``), every weight that was 4-bit during training is
first quantised to NF4 and dequantised back (bitsandbytes, with the same block size and double
quantisation), so the adapter is merged into exactly the weights it was trained against, in 16 bits —
never into 4-bit weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .files import atomic_save
from .errors import ConfigError
from .model import is_adapter_dir

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
log = logging.getLogger(__name__)
NF4_MODULES = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def local_model_dir(path: str) -> str:
    """A local directory for a model: the path itself, or the hub cache's snapshot of a hub id."""
    if os.path.isdir(path):
        return path
    from .data.hub import check_hub_model
    check_hub_model(path)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, unknown id, ...
        raise ConfigError(f"model {path!r}: not a local directory and not available from the hub ({e}); "
                          f"download it and give its local path") from None


def pattern_value(pattern: Dict[str, float], module: str, default: float) -> float:
    """A module's rank or alpha under a PEFT ``rank_pattern`` / ``alpha_pattern``, by PEFT's own rule
    (``peft.utils.other.get_pattern_key``, as LoraModel._create_and_replace applies it): the first key, in the
    config's order, that matches the end of the module's path as a regex after a dot or at its start (a bare
    name ``q_proj``, a dotted suffix ``self_attn.q_proj``, the full path ``model.layers.0.self_attn.q_proj`` or a
    regex ``.*layers\\.0\\..*q_proj``). ``module`` is the path in the base model (no ``base_model.model.``)."""
    if not pattern:
        return default
    key = module
    for pat in pattern:
        if re.match(rf"(.*\.)?({pat})$", module):
            key = pat
            break
    return pattern.get(key, default)


def _adapter_tensors(adapter_dir: str) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]]:
    if not is_adapter_dir(adapter_dir):
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    if cfg.get("use_dora"):
        raise ConfigError(f"{adapter_dir}: DoRA adapters are not supported by the streaming merge")
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors")
    sd = load_file(path)
    pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for key, a in sd.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ConfigError(f"{adapter_dir}: unsupported adapter tensor {key!r} (only LoRA A/B are merged)")
            continue
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        module = re.sub(r"^base_model\.model\.", "", key.split(".lora_A.")[0])   # the path in the base model
        base_key = module + ".weight"
        rr, aa = pattern_value(cfg.get("rank_pattern") or {}, module, r), \
            pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
        scale = aa / (rr ** 0.5) if cfg.get("use_rslora") else aa / rr
        pairs[base_key] = (a, b, scale)
    if not pairs:
        raise ConfigError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return cfg, pairs


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The weight as a bitsandbytes NF4 layer (double quantisation) sees it, dequantised to w's dtype."""
    import bitsandbytes.functional as bnbf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, state = bnbf.quantize_4bit(w.to(dev), blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(q, state, quant_type="nf4").to("cpu", w.dtype)


def normal_permissions(directory: str) -> None:
    """Files as the user's umask makes them (0644 under the usual 022): safetensors writes 0600 files."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)


def _shards(base_dir: str):
    index = os.path.join(base_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
        return files, index
    if os.path.isfile(os.path.join(base_dir, "model.safetensors")):
        return ["model.safetensors"], None
    raise ConfigError(f"{base_dir}: no safetensors weights (model.safetensors or an index) found")


def streaming_merge(base_dir: str, adapter_dir, out_dir: str, dtype: Optional[torch.dtype] = None,
                    nf4: bool = False, nf4_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Merge shard by shard; returns {'merged': n, 'shards': n, 'peak_rss_gib': x}.

    ``nf4``: the adapter was trained on the NF4-quantised base (QLoRA): each projection weight is cast to
    ``nf4_dtype`` (the dtype the base was loaded in for training: bitsandbytes quantised that, not the file's
    dtype) and put through the same NF4 round trip before the adapter goes in."""
    if not os.path.isdir(base_dir):
        raise ConfigError(f"base {base_dir!r}: not a local model directory")
    if is_adapter_dir(base_dir):
        raise ConfigError(f"base {base_dir!r} is an adapter directory: give the base model first, then the adapter")
    adapter_dirs = [adapter_dir] if isinstance(adapter_dir, (str, os.PathLike)) else list(adapter_dir)
    pairs: Dict[str, list] = {}
    for i, ad in enumerate(adapter_dirs):
        cfg, tensors = _adapter_tensors(str(ad))
        recorded = cfg.get("base_model_name_or_path")
        if i == 0 and recorded and os.path.isdir(recorded) and os.path.realpath(recorded) != os.path.realpath(base_dir):
            log.warning("%s was trained on %s, not on %s: merging into another base than its own", ad, recorded,
                        base_dir)
        for key, pair in tensors.items():
            pairs.setdefault(key, []).append(pair)
    adapter_dir = str(adapter_dirs[-1])
    files, index = _shards(base_dir)
    merged = 0

    def write(tmp: str) -> None:
        nonlocal merged
        for name in files:
            out: Dict[str, torch.Tensor] = {}
            with safe_open(os.path.join(base_dir, name), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    w = f.get_tensor(key)
                    target = dtype or w.dtype
                    if nf4 and NF4_MODULES.search(key):
                        w = nf4_roundtrip(w.to(nf4_dtype or w.dtype))
                    elif nf4 and w.dim() == 2 and not re.search(r"embed|lm_head", key):
                        raise ConfigError(f"{base_dir}: {key} is neither a Llama-style projection (q/k/v/o, "
                                          f"gate/up/down) nor an embedding: the QLoRA merge would leave it "
                                          f"unquantised; merge this architecture with merge: false")
                    if key in pairs:
                        acc = w.float()
                        for a, b, scale in pairs.pop(key):
                            acc = acc + scale * (b.float() @ a.float())
                        w = acc.to(target)
                        merged += 1
                    else:
                        w = w.to(target)
                    out[key] = w.contiguous()
            save_file(out, os.path.join(tmp, name), metadata={**meta, "format": "pt"})
            del out
        if pairs:
            raise ConfigError(f"{adapter_dir}: adapter weights for {sorted(pairs)[0]} (and {len(pairs) - 1} more) "
                              f"have no matching base weight in {base_dir}")
        if index:
            shutil.copy(index, os.path.join(tmp, os.path.basename(index)))
        for fname in COPY_FILES:
            src = os.path.join(adapter_dir, fname) if fname.startswith("tokenizer") and \
                os.path.isfile(os.path.join(adapter_dir, fname)) else os.path.join(base_dir, fname)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(tmp, fname))
        if dtype is not None:
            cfg_path = os.path.join(tmp, "config.json")
            cfg = json.load(open(cfg_path))
            cfg["dtype"] = str(dtype).replace("torch.", "")
            cfg.pop("quantization_config", None)
            json.dump(cfg, open(cfg_path, "w"), indent=2)

    atomic_save(out_dir, lambda tmp: (write(tmp), normal_permissions(tmp)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"merged": merged, "shards": len(files), "peak_rss_gib": round(peak, 3)}
