"""The bundled paper recipes (remix_ds/recipes/paper_*.yaml): the study's grid and settings, validated offline by
a dry run on the tiny model with every dataset and mixing file pointed at local fixtures."""
import sys

import pytest

from conftest import REPO, run_cli

FIX = REPO / "tests" / "fixtures"
HUB, LOCAL = FIX / "hub", FIX / "local"
N = 4   # examples per dataset in the dry run: 8 mixing passages at ratio 2 (the Knowledge Pile fixture has 8)
# each dataset of the recipes, in the same source, from a fixture
FIXTURE_SPECS = {
    "kvr": "{source: kvr}",
    "popqa": f"{{source: popqa, path: {LOCAL}/released/popqa_yet_to_learn/yet_to_learn_knowledge.json, "
             f"format: released, shuffle: false}}",
    "triviaqa": f"{{source: triviaqa, name: {HUB}/trivia_qa, config: rc.nocontext, split: train+validation}}",
    "lama": f"{{source: lama, name: {HUB}/lama, config: trex}}",
    "webqa": f"{{source: webqa, path: {LOCAL}/released/webqa_yet_to_learn/yet_to_learn_knowledge.json, "
             f"format: released, shuffle: false}}",
    "entityqa": f"{{source: entityquestions, path: {LOCAL}/entityquestions/dataset, split: train}}",
    "gsm8k": f"{{source: gsm8k, name: {HUB}/gsm8k, config: main}}",
    "math": f"{{source: math, name: {HUB}/math}}",
    "evolcode": f"{{source: evolcode, name: {HUB}/evolcode}}",
    "apps": f"{{source: apps, name: {HUB}/apps}}",
    "ultrachat": f"{{source: ultrachat, name: {HUB}/ultrachat}}",
}
STAGE2_DB = ["lama", "webqa", "entityqa", "gsm8k", "math", "evolcode", "apps", "ultrachat"]


def _offline(tmp_path, name):
    """The recipe with its mixing files pointed at fixtures; the overrides that point model and data at local
    files (and shrink the sets)."""
    from remix_ds.config import load_recipe

    text = (REPO / "remix_ds" / "recipes" / f"{name}.yaml").read_text()
    text = text.replace("data/random_pretraining.jsonl", str(LOCAL / "random_pretraining" / "random_pretraining.jsonl"))
    text = text.replace("data/Query-of-CC/Knowledge_Pile", str(HUB / "knowledge_pile" / "train.jsonl"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    keys = list(load_recipe(str(REPO / "remix_ds" / "recipes" / f"{name}.yaml")).datasets)
    overrides = ["model=tiny", f"output_dir={tmp_path / 'out'}", "max_seq_length=512"]
    for key in keys:
        overrides.append(f"datasets.{key}={FIXTURE_SPECS[key][:-1]}, num_examples: {N}}}")
    return path, overrides


@pytest.mark.parametrize("name,d_a", [("paper_stage1", None), ("paper_stage2_kvr", "kvr"),
                                      ("paper_stage2_popqa", "popqa"), ("paper_stage2_triviaqa", "triviaqa")])
def test_paper_recipes_are_the_studys_grid_and_validate_offline(tmp_path, tiny_dir, name, d_a):
    from remix_ds.config import load_recipe

    recipe = load_recipe(str(REPO / "remix_ds" / "recipes" / f"{name}.yaml"))
    assert recipe.study and recipe.model == "meta-llama/Meta-Llama-3-8B"
    assert (recipe.seed, recipe.max_seq_length) == (0, 2048)
    rule = {"kvr": "fixed", "popqa": "loss", "triviaqa": "loss"}   # run_stage1/2.sh: the rule comes from D_A
    for v in recipe.variants:
        first = v.stages[0]
        for st in v.stages:
            assert (st.epochs, st.global_batch_size, st.stop) == (20, 32, rule[first.data]), v.name
            assert st.lr == (5e-5 if st.finetune == "full" else 2e-4)
            assert st.mix is None or st.mix.ratio == 2.0
    if d_a is None:
        cells = {(v.stages[0].data, v.stages[0].mix.source if v.stages[0].mix else None, v.stages[0].finetune)
                 for v in recipe.variants}
        assert cells == {(a, m, f) for a in ("kvr", "popqa", "triviaqa") for m in (None, "random-words", "knowledge-pile")
                         for f in ("full", "lora")}
    else:
        assert {v.stages[0].data for v in recipe.variants} == {d_a}
        cells = {(v.stages[1].data, v.stages[1].mix is not None, v.stages[1].finetune) for v in recipe.variants}
        assert cells == {(b, m, f) for b in STAGE2_DB for m in (False, True) for f in ("full", "lora")}

    path, overrides = _offline(tmp_path, name)
    res = run_cli([sys.executable, "launch/pipeline.py", "-c", str(path), "--dry-run"] + overrides, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "| variant |" not in line]
    assert len(rows) == len(recipe.variants) * recipe.num_stages
    if d_a is not None:   # each distinct stage 1 is trained once: 4 (full, remix, lora, lora-remix), the rest reused
        stage1 = [line for line in rows if line.split("|")[2].strip() == "1"]
        assert sum("| train |" in line for line in stage1) == 4
        assert sum("| reuse |" in line for line in stage1) == len(stage1) - 4
