"""Process-group set-up from the torchrun environment, and small collective helpers.

The environment decides: under torchrun with ``WORLD_SIZE > 1`` a process group is created (nccl on CUDA,
gloo on CPU), one process per device (``LOCAL_RANK``); otherwise a single process runs on CUDA when present,
else on the CPU. Works for multi-node torchrun (``RANK``/``LOCAL_RANK`` differ there).
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=120)  # BARM's: long enough for a data pass on rank 0


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(name, local_rank=0, world_size=1):
    """``--device``: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N" (one process only: under
    torchrun each process takes the GPU of its ``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if name == "cuda":
        return torch.device(f"cuda:{local_rank % count}")
    if world_size > 1:
        raise UserError(f"--device {name}: under torchrun every process uses the GPU of its local rank; pass"
                        f" --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
    if int(name[5:]) >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device(name)


def setup(device_name="auto"):
    """Initialise from the environment; returns a :class:`DistInfo`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world_size)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local_world > torch.cuda.device_count():
        raise UserError(f"{local_world} processes on this node but {torch.cuda.device_count()} visible GPU(s): use"
                        f" --nproc_per_node {torch.cuda.device_count()} or fewer (one process per GPU)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag, device):
    """True on every rank iff ``flag`` (a bool or bool tensor) is true on every rank."""
    value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_objects(obj):
    """List of ``obj`` from every rank (just ``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def main_first(function, dist_info):
    """``function()`` on rank 0, then on the other ranks (e.g. rank 0 fills a cache the others read). A
    :class:`UserError` on rank 0 is raised on every rank, so that no rank waits for the others forever."""
    result, error = None, None
    if dist_info.is_main:
        try:
            result = function()
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result if dist_info.is_main else function()


def broadcast_object(obj, src=0):
    """``obj`` of rank ``src`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
