"""The forgetting report: rows, words only where the numbers say so, the figure, and eval after a stage."""
import json
import os

import pytest
import torch

from remix_ds.config import recipe_from_dict

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recipe(out, **extra):
    raw = {"name": "t", "output_dir": str(out), "model": "tiny", "max_seq_length": 64,
           "datasets": {"A": {"source": "kvr", "num_examples": 12}, "B": {"source": "kvrB", "num_examples": 12}},
           "stage1": {"data": "A", "finetune": "full", "epochs": 1, "global_batch_size": 4},
           "stage2": {"data": "B", "finetune": "full", "epochs": 1, "global_batch_size": 4},
           "variants": [{"name": "full"},
                        {"name": "lora-mix", "stage1": {"finetune": "lora", "lora": {"r": 8},
                                                        "mix": {"source": "random-words", "ratio": 1.0}},
                         "stage2": {"finetune": "lora", "lora": {"r": 8}}}]}
    raw.update(extra)
    return recipe_from_dict(raw)


def _summary(epochs, secs, n_mix=0, dropped=0):
    return {"epochs": epochs, "stopped_by": "epochs", "train_seconds": secs, "n_data": 100, "n_mix": n_mix,
            "n_dropped": dropped, "tokens": 9000 * epochs, "padfree_tokens_per_s": 9000 * epochs / secs / 0.9,
            "padding": 0.05}


def _metrics(acc, n=100, **kw):
    return {"n": n, "accuracy": acc, "exact_match": acc, "scorer": "generate", "seconds": 0.5, **kw}


def test_variant_row_has_modes_mixing_accuracies_forgetting_epochs_and_time(tmp_path):
    from remix_ds.pipeline import variant_row

    r = _recipe(tmp_path)
    v = r.variant("lora-mix")
    results = [{"summary": _summary(7, 12.5, n_mix=100), "eval": {"A": _metrics(0.9)}},
               {"summary": _summary(3, 4.0), "eval": {"A": _metrics(0.25), "B": _metrics(0.8, alias_exact_match=0.85)}}]
    row = variant_row(r, v, results)
    assert row["finetune_stage1"] == "lora(r=8)" and row["mix_stage1"] == "random-words:1"
    assert row["mix_stage2"] == "none"
    assert row["acc_A_after_stage1"] == 0.9 and row["acc_A_after_stage2"] == 0.25 and row["acc_B_after_stage2"] == 0.8
    assert row["forgetting"] == pytest.approx(0.65)
    assert row["epochs_stage1"] == 7 and row["train_seconds_stage2"] == 4.0 and row["n_A"] == 100
    # padding-free tokens/s of each stage's training steps, whole tokens in the table
    assert row["tokens_per_s_stage2"] == round(9000 * 3 / 4.0 / 0.9) and row["stages"][1]["padding"] == 0.05
    assert row["stages"][1]["eval"]["B"]["alias_exact_match"] == 0.85 and row["stages"][0]["n_mix"] == 100
    # the study's accuracy wins over plain exact match (e.g. WebQuestions containment)
    results[1]["eval"]["B"] = {"n": 100, "accuracy": 0.6, "exact_match": 0.4}
    assert variant_row(r, v, results)["acc_B_after_stage2"] == 0.6


def _write_log(path, stage_epochs, key_acc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        step = 0
        for e, accs in enumerate(key_acc, 1):
            for _ in range(2):
                step += 1
                f.write(json.dumps({"step": step, "epoch": e, "loss": 1.0, "lr": 1e-3, "time": step}) + "\n")
            f.write(json.dumps({"epoch": e, "step": step, "teacher_forced_accuracy": accs, "time": step}) + "\n")


def _report(tmp_path, finals):
    rows = []
    for name, (a1, a2, b2) in finals.items():
        mix = "random-words:1" if "mix" in name else "none"
        rows.append({"name": name, "finetune_stage1": "full", "finetune_stage2": "full", "mix_stage1": mix,
                     "mix_stage2": "none", "acc_A_after_stage1": a1, "acc_A_after_stage2": a2,
                     "acc_B_after_stage2": b2, "n_A": 100, "n_B": 100, "forgetting": a1 - a2, "epochs_stage1": 5,
                     "epochs_stage2": 3, "train_seconds_stage1": 10.0, "train_seconds_stage2": 4.0,
                     "scorer": "generate",
                     "stages": [{"stage": 1, "data": "A", "eval": {"A": {"dataset": "A", **_metrics(a1)}},
                                 "n_data": 100, "n_mix": 100 if mix != "none" else 0, "n_dropped": 0},
                                {"stage": 2, "data": "B", "eval": {"A": {"dataset": "A", **_metrics(a2)},
                                                                   "B": {"dataset": "B", **_metrics(b2)}},
                                 "n_data": 100, "n_mix": 0, "n_dropped": 0}]})
        base = tmp_path / name
        _write_log(str(base / "stage1" / "train_log.jsonl"), 5, [{"A": x} for x in (0.2, 0.5, 0.8, 0.95, a1)])
        _write_log(str(base / "stage2" / "train_log.jsonl"), 3,
                   [{"A": a1 - (a1 - a2) * e / 3, "B": b2 * e / 3} for e in (1, 2, 3)])
    return {"recipe": "t", "output_dir": str(tmp_path), "world_size": 1, "precision": "fp32", "ds_config": "zero2",
            "num_stages": 2, "variants": rows}


def test_write_report_table_words_and_figure(tmp_path):
    from remix_ds.report import write_report

    report = _report(tmp_path, {"full": (1.0, 0.10, 0.9), "full-mix": (1.0, 0.80, 0.88), "full-mix2": (1.0, 0.76, 0.9)})
    md_path = write_report(report, str(tmp_path))
    md = open(md_path).read()
    js = json.load(open(tmp_path / "report.json"))
    with open(tmp_path / "forgetting.png", "rb") as f:
        assert f.read(8) == PNG
    assert js["figure"] == "forgetting.png" and "forgetting.png" in md
    # the compact table: every variant, mode s1 → s2, mixing, accuracies, forgetting, epochs and wall time as tuples
    assert ("| name | mode | mix (s1) | D_A after s1 | D_A after s2 | D_B (s2) | forgetting | epochs (s1, s2) | "
            "train s (s1, s2) |") in md
    assert "| full-mix | full → full | random-words:1 | 1.000 | 0.800 | 0.880 | 0.200 | 5, 3 | 10, 4.0 |" in md
    # the long form: every column in report.json
    for col in ("finetune_stage1", "mix_stage1", "acc_A_after_stage1", "acc_A_after_stage2", "acc_B_after_stage2",
                "forgetting", "epochs_stage2", "train_seconds_stage2", "tokens_per_s_stage2"):
        assert col in js["columns"]
    # per-epoch curves of stage 2 start at the end of stage 1
    c = js["curves"]["full"]
    assert c["epoch"] == [0.0, 1.0, 2.0, 3.0] and c["accuracy"][0] == 1.0 and c["accuracy"][-1] == pytest.approx(0.1)
    # words: 0.80 / 0.76 vs 0.10 on 100 examples each is clear; 0.80 vs 0.76 is noise and not stated
    words = " ".join(js["comparisons"])
    assert "full-mix > full (0.800 vs 0.100" in words and "full-mix2 > full (0.760 vs 0.100" in words
    assert "full-mix > full-mix2" not in words and "full-mix2 > full-mix" not in words
    assert "they differ in mix_stage1" in words
    assert "D_A accuracy after stage 1 (what was learnt): every variant has 1.000." in words
    assert "D_B accuracy after stage 2: the variants range from 0.880 to 0.900, but no pair differs" in words


def test_no_words_without_a_clear_difference(tmp_path):
    from remix_ds.report import comparisons, two_proportion_z

    report = _report(tmp_path, {"a": (0.9, 0.50, 0.5), "b": (0.9, 0.56, 0.5)})
    words = comparisons(report)
    assert not any(">" in w for w in words)
    assert any("no pair differs beyond sampling noise" in w for w in words)
    assert two_proportion_z(0.5, 100, 0.5, 100) == 0.0
    assert abs(two_proportion_z(0.9, 100, 0.1, 100)) > 10
    single = dict(report, variants=report["variants"][:1])
    assert comparisons(single) == []


def test_dropped_examples_are_flagged(tmp_path):
    from remix_ds.report import write_report

    report = _report(tmp_path, {"full-mix": (1.0, 0.5, 0.9)})
    report["variants"][0]["stages"][0]["n_dropped"] = 100
    md = open(write_report(report, str(tmp_path))).read()
    assert "full-mix/stage1 dropped 100 of its 200 training examples" in md
    assert "check that the mixing was actually trained on" in md


def test_eval_keys_include_gsm8k_and_math_as_d_b(tmp_path):
    from remix_ds.pipeline import eval_keys
    from remix_ds.stages import Stage

    for src in ("gsm8k", "math"):
        r = recipe_from_dict({"name": "t", "output_dir": str(tmp_path), "model": "tiny",
                              "datasets": {"A": {"source": "kvr"}, "G": {"source": src}, "U": {"source": "ultrachat"}},
                              "stage1": {"data": "A"}, "stage2": {"data": "G"}, "stage3": {"data": "U"}})
        v = r.variants[0]
        assert eval_keys(Stage(r, v, 1)) == ["A"]
        assert eval_keys(Stage(r, v, 3)) == ["A", "G"]  # not the conversation set: it has no answer to score


def test_eval_after_stage_scorer_option_and_cache(tmp_path, tiny_dir):
    """eval.scorer=teacher-forced scores every dataset of stages 1..k; results are cached per scorer."""
    from remix_ds.pipeline import eval_after_stage
    from remix_ds.stages import Stage

    for k in (1, 2):
        d = tmp_path / "full" / f"stage{k}"
        d.mkdir(parents=True)
        os.symlink(tiny_dir, d / "model")
    r = _recipe(tmp_path, eval={"batch_size": 8, "scorer": "teacher-forced"})
    v = r.variant("full")
    res = eval_after_stage(Stage(r, v, 2))
    assert set(res) == {"A", "B"}
    assert all(m["scorer"] == "teacher-forced" and m["n"] == 12 for m in res.values())
    ev = tmp_path / "full" / "stage2" / "eval"
    assert (ev / "A.predictions.jsonl").is_file() and (ev / "B.json").is_file()
    mtime = os.path.getmtime(ev / "A.json")
    assert eval_after_stage(Stage(r, v, 2))["A"]["seconds"] == res["A"]["seconds"]  # reused
    assert os.path.getmtime(ev / "A.json") == mtime
    r.eval.scorer = "generate"
    gen = eval_after_stage(Stage(r, v, 2))
    assert gen["A"]["scorer"] == "generate" and gen["A"]["accuracy"] == res["A"]["accuracy"]
    assert "rouge_l" in gen["A"]
    r.eval.scorer = "beam"
    from remix_ds.errors import ConfigError
    with pytest.raises(ConfigError, match="eval.scorer"):
        eval_after_stage(Stage(r, v, 1))


def test_pipeline_writes_the_report_and_the_figure(tmp_path, tiny_dir):
    """End to end on the tiny model: train 2 stages x 2 variants, evaluate, write report + forgetting.png."""
    import sys

    from conftest import REPO, run_cli, write_recipe

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: e2e
output_dir: {out}
model: tiny
precision: fp32
max_seq_length: 64
datasets:
  A: {{source: kvr, num_examples: 8}}
  B: {{source: kvrB, num_examples: 8}}
eval: {{batch_size: 16}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 4}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 4}}
variants:
  - name: full
  - name: lora
    stage1: {{finetune: lora, lora: {{r: 4, alpha: 8}}}}
    stage2: {{finetune: lora, lora: {{r: 4, alpha: 8}}}}
""")
    r = run_cli([sys.executable, str(REPO / "launch" / "pipeline.py"), "-c", str(recipe)], timeout=300,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "report.md").read_text()
    js = json.loads((out / "report.json").read_text())
    assert (out / "forgetting.png").read_bytes()[:8] == PNG
    assert [v["name"] for v in js["variants"]] == ["full", "lora"]
    assert "| lora | lora(r=4) → lora(r=4) | none |" in md
    for v in js["variants"]:
        assert v["acc_A_after_stage1"] is not None and v["acc_B_after_stage2"] is not None
        assert v["forgetting"] == pytest.approx(v["acc_A_after_stage1"] - v["acc_A_after_stage2"])
        assert js["curves"][v["name"]]["epoch"] == [0.0, 1.0, 2.0]
    for name in ("full", "lora"):
        assert (out / name / "stage2" / "eval" / "A.predictions.jsonl").is_file()
        assert (out / name / "stage2" / "eval" / "B.predictions.jsonl").is_file()
