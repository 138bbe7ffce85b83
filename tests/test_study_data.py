"""``semantics: study`` on the data side (docs/fidelity.md), each rule checked against a few-line
re-implementation of the study's released code (/work/study: src/datasets.py, src/core/data/sft.py,
scripts/run_stage2.sh) written here, and the default ``semantics: remix`` checked unchanged. No training:
only a tokenizer (the tiny model's, trained in seconds) and the offline fixtures."""
import json
import random

import pytest

from conftest import REPO
from remix_ds.config import recipe_from_dict
from remix_ds.data import dataset_examples, mixing_examples, stage_train_set
from remix_ds.data import mixing as mixing_mod
from remix_ds.data import sources as sources_mod
from remix_ds.data.formatting import IGNORE, encode_example, prompt_ids
from remix_ds.errors import DataError
from remix_ds.evaluate import encode_for_scoring

FIX = REPO / "tests" / "fixtures"
POPQA_RELEASED = FIX / "local" / "released" / "popqa_yet_to_learn" / "yet_to_learn_knowledge.json"
GSM8K = FIX / "hub" / "gsm8k" / "main" / "train.jsonl"
RANDOM_FILE = FIX / "local" / "random_pretraining" / "random_pretraining.jsonl"


# ------------------------------------------------------------------ the study's code, re-implemented

def study_qa_mem_input_text(datapoint):
    """src/datasets.py:60 (popqa, triviaqa)."""
    return datapoint['input_text'].strip() + '\nThe answer is: '


def study_concat_messages(messages, eos):
    """src/core/data/sft.py:214-226: the training text (before the tokenizer adds BOS)."""
    text = ""
    for m in messages:
        if m["role"] == "user":
            text += "<|user|>\n" + m["content"].strip() + "\n"
        else:
            text += "<|assistant|>\n" + m["content"].strip() + eos + "\n"
    return text.strip()


def study_apply_message_format(query):
    """src/core/data/sft.py:313-316: the evaluation prompt."""
    return f"<|user|>\n{query}\n<|assistant|>\n"


def study_mixing(rows, n, seed):
    """src/datasets.py:523-524 after src/train.py:102: Python's random seeded with the run seed, shuffled, sliced."""
    state = random.getstate()
    try:
        random.seed(seed)
        rows = list(rows)
        random.shuffle(rows)
    finally:
        random.setstate(state)
    return rows[:n]


def jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def tok():
    from remix_ds.config import TinySpec
    from remix_ds.tiny import train_tokenizer
    return train_tokenizer(TinySpec())


@pytest.fixture(autouse=True)
def _fresh_caches():
    sources_mod.clear_cache()
    mixing_mod.clear_cache()
    yield


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def recipe(datasets_, stages, semantics=None, seed=5):
    raw = {"name": "t", "output_dir": "/tmp/unused", "model": "tiny", "seed": seed, "datasets": datasets_}
    if semantics:
        raw["semantics"] = semantics
    for k, st in enumerate(stages, 1):
        raw[f"stage{k}"] = dict({"epochs": 1, "global_batch_size": 4}, **st)
    return recipe_from_dict(raw, where="r.yaml")


def stage(r, k):
    return r.variants[0].stages[k - 1]


# ------------------------------------------------------------------ 5. prompt whitespace

def popqa_recipe(semantics=None):
    return recipe({"A": {"source": "popqa", "path": str(POPQA_RELEASED), "num_examples": 4, "shuffle": False}},
                  [{"data": "A"}], semantics)


def test_study_trains_on_the_stripped_prompt_and_evaluates_on_the_spaced_one(tok):
    released = json.load(open(POPQA_RELEASED))[:4]
    examples = dataset_examples(popqa_recipe("study"), "A")
    assert len(examples) == 4
    for ex, dp in zip(examples, released):
        input_text = study_qa_mem_input_text(dp)
        target = dp['target_text'].strip()
        train_text = study_concat_messages([{"role": "user", "content": input_text},
                                            {"role": "assistant", "content": target}], tok.eos_token)
        assert train_text.endswith("The answer is:\n<|assistant|>\n" + target + tok.eos_token)
        enc = encode_example(tok, ex)
        assert text(tok, enc.input_ids) == tok.bos_token + train_text
        # the study masks up to "<|assistant|>\n" (sft.py:247-258): the answer and its EOS are trained
        assert text(tok, [t for t in enc.labels if t != IGNORE]) == target + tok.eos_token
        # generation and teacher-forced scoring: the evaluation string, with the space before the newline
        eval_prompt = study_apply_message_format(input_text)
        assert eval_prompt.endswith("The answer is: \n<|assistant|>\n")
        assert text(tok, prompt_ids(tok, ex.prompt)) == tok.bos_token + eval_prompt
        scored = encode_for_scoring(tok, [ex])[0]
        assert text(tok, scored.input_ids) == tok.bos_token + eval_prompt + target + tok.eos_token
        assert text(tok, [t for t in scored.labels if t != IGNORE]) == target + tok.eos_token
        assert enc.input_ids != scored.input_ids          # two token sequences, as in the study


def test_study_conversation_text_strips_turns_and_trains_the_newline_after_each_eos(tok):
    from remix_ds.data.example import Example
    turns = [("  Hi there \n", " Hello! "), ("What is 2+2?\n", "\n4\n"), ("Thanks", "You're welcome.  ")]
    ex = Example(prompt=turns[0][0], answer=turns[0][1], messages=turns, factoid=False, study_format=True)
    messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    enc = encode_example(tok, ex)
    assert text(tok, enc.input_ids) == tok.bos_token + study_concat_messages(messages, tok.eos_token)
    # sft.py:236-258: each user turn's mask starts after the newline that follows the previous EOS
    trained = "".join(a.strip() + tok.eos_token + "\n" for _, a in turns)[:-1]
    assert text(tok, [t for t in enc.labels if t != IGNORE]) == trained


def test_remix_default_keeps_the_spaced_prompt_in_training_and_evaluation(tok):
    r = popqa_recipe()
    assert not r.study
    for ex in dataset_examples(r, "A"):
        assert not ex.study_format and ex.prompt.endswith("\nThe answer is: ")
        enc = encode_example(tok, ex)
        assert enc.input_ids[:len(prompt_ids(tok, ex.prompt))] == prompt_ids(tok, ex.prompt)
        assert text(tok, enc.input_ids) == (tok.bos_token + study_apply_message_format(ex.prompt) + ex.answer
                                            + tok.eos_token)
        assert encode_for_scoring(tok, [ex])[0] == enc


# ------------------------------------------------------------------ 6. stage-2 mixing after the whole D_B pool

def gsm8k_recipe(ratio, semantics=None, num_examples=2):
    return recipe({"A": {"source": "kvr", "num_examples": 4},
                   "B": {"source": "gsm8k", "path": str(GSM8K), "num_examples": num_examples, "shuffle": False}},
                  [{"data": "A"}, {"data": "B", "mix": {"source": "random-words", "path": str(RANDOM_FILE),
                                                        "ratio": ratio}}], semantics, seed=3)


def study_stage2(ratio, num_examples=2, seed=3):
    """src/datasets.py:455-505 (maths: every row, then int(len * ratio) mixing appended), run_stage2.sh:228-230
    (train_num_examples = 2000 + 2000 * mix_ratio, printf %.0f), sft.py:86-109 (train = [0:train_num])."""
    pool = [(r["question"], r["answer"]) for r in jsonl(GSM8K)]
    mix = [(r["input_text"], r["target_text"])
           for r in study_mixing(jsonl(RANDOM_FILE), int(len(pool) * ratio), seed)]
    train_num = int("%.0f" % (num_examples + num_examples * ratio))
    return (pool + mix)[:train_num]


@pytest.mark.parametrize("ratio", [1.0, 2.0, 4.0])
def test_study_stage2_takes_the_first_num_examples_times_1_plus_r_of_pool_then_mixing(ratio):
    data, train = stage_train_set(gsm8k_recipe(ratio, "study"), stage(gsm8k_recipe(ratio, "study"), 2), 2)
    want = study_stage2(ratio)
    assert [(e.prompt.strip(), e.answer.strip()) for e in train] == [(q.strip(), a.strip()) for q, a in want]
    n_pool = len(jsonl(GSM8K))                             # 6 rows: ratio 1 and 2 leave no room for mixing
    assert len(data) == min(len(want), n_pool) and all(e.role == "train" for e in data)
    assert [e.role for e in train[len(data):]] == ["mix"] * (len(want) - len(data))
    assert (len(train) - len(data) > 0) == (ratio == 4.0)
    assert all(e.study_format for e in train)


def test_study_stage_with_a_factoid_dataset_keeps_all_its_mixing():
    """A factoid loader cuts its pool to 2000 = num_examples (src/datasets.py:82, 199-202, 391): all of the
    mixing gets in."""
    r = recipe({"A": {"source": "popqa", "path": str(POPQA_RELEASED), "num_examples": 4, "shuffle": False}},
               [{"data": "A", "mix": {"source": "random-words", "path": str(RANDOM_FILE), "ratio": 2.0}}],
               "study", seed=3)
    data, train = stage_train_set(r, stage(r, 1), 1)
    released = json.load(open(POPQA_RELEASED))[:4]
    want = [study_qa_mem_input_text(d) for d in released] + \
           [m["input_text"] for m in study_mixing(jsonl(RANDOM_FILE), 8, 3)]
    assert [e.prompt for e in train] == want and len(data) == 4


def test_remix_default_adds_mixing_after_the_cut():
    r = gsm8k_recipe(4.0)
    data, train = stage_train_set(r, stage(r, 2), 2)
    rows = jsonl(GSM8K)
    assert [e.prompt for e in data] == [x["question"].strip() for x in rows[:2]]
    assert len(train) == 2 + int(2 * 4.0) and [e.role for e in train[2:]] == ["mix"] * 8
    assert not any(e.study_format for e in train)


def test_docs_no_longer_claim_the_study_mixing_never_reached_training():
    for f in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        assert "never reached training" not in f.read_text(), f


# ------------------------------------------------------------------ 7. the study's random-word mixing file

def random_file_recipe(semantics=None, ratio=1.0, path=RANDOM_FILE, n=4):
    return recipe({"A": {"source": "kvr", "num_examples": n}},
                  [{"data": "A", "mix": {"source": "random-words", "path": str(path), "ratio": ratio}}],
                  semantics, seed=7)


def test_study_draws_the_file_passages_as_the_study_does():
    r = random_file_recipe("study", ratio=2.0)
    mix = mixing_examples(r, stage(r, 1), 4, 1)
    want = study_mixing(jsonl(RANDOM_FILE), int(4 * 2.0), 7)
    assert [(e.prompt, e.answer) for e in mix] == [(w["input_text"], w["target_text"]) for w in want]
    assert all(e.role == "mix" and not e.factoid and e.source == "random-words" for e in mix)


def test_remix_reads_the_file_passages_verbatim_and_refuses_a_short_file():
    r = random_file_recipe(ratio=2.0)
    mix = mixing_examples(r, stage(r, 1), 4, 1)
    rows = {(x["input_text"], x["target_text"]) for x in jsonl(RANDOM_FILE)}
    assert len(mix) == 8 and len({e.prompt for e in mix}) == 8
    assert all((e.prompt, e.answer) in rows and e.role == "mix" and not e.study_format for e in mix)
    assert mix == mixing_examples(r, stage(r, 1), 4, 1)                       # deterministic
    with pytest.raises(DataError, match=r"26 mixing examples needed but .* holds only 12 passages"):
        mixing_examples(r, stage(r, 1), 13, 1)
    r = random_file_recipe("study")                      # the study slices what the file holds
    assert len(mixing_examples(r, stage(r, 1), 13, 1)) == 12


def test_remix_random_words_without_a_path_are_generated_as_before():
    r = recipe({"A": {"source": "kvr", "num_examples": 4}},
               [{"data": "A", "mix": {"source": "random-words", "ratio": 1.0, "prompt_words": 3,
                                      "target_words": 2}}], seed=7)
    mix = mixing_examples(r, stage(r, 1), 4, 1)
    assert mix == mixing_mod.random_word_examples(4, 7 + 7919, 3, 2)


@pytest.mark.parametrize("line, error", [
    ('{"datapoint_idx": 1, "input_text": "a b"}', r"line 3: missing field 'target_text'"),
    ('{"datapoint_idx": "x", "input_text": "a", "target_text": "b"}', r"line 3: datapoint_idx must be an integer"),
    ('{"datapoint_idx": 1, "input_text": "a", "target_text": 5}', r"line 3: target_text must be a non-empty string"),
    ('{"datapoint_idx": 1, "input_text": ', r"bad\.jsonl:3: malformed JSON line"),
    ('["a", "b"]', r"bad\.jsonl:3: expected a JSON object per line"),
])
def test_malformed_passage_file_rows_name_the_file_and_line(tmp_path, line, error):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"datapoint_idx": 0, "input_text": "a", "target_text": "b"})
    bad.write_text(good + "\n\n" + line + "\n")           # a blank line 2: the error names line 3
    for semantics in (None, "study"):
        r = random_file_recipe(semantics, path=bad)
        with pytest.raises(DataError, match=error) as e:
            mixing_examples(r, stage(r, 1), 4, 1)
        assert str(bad) in str(e.value) and "stage1 mix (random-words)" in str(e.value)


# ------------------------------------------------------------------ 8. repeated rows

def released_with_repeats(tmp_path):
    """The study's released schema; row 3 repeats row 1's question and fact, row 5 row 2's question with
    another answer (two people of one name)."""
    qs = [("Who wrote Emma?", "Jane Austen"), ("What is John Smith's occupation?", "explorer"),
          ("Who wrote Emma?", "Jane Austen"), ("What is the capital of Peru?", "Lima"),
          ("What is John Smith's occupation?", "footballer"), ("What is the capital of Chile?", "Santiago")]
    recs = [{"input_text": q, "target_text": a, "target_for_eval": [a],
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qs]
    p = tmp_path / "popqa_yet_to_learn" / "yet_to_learn_knowledge.json"
    p.parent.mkdir()
    p.write_text(json.dumps(recs))
    return p, recs


def repeats_recipe(path, semantics=None, n=3):
    return recipe({"A": {"source": "popqa", "path": str(path), "num_examples": n, "shuffle": False},
                   "B": {"source": "popqaB", "path": str(path), "num_examples": n, "shuffle": False}},
                  [{"data": "A"}, {"data": "B"}], semantics)


def test_study_keeps_every_row_so_the_first_n_and_the_b_offset_are_the_studys(tmp_path):
    path, recs = released_with_repeats(tmp_path)
    r = repeats_recipe(path, "study")
    study = [(study_qa_mem_input_text(d), d["target_text"]) for d in recs]
    # load_qa_mem_dataset keeps every row (src/datasets.py:57-82); the ...B offset as load_mem_dataset's [2000:4000]
    assert [(e.prompt, e.answer) for e in dataset_examples(r, "A")] == study[:3]
    assert [(e.prompt, e.answer) for e in dataset_examples(r, "B")] == study[3:6]


def test_study_keeps_repeated_kvr_keys(tmp_path):
    rows = [{"key": "k1", "value": "v1"}, {"key": "k2", "value": "v2"}, {"key": "k1", "value": "v3"}]
    p = tmp_path / "kvr.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in rows))
    spec = {"source": "kvr", "path": str(p), "num_examples": 3, "shuffle": False}
    r = recipe({"A": spec}, [{"data": "A"}], "study")
    study = [(f'The value of key {d["key"]} is?', d["value"]) for d in rows][:2000]    # src/datasets.py:375-391
    assert [(e.prompt, e.answer) for e in dataset_examples(r, "A")] == study
    with pytest.raises(DataError, match="duplicate KVR key"):
        dataset_examples(recipe({"A": spec}, [{"data": "A"}]), "A")


def test_remix_default_merges_and_drops_repeated_questions(tmp_path):
    path, recs = released_with_repeats(tmp_path)
    r = repeats_recipe(path, n=2)
    a, b = dataset_examples(r, "A"), dataset_examples(r, "B")
    suffix = "\nThe answer is: "
    # Emma's repeat merged into its first row; John Smith (two answers) dropped as ambiguous: 3 examples of 6 rows
    assert [e.prompt for e in a] == [q + suffix for q in ("Who wrote Emma?", "What is the capital of Peru?")]
    assert [e.prompt for e in b] == ["What is the capital of Chile?" + suffix]
