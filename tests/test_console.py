"""The `remix-ds` command (python -m remix_ds): subcommands, help, version, and merge's inputs and outputs."""
import ast
import json
import os
import re
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from test_adapters import make_adapter

COMMANDS = ["train", "stage", "eval", "merge", "analyze", "filter-unknown", "bench", "report"]


def test_setup_installs_the_remix_ds_console_command():
    tree = ast.parse((REPO / "setup.py").read_text())
    scripts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
    assert scripts == ["remix-ds = remix_ds.console:main"]
    from remix_ds.console import main
    assert callable(main)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help_with_an_example_and_outputs_and_a_version(command):
    res = run_cli([sys.executable, "-m", "remix_ds", command, "--help"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"usage: remix-ds {command}" in res.stdout
    assert "example:" in res.stdout and f"remix-ds {command}" in res.stdout.split("example:")[1]
    assert "outputs:" in res.stdout
    ver = run_cli([sys.executable, "-m", "remix_ds", command, "--version"], timeout=300)
    assert ver.returncode == 0 and re.match(r"remix-ds \d+\.\d+", ver.stdout), ver.stdout + ver.stderr


@pytest.mark.parametrize("command", ["train", "stage", "eval", "analyze", "filter-unknown", "report"])
def test_every_recipe_subcommand_takes_dash_c(tmp_path, command):
    missing = str(tmp_path / "nothere.yaml")
    extra = {"stage": ["1"], "eval": ["--model", str(tmp_path), "--dataset", "A"],
             "filter-unknown": ["--dataset", "A", "--out", str(tmp_path / "o")]}.get(command, [])
    args = [sys.executable, "-m", "remix_ds", command] + extra[:1 if command == "stage" else 0] + \
        ["-c", missing] + extra[1 if command == "stage" else 0:]
    res = run_cli(args, timeout=300)
    assert res.returncode == 2 and f"recipe file not found: {missing}" in res.stderr, res.stderr[-2000:]


def test_top_level_help_version_and_unknown_command():
    res = run_cli([sys.executable, "-m", "remix_ds", "--help"], timeout=120)
    assert res.returncode == 0 and all(c in res.stdout for c in COMMANDS)
    assert run_cli([sys.executable, "-m", "remix_ds", "--version"], timeout=120).stdout.startswith("remix-ds ")
    bad = run_cli([sys.executable, "-m", "remix_ds", "trian"], timeout=120)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr


def _peft_merged(base, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for i, ad in enumerate(adapters):
        model = PeftModel.from_pretrained(model, ad).merge_and_unload()
    return model.state_dict()


def _assert_weights(out_dir, reference):
    ours = load_file(str(out_dir / "model.safetensors"))
    for key, w in ours.items():
        torch.testing.assert_close(w, reference[key], atol=1e-6, rtol=0, msg=key)


def test_merge_without_a_base_uses_the_adapters_record_and_writes_normal_permissions(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "ad", seed=21)
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["base_model_name_or_path"] == tiny_dir
    out = tmp_path / "m"
    old = os.umask(0o022)
    try:
        res = run_cli([sys.executable, "-m", "remix_ds", "merge", adapter, str(out)], timeout=600)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_weights(out, _peft_merged(tiny_dir, [adapter]))
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))


def test_merge_refuses_to_overwrite_without_force(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "ad", seed=22)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli([sys.executable, "-m", "remix_ds", "merge", tiny_dir, adapter, str(out)], timeout=600)
    assert res.returncode == 2 and "--force" in res.stderr, res.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = run_cli([sys.executable, "-m", "remix_ds", "merge", adapter, str(afile)], timeout=600)
    assert res.returncode == 2 and "is a file, not a directory" in res.stderr and "Traceback" not in res.stderr
    res = run_cli([sys.executable, "-m", "remix_ds", "merge", tiny_dir, adapter, str(out), "--force"], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / "keep.txt").exists()
    _assert_weights(out, _peft_merged(tiny_dir, [adapter]))


def test_merge_accepts_a_stage_directory_with_its_adapter_stack(tiny_dir, tmp_path):
    """A merge: false stage directory (as the pipeline writes it: config.json, DONE.json, adapter/) merges its
    base with the earlier stages' adapters and its own, as eval --model scores it."""
    first = make_adapter(tiny_dir, tmp_path / "v" / "stage1" / "adapter", seed=23)
    stage = tmp_path / "v" / "stage2"
    make_adapter(tiny_dir, stage / "adapter", seed=24, targets=("q_proj", "o_proj"))
    spec = {"finetune": "lora", "merge": False}
    (stage / "config.json").write_text(json.dumps({"variant": "v", "stage": 2, "base_model": tiny_dir,
                                                   "frozen_adapters": [first], "spec": spec,
                                                   "precision": "fp32"}))
    (stage / "DONE.json").write_text("{}")
    res = run_cli([sys.executable, "-m", "remix_ds", "merge", str(stage), str(tmp_path / "m")], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_weights(tmp_path / "m", _peft_merged(tiny_dir, [first, str(stage / "adapter")]))


def test_readme_documents_the_remix_ds_command_and_the_first_run():
    text = (REPO / "README.md").read_text()
    from remix_ds.console import COMMANDS as known
    used = set(re.findall(r"remix-ds ([a-z][a-z-]*)", text))
    assert set(COMMANDS) <= used, set(COMMANDS) - used
    assert used <= set(known), used - set(known)
    first_screen = "\n".join(text.splitlines()[:45])
    assert "remix-ds train" in first_screen and "first run" in first_screen.lower()
    assert re.search(r"about a minute", first_screen) and "runs/demo/report.md" in first_screen
