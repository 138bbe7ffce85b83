"""Bad input fails before training, with one message naming the file, line or key."""
import sys

import pytest

from conftest import run_cli, write_recipe
from remix_ds.config import DEMO_RECIPE, load_recipe, recipe_from_dict
from remix_ds.errors import ConfigError, DataError

BASE = """
name: t
output_dir: {out}
model: tiny
datasets:
  A: {{source: kvr, num_examples: 10}}
  B: {{source: kvrB, num_examples: 10}}
stage1: {{data: A, finetune: full, epochs: 1, global_batch_size: 10}}
stage2: {{data: B, finetune: lora, epochs: 1, global_batch_size: 10}}
variants:
  - name: v
"""


def base_dict(tmp_path):
    import yaml
    return yaml.safe_load(BASE.format(out=tmp_path / "run"))


def test_demo_recipe_is_valid():
    r = load_recipe(DEMO_RECIPE)
    assert r.num_stages == 2 and len(r.variants) == 4
    modes = {(v.stages[0].finetune, v.stages[0].mix is not None) for v in r.variants}
    assert modes == {("full", False), ("full", True), ("lora", False), ("lora", True)}


def test_variant_overrides_merge_into_stage_defaults(tmp_path):
    d = base_dict(tmp_path)
    d["variants"] = [{"name": "x", "stage1": {"lr": 0.5, "lora": {"r": 8}}}]
    r = recipe_from_dict(d)
    s1 = r.variants[0].stages[0]
    assert s1.lr == 0.5 and s1.lora.r == 8 and s1.lora.alpha == 128 and s1.finetune == "full"


def test_cli_overrides(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
    r = load_recipe(str(p), ["stage1.epochs=7", "ds_config=zero3", "variants.0.stage2.lr=0.01"])
    assert r.variants[0].stages[0].epochs == 7 and r.ds_config == "zero3"
    assert r.variants[0].stages[1].lr == 0.01


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(bogus=1), "unknown key 'bogus'"),
    (lambda d: d["stage1"].update(learning_rate=1), "stage1: unknown key 'learning_rate'"),
    (lambda d: d["stage1"].update(lora={"rank": 4}), "stage1.lora: unknown key 'rank'"),
    (lambda d: d["variants"][0].update(stage3={}), "unknown key 'stage3'"),
    (lambda d: d["stage1"].update(finetune="adapter"), "finetune must be one of"),
    (lambda d: d["stage1"].update(data="C"), "data 'C' is not a dataset"),
    (lambda d: d["stage1"].update(mix={"ratio": -0.5}), "mix.ratio must be >= 0"),
    (lambda d: d["stage1"].update(epochs="many"), "stage1.epochs: expected an integer"),
    (lambda d: d.pop("stage1"), "stage1 is missing"),
])
def test_bad_recipes_name_the_key(tmp_path, mutate, needle):
    d = base_dict(tmp_path)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(d, where="r.yaml")
    assert needle in str(e.value)


def test_bad_override_and_yaml(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(str(p), ["stage1.epochs"])
    bad = write_recipe(tmp_path / "bad.yaml", "name: t\nstage1: {data: A\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_recipe(str(bad))


def test_local_dataset_errors_name_file_and_line(tmp_path):
    from remix_ds.config import DatasetSpec
    from remix_ds.data.sources import load_examples

    f = tmp_path / "facts.jsonl"
    f.write_text('{"prompt": "a?", "answer": "1"}\n{"prompt": "b?", "answer": \n')
    with pytest.raises(DataError, match=r"facts.jsonl:2: malformed JSON line"):
        load_examples(DatasetSpec(source="json", path=str(f)), 0)
    f.write_text('{"prompt": "a?", "answer": "1"}\n{"prompt": "b?"}\n')
    with pytest.raises(DataError, match=r"facts.jsonl: row 2: missing required field 'answer'"):
        load_examples(DatasetSpec(source="json", path=str(f)), 0)
    with pytest.raises(DataError, match="dataset file not found"):
        load_examples(DatasetSpec(source="json", path=str(tmp_path / "nope.jsonl")), 0)
    f.write_text('{"prompt": "The value of key a is?", "answer": "1"}\n'
                 '{"prompt": "The value of key a is?", "answer": "2"}\n')
    with pytest.raises(DataError, match="row 2: duplicate KVR key"):
        load_examples(DatasetSpec(source="kvr", path=str(f)), 0)


@pytest.mark.parametrize("override,needle", [
    ("bogus_key=1", "unknown key 'bogus_key'"),
    ("ds_config=zero9", "unknown ZeRO config"),
    ("datasets.A.source=json", "needs a path"),
    ("datasets.A={source: json, path: MISSING.jsonl}", "dataset file not found"),
    ("stage1.micro_batch_size=3", "not a multiple"),
    ("datasets.B.source=nosuch", "unknown source 'nosuch'"),
])
def test_cli_refuses_bad_input_before_training(tmp_path, override, needle):
    out = tmp_path / "run"
    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=out))
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(p), override], timeout=300)
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not any(out.rglob("DONE.json")) and not (out / "report.json").exists()


def test_sweep_expands_lora_rank_into_variants(tmp_path):
    d = base_dict(tmp_path)
    d["variants"] = [{"name": "full"},
                     {"name": "lora", "stage1": {"finetune": "lora"}, "sweep": {"stage1.lora.r": [8, 64]}}]
    r = recipe_from_dict(d)
    assert [v.name for v in r.variants] == ["full", "lora-r8", "lora-r64"]
    assert [v.stages[0].lora.r for v in r.variants] == [64, 8, 64]
    assert all(v.stages[0].finetune == "lora" for v in r.variants[1:])
    # comma-joined keys take one value together: the rank of both stages' adapters
    d["variants"] = [{"name": "lora", "stage1": {"finetune": "lora"}, "stage2": {"finetune": "lora"},
                      "sweep": {"stage1.lora.r,stage2.lora.r": [8, 16]}}]
    r = recipe_from_dict(d)
    assert [(v.name, v.stages[0].lora.r, v.stages[1].lora.r) for v in r.variants] == \
        [("lora-r8", 8, 8), ("lora-r16", 16, 16)]
    for bad in ({"lr": [1]}, {"stage1.lr,lr": [1]}):
        d["variants"] = [{"name": "x", "sweep": bad}]
        with pytest.raises(ConfigError, match="must be a stage key"):
            recipe_from_dict(d)


def test_fingerprint_ignores_logging_keys_only(tmp_path):
    """Logging and checkpoint keys neither retrain a complete stage nor block a resume; training keys do,
    in this stage and in every later one."""
    from remix_ds.config import stage_hash
    from remix_ds.stages import OPERATIONAL_KEYS, Stage

    def hashes(overrides):
        p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
        r = load_recipe(str(p), overrides)
        return [stage_hash(Stage(r, r.variants[0], k).fingerprint) for k in (1, 2)]

    ref = hashes([])
    logging_only = ["stage1.log_every=3", "stage1.save_every=4", "stage1.keep_checkpoints=5",
                    "stage1.resume=never", "stage1.tensorboard=true", "stage1.packing=false",
                    "stage1.checkpoint_minutes=5", "stage1.report_to=[tensorboard]"]
    assert len(logging_only) == len(OPERATIONAL_KEYS)
    assert hashes(logging_only) == ref
    lr = hashes(["stage1.lr=0.001"])
    assert lr[0] != ref[0] and lr[1] != ref[1]                 # stage 2 builds on the changed stage 1
    epochs = hashes(["stage2.epochs=7"])
    assert epochs[0] == ref[0] and epochs[1] != ref[1]         # stage 1 is untouched by a stage-2 key


def test_packing_is_true_false_or_auto_and_auto_may_pack(tmp_path):
    from remix_ds.batching import packs

    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
    assert load_recipe(str(p)).variants[0].stages[0].packing == "auto"
    assert load_recipe(str(p), ["stage1.packing=false"]).variants[0].stages[0].packing is False
    with pytest.raises(ConfigError, match="packing must be true, false or auto, got 'yes please'"):
        load_recipe(str(p), ["stage1.packing=yes please"])
    # auto may pack (on any device: the stage then measures which is faster, remix_ds.attention.choose_packing)
    assert packs("auto") and packs(True) and not packs(False)


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    from remix_ds.stage import train_stage
    from remix_ds.stages import Stage

    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
    r = load_recipe(str(p), ["stage1.tensorboard=true"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    with pytest.raises(ConfigError, match="report_to: tensorboard needs the tensorboard package"):
        train_stage(Stage(r, r.variants[0], 1))
    assert not (tmp_path / "run").exists()                     # refused before anything was written


def test_batch_plan_messages_name_what_was_chosen():
    from remix_ds.batching import batch_plan

    assert batch_plan(2, 32, None) == (16, 1) and batch_plan(2, 32, 4) == (4, 4)
    with pytest.raises(ConfigError, match="global_batch_size 4 is not a multiple of the world size 8"):
        batch_plan(8, 4, None)
    with pytest.raises(ConfigError, match="global_batch_size 32 is not a multiple of the world size 3"):
        batch_plan(3, 32, None)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size 5 x world size 2"):
        batch_plan(2, 32, 5)


def test_command_line_stage_override_wins_over_a_variants_own_value():
    """The demo's lora variants set their own stage-1 lr; stage1.lr=... on the command line still applies to
    them (it used to be silently ignored there). Variants are addressed by index or by name."""
    r = load_recipe(DEMO_RECIPE, ["stage1.lr=1e-4"])
    assert {v.name: v.stages[0].lr for v in r.variants} == {n: 1e-4 for n in ("full", "full-mix", "lora", "lora-mix")}
    base = load_recipe(DEMO_RECIPE)
    assert {v.stages[0].lr for v in base.variants} != {1e-4}          # the override did change something
    r = load_recipe(DEMO_RECIPE, ["variants.lora.stage2.epochs=9"])
    assert [v.stages[1].epochs == 9 for v in r.variants] == [v.name == "lora" for v in r.variants]
    with pytest.raises(ConfigError, match="'qlora' is neither an index .* nor the name of one of its entries "
                                          r"\(full, full-mix, lora, lora-mix\)"):
        load_recipe(DEMO_RECIPE, ["variants.qlora.stage2.epochs=9"])


def test_model_paths_that_are_not_models_are_refused_with_what_to_do(tmp_path, monkeypatch):
    import json as _json

    from remix_ds.pipeline import check_model_dir

    stage = tmp_path / "runs" / "x" / "full" / "stage1"
    stage.mkdir(parents=True)
    (stage / "config.json").write_text(_json.dumps({"variant": "full", "stage": 1, "base_model": "tiny"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(_json.dumps({"model_type": "llama"}))
    check_model_dir(str(model), "model")                                  # a model: fine
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="Meta-Llama-3-8B'.*not in the local hub cache"):
        check_model_dir("meta-llama/Meta-Llama-3-8B", "model")            # a hub id: cached, or reachable now
    check_model_dir(str(adapter), "--model", adapter_ok=True)            # eval takes adapters
    for path, needle in [(stage, "is a remix_ds stage directory: give the model in it"),
                         (adapter, "is a PEFT adapter, not a model"),
                         (tmp_path, "not a Hugging Face model directory"),
                         ("runs/nothere/model", "directory not found"),
                         (str(tmp_path / "missing"), "directory not found")]:
        with pytest.raises(ConfigError, match=needle):
            check_model_dir(str(path), "model")


def test_fingerprint_follows_the_data_not_only_its_path(tmp_path):
    """Rewriting a data file at the same path (e.g. filter_unknown rerun into the same --out) changes the
    stage's fingerprint and every later stage's: the pipeline retrains instead of reporting stale results."""
    import json as _json

    from remix_ds.config import stage_hash
    from remix_ds.stages import Stage

    f = tmp_path / "facts.jsonl"

    def hashes(answer):
        f.write_text("".join(_json.dumps({"prompt": f"q{i}", "answer": answer if i == 3 else f"a{i}"}) + "\n"
                             for i in range(10)))
        p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
        r = load_recipe(str(p), [f"datasets.A={{source: json, path: {f}}}"])
        return [stage_hash(Stage(r, r.variants[0], k).fingerprint) for k in (1, 2)]

    ref = hashes("a3")
    assert hashes("a3") == ref                     # the same contents: the same stages
    changed = hashes("another answer")
    assert changed[0] != ref[0] and changed[1] != ref[1]


def test_variant_patterns_select_a_whole_sweep(tmp_path):
    from remix_ds.cli import split_variants

    d = base_dict(tmp_path)
    d["variants"] = [{"name": "full"}, {"name": "lora", "sweep": {"stage1.lora.r": [8, 16]}}]
    r = recipe_from_dict(d)
    assert split_variants(["lora-r*"], r) == ["lora-r8", "lora-r16"]
    assert split_variants(["full,lora-r1?", "full"], r) == ["full", "lora-r16"]
    with pytest.raises(ConfigError, match="'qlora-\\*' matches no variant; known: full, lora-r8, lora-r16"):
        split_variants(["qlora-*"], r)


def test_bundled_tiny_remix_recipe_is_valid_and_holds_its_controls():
    """docs/tiny_remix.md's recipe: each mixed setting beside a no-mix control, and the matched-stage-1 pairs."""
    import os

    r = load_recipe(os.path.join(os.path.dirname(DEMO_RECIPE), "tiny_remix.yaml"))
    by = {v.name: v for v in r.variants}
    assert len(by) == 10 and all(v.stages[1].lr == 2e-4 for v in r.variants)
    assert by["full"].stages[0].mix is None and by["mix1-r1"].stages[0].mix.ratio == 1.0
    for name in ("full-s1fixed53", "mix1-r1-s1fixed53"):
        assert (by[name].stages[0].stop, by[name].stages[0].epochs) == ("fixed", 53)
    assert by["mix12-r1"].stages[1].mix is not None and by["mix1-r1"].stages[1].mix is None


def test_dry_run_plan_checks_a_checkpoint_as_the_run_would(tmp_path):
    """--dry-run's plan applies the run's own checkpoint layout check (stage.checkpoint_layout): a checkpoint of
    this config written by another number of ranks shows as one the run would refuse, one written as this run
    would write it as a resume."""
    import json

    from remix_ds.config import stage_hash
    from remix_ds.pipeline import plan
    from remix_ds.stages import Stage

    p = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run"))
    r = load_recipe(str(p))
    v = r.variants[0]
    layout = Stage(r, v, 1).checkpoint_layout(1)
    assert layout["world_size"] == 1 and layout["zero_stage"] in (0, 1, 2, 3)
    ckpt = Stage(r, v, 1).dir / "checkpoints" / "step4"
    ckpt.mkdir(parents=True)
    marker = {"step": 4, "hash": stage_hash(Stage(r, v, 1).fingerprint), **layout}
    (ckpt / "COMPLETE.json").write_text(json.dumps(marker))
    row = plan(r, [v], [1])[0]
    assert (row["action"], row["why"]) == ("resume", "from checkpoint step4")
    (ckpt / "COMPLETE.json").write_text(json.dumps({**marker, "world_size": 4}))
    row = plan(r, [v], [1])[0]
    assert row["action"] == "resume" and "written with world_size 4" in row["why"], row


@pytest.mark.parametrize("where, key, value, guess", [
    ("stage1", "epoch", 3, "'epochs'"),
    ("stage1", "learning_rate", 1e-3, "'lr'"),
    ("stage1", "rank", 8, "'lora.r'"),
    ("lora", "rank", 8, "'r'"),
    ("top", "global_batch_size", 16, "'stage1.global_batch_size'"),
    ("top", "seeds", 1, "'seed'"),
])
def test_unknown_recipe_keys_get_a_did_you_mean(tmp_path, where, key, value, guess):
    d = base_dict(tmp_path)
    if where == "top":
        d[key] = value
    elif where == "lora":
        d["stage1"]["lora"] = {key: value}
    else:
        d[where][key] = value
    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(did you mean {guess}"):
        recipe_from_dict(d)


def test_a_flow_style_sweep_key_with_a_comma_gets_a_hint_to_quote_it(tmp_path):
    text = BASE.format(out=tmp_path / "run").replace(
        "  - name: v\n", "  - name: v\n    sweep: {stage1.lora.r,stage2.lora.r: [8, 16]}\n")
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert "quote" in str(e.value) and '"stage1.lora.r,stage2.lora.r"' in str(e.value)
    quoted = text.replace("{stage1.lora.r,stage2.lora.r:", '{"stage1.lora.r,stage2.lora.r":')
    r = load_recipe(write_recipe(tmp_path / "q.yaml", quoted))
    assert [v.name for v in r.variants] == ["v-r8", "v-r16"]


@pytest.mark.parametrize("below", [False, True])
def test_an_output_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path, below):
    f = tmp_path / "runfile"
    f.write_text("not a directory")
    out = f / "sub" if below else f
    recipe = write_recipe(tmp_path / "r.yaml", BASE.format(out=out))
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe)], timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "output_dir" in res.stderr and "is a file" in res.stderr and "Traceback" not in res.stderr


def test_an_empty_data_file_is_named_before_any_model_loads(tmp_path):
    empty = tmp_path / "facts.jsonl"
    empty.write_text("")
    text = BASE.format(out=tmp_path / "run").replace("A: {source: kvr, num_examples: 10}",
                                                     f"A: {{source: json, path: {empty}, num_examples: 10}}")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe), "--dry-run"], timeout=300)
    assert res.returncode == 2 and f"{empty}: the file is empty" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("name, content, where", [
    ("bad.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": }\n', "bad.jsonl:2: .* column 27"),
    ("end.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n', "end.jsonl:2: .* column 27"),
    ("trail.json", '[{"prompt": "a", "answer": "b"},\n {"prompt": "c", "answer": "d"},\n]\n',
     "trail.json:2: .*trailing comma.* line 2 column 32"),
    ("lines.json", '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n', "rename it to lines.jsonl"),
])
def test_malformed_json_names_the_real_line_and_column(tmp_path, name, content, where):
    from remix_ds.data.io import read_records

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=where):
        read_records(str(path))


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unreachable_hub_model_fails_with_one_message_and_exit_2(tmp_path, dry_run):
    """No network here (as on an offline cluster node): a hub id not in the cache is one clear error, quickly."""
    import time

    recipe = write_recipe(tmp_path / "r.yaml", BASE.format(out=tmp_path / "run").replace(
        "model: tiny", "model: remix-ds-tests/no-such-model"))
    t0 = time.time()
    res = run_cli([sys.executable, "launch/pipeline.py", "--config", str(recipe)] + (["--dry-run"] if dry_run else []),
                  timeout=300, env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "model 'remix-ds-tests/no-such-model'" in res.stderr and "Traceback" not in res.stderr
    assert "hub is unreachable" in res.stderr and time.time() - t0 < 120
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.safetensors"))


def test_a_cached_hub_model_passes_the_check_offline(tmp_path, monkeypatch):
    from remix_ds.data.hub import check_hub_model

    snap = tmp_path / "hf" / "hub" / "models--org--m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hf" / "hub" / "models--org--m" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--org--m" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    check_hub_model("org/m")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        check_hub_model("org/other")


# StageSpec's keys in the release of 2026-12-02 (a record of its schema, written out here)
STAGE_KEYS_2026_12_02 = {"data", "finetune", "lora", "mix", "stop", "epochs", "lr", "weight_decay", "betas", "warmup_ratio",
                         "grad_clip", "global_batch_size", "micro_batch_size", "ds_config", "merge", "loss_threshold",
                         "loss_patience", "log_every", "save_dtype", "gradient_checkpointing", "adapt_zero", "packing",
                         "save_every", "keep_checkpoints", "checkpoint_minutes", "resume", "track", "probe",
                         "tensorboard", "report_to"}


def _fingerprint_before_stable_keys(recipe, variant, k):
    """The stage fingerprint as the release of 2026-12-02 computed it (dataclasses.asdict of every spec)."""
    import dataclasses

    from remix_ds.data import stage_train_set
    from remix_ds.zero import load_ds_config
    from remix_ds.stages import OPERATIONAL_KEYS, examples_digest

    spec = variant.stages[k - 1]
    stage = {key: v for key, v in dataclasses.asdict(spec).items()
             if key not in OPERATIONAL_KEYS and key in STAGE_KEYS_2026_12_02}
    stage["packing"] = True
    fp = {"stage": stage, "examples": examples_digest(stage_train_set(recipe, spec, k)[1]),
          "data": dataclasses.asdict(recipe.datasets[spec.data]), "seed": recipe.seed, "precision": recipe.precision,
          "max_seq_length": recipe.max_seq_length, "ds_config": load_ds_config(spec.ds_config or recipe.ds_config)}
    if k == 1:
        fp["model"] = recipe.model
        if recipe.model == "tiny":
            fp["tiny"] = dataclasses.asdict(recipe.tiny)
    else:
        fp["previous"] = _fingerprint_before_stable_keys(recipe, variant, k - 1)
    return fp


def test_a_stage_key_added_at_its_default_keeps_every_finished_stage(tmp_path, tiny_dir):
    """Stable fingerprints: today's recipes hash as the previous release did, and a stage or dataset key added
    to the schema changes the hash only of a stage that sets it away from its default."""
    import dataclasses

    from remix_ds.config import DEMO_RECIPE, StageSpec, stage_hash
    from remix_ds.stages import Stage

    demo = load_recipe(str(DEMO_RECIPE), [f"output_dir={tmp_path / 'demo'}"])
    for v in demo.variants:
        for k in (1, 2):
            assert stage_hash(Stage(demo, v, k).fingerprint) == stage_hash(_fingerprint_before_stable_keys(demo, v, k))

    @dataclasses.dataclass
    class StageSpecNext(StageSpec):   # a later release's schema, with one more training key
        new_regularizer: str = "none"
        new_weight: float = 0.0

    def with_new(spec, **kw):
        return StageSpecNext(**{**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}, **kw})

    v = demo.variants[0]
    before = [stage_hash(Stage(demo, v, k).fingerprint) for k in (1, 2)]
    v.stages = [with_new(s) for s in v.stages]
    assert [stage_hash(Stage(demo, v, k).fingerprint) for k in (1, 2)] == before
    v.stages[1] = with_new(v.stages[1], new_regularizer="kl", new_weight=0.1)
    after = [stage_hash(Stage(demo, v, k).fingerprint) for k in (1, 2)]
    assert after[0] == before[0] and after[1] != before[1]
