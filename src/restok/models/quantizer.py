"""Vector quantiser of the ResTok tokenizer (cosine VQ, straight-through).

Spec: tokenizer.md §3. The input rows and the codebook rows are L2-normalised, the nearest code is the
argmin of the squared distance (= argmax cosine), and the output is the normalised codebook row with a
straight-through gradient. Losses: commitment = beta * mean((sg(q) - z)^2) and codebook = mean((q - sg(z))^2),
both over every element. No EMA updates, no entropy term. Everything runs in float32 with autocast
disabled, as in the official quantiser: bf16 distances would flip near-tie codes.
Returns `(quantized, indices, losses)` like vector-quantize-pytorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over a learned codebook.

    Args:
        codebook_size: number of codes K.
        code_dim: width C of a code vector.
        commitment_cost: beta, the weight of the commitment term.
        use_l2_norm: normalise inputs and codebook rows (cosine lookup); ResTok uses True.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_cost: float = 0.25, use_l2_norm: bool = True):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        bound = 1 / codebook_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-bound, bound))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.use_l2_norm else x

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances (B, L, K) between the (normalised) rows of z (B, L, C) and the codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = self._normalise(z.float())
            codes = self._normalise(self.codebook)
            return z.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * z @ codes.t()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, L, C) -> z_q (B, L, C) float32, indices (B, L) long, {"commitment", "codebook"} scalars."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            indices = self.distances(z).argmin(dim=-1)  # (B, L)
            z = self._normalise(z.float())
            q = self.lookup(indices)  # (B, L, C)
            losses = {
                "commitment": self.commitment_cost * (q.detach() - z).pow(2).mean(),
                "codebook": (q - z.detach()).pow(2).mean(),
            }
            z_q = z + (q - z).detach()  # straight-through
        return z_q, indices, losses

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., C) float32 for indices (...): the (normalised) codebook rows."""
        return self._normalise(self.codebook.float()[indices])
