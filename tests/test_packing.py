"""Packing several examples into one row with per-example attention gives the same losses as padding."""
import pytest
import torch
import torch.nn.functional as F

from remix_ds.data.formatting import IGNORE, collate, collate_packed, encode_example, pack_rows
from remix_ds.data.kvr import kvr_examples
from remix_ds.data.mixing import random_word_examples


def _encoded(tok):
    exs = kvr_examples(5, 0) + random_word_examples(3, 0, 6, 6)
    return [encode_example(tok, e, i) for i, e in enumerate(exs)]


def test_pack_rows_fills_rows_without_losing_examples(tiny_dir):
    from remix_ds.model import load_tokenizer

    enc = _encoded(load_tokenizer(tiny_dir))
    cap = max(len(e.input_ids) for e in enc) + 8
    rows = pack_rows(enc, capacity=cap)
    assert sorted(e.index for row in rows for e in row) == list(range(len(enc)))
    assert all(sum(len(e.input_ids) for e in row) <= cap for row in rows)
    assert len(rows) < len(enc)
    batch = collate_packed(enc, pad_id=2, capacity=cap)
    assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert (batch["labels"] != IGNORE).sum() == sum(e.num_answer_tokens for e in enc)


def test_packed_batch_gives_the_per_example_losses_of_the_padded_batch(tiny_dir):
    from transformers import AutoModelForCausalLM

    from remix_ds.objective import AnswerLoss, answer_positions
    from remix_ds.model import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    enc = _encoded(tok)
    pad = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=pad["input_ids"], attention_mask=pad["attention_mask"]).logits
    ref = {e.index: F.cross_entropy(logits[i, :-1], pad["labels"][i, 1:], ignore_index=IGNORE, reduction="sum")
           for i, e in enumerate(enc)}

    packed = collate_packed(enc, tok.pad_token_id, capacity=128)
    with torch.no_grad():
        plog = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                     position_ids=packed["position_ids"]).logits
    rows = pack_rows(enc, 128)
    for r, row in enumerate(rows):
        ce = F.cross_entropy(plog[r, :-1], packed["labels"][r, 1:], ignore_index=IGNORE, reduction="none")
        off = 0
        for e in row:
            n = len(e.input_ids)
            torch.testing.assert_close(ce[off:off + n - 1].sum(), ref[e.index], atol=1e-3, rtol=1e-5)
            off += n
    # and the training loss the engine uses (answer-only LM head) is the same packed or padded
    head = AnswerLoss(model)
    with torch.no_grad():
        a = head(pad["input_ids"], pad["attention_mask"], pad["labels"])
        b = head(packed["input_ids"], packed["attention_mask"], packed["labels"], packed["position_ids"])
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(a, sum(ref.values()), atol=1e-3, rtol=1e-5)
    # ... and the same when the answer positions come as indices computed on the host (Engine.micro_step's
    # sync-free path), padded and packed
    for batch, pos in ((pad, None), (packed, packed["position_ids"])):
        index, target = answer_positions(batch["labels"])
        assert len(index) == int((batch["labels"][:, 1:] != IGNORE).sum()) == len(target)
        with torch.no_grad():
            by_mask = head(batch["input_ids"], batch["attention_mask"], batch["labels"], pos)
            by_index = head(batch["input_ids"], batch["attention_mask"], batch["labels"], pos, False, index, target)
        torch.testing.assert_close(by_index, by_mask, atol=1e-5, rtol=1e-6)
    # ... with the decoder run over all columns but the last (no label follows it), padded and packed
    seen = []
    hook = head._decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    with torch.no_grad():
        head(pad["input_ids"], pad["attention_mask"], pad["labels"])
        head(packed["input_ids"], packed["attention_mask"], packed["labels"], packed["position_ids"])
        pred = head(pad["input_ids"], pad["attention_mask"], pad["labels"], predict=True)
        one = head(pad["input_ids"][:, :1], None, pad["labels"][:, :1])   # nothing to train in one column
    hook.remove()
    L, P = pad["input_ids"].shape[1], packed["input_ids"].shape[1]
    assert seen == [L - 1, P - 1, L - 1, 1] and pred.shape == (len(enc), L - 1) and float(one) == 0.0


def _fake(lengths):
    from remix_ds.data.formatting import Encoded
    return [Encoded(input_ids=list(range(5, 5 + n)), labels=[IGNORE] * (n - 2) + [7, 8], index=i)
            for i, n in enumerate(lengths)]


def test_pack_rows_shrinks_the_padded_area_below_first_fit():
    import random

    from remix_ds.data.formatting import _first_fit_decreasing

    rng = random.Random(0)
    for trial in range(20):
        lengths = [rng.randint(24, 32) for _ in range(32)] + [rng.randint(90, 118) for _ in range(32)]
        rng.shuffle(lengths)
        batch = _fake(lengths)
        rows = pack_rows(batch, 128)
        assert sorted(e.index for row in rows for e in row) == list(range(len(batch)))
        width = max(sum(len(e.input_ids) for e in row) for row in rows)
        assert width <= 128
        ffd = _first_fit_decreasing(sorted(batch, key=lambda e: -len(e.input_ids)), 128)
        ffd_width = max(sum(len(e.input_ids) for e in row) for row in ffd)
        assert len(rows) * width <= len(ffd) * ffd_width
        # padding is what the packing leaves: well under the 40%+ of padding every row to the longest
        assert 1 - sum(lengths) / (len(rows) * width) < 0.12, trial


def test_collate_packed_falls_back_to_padding_when_packing_saves_nothing():
    from remix_ds.data.formatting import collate_varlen

    uniform = _fake([64] * 8)
    b = collate_packed(uniform, pad_id=0, capacity=256)
    assert b["attention_mask"].dim() == 2 and "position_ids" not in b and b["input_ids"].shape == (8, 64)
    b = collate_varlen(uniform, pad_id=0)
    assert b["attention_mask"].dim() == 2 and "segments" not in b and b["input_ids"].shape == (8, 64)
    b = collate_varlen(_fake([20] * 6 + [100] * 2), pad_id=0)
    assert b["input_ids"].shape == (1, 320) and b["segments"].lengths == [20] * 6 + [100, 99]
    mixed = _fake([20] * 6 + [100] * 2)
    b = collate_packed(mixed, pad_id=0, capacity=128)
    assert b["attention_mask"].dim() == 4 and b["input_ids"].shape[0] < 8


def test_packed_micro_batches_are_balanced_by_tokens():
    from remix_ds.batching import split_global_batch

    batch = _fake([28] * 24 + [110] * 8)
    slots = split_global_batch(batch, 4, by_tokens=True)
    loads = [sum(len(e.input_ids) for e in s) for s in slots]
    assert sorted(e.index for s in slots for e in s) == list(range(32))
    assert max(loads) - min(loads) <= 110
    # padded micro-batches keep near-equal counts, grouped by length instead
    counts = [len(s) for s in split_global_batch(batch, 4)]
    assert counts == [8, 8, 8, 8]


class _FakeEngine:
    """What stage.global_step uses of an Engine: micro_step, step, device. Records the batch shapes."""
    device = torch.device("cpu")

    def __init__(self):
        self.shapes, self.scales, self.steps = [], [], 0

    def micro_step(self, batch, scale):
        self.shapes.append(tuple(batch["input_ids"].shape))
        self.scales.append(scale)
        return torch.tensor(1.0, dtype=torch.float64)

    def step(self):
        self.steps += 1


def test_global_step_counts_the_token_positions_it_runs():
    from remix_ds.batching import TokenCount, global_step, throughput

    chunk = _fake([28] * 12 + [110] * 4)
    real = sum(len(e.input_ids) for e in chunk)
    counts = {}
    for pack in (0, 128):
        for world, rank in ((1, 0), (2, 0), (2, 1)):
            eng, count = _FakeEngine(), TokenCount()
            global_step(eng, chunk, world, 2, rank, pad=0, pack=pack, count=count)
            assert eng.steps == 2 and count.ran == sum(b * l for b, l in eng.shapes)
            counts[pack, world, rank] = count.ran
    # every real token is run once, by one rank; padding comes on top
    for pack in (0, 128):
        assert counts[pack, 1, 0] >= real and counts[pack, 2, 0] + counts[pack, 2, 1] >= real
    # one rank, two padded micro-batches: 8 x 28, then 4 x 28 + 4 x 110 padded to 8 x 110
    assert counts[0, 1, 0] == 8 * 28 + 8 * 110
    assert counts[0, 2, 0] + counts[0, 2, 1] == real      # four micro-batches grouped by length: no padding
    assert counts[128, 1, 0] < counts[0, 1, 0]           # packed rows: less padding
    tp = throughput(real, counts[128, 1, 0], 2.0)
    assert tp["padfree_tokens_per_s"] == real / 2 and tp["tokens_per_s"] == counts[128, 1, 0] / 2
    assert 0 <= tp["padding"] < 1 - real / counts[0, 1, 0]
    # a rank left without examples by a short last batch still steps (and its dummy batch is counted)
    eng, count = _FakeEngine(), TokenCount()
    global_step(eng, chunk[:1], 2, 1, 1, pad=0, count=count)
    assert eng.scales == [0.0] and count.ran == 28 and eng.steps == 1
    assert throughput(0, 0, 0.0)["tokens_per_s"] is None


def test_answer_loss_keeps_the_logit_transforms_of_other_families():
    """Granite divides its logits by logits_scaling and Gemma 2 soft-caps them after the output layer:
    AnswerLoss's loss and greedy tokens equal the model's own (HF loss over the same answer positions)."""
    import pytest
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    from remix_ds.objective import AnswerLoss, logit_transform

    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4)
    torch.manual_seed(0)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**kw)),
              "granite": GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, **kw)),
              "gemma2": Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=0.5, head_dim=8, **kw))}
    ids = torch.randint(0, 100, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    n = int((labels[:, 1:] != IGNORE).sum())
    for name, m in models.items():
        m.eval()
        assert (logit_transform(m.config) is None) == (name == "llama")
        with torch.no_grad():
            ref = m(input_ids=ids, labels=labels)
            ours = AnswerLoss(m)(ids, None, labels) / n
            pred = AnswerLoss(m)(ids, None, labels, predict=True)
        assert ours.item() == pytest.approx(ref.loss.item(), abs=1e-5), name
        keep = labels[:, 1:] != IGNORE
        assert torch.equal(pred[keep], ref.logits[:, :-1].argmax(-1)[keep]), name


def test_gpu_batch_widths_round_to_a_multiple_of_8_without_changing_the_loss(tiny_dir):
    """On a GPU the stage rounds batch widths up to a multiple of 8: fewer distinct shapes for per-shape
    attention plans. Padded or packed, the training loss is the same as at the natural width."""
    from transformers import AutoModelForCausalLM

    from remix_ds.data.formatting import train_width
    from remix_ds.objective import AnswerLoss
    from remix_ds.model import load_tokenizer
    from remix_ds.batching import WIDTH_MULTIPLE_CUDA

    assert WIDTH_MULTIPLE_CUDA == 8
    assert [train_width(w, 8) for w in (1, 8, 9, 17, 63, 64, 65)] == [8, 8, 16, 24, 64, 64, 72]
    assert train_width(37, 1) == 37
    tok = load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    head = AnswerLoss(model)
    enc = _encoded(tok)
    for make in (lambda m: collate(enc, tok.pad_token_id, multiple=m),
                 lambda m: collate_packed(enc, tok.pad_token_id, 128, multiple=m)):
        plain, wide = make(1), make(8)
        assert wide["input_ids"].shape[1] % 8 == 0 and wide["input_ids"].shape[1] > plain["input_ids"].shape[1]
        assert wide["input_ids"].shape[0] == plain["input_ids"].shape[0]
        with torch.no_grad():
            losses = [head(b["input_ids"], b["attention_mask"], b["labels"], b.get("position_ids")) for b in (plain, wide)]
        torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ packing without a 4-D mask (remix_ds.attention)

def _decoder_ce(model, ids, pos, **kw):
    """Per-position next-token cross-entropy (reduction none) of a causal LM over [1, L] ids, the decoder
    run on all columns but the last."""
    out = model.model(input_ids=ids[:, :-1], position_ids=pos[:, :-1], use_cache=False, **kw).last_hidden_state
    return model.lm_head(out)


def test_varlen_packing_gives_each_example_its_padded_loss_and_gradients(tiny_dir):
    """One packed row attending through remix_ds.attention (no mask: sequence boundaries) gives every example the
    loss transformers computes for it in a padded batch with its own 2-D attention mask, and the same gradients;
    an example's loss has no gradient on any other example's tokens."""
    from transformers import AutoModelForCausalLM

    from remix_ds import attention
    from remix_ds.data.formatting import collate_varlen
    from remix_ds.model import load_tokenizer
    from remix_ds.objective import AnswerLoss

    tok = load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads   # GQA is exercised
    assert attention.supports(model) is None
    enc = _encoded(tok)
    pad = collate(enc, tok.pad_token_id)
    logits = model(input_ids=pad["input_ids"], attention_mask=pad["attention_mask"]).logits
    ref = [F.cross_entropy(logits[i, :-1], pad["labels"][i, 1:], ignore_index=IGNORE, reduction="sum")
           for i in range(len(enc))]
    sum(ref).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed = collate_varlen(enc, tok.pad_token_id, multiple=8)
    ids, labels, pos, seg = packed["input_ids"], packed["labels"], packed["position_ids"], packed["segments"]
    assert ids.shape[0] == 1 and ids.shape[1] % 8 == 0 and seg.total == ids.shape[1] - 1
    assert ids.shape[1] - sum(len(e.input_ids) for e in enc) < 8   # no padding but the rounding
    with attention.packed_attention(attention.model_configs(model)):
        plog = _decoder_ce(model, ids, pos, packed_segments=seg)
    assert model.config._attn_implementation == "sdpa"   # restored
    ce = F.cross_entropy(plog[0], labels[0, 1:], ignore_index=IGNORE, reduction="none")
    off = 0
    for e, r in zip(enc, ref):
        n = len(e.input_ids)
        torch.testing.assert_close(ce[off:off + n - 1].sum(), r, atol=1e-3, rtol=1e-5)
        off += n
    ce.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)
    model.zero_grad()

    # isolation: the loss of the example in the middle has gradients on its own input embeddings only
    emb = model.model.embed_tokens(ids[:, :-1]).detach().requires_grad_()
    with attention.packed_attention(attention.model_configs(model)):
        h = model.model(inputs_embeds=emb, position_ids=pos[:, :-1], use_cache=False,
                        packed_segments=seg).last_hidden_state
    k = len(enc) // 2
    start = sum(len(e.input_ids) for e in enc[:k])
    end = start + len(enc[k].input_ids)
    F.cross_entropy(model.lm_head(h[0, start:end - 1]), labels[0, start + 1:end], ignore_index=IGNORE,
                    reduction="sum").backward()
    g = emb.grad[0].abs().sum(-1)
    assert g[start:end - 1].sum() > 0 and g[:start].sum() == 0 and g[end:].sum() == 0
    model.zero_grad()

    # the training loss (AnswerLoss, the answer-only head) is the same packed this way or padded
    head = AnswerLoss(model)
    with torch.no_grad(), attention.packed_attention(attention.model_configs(model)):
        b = head(ids, None, labels, pos, segments=seg)
    torch.testing.assert_close(b, sum(ref).detach(), atol=1e-3, rtol=1e-5)
    # outside packed_attention the model does not take the boundaries: refused, not silently attended across
    with pytest.raises(RuntimeError, match="attend to each other"):
        head(ids, None, labels, pos, segments=seg)
    assert attention.IMPL == __import__("remix_ds.objective").objective.PACKED_IMPL


def test_sdpa_groups_kernel_equals_attention_example_by_example():
    """The CPU/fp32 kernel (examples gathered into length groups, causal SDPA, scattered back) against causal
    attention written out per example with plain torch (softmax of masked scores), GQA included."""
    from remix_ds.attention import _sdpa_groups, make_segments

    torch.manual_seed(0)
    lengths = [3, 17, 5, 40, 1, 22, 9]
    T, Hq, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, Hq, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    seg = make_segments(lengths, max_groups=3)
    assert len(seg.groups) == 3
    out = _sdpa_groups(q, k, v, seg, scaling=None)
    assert out.shape == (1, T, Hq, D)
    off = 0
    for n in lengths:
        qs = q[0, :, off:off + n]
        ks, vs = (t[0, :, off:off + n].repeat_interleave(Hq // Hkv, 0) for t in (k, v))
        scores = qs @ ks.transpose(-1, -2) / D ** 0.5
        scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        ref = torch.softmax(scores, -1) @ vs   # [H, n, D]
        torch.testing.assert_close(out[0, off:off + n], ref.transpose(0, 1), atol=1e-5, rtol=1e-5)
        off += n


def test_length_groups_minimise_the_padded_attention_area():
    """group_lengths against every partition of a few lengths into at most 3 groups (brute force)."""
    import itertools
    import random

    from remix_ds.attention import group_lengths

    def cost(groups, lengths):
        return sum(len(g) * max(lengths[i] for i in g) ** 2 for g in groups)

    def partitions(items, k):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest, k):
            for j in range(len(p)):
                yield p[:j] + [[first] + p[j]] + p[j + 1:]
            if len(p) < k:
                yield p + [[first]]

    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 7))]
        got = group_lengths(lengths, 3)
        assert sorted(itertools.chain(*got)) == list(range(len(lengths))) and len(got) <= 3
        best = min(cost(p, lengths) for p in partitions(list(range(len(lengths))), 3))
        assert cost(got, lengths) == best, lengths


def test_packed_attention_is_refused_where_it_does_not_apply():
    """Models whose attention needs more than boundaries keep the 4-D mask path: supports() names why."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from remix_ds.attention import supports

    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)
    assert supports(LlamaForCausalLM(LlamaConfig(**kw))) is None
    assert supports(LlamaForCausalLM(LlamaConfig(attention_dropout=0.1, **kw))) == "attention dropout"
    assert supports(Gemma2ForCausalLM(Gemma2Config(head_dim=8, **kw))) is not None
    # varlen_attn is used only where a probe on the device agrees with sdpa_groups: on CPU it fails (a CUDA
    # kernel), so packed batches there attend through sdpa_groups
    from remix_ds.attention import kernel_name, varlen_probe
    assert varlen_probe("cpu", torch.bfloat16).startswith("varlen_attn failed")
    assert kernel_name(torch.device("cpu"), torch.bfloat16) == "sdpa_groups"


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_stage_step_with_varlen_packing_trains_as_padding(tiny_dir, one_process_dist, finetune):
    """stage.global_step on the real Engine: packed (varlen, one row per micro-batch, no padding) and padded
    steps from the same weights give the same loss and the same updated weights; gradient checkpointing on,
    so the backward recomputes the packed forward through the packed attention."""
    from remix_ds.config import LoraSpec
    from remix_ds.engine import Engine
    from remix_ds.model import load_for_training, load_tokenizer
    from remix_ds.batching import TokenCount, global_step
    from remix_ds.zero import resolve_ds_config

    tok = load_tokenizer(tiny_dir)
    enc = _encoded(tok)
    cfg = resolve_ds_config("zero2", global_batch_size=8, micro_batch_size=4, grad_accum=2, grad_clip=1.0,
                            precision="fp32", hidden_size=128, finetune=finetune, adapt=True)
    out = {}
    for pack in (0, 128):
        torch.manual_seed(0)
        model, _ = load_for_training(tiny_dir, finetune, LoraSpec(r=4, alpha=8), cfg, torch.float32,
                                     gradient_checkpointing=True)
        eng = Engine(model, cfg, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, total_steps=4, warmup_ratio=0.0)
        assert eng.packed_varlen and eng.packed_kernel == "sdpa_groups"
        count, grads, real_step = TokenCount(), [], eng.step

        def step():   # the gradients each step applies (compared rather than the weights: Adam's first update,
            # about sign(g) * lr, turns rounding noise in tiny gradients into lr-sized differences)
            grads.append({n: p.grad.clone() for n, p in eng.module.named_parameters() if p.grad is not None})
            real_step()
        eng.step = step
        loss = float(global_step(eng, enc, 1, 2, 0, tok.pad_token_id, pack, count))
        out[pack] = (loss, count.ran, grads)
        eng.close()
    assert out[128][1] == sum(len(e.input_ids) for e in enc) < out[0][1]   # packed: no padding at all
    assert out[0][0] == pytest.approx(out[128][0], rel=1e-5)
    assert len(out[0][2]) == len(out[128][2]) == 2 and out[0][2][-1]   # gas 2: two micro-steps, then the update
    for n, g in out[0][2][-1].items():
        torch.testing.assert_close(out[128][2][-1][n], g, atol=1e-5, rtol=1e-4, msg=n)



def test_packing_auto_measures_forwards_without_changing_the_engine(tiny_dir, one_process_dist):
    """choose_packing times padded and packed forwards of a global batch and picks the clearly faster (else by the
    positions packing saves, the same in every run); it trains nothing
    (the weights and the optimizer's step count stay, no gradient is left)."""
    from remix_ds.attention import choose_packing
    from remix_ds.config import LoraSpec
    from remix_ds.engine import Engine
    from remix_ds.model import load_for_training, load_tokenizer
    from remix_ds.zero import resolve_ds_config

    tok = load_tokenizer(tiny_dir)
    enc = _encoded(tok)
    cfg = resolve_ds_config("zero2", global_batch_size=8, micro_batch_size=4, grad_accum=2, grad_clip=1.0,
                            precision="fp32", hidden_size=128, finetune="full", adapt=True)
    model, _ = load_for_training(tiny_dir, "full", LoraSpec(r=4, alpha=8), cfg, torch.float32)
    eng = Engine(model, cfg, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, total_steps=4, warmup_ratio=0.0)
    before = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
    # factoids alone (near-equal lengths): nothing to pack, nothing timed
    factoids = [e for e in enc if len(e.input_ids) <= min(len(x.input_ids) for x in enc) + 2]
    packed, how = choose_packing(eng, factoids[:4], 1, 2, 0, tok.pad_token_id, 128, repeats=2)
    assert not packed and how["positions_saved"] < 0.05 and "not measured" in how["rule"]
    packed, how = choose_packing(eng, enc, 1, 2, 0, tok.pad_token_id, 128, repeats=2)
    ps, pd = how["packed_forward_s"], how["padded_forward_s"]
    # clearly faster (by more than 10%) wins; within 10% the data decides: pack where it saves >= 20% of positions
    expected = True if ps < 0.9 * pd else False if pd < 0.9 * ps else how["positions_saved"] >= 0.2
    assert packed == expected and how["packed_kernel"] == "sdpa_groups"
    assert 0 < how["positions_saved"] < 1   # this batch mixes lengths: packing removes some padding
    assert how["packed_forward_s"] > 0 and how["padded_forward_s"] > 0
    for n, p in eng.module.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    assert eng.engine.global_steps == 0 and eng.engine.training
    eng.close()
