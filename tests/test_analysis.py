"""The logit-lens layer analysis on full models and on base + adapter."""
import json
import os

import pytest
import torch

from remix_ds.config import recipe_from_dict

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    """A run layout: variant full (model/ per stage) and lora (adapter/ + merged/ per stage)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from remix_ds.model import load_tokenizer, merge_adapter

    out = tmp_path_factory.mktemp("run")
    for k in (1, 2):
        d = out / "full" / f"stage{k}"
        d.mkdir(parents=True)
        os.symlink(tiny_dir, d / "model")
    tok = load_tokenizer(tiny_dir)
    base = tiny_dir
    for k in (1, 2):
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                         init_lora_weights=False)  # random B: the adapter changes the model
        peft = get_peft_model(model, cfg)
        d = out / "lora" / f"stage{k}"
        peft.save_pretrained(str(d / "adapter"))
        tok.save_pretrained(str(d / "adapter"))
        merge_adapter(base, str(d / "adapter"), str(d / "merged"), dtype=torch.float32)
        base = str(d / "merged")
    recipe = recipe_from_dict({
        "name": "lens", "output_dir": str(out), "model": "tiny", "precision": "fp32",
        "datasets": {"A": {"source": "kvr", "num_examples": 24}, "B": {"source": "kvrB", "num_examples": 8}},
        "stage1": {"data": "A"}, "stage2": {"data": "B"},
        "variants": [{"name": "full"}, {"name": "lora", "stage1": {"finetune": "lora"}, "stage2": {"finetune": "lora"}},
                     {"name": "absent"},
                     {"name": "stacked", "stage1": {"finetune": "lora", "merge": False},
                      "stage2": {"finetune": "lora", "merge": False}}]})
    # stacked (merge: false): lora's two adapters kept unmerged, both active on the tiny base
    for k in (1, 2):
        (out / "stacked" / f"stage{k}").mkdir(parents=True)
        os.symlink(out / "lora" / f"stage{k}" / "adapter", out / "stacked" / f"stage{k}" / "adapter")
    from remix_ds.config import stage_hash
    from remix_ds.stages import Stage

    for v in recipe.variants:   # complete outputs of the recipe's config (absent has none)
        for k in (1, 2):
            if v.name != "absent":
                done = {"hash": stage_hash(Stage(recipe, v, k).fingerprint), "summary": {}}
                (Stage(recipe, v, k).dir / "DONE.json").write_text(json.dumps(done))
    return recipe


def test_logit_lens_per_layer_for_every_variant(run_dir):
    from remix_ds.analysis import analyze

    res = analyze(run_dir, ["full", "lora", "absent"], batch_size=7, plot=True)
    out = os.path.join(run_dir.output_dir, "analysis")
    with open(os.path.join(out, "logit_lens.png"), "rb") as f:
        assert f.read(8) == PNG
    js = json.load(open(os.path.join(out, "logit_lens.json")))
    md = open(os.path.join(out, "logit_lens.md")).read()
    assert set(js["variants"]) == {"full", "lora", "absent"} and js["missing"] == ["absent/stage1", "absent/stage2"]
    for name in ("full", "lora"):
        for k in ("1", "2"):
            s = js["variants"][name]["stages"][k]
            assert s["n"] == 24 and s["layers"] == [0, 1, 2]  # embeddings + 2 layers of the tiny model
            assert all(0.0 <= x <= 1.0 for x in s["top1_share"]) and all(x >= 1.0 for x in s["mean_rank"])
            assert all(x == 1.0 for x, t in zip(s["mean_rank"], s["top1_share"]) if t == 1.0)
    assert js["variants"]["lora"]["stages"]["2"]["model"].endswith(os.path.join("lora", "stage2", "merged"))
    assert res["variants"]["full"]["stages"]["1"]["top1_share"] == js["variants"]["full"]["stages"]["1"]["top1_share"]
    assert "## Stage 2 models" in md and "| layer | full top1 | full rank | lora top1 | lora rank |" in md


def test_last_layer_is_the_models_own_first_token_accuracy(run_dir):
    """The lens at the last layer is the model's output: its top-1 share = first-token teacher-forced accuracy."""
    from remix_ds.analysis import logit_lens
    from remix_ds.data import dataset_examples
    from remix_ds.data.formatting import answer_ids, prompt_ids
    from remix_ds.model import load_for_eval, load_tokenizer

    path = os.path.join(run_dir.output_dir, "lora", "stage1", "merged")
    model = load_for_eval(path, torch.float32, torch.device("cpu"))
    tok = load_tokenizer(path)
    exs = dataset_examples(run_dir, "A")
    lens = logit_lens(model, tok, exs, 5, torch.device("cpu"))
    hits, ranks = 0, []
    with torch.no_grad():
        for ex in exs:
            ids = torch.tensor([prompt_ids(tok, ex.prompt)])
            logits = model(ids).logits[0, -1]
            g = answer_ids(tok, ex.answer)[0]
            hits += int(logits.argmax()) == g
            ranks.append(int((logits > logits[g]).sum()) + 1)
    assert lens["top1_share"][-1] == pytest.approx(hits / len(exs))
    assert lens["mean_rank"][-1] == pytest.approx(sum(ranks) / len(ranks))


def test_base_plus_adapter_gives_the_merged_result(run_dir):
    from remix_ds.analysis import analyze

    merged = analyze(run_dir, ["lora"], [1, 2], batch_size=8, plot=False)
    adapter = analyze(run_dir, ["lora"], [1, 2], adapter=True, batch_size=8, plot=False,
                      out_dir=os.path.join(run_dir.output_dir, "analysis_adapter"))
    for k in ("1", "2"):
        a, m = adapter["variants"]["lora"]["stages"][k], merged["variants"]["lora"]["stages"][k]
        assert a["model"].endswith("adapter") and m["model"].endswith("merged")
        assert a["top1_share"] == m["top1_share"]
        assert a["mean_rank"] == pytest.approx(m["mean_rank"], rel=1e-4)
    # the adapter of stage 1 sits on the tiny base, that of stage 2 on stage 1's merged model
    assert os.path.isfile(os.path.join(adapter["variants"]["lora"]["stages"]["1"]["base"], "remix_tiny.json"))
    assert adapter["variants"]["lora"]["stages"]["2"]["base"].endswith(os.path.join("lora", "stage1", "merged"))
    # and the adapter does change the model: the two stages differ
    lora = merged["variants"]["lora"]["stages"]
    assert lora["1"]["mean_rank"] != lora["2"]["mean_rank"]


def test_analyze_script_help():
    from conftest import REPO, run_cli
    import sys

    r = run_cli([sys.executable, str(REPO / "launch" / "analyze.py"), "--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--adapter" in r.stdout and "--stage" in r.stdout


def test_stacked_adapters_are_analysed_as_evaluated(run_dir, tmp_path):
    """merge: false: stage k's model is the base with every adapter up to k active, as evaluation loads it
    (here lora's adapters unmerged: the same model as lora's merged stage 2); a stage whose output does not
    match the recipe's config (no DONE.json of it) is skipped, not analysed."""
    from remix_ds.analysis import analyze

    res = analyze(run_dir, ["stacked", "lora"], [2], batch_size=8, plot=False, out_dir=str(tmp_path / "a"))
    st, lo = res["variants"]["stacked"]["stages"]["2"], res["variants"]["lora"]["stages"]["2"]
    assert [os.path.relpath(a, run_dir.output_dir) for a in st["adapters"]] == \
        [os.path.join("stacked", "stage1", "adapter"), os.path.join("stacked", "stage2", "adapter")]
    assert os.path.isfile(os.path.join(st["base"], "remix_tiny.json"))
    assert st["top1_share"] == lo["top1_share"] and st["mean_rank"] == pytest.approx(lo["mean_rank"], rel=1e-4)
    done = os.path.join(run_dir.output_dir, "stacked", "stage2", "DONE.json")
    os.rename(done, done + ".bak")
    try:
        res = analyze(run_dir, ["stacked"], [2], batch_size=8, plot=False, out_dir=str(tmp_path / "b"))
        assert res["missing"] == ["stacked/stage2"]
    finally:
        os.rename(done + ".bak", done)
