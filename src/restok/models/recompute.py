"""Activation checkpointing of repeated blocks: the training switch `loop.checkpointing` (none | blocks | all).

`blocks` keeps only the input of each transformer block (tokenizer ViTs, generator) and recomputes the block in the
backward pass; `all` also does so for each ResBlock of the tokenizer's pixel CNNs, whose full-resolution activations
outweigh the ViTs' at 256 px. torch.utils.checkpoint (non-reentrant) replays the RNG state (dropout) and the autocast
state, so the loss and the gradients equal those of the plain pass (tests/unit/test_speed.py). It is a property of
a training run, not of the model: it is set on the built model and never stored in a checkpoint. Its type,
`Checkpointing`, lives in restok.models.recompute_mode (torch-free, for the params loader).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def call(module: nn.Module, *args, checkpointed: bool) -> torch.Tensor:
    """module(*args); with `checkpointed` and gradients on, its activations are recomputed in the backward pass."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
