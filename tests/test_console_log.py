"""What a run prints: progress before the slow first-run builds, and none of the libraries' noise."""
import logging
import sys

from conftest import run_cli

NOISE_SCRIPT = """
import logging
from remix_ds.cli import setup_logging
setup_logging()
import peft, bitsandbytes, deepspeed
logging.getLogger("absl").info("absl noise")
logging.getLogger("matplotlib.font_manager").info("matplotlib noise")
from remix_ds import dist
dist.init()
from deepspeed.accelerator import get_accelerator
get_accelerator()
logging.getLogger("remix_ds.x").info("a line the user needs")
dist.shutdown()
"""


def test_a_run_keeps_the_libraries_noise_out_of_the_log():
    res = run_cli([sys.executable, "-c", NOISE_SCRIPT], timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "a line the user needs" in text
    for noise in ("kernels-community", "could not verify publisher", "built successfully", "absl noise",
                  "matplotlib noise", "Setting accelerator to CPU"):
        assert noise not in text, (noise, text[-3000:])


def test_the_tiny_model_build_says_what_it_builds_with_progress(tmp_path, caplog):
    from remix_ds.config import TinySpec
    from remix_ds.tiny import build_tiny

    spec = TinySpec(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, pretrain_pairs=40,
                    pretrain_steps=20)
    with caplog.at_level(logging.INFO, logger="remix_ds.tiny"):
        build_tiny(spec, out_dir=tmp_path / "tiny")
    msgs = [r.getMessage() for r in caplog.records if r.name == "remix_ds.tiny"]
    assert msgs[0].startswith("building the tiny demo model once") and str(tmp_path / "tiny") in msgs[0]
    assert any("training the tokenizer" in m for m in msgs)
    progress = [m for m in msgs if m.startswith("tiny model: pretraining step ")]
    assert len(progress) >= 5 and "/20" in progress[0] and "left" in progress[0]
    assert msgs.index(progress[0]) < len(msgs) - 1 and msgs[-1].startswith("built tiny model")


def test_the_deepspeed_op_build_is_announced_before_it_starts(monkeypatch, caplog):
    from remix_ds import dist

    monkeypatch.setattr(dist, "shm_op_built", lambda: False)
    with caplog.at_level(logging.INFO, logger="remix_ds.dist"):
        dist.announce_op_build()
    assert any("compiling DeepSpeed's CPU communication op" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(dist, "shm_op_built", lambda: True)
    caplog.clear()
    dist.announce_op_build()
    assert not caplog.records
