"""TokenizerConfig: the tokenizer's model config (params section `tokenizer`) and the pure-Python structure it
validates and derives (level pooling grids, merge schedule, nested-dropout keep lengths and probabilities).

No torch: the params loader (restok.config) imports this module, so a stage that only reads params does not
depend on the model code in restok.models.tokenizer and restok.models.vit.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, get_args

Grid = tuple[int, int]

# The switches with more than one option: Literal types, so params validation and the generated schema (enum:)
# refuse a typo such as merge_op: avgpol before any job runs.
MergeOp = Literal["subsample", "avgpool"]
LatentInit = Literal["residual_pool", "pool", "learned"]
LatentQueries = Literal["hierarchical", "flat"]
ImageQueries = Literal["learned", "latent_maps", "learned_grid"]
WeightInit = Literal["official", "fan_in"]
CodebookInit = Literal["uniform", "data"]
_CHOICES = {
    "merge_op": MergeOp,
    "latent_init": LatentInit,
    "latent_queries": LatentQueries,
    "image_queries": ImageQueries,
    "weight_init": WeightInit,
    "codebook_init": CodebookInit,
}


def pool_grid(num_tokens: int) -> Grid:
    """Pooling grid of a level of 2^k tokens: (2^floor(k/2), 2^ceil(k/2)), width doubles first (§2.4)."""
    k = num_tokens.bit_length() - 1
    if num_tokens < 1 or num_tokens != 1 << k:
        raise ValueError(f"a latent level must hold a power of 2 tokens, got {num_tokens}")
    return 1 << (k // 2), 1 << ((k + 1) // 2)


def merge_block_indices(depth: int, stages: int) -> tuple[int, ...]:
    """0-indexed encoder blocks that merge: floor(i * depth / stages) - 1 for i = 1..stages-1 (§2.7)."""
    return tuple(i * depth // stages - 1 for i in range(1, stages))


def keep_lengths(level_sizes: tuple[int, ...], min_tokens: int) -> list[int]:
    """Nested-dropout keep lengths: the level prefix lengths that are >= min_tokens (docs/method.md, tokenizer §4.1)."""
    return [n for n in accumulate(level_sizes) if n >= min_tokens]


def keep_probs(num_keep: int, drop_prob: float) -> list[float]:
    """Probabilities of the keep lengths: weights 2^0..2^(K-2), the last gets their sum * (floor(1/p) - 1).
    drop_prob 0 (or a single keep length) always keeps everything."""
    if drop_prob == 0 or num_keep == 1:
        return [0.0] * (num_keep - 1) + [1.0]
    weights = [2**i for i in range(num_keep - 1)]
    weights.append(sum(weights) * (int(1 / drop_prob) - 1))
    return [w / sum(weights) for w in weights]


@dataclass(frozen=True)
class TokenizerConfig:
    """Model-only config of the tokenizer; defaults are the paper's L size (restok_l_128, 256 px).

    Args:
        resolution: image side in pixels (square images).
        pixel_channels: pixel CNN channels per resolution stage; len - 1 = number of 2x downsamplings.
        pixel_res_blocks: ResBlocks per pixel CNN stage.
        pixel_z_channels: channels between the pixel CNNs and the ViTs.
        enc_width, enc_depth, enc_heads / dec_*: ViT sizes (head dim must be divisible by 4 for 2D RoPE).
        level_sizes: latent level sizes, coarse first, [1, 1, 2, 4, ...]: prefix lengths are powers of 2.
        hierarchy_stages: image-token scales S; S - 1 merging blocks at floor(i * enc_depth / S) - 1.
        codebook_size, code_dim, commitment_cost: the quantiser.
        min_tokens: shortest nested-dropout keep length; drop_prob: 1 - P(keep all) (0 = no nested dropout).
        vf_dim: teacher feature width (None = none); vf_align: VF projections and the decoder feature branch.
        vf_dec_fraction: share of each batch (the leading rows, at least one image) whose decoder pass also runs
            the feature queries of VF alignment (1.0 = official: every image); the rest skip that half of the
            decoder's rows.
        rope_theta: RoPE base.
        residual_image_tokens: merged-away groups keep their residual (else they stay unchanged).
        merge_op: "subsample" (official: keep even tokens) | "avgpool" (the paper's wording: mean of pairs).
        latent_init: "residual_pool" (official) | "pool" (each level pools the map itself) | "learned" queries.
        latent_queries: "hierarchical" (levels in the mask, per-level heads) | "flat" (TiTok-like: one level,
            learned queries, same token budget; nested dropout still uses level_sizes' prefix lengths).
        image_queries: decoder image queries, "learned" (official: one shared learned token) | "latent_maps"
            (upsampled latent tokens) | "learned_grid" (one learned token per image position, so the decoder can
            draw the mean image from its queries and leave the latents free for content).
        legacy_head: TiTok's untransposed reshape before the per-level projection (official checkpoints).
        weight_init: "official" (trunc-normal 0.02, docs/method.md, tokenizer §6) | "fan_in" (variance-preserving; what the
            short CPU profiles need to learn at all, see `restok.models.tokenizer._init_weights`).
        codebook_init: "uniform" (official: U(-1/K, 1/K)) | "data" (the first training batch's encoder outputs).
        dead_code_steps: restart a code no input chose for this many training steps on an encoder output of the
            current batch (0 = never, official).
        quantizer_bypass_steps: first training steps whose decoder input is the unquantised normalised encoder
            output (0 = none, official); the codebook's data init then happens at the first quantised step.
        grey_start: the pixel decoder's output conv starts at weight 0, bias 0.5 (every reconstruction mid-grey),
            so the first steps' error is not a large random pattern common to all images (False = official).
        layer_scale_init: initial layer scale of every ViT block's two branches (1.0 = official); small values
            keep the latent tokens close to their pooled image features early in training.
    """

    resolution: int = 256
    pixel_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    pixel_res_blocks: int = 2
    pixel_z_channels: int = 256
    enc_width: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_depth: int = 24
    dec_heads: int = 16
    level_sizes: tuple[int, ...] = (1, 1, 2, 4, 8, 16, 32, 64)
    hierarchy_stages: int = 4
    codebook_size: int = 8192
    code_dim: int = 8
    commitment_cost: float = 0.25
    min_tokens: int = 4
    drop_prob: float = 0.2
    vf_dim: int | None = 1024
    vf_align: bool = True
    vf_dec_fraction: float = 1.0
    rope_theta: float = 10000.0
    residual_image_tokens: bool = True
    merge_op: MergeOp = "subsample"
    latent_init: LatentInit = "residual_pool"
    latent_queries: LatentQueries = "hierarchical"
    image_queries: ImageQueries = "learned"
    legacy_head: bool = True
    weight_init: WeightInit = "official"
    codebook_init: CodebookInit = "uniform"
    dead_code_steps: int = 0
    quantizer_bypass_steps: int = 0
    grey_start: bool = False
    layer_scale_init: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "pixel_channels", tuple(self.pixel_channels))
        object.__setattr__(self, "level_sizes", tuple(self.level_sizes))
        for name, choices in _CHOICES.items():
            allowed = get_args(choices)
            if getattr(self, name) not in allowed:
                raise ValueError(f"tokenizer.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if not self.pixel_channels or any(c < 32 or c % 32 for c in self.pixel_channels):
            raise ValueError(
                f"tokenizer.pixel_channels={self.pixel_channels}: need >= 1 stage, each a positive "
                "multiple of 32 (GroupNorm with 32 groups)"
            )
        for name in (
            "pixel_res_blocks",
            "pixel_z_channels",
            "enc_depth",
            "dec_depth",
            "codebook_size",
            "code_dim",
            "hierarchy_stages",
            "min_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.{name}={getattr(self, name)} must be >= 1")
        if not self.rope_theta > 0:
            raise ValueError(f"tokenizer.rope_theta={self.rope_theta} must be > 0 (the RoPE base)")
        if not 0 < self.vf_dec_fraction <= 1:
            raise ValueError(f"tokenizer.vf_dec_fraction={self.vf_dec_fraction} must lie in (0, 1]")
        if not self.layer_scale_init > 0:
            raise ValueError(f"tokenizer.layer_scale_init={self.layer_scale_init} must be > 0")
        if self.quantizer_bypass_steps < 0:
            raise ValueError(f"tokenizer.quantizer_bypass_steps={self.quantizer_bypass_steps} must be >= 0")
        if self.dead_code_steps < 0:
            raise ValueError(f"tokenizer.dead_code_steps={self.dead_code_steps} must be >= 0 (0 = never restart)")
        if self.codebook_size < 2:
            raise ValueError(f"tokenizer.codebook_size={self.codebook_size} must be >= 2")
        factor = self.downsample
        if self.resolution < factor or self.resolution % factor:
            raise ValueError(
                f"tokenizer.resolution={self.resolution} must be a multiple of the pixel CNN factor "
                f"{factor} (= 2^(len(pixel_channels) - 1))"
            )
        for part in ("enc", "dec"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if heads < 1 or width % heads or (width // heads) % 4:
                raise ValueError(
                    f"tokenizer.{part}_width={width} / {part}_heads={heads}: the head dim must be an "
                    "integer divisible by 4 (2D RoPE rotates channel pairs on two axes)"
                )
        expected = tuple([1] + [2**i for i in range(len(self.level_sizes) - 1)])
        if self.level_sizes != expected:
            raise ValueError(f"tokenizer.level_sizes={list(self.level_sizes)}: must double, i.e. {list(expected)}")
        if self.min_tokens > self.num_tokens:
            raise ValueError(f"tokenizer.min_tokens={self.min_tokens} exceeds the {self.num_tokens} latent tokens")
        if not 0 <= self.drop_prob <= 0.5:
            raise ValueError(
                f"tokenizer.drop_prob={self.drop_prob} must lie in [0, 0.5] (P(keep all) = 1 - p needs floor(1/p) >= 2)"
            )
        if self.commitment_cost < 0:
            raise ValueError(f"tokenizer.commitment_cost={self.commitment_cost} must be >= 0")
        if self.vf_dim is not None and self.vf_dim < 1:
            raise ValueError(f"tokenizer.vf_dim={self.vf_dim} must be >= 1 or null")
        if self.vf_align and self.vf_dim is None:
            raise ValueError("tokenizer.vf_align=true needs tokenizer.vf_dim (the teacher feature width)")
        if self.hierarchy_stages > 1 and self.enc_depth < self.hierarchy_stages:
            raise ValueError(
                f"tokenizer.hierarchy_stages={self.hierarchy_stages} needs enc_depth >= it "
                f"(got {self.enc_depth}): the merging blocks would collide"
            )
        merges = self.hierarchy_stages - 1
        if self.grid[1] % 2**merges:
            raise ValueError(
                f"tokenizer.hierarchy_stages={self.hierarchy_stages}: {merges} merges halve the grid "
                f"width {self.grid[1]}, which must be divisible by {2**merges} (width never 0)"
            )
        if self.latent_queries == "flat" and self.latent_init != "learned":
            raise ValueError(
                f"tokenizer.latent_queries='flat' needs latent_init='learned' (got {self.latent_init!r}):"
                " the flat baseline has learned latent queries, no pooling"
            )
        if self.image_queries == "latent_maps" and self.latent_queries == "flat":
            raise ValueError("tokenizer.image_queries='latent_maps' needs latent_queries='hierarchical'")
        if self.latent_queries == "hierarchical":
            for n, (h, w) in zip(self.level_sizes, self.pool_grids):
                if self.grid[0] % h or self.grid[1] % w:
                    raise ValueError(
                        f"tokenizer.level_sizes: a level of {n} tokens pools on a {h}x{w} grid, "
                        f"which does not divide the {self.grid[0]}x{self.grid[1]} image grid"
                    )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.pixel_channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.downsample
        return side, side

    @property
    def num_tokens(self) -> int:
        return sum(self.level_sizes)

    @property
    def latent_levels(self) -> tuple[int, ...]:
        """Levels the encoder mask and the per-level heads see: level_sizes, or one level when flat."""
        return self.level_sizes if self.latent_queries == "hierarchical" else (self.num_tokens,)

    @property
    def pool_grids(self) -> tuple[tuple[int, int], ...]:
        return tuple(pool_grid(n) for n in self.level_sizes)

    @property
    def merge_blocks(self) -> tuple[int, ...]:
        return merge_block_indices(self.enc_depth, self.hierarchy_stages)

    @property
    def keep_lengths(self) -> list[int]:
        return keep_lengths(self.level_sizes, self.min_tokens)

    @property
    def keep_probs(self) -> list[float]:
        return keep_probs(len(self.keep_lengths), self.drop_prob)
