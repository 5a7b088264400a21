"""Learning-rate schedule as a pure function of the optimiser step (docs/method.md, training-and-eval §3.3).

lr(n) = base * n / W                                            for n < W
lr(n) = end + (base - end) * 0.5 * (1 + cos(pi * (n - W) / (T - W)))   for W <= n <= T, and end after T.
The tokenizer, its discriminator (with its own step counter, starting at its first update) and the generator all use
this rule; "linear" decays in a straight line from base to end instead; "constant" keeps the same linear warm-up and
then stays at base.
Set it on the optimiser each step, nanoGPT style: `for g in opt.param_groups: g["lr"] = lr_at(step, ...)`.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    step: int, base_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine", end_lr: float = 0.0
) -> float:
    """Learning rate at optimiser step `step` (0-based: the first step gets 0 when warmup_steps > 0)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed; use one of {SCHEDULES}")
    if warmup_steps < 0 or max_steps <= warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps < max_steps, got warmup_steps={warmup_steps}, max_steps={max_steps}")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if schedule == "linear":
        return base_lr + (end_lr - base_lr) * progress
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
