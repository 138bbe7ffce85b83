"""report_to: the train_log scalars reach TensorBoard, Weights & Biases (offline) and MLflow (a local file store),
one run per variant and stage, the same values at the same steps as train_log.jsonl."""
import glob
import json
import os
import sys

import pytest

from conftest import TINY_AB_HEADER, read_tensorboard, run_cli, write_recipe

BODY = """stage1: {{data: A, finetune: full, stop: fixed, epochs: 2, lr: 2.0e-3, global_batch_size: 8, log_every: 1,
          report_to: [tensorboard, wandb, mlflow]}}
stage2: {{data: B, finetune: full, epochs: 1, global_batch_size: 8}}
"""


def _wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its .wandb file: W&B's record log (LevelDB's log
    format: a 7-byte file header ':W&B', magic, version; 32 KiB blocks of chunks, each with a 7-byte header of
    checksum, length and type FULL/FIRST/MIDDLE/LAST) of wandb_internal_pb2.Record messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_dir, "*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:   # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_report_to_sends_the_train_log_to_every_tracker(tmp_path, tiny_dir):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", (TINY_AB_HEADER + BODY).format(name="track", out=out))
    res = run_cli([sys.executable, "launch/stage1.py", "-c", str(recipe)], timeout=600,
                  env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    d = out / "default" / "stage1"
    rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    accs = [(r["step"], r["teacher_forced_accuracy"]["A"]) for r in rows if "teacher_forced_accuracy" in r]
    assert len(losses) == 4 and len(accs) == 2

    tb = read_tensorboard(d / "tensorboard")
    assert tb["train/loss"] == [(s, pytest.approx(v)) for s, v in losses]

    from mlflow.tracking import MlflowClient
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = (d / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.run_name == "default/stage1" and run.data.params["spec.lr"] == "0.002"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert hist == [(s, pytest.approx(v)) for s, v in losses]
    acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "teacher_forced_accuracy/A"))
    assert acc == [(s, pytest.approx(v)) for s, v in accs]

    runs = glob.glob(str(d / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    logged = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert logged == [(s, pytest.approx(v)) for s, v in losses]


def test_an_unknown_or_missing_tracker_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", (TINY_AB_HEADER + BODY).format(name="track", out=out)
                          .replace("[tensorboard, wandb, mlflow]", "[tensorbord]"))
    res = run_cli([sys.executable, "launch/stage1.py", "-c", str(recipe)], timeout=300)
    assert res.returncode == 2 and "report_to: unknown tracker 'tensorbord'" in res.stderr
