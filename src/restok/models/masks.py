"""Group-causal attention masks, shared by the tokenizer encoder and the HAR generator.

A sequence is cut into consecutive groups; position q may attend to position k iff
group(q) >= group(k). Inside a group attention is bidirectional. The ResTok encoder uses it
with groups [coarsest image group, ..., finest image group, latent level 0, ..., latent level S-1]
(docs/method.md, restok fact 4); HAR uses it over its 9 sampling blocks (fact 9).
Masks are boolean `allowed[q, k]` (True = may attend), the layout SDPA takes as `attn_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_ids(group_sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Group index of every position: (sum(group_sizes),) long."""
    if any(int(s) <= 0 for s in group_sizes):
        raise ValueError(f"group sizes must be positive, got {list(group_sizes)}")
    sizes = torch.as_tensor([int(s) for s in group_sizes], dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def group_causal_mask(group_sizes: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """allowed[q, k] = group(q) >= group(k): (T, T) bool."""
    gid = group_ids(group_sizes, device)
    return gid[:, None] >= gid[None, :]
