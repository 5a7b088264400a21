"""Scaled dot-product attention for every model here: `F.scaled_dot_product_attention`, except that on CPU a
reduced-precision call (bf16 autocast) is computed in fp32. The CPU flash kernel's bf16 path is several times slower
than its fp32 one at our shapes, forward + backward (`python benchmarks/cpu_attention.py` prints the ratio), and
fp32 there is also the more exact of the two. CUDA keeps the fused bf16 kernels.

The group-causal masks (restok.models.masks) go to SDPA as boolean masks: on CUDA the fused memory-efficient
kernel takes them (flash attention takes no mask); the unfused `_math` fallback would show in `sdpa_kernels`, which
the benchmarks record for every measured path. FlexAttention with a block mask was weighed and not adopted: at
ResTok-L's four encoder stages (384 to 608 tokens) 69 % to 78 % of the 128 x 128 tiles of the mask hold an allowed
pair, so skipping the empty ones saves a quarter of the attention at most, and attention is about T / 6d (a tenth
at T = 608, d = 1024) of an encoder block's FLOPs; torch 2.14 also has no FlexAttention backward on CPU, so its
training path could not be checked here."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """(B, H, Tq, d) x (B, H, Tk, d) -> (B, H, Tq, d) in the dtype the inputs come in (under autocast: the autocast
    dtype). `mask`: boolean, True = may attend, broadcastable to (B, H, Tq, Tk)."""
    cpu = q.device.type == "cpu"
    low = torch.is_autocast_enabled("cpu") or q.dtype != torch.float32
    if not (cpu and low):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p)
    return out.to(dtype)


def sdpa_kernels(fn: Callable[[], object]) -> list[str]:
    """The aten attention kernels that fn() dispatches, forward and backward, sorted (torch.profiler), e.g.
    ['aten::_scaled_dot_product_efficient_attention', 'aten::_scaled_dot_product_efficient_attention_backward'] on
    CUDA. A masked attention that falls back to the unfused path shows 'aten::_scaled_dot_product_attention_math'."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::_") and "attention" in e.name})
