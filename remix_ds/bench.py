"""Benchmark: remix_ds's own training step against a plain PyTorch/PEFT loop, evaluation and padding.

One run of ``python launch/bench.py --shape SHAPE`` measures, on the same model shape, batch and precision:

- ``train``: the stage's real code path (``load_for_training`` + ``resolve_ds_config`` + ``Engine`` +
  ``batching.global_step``, exactly as ``stage.StageRun`` builds them) against a plain loop (model on
  the device, torch AdamW (fused on CUDA), bf16 autocast with fp32 master weights for full fine-tuning
  on a GPU, a bf16 base with PEFT's fp32 adapters for LoRA, fp32 on CPU; the same token-mean loss and
  gradient clipping). Tokens/s, padding-free tokens/s, step time, peak memory and the ratio to the
  plain loop of the same mode.
- ``eval``: questions/s of greedy generation (``evaluate.generate``) against teacher-forced scoring
  (``evaluate.teacher_forced_correct``) at the same batch size.
- ``padding``: KVR factoids mixed 1:1 with random-word passages (the demo recipe's REMIX shape),
  padding-free tokens/s of naive padded batching (pad to max_seq_length; pad to the longest of a
  random batch) against the stage's own batching (whatever ``stage`` does: ``global_step`` on the
  stage's batches), all on one engine, so that only the batching differs.

Shapes: ``tiny`` (the locally built tiny model, CPU), ``llama-1b`` and ``llama-8b`` (Llama-3.2-1B and
Llama-3-8B configurations with random bf16 weights written locally: nothing is downloaded).
Results append as JSON lines to ``--out``; a table is printed at the end.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .modes import MODES as MODE_BY_NAME, mode_of

log = logging.getLogger("remix_ds.bench")

BENCH_VERSION = 1
SHAPES: Dict[str, Optional[Dict[str, Any]]] = {
    "tiny": None,   # remix_ds.tiny.build_tiny()
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=500000.0, max_position_embeddings=131072),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                     rope_theta=500000.0, max_position_embeddings=131072),
}
MODES = tuple(MODE_BY_NAME)   # full, lora, qlora (remix_ds.modes)
PLAIN = "plain"
# What each mode's target ratio to the plain loop is (issue: LoRA/QLoRA >= 1.0x, full >= 0.9x).
TRAIN_TARGET = {"full": 0.9, "lora": 1.0, "qlora": 1.0}
EVAL_TARGET = 7.0
PADDING_TARGET = 2.0
LR = {"full": 1e-5, "lora": 1e-4, "qlora": 1e-4}
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
DEFAULT_CASES = {
    "tiny": "full:zero2,full:zero3,lora:zero2,lora:zero3,qlora:zero2,eval,padding",
    "llama-1b": "full:zero2,full:zero3,lora:zero2,eval,padding",
    "llama-8b": "lora:zero2,lora:zero3,qlora:zero2,eval",
}


# ------------------------------------------------------------------ small helpers

def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sync(device: torch.device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


GIB = float(1 << 30)


class PeakMemory:
    """Peak memory of one case: torch.cuda.max_memory_allocated on a GPU, sampled process RSS on CPU.

    On CPU, RSS (psutil, sampled every 10 ms) counts the whole process, so every case also carries the
    resident baseline it started from; ``ru_maxrss`` is the process's lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def metric(self) -> str:
        return "torch.cuda.max_memory_allocated" if _is_cuda(self.device) else "process RSS (psutil, sampled)"

    def _rss(self) -> int:
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except Exception:  # psutil missing: fall back to the lifetime peak
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        _free(self.device)
        if _is_cuda(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()

            def sample():
                while not self._stop.wait(0.01):
                    self.peak = max(self.peak, self._rss())
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def read(self) -> int:
        if _is_cuda(self.device):
            return torch.cuda.max_memory_allocated(self.device)
        self.peak = max(self.peak, self._rss())
        return self.peak

    def __exit__(self, *exc):
        self.read()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def fields(self) -> Dict[str, Any]:
        out = {"peak_mem_gib": round(self.read() / GIB, 3), "mem_baseline_gib": round(self.base / GIB, 3),
               "mem_metric": self.metric}
        if not _is_cuda(self.device):
            out["ru_maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
        return out


def environment(device: torch.device) -> Dict[str, Any]:
    import transformers

    env: Dict[str, Any] = {"device": device.type, "host": platform.node(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__}
    from importlib import metadata
    for name in ("deepspeed", "peft", "accelerate", "bitsandbytes"):   # read, not imported
        try:
            env[name] = metadata.version(name)
        except Exception:
            env[name] = None
    if _is_cuda(device):
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
        env["cudnn"] = torch.backends.cudnn.version()
        # torch puts cuDNN attention first on sm90/sm100 with a recent cuDNN unless told not to (sdp_utils.cpp)
        env["sdpa_env"] = {k: os.environ[k] for k in ("TORCH_CUDNN_SDPA_DEPRIORITIZED", "TORCH_CUDNN_SDPA_PREFERRED")
                           if k in os.environ}
    else:
        env["device_name"] = platform.processor() or platform.machine()
    try:
        import subprocess
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10
                                           ).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    return env


# ------------------------------------------------------------------ models

def tokenizer_for_random_models():
    """The tiny model's tokenizer (trained locally in a second): ids < 512 are valid in any Llama vocab."""
    from .config import TinySpec
    from .tiny import train_tokenizer

    return train_tokenizer(TinySpec())


def write_random_llama(out_dir: str, config_kwargs: Dict[str, Any], seed: int = 0,
                       shard_bytes: int = 2 << 30) -> str:
    """A Llama directory with random bf16 weights, written tensor by tensor (never the whole model in memory).

    Weights are N(0, 0.02) (norms 1), drawn on the GPU when there is one. The directory has the
    config, safetensors shards with an index, and the tiny tokenizer: ``from_pretrained`` loads it.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = tokenizer_for_random_models()
    cfg = LlamaConfig(**config_kwargs, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    specs = [(n, tuple(t.shape)) for n, t in meta.state_dict().items()
             if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    del meta
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, 0.02, generator=gen).cpu()
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(tmp / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    with open(tmp / "remix_bench.json", "w") as f:
        json.dump({"version": BENCH_VERSION, "config": config_kwargs, "seed": seed, "bytes": total}, f, indent=2)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def model_path(shape: str, model_dir: Optional[str] = None) -> str:
    """The HF directory for a shape: the tiny model, or random Llama weights cached under REMIX_DS_CACHE."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if SHAPES[shape] is None:
        from .tiny import build_tiny
        return build_tiny(out_dir=model_dir) if model_dir else build_tiny()
    from filelock import FileLock

    from .config import stage_hash
    from .tiny import cache_root

    out = Path(model_dir) if model_dir else \
        cache_root() / f"bench-{shape}-{stage_hash({'cfg': SHAPES[shape], 'v': BENCH_VERSION})[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "remix_bench.json").exists():
            t0 = time.time()
            log.info("writing random %s weights to %s", shape, out)
            write_random_llama(str(out), SHAPES[shape])
            log.info("wrote %s in %.1fs", out, time.time() - t0)
    return str(out)


# ------------------------------------------------------------------ data

def fixed_length_batches(n_batches: int, batch: int, seq: int, vocab: int, seed: int):
    """Global batches of Encoded examples, each exactly `seq` tokens (the last quarter is the answer)."""
    from .data.formatting import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    n_answer = max(1, seq // 4)
    out = []
    for b in range(n_batches):
        ids = torch.randint(5, vocab, (batch, seq), generator=g).tolist()
        out.append([Encoded(input_ids=row, labels=[IGNORE] * (seq - n_answer) + row[seq - n_answer:],
                            index=b * batch + i) for i, row in enumerate(ids)])
    return out


def mixed_examples(n: int, seed: int, ratio: float = 1.0, words: int = 8):
    """KVR factoids mixed with random-word passages, `ratio` passages per factoid (a recipe's mix.ratio), each
    `words` + `words` words (default: the demo recipe's mixing shape, 1:1 and 8 + 8 words)."""
    from .data.kvr import kvr_examples
    from .data.mixing import random_word_examples

    n_mix = int(round(n * ratio / (1.0 + ratio)))
    return kvr_examples(n - n_mix, seed, "A") + random_word_examples(n_mix, seed, prompt_words=words,
                                                                     target_words=words)


# ------------------------------------------------------------------ one training case

class TrainCase:
    """Builds one model + optimizer and exposes ``step(chunk) -> loss_sum tensor`` and ``close()``."""

    processed_tokens = 0   # tokens the model ran on, padding included

    def step(self, chunk) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


def qlora_import_reason() -> Optional[str]:
    """Why QLoRA cannot run here, or None: bitsandbytes (>= 0.46 has CPU kernels) must import."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        return f"bitsandbytes is not importable: {e}"
    return None


def _has_4bit_layers(model: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _lora_config(lora):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")


class PlainCase(TrainCase):
    """A hand-written loop: model on the device, torch AdamW, autocast on a GPU, token-mean loss.

    On several processes it is the hand-written data-parallel loop: the model wrapped in torch's
    DistributedDataParallel, each rank running its share of the global batch (split as the stage splits
    unpacked batches), gradients averaged by DDP, the loss still the mean over the global batch's answer tokens.
    """

    def __init__(self, path: str, mode: str, lora, precision: str, device: torch.device, pad: int):
        from transformers import AutoModelForCausalLM

        from . import dist
        from .zero import torch_dtype

        self.device, self.pad = device, pad
        self.world, self.rank = dist.world_size(), dist.rank()
        dtype = torch_dtype(precision)
        cuda = _is_cuda(device)
        self.amp = cuda and precision in ("bf16", "fp16")
        self.amp_dtype = dtype
        kw: Dict[str, Any] = {}
        if cuda:
            kw["device_map"] = {"": device.index or 0}
        m = mode_of(mode)
        if not m.trains_adapter:
            load_dtype = torch.float32 if self.amp else dtype   # fp32 master weights under autocast
        else:
            load_dtype = dtype
        if m.quantized:
            from .model import quantization_config
            kw["quantization_config"] = quantization_config(dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, **kw)
        model.config.use_cache = False
        if m.trains_adapter:
            from peft import get_peft_model
            model = get_peft_model(model, _lora_config(lora))   # adapters in fp32 (PEFT's default)
        self.model = model.to(device) if "device_map" not in kw else model
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.model, device_ids=[device.index or 0] if cuda else None)
        self.opt = torch.optim.AdamW(self.params, lr=LR[mode], betas=BETAS, weight_decay=0.0,
                                     **({"fused": True} if cuda else {}))

    def step(self, chunk) -> torch.Tensor:
        from .data.formatting import collate
        from .objective import token_loss_sum
        from .batching import split_global_batch

        n_tok = sum(e.num_answer_tokens for e in chunk)
        if self.world > 1:   # this rank's share; DDP averages gradients, so scale the sum by world / N
            chunk = split_global_batch(chunk, self.world)[self.rank]
        batch = collate(chunk, self.pad)
        self.processed_tokens += batch["input_ids"].numel()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device), use_cache=False).logits
        loss_sum = token_loss_sum(logits, batch["labels"].to(self.device))
        (loss_sum * (self.world / n_tok)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum.detach()

    def close(self) -> None:
        del self.model, self.opt, self.params


class RemixCase(TrainCase):
    """The stage's own path: resolve_ds_config + engine.build_engine (as the stage builds its engine), stepped by
    batching.global_step."""

    def __init__(self, path: str, mode: str, lora, ds_config: str, precision: str, global_batch: int,
                 total_steps: int, pad: int, pack: int = 0, adapt: bool = True):
        from transformers import AutoConfig

        from . import batching, dist
        from .engine import build_engine
        from .zero import adapter_tensor_size, resolve_ds_config, torch_dtype

        self.batching, self.pad, self.pack = batching, pad, pack
        self.world, self.rank = dist.world_size(), dist.rank()
        self.micro, self.gas = batching.batch_plan(self.world, global_batch, None)
        dtype = torch_dtype(precision)
        mcfg = AutoConfig.from_pretrained(path)
        self.ds_cfg = resolve_ds_config(ds_config, global_batch_size=global_batch, micro_batch_size=self.micro,
                                        grad_accum=self.gas, grad_clip=GRAD_CLIP, precision=precision,
                                        hidden_size=mcfg.hidden_size, finetune=mode, adapt=adapt,
                                        adapter_tensor_size=adapter_tensor_size(lora.r, mcfg))
        self.eng = build_engine(path, mode, lora, self.ds_cfg, dtype, lr=LR[mode], betas=BETAS, weight_decay=0.0,
                                total_steps=total_steps, warmup_ratio=0.0)
        self.model = self.eng.module
        if mode_of(mode).quantized and not _has_4bit_layers(self.model):
            self.eng.close()
            raise _Skip("remix_ds.model.load_for_training('qlora') returned a model without 4-bit layers")
        self.device = self.eng.device

    def step(self, chunk) -> torch.Tensor:
        count = self.batching.TokenCount()   # the positions of whatever batches the stage builds (as a stage counts)
        loss = self.batching.global_step(self.eng, chunk, self.world, self.gas, self.rank, self.pad, self.pack, count)
        self.processed_tokens += count.ran
        return loss

    def close(self) -> None:
        self.eng.close()   # and transformers' ZeRO-3 loading off
        del self.eng, self.model


NO_CUDNN, TORCH_SDPA = "_no_cudnn", "_torch_sdpa"


class SdpaChoice(TrainCase):
    """Another case's steps with SDPA's backends chosen otherwise: `backends` for every attention (the engine's
    packed micro-batches included), or None for torch's own choice everywhere.

    A stage's packed micro-batches on CUDA train without cuDNN attention (``engine.packed_sdpa_backends``: cuDNN
    builds an execution graph per attention shape, and packed shapes change at nearly every step); padded ones
    take torch's choice, which on an H100/H200 with cuDNN >= 9.15 is cuDNN. Timed beside the case it wraps, in the
    same process, on the same engine and batches, this measures both choices for both batchings. Counts its own
    tokens and leaves the wrapped case's count alone, so the two can be timed interleaved."""

    def __init__(self, inner: TrainCase, engine, backends: Optional[list]):
        self.inner, self.engine, self.backends = inner, engine, backends

    def step(self, chunk) -> torch.Tensor:
        from .engine import sdpa_context

        before, saved = self.inner.processed_tokens, self.engine.packed_sdpa
        self.engine.packed_sdpa = self.backends
        try:
            with sdpa_context(self.backends):
                loss = self.inner.step(chunk)
        finally:
            self.engine.packed_sdpa = saved
        self.processed_tokens += self.inner.processed_tokens - before
        self.inner.processed_tokens = before   # the wrapped case's own count is its own steps'
        return loss


def _backend_names(backends: Optional[list]) -> str:
    return "torch's choice" if not backends else ", ".join(b.name for b in backends)


class _Skip(Exception):
    pass


def measure(runners: List[Tuple[TrainCase, List[Any]]], warmup: int, steps: int, device: torch.device,
            interleave: bool) -> List[Dict[str, Any]]:
    """Time `steps` optimizer steps of each runner (case, global batches) after `warmup` untimed ones.

    Sequential (the default on a GPU): one runner after the other, with one device sync at each end of
    a runner's timed steps and none in between. Interleaved (the default on CPU): step i of every
    runner, then step i+1 of every runner, each step timed on its own, so that load from other
    processes on a shared machine falls on all runners alike; medians are reported beside the means.
    """
    if not interleave:
        out = []
        for case, batches in runners:
            out.extend(_measure([(case, batches)], warmup, steps, device, False))
        return out
    return _measure(runners, warmup, steps, device, True)


def _measure(runners, warmup: int, steps: int, device: torch.device, each: bool) -> List[Dict[str, Any]]:
    n = len(runners)
    accs = [torch.zeros((), dtype=torch.float64, device=device) for _ in runners]
    for k, (case, batches) in enumerate(runners):
        for i in range(warmup):
            accs[k] += case.step(batches[i % len(batches)])
        _sync(device)
        case.processed_tokens = 0
    real, answer = [0] * n, [0] * n
    per_step: List[List[float]] = [[] for _ in runners]
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        for k, (case, batches) in enumerate(runners):
            chunk = batches[i % len(batches)]
            ts = time.perf_counter()
            accs[k] += case.step(chunk)
            if each:
                _sync(device)
                per_step[k].append(time.perf_counter() - ts)
            real[k] += sum(len(e.input_ids) for e in chunk)
            answer[k] += sum(e.num_answer_tokens for e in chunk)
    _sync(device)
    total = time.perf_counter() - t0
    from . import dist
    if dist.world_size() > 1:   # every rank returns and counts its own part: sum them (after the clock stops)
        for k, (case, _) in enumerate(runners):
            dist.all_reduce_sum(accs[k])
            case.processed_tokens = int(dist.all_reduce_sum(
                torch.tensor(float(case.processed_tokens), dtype=torch.float64, device=device)).item())
    out = []
    for k, (case, batches) in enumerate(runners):
        dt = sum(per_step[k]) if each else total
        n_answer = sum(e.num_answer_tokens for i in range(warmup + steps) for e in batches[i % len(batches)])
        loss = float(accs[k]) / max(1, n_answer)
        r = {"steps": steps, "warmup": warmup, "timing": "interleaved" if each else "sequential",
             "seconds": round(dt, 4), "step_time_s": round(dt / steps, 5),
             "tokens_per_s": round(case.processed_tokens / dt, 1), "padfree_tokens_per_s": round(real[k] / dt, 1),
             "answer_tokens_per_s": round(answer[k] / dt, 1), "processed_tokens": case.processed_tokens,
             "padfree_tokens": real[k], "mean_loss": round(loss, 4) if math.isfinite(loss) else str(loss)}
        if each:
            med = statistics.median(per_step[k])
            r["step_time_median_s"] = round(med, 5)
            r["tokens_per_s_median"] = round(case.processed_tokens / steps / med, 1)
            r["padfree_tokens_per_s_median"] = round(real[k] / steps / med, 1)
            best = min(per_step[k])
            r["step_time_min_s"] = round(best, 5)
            r["tokens_per_s_best"] = round(case.processed_tokens / steps / best, 1)
            r["step_times_s"] = [round(t, 4) for t in per_step[k]]
        out.append(r)
    return out


def profile_steps(case: "TrainCase", batches, steps: int, device: torch.device, path: str) -> str:
    """Run `steps` more steps under torch.profiler; write the operators by self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _is_cuda(device) else [])
    before = case.processed_tokens
    with profile(activities=acts, record_shapes=False) as prof:
        for i in range(steps):
            case.step(batches[i % len(batches)])
        _sync(device)
    case.processed_tokens = before
    key = "self_cuda_time_total" if _is_cuda(device) else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {steps} steps, operators sorted by {key}\n{table}\n")
    return path


def speed(r: Dict[str, Any], key: str = "tokens_per_s") -> float:
    """The tokens/s a ratio is taken on: the median step's when steps were timed one by one."""
    return r.get(f"{key}_median") or r[key]


# ------------------------------------------------------------------ the study's workload

STUDY_BATCH = 32             # the study's global batch (16 per GPU on 2 GPUs)
STUDY_FACTOIDS = 2000        # D_A: one epoch is 2,000 factoids, or 6,000 examples with mixing at ratio 2
STUDY_MIX_RATIO = 2.0
STUDY_PASSAGE_TOKENS = 165   # 50 + 50 random words are about 130-200 Llama-3 tokens with the chat template
STUDY_MODES = {"tiny": "full,lora,qlora", "llama-1b": "full", "llama-8b": "lora,qlora"}
# targets, as ratios in one run: remix_ds's time per D_A epoch over the plain loop's (at most), and on the 1:2 mix
# packed padding-free tokens/s over pad-to-longest's on the same engine (at least)
STUDY_EPOCH_TARGET = 1.0
STUDY_EPOCH_AIM = 0.7
STUDY_PACKING_TARGET = 1.3


def passage_words_for(tok, tokens: int, seed: int = 0, probe: int = 24) -> Tuple[int, float]:
    """Words per half (prompt, target) of a random-word passage whose encoding by `tok` is closest to `tokens`
    on average, and that average: the study's 50 + 50 words in Llama-3 tokens, in another tokenizer's."""
    from .data.formatting import encode_example
    from .data.mixing import random_word_examples

    best = (1, float("inf"))
    for w in range(1, 51):
        exs = random_word_examples(probe, seed, prompt_words=w, target_words=w)
        mean = sum(len(encode_example(tok, e).input_ids) for e in exs) / probe
        if abs(mean - tokens) < abs(best[1] - tokens):
            best = (w, mean)
        if mean > tokens:
            break
    return best


class RemixVariant(TrainCase):
    """A RemixCase's engine stepped by batching.global_step with other batching: `pack` (0: padded micro-batches,
    grouped by length as the stage pads), and `varlen` (False: packed rows with the 4-D block-diagonal mask).
    Counts its own tokens, so that it can be timed interleaved with the case it wraps."""

    def __init__(self, inner: "RemixCase", pack: int, varlen: bool):
        self.inner, self.pack, self.varlen = inner, pack, varlen

    def step(self, chunk) -> torch.Tensor:
        eng = self.inner.eng
        saved, before = (self.inner.pack, eng.packed_varlen), self.inner.processed_tokens
        self.inner.pack, eng.packed_varlen = self.pack, self.varlen and saved[1]
        try:
            loss = self.inner.step(chunk)
        finally:
            self.inner.pack, eng.packed_varlen = saved
        self.processed_tokens += self.inner.processed_tokens - before
        self.inner.processed_tokens = before
        return loss


# ------------------------------------------------------------------ the benchmark

class Bench:
    def __init__(self, args):
        from . import dist
        from .config import DEFAULT_TARGET_MODULES, LoraSpec
        from .zero import resolve_precision
        from .model import load_tokenizer
        from .data.formatting import pad_id_of

        self.args = args
        self.device = dist.device()
        self.world = dist.world_size()
        self.main = dist.is_main()
        self.precision = resolve_precision(args.precision)
        self.path = model_path(args.shape, args.model_dir)
        self.tok = load_tokenizer(self.path)
        self.pad = pad_id_of(self.tok)
        from transformers import AutoConfig
        self.vocab = AutoConfig.from_pretrained(self.path).vocab_size
        self.lora = LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0,
                             target_modules=list(DEFAULT_TARGET_MODULES))
        self.run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self.env = environment(self.device)
        self.interleave = args.timing == "interleaved" or (args.timing == "auto" and not _is_cuda(self.device))
        self.records: List[Dict[str, Any]] = []
        self.n_errors = 0

    # -------------------------------------------------------------- output
    def emit(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        full = {"bench_version": BENCH_VERSION, "run_id": self.run_id,
                "time": datetime.datetime.now().isoformat(timespec="seconds"), "shape": self.args.shape,
                "precision": self.precision, "batch": self.args.batch, "seq": self.args.seq,
                "world_size": self.world, "torch_threads": torch.get_num_threads(), **rec, "env": self.env}
        self.records.append(full)
        if rec.get("status") == "error":
            self.n_errors += 1
        if self.main:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "a") as f:
                f.write(json.dumps(full, default=str) + "\n")
            self.print_record(full)
        return full

    @staticmethod
    def _step_ms(r: Dict[str, Any]) -> float:
        return 1e3 * (r.get("step_time_median_s") or r["step_time_s"])

    def print_record(self, r: Dict[str, Any]) -> None:
        if r.get("status") != "ok":
            print(f"[bench] {r['bench']:8s} {r.get('case', ''):24s} {r['status']}: {r.get('reason', '')}", flush=True)
            return
        if r["bench"] in ("train", "padding"):
            extra = ""
            if r.get("ratio_tokens_per_s"):
                extra = f"  x{r['ratio_tokens_per_s']:.3f} vs plain"
            if r.get("ratio_vs_naive_longest"):
                extra = (f"  x{r['ratio_vs_naive_longest']:.3f} vs pad-to-longest, "
                         f"x{r['ratio_vs_naive_dataset_longest']:.3f} vs pad-to-dataset-longest, "
                         f"x{r['ratio_vs_naive_max_length']:.3f} vs pad-to-max")
            if "pad_fraction" in r:
                extra = f"  padding {r['pad_fraction'] * 100:.0f}%" + extra
            print(f"[bench] {r['bench']:8s} {r['case']:24s} {speed(r):>10,.0f} tok/s "
                  f"{speed(r, 'padfree_tokens_per_s'):>10,.0f} pad-free tok/s {self._step_ms(r):>9.1f} ms/step "
                  f"peak {r['peak_mem_gib']:.2f} GiB{extra}", flush=True)
        elif r["bench"] == "study":
            extra = "".join(f"  {k.replace('ratio_', '')} x{r[k]:.3f}" for k in
                            ("ratio_epoch_time_vs_plain", "ratio_padfree_vs_plain", "ratio_padfree_vs_padded") if k in r)
            print(f"[bench] study    {r['case']:34s} {r['seconds_per_epoch']:>9.2f} s/epoch "
                  f"{speed(r, 'padfree_tokens_per_s'):>10,.0f} pad-free tok/s padding {r['pad_fraction'] * 100:.0f}%"
                  f"{extra}", flush=True)
        elif r["bench"] == "eval":
            print(f"[bench] eval     {r['case']:24s} generate {r['generate_questions_per_s']:,.1f} q/s, "
                  f"teacher-forced {r['teacher_forced_questions_per_s']:,.1f} q/s: x{r['ratio']:.2f}", flush=True)

    # -------------------------------------------------------------- train
    def _skip_reason(self, mode: str, config: str) -> Optional[str]:
        if mode_of(mode).quantized:
            reason = qlora_import_reason()
            if reason:
                return reason
        if config == PLAIN and self.world > 1 and mode_of(mode).quantized:
            return "the plain data-parallel loop (DDP) is not run over 4-bit layers"
        return None

    def _open(self, mode: str, config: str, rec: Dict[str, Any]) -> TrainCase:
        a = self.args
        reason = self._skip_reason(mode, config)
        if reason:
            raise _Skip(reason)
        t0 = time.perf_counter()
        if config == PLAIN:
            case: TrainCase = PlainCase(self.path, mode, self.lora, self.precision, self.device, self.pad)
        else:
            from .zero import uses_torch_autocast, zero_stage
            case = RemixCase(self.path, mode, self.lora, config, self.precision, a.batch, a.warmup + a.steps,
                             self.pad, adapt=not a.no_adapt_zero)
            rec.update({"zero_stage": zero_stage(case.ds_cfg), "micro_batch": case.micro,
                        "grad_accum": case.gas, "adapt_zero": not a.no_adapt_zero,
                        "torch_autocast": uses_torch_autocast(case.ds_cfg)})
        rec["setup_s"] = round(time.perf_counter() - t0, 2)
        return case

    def _close(self, case: Optional[TrainCase]) -> None:
        if case is not None:
            try:
                case.close()
            except Exception:
                traceback.print_exc()
        _free(self.device)

    @staticmethod
    def _failed(rec: Dict[str, Any], e: BaseException) -> None:
        if isinstance(e, _Skip):
            rec.update({"status": "skipped", "reason": str(e)})
        else:   # keep going: one failed case (an OOM, say) must not lose the others
            rec.update({"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]})
            traceback.print_exc()

    def _train_record(self, mode: str, config: str) -> Dict[str, Any]:
        return {"bench": "train", "case": f"{mode}:{config}", "mode": mode,
                "impl": PLAIN if config == PLAIN else "remix_ds", "ds_config": None if config == PLAIN else config,
                "lora_r": self.lora.r if mode_of(mode).trains_adapter else None}

    def run_train(self, mode: str, configs: List[str]) -> None:
        """The plain loop of `mode`, then each DeepSpeed config of it, each with its ratio to the plain loop.

        Interleaved (CPU): the plain model stays loaded and is stepped in turn with each config's engine.
        """
        a = self.args
        batches = fixed_length_batches(min(a.warmup + a.steps, 8), a.batch, a.seq, self.vocab, a.seed)
        ds_configs = [c for c in configs if c != PLAIN]
        want_plain = PLAIN in configs or bool(ds_configs)
        pair = self.interleave and bool(ds_configs)
        plain_rec: Optional[Dict[str, Any]] = None
        plain_profile: Optional[str] = None
        plain_case: Optional[TrainCase] = None
        if want_plain:
            plain_rec = self._train_record(mode, PLAIN)
            try:
                with PeakMemory(self.device) as mem:
                    plain_case = self._open(mode, PLAIN, plain_rec)
                    if pair:   # timed below, in turn with each engine; warm up here for its memory
                        for i in range(a.warmup):
                            plain_case.step(batches[i % len(batches)])
                    else:
                        plain_rec.update(measure([(plain_case, batches)], a.warmup, a.steps, self.device,
                                                 self.interleave)[0])
                    plain_rec.update(mem.fields())
                plain_rec["status"] = "ok"
                if a.profile and not pair and ds_configs:   # profiled now: it is closed before the engines open
                    plain_profile = profile_steps(plain_case, batches, a.profile, self.device,
                                                  f"{os.path.splitext(a.out)[0]}.profile-{a.shape}-{mode}-plain.txt")
                    plain_rec["profile_file"] = plain_profile
            except Exception as e:
                self._failed(plain_rec, e)
                self._close(plain_case)
                plain_case = None
            if not pair or plain_case is None:
                self._close(plain_case)
                plain_case = None
                self.emit(plain_rec)
        for cfg in ds_configs:
            rec = self._train_record(mode, cfg)
            case: Optional[TrainCase] = None
            ref = plain_rec
            try:
                with PeakMemory(self.device) as mem:
                    case = self._open(mode, cfg, rec)
                    if plain_case is not None:
                        r_plain, r = measure([(plain_case, batches), (case, batches)], a.warmup, a.steps,
                                             self.device, True)
                        ref = self.emit({**plain_rec, **r_plain, "paired_with": cfg})
                    else:
                        r = measure([(case, batches)], a.warmup, a.steps, self.device, self.interleave)[0]
                    rec.update(r)
                    rec.update(mem.fields())
                    if plain_case is not None:
                        rec["mem_metric"] += " (the plain model resident too: interleaved)"
                rec["status"] = "ok"
                if a.profile:
                    stem = os.path.splitext(a.out)[0]
                    rec["profile_file"] = profile_steps(case, batches, a.profile, self.device,
                                                        f"{stem}.profile-{a.shape}-{mode}-{cfg}.txt")
                    if plain_case is not None and plain_profile is None:   # the plain loop's, once per mode
                        plain_profile = profile_steps(plain_case, batches, a.profile, self.device,
                                                      f"{stem}.profile-{a.shape}-{mode}-plain.txt")
                    if plain_profile is not None:
                        rec["plain_profile_file"] = plain_profile
                if ref and ref.get("status") == "ok":
                    rec["ratio_tokens_per_s"] = round(speed(rec) / speed(ref), 4)
                    rec["ratio_basis"] = "median step" if "tokens_per_s_median" in rec else "mean step"
                    if "tokens_per_s_best" in rec and "tokens_per_s_best" in ref:
                        rec["ratio_tokens_per_s_best"] = round(rec["tokens_per_s_best"] / ref["tokens_per_s_best"], 4)
                    if plain_case is None:
                        rec["ratio_peak_mem"] = round(rec["peak_mem_gib"] / max(1e-9, ref["peak_mem_gib"]), 4)
                    rec["target_ratio"] = TRAIN_TARGET[mode]
                    rec["meets_target"] = rec["ratio_tokens_per_s"] >= TRAIN_TARGET[mode]
            except Exception as e:
                self._failed(rec, e)
            finally:
                self._close(case)
                del case
            self.emit(rec)
        if plain_case is not None:
            self._close(plain_case)

    # -------------------------------------------------------------- eval
    def run_eval(self) -> None:
        from .data.kvr import kvr_examples
        from .zero import torch_dtype
        from .evaluate import (default_max_new_tokens, encode_for_scoring, generate, model_predict_fn,
                               teacher_forced_correct)
        from .model import load_for_eval

        a = self.args
        n = a.eval_questions or 2 * a.batch
        rec: Dict[str, Any] = {"bench": "eval", "case": "eval:generate-vs-teacher-forced", "eval_batch": a.batch,
                               "questions": n}
        model = None
        try:
            with PeakMemory(self.device) as mem:
                model = load_for_eval(self.path, torch_dtype(self.precision), self.device)
                examples = kvr_examples(n, a.seed + 1, "B")
                prompts = [ex.prompt for ex in examples]
                max_new = default_max_new_tokens(self.tok, examples)
                enc = encode_for_scoring(self.tok, examples)
                logits_fn = model_predict_fn(model, self.device)
                generate(model, self.tok, prompts[:a.batch], a.batch, max_new, self.device)       # warm-up
                teacher_forced_correct(logits_fn, enc[:a.batch], a.batch, self.pad)
                _sync(self.device)
                # batch by batch, the two scorers in turn on the same questions (fair under outside load)
                t_gen = t_tf = 0.0
                preds: List[str] = []
                oks = []
                for j in range(0, n, a.batch):
                    t0 = time.perf_counter()
                    preds += generate(model, self.tok, prompts[j:j + a.batch], a.batch, max_new, self.device)
                    _sync(self.device)
                    t_gen += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    oks.append(teacher_forced_correct(logits_fn, enc[j:j + a.batch], a.batch, self.pad))
                    _sync(self.device)
                    t_tf += time.perf_counter() - t0
                ok = torch.cat(oks)
                rec.update(mem.fields())
            gen_em = sum(p.strip().lower() == ex.answer.lower() for p, ex in zip(preds, examples)) / n
            rec.update({"status": "ok", "max_new_tokens": max_new, "generate_seconds": round(t_gen, 4),
                        "teacher_forced_seconds": round(t_tf, 4),
                        "generate_questions_per_s": round(n / t_gen, 2),
                        "teacher_forced_questions_per_s": round(n / t_tf, 2), "ratio": round(t_gen / t_tf, 3),
                        "target_ratio": EVAL_TARGET, "meets_target": t_gen / t_tf >= EVAL_TARGET,
                        "generate_exact_match": gen_em,
                        "teacher_forced_exact_match": float(ok.float().mean()) if ok.numel() else 0.0})
        except Exception as e:
            rec.update({"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]})
            traceback.print_exc()
        finally:
            del model
            _free(self.device)
        self.emit(rec)

    # -------------------------------------------------------------- padding
    def _sdpa_variants(self) -> bool:
        a = self.args.padding_sdpa_variants
        return _is_cuda(self.device) if a == "auto" else a == "on"

    def run_padding(self) -> None:
        from . import batching
        from .data.formatting import collate, encode_examples

        a = self.args
        G, n_steps = a.batch, a.warmup + a.steps
        examples = mixed_examples(G * n_steps, a.seed, a.padding_mix_ratio, a.padding_words)
        max_seq = a.max_seq
        if max_seq is None:
            longest = max(len(e.input_ids) for e in encode_examples(self.tok, examples, 10 ** 9)[0])
            max_seq = 64 * math.ceil(longest / 64)
        enc, dropped = encode_examples(self.tok, examples, max_seq, what="bench padding set")
        lens = sorted(len(e.input_ids) for e in enc)
        kvr_l = [len(e.input_ids) for e, ex in zip(enc, examples) if ex.role != "mix"]
        base = {"bench": "padding", "mode": a.padding_mode, "ds_config": a.padding_config,
                "packing": not a.no_packing, "mix_ratio": a.padding_mix_ratio, "passage_words": a.padding_words,
                "max_seq_length": max_seq, "n_examples": len(enc), "n_dropped": dropped,
                "length_min": lens[0], "length_median": lens[len(lens) // 2], "length_max": lens[-1],
                "length_mean": round(sum(lens) / len(lens), 1),
                "factoid_length_mean": round(sum(kvr_l) / max(1, len(kvr_l)), 1),
                "mix_length_mean": round((sum(lens) - sum(kvr_l)) / max(1, len(lens) - len(kvr_l)), 1)}
        # the global batches of a stage's first epoch (batching.epoch_order, sliced as the stage slices it): every
        # batching below deals the same ones
        order = batching.epoch_order(len(enc), a.seed, 1, 0)
        batches = [[enc[i] for i in order[s * G:(s + 1) * G]] for s in range(len(enc) // G)]
        case: Optional[RemixCase] = None
        results: Dict[str, Dict[str, Any]] = {}
        try:
            pack = 0 if a.no_packing else max_seq    # what `packing: true` does in a stage
            case = RemixCase(self.path, a.padding_mode, self.lora, a.padding_config, self.precision, G,
                             3 * n_steps, self.pad, pack)

            class Naive(TrainCase):
                """A naive loop on the same engine: one padded micro-batch, then the optimizer step."""

                def __init__(self, remix: RemixCase, pad_to: Optional[int]):
                    self.remix, self.pad_to = remix, pad_to

                def step(self, chunk) -> torch.Tensor:
                    world, rank = self.remix.world, self.remix.rank
                    n_tok = sum(e.num_answer_tokens for e in chunk)
                    # several ranks: each its share of the random batch, the gradients averaged by DeepSpeed
                    batch = collate(chunk[rank::world], self.remix.pad, pad_to=self.pad_to)
                    self.processed_tokens += batch["input_ids"].numel()
                    loss = self.remix.eng.micro_step(batch, world / n_tok)
                    self.remix.eng.step()
                    return loss

            runs = [("naive_max_length", Naive(case, max_seq), batches,
                     f"random batches, every sequence padded to max_seq_length={max_seq}"),
                    ("naive_dataset_longest", Naive(case, lens[-1]), batches,
                     f"random batches, every sequence padded to the longest of the dataset ({lens[-1]}): the "
                     f"study's own batching"),
                    ("naive_longest", Naive(case, None), batches,
                     "random batches, padded to the longest sequence of the batch"),
                    ("remix_ds", case, batches, "the stage's batching (batching.epoch_order + batching.global_step, "
                     + (f"packing into rows of {pack} tokens)" if pack else "packing off)"))]
            sdpa = {name: None for name, *_ in runs}
            sdpa["remix_ds"] = case.eng.packed_sdpa   # padded micro-batches (if any) take torch's choice
            if self._sdpa_variants():   # the other attention choice for pad-to-longest and the stage, in this process
                from .engine import packed_sdpa_backends

                no_cudnn = packed_sdpa_backends(torch.device("cuda"))
                by_name = {r[0]: r for r in runs}
                sdpa.update({f"naive_longest{NO_CUDNN}": no_cudnn, f"remix_ds{TORCH_SDPA}": None})
                runs += [(f"naive_longest{NO_CUDNN}", SdpaChoice(by_name["naive_longest"][1], case.eng, no_cudnn),
                          batches, f"{by_name['naive_longest'][3]}; SDPA without cuDNN attention"),
                         (f"remix_ds{TORCH_SDPA}", SdpaChoice(case, case.eng, None), batches,
                          f"{by_name['remix_ds'][3]}; SDPA backends of torch's own choice for packed micro-batches too")]
            if any(len(batches) < 1 for _, _, batches, _ in runs):
                raise RuntimeError("too few examples for one global batch")
            if self.interleave:
                with PeakMemory(self.device) as mem:
                    timed = measure([(r[1], r[2]) for r in runs], a.warmup, a.steps, case.device, True)
                mems = [mem.fields()] * len(runs)
            else:
                timed, mems = [], []
                for _, runner, batches, _ in runs:
                    with PeakMemory(self.device) as mem:
                        timed.append(measure([(runner, batches)], a.warmup, a.steps, case.device, False)[0])
                        mems.append(mem.fields())
            for (name, _, _, desc), r, m in zip(runs, timed, mems):
                r.update(m)
                r["pad_fraction"] = round(1 - r["padfree_tokens"] / max(1, r["processed_tokens"]), 4)
                results[name] = {**base, "case": f"padding:{name}", "impl": "remix_ds" if name.startswith("remix_ds")
                                 else "naive", "batching": desc, **r, "status": "ok"}
                results[name]["sdpa_backends"] = (f"packed micro-batches: {_backend_names(sdpa[name])}; padded: "
                                                  f"torch's choice" if name == "remix_ds" and sdpa[name]
                                                  else _backend_names(sdpa[name]))
            for key in [k for k in results if k.startswith("remix_ds")]:
                rm = results[key]
                for naive in ("naive_max_length", "naive_dataset_longest", "naive_longest"):
                    rm[f"ratio_vs_{naive}"] = round(speed(rm, "padfree_tokens_per_s") /
                                                    speed(results[naive], "padfree_tokens_per_s"), 4)
                if f"naive_longest{NO_CUDNN}" in results:
                    rm[f"ratio_vs_naive_longest{NO_CUDNN}"] = round(
                        speed(rm, "padfree_tokens_per_s") /
                        speed(results[f"naive_longest{NO_CUDNN}"], "padfree_tokens_per_s"), 4)
            rm = results["remix_ds"]   # the target is checked on the stage's path as it runs
            rm["ratio_basis"] = "median step" if "tokens_per_s_median" in rm else "mean step"
            rm["target_ratio"] = PADDING_TARGET
            rm["target_baseline"] = "naive_longest"
            rm["meets_target"] = rm["ratio_vs_naive_longest"] >= PADDING_TARGET
            if a.profile:   # the packed step and the padded one it is compared with, operator by operator
                stem = os.path.splitext(a.out)[0]
                if os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED"):   # launch/bench_gpu.sh's second padding run
                    stem += ".cudnn-sdpa-off"
                for name, runner, batches, _ in runs:
                    if name in ("naive_longest", "remix_ds", f"remix_ds{TORCH_SDPA}"):
                        results[name]["profile_file"] = profile_steps(
                            runner, batches, a.profile, case.device, f"{stem}.profile-{a.shape}-padding-{name}.txt")
        except Exception as e:
            results = {"error": {**base, "case": "padding", "status": "error",
                                 "reason": f"{type(e).__name__}: {e}"[:2000]}}
            traceback.print_exc()
        finally:
            if case is not None:
                try:
                    case.close()
                except Exception:
                    traceback.print_exc()
            del case
            _free(self.device)
        for r in results.values():
            self.emit(r)

    # -------------------------------------------------------------- study
    def run_study(self, mode: str) -> None:
        """The study's workload for one mode: D_A factoids alone and mixed 1:2 with random-word passages, global
        batch 32; per data set the plain loop (pad-to-longest, one micro-batch) and the stage's path on one engine:
        packed (the packed-attention kernel where the model takes it), padded (as `packing: false`), and packed
        with the 4-D mask. Seconds per D_A epoch come from the median (CPU) or mean (GPU) step."""
        from . import batching
        from .data.formatting import encode_examples
        from .data.kvr import kvr_examples
        from .data.mixing import random_word_examples

        a = self.args
        G, n_steps = a.study_batch, a.warmup + a.steps
        words, passage_mean = (a.study_words, None) if a.study_words else \
            passage_words_for(self.tok, a.study_passage_tokens, a.seed)
        n_fact = G * n_steps
        facts = kvr_examples(n_fact, a.seed, "A")
        passages = random_word_examples(int(n_fact * STUDY_MIX_RATIO), a.seed, prompt_words=words, target_words=words)
        base = {"bench": "study", "mode": mode, "global_batch": G, "passage_words": words,
                "passage_words_basis": "given" if a.study_words else
                f"chosen so that passages average {a.study_passage_tokens} tokens in this tokenizer "
                f"(the study's 50 + 50 words in Llama-3 tokens)", "tokenizer_vocab": len(self.tok),
                "model_vocab": self.vocab, "ds_config": a.study_config}
        plain: Optional[TrainCase] = None
        remix: Optional[RemixCase] = None
        results: List[Dict[str, Any]] = []
        try:
            skip = self._skip_reason(mode, a.study_config)
            if skip:
                raise _Skip(skip)
            with PeakMemory(self.device) as mem:
                t0 = time.perf_counter()
                plain = PlainCase(self.path, mode, self.lora, self.precision, self.device, self.pad)
                datasets = {"factoids": facts, "mix": facts + passages}
                max_seq = 64 * math.ceil(max(len(e.input_ids) for e in
                                             encode_examples(self.tok, datasets["mix"], 10 ** 9)[0]) / 64)
                remix = RemixCase(self.path, mode, self.lora, a.study_config, self.precision, G, 10 ** 6, self.pad,
                                  pack=max_seq, adapt=not a.no_adapt_zero)
                setup_s = round(time.perf_counter() - t0, 2)
                kernel = remix.eng.packed_kernel
                for data, exs in datasets.items():
                    enc, dropped = encode_examples(self.tok, exs, max_seq, what=f"bench study {data}")
                    order = batching.epoch_order(len(enc), a.seed, 1, 0)
                    batches = [[enc[i] for i in order[s * G:(s + 1) * G]] for s in range(len(enc) // G)][:n_steps]
                    epoch_examples = STUDY_FACTOIDS * (1 + (STUDY_MIX_RATIO if data == "mix" else 0))
                    steps_per_epoch = math.ceil(epoch_examples / G)
                    # the first step of the plain loop and of the engine, on the same batch from the same weights:
                    # the same mean loss (a check of the packed kernel where no CPU test reaches, e.g. varlen_attn)
                    n_ans = sum(e.num_answer_tokens for e in batches[0])
                    first_plain = float(plain.step(batches[0])) / n_ans if data == "factoids" else None
                    first_remix = float(remix.step(batches[0])) / n_ans if data == "factoids" else None
                    runs = [("plain", plain, "the plain loop: random batches padded to their longest example"),
                            ("remix_ds", remix, f"batching.global_step, packed ({kernel})"),
                            ("remix_ds_padded", RemixVariant(remix, 0, True),
                             "batching.global_step, padded micro-batches (packing: false)"),
                            ("remix_ds_mask", RemixVariant(remix, max_seq, False),
                             "batching.global_step, packed rows with the 4-D block-diagonal mask")]
                    if not remix.eng.packed_varlen:   # the packed case is already the 4-D mask
                        runs = runs[:3]
                    timed = measure([(r[1], batches) for r in runs], a.warmup, a.steps, self.device, self.interleave)
                    recs = {}
                    lens = [len(e.input_ids) for e in enc]
                    for (name, _, desc), r in zip(runs, timed):
                        step_s = r.get("step_time_median_s") or r["step_time_s"]
                        recs[name] = {**base, "case": f"study:{mode}:{data}:{name}", "data": data,
                                      "impl": PLAIN if name == "plain" else "remix_ds", "batching": desc, **r,
                                      "epoch_examples": epoch_examples, "steps_per_epoch": steps_per_epoch,
                                      "seconds_per_epoch": round(step_s * steps_per_epoch, 3),
                                      "pad_fraction": round(1 - r["padfree_tokens"] / max(1, r["processed_tokens"]), 4),
                                      "length_mean": round(sum(lens) / len(lens), 1), "length_max": max(lens),
                                      "n_dropped": dropped, "setup_s": setup_s, "packed_kernel": kernel,
                                      "status": "ok"}
                    if first_plain is not None:
                        recs["remix_ds"].update({"first_step_loss": round(first_remix, 5),
                                                 "plain_first_step_loss": round(first_plain, 5),
                                                 "first_step_loss_rel_diff": round(abs(first_remix - first_plain)
                                                                                   / max(1e-12, abs(first_plain)), 6)})
                    ref = recs["plain"]
                    for name, r in recs.items():
                        if name == "plain":
                            continue
                        r["ratio_epoch_time_vs_plain"] = round(r["seconds_per_epoch"] / ref["seconds_per_epoch"], 4)
                        r["ratio_padfree_vs_plain"] = round(speed(r, "padfree_tokens_per_s") /
                                                            speed(ref, "padfree_tokens_per_s"), 4)
                        if name != "remix_ds_padded":
                            r["ratio_padfree_vs_padded"] = round(speed(r, "padfree_tokens_per_s") / speed(
                                recs["remix_ds_padded"], "padfree_tokens_per_s"), 4)
                    rm = recs["remix_ds"]
                    rm["target_ratio"] = STUDY_EPOCH_TARGET
                    rm["meets_target"] = rm["ratio_epoch_time_vs_plain"] <= STUDY_EPOCH_TARGET
                    rm["meets_aim"] = rm["ratio_epoch_time_vs_plain"] <= STUDY_EPOCH_AIM
                    if data == "mix":
                        rm["packing_target_ratio"] = STUDY_PACKING_TARGET
                        rm["meets_packing_target"] = rm["ratio_padfree_vs_padded"] >= STUDY_PACKING_TARGET
                    results += list(recs.values())
                for r in results:
                    r.update(mem.fields())
        except Exception as e:
            rec = {**base, "case": f"study:{mode}", "status": "error"}
            self._failed(rec, e)
            results.append(rec)
        finally:
            for c in (remix, plain):
                self._close(c)
        for r in results:
            self.emit(r)

    # -------------------------------------------------------------- summary
    def summary(self) -> None:
        if not self.main:
            return
        a = self.args
        basis = "median step (interleaved timing)" if self.interleave else "mean step (sequential timing)"
        print(f"\n[bench] {a.shape} on {self.env.get('device_name')} ({self.env['device']}), {self.precision}, "
              f"batch {a.batch} x {a.seq} tokens, {a.steps} timed steps after {a.warmup} warm-up, rates from the "
              f"{basis}; JSON lines appended to {a.out}")
        hdr = (f"{'case':26s} {'impl':9s} {'tokens/s':>10s} {'pad-free/s':>10s} {'ms/step':>9s} {'peak GiB':>9s} "
               f"{'ratio':>7s} {'target':>9s}")
        print(hdr)
        print("-" * len(hdr))
        for r in self.records:
            if r.get("status") != "ok":
                print(f"{r.get('case', r['bench']):26s} {r['status']}: {r.get('reason', '')}")
                continue
            if r["bench"] in ("train", "padding"):
                ratio = r.get("ratio_tokens_per_s") or r.get("ratio_vs_naive_longest")
                target = f">={r['target_ratio']:g} {'ok' if r['meets_target'] else 'NO'}" if "meets_target" in r else ""
                print(f"{r['case']:26s} {r.get('impl', ''):9s} {speed(r):>10,.0f} "
                      f"{speed(r, 'padfree_tokens_per_s'):>10,.0f} {self._step_ms(r):>9.1f} {r['peak_mem_gib']:>9.2f} "
                      f"{(f'{ratio:.3f}' if ratio else ''):>7s} {target:>9s}"
                      + (f"  (vs pad-to-longest; x{r['ratio_vs_naive_dataset_longest']:.3f} vs "
                         f"pad-to-dataset-longest, x{r['ratio_vs_naive_max_length']:.3f} vs pad-to-max"
                         + _no_cudnn_ratio(r) + ")" if r.get("ratio_vs_naive_longest") else ""))
            elif r["bench"] == "study":
                ratio = r.get("ratio_epoch_time_vs_plain")
                target = f"<={r['target_ratio']:g} {'ok' if r['meets_target'] else 'NO'}" if "meets_target" in r else ""
                print(f"{r['case'].replace('study:', ''):26s} {r.get('impl', ''):9s} {speed(r):>10,.0f} "
                      f"{speed(r, 'padfree_tokens_per_s'):>10,.0f} {self._step_ms(r):>9.1f} {r['peak_mem_gib']:>9.2f} "
                      f"{(f'{ratio:.3f}' if ratio else ''):>7s} {target:>9s}  {r['seconds_per_epoch']:.2f} s/epoch"
                      + (f", x{r['ratio_padfree_vs_padded']:.3f} tokens/s vs padded" if "ratio_padfree_vs_padded" in r
                         else ""))
            elif r["bench"] == "eval":
                target = f">={r['target_ratio']:g} {'ok' if r['meets_target'] else 'NO'}"
                print(f"{'eval: generate':26s} {'':9s} {r['generate_questions_per_s']:>10,.1f} q/s")
                print(f"{'eval: teacher-forced':26s} {'':9s} {r['teacher_forced_questions_per_s']:>10,.1f} q/s "
                      f"{'':24s}{r['ratio']:>7.2f} {target:>9s}")


def _no_cudnn_ratio(r: Dict[str, Any]) -> str:
    v = r.get(f"ratio_vs_naive_longest{NO_CUDNN}")
    return f", {v:.3f} vs pad-to-longest without cuDNN attention" if v else ""


def _ran_as(r: Dict[str, Any]) -> str:
    if r["bench"] == "padding":
        mix = f"{r['mix_ratio']:g} passage(s) per factoid, " if r.get("mix_ratio") is not None else ""
        return f"{mix}{r.get('pad_fraction', 0) * 100:.1f}% padding" + \
            (f"; SDPA: {r['sdpa_backends']}" if r.get("sdpa_backends") not in (None, "torch's choice") else "")
    if r.get("impl") == PLAIN:
        return "plain" + (" (DDP)" if r.get("world_size", 1) > 1 else "")
    if r.get("zero_stage") is None:
        return ""
    return (f"ZeRO-{r['zero_stage']}" if r["zero_stage"] else "no ZeRO") + \
        (" + autocast" if r.get("torch_autocast") else "")


def markdown_summary(records: List[Dict[str, Any]], run_id: Optional[str] = None) -> str:
    """JSON lines of the bench as Markdown tables, one per run (``run_id``), in the file's order: what
    docs/benchmarks.md records. Ratios and targets as measured; skipped and failed cases with their reason."""
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        if run_id is None or r.get("run_id") == run_id:
            runs.setdefault(r.get("run_id", "?"), []).append(r)
    if not runs:
        return f"no bench records{f' with run_id {run_id}' if run_id else ''}\n"
    out: List[str] = []
    for rid, recs in runs.items():
        r0, env = recs[0], recs[0].get("env") or {}
        mem = env.get("device_mem_gib")
        out += [f"### run {rid}", "",
                f"{r0.get('shape')} shape on {env.get('device_name')}{f' ({mem} GiB)' if mem else ''}, "
                f"{r0.get('precision')}, batch {r0.get('batch')} x {r0.get('seq')} tokens, world size "
                f"{r0.get('world_size')}, {r0.get('time')}, commit {env.get('git_commit')}; torch {env.get('torch')}, "
                f"transformers {env.get('transformers')}, DeepSpeed {env.get('deepspeed')}, PEFT {env.get('peft')}, "
                f"bitsandbytes {env.get('bitsandbytes')}", "",
                "| case | ran as | tokens/s | padding-free tokens/s | ms/step | peak GiB | ratio | target |",
                "|---|---|---|---|---|---|---|---|"]
        study = [r for r in recs if r.get("bench") == "study"]
        recs = [r for r in recs if r.get("bench") != "study"]
        if not recs:
            out = out[:-3]
        for r in recs:
            case = r.get("case", r["bench"])
            if r.get("status") != "ok":
                out.append(f"| {case} | {r.get('status')}: {r.get('reason', '')} | | | | | | |")
                continue
            target = (f">= {r['target_ratio']:g}: {'met' if r['meets_target'] else 'not met'}"
                      if "meets_target" in r else "")
            if r["bench"] == "eval":
                out.append(f"| {case} | generation {r['generate_questions_per_s']:,.1f} q/s, teacher-forced "
                           f"{r['teacher_forced_questions_per_s']:,.1f} q/s | | | | {r.get('peak_mem_gib', 0):.2f} | "
                           f"{r['ratio']:.2f} | {target} |")
                continue
            ratio = r.get("ratio_tokens_per_s") or r.get("ratio_vs_naive_longest")
            extra = (f" (vs pad-to-longest; {r['ratio_vs_naive_dataset_longest']:.3f} vs dataset-longest, "
                     f"{r['ratio_vs_naive_max_length']:.3f} vs pad-to-max{_no_cudnn_ratio(r)})"
                     if r.get("ratio_vs_naive_longest") else "")
            paired = f" (paired with {r['paired_with']})" if r.get("paired_with") else ""
            step_ms = 1e3 * (r.get("step_time_median_s") or r["step_time_s"])
            out.append(f"| {case}{paired} | {_ran_as(r)} | {speed(r):,.0f} | {speed(r, 'padfree_tokens_per_s'):,.0f} | "
                       f"{step_ms:.1f} | {r.get('peak_mem_gib', 0):.2f} | {f'{ratio:.3f}' if ratio else ''}{extra} | "
                       f"{target} |")
        if study:
            out += _study_markdown(study)
        out.append("")
    return "\n".join(out)


def _study_markdown(recs: List[Dict[str, Any]]) -> List[str]:
    """The study case's records as a table: seconds per D_A epoch and padding-free tokens/s per batching, with the
    ratios to the plain loop and to padded micro-batches on the same engine."""
    r0 = next((r for r in recs if r.get("status") == "ok"), recs[0])
    out = ["", f"Study shape: global batch {r0.get('global_batch')}, D_A = {STUDY_FACTOIDS} factoids (mix: + "
                f"{STUDY_MIX_RATIO:g} random-word passages each, {r0.get('passage_words')} + {r0.get('passage_words')} "
                f"words: {r0.get('passage_words_basis')}); tokenizer vocab {r0.get('tokenizer_vocab')}, model vocab "
                f"{r0.get('model_vocab')}; ds_config {r0.get('ds_config')}; packed kernel {r0.get('packed_kernel')}; "
                f"seconds per epoch from the {'median' if 'step_time_median_s' in r0 else 'mean'} step.", "",
           "| mode | data | batching | s per D_A epoch | padding-free tokens/s | padding | epoch time vs plain | "
           "tokens/s vs padded | target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("status") != "ok":
            out.append(f"| {r.get('mode')} | {r.get('case')} | {r.get('status')}: {r.get('reason', '')} | | | | | | |")
            continue
        name = r["case"].split(":")[-1]
        targets = []
        if "meets_target" in r:
            targets.append(f"epoch <= {r['target_ratio']:g}x plain: {'met' if r['meets_target'] else 'not met'}"
                           f" (aim <= {STUDY_EPOCH_AIM:g}x: {'met' if r['meets_aim'] else 'not met'})")
        if "meets_packing_target" in r:
            targets.append(f"packed >= {r['packing_target_ratio']:g}x padded: "
                           f"{'met' if r['meets_packing_target'] else 'not met'}")
        vs_plain = r.get("ratio_epoch_time_vs_plain")
        vs_pad = r.get("ratio_padfree_vs_padded")
        out.append(f"| {r['mode']} | {r['data']} | {name} | {r['seconds_per_epoch']:.2f} | "
                   f"{speed(r, 'padfree_tokens_per_s'):,.0f} | {r['pad_fraction'] * 100:.1f}% | "
                   f"{f'{vs_plain:.3f}' if vs_plain else ''} | {f'{vs_pad:.3f}' if vs_pad else ''} | "
                   f"{'; '.join(targets)} |")
    return out


def parse_cases(text: str) -> List[Tuple[str, List[str]]]:
    """'lora:zero2,full,eval,lora:zero3' -> [("lora", ["zero2", "zero3"]), ("full", ["zero2", "zero3"]), ("eval", [])].

    Runs go in the order of first mention (a mode's configs together). A bare mode means its default
    configs (zero2, zero3); 'MODE:plain' times the plain loop alone; the plain baseline of a mode is
    added whenever a DeepSpeed config of that mode is asked for.
    """
    plan: Dict[str, List[str]] = {}
    for tok in [t.strip() for t in text.split(",") if t.strip()]:
        if tok in ("eval", "padding"):
            plan.setdefault(tok, [])
            continue
        if tok == "study" or tok.startswith("study:"):   # study[:MODE]: the study's workload (Bench.run_study)
            lst = plan.setdefault("study", [])
            mode = tok.partition(":")[2]
            if mode and mode not in MODES:
                raise SystemExit(f"--cases: unknown case {tok!r} (study:MODE with MODE in {', '.join(MODES)})")
            if mode and mode not in lst:
                lst.append(mode)
            continue
        mode, _, cfg = tok.partition(":")
        if mode not in MODES:
            raise SystemExit(f"--cases: unknown case {tok!r} (MODE[:CONFIG] with MODE in {', '.join(MODES)}, "
                             f"CONFIG 'plain' or a ds_config name/path; or 'eval', 'padding')")
        lst = plan.setdefault(mode, [])
        for c in ([cfg] if cfg else ["zero2", "zero3"]):
            if c not in lst:
                lst.append(c)
    return list(plan.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time remix_ds's training step against a plain PyTorch/PEFT loop (and evaluation, and "
                    "padding) on one model shape; append JSON lines to --out.")
    from .helptext import decorate
    decorate(p, "bench")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES),
                   help="tiny: the locally built tiny model; llama-1b / llama-8b: random bf16 weights of those "
                        "configurations, written once under REMIX_DS_CACHE (default: tiny)")
    p.add_argument("--cases", default=None,
                   help="comma list of MODE[:CONFIG] (MODE full|lora|qlora; CONFIG plain, zero2, zero3, "
                        "zero2_offload, zero3_offload or a ds_config path; a bare MODE = zero2+zero3), 'eval', "
                        "'padding' and 'study[:MODE]' (the study's workload; bare: per shape " +
                        "; ".join(f"{k}: {v}" for k, v in STUDY_MODES.items()) + "). Default per shape: " +
                        "; ".join(f"{k}: {v}" for k, v in DEFAULT_CASES.items()))
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps per case (default: 6 for tiny, 10 for the Llama shapes)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps per case (default: 2 for tiny, 3 for the Llama shapes)")
    p.add_argument("--batch", type=int, default=64, help="global batch size in sequences (default 64)")
    p.add_argument("--seq", type=int, default=64, help="tokens per training sequence (default 64)")
    p.add_argument("--out", default=os.path.join("runs", "bench.jsonl"), help="JSON lines appended here")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank, all linear layers, alpha = 2r (default 16)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that have it, fp32 on CPU")
    p.add_argument("--max-seq", type=int, default=None,
                   help="padding bench: max_seq_length, which the pad-to-max baseline pads every sequence to "
                        "(default: the longest example rounded up to a multiple of 64)")
    p.add_argument("--padding-mode", default="full", choices=list(MODES[:2]),
                   help="padding bench: fine-tuning mode of its engine (default full)")
    p.add_argument("--padding-config", default="zero2", help="padding bench: ds_config (default zero2)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, run STEPS more steps of each training case (and of the padding bench's "
                        "packed and pad-to-longest batching) under torch.profiler and write its operator table "
                        "beside --out (<out>.profile-<shape>-<case>.txt); default 0: off")
    p.add_argument("--no-adapt-zero", action="store_true",
                   help="run each ds_config as written (a stage's adapt_zero: false); default: as a stage does, "
                        "ZeRO-3 on one process as ZeRO-2 and LoRA/QLoRA at ZeRO-1/2 without ZeRO, under autocast")
    p.add_argument("--padding-mix-ratio", type=float, default=1.0,
                   help="padding bench: mixing passages per factoid (a recipe's mix.ratio; default 1.0)")
    p.add_argument("--padding-words", type=int, default=8,
                   help="padding bench: words in each half (prompt, target) of a passage (default 8, the demo's; "
                        "the study's is 50)")
    p.add_argument("--no-packing", action="store_true",
                   help="padding bench: run the stage with packing off (default: on, as `packing: true`)")
    p.add_argument("--eval-questions", type=int, default=None, help="eval bench: questions (default 2 x batch)")
    p.add_argument("--model-dir", default=None, help="use/write the shape's model in this directory instead")
    p.add_argument("--padding-sdpa-variants", default="auto", choices=["auto", "on", "off"],
                   help="padding bench: also time pad-to-longest with cuDNN attention excluded from SDPA "
                        "(padding:naive_longest_no_cudnn) and the stage's batching with torch's own SDPA choice for "
                        "packed micro-batches (padding:remix_ds_torch_sdpa), in the same process; auto: on CUDA")
    p.add_argument("--timing", default="auto", choices=["auto", "sequential", "interleaved"],
                   help="sequential: each case's steps back to back, one device sync at each end; interleaved: "
                        "the compared runs take turns step by step, each step timed (robust to other load on a "
                        "shared CPU; ratios use median steps). auto: interleaved on CPU, sequential on a GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on a CPU-only run, where busy-waiting OpenMP threads on a "
                        "shared machine make timings erratic; torch's own default on a GPU run; 0: torch's default)")
    p.add_argument("--study-batch", type=int, default=STUDY_BATCH,
                   help=f"study case: global batch (default {STUDY_BATCH}, the study's)")
    p.add_argument("--study-words", type=int, default=None,
                   help="study case: words per half of a mixing passage (default: as many as make passages average "
                        "--study-passage-tokens tokens in the shape's tokenizer)")
    p.add_argument("--study-passage-tokens", type=int, default=STUDY_PASSAGE_TOKENS,
                   help=f"study case: mean passage length to match (default {STUDY_PASSAGE_TOKENS}: 50 + 50 random "
                        f"words in Llama-3 tokens)")
    p.add_argument("--study-config", default="zero2", help="study case: the stage's ds_config (default zero2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize", metavar="JSONL", default=None,
                   help="run nothing: print the records of this file as Markdown tables, one per run")
    p.add_argument("--run-id", default=None, help="with --summarize: only this run")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from . import dist
    from .runlog import setup_logging

    args = build_parser().parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print(markdown_summary(records, args.run_id), end="")
        return 0
    tiny = args.shape == "tiny"
    if args.steps is None:
        args.steps = 6 if tiny else 10
    if args.warmup is None:
        args.warmup = 2 if tiny else 3
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 2:
        raise SystemExit("--steps >= 1, --warmup >= 0, --batch >= 1 and --seq >= 2 are required")
    cases = args.cases or DEFAULT_CASES[args.shape]
    plan = parse_cases(cases)
    dist.init()
    threads = args.threads if args.threads is not None else (0 if torch.cuda.is_available() else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    setup_logging()
    logging.getLogger("remix_ds").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    bench = Bench(args)
    if bench.main:
        print(f"[bench] shape {args.shape}: {bench.path}; cases {cases}; device {bench.env.get('device_name')}",
              flush=True)
    for what, configs in plan:
        if what == "eval":
            bench.run_eval()
        elif what == "padding":
            bench.run_padding()
        elif what == "study":
            for mode in configs or STUDY_MODES[args.shape].split(","):
                bench.run_study(mode)
        else:
            bench.run_train(what, configs)
    bench.summary()
    return 1 if bench.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
