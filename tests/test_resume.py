"""A stage killed with SIGKILL mid-run resumes from its newest complete checkpoint and ends with the
weights of an uninterrupted run; no step is trained twice or skipped."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import REPO, command_env, read_tensorboard, run_cli, write_recipe

RECIPE = """
name: resume
output_dir: {out}
model: tiny
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 40}}
eval: {{batch_size: 40}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 5, lr: 3.0e-3, global_batch_size: 8,
          save_every: 2, keep_checkpoints: 2}}
variants:
  - name: full
"""


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_dir):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(out=tmp_path / "unused"))
    # the uninterrupted reference
    ref = run_cli([sys.executable, "launch/stage1.py", "--config", str(recipe), f"output_dir={tmp_path / 'a'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]

    out_b = tmp_path / "b"
    stage_b = out_b / "full" / "stage1"
    env = command_env(PYTHONPATH=str(REPO))
    cmd = [sys.executable, "launch/stage1.py", "--config", str(recipe), f"output_dir={out_b}",
           "stage1.tensorboard=true"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    target = stage_b / "checkpoints" / "step12" / "COMPLETE.json"
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before its checkpoint at step 12"
    assert not (stage_b / "DONE.json").exists()
    assert not (stage_b / "model").exists()
    marker = json.load(open(target))
    assert marker["world_size"] == 1 and marker["precision"] == "fp32"   # what DeepSpeed cannot resume across
    tags = sorted(os.listdir(stage_b / "checkpoints"))
    assert "step12" in tags and len([t for t in tags if (stage_b / "checkpoints" / t / "COMPLETE.json").exists()]) <= 2

    res = run_cli(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from checkpoint" in res.stderr
    assert (stage_b / "DONE.json").exists() and not (stage_b / "checkpoints").exists()

    a = load_file(str(tmp_path / "a" / "full" / "stage1" / "model" / "model.safetensors"))
    b = load_file(str(stage_b / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    steps = [json.loads(l)["step"] for l in open(stage_b / "train_log.jsonl") if '"loss"' in l]
    # 40 / 8 = 5 steps x 5 epochs; the loss is logged every 10 steps (log_every), at each epoch end and at
    # each checkpoint (every 2 steps), each exactly once across the kill and the resume
    assert steps == [s for s in range(1, 26) if s % 10 == 0 or s % 5 == 0 or s % 2 == 0]
    # TensorBoard too: each logged step once (the events the killed run wrote after its checkpoint purged)
    tb = read_tensorboard(stage_b / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == steps
    ref_log = [json.loads(l) for l in open(tmp_path / "a" / "full" / "stage1" / "train_log.jsonl") if '"loss"' in l]
    res_log = [json.loads(l) for l in open(stage_b / "train_log.jsonl") if '"loss"' in l]
    for x, y in zip(ref_log, res_log):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["lr"] - y["lr"]) < 1e-12
    # the token counts carry across the resume: the whole stage's, not the part after the checkpoint
    ref_sum = json.load(open(tmp_path / "a" / "full" / "stage1" / "DONE.json"))["summary"]
    res_sum = json.load(open(stage_b / "DONE.json"))["summary"]
    assert res_sum["tokens"] == ref_sum["tokens"] > 0 and res_sum["tokens_run"] == ref_sum["tokens_run"]


def test_a_checkpoint_of_another_world_size_is_a_clear_error(tmp_path):
    """DeepSpeed cannot load a checkpoint written by another number of ranks, precision or ZeRO stage: the newest
    checkpoint of the config decides, the message says what to do, and a marker written before the layout was
    recorded is refused too (full fine-tuning on one process ran ZeRO-2 then, and runs without ZeRO now)."""
    import pytest

    from remix_ds.errors import ConfigError
    from remix_ds.checkpoints import latest_checkpoint

    def marker(tag, **info):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "COMPLETE.json").write_text(json.dumps(info))

    marker("step4", step=4, hash="h", world_size=1, precision="bf16", zero_stage=0)
    marker("step8", step=8, hash="h", world_size=4, precision="bf16", zero_stage=2)
    marker("step12", step=12, hash="other", world_size=2, precision="bf16")   # another config: ignored
    assert latest_checkpoint(tmp_path, "h", {"world_size": 4, "precision": "bf16", "zero_stage": 2}) == "step8"
    with pytest.raises(ConfigError, match=r"step8: this checkpoint was written with world_size 4, this run has "
                                          r"world_size 2.*resume: never"):
        latest_checkpoint(tmp_path, "h", {"world_size": 2, "precision": "bf16", "zero_stage": 2})
    with pytest.raises(ConfigError, match="precision 'bf16'"):
        latest_checkpoint(tmp_path, "h", {"world_size": 4, "precision": "fp32", "zero_stage": 2})
    with pytest.raises(ConfigError, match="zero_stage 2, this run has zero_stage 0"):
        latest_checkpoint(tmp_path, "h", {"world_size": 4, "precision": "bf16", "zero_stage": 0})
    marker("step16", step=16, hash="h", world_size=1, precision="bf16")      # an earlier release's marker
    with pytest.raises(ConfigError, match="no record of its zero_stage"):
        latest_checkpoint(tmp_path, "h", {"world_size": 1, "precision": "bf16", "zero_stage": 0})
