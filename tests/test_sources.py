"""Every dataset source, mixing source, replay, multi-stage recipes and filter-unknown, offline.

The hub path is tested through the same ``datasets.load_dataset(id, config, split=...)`` call the hub uses:
the fixtures under tests/fixtures/hub/ are laid out like the hub repositories (README configs, split file
names), and either named directly (``name: <dir>``) or substituted for the real hub id by a patched loader
that also checks the ids, configs, splits and revisions each source asks for.
"""
import json
import sys

import pytest
import yaml

from conftest import REPO, run_cli
from remix_ds.config import DatasetSpec, MixSpec, recipe_from_dict
from remix_ds.data import (MIX_SOURCES, SOURCES, dataset_examples, is_factoid, mixing_examples,
                           stage_train_set)
from remix_ds.data import mixing as mixing_mod
from remix_ds.data import sources as sources_mod
from remix_ds.data.formatting import IGNORE, encode_example, encode_examples, prompt_ids, render_prompt
from remix_ds.data.mixing import PASSAGE_PROMPT
from remix_ds.data.sources import QA_SUFFIX, apps_prompt, lama_prompt, load_examples
from remix_ds.errors import ConfigError, DataError

FIX = REPO / "tests" / "fixtures"
HUB = FIX / "hub"
LOCAL = FIX / "local"


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Keep datasets' Arrow cache out of the user's ~/.cache."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    yield
    datasets.config.HF_DATASETS_CACHE = old


@pytest.fixture(autouse=True)
def _fresh_caches():
    sources_mod.clear_cache()
    mixing_mod.clear_cache()
    yield


def load(source, n=5, seed=1, **kw):
    """The examples of a recipe dataset named D with this source and DatasetSpec fields."""
    return load_examples(DatasetSpec(source=source, num_examples=n, **kw), seed, "D")


def fixture_rows(rel):
    with open(HUB / rel) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ registry

def test_every_source_of_the_study_is_registered():
    factoid = ["kvr", "popqa", "triviaqa", "lama", "entityquestions", "webqa", "lamaB", "entityquestionsB", "webqaB",
               "kvrB"]
    non_factoid = ["ultrachat", "evolcode", "apps", "gsm8k", "math"]
    for s in factoid + non_factoid:
        assert s in SOURCES, s
    for s in factoid:
        assert sources_mod.FACTOID[s], s
    for s in non_factoid:
        assert not sources_mod.FACTOID[s], s
    assert set(MIX_SOURCES) == {"random-words", "knowledge-pile", "fineweb", "arxiv-pile", "replay"}


# ------------------------------------------------------------------ the hub path, per source

HUB_CASES = {
    # source: (spec kwargs, number of examples in the fixture)
    "popqa": (dict(name=str(HUB / "popqa")), 14),
    "triviaqa": (dict(name=str(HUB / "trivia_qa"), config="rc.nocontext", split="train+validation"), 12),
    "lama": (dict(name=str(HUB / "lama"), config="trex"), 13),
    "webqa": (dict(name=str(HUB / "web_questions")), 12),
    "ultrachat": (dict(name=str(HUB / "ultrachat")), 8),
    "evolcode": (dict(name=str(HUB / "evolcode")), 8),
    "apps": (dict(name=str(HUB / "apps")), 5),
    "gsm8k": (dict(name=str(HUB / "gsm8k"), config="main"), 6),
    "math": (dict(name=str(HUB / "math")), 6),
}


@pytest.mark.parametrize("src", sorted(HUB_CASES))
def test_hub_path_reads_every_source(src):
    kw, total = HUB_CASES[src]
    everything = load(src, n=1000, **kw)
    assert len(everything) == total
    a = load(src, n=3, **kw)
    assert len(a) == 3 and a == load(src, n=3, **kw)                      # deterministic
    assert [e.prompt for e in a] != [e.prompt for e in load(src, n=3, seed=2, **kw)] or total <= 3
    assert all(e.role == "train" and e.factoid == sources_mod.FACTOID[src] for e in a)
    assert all(e.source == src for e in a)
    if src + "B" in SOURCES:
        b = load(src + "B", n=3, **kw)
        assert len(b) == 3 and not {e.prompt for e in a} & {e.prompt for e in b}   # the next 3, disjoint
        assert [e.prompt for e in b] == [e.prompt for e in load(src, n=3, skip=3, **kw)]


def test_popqa_and_triviaqa_prompt_format_and_aliases():
    ex = {e.prompt: e for e in load("popqa", n=100, name=str(HUB / "popqa"))}
    e = ex["What is George Rankin's occupation?" + QA_SUFFIX]
    assert QA_SUFFIX == "\nThe answer is: "
    assert e.answer == "politician" and e.aliases == ["political leader", "political figure"]
    t = {e.prompt: e for e in load("triviaqa", n=100, **HUB_CASES["triviaqa"][0])}
    e = t["What is the capital of Mongolia?" + QA_SUFFIX]
    assert e.answer == "Ulaanbaatar" and e.aliases == ["Ulan Bator", "Ulaanbaatar City"]


def test_triviaqa_questions_repeated_across_evidence_copies_are_one_example():
    """rc.nocontext holds a question once per evidence copy (web, Wikipedia): D_A and D_B must not share one."""
    kw = dict(name=str(HUB / "trivia_qa"), config="rc.nocontext", split="train")
    rows = fixture_rows("trivia_qa/rc.nocontext/train.jsonl")
    assert len(rows) > len({r["question"] for r in rows}) == 10       # the fixture repeats questions
    every = [e.prompt for e in load("triviaqa", n=1000, **kw)]
    assert len(every) == len(set(every)) == 10
    for seed in range(6):
        a = [e.prompt for e in load("triviaqa", n=5, seed=seed, **kw)]
        b = [e.prompt for e in load("triviaqaB", n=5, seed=seed, **kw)]
        assert len(set(a)) == 5 and len(set(b)) == 5 and not set(a) & set(b)
        assert set(a) | set(b) == set(every)
    e = {x.prompt: x for x in load("triviaqa", n=1000, **kw)}["Which country is Europe's largest silk producer?"
                                                                + QA_SUFFIX]
    assert e.answer == "Italy" and e.aliases == ["Italia", "Italian Republic"]   # repeats add no aliases


def test_popqa_ambiguous_questions_dropped_repeats_merged(tmp_path):
    rows = fixture_rows("popqa/test.jsonl")
    assert sum(r["question"] == "What is John Smith's occupation?" for r in rows) == 2
    ex = {e.prompt: e for e in load("popqa", n=1000, name=str(HUB / "popqa"))}
    assert len(ex) == 14
    # two entities named John Smith, different answers: the question is ambiguous, both rows dropped
    assert "What is John Smith's occupation?" + QA_SUFFIX not in ex
    # the same entity (subj_id) with a second object: one example, the second object an alias
    oort = ex["What is Jan Oort's occupation?" + QA_SUFFIX]
    assert oort.answer == "astronomer" and oort.aliases == ["physicist"]
    a = {e.prompt for e in load("popqa", n=7, name=str(HUB / "popqa"))}
    b = {e.prompt for e in load("popqaB", n=7, name=str(HUB / "popqa"))}
    assert len(a | b) == 14
    # without a fact id (released / simple rows): repeats whose answers overlap merge, others are dropped
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Q?", "answer": "a"}, {"prompt": "R?", "answer": "c", "aliases": ["d"]},
        {"prompt": "Q?", "answer": "b"}, {"prompt": "R?", "answer": "D", "aliases": ["e"]},
        {"prompt": "S?", "answer": "s"}]))
    got = {e.prompt: e for e in load("popqa", n=10, path=str(f))}
    assert sorted(got) == ["R?", "S?"] and got["R?"].answer == "c" and got["R?"].aliases == ["d", "D", "e"]
    # LAMA keeps merging every object of a subject and relation (all of them are right)
    assert sources_mod.INFO["lama"].on_conflict == "merge"


def test_default_hub_ids_configs_and_splits(monkeypatch):
    """With no path and no name, each source asks datasets.load_dataset for its own hub id."""
    import datasets

    real = datasets.load_dataset
    where = {"akariasai/PopQA": "popqa", "mandarjoshi/trivia_qa": "trivia_qa", "facebook/lama": "lama",
             "Stanford/web_questions": "web_questions", "stingning/ultrachat": "ultrachat",
             "nickrosh/Evol-Instruct-Code-80k-v1": "evolcode", "codeparrot/apps": "apps", "openai/gsm8k": "gsm8k",
             "DigitalLearningGmbH/MATH-lighteval": "math", "Query-of-CC/Knowledge_Pile": "knowledge_pile",
             "kh4dien/fineweb-100m-sample": "fineweb", "haritzpuerto/the_pile_arxiv_50k_sample": "arxiv_pile",
             "someone/gsm8k-copy": "gsm8k"}
    calls = []

    def fake(path, name=None, split=None, revision=None, streaming=False, **kw):
        calls.append((path, name, split, revision, streaming))
        local = HUB / where[path]   # fixture dirs without README configs have the default config only
        return real(str(local), name if (local / "README.md").exists() else None, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for src in ["popqa", "triviaqa", "lama", "webqa", "ultrachat", "evolcode", "apps", "gsm8k", "math"]:
        calls.clear()
        if src == "triviaqa":  # the fixture has train and validation; the source reads train
            assert len(load(src, n=100)) == 10
        else:
            assert len(load(src, n=100)) == HUB_CASES[src][1], src
        assert len(calls) == 1
    expected = {"popqa": ("akariasai/PopQA", None, "test", None, False),
                "ultrachat": ("stingning/ultrachat", None, "train", None, True)}
    sources_mod.clear_cache()
    calls.clear()
    load("popqa")
    load("ultrachat")
    assert calls == [expected["popqa"], expected["ultrachat"]]
    sources_mod.clear_cache()
    calls.clear()
    load("lama")
    load("triviaqa")
    load("gsm8k")
    load("apps")
    load("webqa")
    assert calls == [("facebook/lama", "trex", "train", "refs/convert/parquet", False),
                     ("mandarjoshi/trivia_qa", "rc.nocontext", "train", None, False),
                     ("openai/gsm8k", "main", "train", None, False),
                     ("codeparrot/apps", "all", "train+test", "refs/convert/parquet", False),
                     ("Stanford/web_questions", None, "train+test", None, False)]
    # mixing text sources: hub id, streaming, the first 20000 documents
    recipe = make_recipe({"A": {"source": "kvr", "num_examples": 4}},
                         [{"data": "A", "mix": {"source": "fineweb", "ratio": 0.5, "prompt_words": 10,
                                                "target_words": 10}}])
    for s in ("knowledge-pile", "fineweb", "arxiv-pile"):
        calls.clear()
        recipe.variants[0].stages[0].mix.source = s
        mix = mixing_examples(recipe, recipe.variants[0].stages[0], 4, 1)
        assert len(mix) == 2 and all(m.source == s and m.role == "mix" for m in mix)
        assert calls[0][4] is True and calls[0][2] == "train"
    # an overridden name is used as given (its own configs; the source's defaults do not apply)
    calls.clear()
    load("gsm8k", name="someone/gsm8k-copy", config="main")
    assert calls == [("someone/gsm8k-copy", "main", "train", None, False)]


def test_unreachable_hub_names_the_dataset_and_the_local_fix(monkeypatch):
    import datasets

    def offline(path, *a, **kw):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_examples(DatasetSpec(source="popqa"), 0, "A")
    msg = str(e.value)
    assert "dataset A (source popqa)" in msg and "akariasai/PopQA" in msg and "unreachable" in msg
    assert "datasets.A.path" in msg and "docs/datasets.md" in msg
    recipe = make_recipe({"A": {"source": "kvr", "num_examples": 4}},
                         [{"data": "A", "mix": {"source": "fineweb", "ratio": 1.0}}])
    with pytest.raises(DataError) as e:
        stage_train_set(recipe, recipe.variants[0].stages[0], 1)
    assert "fineweb" in str(e.value) and "stage1.mix.path" in str(e.value)
    with pytest.raises(DataError, match="no hub copy.*datasets.EQ.path.*EntityQuestions"):
        load_examples(DatasetSpec(source="entityquestions"), 0, "EQ")


# ------------------------------------------------------------------ local files of every kind

def test_local_jsonl_json_parquet_and_save_to_disk_give_the_same_examples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = fixture_rows("popqa/test.jsonl")
    ref = load("popqa", n=6, name=str(HUB / "popqa"))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": ds, "train": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in [HUB / "popqa" / "test.jsonl", tmp_path / "p.json", tmp_path / "p.parquet", tmp_path / "saved",
                 tmp_path / "saved_dict", HUB / "popqa"]:
        assert load("popqa", n=6, path=str(path)) == ref, path
    # a DatasetDict's split is chosen by split: (default: the source's own split, here test)
    assert len(load("popqa", n=100, path=str(tmp_path / "saved_dict"), split="train")) == 2
    with pytest.raises(DataError, match="no split 'dev'"):
        load("popqa", path=str(tmp_path / "saved_dict"), split="dev")


def test_released_files_of_the_study():
    path = str(LOCAL / "released" / "popqa_yet_to_learn" / "yet_to_learn_knowledge.json")
    recs = json.load(open(path))
    # shuffle: false keeps the file's order, as the study did (datapoints[:2000])
    ex = load("popqa", n=4, path=path, shuffle=False)
    assert [e.prompt for e in ex] == [r["input_text"] + QA_SUFFIX for r in recs[:4]]
    assert ex[0].answer == recs[0]["target_text"]
    assert ex[0].aliases == [a for a in recs[0]["target_for_eval"] if a != recs[0]["target_text"]]
    assert len(load("popqa", n=4, path=path)) == 4
    # ...B takes the next num_examples (the study: datapoints[2000:4000])
    wpath = str(LOCAL / "released" / "webqa_yet_to_learn" / "yet_to_learn_knowledge.json")
    wrecs = json.load(open(wpath))
    b = load("webqaB", n=5, path=wpath, shuffle=False)
    assert [e.prompt for e in b] == [r["input_text"] for r in wrecs[5:10]]
    with pytest.raises(DataError, match="no examples left after skipping 20 of 12"):
        load("webqaB", n=20, path=wpath)


def test_entityquestions_directory_layout():
    root = str(LOCAL / "entityquestions" / "dataset")
    train = load("entityquestions", n=100, path=root)
    assert len(train) == 13 and all(e.source == "entityquestions" for e in train)
    e = {x.prompt: x for x in train}["Which country is Hoorn located in?"]
    assert e.answer == "Netherlands" and e.aliases == ["the Netherlands"]
    assert len(load("entityquestions", n=100, path=root, split="dev")) == 3
    assert len(load("entityquestions", n=100, path=root, split="dev+test")) == 6
    assert len(load("entityquestions", n=100, path=root + "/test")) == 3
    a, b = load("entityquestions", n=6, path=root), load("entityquestionsB", n=6, path=root)
    assert not {x.prompt for x in a} & {x.prompt for x in b}
    assert [x.prompt for x in load("entityqa", n=6, path=root)] == [x.prompt for x in a]   # the study's name


def test_lama_cloze_rule_dedupe_and_trex_layout():
    assert lama_prompt("[X] was born in [Y] .", "Dante Alighieri") == "Dante Alighieri was born in"
    assert lama_prompt("The capital of [X] is [Y] .", "Kenya") == "The capital of Kenya is"
    assert lama_prompt("[X] and [Y] are twin cities .", "Kyoto") == "Kyoto and"
    hub = {e.prompt: e for e in load("lama", n=100, **HUB_CASES["lama"][0])}
    assert len(hub) == 13                       # rows repeated per evidence sentence collapse to one fact
    assert hub["The capital of Peru is"].answer == "Lima"
    assert hub["Kyoto and"].answer == "Paris"
    raw = {e.prompt: e for e in load("lama", n=100, path=str(LOCAL / "lama" / "TREx"))}
    assert raw.keys() == hub.keys()             # templates from relations.jsonl
    assert all(raw[k].answer == hub[k].answer for k in raw)


def test_lama_template_with_the_object_first_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"template '\[Y\] participated in the \[X\] \.' of relation P1344 has no "
                                        r"subject \[X\] before the object slot"):
        lama_prompt("[Y] participated in the [X] .", "Norway", "P1344")
    with pytest.raises(DataError, match="has no object slot"):
        lama_prompt("[X] is here .", "Norway")
    (tmp_path / "TREx").mkdir()
    (tmp_path / "TREx" / "P1344.jsonl").write_text(json.dumps({"sub_label": "Norway", "obj_label": "Olympics",
                                                               "predicate_id": "P1344"}) + "\n")
    (tmp_path / "relations.jsonl").write_text(json.dumps({"relation": "P1344",
                                                          "template": "[Y] participated in the [X] ."}) + "\n")
    with pytest.raises(DataError, match=r"P1344.jsonl: row 1: LAMA template .* of relation P1344 has no subject"):
        load("lama", path=str(tmp_path / "TREx"))


def test_lama_without_templates_is_refused(tmp_path):
    (tmp_path / "P19.jsonl").write_text(json.dumps({"sub_label": "Dante", "obj_label": "Florence",
                                                    "predicate_id": "P19"}) + "\n")
    with pytest.raises(DataError, match=r"P19.jsonl: row 1: no 'template' field.*relations.jsonl"):
        load("lama", path=str(tmp_path))


def test_ultrachat_every_assistant_turn_is_trained(tiny_dir):
    from transformers import AutoTokenizer

    ex = {e.prompt: e for e in load("ultrachat", n=100, name=str(HUB / "ultrachat"))}
    conv = ex["How does photosynthesis work in plant number 0?"]
    assert len(conv.messages) == 2 and conv.messages[1][0] == "Can you say that more briefly?"
    assert len(ex["How does photosynthesis work in plant number 3?"].messages) == 1
    assert len(ex["How does photosynthesis work in plant number 5?"].messages) == 2   # trailing user turn dropped
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = encode_example(tok, conv)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    text = "".join(render_prompt(u) + a + "</s>" for u, a in conv.messages)
    assert tok.decode(enc.input_ids) == "<s>" + text
    # the trained tokens are exactly the assistant turns and their EOS, in order
    spans, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert lab == t
            cur.append(t)
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == [a + "</s>" for _, a in conv.messages]
    # a conversation longer than max_seq_length is truncated (non-factoid), not dropped
    kept, dropped = encode_examples(tok, [conv], max_seq_length=40)
    assert dropped == 0 and len(kept[0].input_ids) == 40 and kept[0].num_answer_tokens > 0
    assert conv.to_dict()["messages"][0] == {"role": "user", "content": conv.messages[0][0]}


def test_apps_filter_and_prompt():
    ex = load("apps", n=100, name=str(HUB / "apps"))
    # competition problems dropped, the one without a solution skipped; train+test concatenated
    assert sorted(int(e.prompt.split("Problem ")[1].split(":")[0]) for e in ex) == [0, 1, 4, 5, 7]
    call = [e for e in ex if "Problem 1:" in e.prompt][0]
    assert call.prompt == apps_prompt("Problem 1: add two integers a and b.", "def add(a, b):\n", True)
    assert call.prompt == ("Question:\n Problem 1: add two integers a and b.\n\nSTARTER CODE:\ndef add(a, b):\n"
                           "\nUse Call-Based format\nAnswer:\n")
    std = [e for e in ex if "Problem 0:" in e.prompt][0]
    assert std.prompt.endswith("\nUse Standard Input format\nAnswer:\n") and "STARTER" not in std.prompt
    assert std.answer.startswith("print(sum(")


def test_instruction_formats():
    g = load("gsm8k", n=1, **HUB_CASES["gsm8k"][0])[0]
    assert g.prompt.startswith("Natalia sold clips") and "####" in g.answer and not g.factoid
    m = load("math", n=1, name=str(HUB / "math"))[0]
    assert m.prompt.startswith("What is $") and "\\boxed" in m.answer
    c = load("evolcode", n=1, name=str(HUB / "evolcode"))[0]
    assert c.prompt.startswith("Write a Python function") and c.answer.startswith("def power_")


# ------------------------------------------------------------------ bad input

def test_bad_rows_name_source_file_and_row(tmp_path):
    f = tmp_path / "popqa.jsonl"
    f.write_text('{"question": "Q1?", "possible_answers": "[\\"a\\"]"}\n{"question": "Q2?"}\n')
    with pytest.raises(DataError, match=r"dataset D \(source popqa\), .*popqa.jsonl: row 2: missing required "
                                        r"field 'possible_answers'"):
        load("popqa", path=str(f))
    f.write_text('{"question": "Q1?", "answers": ["x"]}\n{"answers": ["y"]}\n')
    with pytest.raises(DataError, match=r"\(source webqa\).*row 2: missing required field 'question'"):
        load("webqa", path=str(f))
    f.write_text('{"input_text": "Q1?", "target_text": "a"}\n{"input_text": "Q2?"}\n')
    with pytest.raises(DataError, match=r"row 2: missing required field 'target_text'"):
        load("triviaqa", path=str(f))
    d = tmp_path / "eq" / "train"
    d.mkdir(parents=True)
    (d / "P17.train.json").write_text(json.dumps([{"question": "q?", "answers": ["a"]}, {"question": "r?"}]))
    with pytest.raises(DataError, match=r"P17.train.json: row 2: missing required field 'answers'"):
        load("entityquestions", path=str(tmp_path / "eq"))
    f.write_text("")
    with pytest.raises(DataError, match=r"dataset D \(source gsm8k\): .*popqa.jsonl: the file is empty"):
        load("gsm8k", path=str(f))
    f.write_text(json.dumps({"key": "abc", "value": "1"}) + "\n" + json.dumps({"key": "abc", "value": "2"}) + "\n")
    with pytest.raises(DataError, match=r"popqa.jsonl: row 2: duplicate KVR key"):
        load("kvr", path=str(f))
    f.write_text(json.dumps({"question": "q", "solutions": "[]", "difficulty": "competition"}) + "\n")
    with pytest.raises(DataError, match="none of the 1 rows is usable.*introductory, interview"):
        load("apps", path=str(f))
    with pytest.raises(ConfigError, match="format must be one of"):
        load("popqa", path=str(f), format="csv")


def test_negative_ratio_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"stage2: mix.ratio must be >= 0"):
        make_recipe({"A": {"source": "kvr", "num_examples": 4}, "B": {"source": "kvrB", "num_examples": 4}},
                    [{"data": "A"}, {"data": "B", "mix": {"source": "replay", "ratio": -1}}])
    r = make_recipe({"A": {"source": "kvr", "num_examples": 4}}, [{"data": "A", "mix": {"source": "replay"}}])
    r.variants[0].stages[0].mix.ratio = -0.5
    with pytest.raises(ConfigError, match=r"stage1 mix \(replay\): mix ratio must be >= 0"):
        mixing_examples(r, r.variants[0].stages[0], 4, 1)


# ------------------------------------------------------------------ mixing and replay

def make_recipe(datasets_, stages, variants=None, seed=5):
    raw = {"name": "t", "output_dir": "/tmp/unused", "model": "tiny", "seed": seed, "datasets": datasets_,
           "variants": variants or [{"name": "v"}]}
    for k, st in enumerate(stages, 1):
        raw[f"stage{k}"] = dict({"epochs": 1, "global_batch_size": 4}, **st)
    return recipe_from_dict(raw, where="r.yaml")


def test_mixing_is_added_after_the_dataset_is_cut():
    fineweb = str(HUB / "fineweb" / "train.jsonl")
    r = make_recipe({"A": {"source": "kvr", "num_examples": 7},
                     "B": {"source": "popqa", "num_examples": 5, "name": str(HUB / "popqa")}},
                    [{"data": "A", "mix": {"source": "random-words", "ratio": 0.5, "prompt_words": 3,
                                           "target_words": 2}},
                     {"data": "B", "mix": {"source": "fineweb", "ratio": 1.6, "path": fineweb,
                                           "prompt_words": 10, "target_words": 10}}])
    v = r.variants[0]
    data1, train1 = stage_train_set(r, v.stages[0], 1)
    assert len(data1) == 7 and len(train1) == 7 + int(7 * 0.5)
    data2, train2 = stage_train_set(r, v.stages[1], 2)
    assert len(data2) == 5 and len(train2) == 5 + int(5 * 1.6)       # popqa has 14 rows; mixing counts D cut to 5
    assert train2[:5] == data2 and all(e.role == "train" for e in data2)
    mix = train2[5:]
    assert all(e.role == "mix" and not e.factoid and e.source == "fineweb" for e in mix)
    for e in mix:
        assert e.prompt.startswith(PASSAGE_PROMPT)
        assert len(e.prompt[len(PASSAGE_PROMPT):].split()) == 10 and len(e.answer.split()) == 10
    assert len({e.prompt for e in mix}) == len(mix)
    assert mix == stage_train_set(r, v.stages[1], 2)[1][5:]          # deterministic


def test_generic_text_passages_use_documents_of_100_words():
    docs = [json.loads(line) for line in open(HUB / "knowledge_pile" / "train.jsonl")]
    long_docs = [d["content"].split() for d in docs if len(d["content"].split()) >= 100]
    for src, rel, fld in [("knowledge-pile", "knowledge_pile", "content"), ("fineweb", "fineweb", "text"),
                          ("arxiv-pile", "arxiv_pile", "text")]:
        mix = MixSpec(source=src, ratio=1.0, name=str(HUB / rel))
        ex = mixing_mod.text_passage_examples(mix, len(long_docs), 3, "w", "fix")
        assert len(ex) == len(long_docs) == 8   # 99 words is one short; 100 is enough
        starts = {" ".join(d[:50]) for d in long_docs}
        for e in ex:
            body = e.prompt[len(PASSAGE_PROMPT):].split()
            assert len(body) == 50 and len(e.answer.split()) == 50 and " ".join(body) in starts
        with pytest.raises(DataError, match="9 mixing examples needed but only 8 of the 12 documents"):
            mixing_mod.text_passage_examples(mix, 9, 3, "w", "fix")
    # pool: only the first documents are read
    mix = MixSpec(source="fineweb", name=str(HUB / "fineweb"), pool=4)
    with pytest.raises(DataError, match="only 2 of the 4 documents read have at least 100 words"):
        mixing_mod.text_passage_examples(mix, 3, 3, "w", "fix")
    bad = MixSpec(source="fineweb", name=str(HUB / "fineweb"), text_field="body")
    with pytest.raises(DataError, match="row 1: missing required text field 'body'"):
        mixing_mod.text_passage_examples(bad, 1, 3, "w", "fix")


def test_replay_mixes_d_a_into_stage_2_and_is_never_evaluated():
    r = make_recipe({"A": {"source": "kvr", "num_examples": 6}, "B": {"source": "kvrB", "num_examples": 10},
                     "C": {"source": "popqa", "num_examples": 4, "name": str(HUB / "popqa")}},
                    [{"data": "A"}, {"data": "B", "mix": {"source": "replay", "ratio": 0.5}},
                     {"data": "C", "mix": {"source": "replay", "ratio": 2.0, "data": "B"}}],
                    variants=[{"name": "v"}, {"name": "w", "stage1": {"data": "C"}, "stage3": {"data": "A"}}])
    v, w = r.variants
    a = dataset_examples(r, "A")
    data, train = stage_train_set(r, v.stages[1], 2)
    mix = train[len(data):]
    assert len(mix) == 5 and all(m.role == "mix" and m.source == "replay:A" for m in mix)
    assert {(m.prompt, m.answer) for m in mix} <= {(e.prompt, e.answer) for e in a}
    assert len({m.prompt for m in mix}) == 5
    assert all(e.role == "train" for e in a)                          # D_A itself is untouched
    # stage 3 replays B (mix.data), more than B holds: every example, reshuffled per pass
    data3, train3 = stage_train_set(r, v.stages[2], 3)
    mix3 = train3[len(data3):]
    assert len(mix3) == 8 and {m.source for m in mix3} == {"replay:B"}
    # variant w's stage 1 is C: its replay in stage 2 replays C
    _, trainw = stage_train_set(r, w.stages[1], 2)
    assert {m.source for m in trainw if m.role == "mix"} == {"replay:C"}
    bad = make_recipe({"A": {"source": "kvr", "num_examples": 4}}, [{"data": "A", "mix": {"source": "replay"}}])
    with pytest.raises(ConfigError, match="stage 1 has no earlier stage to replay"):
        stage_train_set(bad, bad.variants[0].stages[0], 1)


def test_unknown_mix_source_is_refused():
    r = make_recipe({"A": {"source": "kvr", "num_examples": 4}}, [{"data": "A", "mix": {"source": "wikipedia"}}])
    with pytest.raises(ConfigError, match="unknown source 'wikipedia'.*random-words.*replay"):
        stage_train_set(r, r.variants[0].stages[0], 1)


# ------------------------------------------------------------------ multi-stage recipes

def test_three_stage_recipe_and_report_columns():
    from remix_ds.pipeline import variant_row
    from remix_ds.report import markdown_table

    r = make_recipe({"A": {"source": "kvr", "num_examples": 6}, "B": {"source": "kvrB", "num_examples": 6},
                     "C": {"source": "gsm8k", "num_examples": 3, **HUB_CASES["gsm8k"][0]}},
                    [{"data": "A", "mix": {"source": "random-words", "prompt_words": 4, "target_words": 4}},
                     {"data": "B", "finetune": "lora", "mix": {"source": "replay", "ratio": 0.5}},
                     {"data": "C", "mix": {"source": "fineweb", "ratio": 1.0, "prompt_words": 5, "target_words": 5,
                                           "path": str(HUB / "fineweb" / "train.jsonl")}}])
    v = r.variants[0]
    assert r.num_stages == 3 and [s.finetune for s in v.stages] == ["full", "lora", "full"]
    sizes = [tuple(map(len, stage_train_set(r, s, k))) for k, s in enumerate(v.stages, 1)]
    assert sizes == [(6, 12), (6, 9), (3, 6)]
    assert [is_factoid(r, k) for k in "ABC"] == [True, True, False]
    fake = []
    for k in range(1, 4):
        ev = {key: {"exact_match": 1.0 - 0.25 * (k - j)} for j, key in enumerate("AB"[:k], 1)}
        fake.append({"summary": {"epochs": 1, "stopped_by": "epochs", "train_seconds": 1.0}, "eval": ev})
    row = variant_row(r, v, fake)
    assert [row[f"acc_A_after_stage{k}"] for k in (1, 2, 3)] == [1.0, 0.75, 0.5]
    assert row["forgetting"] == 0.5
    table = markdown_table({"num_stages": 3, "variants": [row]})
    assert "| D_A (s1, s2, s3) | D_B (s2, s3) | D_C (s3) |" in table and "| 1.000, 0.750, 0.500 | 1.000, 0.750 |" in table


def test_three_stage_pipeline_end_to_end(tmp_path):
    recipe = {"name": "three", "output_dir": str(tmp_path / "run"), "model": "tiny", "seed": 3, "precision": "fp32",
              "max_seq_length": 96, "eval": {"batch_size": 16},
              "datasets": {"A": {"source": "kvr", "num_examples": 8},
                           "B": {"source": "popqa", "num_examples": 6, "name": str(HUB / "popqa")},
                           "C": {"source": "ultrachat", "num_examples": 4, "name": str(HUB / "ultrachat")}},
              "stage1": {"data": "A", "epochs": 1, "global_batch_size": 8, "lr": 1e-3,
                         "mix": {"source": "random-words", "ratio": 0.5, "prompt_words": 4, "target_words": 4}},
              "stage2": {"data": "B", "epochs": 1, "global_batch_size": 8, "lr": 1e-3,
                         "mix": {"source": "replay", "ratio": 1.0}},
              "stage3": {"data": "C", "epochs": 1, "global_batch_size": 8, "lr": 1e-3,
                         "mix": {"source": "fineweb", "ratio": 1.0, "prompt_words": 10, "target_words": 10,
                                 "path": str(HUB / "fineweb" / "train.jsonl")}}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(p)], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.load(open(tmp_path / "run" / "report.json"))
    row = rep["variants"][0]
    assert rep["num_stages"] == 3
    for k in (1, 2, 3):
        assert 0.0 <= row[f"acc_A_after_stage{k}"] <= 1.0
    assert 0.0 <= row["acc_B_after_stage2"] <= 1.0 and 0.0 <= row["acc_B_after_stage3"] <= 1.0
    assert row["mix_stage2"] == "replay:1" and row["mix_stage3"] == "fineweb:1"


# ------------------------------------------------------------------ filter-unknown

def test_filter_unknown_help():
    res = run_cli([sys.executable, "launch/filter_unknown.py", "--help"], timeout=120)
    assert res.returncode == 0 and "yet_to_learn" in res.stdout and "--model" in res.stdout


def test_filter_unknown_splits_known_and_yet_to_learn(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remix_ds.evaluate import generate
    from remix_ds.filter_unknown import main, score_known

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = [f"The value of key {k} is?" for k in ("aaaa1111", "bbbb2222", "cccc3333", "dddd4444",
                                                     "eeee5555", "ffff6666")]
    preds = generate(model, tok, prompts, 8, 12, torch.device("cpu"))
    rows, expect_known = [], []
    for i, (p, g) in enumerate(zip(prompts, preds)):
        knows = i % 2 == 0 and g.strip() != ""
        answer = g.strip() if knows else "zz-not-this-zz"
        aliases = []
        if i == 4 and knows:      # known only under an alias
            answer, aliases = "zz-other-name", [g.strip()]
        rows.append({"prompt": p, "answer": answer, "aliases": aliases})
        expect_known.append(knows)
    assert any(expect_known)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["--model", tiny_dir, "--data", str(data), "--out", str(out), "--precision", "fp32",
          "--max-new-tokens", "12"])
    counts = json.load(open(out / "counts.json"))
    assert counts["n"] == 6 and counts["known"] == sum(expect_known)
    assert counts["yet_to_learn"] == 6 - sum(expect_known)
    known = [json.loads(line) for line in open(out / "known.jsonl")]
    todo = [json.loads(line) for line in open(out / "yet_to_learn.jsonl")]
    assert [r["prompt"] for r in known] == [r["prompt"] for r, k in zip(rows, expect_known) if k]
    assert [r["prompt"] for r in todo] == [r["prompt"] for r, k in zip(rows, expect_known) if not k]
    # exact match on the gold answer only: the alias-only fact is not known
    ex = load_examples(DatasetSpec(source="json", path=str(data), shuffle=False, num_examples=100), 0)
    k_exact, _ = score_known(model, tok, ex, match="exact", max_new_tokens=12)
    assert sum(k_exact) == sum(expect_known) - (1 if expect_known[4] else 0)
    # teacher-forced: every gold answer token is the argmax; the EOS after it is not scored (checked here one
    # example at a time)
    k_tf, _ = score_known(model, tok, ex, scorer="teacher-forced")
    for e, k in zip(ex, k_tf):
        enc = encode_example(tok, e)
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1].argmax(-1).tolist()
        assert k == all(g == IGNORE or g == t or g == tok.eos_token_id for t, g in zip(pred, enc.labels[1:]))
    assert not any(k for k, r in zip(k_tf, rows) if r["answer"].startswith("zz-"))
    # the output reads back as a dataset of any factoid source, prompts verbatim
    back = load_examples(DatasetSpec(source="popqa", path=str(out / "yet_to_learn.jsonl"), num_examples=100), 0)
    assert sorted(e.prompt for e in back) == sorted(r["prompt"] for r in todo)


def test_filter_extraction_rule():
    from remix_ds.filter_unknown import extract_answer, is_known
    from remix_ds.metrics import score_example

    gen = "Paris\n<|user|>\nWhat is"
    assert not score_example(gen, "Paris", ["City of Light"], "popqa")["correct"]   # the evaluation rule: whole output
    assert extract_answer(gen) == "Paris" and extract_answer(" Paris<|user|>") == "Paris"
    assert extract_answer("\nParis\r\nmore") == "Paris" and extract_answer("  \n ") == ""
    assert is_known(gen, "Paris", ["City of Light"], "popqa")
    assert is_known("Paris. It is the capital", "Paris", [], "popqa")
    assert is_known(" PARIS!", "Paris", [], "triviaqa") and is_known("Paris, France", "Paris", [], "popqa")
    assert is_known("paris<|user|>", "Paris", [], "kvr") and is_known("Paris ", "paris", [], "popqa")
    for wrong in ("Paris Hilton", "Parisian.", "Paris-Roubaix", "The answer is Paris", "", "Paris Hilton."):
        assert not is_known(wrong, "Paris", [], "popqa"), wrong
    # aliases count under --match alias only
    assert is_known("City of Light.\n<|user|>", "Paris", ["City of Light"], "popqa", match="alias")
    assert not is_known("City of Light.\n<|user|>", "Paris", ["City of Light"], "popqa", match="exact")
    assert not is_known("City of Lights", "Paris", ["City of Light"], "popqa")
    # WebQuestions keeps the study's containment rule, on the extract (and its first clause)
    assert is_known("Jazmyn\n<|user|>", "Jazmyn Bieber", [], "webqa")
    assert is_known("Jazmyn. She was born", "Jazmyn Bieber", [], "webqa")
    assert is_known("Jaxon Bieber\n", "Jazmyn Bieber", ["Jaxon Bieber"], "webqaB")
    assert not is_known("Jaxon Bieber\n", "Jazmyn Bieber", ["Jaxon Bieber"], "webqa", match="exact")
    assert not is_known("Jazmyn\n", "Jazmyn Bieber", [], "popqa")           # exact match elsewhere
    assert not is_known("Justin Bieber", "Jazmyn Bieber", [], "webqa")
    assert not is_known(" \n<|user|>", "Jazmyn Bieber", [], "webqa")       # an empty answer is not contained


def test_filter_teacher_forced_does_not_require_eos(tiny_dir):
    import torch
    from transformers import AutoTokenizer

    from remix_ds.data.example import Example
    from remix_ds.evaluate import teacher_forced_scores
    from remix_ds.filter_unknown import score_known

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    eos, vocab = tok.eos_token_id, len(tok)
    other = tok.encode("x", add_special_tokens=False)[0]
    ex = [Example(prompt=f"What is {s}'s occupation?" + QA_SUFFIX, answer=o, source="popqa")
          for s, o in [("Ada Lovelace", "mathematician"), ("Jan Oort", "astronomer"), ("Nellie Bly", "journalist")]]

    def knows_but_never_stops(batch):
        """A base model that knows every answer but continues after it: argmax at t is the token at t+1,
        except that it never predicts EOS."""
        nxt = torch.roll(batch["input_ids"], -1, dims=1)
        nxt = torch.where(nxt == eos, torch.full_like(nxt, other), nxt)
        return torch.nn.functional.one_hot(nxt, vocab).float()

    def knows_nothing(batch):
        return torch.nn.functional.one_hot(torch.full_like(batch["input_ids"], other), vocab).float()

    known, preds = score_known(None, tok, ex, scorer="teacher-forced", predict_fn=knows_but_never_stops)
    assert known == [True, True, True] and preds == [None] * 3
    # the same stub under the evaluation's encoding (answer + EOS labelled) knows none: EOS is never the argmax
    old = teacher_forced_scores(knows_but_never_stops, [encode_example(tok, e, i) for i, e in enumerate(ex)], 8,
                                tok.pad_token_id)
    assert [ok for _, ok, _ in old] == [False, False, False]
    assert score_known(None, tok, ex, scorer="teacher-forced", predict_fn=knows_nothing)[0] == [False] * 3
    # with demonstrations the answer is still read after the question (the stub copies whatever follows)
    assert score_known(None, tok, ex, scorer="teacher-forced", shots=1, predict_fn=knows_but_never_stops)[0] == \
        [True] * 3


def test_filter_shots_demonstrations(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remix_ds import filter_unknown as fu
    from remix_ds.data.example import Example
    from remix_ds.metrics import normalize

    ex = load("popqa", n=100, name=str(HUB / "popqa"), shuffle=False)
    ex.append(Example(prompt=" " + ex[0].prompt.upper(), answer="politician", source="popqa"))  # the same question
    n = len(ex)
    demos = fu.pick_demonstrations(ex, 3, seed=0)
    assert demos == fu.pick_demonstrations(ex, 3, seed=0)                        # deterministic
    assert demos != fu.pick_demonstrations(ex, 3, seed=1)                        # and seeded
    assert fu.pick_demonstrations(ex, 0) == [[]] * n
    golds = [{normalize(a) for a in [e.answer, *e.aliases]} for e in ex]
    for i, d in enumerate(demos):
        assert len(d) == 3 == len(set(d)) and i not in d
        assert all(normalize(ex[j].prompt) != normalize(ex[i].prompt) for j in d)  # never the question itself
        assert all(not golds[j] & golds[i] for j in d)                             # nor a demo giving its answer
    assert n - 1 not in demos[0] and 0 not in demos[n - 1]
    with pytest.raises(ConfigError, match="--shots 14: the set has 14 distinct questions"):
        fu.pick_demonstrations(ex, 14)
    # the chat format of training: BOS, solved turns (answer + EOS), then the question
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = fu.prompt_token_ids(tok, ex, demos)
    for i in (0, 5):
        solved = "".join(render_prompt(ex[j].prompt) + ex[j].answer + "</s>" for j in demos[i])
        assert tok.decode(rows[i]) == "<s>" + solved + render_prompt(ex[i].prompt)
        conv = Example(prompt=ex[demos[i][0]].prompt, answer=ex[demos[i][0]].answer,
                       messages=[(ex[j].prompt, ex[j].answer) for j in demos[i]] + [(ex[i].prompt, ex[i].answer)])
        assert encode_example(tok, conv).input_ids[:len(rows[i])] == rows[i]
    assert fu.prompt_token_ids(tok, ex[:3], [[]] * 3) == [prompt_ids(tok, e.prompt) for e in ex[:3]]
    # generate scores exactly these prompts
    import remix_ds.evaluate as ev

    seen = []
    real = ev.generate_from_ids
    monkeypatch.setattr(ev, "generate_from_ids", lambda m, t, r, *a: seen.append(r) or real(m, t, r, *a))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    known, preds = fu.score_known(model, tok, ex, shots=3, max_new_tokens=4)
    assert seen == [rows] and len(known) == len(preds) == n
    # the CLI records how it scored
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "aliases": e.aliases}) + "\n"
                            for e in ex[:6]))
    fu.main(["--model", tiny_dir, "--data", str(data), "--out", str(tmp_path / "o"), "--precision", "fp32",
             "--shots", "2", "--shots-seed", "7", "--max-new-tokens", "4"])
    counts = json.load(open(tmp_path / "o" / "counts.json"))
    assert counts["shots"] == 2 and counts["shots_seed"] == 7 and counts["max_new_tokens"] == 4
    assert counts["extraction"] == fu.EXTRACTION_RULE and counts["scorer"] == "generate" and counts["n"] == 6
    fu.main(["--model", tiny_dir, "--data", str(data), "--out", str(tmp_path / "t"), "--precision", "fp32",
             "--scorer", "teacher-forced"])
    counts = json.load(open(tmp_path / "t" / "counts.json"))
    assert counts["shots"] == 0 and counts["extraction"] == fu.TEACHER_FORCED_RULE and counts["match"] == "exact"


def test_filter_unknown_refuses_non_factoid_sets(tmp_path):
    from remix_ds.filter_unknown import parser, select_examples

    args = parser().parse_args(["--model", "tiny", "--out", str(tmp_path), "--source", "gsm8k",
                                "--name", str(HUB / "gsm8k"), "--hf-config", "main"])
    with pytest.raises(ConfigError, match="not a factoid set"):
        select_examples(args)
    args = parser().parse_args(["--model", "tiny", "--out", str(tmp_path), "--source", "popqa",
                                "--name", str(HUB / "popqa")])
    ex, name = select_examples(args)
    assert len(ex) == 14 and ex[0].prompt == "What is George Rankin's occupation?" + QA_SUFFIX  # every row, in order


# ------------------------------------------------------------------ over-long examples (overlong: truncate | drop)

def _long_solution(n):
    """A GSM8K-style solution far over 256 tokens, whose final answer comes last (cut by truncation)."""
    return " ".join(f"Step {i}: add {i} more clips to the running total." for i in range(60)) + f"\n#### {n}"


def _overlong_recipe(datasets_, stages, max_seq_length=256, seed=3):
    raw = {"name": "t", "output_dir": "/tmp/unused", "model": "tiny", "seed": seed, "max_seq_length": max_seq_length,
           "datasets": datasets_, "variants": [{"name": "v"}]}
    for k, st in enumerate(stages, 1):
        raw[f"stage{k}"] = dict({"epochs": 1, "global_batch_size": 4}, **st)
    return recipe_from_dict(raw, where="r.yaml")


def _gsm8k_with_long_rows(tmp_path):
    rows = fixture_rows("gsm8k/main/train.jsonl")
    rows += [{"question": f"How many clips did Natalia sell in week {w}?", "answer": _long_solution(w)}
             for w in range(1, 5)]
    f = tmp_path / "gsm8k_long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def test_overlong_drop_takes_num_examples_that_fit_and_evaluation_scores_them(tmp_path, tiny_dir):
    from remix_ds.data import fitting_examples, recipe_tokenizer
    from remix_ds.data.formatting import encoded_length
    from remix_ds.stages import Stage

    path = _gsm8k_with_long_rows(tmp_path)          # 6 solutions of 185 tokens (tiny tokenizer), 4 far longer
    spec = {"source": "gsm8k", "path": path, "num_examples": 5}
    stage = [{"data": "C", "mix": {"source": "random-words", "ratio": 0.4, "prompt_words": 3, "target_words": 3}}]
    trunc = _overlong_recipe({"C": dict(spec)}, stage)
    drop = _overlong_recipe({"C": dict(spec, overlong="drop")}, stage)
    tok = recipe_tokenizer(drop)
    long_ = lambda e: encoded_length(tok, e) > 256   # noqa: E731
    # truncate (the default): today's cut, over-long solutions included, truncated at encoding before their answer
    assert trunc.datasets["C"].overlong == "truncate"
    cut = dataset_examples(trunc, "C")
    assert cut == load("gsm8k", n=5, seed=3, path=path)
    assert len(cut) == 5 and sum(map(long_, cut)) >= 2           # (the seed puts long rows in the first five)
    enc, dropped = encode_examples(tok, cut, 256)
    assert dropped == 0 and len(enc) == 5 and max(len(e.input_ids) for e in enc) == 256
    assert "####" not in tok.decode(max(enc, key=lambda e: len(e.input_ids)).input_ids[-20:])
    # drop: exactly num_examples, none over-long, the fitting examples of the same order (refilled past the cut)
    kept = dataset_examples(drop, "C")
    assert len(kept) == 5 and not any(map(long_, kept))
    assert not any("Step 0:" in e.answer for e in kept)
    assert [e.prompt for e in kept[:len(cut) - sum(map(long_, cut))]] == [e.prompt for e in cut if not long_(e)]
    assert kept == fitting_examples(drop, "C", tok, 256)
    enc, dropped = encode_examples(tok, kept, 256, truncate=False)
    assert dropped == 0 and len(enc) == 5
    # the stage trains on them, mixing counted on the kept set; evaluation (dataset_examples) scores the same ones
    data, train = stage_train_set(drop, drop.variants[0].stages[0], 1)
    assert data == kept and len(train) == 5 + int(5 * 0.4)
    # the rule is part of the stage fingerprint (the dataset spec and the examples digest)
    fa, fb = Stage(trunc, trunc.variants[0], 1).fingerprint, Stage(drop, drop.variants[0], 1).fingerprint
    assert fa["data"]["overlong"] == "truncate" and fb["data"]["overlong"] == "drop"
    assert fa["examples"] != fb["examples"]
    # fewer fitting examples than num_examples: all of them, with a warning
    few = _overlong_recipe({"Few": dict(spec, overlong="drop", num_examples=8)}, [{"data": "Few"}])
    assert len(dataset_examples(few, "Few")) == 6


def test_overlong_drop_keeps_the_b_variant_disjoint(tmp_path, tiny_dir, caplog):
    from remix_ds.data import recipe_tokenizer
    from remix_ds.data.formatting import encoded_length

    caplog.set_level("INFO", logger="remix_ds.data")
    rows = [{"question": f"Who wrote book number {i}?", "answers": [f"Author {i}"]} for i in range(14)]
    for i in (1, 4, 6, 9, 11):
        rows[i]["question"] += " " + " ".join(f"(a long preamble, part {j})" for j in range(40))
    f = tmp_path / "webqa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {}
    for rule in ("truncate", "drop"):
        r = _overlong_recipe({"WA": {"source": "webqa", "path": str(f), "num_examples": 4, "overlong": rule},
                              "WB": {"source": "webqaB", "path": str(f), "num_examples": 4, "overlong": rule}},
                             [{"data": "WA"}, {"data": "WB"}], max_seq_length=64)
        sets[rule] = (dataset_examples(r, "WA"), dataset_examples(r, "WB"))
    tok = recipe_tokenizer(r)
    long_ = lambda e: encoded_length(tok, e) > 64    # noqa: E731
    a, b = sets["truncate"]                                       # today: over-long factoids in the cut
    assert any(map(long_, a + b)) and len(a) == len(b) == 4
    a, b = sets["drop"]
    assert len(a) == len(b) == 4 and not any(map(long_, a + b))
    assert not {e.prompt for e in a} & {e.prompt for e in b}
    # A and B are the first eight fitting examples of the one shuffled order, in order
    order = [e for e in load("webqa", n=14, seed=3, path=str(f)) if not long_(e)]
    assert [e.prompt for e in a + b] == [e.prompt for e in order[:8]]
    assert "examples longer than max_seq_length=64 (overlong: drop)" in caplog.text


def test_overlong_drop_of_a_generated_set_and_bad_values(tiny_dir):
    from remix_ds.data.formatting import encoded_length

    with pytest.raises(ConfigError, match=r"datasets\.A\.overlong must be one of truncate, drop, got 'cut'"):
        _overlong_recipe({"A": {"source": "kvr", "num_examples": 4, "overlong": "cut"}}, [{"data": "A"}])
    r = _overlong_recipe({"A": {"source": "kvr", "num_examples": 4, "overlong": "drop"}}, [{"data": "A"}])
    assert dataset_examples(r, "A") == load("kvr", n=4, seed=3)  # short KVR pairs: nothing to drop
    r.max_seq_length = 8                                          # every KVR pair is longer than 8 tokens
    with pytest.raises(DataError, match=r"no examples \(4 longer than max_seq_length\)"):
        dataset_examples(r, "A")
    r.datasets["A"].overlong = "nope"                             # a spec built past validation
    with pytest.raises(ConfigError, match="datasets.A.overlong"):
        dataset_examples(r, "A")


def test_encode_examples_without_truncation_drops_and_counts(tiny_dir):
    from transformers import AutoTokenizer
    from remix_ds.data.example import Example

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    exs = [Example(prompt="Q?", answer=_long_solution(3), factoid=False), Example(prompt="Q?", answer="a")]
    enc, dropped = encode_examples(tok, exs, 64)                  # today: the solution truncated
    assert dropped == 0 and len(enc[0].input_ids) == 64
    enc, dropped = encode_examples(tok, exs, 64, truncate=False)
    assert dropped == 1 and [e.index for e in enc] == [1]


def test_entityquestions_split_files_side_by_side_are_selected_by_their_names(tmp_path):
    """P17.train.json, P17.dev.json, P17.test.json in one folder: split: train reads the train files only."""
    import json
    import shutil

    flat = LOCAL / "entityquestions" / "flat"
    by_folder = LOCAL / "entityquestions" / "dataset"

    def prompts(path, split=None):
        return sorted(e.prompt for e in load("entityquestions", n=100, path=str(path), split=split))

    def rows(split):
        return sorted(r["question"] for f in sorted((by_folder / split).glob("*.json"))
                      for r in json.loads(f.read_text()))

    assert prompts(flat) == rows("train")               # the source's default split
    assert prompts(flat, "train") == rows("train")
    assert prompts(flat, "dev") == rows("dev")
    assert prompts(flat, "dev+test") == sorted(rows("dev") + rows("test"))
    with pytest.raises(DataError, match="no 'validation' files"):
        load("entityquestions", n=100, path=str(flat), split="validation")
    mixed = tmp_path / "mixed"
    shutil.copytree(flat, mixed)
    shutil.copy(flat / "P17.train.json", mixed / "P99.json")   # a file whose split cannot be told
    with pytest.raises(DataError, match="cannot be told"):
        load("entityquestions", n=100, path=str(mixed), split="train")
    from remix_ds.data.io import data_files
    with pytest.raises(DataError, match="several splits"):   # no split and no default split: refused
        data_files(str(flat), None)
