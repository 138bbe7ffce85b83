"""Packing several examples into one row with per-example attention gives the same losses as padding."""
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
    uniform = _fake([64] * 8)
    b = collate_packed(uniform, pad_id=0, capacity=256)
    assert b["attention_mask"].dim() == 2 and "position_ids" not in b and b["input_ids"].shape == (8, 64)
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
