"""Device choice and DistributedDataParallel helpers; a single process is the world-size-1 case."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); no-op when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device() -> torch.device:
    """The GPU this process owns, if any, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes checkpoints and talks to MLflow."""
    return rank() == 0


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrap ``model`` when running distributed."""
    if not dist.is_initialized():
        return model
    ids = [device().index] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_size(n: int) -> int:
    """Items per rank: every rank gets the same count, so collectives never wait on a missing batch."""
    return n // world()


def shard(order: np.ndarray) -> np.ndarray:
    """This rank's equal-sized slice of a permutation shared by all ranks."""
    size = shard_size(len(order))
    return order[rank() * size:(rank() + 1) * size]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
