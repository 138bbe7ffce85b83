"""Ctrl-C during a stage: a checkpoint at the next step boundary, a message that says where it stopped and what
a rerun does, exit status 130; the rerun resumes there. Progress under a stopping rule counts epochs."""
import json
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY_AB_HEADER, command_env, write_recipe

BODY = """stage1: {{data: A, finetune: full, stop: accuracy, epochs: 400, lr: 1.0e-5, global_batch_size: 4,
          track: false, log_every: 1}}
stage2: {{data: B, finetune: full, epochs: 1}}
"""


def test_ctrl_c_checkpoints_says_where_and_the_rerun_resumes(tmp_path, tiny_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", (TINY_AB_HEADER + BODY).format(name="int", out=out))
    env = command_env(PYTHONPATH=str(REPO))
    cmd = [sys.executable, "launch/stage1.py", "-c", str(recipe)]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "default" / "stage1" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:   # a few steps in, then Ctrl-C
        if log.exists() and len(log.read_text().splitlines()) >= 6:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted after step" in err and "the same command resumes the stage from there" in err, err[-2000:]
    step = int(err.split("interrupted after step ")[1].split()[0])
    marker = out / "default" / "stage1" / "checkpoints" / f"step{step}" / "COMPLETE.json"
    assert json.load(open(marker))["step"] == step
    # the log names the ZeRO stage that ran (full fine-tuning on one process: none), not only the config's name
    assert "no ZeRO" in err and "(ds_config zero2)" in err
    # progress under a stopping rule: the epoch and its bound, and the rule's state, not a bar over 400 epochs
    assert "epoch 1 (at most 400)" in err and "acc=" in err
    rerun = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    deadline = time.time() + 600
    while time.time() < deadline and rerun.poll() is None:
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        if any(r.get("step", 0) > step + 2 for r in rows):
            break
        time.sleep(0.2)
    rerun.send_signal(signal.SIGINT)
    _, err2 = rerun.communicate(timeout=300)
    assert f"resumed from checkpoint step{step} (step {step}" in err2, err2[-3000:]
    assert rerun.returncode == 130
