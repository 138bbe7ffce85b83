"""Exactness of merging (fp32, CPU), stacked adapters, QLoRA, and the refused combinations."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_AB_HEADER, run_cli, write_recipe
from remix_ds.adapters import streaming_merge
from remix_ds.model import load_4bit, load_for_eval, merge_adapter

CPU = torch.device("cpu")


def make_adapter(base_dir, out_dir, seed, r=4, targets=("q_proj", "v_proj", "down_proj")):
    """A LoRA adapter with non-zero A and B (as after training), saved in PEFT's layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    return str(out_dir)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[0, 3, 10, 57, 99, 123, 200, 17, 5], [0, 4, 11, 33, 91, 7, 8, 9, 250]])


def test_streaming_merge_equals_merge_and_unload_and_base_plus_adapter(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "ad", seed=1)
    stats = streaming_merge(tiny_dir, adapter, str(tmp_path / "stream"))
    assert stats["merged"] == 3 * 2 and stats["peak_rss_gib"] > 0
    merge_adapter(tiny_dir, adapter, str(tmp_path / "peft"))
    a = load_file(str(tmp_path / "stream" / "model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    base = load_file(f"{tiny_dir}/model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    merged = load_for_eval(str(tmp_path / "stream"), torch.float32, CPU)
    with_adapter = load_for_eval(adapter, torch.float32, CPU, base=tiny_dir)
    torch.testing.assert_close(logits(merged, IDS), logits(with_adapter, IDS), atol=1e-4, rtol=0)


def test_stacked_adapters_merge_equals_both_active(tiny_dir, tmp_path):
    a1 = make_adapter(tiny_dir, tmp_path / "a1", seed=2)
    a2 = make_adapter(tiny_dir, tmp_path / "a2", seed=3, targets=("q_proj", "o_proj"))
    streaming_merge(tiny_dir, [a1, a2], str(tmp_path / "m"))
    merged = load_for_eval(str(tmp_path / "m"), torch.float32, CPU)
    stacked = load_for_eval(tiny_dir, torch.float32, CPU, adapters=[a1, a2])
    only_first = load_for_eval(tiny_dir, torch.float32, CPU, adapters=[a1])
    torch.testing.assert_close(logits(merged, IDS), logits(stacked, IDS), atol=1e-4, rtol=0)
    assert (logits(stacked, IDS) - logits(only_first, IDS)).abs().max() > 1e-3  # both really are active


def test_qlora_adapter_merges_into_dequantized_weights(tiny_dir, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tiny_dir, tmp_path / "q", seed=4)
    base4 = load_4bit(tiny_dir, torch.float32)
    trained_fn = PeftModel.from_pretrained(base4, adapter).eval()
    streaming_merge(tiny_dir, adapter, str(tmp_path / "m16"), dtype=torch.float32, nf4=True)
    merged = load_for_eval(str(tmp_path / "m16"), torch.float32, CPU)
    cfg = json.load(open(tmp_path / "m16" / "config.json"))
    assert "quantization_config" not in cfg  # a plain 16/32-bit model, not 4-bit weights
    ref = logits(trained_fn, IDS)
    torch.testing.assert_close(logits(merged, IDS), ref, atol=1e-4, rtol=0)
    streaming_merge(tiny_dir, adapter, str(tmp_path / "plain"), dtype=torch.float32, nf4=False)
    plain = load_for_eval(str(tmp_path / "plain"), torch.float32, CPU)
    assert (logits(plain, IDS) - ref).abs().max() > 1e-3  # merging into the unquantised base would differ


def test_qlora_merge_quantises_the_weights_training_saw(tiny_dir, tmp_path):
    """The tiny model is stored in fp32; QLoRA in bf16 quantises each weight's bf16 cast. The merge must
    round-trip that cast, not the file's fp32 (a whole NF4 step apart on some elements)."""
    import bitsandbytes.functional as bnbf

    adapter = make_adapter(tiny_dir, tmp_path / "q", seed=5)
    bf16 = torch.bfloat16
    base4 = load_4bit(tiny_dir, bf16)
    key = "model.layers.0.mlp.down_proj.weight"
    w4 = base4.model.layers[0].mlp.down_proj.weight
    seen = bnbf.dequantize_4bit(w4.data, w4.quant_state, quant_type="nf4").float()   # what training used
    ad = load_file(f"{adapter}/adapter_model.safetensors")
    module = "base_model.model.model.layers.0.mlp.down_proj"
    delta = 2.0 * (ad[f"{module}.lora_B.weight"] @ ad[f"{module}.lora_A.weight"])     # alpha / r = 2
    streaming_merge(tiny_dir, adapter, str(tmp_path / "m"), dtype=torch.float32, nf4=True, nf4_dtype=bf16)
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))[key]
    torch.testing.assert_close(merged, seen + delta, atol=1e-6, rtol=0)
    # round-tripping the file's fp32 instead quantises a different weight
    streaming_merge(tiny_dir, adapter, str(tmp_path / "f"), dtype=torch.float32, nf4=True)
    assert (load_file(str(tmp_path / "f" / "model.safetensors"))[key] - (seen + delta)).abs().max() > 1e-3


COMBO = TINY_AB_HEADER + """eval: {{batch_size: 16}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 1, lr: 3.0e-3, global_batch_size: 8, probe: true,
          lora: {{r: 8, alpha: 16}}}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 1, lr: 3.0e-3, global_batch_size: 8, probe: true,
          lora: {{r: 8, alpha: 16}}}}
variants:
  - name: full-lora
    stage2: {{finetune: lora}}
  - name: lora-full
    stage1: {{finetune: lora}}
  - name: stacked
    stage1: {{finetune: lora, merge: false}}
    stage2: {{finetune: lora, merge: false}}
  - name: qlora-qlora
    stage1: {{finetune: qlora}}
    stage2: {{finetune: qlora}}
"""


@pytest.fixture(scope="module")
def combo(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("combo")
    recipe = write_recipe(tmp / "r.yaml", COMBO.format(name="combo", out=tmp / "run"))
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe)])
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp / "run"


def test_every_mode_combination_runs_and_is_reported(combo):
    report = json.load(open(combo / "report.json"))
    modes = {v["name"]: (v["finetune_stage1"], v["finetune_stage2"]) for v in report["variants"]}
    assert modes == {"full-lora": ("full", "lora(r=8)"), "lora-full": ("lora(r=8)", "full"),
                     "stacked": ("lora(r=8)", "lora(r=8)"), "qlora-qlora": ("qlora(r=8)", "qlora(r=8)")}
    assert not (combo / "stacked" / "stage1" / "merged").exists()      # merge: false keeps the adapter
    cfg2 = json.load(open(combo / "stacked" / "stage2" / "config.json"))
    assert cfg2["frozen_adapters"] == [str(combo / "stacked" / "stage1" / "adapter")]


def test_stacked_adapters_reload_to_training_logits(combo):
    d = combo / "stacked" / "stage2"
    cfg = json.load(open(d / "config.json"))
    probe = torch.load(d / "probe_logits.pt")
    model = load_for_eval(cfg["base_model"], torch.float32, CPU, adapters=cfg["frozen_adapters"] + [str(d / "adapter")])
    b = probe["batch"]
    got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach()
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], probe["logits"][mask], atol=1e-4, rtol=1e-4)


def test_qlora_stage_reloads_to_training_logits_and_merges(combo):
    from peft import PeftModel

    d = combo / "qlora-qlora" / "stage2"
    cfg = json.load(open(d / "config.json"))
    probe = torch.load(d / "probe_logits.pt")
    base4 = load_4bit(cfg["base_model"], torch.float32)
    model = PeftModel.from_pretrained(base4, str(d / "adapter")).eval()
    merged = load_for_eval(str(d / "merged"), torch.float32, CPU)
    b = probe["batch"]
    mask = b["attention_mask"].bool()
    for m in (model, merged):
        got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach()
        torch.testing.assert_close(got[mask], probe["logits"][mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("override,needle", [
    ("variants.0.stage2.ds_config=zero3_offload", "cannot run with ZeRO-3 parameter offload"),
    ("variants.1.stage1.merge=false", "the next stage is full fine-tuning"),
    ("variants.0.stage2.merge=false", "merge: false is not supported for qlora"),
])
def test_impossible_combinations_are_refused_before_training(tmp_path, override, needle):
    text = COMBO.format(name="combo", out=tmp_path / "run").replace("stage2: {finetune: lora}", "stage2: {finetune: qlora}", 1)
    assert "finetune: qlora}" in text
    recipe = write_recipe(tmp_path / "r.yaml", text)
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe), override])
    assert res.returncode == 2 and needle in res.stderr, res.stderr[-2000:]
    assert not list((tmp_path / "run").rglob("DONE.json"))


def test_merge_cli_refuses_what_is_not_a_base_and_an_adapter(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "a", seed=6)
    swapped = run_cli([sys.executable, "launch/merge.py", adapter, tiny_dir, str(tmp_path / "m")], timeout=300)
    assert swapped.returncode == 2 and "is an adapter directory: give the base model first" in swapped.stderr
    missing = run_cli([sys.executable, "launch/merge.py", tiny_dir, str(tmp_path / "nothere"), str(tmp_path / "m")],
                      timeout=300)
    assert missing.returncode == 2 and "not a PEFT adapter directory (no adapter_config.json)" in missing.stderr
    assert not (tmp_path / "m").exists()


def test_eval_cli_scores_a_stage_directory_as_the_pipeline_did(combo, tmp_path):
    """launch/eval.py --model <stage dir>: a merge: false stage is its base with the whole adapter stack (the
    model the pipeline scored), so the accuracy equals the pipeline's stored one."""
    stored = json.load(open(combo / "stacked" / "stage2" / "eval" / "A.json"))
    res = run_cli([sys.executable, "launch/eval.py", "--model", str(combo / "stacked" / "stage2"), "-c",
                   str(combo.parent / "r.yaml"), "--dataset", "A", "--batch-size", "16", "--out", str(tmp_path)],
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(res.stdout[res.stdout.index("{"):])
    assert metrics["n"] == stored["n"] and metrics["accuracy"] == stored["accuracy"]
    preds = [json.loads(l)["prediction"] for l in open(tmp_path / "A.predictions.jsonl")]
    assert preds == [json.loads(l)["prediction"] for l in open(combo / "stacked" / "stage2" / "eval" / "A.predictions.jsonl")]


@pytest.mark.parametrize("rank_pattern, alpha_pattern", [
    ({"q_proj": 2}, {"q_proj": 3}),                                              # bare module name
    ({"self_attn.q_proj": 2}, {"mlp.down_proj": 5}),                             # dotted suffix
    ({"model.layers.0.self_attn.q_proj": 2}, {"model.layers.1.mlp.down_proj": 7}),  # full module path
    ({r".*\.0\.self_attn\.(q|v)_proj": 2}, {r"layers\.1\..*down_proj": 6}),      # regex
    ({"layers.0.self_attn.v_proj": 6, "v_proj": 2}, {"v_proj": 1, "q_proj": 9}),  # first key in order wins
])
def test_streaming_merge_applies_rank_and_alpha_patterns_as_peft_does(tiny_dir, tmp_path, rank_pattern,
                                                                      alpha_pattern):
    """Every pattern form PEFT accepts: the streaming merge equals PEFT's own merge_and_unload."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model = get_peft_model(model, cfg)
    ranks = {n.split(".lora_A")[0]: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert len(set(ranks.values())) > 1, ranks   # the pattern took effect in PEFT
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "ad")
    streaming_merge(tiny_dir, str(tmp_path / "ad"), str(tmp_path / "m"))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                          str(tmp_path / "ad")).merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    for key, w in ours.items():
        torch.testing.assert_close(w, reference[key], atol=1e-6, rtol=0, msg=key)
    merged = load_for_eval(str(tmp_path / "m"), torch.float32, CPU)
    with_adapter = load_for_eval(str(tmp_path / "ad"), torch.float32, CPU, base=tiny_dir)
    torch.testing.assert_close(logits(merged, IDS), logits(with_adapter, IDS), atol=1e-4, rtol=0)
