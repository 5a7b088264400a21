"""Transformer half of the ResTok tokenizer: structure, encoder ViT with residual merging, decoder ViT.

docs/method.md, tokenizer §2.4–2.10 (encoder) and §4 (decoder); restok facts 1–6.
The first section holds model-free structure functions (per-stage groups, residual pooling init, merge
operator, decoder latent maps, legacy head map; the level grids and the merge schedule, which TokenizerConfig
derives, live in restok.models.tokenizer_config). They take plain sizes, so the test vectors of the paper's L
size are checked without building the L model. The modules below use them once at construction and cache every
mask and RoPE table as a buffer.

Encoder sequence: [image groups, coarsest first | latent levels]; a query attends a key iff
group(query) >= group(key). Decoder sequence: [latent tokens | image queries], full attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from restok.models.attention import attention
from restok.models.masks import group_causal_mask
from restok.models.recompute import call
from restok.models.rope import apply_rope, decoder_rope_ids, encoder_rope_ids, rope_table
from restok.models.tokenizer_config import Grid, TokenizerConfig


# ---------------------------------------------------------------------------------------------------------
# Model-free structure
# ---------------------------------------------------------------------------------------------------------


def block_stages(depth: int, merge_blocks: Sequence[int]) -> list[int]:
    """Stage (mask / RoPE layout) each block's attention uses: merges strictly before it."""
    return [sum(m < i for m in merge_blocks) for i in range(depth)]


def stage_image_grids(grid: Grid, num_stages: int) -> list[list[Grid]]:
    """Image grids at each stage, coarsest first: every merge prepends a grid of half the width."""
    h, w = grid
    return [[(h, w >> i) for i in reversed(range(s + 1))] for s in range(num_stages)]


def encoder_group_sizes(image_grids: Sequence[Grid], latent_levels: Sequence[int]) -> list[int]:
    """Attention groups in sequence order: image groups (coarsest first), then the latent levels."""
    return [h * w for h, w in image_grids] + list(latent_levels)


def residual_pool_init(feat_map: torch.Tensor, pool_grids: Sequence[Grid], residual: bool = True) -> torch.Tensor:
    """Latent init (B, L, D) from feat_map (B, D, H, W): per level, pool the residual over the level's grid, emit
    the cells row-major, subtract their nearest upsampling (residual=False pools feat_map itself each time)."""
    size = feat_map.shape[-2:]
    rest, levels = feat_map, []
    for grid in pool_grids:
        pooled = F.adaptive_avg_pool2d(rest, grid)  # (B, D, h, w): exact cell means
        levels.append(rearrange(pooled, "b d h w -> b (h w) d"))
        if residual:
            rest = rest - F.interpolate(pooled, size=size, mode="nearest")
    return torch.cat(levels, dim=1)


def latent_maps(tokens: torch.Tensor, pool_grids: Sequence[Grid], grid: Grid, residual: bool) -> torch.Tensor:
    """Inverse of the pooling: tokens (B, L, D) -> (B, D, H, W), each level's cells nearest-upsampled and summed
    (averaged over levels when residual is False). The decoder's `latent_maps` image queries (§4.3)."""
    sizes = [h * w for h, w in pool_grids]
    maps = [
        F.interpolate(rearrange(t, "b (h w) d -> b d h w", h=h, w=w), size=grid, mode="nearest")
        for t, (h, w) in zip(tokens.split(sizes, dim=1), pool_grids)
    ]
    total = torch.stack(maps).sum(0)
    return total if residual else total / len(maps)


def merge_tokens(x: torch.Tensor, n: int, op: str, residual: bool) -> torch.Tensor:
    """Residual merge of the first n tokens of x (B, T, D) (§2.7): new = old[0::2] ("subsample", official) or
    the mean of each pair ("avgpool", the paper's wording); old <- old - repeat(new, 2) if residual; new is
    prepended, so the result is (B, T + n/2, D). Pairs are neighbours in a row, so the grid width halves."""
    pairs = x[:, :n].unflatten(1, (n // 2, 2))  # (B, n/2, 2, D)
    new = pairs[:, :, 0] if op == "subsample" else pairs.mean(dim=2)
    old = (pairs - new[:, :, None]).flatten(1, 2) if residual else x[:, :n]
    return torch.cat([new, old, x[:, n:]], dim=1)


def legacy_head_index_map(num_tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (token, channel) of Y (L, D) feeding channel c of code position j under the legacy reshape
    (Y viewed as D x L without transpose, §2.10): two (D, L) long tensors."""
    flat = torch.arange(width * num_tokens).view(width, num_tokens)  # index of Y_flat[L * c + j]
    return flat // width, flat % width


# ---------------------------------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with q/v biases (no k bias), LayerNorm qk-norm, 2D RoPE after the norm, SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.q_norm = nn.LayerNorm(width // heads)
        self.k_norm = nn.LayerNorm(width // heads)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = rearrange(F.linear(x, self.qkv.weight, bias), "b t (n h d) -> n b h t d", n=3, h=self.heads)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)  # (B, h, T, d); LN may return fp32 under autocast
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        out = attention(q, k, v, mask)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class MergeTokens(nn.Module):
    """The residual merge of a merging encoder block, between its attention and its MLP (§2.6-2.7): `merge_tokens`
    of the first n tokens (the coarsest image group so far)."""

    def __init__(self, n: int, op: str, residual: bool):
        super().__init__()
        self.n, self.op, self.residual = n, op, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_tokens(x, self.n, self.op, self.residual)  # (B, T + n/2, D)


class Block(nn.Module):
    """Pre-norm block with layer scale (init 1 in the official model); `merge` (MergeTokens in the encoder's merging
    blocks, else Identity) runs between attention and MLP. One module call per block, so that activation
    checkpointing and regional compilation take whole blocks."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: int = 4, layer_scale_init: float = 1.0, merge: nn.Module | None = None
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.gamma1 = nn.Parameter(torch.full((width,), layer_scale_init))
        self.merge = merge if merge is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.gamma2 = nn.Parameter(torch.full((width,), layer_scale_init))

    def forward(self, x, cos, sin, mask=None):
        x = self.merge(x + self.gamma1 * self.attn(self.norm1(x), cos, sin, mask))
        return x + self.gamma2 * self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------
# Pieces selected by the ablation switches
# ---------------------------------------------------------------------------------------------------------


class PerLevelLinear(nn.Module):
    """One Linear per latent level, applied to that level's slice of (B, L, in)."""

    def __init__(self, level_sizes: Sequence[int], in_dim: int, out_dim: int):
        super().__init__()
        self.level_sizes = list(level_sizes)
        self.linears = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in self.level_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(part) for lin, part in zip(self.linears, x.split(self.level_sizes, dim=1))], dim=1)


class LegacyReshape(nn.Module):
    """TiTok's legacy head input: (B, L, D) memory read as (B, D, L) without a transpose, returned as (B, L, D)
    rows, so code j mixes channels w = j (mod L) of all latent tokens (§2.10). Needed for official weights."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], y.shape[2], y.shape[1]).transpose(1, 2)


class PooledLatents(nn.Module):
    """Latent init by (residual) multi-level pooling of the projected feature map (§2.4)."""

    def __init__(self, pool_grids: Sequence[Grid], residual: bool):
        super().__init__()
        self.pool_grids, self.residual = list(pool_grids), residual

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return residual_pool_init(fmap, self.pool_grids, self.residual)


class LearnedTokens(nn.Module):
    """n learned vectors (init randn / sqrt(D)) broadcast over the batch: (B, n, D). With shared=True one vector
    is repeated n times (the decoder's image and feature queries); otherwise the n rows are distinct."""

    def __init__(self, n: int, width: int, shared: bool = False):
        super().__init__()
        self.n = n
        self.tokens = nn.Parameter(torch.randn(1 if shared else n, width) * width**-0.5)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return self.tokens.to(like.dtype).expand(like.shape[0], self.n, -1)


class LatentMapQueries(nn.Module):
    """Image queries built from the embedded latent tokens (official `learnable_dec_image_tokens: false`)."""

    def __init__(self, pool_grids: Sequence[Grid], grid: Grid, residual: bool):
        super().__init__()
        self.pool_grids, self.grid, self.residual = list(pool_grids), grid, residual

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        return rearrange(latent_maps(embedded, self.pool_grids, self.grid, self.residual), "b d h w -> b (h w) d")


_CPU = torch.device("cpu")  # structure tables are built on the CPU (also under a meta-device context); .to() moves them


def _level_index(level_sizes: Sequence[int]) -> torch.Tensor:
    return torch.tensor([level for level, n in enumerate(level_sizes) for _ in range(n)], device=_CPU)


# ---------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------------------


class ResTokEncoder(nn.Module):
    """Pixel features (B, Cz, H, W) -> pre-quantisation codes (B, L, code_dim) and the coarsest image group."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        width, levels = cfg.enc_width, cfg.latent_levels
        self.merge_blocks = cfg.merge_blocks
        self.block_stage = block_stages(cfg.enc_depth, self.merge_blocks)
        self.patch_embed = nn.Conv2d(cfg.pixel_z_channels, width, 1)
        self.latent_init = (
            LearnedTokens(cfg.num_tokens, width)
            if cfg.latent_init == "learned"
            else PooledLatents(cfg.pool_grids, residual=cfg.latent_init == "residual_pool")
        )
        self.image_level_emb = nn.Parameter(torch.randn(cfg.hierarchy_stages, width) * width**-0.5)
        self.latent_level_emb = nn.Parameter(torch.randn(len(levels), width) * width**-0.5)
        self.register_buffer("level_index", _level_index(levels), persistent=False)
        self.ln_pre = nn.LayerNorm(width)
        num_image = cfg.grid[0] * cfg.grid[1]  # the k-th merge halves the coarsest group, of num_image / 2^k tokens
        self.blocks = nn.ModuleList(
            Block(
                width,
                cfg.enc_heads,
                layer_scale_init=cfg.layer_scale_init,
                merge=MergeTokens(num_image >> self.merge_blocks.index(i), cfg.merge_op, cfg.residual_image_tokens)
                if i in self.merge_blocks
                else None,
            )
            for i in range(cfg.enc_depth)
        )
        self.checkpointing = False  # restok.models.recompute; set by ResTok.set_checkpointing
        self.ln_post = nn.LayerNorm(width)
        self.reorder = LegacyReshape() if cfg.legacy_head else nn.Identity()
        self.proj = PerLevelLinear(levels, width, cfg.code_dim)
        for s, grids in enumerate(stage_image_grids(cfg.grid, cfg.hierarchy_stages)):
            mask = group_causal_mask(encoder_group_sizes(grids, levels), _CPU)
            self.register_buffer(f"mask_{s}", mask, persistent=False)
            cos, sin = rope_table(encoder_rope_ids(grids, cfg.num_tokens, _CPU), width // cfg.enc_heads, cfg.rope_theta)
            self.register_buffer(f"cos_{s}", cos, persistent=False)
            self.register_buffer(f"sin_{s}", sin, persistent=False)

    def stage(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached tables of stage s: cos, sin (T, d/2) and the mask (T, T) bool."""
        return getattr(self, f"cos_{s}"), getattr(self, f"sin_{s}"), getattr(self, f"mask_{s}")

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.patch_embed(feat)  # (B, D, H, W)
        latents = self.latent_init(fmap) + self.latent_level_emb[self.level_index]  # (B, L, D)
        image = rearrange(fmap, "b d h w -> b (h w) d") + self.image_level_emb[0]  # (B, N, D)
        x = self.ln_pre(torch.cat([image, latents], dim=1))  # (B, N + L, D)
        n, num_latent = image.shape[1], latents.shape[1]
        for i, block in enumerate(self.blocks):
            x = call(block, x, *self.stage(self.block_stage[i]), checkpointed=self.checkpointing)
            if i in self.merge_blocks:  # the merged block's new group gets its level embedding after the block
                n //= 2
                x = torch.cat([x[:, :n] + self.image_level_emb[self.merge_blocks.index(i) + 1], x[:, n:]], dim=1)
        codes = self.proj(self.reorder(self.ln_post(x[:, -num_latent:])))  # (B, L, code_dim)
        return codes, x[:, :n]


class ResTokDecoder(nn.Module):
    """Code vectors (B, L, code_dim) + keep lengths (B,) -> pixel-decoder input (B, Cz, H, W), and the feature
    branch output (B, N, D) (before ln_post) when asked for (§4.4)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        width, levels = cfg.dec_width, cfg.latent_levels
        self.grid = cfg.grid
        num_queries = cfg.grid[0] * cfg.grid[1]
        self.latent_mask_token = nn.Parameter(torch.randn(cfg.code_dim) * width**-0.5)
        self.embed = PerLevelLinear(levels, cfg.code_dim, width)
        self.latent_level_emb = nn.Parameter(torch.randn(len(levels), width) * width**-0.5)
        self.register_buffer("level_index", _level_index(levels), persistent=False)
        self.image_queries = (
            LatentMapQueries(cfg.pool_grids, cfg.grid, cfg.latent_init == "residual_pool")
            if cfg.image_queries == "latent_maps"
            else LearnedTokens(num_queries, width, shared=cfg.image_queries == "learned")
        )
        self.feature_queries = LearnedTokens(num_queries, width, shared=True) if cfg.vf_align else None
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, cfg.dec_heads, layer_scale_init=cfg.layer_scale_init) for _ in range(cfg.dec_depth)
        )
        self.checkpointing = False  # restok.models.recompute; set by ResTok.set_checkpointing
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, cfg.pixel_z_channels)
        cos, sin = rope_table(decoder_rope_ids(cfg.num_tokens, cfg.grid, _CPU), width // cfg.dec_heads, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, code_vectors: torch.Tensor, n_keep: torch.Tensor, feature_rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> image-query outputs (B, C, h, w) and, for the first `feature_rows` images, the feature queries' outputs
        (feature_rows, N, D) of VF alignment (None when 0): one pass on B + feature_rows rows, the feature rows reading
        the same latent tokens as their images'."""
        batch, num_latent = code_vectors.shape[:2]
        keep = torch.arange(num_latent, device=n_keep.device) < n_keep[:, None]  # (B, L)
        q = torch.where(keep[..., None], code_vectors, self.latent_mask_token.to(code_vectors.dtype))
        latents = self.embed(q)  # (B, L, D)
        queries = self.image_queries(latents)  # (B, N, D)
        if feature_rows:
            queries = torch.cat([queries, self.feature_queries(queries[:feature_rows])])
            latents = torch.cat([latents, latents[:feature_rows]])
        latents = latents + self.latent_level_emb[self.level_index]
        x = self.ln_pre(torch.cat([latents, queries], dim=1))  # (B + feature_rows, L + N, D)
        for block in self.blocks:
            x = call(block, x, self.cos, self.sin, checkpointed=self.checkpointing)
        out = self.head(self.ln_post(x[:batch, num_latent:]))  # (B, N, Cz)
        features = x[batch:, num_latent:] if feature_rows else None
        return rearrange(out, "b (h w) c -> b c h w", h=self.grid[0]), features
