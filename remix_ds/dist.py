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
    if "RANK" not in os.environ:
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
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


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
