"""Vector quantiser of the ResTok tokenizer (cosine VQ, straight-through).

docs/method.md, tokenizer §3. The input rows and the codebook rows are L2-normalised, the nearest code is the
argmin of the squared distance (= argmax cosine), and the output is the normalised codebook row with a
straight-through gradient. Losses: commitment = beta * mean((sg(q) - z)^2) and codebook = mean((q - sg(z))^2),
both over every element. No EMA updates, no entropy term. Everything runs in float32 with autocast
disabled, as in the official quantiser: bf16 distances would flip near-tie codes.
Returns `(quantized, indices, losses)` like vector-quantize-pytorch.

Three departures from the official quantiser, each off by default (the short CPU profiles switch them on, see
`TokenizerConfig`): for the first `bypass_steps` training forwards the output is the normalised input itself (no
quantisation, zero VQ losses), so encoder and decoder first learn a continuous code; `init_from_data` replaces the
codebook, at the first quantising training forward, by normalised encoder outputs of that batch (so every code
starts where the data is); `dead_code_steps` > 0 moves each code that no input chose for that many training
forwards onto a random encoder output of the current batch. All act in training mode only and keep every rank's
codebook identical (rank 0's choice is broadcast).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn


def _broadcast_from_rank0(t: torch.Tensor) -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.broadcast(t, 0)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over a learned codebook.

    Args:
        codebook_size: number of codes K.
        code_dim: width C of a code vector.
        commitment_cost: beta, the weight of the commitment term.
        use_l2_norm: normalise inputs and codebook rows (cosine lookup); ResTok uses True.
        init_from_data: set the codebook from the first training batch's (normalised) inputs.
        dead_code_steps: restart a code unused for this many training forwards (0: never).
        bypass_steps: training forwards that pass the normalised input through unquantised (0: none).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        commitment_cost: float = 0.25,
        use_l2_norm: bool = True,
        init_from_data: bool = False,
        dead_code_steps: int = 0,
        bypass_steps: int = 0,
    ):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.dead_code_steps, self.bypass_steps = dead_code_steps, bypass_steps
        bound = 1 / codebook_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-bound, bound))
        # training state, saved (and so resumed) only where the switch is on: official checkpoints keep their keys
        self.register_buffer("pending_data_init", torch.tensor(init_from_data), persistent=init_from_data)
        self.register_buffer(
            "unused_steps", torch.zeros(codebook_size, dtype=torch.long), persistent=dead_code_steps > 0
        )
        self.register_buffer("train_forwards", torch.zeros((), dtype=torch.long), persistent=bypass_steps > 0)
        # host copies of the two flags the forward branches on, so that a training step never reads a device
        # tensor (a host sync on a GPU); refreshed from the buffers whenever a state dict is loaded
        self._pending_init, self._forwards = init_from_data, 0
        self.register_load_state_dict_post_hook(lambda module, _: module._read_flags())

    def _read_flags(self) -> None:
        self._pending_init, self._forwards = bool(self.pending_data_init), int(self.train_forwards)

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
        bypass = self.training and self._forwards < self.bypass_steps
        if self.training and self.bypass_steps > 0:
            self.train_forwards.add_(1)
            self._forwards += 1
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.training and not bypass and self._pending_init:
                self.codebook.data.copy_(self._data_rows(z))
                _broadcast_from_rank0(self.codebook.data)
                self.pending_data_init.fill_(False)
                self._pending_init = False
            indices = self.distances(z).argmin(dim=-1)  # (B, L)
            if self.training and not bypass and self.dead_code_steps > 0:
                self._restart_dead_codes(indices, z)
            z = self._normalise(z.float())
            q = self.lookup(indices)  # (B, L, C)
            losses = {
                "commitment": self.commitment_cost * (q.detach() - z).pow(2).mean(),
                "codebook": (q - z.detach()).pow(2).mean(),
            }
            if bypass:  # the losses stay in the graph (every parameter gets a gradient, as DDP expects), at 0
                return z, indices, {name: 0.0 * value for name, value in losses.items()}
            z_q = z + (q - z).detach()  # straight-through
        return z_q, indices, losses

    @torch.no_grad()
    def _data_rows(self, z: torch.Tensor) -> torch.Tensor:
        """K distinct random rows (K, C) of the normalised inputs z (B, L, C) (repeated only when there are fewer
        rows than codes)."""
        rows = self._normalise(z.detach().float().flatten(0, -2))
        k = len(self.codebook)
        pick = (
            torch.randperm(len(rows), device=rows.device)[:k]
            if len(rows) >= k
            else torch.randint(len(rows), (k,), device=rows.device)
        )
        return rows[pick]

    @torch.no_grad()
    def _restart_dead_codes(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Count the forwards since each code was last chosen (on any rank) and move those past dead_code_steps
        onto random inputs of this batch; by mask, so that the step never waits for the device to say how many
        died. Rank 0 chooses for every rank."""
        used = torch.bincount(indices.flatten(), minlength=len(self.codebook)) > 0
        if torch_dist.is_available() and torch_dist.is_initialized():
            used = used.long()
            torch_dist.all_reduce(used, op=torch_dist.ReduceOp.MAX)
            used = used > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        dead = self.unused_steps >= self.dead_code_steps  # (K,)
        self.codebook.data.copy_(torch.where(dead[:, None], self._data_rows(z), self.codebook.data))
        _broadcast_from_rank0(self.codebook.data)
        self.unused_steps.masked_fill_(dead, 0)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., C) float32 for indices (...): the (normalised) codebook rows."""
        return self._normalise(self.codebook.float()[indices])
