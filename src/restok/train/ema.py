"""Exponential moving average of a model's weights (docs/method.md, training-and-eval §3.4; DiT's `update_ema`).

After every optimiser step, with k counting EMA updates (k = 1 for the first):
    decay_1 = 0 (the first update copies the weights), decay_k = min(max_decay, k / (9 + k)) for k >= 2,
    shadow <- shadow - (1 - decay_k) * (shadow - param).
Frozen parameters and buffers (BatchNorm statistics, ...) are copied, not averaged. Evaluation, previews, code
extraction and the final artifacts use `ema.model`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from restok.train.dist import unwrap


def ema_decay(k: int, max_decay: float) -> float:
    """Decay used at the k-th EMA update (k >= 1)."""
    if k < 1:
        raise ValueError(f"EMA update index k={k} must be >= 1")
    return 0.0 if k == 1 else min(max_decay, k / (9.0 + k))


class EMA:
    """EMA copy of a model. `update(model)` runs on device with foreach kernels: no host syncs.

    Args:
        model: the model being trained (may be wrapped in DDP or torch.compile; the plain module is copied).
        max_decay: cap of the warm-up decay, 0.9999 in the paper (params `ema_decay`).
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"ema_decay={max_decay} must be in [0, 1)")
        self.max_decay = max_decay
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        weight = 1.0 - ema_decay(self.num_updates, self.max_decay)  # Python float: no device->host transfer
        src = dict(unwrap(model).named_parameters())
        averaged, targets, copied, sources = [], [], [], []
        for name, shadow in self.model.named_parameters():
            param = src[name]
            if param.requires_grad and shadow.is_floating_point():
                averaged.append(shadow)
                targets.append(param.detach())
            else:
                copied.append(shadow)
                sources.append(param.detach())
        src_buffers = dict(unwrap(model).named_buffers())
        for name, buf in self.model.named_buffers():
            copied.append(buf)
            sources.append(src_buffers[name])
        if averaged:
            torch._foreach_lerp_(averaged, targets, weight)  # shadow += weight * (param - shadow)
        if copied:
            torch._foreach_copy_(copied, sources)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "max_decay": self.max_decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.max_decay = float(state["max_decay"])
