
import pytest

from remix_ds.data.formatting import IGNORE, collate, encode_example, encode_examples, render_prompt
from remix_ds.data.example import Example
from remix_ds.data.kvr import ALPHABET, kvr_examples, kvr_pairs
from remix_ds.data.mixing import PASSAGE_PROMPT, num_mix_examples, random_word_examples, word_list


def test_kvr_pairs_are_seeded_unique_and_well_formed():
    a = kvr_pairs(500, seed=3)
    assert a == kvr_pairs(500, seed=3)
    assert a != kvr_pairs(500, seed=4)
    assert len({k for k, _ in a}) == 500
    for k, v in a:
        assert len(k) == len(v) == 8 and set(k + v) <= set(ALPHABET)
    # a part's first N pairs do not depend on N
    assert kvr_pairs(50, seed=3) == a[:50]


def test_kvr_parts_are_disjoint():
    keys = {part: {k for k, _ in kvr_pairs(400, seed=1, part=part)} for part in "ABP"}
    assert not keys["A"] & keys["B"] and not keys["A"] & keys["P"] and not keys["B"] & keys["P"]


def test_kvr_prompt_format():
    ex = kvr_examples(1, seed=0)[0]
    key = ex.prompt.split()[4]
    assert ex.prompt == f"The value of key {key} is?"
    assert len(ex.answer) == 8 and ex.role == "train"


def test_random_words_mixing_count_and_shape():
    assert num_mix_examples(100, 1.0) == 100
    assert num_mix_examples(100, 0.25) == 25
    assert num_mix_examples(7, 0.5) == 3  # int(), as in the study
    with pytest.raises(ValueError):
        num_mix_examples(10, -0.1)
    words = set(word_list())
    assert len(words) > 100_000
    mix = random_word_examples(5, seed=1, prompt_words=4, target_words=3)
    assert mix == random_word_examples(5, seed=1, prompt_words=4, target_words=3)
    for ex in mix:
        assert ex.role == "mix" and not ex.factoid
        assert ex.prompt.startswith(PASSAGE_PROMPT)
        body = ex.prompt[len(PASSAGE_PROMPT):].split()
        assert len(body) == 4 and len(ex.answer.split()) == 3
        assert set(body) <= words and set(ex.answer.split()) <= words


def test_formatting_and_label_masking(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ex = Example(prompt="The value of key abcd1234 is?", answer="zz9yy8xx")
    enc = encode_example(tok, ex)
    text = tok.decode(enc.input_ids)
    assert text == "<s>" + render_prompt(ex.prompt) + ex.answer + "</s>"
    assert render_prompt("Q") == "<|user|>\nQ\n<|assistant|>\n"
    n_prompt = len(enc.input_ids) - len(tok.encode(ex.answer, add_special_tokens=False)) - 1
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert all(lab == IGNORE for lab in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]  # answer tokens and EOS are trained
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == ex.answer + "</s>"

    short = Example(prompt="Q?", answer="a")
    batch = collate([enc, encode_example(tok, short)], pad_id=tok.pad_token_id)
    row = batch["labels"][1]
    n_short = len(encode_example(tok, short).input_ids)
    assert (row[n_short:] == IGNORE).all()            # padding is never trained on
    assert (batch["attention_mask"][1, n_short:] == 0).all()
    assert (batch["input_ids"][1, n_short:] == tok.pad_token_id).all()


def test_too_long_examples_are_dropped_and_counted(tiny_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    exs = [Example(prompt="short?", answer="a"), Example(prompt=" ".join(["word"] * 200), answer="b")]
    kept, dropped = encode_examples(tok, exs, max_seq_length=32, what="t")
    assert dropped == 1 and len(kept) == 1 and kept[0].index == 0
    assert "dropped 1 of 2" in caplog.text
