"""ResTok: hierarchical-residual 1D visual tokenizer (model only; losses live in restok.losses).

Spec: restok.md §2–3 (data flow, the ten facts), tokenizer.md (every block). Official code: Kwai-Kolors/ResTok
e0059cb, built on TiTok (bytedance/1d-tokenizer); facts and numbers carry over, the code is our own.

    img [0,1] -> ImageNet norm -> PixelEncoder -> ResTokEncoder (ViT, residual merging, group-causal mask)
        -> z (B, L, code_dim) -> VectorQuantizer -> codes (B, L)
    codes -> normalised codebook rows -> ResTokDecoder (nested dropout, ViT) -> PixelDecoder (fp32) -> recon

Codes are (B, L) in level order (coarse first); any prefix decodes on its own (the rest is masked as in nested
dropout, which trains the prefixes of the keep lengths).
The ablation switches of TokenizerConfig select modules at build time (see vit.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from restok.models.pixel_cnn import PixelDecoder, PixelEncoder
from restok.models.quantizer import VectorQuantizer
from restok.models.recompute_mode import Checkpointing
from restok.models.vit import ResTokDecoder, ResTokEncoder, merge_block_indices, pool_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The switches with more than one option: Literal types, so params validation and the generated schema (enum:)
# refuse a typo such as merge_op: avgpol before any job runs.
MergeOp = Literal["subsample", "avgpool"]
LatentInit = Literal["residual_pool", "pool", "learned"]
LatentQueries = Literal["hierarchical", "flat"]
ImageQueries = Literal["learned", "latent_maps", "learned_grid"]
WeightInit = Literal["official", "fan_in"]
CodebookInit = Literal["uniform", "data"]
_CHOICES = {"merge_op": MergeOp, "latent_init": LatentInit, "latent_queries": LatentQueries,
            "image_queries": ImageQueries, "weight_init": WeightInit, "codebook_init": CodebookInit}


def keep_lengths(level_sizes: tuple[int, ...], min_tokens: int) -> list[int]:
    """Nested-dropout keep lengths: the level prefix lengths that are >= min_tokens (tokenizer.md §4.1)."""
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
        weight_init: "official" (trunc-normal 0.02, tokenizer.md §6) | "fan_in" (variance-preserving; what the
            short CPU profiles need to learn at all, see `_init_weights`).
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
            raise ValueError(f"tokenizer.pixel_channels={self.pixel_channels}: need >= 1 stage, each a positive "
                             "multiple of 32 (GroupNorm with 32 groups)")
        for name in ("pixel_res_blocks", "pixel_z_channels", "enc_depth", "dec_depth", "codebook_size", "code_dim",
                     "hierarchy_stages", "min_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.{name}={getattr(self, name)} must be >= 1")
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
            raise ValueError(f"tokenizer.resolution={self.resolution} must be a multiple of the pixel CNN factor "
                             f"{factor} (= 2^(len(pixel_channels) - 1))")
        for part in ("enc", "dec"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if heads < 1 or width % heads or (width // heads) % 4:
                raise ValueError(f"tokenizer.{part}_width={width} / {part}_heads={heads}: the head dim must be an "
                                 "integer divisible by 4 (2D RoPE rotates channel pairs on two axes)")
        expected = tuple([1] + [2**i for i in range(len(self.level_sizes) - 1)])
        if self.level_sizes != expected:
            raise ValueError(f"tokenizer.level_sizes={list(self.level_sizes)}: must double, i.e. {list(expected)}")
        if self.min_tokens > self.num_tokens:
            raise ValueError(f"tokenizer.min_tokens={self.min_tokens} exceeds the {self.num_tokens} latent tokens")
        if not 0 <= self.drop_prob <= 0.5:
            raise ValueError(f"tokenizer.drop_prob={self.drop_prob} must lie in [0, 0.5] (P(keep all) = 1 - p "
                             "needs floor(1/p) >= 2)")
        if self.commitment_cost < 0:
            raise ValueError(f"tokenizer.commitment_cost={self.commitment_cost} must be >= 0")
        if self.vf_dim is not None and self.vf_dim < 1:
            raise ValueError(f"tokenizer.vf_dim={self.vf_dim} must be >= 1 or null")
        if self.vf_align and self.vf_dim is None:
            raise ValueError("tokenizer.vf_align=true needs tokenizer.vf_dim (the teacher feature width)")
        if self.hierarchy_stages > 1 and self.enc_depth < self.hierarchy_stages:
            raise ValueError(f"tokenizer.hierarchy_stages={self.hierarchy_stages} needs enc_depth >= it "
                             f"(got {self.enc_depth}): the merging blocks would collide")
        merges = self.hierarchy_stages - 1
        if self.grid[1] % 2**merges:
            raise ValueError(f"tokenizer.hierarchy_stages={self.hierarchy_stages}: {merges} merges halve the grid "
                             f"width {self.grid[1]}, which must be divisible by {2**merges} (width never 0)")
        if self.latent_queries == "flat" and self.latent_init != "learned":
            raise ValueError(f"tokenizer.latent_queries='flat' needs latent_init='learned' (got {self.latent_init!r}):"
                             " the flat baseline has learned latent queries, no pooling")
        if self.image_queries == "latent_maps" and self.latent_queries == "flat":
            raise ValueError("tokenizer.image_queries='latent_maps' needs latent_queries='hierarchical'")
        if self.latent_queries == "hierarchical":
            for n, (h, w) in zip(self.level_sizes, self.pool_grids):
                if self.grid[0] % h or self.grid[1] % w:
                    raise ValueError(f"tokenizer.level_sizes: a level of {n} tokens pools on a {h}x{w} grid, "
                                     f"which does not divide the {self.grid[0]}x{self.grid[1]} image grid")

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


PRESETS = {
    "restok-L/128": TokenizerConfig(),
    "restok-tiny/32": TokenizerConfig(
        resolution=64, pixel_channels=(32, 32, 64, 64), pixel_res_blocks=1, pixel_z_channels=64,
        enc_width=128, enc_depth=4, enc_heads=2, dec_width=128, dec_depth=4, dec_heads=2,
        level_sizes=(1, 1, 2, 4, 8, 16), codebook_size=1024, vf_dim=384),
    "restok-smoke/8": TokenizerConfig(
        resolution=32, pixel_channels=(32, 32, 32), pixel_res_blocks=1, pixel_z_channels=32,
        enc_width=32, enc_depth=2, enc_heads=2, dec_width=32, dec_depth=2, dec_heads=2,
        level_sizes=(1, 1, 2, 4), hierarchy_stages=2, codebook_size=64, vf_dim=16),
}


@dataclass
class TokenizerOut:
    """What the training loop gets from ResTok.forward (losses are computed outside the model)."""

    recon: torch.Tensor  # (B, 3, H, W), not clamped
    codes: torch.Tensor  # (B, L) long
    quant_loss: torch.Tensor  # () fp32 = commitment + codebook
    vq_losses: dict[str, torch.Tensor]  # "commitment", "codebook"
    enc_cls_feat: torch.Tensor | None  # (B, vf_dim): projected mean of the coarsest image group
    dec_patch_feat: torch.Tensor | None  # (B, N, vf_dim): projected decoder feature branch
    n_keep: torch.Tensor  # (B,) long: nested-dropout keep length used per sample


def _init_weights(module: nn.Module, weight_init: str) -> None:
    """Model-wide init (tokenizer.md §6): Linear/Conv weights, zero biases, LayerNorm (1, 0).

    "official": trunc-normal std 0.02, as the released models were trained. With it the pixel CNN's output is tiny
    next to the level embeddings, so at first every image gets the same codes and the decoder learns the mean
    image; at ImageNet scale training gets past that, but the few hundred steps of a CPU profile do not (measured:
    12.8 dB = the mean-image PSNR after 300 steps on the built-in data). "fan_in": variance-preserving normal
    (std 1/sqrt(fan_in)), which learns from the first steps (19.8 dB after 200 steps, same data and model).
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if weight_init == "official":
            nn.init.trunc_normal_(module.weight, std=0.02)
        else:
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ResTok(nn.Module):
    """The ResTok tokenizer: encode images to level-ordered codes and decode any prefix back."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.pixel_encoder = PixelEncoder(cfg.pixel_channels, cfg.pixel_res_blocks, cfg.pixel_z_channels)
        self.encoder = ResTokEncoder(cfg)
        self.decoder = ResTokDecoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg.pixel_channels, cfg.pixel_res_blocks, cfg.pixel_z_channels)
        self.apply(lambda m: _init_weights(m, cfg.weight_init))  # before the quantiser and VF projections, which keep their own init
        if cfg.grey_start:
            out_conv = self.pixel_decoder.layers[-1]
            nn.init.zeros_(out_conv.weight)
            nn.init.constant_(out_conv.bias, 0.5)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment_cost, use_l2_norm=True,
                                         init_from_data=cfg.codebook_init == "data",
                                         dead_code_steps=cfg.dead_code_steps,
                                         bypass_steps=cfg.quantizer_bypass_steps)
        self.vf_enc_proj = nn.Linear(cfg.enc_width, cfg.vf_dim, bias=False) if cfg.vf_align else None
        self.vf_dec_proj = nn.Linear(cfg.dec_width, cfg.vf_dim, bias=False) if cfg.vf_align else None
        cpu = torch.device("cpu")
        self.register_buffer("keep_lengths", torch.tensor(cfg.keep_lengths, device=cpu), persistent=False)
        self.register_buffer("keep_probs", torch.tensor(cfg.keep_probs, device=cpu), persistent=False)

    def set_checkpointing(self, mode: Checkpointing) -> None:
        """Activation checkpointing for training (restok.models.recompute): "blocks" = each ViT block, "all" = also
        each pixel-CNN ResBlock, "none" = off. Values and gradients do not change."""
        self.encoder.checkpointing = self.decoder.checkpointing = mode in ("blocks", "all")
        self.pixel_encoder.checkpointing = self.pixel_decoder.checkpointing = mode == "all"

    def compile_regions(self, backend: str = "inductor") -> None:
        """Regional torch.compile, in place (parameter names unchanged): each ViT block and each pixel CNN, with static
        shapes. The whole tokenizer as one graph did not finish compiling in 9.5 min at size L (README); its blocks
        compile once per distinct input (the encoder's stages, merging or not, and the decoder) and are reused.
        The quantiser, with its data-dependent codebook upkeep, stays eager."""
        for region in (*self.encoder.blocks, *self.decoder.blocks, self.pixel_encoder, self.pixel_decoder):
            region.compile(backend=backend, dynamic=False)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return self.cfg.level_sizes

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.cfg.grid

    def _encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) in [0, 1] -> z (B, L, code_dim), coarsest image group (B, n, D)."""
        return self.encoder(self.pixel_encoder((img - self.pixel_mean) / self.pixel_std))

    def _pixel_decode(self, feat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=feat.device.type, enabled=False):  # fp32 pixel decoder (restok.md §4 #17)
            return self.pixel_decoder(feat.float())

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) in [0, 1] -> codes (B, L) long, level order."""
        return self.quantizer.distances(self._encode(img)[0]).argmin(dim=-1)

    def decode(self, codes: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
        """codes (B, n) with n <= L (a prefix is enough) -> img (B, 3, H, W). Positions >= n_tokens (default n) are
        replaced by the mask token, exactly as nested dropout does in training."""
        batch, n = codes.shape
        n_tokens = n if n_tokens is None else n_tokens
        if not 1 <= n_tokens <= n <= self.num_tokens:
            raise ValueError(f"decode got {n} codes and n_tokens={n_tokens}; need 1 <= n_tokens <= {n} <= "
                             f"{self.num_tokens} (the model's token count)")
        vectors = F.pad(self.quantizer.lookup(codes), (0, 0, 0, self.num_tokens - n))  # (B, L, code_dim)
        n_keep = torch.full((batch,), n_tokens, dtype=torch.long, device=codes.device)
        return self._pixel_decode(self.decoder(vectors, n_keep)[0])

    def draw_keep(self, batch: int) -> torch.Tensor:
        """Keep lengths (B,): nested dropout in training mode, all tokens in eval mode."""
        if not self.training:
            return self.keep_lengths[-1:].expand(batch)
        return self.keep_lengths[torch.multinomial(self.keep_probs, batch, replacement=True)]

    def forward(self, img: torch.Tensor, n_keep: torch.Tensor | None = None) -> TokenizerOut:
        """img (B, 3, H, W) in [0, 1]; n_keep (B,) long overrides the nested-dropout draw."""
        z, coarsest = self._encode(img)  # (B, L, code_dim), (B, n, D)
        z_q, codes, vq_losses = self.quantizer(z)
        n_keep = self.draw_keep(img.shape[0]) if n_keep is None else n_keep
        feat, features = self.decoder(z_q, n_keep, with_features=self.cfg.vf_align)
        return TokenizerOut(
            recon=self._pixel_decode(feat),
            codes=codes,
            quant_loss=vq_losses["commitment"] + vq_losses["codebook"],
            vq_losses=vq_losses,
            enc_cls_feat=self.vf_enc_proj(coarsest.mean(dim=1)) if self.cfg.vf_align else None,
            dec_patch_feat=self.vf_dec_proj(features) if self.cfg.vf_align else None,
            n_keep=n_keep,
        )
