"""Shards of one recipe run at once into one output directory (a SLURM array, one job per shard); the report
gathered after them is the report of one sequential run."""
import json
import os
import subprocess
import sys

from conftest import REPO, TINY_AB_HEADER, command_env, run_cli, write_recipe

BODY = """eval: {{batch_size: 16, scorer: teacher-forced}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 3, lr: 2.0e-3, global_batch_size: 8, track: false}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 8, track: false}}
variants:
  - name: full
  - name: lora
    stage1: {{finetune: lora, lr: 5.0e-3, lora: {{r: 4, alpha: 8}}}}
    stage2: {{finetune: lora, lr: 5.0e-3, lora: {{r: 4, alpha: 8}}}}
"""
KEYS = ("acc_A_after_stage1", "acc_A_after_stage2", "acc_B_after_stage2", "forgetting", "epochs_stage1",
        "epochs_stage2", "stopped_by_stage1", "finetune_stage1", "mix_stage1")


def test_two_shards_at_once_into_one_output_dir_report_as_one_run(tmp_path, tiny_dir):
    recipe = write_recipe(tmp_path / "r.yaml", (TINY_AB_HEADER + BODY).format(name="shards", out=tmp_path / "sharded"))
    env = command_env(PYTHONPATH=str(REPO))
    # shard 0/2 runs full, 1/2 runs lora
    dry = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe), "--shard", "1/2", "--dry-run"])
    assert dry.returncode == 0 and "| lora | 1 |" in dry.stdout and "| full |" not in dry.stdout, dry.stdout
    shards = [subprocess.Popen([sys.executable, "launch/pipeline.py", "-c", str(recipe), "--shard", f"{i}/2"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    for p in shards:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        assert "gather the report" in out
    assert not (tmp_path / "sharded" / "report.json").exists()   # no shard writes the shared report
    gathered = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe), "--report-only"])
    assert gathered.returncode == 0, gathered.stderr[-3000:]
    sequential = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe), f"output_dir={tmp_path / 'seq'}"],
                         timeout=900)
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    rows = {}
    for run in ("sharded", "seq"):
        report = json.load(open(tmp_path / run / "report.json"))
        rows[run] = [{k: r.get(k) for k in KEYS} for r in report["variants"]]
    assert [r["finetune_stage1"] for r in rows["seq"]] == ["full", "lora(r=4)"]
    assert rows["sharded"] == rows["seq"]
    bad = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe), "--shard", "2/2", "--dry-run"])
    assert bad.returncode == 2 and "I must be in 0..N-1" in bad.stderr


def test_one_process_init_takes_another_port_when_its_free_port_was_taken():
    """Concurrent one-process runs each pick a free port and bind it a moment later: one that lost its port to
    another process picks another instead of failing (EADDRINUSE)."""
    code = """
import socket
from remix_ds import dist
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
ports = [taken.getsockname()[1]]
real = dist._free_port
def first_taken():
    return ports.pop() if ports else real()
dist._free_port = first_taken
dist.init()
import torch.distributed as tdist
print("ok", tdist.get_world_size(), not ports)
"""
    res = run_cli([sys.executable, "-c", code], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok 1 True"), res.stdout


def test_variants_that_share_a_stage_train_it_once(tmp_path, tiny_dir):
    """The paper's stage-2 grid: one stage 1, many D_B. A variant whose stage 1 has the fingerprint of another
    variant's complete stage 1 takes that output (hard links, not a second training); its stage 2 trains."""
    body = """eval: {{batch_size: 16, scorer: teacher-forced}}
stage1: {{data: A, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 8, track: false}}
stage2: {{data: B, finetune: full, stop: fixed, epochs: 1, lr: 2.0e-3, global_batch_size: 8, track: false}}
variants:
  - name: b1
  - name: b2
    stage2: {{lr: 1.0e-3}}
"""
    recipe = write_recipe(tmp_path / "r.yaml", (TINY_AB_HEADER + body).format(name="reuse", out=tmp_path / "o"))
    dry = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe), "--dry-run"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "| b2 | 1 | reuse | the same stage as b1/stage1, trained before it |" in dry.stdout, dry.stdout
    assert "| b2 | 2 | train |" in dry.stdout
    res = run_cli([sys.executable, "launch/pipeline.py", "-c", str(recipe)], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "b2/stage1: the same stage (same fingerprint) is complete" in res.stderr
    s1 = [tmp_path / "o" / v / "stage1" for v in ("b1", "b2")]
    assert json.load(open(s1[0] / "DONE.json")) == json.load(open(s1[1] / "DONE.json"))
    weights = [next((d / "model").glob("*.safetensors")) for d in s1]
    assert os.stat(weights[0]).st_ino == os.stat(weights[1]).st_ino   # one copy on disk
    s2 = [json.load(open(tmp_path / "o" / v / "stage2" / "DONE.json"))["hash"] for v in ("b1", "b2")]
    assert s2[0] != s2[1]
    report = json.load(open(tmp_path / "o" / "report.json"))
    a1 = [r["acc_A_after_stage1"] for r in report["variants"]]
    assert a1[0] == a1[1] is not None
