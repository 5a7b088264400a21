"""HAR generator: a class-conditional LlamaGen GPT that predicts a ResTok code sequence level by level.

docs/method.md, generator §1-2 and §6, restok fact 9 and §4 #7. The codes t_0..t_{T-1} come in level order. HAR
predicts the first A = `ar_token_num` codes one at a time, then every remaining level (A, 2A, ..., T/2 codes) in
one block whose inputs are the previous level's codes followed by learnable special query tokens. Attention is
block-causal over the sampling blocks and bidirectional inside a block; position p always predicts t_p; RoPE is
1D on the sequence index. For T = 128, A = 4 the blocks are {0} {1} {2} {3} {4-7} {8-15} {16-31} {32-63} {64-127}:

    position  0 | 1  | 2  | 3  | 4   5  6  7  | 8 .. 11  12 .. 15 | ...
    input     c | t0 | t1 | t2 | t3  S0 S1 S2 | t4 .. t7 S3 .. S6  | ...

`mode="ar"` is the paper's plain next-token baseline on the same codes: input [c, t_0..t_{T-2}], causal mask,
one block per position. The layout, the mask and the RoPE tables are built once at construction as buffers.
Inference with a KV cache lives in `restok.sampling`; it calls `forward_cached` once per block.
Parameter names differ from the official ones; `restok.convert.official` maps them 1:1.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from restok.models.generator_config import GeneratorConfig
from restok.models.attention import attention
from restok.models.masks import group_causal_mask
from restok.models.recompute import call
from restok.models.recompute_mode import Checkpointing
from restok.models.rope import apply_rope

CLASS, TOKEN, SPECIAL = 0, 1, 2  # what an input position holds
LOSS_CHUNK = 32  # positions per chunk of the training loss (chunked_cross_entropy)


# LlamaGen GPT sizes (layers / heads / width); the rest of the config comes from overrides.
GENERATOR_PRESETS: dict[str, dict] = {
    "har-smoke": dict(dim=64, n_layer=2, n_head=4),
    "har-tiny": dict(dim=192, n_layer=4, n_head=4),
    "har-B": dict(dim=768, n_layer=12, n_head=12),
    "har-L": dict(dim=1024, n_layer=24, n_head=16),
    "har-XL": dict(dim=1280, n_layer=36, n_head=20),
}


def generator_config(name: str, **overrides) -> GeneratorConfig:
    """Preset by registry name, e.g. generator_config("har-L") (326.264M params at 128 tokens, 1000 classes)."""
    if name not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {name!r}; choose one of {', '.join(GENERATOR_PRESETS)}")
    return replace(GeneratorConfig(), **{**GENERATOR_PRESETS[name], **overrides})


def input_layout(cfg: GeneratorConfig) -> tuple[list[int], list[int], list[int]]:
    """What each input position holds: (kind, token index or -1, special index or -1), each of length T.

    HAR (docs/method.md, generator §2.2): position 0 = class; positions 1..A hold t_0..t_{A-1}; a block starting at k >= A
    holds, for k = A, t_{A-1} then S_0..S_{A-2}; for k > A, t_{k/2}..t_{k-1} then S_{k/2-1}..S_{k-2}
    (special at position p is S_{p-k-1}). AR: position p >= 1 holds t_{p-1}.
    """
    T, A = cfg.num_tokens, cfg.ar_token_num
    kind, token, special = [CLASS] + [TOKEN] * (T - 1), [-1] + list(range(T - 1)), [-1] * T
    if cfg.mode == "ar":
        return kind, token, special
    k = A
    while k < T:
        n_real = 1 if k == A else k // 2
        for p in range(k + n_real, 2 * k):
            kind[p], token[p], special[p] = SPECIAL, -1, p - k - 1
        for p in range(k, k + n_real):
            token[p] = p - 1 if k == A else p - k // 2
        k *= 2
    return kind, token, special


def rope_1d(num_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (num_pos, head_dim/2) float32 for angles p * base^(-2i/head_dim), computed in float64."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.arange(num_pos, dtype=torch.float64)[:, None] * freqs  # (P, hd/2)
    return angles.cos().float(), angles.sin().float()


def _cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float().flatten(0, 1), targets.flatten(), reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of the fp32 logits h @ weight.T, h (B, T, D), against targets (B, T), `chunk` positions at a
    time, each under activation checkpointing: only one chunk's (B, chunk, V) logits exist at a time, in the forward
    and in the backward pass, never the whole (B, T, V) fp32 tensor (128 MiB at batch 32, 128 tokens, 8192 codes)."""
    total = sum(
        checkpoint(_cross_entropy_sum, h_part, weight, t_part, use_reentrant=False)
        for h_part, t_part in zip(h.split(chunk, dim=1), targets.split(chunk, dim=1))
    )
    return total / targets.numel()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times a learnable weight (LlamaGen)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w_down(SiLU(w_gate x) * w_up x), no biases, dropout on the output."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


class Attention(nn.Module):
    """Multi-head self-attention with 1D RoPE and a boolean mask; optionally writes into a static KV cache."""

    def __init__(self, dim: int, n_head: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.n_head = n_head
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # output rows: q, k, v (official wqkv layout)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, n, D = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, n, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write this pass's keys/values at their positions, attend over the whole cache
            k_cache, v_cache = kv  # (B, H, cache_len, hd)
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        p = self.attn_dropout if self.training else 0.0
        out = attention(q, k, v, mask, dropout_p=p)  # (B, H, n, hd)
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, n, D)))


class Block(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_head, cfg.attn_dropout, cfg.resid_dropout)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden_dim, cfg.ffn_dropout)

    def forward(self, x, cos, sin, mask, kv=None, pos=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, kv, pos)
        return h + self.ffn(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding table; in training each label becomes the null row with probability `dropout_prob`."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:  # important: this is what trains the CFG null class
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.table(labels)  # (B, D)


class HARGenerator(nn.Module):
    """LlamaGen-style decoder over ResTok codes, HAR (default) or plain AR.

    Args:
        cfg: the model config; `cfg.mode` picks the HAR layout or the plain AR baseline.
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        T = cfg.num_tokens
        self.cls_emb = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.special_emb = nn.Embedding(cfg.num_special, cfg.dim) if cfg.num_special else None
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.checkpointing = False  # restok.models.recompute; set by set_checkpointing
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

        kind, token, special = input_layout(cfg)
        self.register_buffer("slot_kind", torch.tensor(kind), persistent=False)  # (T,)
        self.register_buffer("slot_token", torch.tensor(token).clamp(min=0), persistent=False)  # (T,)
        self.register_buffer("slot_special", torch.tensor(special).clamp(min=0), persistent=False)  # (T,)
        self.register_buffer("positions", torch.arange(T), persistent=False)  # (T,)
        # built on CPU (its size check reads a value), then moved to the default device (e.g. meta for counting)
        mask = group_causal_mask(cfg.block_sizes, torch.device("cpu")).to(self.positions.device)  # (T, T) bool
        self.register_buffer("attn_mask", mask, persistent=False)
        self.register_buffer("cache_mask", F.pad(mask, (0, cfg.cache_len - T)), persistent=False)  # (T, cache_len)
        cos, sin = rope_1d(T, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear and Embedding weights N(0, init_std), norms 1; the output head starts at zero (LlamaGen)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.head.weight)

    def set_checkpointing(self, mode: Checkpointing) -> None:
        """Activation checkpointing of each block in training ("blocks"), or "none". Values and gradients do not
        change (dropout masks are replayed). The params refuse "all" here: it names the tokenizer's pixel CNN."""
        self.checkpointing = mode != "none"

    def embed(self, codes: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, n, D) of positions pos (n,) built from codes (B, T) and labels (B,).

        Only codes that the layout places at `pos` are read, so at inference the not-yet-sampled codes may hold
        anything.
        """
        kind = self.slot_kind[pos][:, None]  # (n, 1)
        tok = self.tok_emb(codes[:, self.slot_token[pos]])  # (B, n, D)
        x = torch.where(kind == TOKEN, tok, self.cls_emb(labels)[:, None])  # (B, n, D)
        if self.special_emb is not None:
            x = torch.where(kind == SPECIAL, self.special_emb(self.slot_special[pos]), x)
        return x

    def _trunk(self, x, cos, sin, mask, kv=None, pos=None) -> torch.Tensor:
        """The blocks and the final norm: (B, n, D), before the output head."""
        for i, block in enumerate(self.blocks):
            x = call(block, x, cos, sin, mask, None if kv is None else kv[i], pos, checkpointed=self.checkpointing)
        return self.norm(x)

    def forward(
        self, codes: torch.Tensor, labels: torch.Tensor, with_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Teacher-forced pass. codes (B, T) long, labels (B,) long -> logits (B, T, V) fp32, mean CE loss.

        Position p is scored against codes[:, p] (both modes). with_logits=False (the training step) returns
        (None, loss), the loss computed by chunked_cross_entropy without keeping the logits.
        """
        x = self.tok_drop(self.embed(codes, labels, self.positions))  # (B, T, D)
        h = self._trunk(x, self.rope_cos, self.rope_sin, self.attn_mask)  # (B, T, D)
        if not with_logits:
            return None, chunked_cross_entropy(h, self.head.weight, codes, LOSS_CHUNK)
        logits = self.head(h).float()  # (B, T, V)
        return logits, F.cross_entropy(logits.flatten(0, 1), codes.flatten())

    def forward_cached(
        self, codes: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """One inference pass over positions pos (n,) long; writes their keys/values into kv (one (k, v) pair of
        (B, H, cache_len, hd) per layer) and returns their logits (B, n, V) fp32. Shapes depend only on n."""
        x = self.embed(codes, labels, pos)  # (B, n, D)
        h = self._trunk(x, self.rope_cos[pos], self.rope_sin[pos], self.cache_mask[pos], kv, pos)
        return self.head(h).float()  # (B, n, V)
