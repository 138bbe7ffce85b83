"""The training objective: the next-token cross-entropy over the answer tokens, with the output layer applied only
where a label is trained."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

PACKED_IMPL = "remix_varlen"   # remix_ds.attention.IMPL (not imported: attention imports nothing from here)

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

    def __init__(self, lm: torch.nn.Module, penalties: Sequence[Any] = ()):
        super().__init__()
        self.lm = lm
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.base = base
        self._decoder = base.get_decoder()
        self._head = base.get_output_embeddings()
        # families that transform the logits after the output layer (Granite divides by logits_scaling, Cohere
        # multiplies by logit_scale, Gemma 2/3 soft-cap them): run the model's own forward, which applies
        # them, and take its logits at the answer positions (exact; the full logits are formed there)
        self._own_forward = logit_transform(getattr(base, "config", None)) is not None
        self._config = getattr(base, "config", None)   # whose attention implementation a packed batch checks
        # penalties (remix_ds/penalties.py) live outside the module tree: DeepSpeed must not see a reference
        # model's weights as the trained model's
        object.__setattr__(self, "penalties", list(penalties))

    def _run(self, model: Optional[torch.nn.Module], input_ids, attention_mask, position_ids, **extra):
        """(hidden states or, for logit-transforming families, the logits; the head that maps them to logits) of
        `model` (None: the trained model)."""
        lm = self.lm if model is None else model
        if self._own_forward:   # "hidden" is then the logits themselves, and the head the identity
            return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, **extra).logits, torch.nn.Identity()
        decoder = self._decoder if model is None else model.get_decoder()
        head = self._head if model is None else model.get_output_embeddings()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **extra).last_hidden_state, head

    def answer_logits(self, fwd, model: Optional[torch.nn.Module]) -> torch.Tensor:
        """The logits of `model` (None: the trained model as it is now, e.g. with its adapter disabled) at the
        answer positions of a training forward (``penalties.Forward``): [n, vocab]."""
        hidden, head = self._run(model, fwd.input_ids, fwd.attention_mask, fwd.position_ids)
        hidden = hidden[:, :fwd.input_ids.shape[1]]
        return head(_answer_rows(hidden, fwd.answer_index))

    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, predict=False, answer_index=None,
                answer_target=None, segments=None):
        """Without labels: the full logits. With labels: the answer tokens' cross-entropy sum (fp32); with
        ``predict`` the greedy token at each answer position instead; with penalties (``loss_terms``) a pair
        (the cross-entropy sum, {penalty name: its raw term}). ``segments``: a varlen-packed batch (below)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = None   # right padding: see the class docstring
        # --- packed attention without a 4-D mask (remix_ds.attention; collate_varlen): one row, the examples'
        # boundaries passed to every attention layer, which attends through remix_ds.attention.IMPL (the caller,
        # Engine.micro_step, switches the model to it for forward and backward)
        extra = {}
        if segments is not None:
            if labels is None:
                raise ValueError("a varlen-packed batch (segments) needs labels: its segments leave out the last column")
            if self._config is None or self._config._attn_implementation != PACKED_IMPL:
                raise RuntimeError("a varlen-packed batch outside remix_ds.attention.packed_attention: its examples "
                                   "would attend to each other")
            if self.penalties:
                raise RuntimeError("a varlen-packed batch with penalties: their reference forwards take a mask")
            attention_mask, extra = None, {"packed_segments": segments}
        # ---
        if labels is not None and input_ids.shape[1] > 1:   # the last position predicts nothing trained
            input_ids = input_ids[:, :-1]
            if attention_mask is not None:   # a packed batch's [rows, 1, L, L] mask
                attention_mask = attention_mask[..., :-1, :-1].contiguous()
            if position_ids is not None:
                position_ids = position_ids[:, :-1]
        training = labels is not None and not predict and self.penalties and torch.is_grad_enabled()
        if training:
            for p in self.penalties:
                p.begin()
        hidden, head = self._run(None, input_ids, attention_mask, position_ids, **extra)
        if labels is None:
            return head(hidden)
        hidden = hidden[:, :labels.shape[1] - 1]   # [B, L-1, H] (a one-token batch: no position to train)
        if predict:   # teacher-forced scoring: the greedy token at each answer position
            return answer_argmax(hidden, head, labels)
        if answer_index is None:   # Engine.micro_step passes them computed on the host (no device sync)
            answer_index, answer_target = answer_positions(labels)
        logits = head(_answer_rows(hidden, answer_index))
        loss = F.cross_entropy(logits.float(), answer_target, reduction="sum")
        if not training:
            return loss
        from .penalties import Forward

        fwd = Forward(self, input_ids, attention_mask, position_ids, answer_index, logits)
        return loss, {p.name: p.term(fwd) for p in self.penalties}


def combine(loss_sum: torch.Tensor, terms: Dict[str, torch.Tensor], penalties: Sequence[Any], scale: float,
            world: int) -> torch.Tensor:
    """The micro-batch's loss to back-propagate: the answer cross-entropy sum times `scale` (which DeepSpeed's 1/gas
    and the rank average turn into the global batch's mean per answer token), plus each penalty times its weight and
    its ``scaling`` factor (``penalty_factor``)."""
    total = loss_sum * scale
    for p in penalties:
        total = total + p.weight * terms[p.name] * penalty_factor(p.scaling, scale, world)
    return total


def penalty_factor(scaling: str, scale: float, world: int) -> float:
    """How a penalty's raw term enters a micro-batch's loss, given DeepSpeed's 1/gas per micro-batch and the average
    over ranks: ``tokens`` (a sum over the answer positions) like the answer loss, times `scale`; ``slice`` (one
    rank's slice of a parameter penalty, the same at every micro-step) times the world size, so that the step adds
    the whole penalty once; ``batch`` (a mean over a batch every rank and micro-step shares) as it is."""
    return {"tokens": scale, "slice": float(world), "batch": 1.0}[scaling]
