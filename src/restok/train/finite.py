"""Training stops at the first non-finite loss or gradient norm, before anything of it is logged or saved.

    guard = FiniteGuard("train_generator", ["loss", "grad_norm"], device)
    ... each step:  guard.record(step, torch.stack([loss.detach(), grad_norm]))    # on the device, no host sync
    ... where the loop logs or saves:  guard.check(step, params if saving else ())  # one host read, raises

`record` keeps the values of the first step with a non-finite value on the device (torch.where, no host sync), so
the loop pays nothing per step; `check` reads them where the loop syncs anyway (the logging interval, where the
losses are reduced, and before every checkpoint or export, where it also checks the weights about to be saved) and
raises NonFiniteLoss naming the step and every part. The checkpoints written before stay as they were and none holds
a non-finite weight. Collective under torchrun: every rank calls `check` at the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as torch_dist

from restok.train.dist import is_dist


class NonFiniteLoss(FloatingPointError):
    """A loss, gradient norm or weight became NaN or infinite during training."""


def grad_norm(params: Iterable[torch.Tensor], clip: float, foreach: bool | None = None) -> torch.Tensor:
    """The global gradient norm of `params` (a device tensor), clipping the gradients to `clip` when it is > 0."""
    params = [q for q in params if q.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach)
    return torch.nn.utils.get_total_norm([q.grad for q in params], foreach=foreach)


class FiniteGuard:
    """The values of the first training step with a non-finite one, kept on `device` until `check` reads them.

    Args:
        stage: the stage's name, for the message.
        names: what each recorded value is (e.g. the loss parts, then "grad_norm").
        device: where the values live.
    """

    def __init__(self, stage: str, names: Sequence[str], device: torch.device):
        self.stage, self.names = stage, list(names)
        self.first = torch.full((1 + len(self.names),), math.nan, dtype=torch.float64, device=device)
        self.first[0] = -1  # the step of the first non-finite values; -1 while there is none

    def record(self, step: int, values: torch.Tensor) -> None:
        """Note the values (1D, in `names` order) of `step` (the number of finished steps); no host sync."""
        row = torch.cat([values.new_full((1,), step, dtype=torch.float64), values.detach().to(torch.float64)])
        bad = ~torch.isfinite(row[1:]).all()
        self.first = torch.where(bad & (self.first[0] < 0), row, self.first)

    def check(self, step: int, params: Iterable[torch.Tensor] = ()) -> None:
        """Raise NonFiniteLoss if a recorded value, or one of `params` (the weights about to be saved), is not finite.
        One host read (and one all_gather under torchrun)."""
        flags = [torch.isfinite(q).all() for q in params]
        weights_bad = (
            ~torch.stack(flags).all() if flags else torch.zeros((), dtype=torch.bool, device=self.first.device)
        )
        mine = torch.cat([self.first, weights_bad.to(torch.float64).view(1)])
        rows = [mine]
        if is_dist():
            rows = [torch.empty_like(mine) for _ in range(torch_dist.get_world_size())]
            torch_dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu()  # (ranks, 1 + len(names) + 1)
        bad = table[table[:, 0] >= 0]
        if len(bad):
            row = bad[bad[:, 0].argmin()].tolist()
            parts = ", ".join(f"{name} {value:.4g}" for name, value in zip(self.names, row[1:-1]))
            raise NonFiniteLoss(
                f"{self.stage}: non-finite loss at step {int(row[0])} ({parts}); training stopped "
                f"before logging or saving it: the checkpoints written before are unchanged. Lower "
                f"the learning rate (optim.lr, optim.warmup_steps) or check the data"
            )
        if table[:, -1].any():
            raise NonFiniteLoss(
                f"{self.stage}: non-finite weights at step {step}, before saving them; training "
                f"stopped: the checkpoints written before are unchanged"
            )
