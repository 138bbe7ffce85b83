"""Attention over packed micro-batches without a 4-D mask: every example attends only to itself, through kernels
that take sequence boundaries.

A packed micro-batch (``collate_varlen``) is one row: the examples back to back, ``position_ids`` restarting at 0
for each, and a ``Segments`` object that lists where each example starts and ends. During a packed micro-step
(``packed_attention``) the model's attention implementation is ``IMPL``, registered here in transformers'
``AttentionInterface`` and deliberately not in its ``AttentionMaskInterface``: transformers then builds no mask at
all (``masking_utils._preprocess_mask_arguments`` returns ``None`` for an implementation without a mask function,
and skips its packed-sequence detection, which reads ``position_ids`` back to the host), and ``attention_forward``
takes the boundaries from the ``packed_segments`` keyword, which the decoder passes to every attention layer.

Kernels (``kernel_name``):

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10: FlashAttention's variable-length kernel,
  CUDA, fp16/bf16): the tokens of all examples in one ``[tokens, heads, dim]`` tensor, no padding at all.
- ``sdpa_groups``: everywhere else (CPU, fp32): the examples, sorted by length, in at most ``MAX_GROUPS`` groups;
  each group gathered into a right-padded ``[examples, heads, longest, dim]`` batch and run through causal SDPA
  (``is_causal``: flash kernels on a GPU, no mask built), then scattered back. Right padding is exact for causal
  attention (no real query sees a later pad), so each example's outputs and gradients are those it has alone.

Not used: FlexAttention with a document mask (transformers' ``flex_attention`` builds a ``BlockMask`` from packed
``position_ids``). torch 2.13 implements no FlexAttention backward on CPU ("FlexAttention does not support backward
on CPU"), so it cannot train there, and on CUDA it needs ``torch.compile`` per shape and a new ``BlockMask`` per
micro-batch, whose widths change at every step of a packed epoch.

Attention is the only layer that needs the boundaries: embeddings, projections, MLPs and norms act per token, and
RoPE takes ``position_ids``. Where neither kernel applies (a model whose decoder does not pass keyword arguments to
its attention layers), the 4-D block-diagonal mask path (``formatting.collate_packed``) stays.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMPL = "remix_varlen"
MAX_GROUPS = 3   # sdpa_groups: SDPA calls per attention layer (each costs host time); 3 cover a factoid + passage mix


@dataclass
class Segments:
    """Where each example of a one-row packed micro-batch lies, computed on the host by the collator.

    ``lengths``: tokens of each example in row order, as the attention sees them (the last one shortened by the
    column the training loss drops; trailing padding counted as one more segment). ``cu``: int32 cumulative starts
    ``[n + 1]``; ``max_len``: the longest segment. ``groups``: for ``sdpa_groups``, per group (index ``[n_g * m_g]``
    of the token each padded slot takes, ``n_g``, ``m_g``); ``inverse``: for each token, its slot in the groups'
    concatenated outputs."""
    lengths: List[int]
    cu: torch.Tensor
    max_len: int
    groups: List[Tuple[torch.Tensor, int, int]]
    inverse: torch.Tensor

    @property
    def total(self) -> int:
        return int(sum(self.lengths))

    def to(self, device: torch.device) -> "Segments":
        if device.type == "cpu" and self.cu.device.type == "cpu":
            return self
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else \
            (lambda t: t.to(device))
        return Segments(self.lengths, move(self.cu), self.max_len, [(move(i), n, m) for i, n, m in self.groups],
                        move(self.inverse))


def group_lengths(lengths: Sequence[int], max_groups: int = MAX_GROUPS) -> List[List[int]]:
    """Indices of `lengths` in at most `max_groups` groups of consecutive sorted lengths, minimising the padded
    attention area sum(n_g * longest_g ** 2) (dynamic programming over the sorted lengths: exact for this cost)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    s = [lengths[i] for i in order]
    n = len(s)
    if n == 0:
        return []
    k_max = max(1, min(max_groups, n))
    INF = float("inf")
    # best[k][j]: least cost of the first j sorted lengths in k groups; cut[k][j]: where the last group starts
    best = [[INF] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + (j - i) * s[j - 1] ** 2
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    k = min(range(1, k_max + 1), key=lambda kk: best[kk][n])
    groups, j = [], n
    while k > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def make_segments(lengths: Sequence[int], max_groups: int = MAX_GROUPS) -> Segments:
    """The ``Segments`` of examples of these lengths laid back to back in one row."""
    lengths = [int(n) for n in lengths if n > 0]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    total = starts[-1]
    groups: List[Tuple[torch.Tensor, int, int]] = []
    inverse = [0] * total
    slot = 0
    for members in group_lengths(lengths, max_groups):
        m = max(lengths[i] for i in members)
        idx: List[int] = []
        for r, i in enumerate(members):
            n, s0 = lengths[i], starts[i]
            # padded slots repeat the example's last token: they come after it, so no real query sees them
            idx += list(range(s0, s0 + n)) + [s0 + n - 1] * (m - n)
            inverse[s0:s0 + n] = range(slot + r * m, slot + r * m + n)
        groups.append((torch.tensor(idx), len(members), m))
        slot += len(members) * m
    return Segments(lengths=lengths, cu=torch.tensor(starts, dtype=torch.int32), max_len=max(lengths, default=0),
                    groups=groups, inverse=torch.tensor(inverse, dtype=torch.long))


# ------------------------------------------------------------------ kernels

@functools.lru_cache(maxsize=None)
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    """varlen_attn's keyword names (read once: the attention of every layer asks)."""
    return frozenset(inspect.signature(_varlen_fn()).parameters)


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's varlen_attn (FlashAttention's variable-length kernel) can run here: CUDA, fp16/bf16, and a
    probe on small tensors (forward and backward, GQA) agrees with ``sdpa_groups`` (``varlen_probe``)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or _varlen_fn() is None:
        return False
    return varlen_probe(str(device), dtype) is None


_probed: Dict[Tuple[str, torch.dtype], Optional[str]] = {}


def varlen_probe(device: str, dtype: torch.dtype) -> Optional[str]:
    """Run varlen_attn once on `device` (cached): None when its outputs and input gradients match the
    ``sdpa_groups`` kernel's on random inputs, else why not (an error, or the largest difference). A torch whose
    varlen_attn has another signature or rejects these shapes then packs through ``sdpa_groups`` instead."""
    global _native_gqa
    key = (device, dtype)
    if key not in _probed:
        for native in (True, False):   # with varlen_attn's own GQA, then with the key/value heads repeated
            _native_gqa = native
            _probed[key] = _probe_once(device, dtype)
            if _probed[key] is None:
                break
        if _probed[key]:
            log.warning("packed attention: %s; packing through sdpa_groups", _probed[key])
    return _probed[key]


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


_native_gqa = True   # varlen_attn's enable_gqa (its cuDNN backend refuses it): varlen_probe turns it off if needed


def _varlen(query, key, value, seg: Segments, scaling: Optional[float]) -> torch.Tensor:
    """[1, H, T, D] inputs -> [1, T, H, D] through torch's varlen_attn, whose keywords differ across torch versions
    (2.10: is_causal; 2.13: window_size=(-1, 0) for causal, enable_gqa, scale)."""
    fn, params = _varlen_fn(), _varlen_params()
    q = query[0].transpose(0, 1)   # [T, H, D]
    n_rep = query.shape[1] // key.shape[1]
    kw: Dict[str, object] = {}
    if "enable_gqa" in params and n_rep > 1 and _native_gqa:
        kw["enable_gqa"] = True
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    else:
        k, v = _repeat_kv(key[0], n_rep, 0).transpose(0, 1), _repeat_kv(value[0], n_rep, 0).transpose(0, 1)
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if scaling is not None and "scale" in params:
        kw["scale"] = scaling
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), seg.cu, seg.cu, seg.max_len, seg.max_len, **kw)
    return out.unsqueeze(0)


def _sdpa_groups(query, key, value, seg: Segments, scaling: Optional[float]) -> torch.Tensor:
    """[1, H, T, D] inputs -> [1, T, H, D]: per group, the examples gathered right-padded, causal SDPA, scattered
    back (``inverse``)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # [T, H, D]
    n_rep = query.shape[1] // key.shape[1]
    outs = []
    for idx, n, m in seg.groups:
        qg, kg, vg = (t.index_select(0, idx).view(n, m, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        kg, vg = _repeat_kv(kg, n_rep, 1), _repeat_kv(vg, n_rep, 1)
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=m > 1, scale=scaling)   # [n, H, m, D]
        outs.append(o.transpose(1, 2).reshape(n * m, o.shape[1], o.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.index_select(0, seg.inverse).unsqueeze(0)


KERNELS = {"varlen": _varlen, "sdpa_groups": _sdpa_groups}


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel packed micro-batches attend through on `device` with activations of `dtype`."""
    return "varlen" if varlen_usable(device, dtype) else "sdpa_groups"


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, packed_segments: Optional[Segments] = None,
                      packed_kernel: Optional[str] = None, **kwargs):
    """transformers' attention-function signature (``AttentionInterface``): query [B, Hq, L, D], key/value
    [B, Hkv, L, D] -> ([B, L, Hq, D], None). Registered as ``IMPL``, active only inside ``packed_attention``."""
    if packed_segments is None:
        raise RuntimeError(f"attention implementation {IMPL!r} called without packed_segments: this model's "
                           f"decoder does not pass keyword arguments to its attention layers (use the 4-D mask path)")
    if query.shape[0] != 1 or query.shape[2] != packed_segments.total or key.shape[2] != query.shape[2]:
        raise RuntimeError(f"packed attention expects one row of {packed_segments.total} tokens; got query "
                           f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if dropout:
        raise RuntimeError("packed attention does not implement attention dropout")
    other = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if other:
        raise RuntimeError(f"packed attention does not implement {', '.join(other)}")
    name = packed_kernel or kernel_name(query.device, query.dtype)
    return KERNELS[name](query, key, value, packed_segments, scaling), None


# what some attention layers pass their attention function and these kernels do not implement (Gemma 2's logit
# soft-capping, sliding windows, GPT-OSS's sinks, T5-style position biases): refused, never ignored
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias")
_registered = False


def register() -> None:
    """Add ``IMPL`` to transformers' attention functions (once per process)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(IMPL, attention_forward)
        _registered = True


def model_configs(model: torch.nn.Module) -> List[object]:
    """The distinct configs of a (PEFT-wrapped) Hugging Face model's modules: what selects their attention."""
    seen: Dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def supports(model: torch.nn.Module) -> Optional[str]:
    """Why packed micro-batches of `model` cannot use these kernels (None: they can). The model must be a
    decoder whose attention layers take transformers' attention functions and receive the decoder's keyword
    arguments (Llama-family models in transformers 5), without attention dropout in training."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager", IMPL):
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}"
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    for name in ("sliding_window", "attn_logit_softcapping"):
        if getattr(cfg, name, None):
            return name
    try:
        attn = next(m for m in base.modules() if type(m).__name__.endswith("Attention"))
        src = inspect.getsource(type(attn).forward)
    except (StopIteration, OSError, TypeError):
        return "no attention module found"
    if "ALL_ATTENTION_FUNCTIONS" not in src or "**kwargs" not in src:
        return f"{type(attn).__name__} does not dispatch through transformers' attention functions with kwargs"
    return None


@contextlib.contextmanager
def packed_attention(configs: Sequence[object]):
    """Within: the models of `configs` attend through ``IMPL``. Wrap the forward and the backward of a packed
    micro-batch (gradient checkpointing recomputes each layer's forward during the backward)."""
    register()
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = IMPL
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def _probe_once(device: str, dtype: torch.dtype) -> Optional[str]:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        seg = make_segments([5, 11, 1, 7]).to(torch.device(device))
        T = seg.total
        q, k, v = (torch.randn(1, h, T, 64, generator=g, device=device, dtype=dtype).requires_grad_()
                   for h in (4, 2, 2))
        outs = []
        for fn in (_varlen, _sdpa_groups):
            o = fn(q, k, v, seg, None)
            grads = torch.autograd.grad(o.float().square().sum(), (q, k, v))
            outs.append([o.float()] + [x.float() for x in grads])
        err = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(*outs))
        return None if err < 5e-2 else f"varlen_attn differs from sdpa_groups by {err:.3g} (relative)"
    except Exception as e:   # noqa: BLE001 (any failure means: do not use it)
        return f"varlen_attn failed: {type(e).__name__}: {e}"[:300]


# ------------------------------------------------------------------ packing: auto

# packing: auto keeps the measured choice only when one batching is clearly faster; within this margin (timing
# noise on a shared machine) it decides by the token positions packing saves, so that identical runs choose alike
CHOICE_MARGIN = 0.10
MIN_POSITIONS_SAVED = 0.20
# below this share of positions saved packing is not even timed: padded (factoids alone, uniform lengths)
MIN_POSITIONS_MEASURED = 0.05


def choose_packing(eng, chunk: Sequence, world: int, gas: int, rank: int, pad: int, capacity: int,
                   repeats: int = 3) -> Tuple[bool, Dict[str, object]]:
    """``packing: auto``: whether packed micro-batches run this rank's share of `chunk` (a global batch) faster than
    padded ones, measured. Forward passes only (no gradients, nothing of the engine's state changes), padded and
    packed alternately, `repeats` times, the fastest of each; the ranks' times are summed so that every rank makes
    the same choice. Where packing saves less than ``MIN_POSITIONS_MEASURED`` of the token positions nothing is
    timed (padded); a difference within ``CHOICE_MARGIN`` is noise: then packing is chosen where it saves at least
    ``MIN_POSITIONS_SAVED`` of the positions (a property of the data, the same in every run). Returns (pack, what
    was measured)."""
    import time

    from . import dist
    from .batching import global_step_batches

    # this rank's micro-batches of the global batch, packed and padded: collated once, timed several times
    batches = {pack: global_step_batches(eng, chunk, world, gas, rank, pad, pack) for pack in (capacity, 0)}

    def run(pack: int) -> float:
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)
        t0 = time.perf_counter()
        for batch in batches[pack]:
            forward_only(eng, batch)
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)
        return time.perf_counter() - t0

    def positions(pack: int) -> int:
        return sum(b["input_ids"].numel() for b in batches[pack])

    n = torch.tensor([positions(capacity), positions(0)], dtype=torch.float64, device=eng.device)
    if dist.world_size() > 1:
        dist.all_reduce_sum(n)
    saved = 1.0 - float(n[0]) / max(1.0, float(n[1]))
    if saved < MIN_POSITIONS_MEASURED:   # nothing worth packing: no timing (whose noise could choose either)
        return False, {"positions_saved": saved, "rule": f"packing saves {saved:.0%} of the positions: padded, "
                                                          f"not measured"}
    run(capacity), run(0)   # warm-up: first calls build kernels, caches and allocator pools
    best = {"packed": float("inf"), "padded": float("inf")}
    for _ in range(repeats):
        best["packed"] = min(best["packed"], run(capacity))
        best["padded"] = min(best["padded"], run(0))
    t = torch.tensor([best["packed"], best["padded"]], dtype=torch.float64, device=eng.device)
    if dist.world_size() > 1:
        dist.all_reduce_sum(t)
    packed_s, padded_s = (float(x) for x in t.tolist())
    if packed_s < (1 - CHOICE_MARGIN) * padded_s:
        pack, rule = True, "measured: packed faster"
    elif padded_s < (1 - CHOICE_MARGIN) * packed_s:
        pack, rule = False, "measured: padded faster"
    else:
        pack = saved >= MIN_POSITIONS_SAVED
        rule = f"within {CHOICE_MARGIN:.0%}: by the positions packing saves ({saved:.0%})"
    # the values the rule compared, unrounded (a record that re-derives the choice exactly)
    info: Dict[str, object] = {"packed_forward_s": packed_s, "padded_forward_s": padded_s,
                               "positions_saved": saved, "rule": rule,
                               "packed_kernel": eng.packed_kernel if getattr(eng, "packed_varlen", False)
                               else "4-D mask", "repeats": repeats}
    return pack, info


def forward_only(eng, batch: Dict[str, torch.Tensor]) -> None:
    """The training forward of one micro-batch (``Engine.micro_step``'s, loss included) without gradients."""
    dev = eng.to_device
    mask, pos, seg = batch.get("attention_mask"), batch.get("position_ids"), batch.get("segments")
    extra = {} if seg is None else {"segments": seg.to(eng.device)}
    with torch.no_grad(), eng.attention_context(batch):
        eng.engine(dev(batch["input_ids"]), None if mask is None else dev(mask), dev(batch["labels"]),
                   None if pos is None else dev(pos), False, None, None, **extra)
