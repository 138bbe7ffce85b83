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

    from remix_ds.engine import AnswerLoss
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
