import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tests build the tiny model once per session, in a fresh cache (never a developer's)."""
    if not os.environ.get("REMIX_DS_TEST_KEEP_CACHE"):
        os.environ["REMIX_DS_CACHE"] = str(tmp_path_factory.mktemp("remix_cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def tiny_dir(_cache):
    from remix_ds.tiny import build_tiny
    return build_tiny()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for in-process training: on a small shared CPU, more threads spin and run many
    times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def one_process_dist():
    """torch.distributed on this test process alone, as a one-process run has it: the process group (made once,
    kept for later tests), the environment DeepSpeed's engine reads (LOCAL_RANK, ...) for the test's duration
    (``run_cli`` never passes it on), and DeepSpeed's cached groups cleared, so that a group another test tore
    down or replaced is not reused."""
    import torch.distributed as tdist
    from remix_ds import dist

    saved = {k: os.environ.pop(k, None) for k in DIST_ENV}
    if not tdist.is_initialized():
        _forget_deepspeed_group()
        dist.init()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    _forget_deepspeed_groups_cache()
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _forget_deepspeed_groups_cache():
    """DeepSpeed's module-level process groups (made lazily again when an engine needs them)."""
    try:
        import deepspeed.utils.groups as groups
    except ImportError:
        return
    for name in list(vars(groups)):
        if name.startswith("_") and name.endswith(("GROUP", "GROUP_RANKS")):
            value = getattr(groups, name)
            setattr(groups, name, {} if isinstance(value, dict) else None)


def _forget_deepspeed_group():
    """DeepSpeed keeps its own handle on a destroyed process group: the next init must make a new one."""
    try:
        import deepspeed.comm.comm as ds_comm
        ds_comm.cdb = None
    except ImportError:
        pass


def command_env(**extra) -> dict:
    """The environment for a command a test starts: this process's, without its torch.distributed variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(extra)
    return env


def run_cli(args, cwd=None, timeout=900, env=None):
    """Run a launch/ script or the deepspeed launcher; returns CompletedProcess (text). The test process's own
    torch.distributed variables (if an in-process test left any) are not passed on."""
    full_env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


# the head of a small two-dataset recipe on the tiny model (str.format: name, out; stages and variants follow)
TINY_AB_HEADER = """
name: {name}
output_dir: {out}
model: tiny
max_seq_length: 48
datasets:
  A: {{source: kvr, num_examples: 16}}
  B: {{source: kvrB, num_examples: 16}}
"""


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_tensorboard(logdir: Path):
    """The scalars of a TensorBoard log directory as {tag: [(step, value), ...]}, purged events dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
