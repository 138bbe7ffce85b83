"""End to end in one process (plain `python launch/pipeline.py`): memorization, report, resume-by-skip."""
import json
import os
import sys

import pytest
from safetensors.torch import load_file

from conftest import read_tensorboard, run_cli, write_recipe

RECIPE = """
name: e2e
output_dir: {out}
model: tiny
ds_config: zero2
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 40}}
  B: {{source: kvrB, num_examples: 40}}
eval: {{batch_size: 40}}
stage1: {{data: A, finetune: full, stop: accuracy, epochs: 120, lr: 3.0e-3, global_batch_size: 10}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 10, packing: false}}
variants:
  - name: full
  - name: lora
    stage1: {{finetune: lora, stop: fixed, epochs: 3, lr: 5.0e-3, lora: {{r: 8, alpha: 16}}, packing: true,
              mix: {{source: random-words, ratio: 0.5, prompt_words: 4, target_words: 4}}}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    recipe = write_recipe(tmp / "recipe.yaml", RECIPE.format(out=out))
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe)])
    assert res.returncode == 0, res.stderr[-4000:]
    return out, recipe, res


def test_full_finetuning_memorizes_kvr(run):
    out, _, _ = run
    report = json.load(open(out / "report.json"))
    full = next(v for v in report["variants"] if v["name"] == "full")
    assert full["acc_A_after_stage1"] == 1.0
    done = json.load(open(out / "full" / "stage1" / "DONE.json"))
    assert done["summary"]["stopped_by"] == "accuracy"
    assert done["summary"]["epochs"] < 120


def test_report_schema(run):
    out, _, res = run
    report = json.load(open(out / "report.json"))
    assert [v["name"] for v in report["variants"]] == ["full", "lora"]
    for v in report["variants"]:
        for key in ("finetune_stage1", "finetune_stage2", "mix_stage1", "mix_stage2", "acc_A_after_stage1",
                    "acc_A_after_stage2", "acc_B_after_stage2", "forgetting"):
            assert key in v, key
        for key in ("acc_A_after_stage1", "acc_A_after_stage2", "acc_B_after_stage2"):
            assert 0.0 <= v[key] <= 1.0
        assert v["forgetting"] == pytest.approx(v["acc_A_after_stage1"] - v["acc_A_after_stage2"])
    lora = report["variants"][1]
    assert lora["finetune_stage1"].startswith("lora") and lora["mix_stage1"] == "random-words:0.5"
    assert lora["finetune_stage2"] == "full" and lora["mix_stage2"] == "none"
    assert "| full |" in (out / "report.md").read_text()
    assert "D_A after s2" in res.stdout  # the table is printed


def test_outputs_and_logs(run):
    out, _, _ = run
    s1 = out / "lora" / "stage1"
    lines = [json.loads(l) for l in open(s1 / "train_log.jsonl")]
    steps = [l for l in lines if "loss" in l]
    # 40 examples + 20 mixing = 60 per epoch, batch 10: 6 steps x 3 epochs, none dropped; the loss logged
    # every 10 steps (log_every) and at each epoch end
    assert [l["step"] for l in steps] == [6, 10, 12, 18] and all(l["lr"] >= 0 for l in steps)
    # throughput of each window: positions run (padding included) >= padding-free tokens
    assert all(l["tokens_per_s"] >= l["padfree_tokens_per_s"] > 0 and 0 <= l["padding"] < 1 for l in steps)
    summary = json.load(open(s1 / "DONE.json"))["summary"]
    # the same 60 examples each epoch: 3 x the epoch's tokens, all run at least once
    assert summary["tokens"] > 0 and summary["tokens"] % 3 == 0 and summary["tokens_run"] >= summary["tokens"]
    assert 0 < summary["step_seconds"] <= summary["train_seconds"]
    assert summary["padfree_tokens_per_s"] == pytest.approx(summary["tokens"] / summary["step_seconds"], rel=1e-3)
    cfg = json.load(open(s1 / "config.json"))
    # LoRA from zero2 runs without ZeRO (zero.adapter_zero_stage); fp32 on CPU: no autocast
    assert cfg["n_mix"] == 20 and cfg["ds_config"]["zero_optimization"] == {"stage": 0}
    assert not cfg["ds_config"].get("torch_autocast", {}).get("enabled")
    assert cfg["ds_config"]["train_batch_size"] == 10  # "auto" resolved from the recipe
    adapter = load_file(str(s1 / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())  # trained, not the zero init
    assert (s1 / "merged" / "model.safetensors").exists()
    preds = [json.loads(l) for l in open(out / "full" / "stage2" / "eval" / "A.predictions.jsonl")]
    assert len(preds) == 40 and set(preds[0]) >= {"prompt", "gold", "prediction", "correct"}


def test_rerun_skips_complete_stages(run):
    out, recipe, _ = run
    done = out / "full" / "stage1" / "DONE.json"
    before = os.path.getmtime(done)
    leftover = out / "full" / "stage2" / "model.tmp-99999"   # what a save killed mid-write leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    # stage 1's logging keys change (not what it trains); stage 2 trains one epoch, with TensorBoard events
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe), "--variant", "full",
                   "stage1.log_every=3", "stage1.save_every=5", "variants.full.stage2.epochs=1",
                   "stage2.tensorboard=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getmtime(done) == before                      # stage 1 unchanged: not retrained
    assert "full/stage1: complete output found" in res.stderr
    assert "full/stage2: retraining (changed stage keys: epochs 2 -> 1)" in res.stderr
    s2 = json.load(open(out / "full" / "stage2" / "DONE.json"))
    assert s2["summary"]["epochs"] == 1                          # stage 2's config changed: retrained
    assert not leftover.exists()                                 # the retrained stage cleared it
    # the report of a --variant run keeps the other variants' finished results, in the recipe's order
    report = json.load(open(out / "report.json"))
    assert [v["name"] for v in report["variants"]] == ["full", "lora"]
    assert report["variants"][0]["epochs_stage2"] == 1
    assert report["variants"][1]["acc_A_after_stage1"] is not None
    # the TensorBoard scalars are the train_log's rows: 40 / 10 = 4 steps, the loss logged at the epoch end
    log_rows = [json.loads(l) for l in open(out / "full" / "stage2" / "train_log.jsonl")]
    tb = read_tensorboard(out / "full" / "stage2" / "tensorboard")
    losses = [(r["step"], r["loss"]) for r in log_rows if "loss" in r]
    assert [s for s, _ in tb["train/loss"]] == [s for s, _ in losses] == [4]
    assert tb["train/loss"][0][1] == pytest.approx(losses[0][1], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "train/padfree_tokens_per_s", "train/padding"} <= set(tb)
    epoch_row = next(r for r in log_rows if "teacher_forced_accuracy" in r)
    for key, acc in epoch_row["teacher_forced_accuracy"].items():  # A (forgetting) and B, after the epoch
        assert tb[f"teacher_forced_accuracy/{key}"] == [(4, pytest.approx(acc))]
    assert set(epoch_row["teacher_forced_accuracy"]) == {"A", "B"}


def test_stage2_names_what_differs_from_stage1s_config(run):
    """stage2.py with other overrides than stage 1 ran with: the message says what changed, nothing trains."""
    out, recipe, _ = run
    done = out / "lora" / "stage2" / "DONE.json"
    before = os.path.getmtime(done)
    res = run_cli([sys.executable, "launch/stage2.py", "--config", str(recipe), "--variant", "lora",
                   "variants.lora.stage1.epochs=2"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "was trained with another config (changed stage keys: epochs 3 -> 2)" in res.stderr
    assert "same recipe and overrides as stage1" in res.stderr
    assert os.path.getmtime(done) == before


def test_dry_run_says_what_would_run_and_why_without_running(run):
    """After the reruns above, full/stage2 was last trained with epochs 1 (the recipe says 2); --dry-run tells
    so, keeps the rest, and trains or writes nothing."""
    out, recipe, _ = run
    marks = {p: os.path.getmtime(p) for p in out.rglob("DONE.json")}
    res = run_cli([sys.executable, "launch/pipeline.py", "--dry-run", "--config", str(recipe)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:6]]
            for line in res.stdout.splitlines() if line.startswith("| full") or line.startswith("| lora")}
    assert rows[("full", "1")] == ["complete", "kept", "cached"]
    assert rows[("full", "2")] == ["retrain", "changed stage keys: epochs 1 -> 2", "to score: A, B"]
    assert rows[("lora", "1")][0] == rows[("lora", "2")][0] == "complete"
    assert {p: os.path.getmtime(p) for p in out.rglob("DONE.json")} == marks


def test_report_only_rewrites_the_report_from_finished_results(run):
    """--report-only: no training, no scoring; variants whose results are not current are left out."""
    out, recipe, _ = run
    (out / "report.md").unlink()
    marks = {p: os.path.getmtime(p) for p in out.rglob("*.json") if "eval" in p.parts or p.name == "DONE.json"}
    res = run_cli([sys.executable, "launch/pipeline.py", "--report-only", "--config", str(recipe)])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    # full's stage 2 was last trained with other settings (epochs 1): only lora is current
    assert [v["name"] for v in report["variants"]] == ["lora"] and (out / "report.md").exists()
    assert "left out of the report (not finished, or of another config): full" in res.stderr
    assert {p: os.path.getmtime(p) for p in marks} == marks


def test_packing_auto_records_its_measured_choice(run):
    """packing: auto (stage1 of "full") times packed against padded forwards and records the choice it trained
    with and why; packing: true packs (here with the mask-free packed attention), false pads, neither measures."""
    out, _, _ = run
    auto = json.load(open(out / "full" / "stage1" / "config.json"))
    how = auto["packing_auto"]
    if how["positions_saved"] < 0.05:   # factoids of near-equal length: nothing to pack, nothing timed
        assert auto["packing"] is False and "not measured" in how["rule"] and "packed_forward_s" not in how
    else:
        assert how["packed_forward_s"] > 0 and how["padded_forward_s"] > 0 and how["packed_kernel"] == "sdpa_groups"
        ps, pd = how["packed_forward_s"], how["padded_forward_s"]
        # the clearly faster (by more than 10%), else packing where it saves at least 20% of the positions
        assert auto["packing"] == (True if ps < 0.9 * pd else False if pd < 0.9 * ps else how["positions_saved"] >= 0.2)
        assert how["rule"].startswith("measured" if abs(ps - pd) > 0.1 * max(ps, pd) else "within 10%")
    lora = json.load(open(out / "lora" / "stage1" / "config.json"))
    assert lora["packing"] is True and "packing_auto" not in lora
    assert json.load(open(out / "full" / "stage2" / "config.json"))["packing"] is False
