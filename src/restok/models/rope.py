"""2D rotary position embedding (Flux style) for the ResTok encoder and decoder.

docs/method.md, tokenizer §2.9. Every token carries two integer ids (a, b). A head of d channels is cut in
halves; the first half rotates with a, the second with b. Inside a half the adjacent channels (2m, 2m+1)
form a plane rotated by the angle id * theta^(-2m / (d/2)). Angles are computed in float64 and the
tables kept in float32 (at id 12345 float32 angles would be off by 1e-4); the rotation itself runs in
float32 and is cast back to the input dtype, so it is safe under bf16 autocast.

The id layouts live here too: encoder image groups (coarsest first, each offset by the token count
before it) followed by the latent tokens on the diagonal, and the decoder's latent-then-query layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_table(ids: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ids (T, 2): two (T, head_dim // 2) float32 tensors, one entry per channel pair."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4 (two axes of channel pairs), got {head_dim}")
    quarter = head_dim // 4  # channel pairs per axis
    m = torch.arange(quarter, dtype=torch.float64, device=ids.device)
    omega = theta ** (-m / quarter)  # (d/4,) = theta^(-2m / (d/2))
    angles = torch.cat([ids[:, 0, None].double() * omega, ids[:, 1, None].double() * omega], dim=1)  # (T, d/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) with tables (T, d/2); adjacent channels form the rotation planes."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., T, d/2, 2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return out.flatten(-2).type_as(x)


def _grid_ids(h: int, w: int, offset: int, device: torch.device | None) -> torch.Tensor:
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack((rows, cols), dim=1) + offset  # (h*w, 2), row-major


def _diagonal_ids(n: int, offset: int, device: torch.device | None) -> torch.Tensor:
    return (torch.arange(n, device=device) + offset)[:, None].expand(n, 2)


def encoder_rope_ids(
    image_grids: Sequence[tuple[int, int]], num_latent: int, device: torch.device | None = None
) -> torch.Tensor:
    """Encoder ids (T, 2) long: image grids in sequence order, then the latent tokens.

    Image group g with grid h x w: token (r, c) -> (r + o_g, c + o_g), o_g = tokens before g.
    Latent token t -> (t + N, t + N), N = all image tokens.
    """
    parts, offset = [], 0
    for h, w in image_grids:
        parts.append(_grid_ids(h, w, offset, device))
        offset += h * w
    parts.append(_diagonal_ids(num_latent, offset, device))
    return torch.cat(parts)


def decoder_rope_ids(num_latent: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Decoder ids (T, 2) long: latent token t -> (t, t); image query (r, c) -> (r + L, c + L)."""
    return torch.cat([_diagonal_ids(num_latent, 0, device), _grid_ids(*grid, num_latent, device)])
