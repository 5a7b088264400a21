"""Scaled dot-product attention for every model here: `F.scaled_dot_product_attention`, except that on CPU a
reduced-precision call (bf16 autocast) is computed in fp32. The CPU flash kernel's bf16 path is several times slower
than its fp32 one at our shapes, forward + backward (`python benchmarks/cpu_attention.py` prints the ratio), and
fp32 there is also the more exact of the two. CUDA keeps the fused bf16 kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
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
