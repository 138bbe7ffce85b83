"""The dry run's retrain reason names the recipe-wide setting that changed, not a list of possible causes."""
import dataclasses
import json

import pytest
import yaml

from remix_ds.config import recipe_from_dict
from remix_ds.stages import Stage

RECIPE = """
name: t
output_dir: {out}
model: tiny
precision: fp32
datasets:
  A: {{source: kvr, num_examples: 10}}
  B: {{source: kvrB, num_examples: 10}}
stage1: {{data: A, finetune: full, epochs: 1, global_batch_size: 10}}
stage2: {{data: B, finetune: lora, epochs: 1, global_batch_size: 10}}
variants:
  - name: v
"""


def recorded(tmp_path, k=1):
    """A stage directory whose config.json records the recipe as it was (what run_stage writes)."""
    r = recipe_from_dict(yaml.safe_load(RECIPE.format(out=tmp_path / "run")))
    v = r.variants[0]
    d = Stage(r, v, k).dir
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"variant": "v", "stage": k, "spec": dataclasses.asdict(v.stages[k - 1]),
                                               "recipe": Stage(r, v, k).settings()}, default=str))
    return yaml.safe_load(RECIPE.format(out=tmp_path / "run"))


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(precision="fp16"), "changed recipe settings: precision 'fp32' -> 'fp16'"),
    (lambda d: d.update(seed=7), "changed recipe settings: seed 1234 -> 7"),
    (lambda d: d.update(max_seq_length=64), "changed recipe settings: max_seq_length 256 -> 64"),
    (lambda d: d.update(ds_config="zero3"), "changed recipe settings: ds_config 'zero2' -> 'zero3'"),
    (lambda d: d["datasets"]["A"].update(num_examples=20),
     "changed recipe settings: datasets.A.num_examples 10 -> 20"),
    (lambda d: d.update(model="/models/other"), "changed recipe settings: model 'tiny' -> '/models/other'"),
])
def test_retrain_reason_names_the_changed_recipe_setting(tmp_path, change, expected):
    raw = recorded(tmp_path)
    change(raw)
    r = recipe_from_dict(raw)
    assert Stage(r, r.variants[0], 1).config_change().startswith(expected)


def test_retrain_reason_names_stage_and_recipe_changes_together_and_ignores_unused_datasets(tmp_path):
    raw = recorded(tmp_path)
    raw["stage1"]["epochs"] = 2
    raw["precision"] = "bf16"
    raw["datasets"]["B"]["num_examples"] = 30     # stage 1 does not train on B
    r = recipe_from_dict(raw)
    assert Stage(r, r.variants[0], 1).config_change() == ("changed stage keys: epochs 1 -> 2; changed recipe settings: "
                                                  "precision 'fp32' -> 'bf16'")
