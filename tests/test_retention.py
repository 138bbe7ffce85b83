"""Retention beyond D_A: probe sets and generic text on the base model and after every stage, the accuracy matrix
and its summaries, checked against hand-computed values and an independent plain-transformers computation."""
import json
import math
import sys

import pytest
import torch

from remix_ds.config import recipe_from_dict


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _three_stage(out, **extra):
    raw = {"name": "t3", "output_dir": str(out), "model": "tiny",
           "datasets": {"A": {"source": "kvr", "num_examples": 10}, "B": {"source": "kvrB", "num_examples": 10},
                        "C": {"source": "json", "path": "unused.jsonl", "num_examples": 10}},
           "stage1": {"data": "A"}, "stage2": {"data": "B"}, "stage3": {"data": "C"},
           "variants": [{"name": "lora", "stage1": {"finetune": "lora"}, "stage2": {"finetune": "lora"},
                         "stage3": {"finetune": "lora"}, "sweep": {"stage1.lora.r": [64, 8]}}]}
    raw.update(extra)
    return recipe_from_dict(raw)


def _m(acc, n=10):
    return {"n": n, "accuracy": acc, "exact_match": acc, "scorer": "generate", "seconds": 0.1}


def _s(epochs, zero=0):
    return {"epochs": epochs, "stopped_by": "epochs", "train_seconds": 2.0 * epochs, "zero_stage": zero}


def test_cl_summaries_hand_computed():
    from remix_ds.retention import cl_summaries

    R = [[0.9, None, None],
         [0.5, 0.8, None],
         [0.3, 0.6, 1.0]]
    s = cl_summaries(R)
    assert s["average_accuracy"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert s["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)      # -0.4
    assert s["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)             # 0.4
    # the best earlier value, not the first: D_A rises after stage 1 here
    s = cl_summaries([[0.4, None], [0.7, 0.9]])
    assert s["backward_transfer"] == pytest.approx(0.3) and s["forgetting"] == pytest.approx(0.4 - 0.7)
    assert cl_summaries([[0.5, None], [None, 0.9]])["backward_transfer"] is None


def test_three_stage_report_carries_the_matrix_and_summaries(tmp_path):
    from remix_ds.pipeline import variant_row
    from remix_ds.report import write_report

    r = _three_stage(tmp_path)
    base = {"eval": {"A": _m(0.0), "B": _m(0.1), "C": _m(0.2)},
            "retention": {"known-P": {"kind": "probe", "n": 20, "accuracy": 1.0, "what": "w"},
                          "text:f": {"kind": "text", "passages": 4, "loss": 3.0, "perplexity": math.exp(3.0),
                                     "what": "t"}}}
    rows = []
    for v, (a, b, c, p) in zip(r.variants, [((0.9, 0.5, 0.3), (0.8, 0.6), (1.0,), (0.95, 0.6, 0.45)),
                                            ((1.0, 0.2, 0.1), (0.7, 0.7), (0.9,), (0.9, 0.5, 0.25))]):
        results = []
        for k in (1, 2, 3):
            ev = {"A": _m(a[k - 1])}
            if k >= 2:
                ev["B"] = _m(b[k - 2])
            if k == 3:
                ev["C"] = _m(c[0])
            results.append({"summary": _s(4 + k, zero=0 if v.name.endswith("r64") else 2), "eval": ev,
                            "retention": {"known-P": {"kind": "probe", "n": 20, "accuracy": p[k - 1], "what": "w"},
                                          "text:f": {"kind": "text", "passages": 4, "loss": 3.0 + k / 10,
                                                     "perplexity": math.exp(3.0 + k / 10), "what": "t"}}})
        rows.append(variant_row(r, v, results, base))
    report = {"recipe": "t3", "output_dir": str(tmp_path), "world_size": 1, "precision": "fp32", "ds_config": "zero2",
              "num_stages": 3, "variants": rows}
    md = open(write_report(report, str(tmp_path))).read()
    js = json.load(open(tmp_path / "report.json"))
    m = js["variants"][0]["matrix"]
    assert m["rows"] == ["base", "stage1", "stage2", "stage3"]
    assert m["columns"] == ["D_A", "D_B", "D_C", "known-P"]
    assert m["values"] == [[0.0, 0.1, 0.2, 1.0],
                           [0.9, None, None, 0.95],
                           [0.5, 0.8, None, 0.6],
                           [0.3, 0.6, 1.0, 0.45]]
    # by hand: ACC = (0.3 + 0.6 + 1.0) / 3; BWT = ((0.3 - 0.9) + (0.6 - 0.8)) / 2; forgetting = (0.6 + 0.2) / 2
    assert m["average_accuracy"] == pytest.approx(0.633333, abs=1e-6)
    assert m["backward_transfer"] == pytest.approx(-0.4) and m["forgetting"] == pytest.approx(0.4)
    m2 = js["variants"][1]["matrix"]
    # (0.1 + 0.7 + 0.9) / 3; ((0.1 - 1.0) + (0.7 - 0.7)) / 2; max(1.0, 0.2) - 0.1 = 0.9 and 0.7 - 0.7 = 0 -> 0.45
    assert m2["average_accuracy"] == pytest.approx(1.7 / 3) and m2["backward_transfer"] == pytest.approx(-0.45)
    assert m2["forgetting"] == pytest.approx(0.45)
    ret = js["variants"][1]["retention"]
    assert ret["known-P"]["base"] == 1.0 and ret["known-P"]["after"] == [0.9, 0.5, 0.25]
    assert ret["text:f"]["after"] == pytest.approx([3.1, 3.2, 3.3])
    # report.md: the compact table with tuples, the matrix, its summaries, the ZeRO stage that ran
    assert "| lora-r64 | lora(r=64) → lora(r=64) → lora(r=64) | none | 0.900, 0.500, 0.300 | 0.800, 0.600 | 1.000 |" in md
    assert "| 0.600 | 0.633 | -0.400 | 1.000, 0.950, 0.600, 0.450 | 3.000, 3.100, 3.200, 3.300 | 5, 6, 7 |" in md
    assert "| stage2 | 0.500 | 0.800 | - | 0.600 |" in md and "ACC 0.633, BWT -0.400, forgetting 0.400." in md
    assert "ZeRO stage (s1, s2, s3): lora-r64 0, 0, 0; lora-r8 2, 2, 2" in md


def test_comparison_names_the_stage_key_that_differs(tmp_path):
    from remix_ds.pipeline import variant_row
    from remix_ds.report import comparisons

    r = _three_stage(tmp_path)
    rows = []
    for v, a3 in zip(r.variants, (0.9, 0.1)):
        res = [{"summary": _s(3), "eval": {"A": _m(1.0, 100)}},
               {"summary": _s(3), "eval": {"A": _m(0.95, 100), "B": _m(1.0, 100)}},
               {"summary": _s(3), "eval": {"A": _m(a3, 100), "B": _m(1.0, 100), "C": _m(1.0, 100)}}]
        rows.append(variant_row(r, v, res))
    words = " ".join(comparisons({"num_stages": 3, "variants": rows}))
    assert "lora-r64 > lora-r8 (0.900 vs 0.100" in words
    assert "they differ in stage1.lora.r 64 vs 8" in words and "finetune" not in words


def test_retention_key_is_evaluation_only(tmp_path):
    """A recipe with retention: has the same stage fingerprints as without; one without keeps today's behaviour."""
    from remix_ds.config import stage_hash
    from remix_ds.errors import ConfigError
    from remix_ds.retention import check_retention, probe_defs
    from remix_ds.stages import Stage

    raw = {"name": "t", "output_dir": str(tmp_path), "model": "tiny",
           "datasets": {"A": {"source": "kvr", "num_examples": 5}, "B": {"source": "kvrB", "num_examples": 5},
                        "P": {"source": "kvrP", "num_examples": 5, "seed": 0}},
           "stage1": {"data": "A"}, "stage2": {"data": "B"}}
    plain = recipe_from_dict(raw)
    ret = recipe_from_dict({**raw, "retention": {"probes": ["P", {"data": "A", "known": False}], "text": "none"}})
    assert plain.retention is None and probe_defs(plain) == []
    for k in (1, 2):
        assert stage_hash(Stage(plain, plain.variants[0], k).fingerprint) == stage_hash(Stage(ret, ret.variants[0], k).fingerprint)
    assert [(p.name, p.data, p.known) for p in probe_defs(ret)] == [("known-P", "P", True), ("A", "A", False)]
    auto = recipe_from_dict({**raw, "retention": {}})
    assert [(p.name, p.data, p.pool) for p in probe_defs(auto)] == [("known-A", "A", True)]
    with pytest.raises(ConfigError, match="not a dataset"):
        check_retention(recipe_from_dict({**raw, "retention": {"probes": ["Z"]}}))
    with pytest.raises(ConfigError, match="retention.scorer"):
        check_retention(recipe_from_dict({**raw, "retention": {"scorer": "beam"}}))


def test_source_pool_leaves_out_the_recipes_own_examples(tmp_path):
    from remix_ds.data.kvr import kvr_examples
    from remix_ds.retention import source_pool

    r = recipe_from_dict({"name": "t", "output_dir": str(tmp_path), "model": "tiny",
                          "datasets": {"A": {"source": "kvr", "num_examples": 5}}, "stage1": {"data": "A"}})
    pool = source_pool(r, "A", 7)
    assert [e.prompt for e in pool] == [e.prompt for e in kvr_examples(12, r.seed, "A")[5:]]


# ------------------------------------------------------------------ end to end, checked independently

def _greedy_known(model, tok, examples):
    """Plain transformers: greedy decoding in the chat format, filter-unknown's answer rule written out here."""
    out = []
    for ex in examples:
        ids = [tok.bos_token_id] + tok.encode(f"<|user|>\n{ex['prompt']}\n<|assistant|>\n", add_special_tokens=False)
        x = torch.tensor([ids])
        gold = ex["answer"].strip().lower()
        with torch.no_grad():
            for _ in range(len(tok.encode(ex["answer"], add_special_tokens=False)) + 4):
                nxt = model(input_ids=x).logits[0, -1].argmax()
                x = torch.cat([x, nxt.view(1, 1)], dim=1)
                if int(nxt) == tok.eos_token_id:
                    break
        text = tok.decode(x[0, len(ids):].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ans = text.lstrip().splitlines()[0] if text.strip() else ""
        ans = ans.split("<|")[0].strip().lower()
        out.append(ans == gold or (ans.startswith(gold) and ans[len(gold):len(gold) + 1] in list(".,;:!?")))
    return out


def _text_loss(model, tok, passages):
    nll, n = 0.0, 0
    for p in passages:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()   # mean over the len-1 predicted tokens
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return nll / n


def test_pipeline_reports_probe_and_text_retention_checked_independently(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import REPO, run_cli, write_recipe
    from remix_ds.data.kvr import kvr_examples

    # a probe file of 6 facts the tiny model was pretrained on (kvr part P, seed 0) and 6 it never saw
    probe = [{"prompt": e.prompt, "answer": e.answer} for e in kvr_examples(6, 0, "P") + kvr_examples(6, 99, "A")]
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps(x) + "\n" for x in probe))
    words = "the river ran past old mill where farmers brought grain each autumn".split()
    passages = [" ".join(words[i:] + words[:i]) for i in range(0, 12, 3)]          # 4 passages of 12 words
    (tmp_path / "text.txt").write_text("\n\n".join(passages) + "\n")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: ret
output_dir: {out}
model: tiny
precision: fp32
max_seq_length: 64
datasets:
  A: {{source: kvr, num_examples: 8}}
  B: {{source: kvrB, num_examples: 8}}
  Q: {{source: json, path: {tmp_path / 'probe.jsonl'}, num_examples: 12, shuffle: false}}
eval: {{batch_size: 16}}
retention: {{probes: [Q], text: {tmp_path / 'text.txt'}, text_passages: 4, text_words: 12}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 2, lr: 3.0e-3, global_batch_size: 4}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 2, lr: 3.0e-3, global_batch_size: 4}}
variants:
  - name: full
""")
    r = run_cli([sys.executable, str(REPO / "launch" / "pipeline.py"), "-c", str(recipe)], timeout=600,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    js = json.loads((out / "report.json").read_text())
    row = js["variants"][0]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    models = {"base": tiny_dir, "stage1": str(out / "full" / "stage1" / "model"),
              "stage2": str(out / "full" / "stage2" / "model")}
    loaded = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in models.items()}
    # the known split: what the base model answers, by greedy decoding here
    known_mask = _greedy_known(loaded["base"], tok, probe)
    known = [x for x, k in zip(probe, known_mask) if k]
    assert known_mask[:6] == [True] * 6 and sum(known_mask) >= 6       # the pretraining pairs are known
    saved = [json.loads(line) for line in open(out / "retention" / "known" / "known-Q" / "known.jsonl")]
    assert [x["prompt"] for x in saved] == [x["prompt"] for x in known]
    ret = row["retention"]["known-Q"]
    assert ret["n"] == len(known) and ret["base"] == 1.0
    for k, stage in enumerate(("stage1", "stage2")):
        expect = sum(_greedy_known(loaded[stage], tok, known)) / len(known)
        assert ret["after"][k] == pytest.approx(expect), stage
    # generic text: mean loss per token of the 4 passages, plain text, each model
    t = row["retention"]["text:text.txt"]
    assert t["n"] == 4
    assert t["base"] == pytest.approx(_text_loss(loaded["base"], tok, passages), rel=1e-4)
    for k, stage in enumerate(("stage1", "stage2")):
        assert t["after"][k] == pytest.approx(_text_loss(loaded[stage], tok, passages), rel=1e-4)
    # the matrix: base row (D_A, D_B by the recipe's scorer, the probe), after each stage
    m = row["matrix"]
    assert m["rows"] == ["base", "stage1", "stage2"] and m["columns"] == ["D_A", "D_B", "known-Q"]
    assert m["values"][0][2] == 1.0 and m["values"][2][2] == ret["after"][1]
    assert m["values"][2][:2] == [row["acc_A_after_stage2"], row["acc_B_after_stage2"]]
    assert m["backward_transfer"] == pytest.approx(row["acc_A_after_stage2"] - row["acc_A_after_stage1"])
    md = (out / "report.md").read_text()
    assert "known-Q (base, s1, s2)" in md and "## Accuracy matrix" in md
    # the ZeRO stage that ran (full fine-tuning on one process runs without ZeRO), hardware, commit, versions
    zs = [json.loads((out / "full" / f"stage{k}" / "DONE.json").read_text())["summary"]["zero_stage"] for k in (1, 2)]
    assert zs == [0, 0] and "ZeRO stage 0 in every stage" in md
    env = js["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["hardware"] and env["git_commit"]
    assert f"torch {torch.__version__}" in md and env["git_commit"] in md
    # a rerun scores nothing again (cached), and a recipe without retention: keeps the stages (same fingerprint)
    r2 = run_cli([sys.executable, str(REPO / "launch" / "pipeline.py"), "-c", str(recipe), "retention=null"],
                 timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "full/stage1: complete output found" in r2.stderr and "full/stage2: complete output found" in r2.stderr
    assert "known-Q" not in (out / "report.md").read_text()


def test_held_out_text_is_disjoint_from_what_mixing_trains_on(tmp_path):
    """text: auto takes the mixing sources' passages that no stage mixes in."""
    from pathlib import Path

    from remix_ds.data import stage_train_set
    from remix_ds.retention import text_sets

    fineweb = str(Path(__file__).parent / "fixtures" / "hub" / "fineweb" / "train.jsonl")
    r = recipe_from_dict({"name": "t", "output_dir": str(tmp_path), "model": "tiny",
                          "datasets": {"A": {"source": "kvr", "num_examples": 4}},
                          "stage1": {"data": "A", "mix": {"source": "fineweb", "path": fineweb, "ratio": 1.0,
                                                          "prompt_words": 10, "target_words": 10}},
                          "variants": [{"name": "fw"}, {"name": "rw", "stage1": {"mix": {
                              "source": "random-words", "ratio": 1.0, "prompt_words": 4, "target_words": 4}}}],
                          "retention": {"text_passages": 20, "text_words": 20}})
    sets = text_sets(r)
    assert list(sets) == ["text:fineweb", "text:random-words"]
    mixed = [ex.prompt.split("\n\n", 1)[1].split()[:10] for ex in stage_train_set(r, r.variants[0].stages[0], 1)[1]
             if ex.role == "mix"]
    assert len(mixed) == 4
    docs = [json.loads(line)["text"].split() for line in open(fineweb)]
    held = [t.split() for t in sets["text:fineweb"]["texts"]]
    # every one of the 12 documents has >= 20 words; 4 of them are mixed in: the other 8 are held out, none mixed
    assert len(held) == 8 and all(len(t) == 20 for t in held)
    assert not any(t[:10] == m for t in held for m in mixed)
    assert all(any(d[:20] == t for d in docs) for t in held)
    rw = sets["text:random-words"]["texts"]
    assert len(rw) == 20 and all(len(t.split()) == 20 for t in rw)
