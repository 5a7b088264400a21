"""Process-group setup for single-process and torchrun runs (nanoGPT/DiT style).

Single process:   python -m restok.stages.train_tokenizer
Multi process:    torchrun --standalone --nproc_per_node=8 -m restok.stages.train_tokenizer
CPU, 2 processes: torchrun --standalone --nproc_per_node=2 -m restok.stages.train_tokenizer   (gloo)

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process on one device.
With `torchrun --max-restarts=N`, export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: in torch 2.14.1 the restarted ranks
otherwise reuse the agent's TCPStore and read the previous attempt's addresses, which ends in "Gloo connectFullMesh
failed ... Connection refused" or a hang (pytorch/pytorch#135712, NCCL too; docs/tooling.md, ecosystem §6).
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one and pick this process's device.

    Args:
        device: "auto" (CUDA if available, else CPU), "cuda" or "cpu". nccl is used on CUDA, gloo on CPU.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r} is not allowed; use 'auto', 'cuda' or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False; use device 'cpu' or 'auto'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # env:// rendezvous from the variables torchrun exports (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    if world_size > 1:  # every rank says where it runs: a multi-node job's log shows that each node took part
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(
            f"restok: rank {rank} of {world_size} (local rank {local_rank}) on {node}, device {dev}, "
            f"{torch.get_num_threads()} CPU threads",
            flush=True,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a training step runs under bf16 autocast: always for "bf16", never for "fp32"; "auto" on CUDA and on
    a CPU with native bf16 dot products (AVX512-BF16 or AMX), where oneDNN runs the matmuls and convolutions in bf16
    (the default tokenizer: 1.26x steps/s on 2 EPYC cores, docs/experiments.md); fp32 on other CPUs, where bf16 is
    emulated."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (
        device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    )


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (a new tensor; the input is left alone). No host sync."""
    if not is_dist():
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed torch (CPU and all CUDA devices), numpy and random with seed + rank; returns that seed.

    Each rank gets its own stream (different augmentations and dropout per rank), reproducible per rank.
    """
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    return rank_seed


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
