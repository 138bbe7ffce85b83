"""A tiny Llama-architecture model with a locally trained tokenizer, briefly pretrained.

No model hub is needed: ``build_tiny(spec)`` trains a byte-level BPE tokenizer with the
``tokenizers`` library, creates a small ``LlamaForCausalLM``, pretrains it for a few hundred steps on
KVR pairs that no recipe uses (part ``P`` of the KVR stream) and on random-word passages, and saves an
ordinary Hugging Face directory (``from_pretrained`` loads it). The result is cached by its spec, so
it is built once per machine (a few seconds on 2 CPU cores).

A random base cannot be steered by LoRA; the short pretraining gives it the answer format (8
characters then EOS), which is what makes LoRA memorization possible on it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch

from .config import TinySpec, stage_hash

log = logging.getLogger(__name__)
TINY_VERSION = 1
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]


def cache_root() -> Path:
    return Path(os.environ.get("REMIX_DS_CACHE", Path.home() / ".cache" / "remix_ds"))


def tiny_path(spec: TinySpec) -> Path:
    key = stage_hash({"tiny": dataclasses.asdict(spec), "version": TINY_VERSION})
    return cache_root() / f"tiny-llama-{key}"


def _tokenizer_corpus(spec: TinySpec):
    from .data.kvr import ALPHABET, PROMPT
    from .data.mixing import PASSAGE_PROMPT, word_list

    rng = random.Random(spec.seed)
    words = word_list()
    lines = []
    for _ in range(4000):
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    for _ in range(2000):
        key = "".join(rng.choice(ALPHABET) for _ in range(8))
        lines.append(PROMPT.format(key=key))
        lines.append("".join(rng.choice(ALPHABET) for _ in range(8)))
    lines.append(PASSAGE_PROMPT)
    return lines


def train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(spec), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])


def _pretrain(model, tokenizer, spec: TinySpec) -> float:
    from .data.formatting import collate, encode_example, pad_id_of
    from .data.kvr import kvr_examples
    from .data.mixing import random_word_examples

    examples = kvr_examples(spec.pretrain_pairs, spec.seed, "P")
    examples += random_word_examples(spec.pretrain_pairs // 4, spec.seed + 1, prompt_words=3, target_words=3)
    encoded = [encode_example(tokenizer, ex, i) for i, ex in enumerate(examples)]
    pad = pad_id_of(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    warm = max(1, spec.pretrain_steps // 20)
    report_every = max(1, spec.pretrain_steps // 10)
    t0 = time.time()
    for step in range(spec.pretrain_steps):
        if step and step % report_every == 0:
            rate = (time.time() - t0) / step
            log.info("tiny model: pretraining step %d/%d, loss %.3f (about %.0fs left)", step, spec.pretrain_steps,
                     loss.item(), rate * (spec.pretrain_steps - step))
        lr = 3e-3 * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(encoded), (32,), generator=g).tolist()
        batch = collate([encoded[i] for i in idx], pad)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def build_tiny(spec: TinySpec | None = None, out_dir: str | os.PathLike | None = None) -> str:
    """Build (or reuse from the cache) the tiny model; returns its directory."""
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    out = Path(out_dir) if out_dir else tiny_path(spec)
    marker = out / "remix_tiny.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.exists():
            return str(out)
        t0 = time.time()
        log.info("building the tiny demo model once (a %d-layer Llama with its own %d-token tokenizer, %d "
                 "pretraining steps; about a minute on 2 CPU cores) into %s", spec.num_layers, spec.vocab_size,
                 spec.pretrain_steps, out)
        torch.manual_seed(spec.seed)
        log.info("tiny model: training the tokenizer")
        tokenizer = train_tokenizer(spec)
        log.info("tiny model: pretraining (%d steps)", spec.pretrain_steps)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                          intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                          num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                          max_position_embeddings=1024, tie_word_embeddings=False,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(cfg)
        final_loss = _pretrain(model, tokenizer, spec)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(tmp / "remix_tiny.json", "w") as f:
            json.dump({"spec": dataclasses.asdict(spec), "version": TINY_VERSION,
                       "pretrain_final_loss": final_loss, "build_seconds": round(time.time() - t0, 2)}, f, indent=2)
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)
        log.info("built tiny model in %.1fs (pretraining loss %.3f): %s", time.time() - t0, final_loss, out)
    return str(out)


def resolve_model_path(model: str, spec: TinySpec) -> str:
    """'tiny' -> the cached tiny model directory (built on first use); anything else unchanged."""
    if model == "tiny":
        return build_tiny(spec)
    return model
