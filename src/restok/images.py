"""Class-balanced image generation shared by `sample` and `cfg_search` (docs/method.md, generator §3-5).

Image i (class i // per_class) draws its codes with seed `seed + i`, so a rerun and any process count give the same
images: each rank takes a contiguous run of whole global batches (`rank_share`) and rank 0 gathers them
(`gather_to_main`). Decoding is fp32, images = uint8(clamp(255 x, 0, 255)) (truncation, as the official script).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as torch_dist

from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok
from restok.sampling import KVCache, SamplingConfig, allocate_kv_cache, generate, pass_rows
from restok.train.dist import DistInfo, is_dist
from restok.train.log import progress

UNTRAINED = "untrained.npz"  # sample's output: samples of a freshly initialised generator (sample.untrained_baseline)


def rank_share(n_images: int, batch_size: int, rank: int, world_size: int) -> range:
    """Global image indices of this rank: a contiguous run of whole global batches, so that every batch holds the
    same images on any process count."""
    n_batches = -(-n_images // batch_size)
    lo, hi = n_batches * rank // world_size, n_batches * (rank + 1) // world_size
    return range(min(lo * batch_size, n_images), min(hi * batch_size, n_images))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) ~[0, 1] -> (B, H, W, 3) uint8, clamp(255 x, 0, 255) truncated."""
    return (x.float() * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def sampling_bf16(precision: str, device: torch.device) -> bool:
    """Whether the generator's passes run in bf16 (`sample.precision`): always for "bf16", never for "fp32"; "auto"
    on CUDA only, so that CPU sampling keeps fp32 and a sample's codes bit-exact on any batch split."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only, between batches


@torch.no_grad()
def sample_images(
    generator: HARGenerator,
    tokenizer: ResTok,
    sampling: SamplingConfig,
    indices: range,
    per_class: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
    desc: str = "sample",
) -> tuple[np.ndarray, dict]:
    """Images of global indices `indices` (image i: class i // per_class, seed seed + i), batch by batch.

    bf16: the generator's passes under bf16 autocast with a bf16 KV cache (decoding stays fp32). One KV cache per
    batch size is allocated and reused by every batch of that size (a compiled generator replays over it).
    Returns (uint8 (n, H, W, 3) array, {"generate_seconds", "decode_seconds"}).
    """
    out, t_gen, t_dec = [], 0.0, 0.0
    cache_dtype = torch.bfloat16 if bf16 else next(generator.parameters()).dtype
    caches: dict[int, KVCache] = {}
    with progress(len(indices), desc) as bar:
        for start in range(indices.start, indices.stop, batch_size):
            idx = torch.arange(start, min(start + batch_size, indices.stop))  # (B,) global image indices
            rows = pass_rows(sampling, len(idx))
            if rows not in caches:
                caches[rows] = allocate_kv_cache(generator, rows, cache_dtype, device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                codes = generate(
                    generator, (idx // per_class).to(device), sampling, seeds=(seed + idx).tolist(), kv=caches[rows]
                )  # (B, L)
            _sync(device)
            t1 = time.perf_counter()
            images = to_uint8(tokenizer.decode(codes))  # (B, H, W, 3)
            out.append(images.cpu().numpy())
            t2 = time.perf_counter()
            t_gen, t_dec = t_gen + t1 - t0, t_dec + t2 - t1
            bar.advance(len(idx), img_s=(bar.done + len(idx)) / max(t_gen + t_dec, 1e-9))
    res = tokenizer.cfg.resolution
    images = np.concatenate(out) if out else np.zeros((0, res, res, 3), np.uint8)
    return images, {"generate_seconds": t_gen, "decode_seconds": t_dec}


def gather_to_main(obj, info: DistInfo) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] without a process group."""
    if not is_dist():
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    torch_dist.gather_object(obj, out, dst=0)
    return out
