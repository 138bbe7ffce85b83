"""Process-group set-up and the few collectives the rest of the code needs.

Works the same under the ``deepspeed`` launcher (several processes, env set by the launcher) and as
plain ``python`` (one process: the environment is filled in and a one-rank group is created).
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, List

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU)."""
    if tdist.is_available() and tdist.is_initialized():
        return
    own_port = "RANK" not in os.environ
    if own_port:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    import deepspeed

    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not torch.cuda.is_available() and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        # several CPU processes on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    announce_op_build()
    import contextlib
    import io

    out = io.StringIO()
    for attempt in range(5):
        try:   # DeepSpeed prints "... built successfully" for its CPU op on every rank of every run
            with contextlib.redirect_stdout(out):
                deepspeed.init_distributed(dist_backend=backend, verbose=False)
            break
        except BaseException as e:
            # a one-process run picks a free port and binds it a moment later: another process (a concurrent
            # shard of the same recipe, say) can take it in between; pick another
            if own_port and attempt < 4 and "EADDRINUSE" in str(e):
                os.environ["MASTER_PORT"] = str(_free_port())
                continue
            print(out.getvalue(), end="")
            raise
    for line in out.getvalue().splitlines():
        if line.strip() and "built successfully" not in line:
            print(line)


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU shared-memory communication op (built on first use, JIT) is in the torch
    extensions cache already; True where it does not apply (CUDA, or an op DeepSpeed cannot build here)."""
    if torch.cuda.is_available():
        return True
    try:
        from deepspeed.accelerator import get_accelerator
        import deepspeed.ops

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return True
        from torch.utils.cpp_extension import _get_build_directory
        return os.path.isfile(os.path.join(_get_build_directory(builder.NAME, False), builder.NAME + ".so"))
    except Exception:
        return True


def announce_op_build() -> None:
    """Say so before DeepSpeed compiles its CPU communication op (silently, about a minute, once)."""
    if not shm_op_built() and rank() == 0:
        log.info("compiling DeepSpeed's CPU communication op (deepspeed_shm_comm) once for this machine: about "
                 "a minute; later runs reuse it from the torch extensions cache")


def shutdown() -> None:
    """Tear the process group down (NCCL warns and may hang at exit otherwise)."""
    if is_initialized():
        barrier()
        tdist.destroy_process_group()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (NCCL needs the tensor on the GPU: it is moved there and back)."""
    if is_initialized() and world_size() > 1:
        if tdist.get_backend() == "nccl" and t.device.type != "cuda":
            on_dev = t.to(device())
            tdist.all_reduce(on_dev, op=tdist.ReduceOp.SUM)
            t.copy_(on_dev.cpu())
        else:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t
