"""Sampling from the HAR (or plain AR) generator with a static KV cache, CFG schedules and top-k/top-p.

docs/method.md, generator §3-6, restok fact 10 and §4 #8, #9, #19. One forward pass per sampling block: 9 passes for
128 codes with HAR (6 for 16), T passes for plain AR. With guidance the conditional and the unconditional (null
class) rows run as one 2B batch and share the sampled codes; the combined logits are
uncond + s_k * (cond - uncond) with s_k from the schedule at ratio k / (passes - 1).
Whether the 2B batch runs is decided once, from the configured scale (> 1), for every pass; the official code
re-decides per step and crashes when a schedule returns <= 1 after the prefill.

Seeding: every sample draws its T uniforms from its own `torch.Generator` seeded with its seed, and a code is
drawn by inverting the CDF of its filtered distribution with the uniform of its position. A sample's codes thus
depend only on (seed, label), not on the batch or process it runs in (bit-exact on CPU; on GPU up to
batch-size-dependent matmul rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from restok.models.generator import HARGenerator
from restok.sampling_config import CFG_SCHEDULES, SamplingConfig

_EPS = 1e-4  # the official schedules add it to keep s > 1 so that the CFG branch runs


def cfg_schedule_scale(
    schedule: str,
    ratio: float,
    cfg_scale: float,
    *,
    window_start: float = 0.25,
    window_end: float = 1.0,
    peak: float = 0.5,
    min_cfg_scale: float = 1.0,
) -> float:
    """Guidance scale at ratio r in [0, 1] (docs/method.md, generator §4), float64 arithmetic as the official code.

    `cosine` is 1 + (s-1)(1 - cos(pi r))/2 and `cosine_re` 1 + (s-1)(1 + cos(pi r))/2; the official versions
    raise NameError (`math` is never imported in its generate.py), so these two have no official reference.
    The official `sigmoid` is not implemented there at all and is not offered here.
    """
    s = cfg_scale
    low = min_cfg_scale if min_cfg_scale != 1.0 else min_cfg_scale + _EPS  # step/rectangular outside the window
    if schedule == "constant":
        return s
    if schedule == "linear":
        return 1.0 + (s - 1.0) * ratio + _EPS
    if schedule == "linear_re":
        return 1.0 + (s - 1.0) * (1.0 - ratio) + _EPS
    if schedule == "linear_constant":
        return 1.0 + (s - 1.0) * (ratio / peak) if ratio < peak else s
    if schedule == "triangular":
        if ratio < peak:
            return 1.0 + (s - 1.0) * (ratio / peak) + _EPS
        return 1.0 + (s - 1.0) * ((1.0 - ratio) / (1.0 - peak)) + _EPS
    if schedule == "rectangular":
        return s if window_start <= ratio <= window_end else low
    if schedule == "step":
        return s if s == 1.0 or ratio >= window_start else low
    if schedule == "cosine":
        return 1.0 + (s - 1.0) * (0.5 * (1.0 - math.cos(math.pi * ratio)))
    if schedule == "cosine_re":
        return 1.0 + (s - 1.0) * (0.5 * (1.0 + math.cos(math.pi * ratio)))
    raise ValueError(f"unknown cfg schedule {schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")


def schedule_scales(sampling: SamplingConfig, num_passes: int) -> list[float]:
    """Scale of every pass k = 0..num_passes-1 at ratio k / (num_passes - 1) (docs/method.md, restok §4 #8)."""
    ratios = [k / max(num_passes - 1, 1) for k in range(num_passes)]
    return [
        cfg_schedule_scale(
            sampling.cfg_schedule,
            r,
            sampling.cfg_scale,
            window_start=sampling.window_start,
            window_end=sampling.window_end,
            peak=sampling.peak,
            min_cfg_scale=sampling.min_cfg_scale,
        )
        for r in ratios
    ]


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf what top-k and then top-p remove, along the last dim (not in place).

    Top-p keeps every token up to and including the first whose cumulative probability (sorted descending)
    exceeds top_p, and always the top-1.
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = F.pad((cum > top_p)[..., :-1], (1, 0), value=False)  # shift right: keep the first crossing
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k/top-p filtering, then softmax (docs/method.md, generator §5); zero outside the kept set."""
    return filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(-1)


def draw_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (..., V), uniforms (...) in [0, 1) -> indices (...) long; never a zero-prob index."""
    cdf = probs.double().cumsum(-1)  # (..., V)
    target = (uniforms.double() * cdf[..., -1]).unsqueeze(-1)  # (..., 1)
    return torch.searchsorted(cdf[..., :-1].contiguous(), target, right=True).squeeze(-1)


def per_sample_uniforms(seeds: Sequence[int] | torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, T) float64 uniforms, row i from a CPU torch.Generator seeded with seeds[i]."""
    rows = [torch.rand(num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def pass_rows(sampling: SamplingConfig, batch: int) -> int:
    """Rows of every pass for `batch` samples: 2 x batch with guidance (the null-class rows run alongside), else
    batch."""
    return 2 * batch if sampling.cfg_scale > 1.0 else batch


def allocate_kv_cache(model: HARGenerator, batch: int, dtype: torch.dtype, device: torch.device) -> KVCache:
    """Per layer a (k, v) pair of zeros (batch, H, cache_len, hd), marked as static addresses for torch.compile
    (a CUDA graph replays over the same buffers; outside compile the mark does nothing). `generate(kv=...)` reuses it
    for every batch of the same size, zeroing it first."""
    cfg = model.cfg
    shape = (batch, cfg.n_head, cfg.cache_len, cfg.head_dim)
    kv = [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.n_layer)
    ]
    for t in (t for pair in kv for t in pair):
        torch._dynamo.mark_static_address(t)
    return kv


def compile_sampling(model: HARGenerator) -> HARGenerator:
    """The fast sampling path (`sample.compile`), in place: `forward_cached` compiled with static shapes, one graph
    per block size (6 for 128 tokens with 4 AR tokens), which `generate` then runs unchanged. On CUDA the mode is
    "reduce-overhead": each graph replays as a CUDA graph over the static KV cache (`allocate_kv_cache`; reuse it
    across batches through `generate(kv=...)` so that the graphs are recorded once)."""
    # every compiled generator shares forward_cached's code object: room for its block sizes x batch sizes x models
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else "default"
    model.forward_cached = torch.compile(model.forward_cached, mode=mode, dynamic=False)
    return model


@torch.no_grad()
def generate(
    model: HARGenerator,
    labels: torch.Tensor,
    sampling: SamplingConfig,
    *,
    seeds: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
    kv: KVCache | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample codes (B, T) long for class labels (B,), one forward pass per sampling block.

    Args:
        model: the generator, in eval mode.
        labels: class ids (B,) long on the model's device.
        sampling: guidance schedule, temperature, top-k/top-p, greedy.
        seeds: one seed per sample (batch-split independent draws); if None, uniforms come from `generator`
            (a CPU torch.Generator, or the global RNG when None). Unused when sampling.greedy.
        cache_dtype: KV-cache dtype (default: the model's parameter dtype; bf16 under bf16 autocast).
        kv: a cache from `allocate_kv_cache` for 2B rows with CFG (B without), zeroed and reused instead of a new
            one (cache_dtype is then its dtype); the same addresses on every call, as a CUDA graph needs them.
        return_logits: also return the (CFG-combined) logits (B, T, V) fp32 each code was drawn from.
    """
    if model.training:
        raise ValueError("generate() needs model.eval() (dropout and label dropout must be off)")
    cfg, device = model.cfg, labels.device
    B, T = labels.shape[0], cfg.num_tokens
    use_cfg = sampling.cfg_scale > 1.0
    if use_cfg and cfg.null_class is None:
        raise ValueError(
            f"sample.cfg_scale={sampling.cfg_scale} needs a null class, but the generator was built "
            "with class_dropout_prob=0; set cfg_scale to 1"
        )
    rows = pass_rows(sampling, B)
    row_labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)]) if use_cfg else labels  # (rows,)
    if kv is None:
        kv = allocate_kv_cache(model, rows, cache_dtype or next(model.parameters()).dtype, device)
    elif kv[0][0].shape[0] != rows or len(kv) != cfg.n_layer:
        raise ValueError(
            f"the KV cache holds {kv[0][0].shape[0]} rows in {len(kv)} layers; this batch needs {rows} "
            f"rows in {cfg.n_layer}"
        )
    else:  # the mask hides unwritten positions, but a zero weight times a stale non-finite value is still NaN
        for t in (t for pair in kv for t in pair):
            t.zero_()
    if device.type == "cuda":  # a new sampling run: earlier CUDA-graph outputs may be overwritten (on CPU the call
        torch.compiler.cudagraph_mark_step_begin()  # would only import cudagraph_trees, 1 s inside the first batch)

    uniforms = None
    if not sampling.greedy:
        uniforms = (
            per_sample_uniforms(seeds, T)
            if seeds is not None
            else torch.rand(B, T, dtype=torch.float64, generator=generator)
        )
        uniforms = uniforms.to(device)  # (B, T)

    codes = torch.zeros(B, T, dtype=torch.long, device=device)
    logits_out = torch.empty(B, T, cfg.vocab_size, device=device) if return_logits else None
    scales = schedule_scales(sampling, len(cfg.block_sizes))
    start = 0
    for size, scale in zip(cfg.block_sizes, scales):
        pos = torch.arange(start, start + size, device=device)  # (n,)
        logits = model.forward_cached(codes.repeat(rows // B, 1), row_labels, pos, kv)  # (rows, n, V)
        if use_cfg:
            logits = combine_cfg(*logits.chunk(2), scale)  # (B, n, V)
        probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        if sampling.greedy:
            new = probs.argmax(-1)
        else:
            new = draw_from_probs(probs, uniforms[:, start : start + size])
        codes[:, start : start + size] = new  # position p predicts t_p
        if return_logits:
            logits_out[:, start : start + size] = logits
        start += size
    return (codes, logits_out) if return_logits else codes
