"""ResTok: hierarchical-residual 1D visual tokenizer (model only; losses live in restok.losses).

docs/method.md, restok §2–3 (data flow, the ten facts), tokenizer (every block). Official code: Kwai-Kolors/ResTok
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

import torch
import torch.nn.functional as F
from torch import nn

from restok.models.pixel_cnn import PixelDecoder, PixelEncoder
from restok.models.quantizer import VectorQuantizer
from restok.models.recompute_mode import Checkpointing
from restok.models.tokenizer_config import TokenizerConfig
from restok.models.vit import ResTokDecoder, ResTokEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = {
    "restok-L/128": TokenizerConfig(),
    "restok-tiny/32": TokenizerConfig(
        resolution=64,
        pixel_channels=(32, 32, 64, 64),
        pixel_res_blocks=1,
        pixel_z_channels=64,
        enc_width=128,
        enc_depth=4,
        enc_heads=2,
        dec_width=128,
        dec_depth=4,
        dec_heads=2,
        level_sizes=(1, 1, 2, 4, 8, 16),
        codebook_size=1024,
        vf_dim=384,
    ),
    "restok-smoke/8": TokenizerConfig(
        resolution=32,
        pixel_channels=(32, 32, 32),
        pixel_res_blocks=1,
        pixel_z_channels=32,
        enc_width=32,
        enc_depth=2,
        enc_heads=2,
        dec_width=32,
        dec_depth=2,
        dec_heads=2,
        level_sizes=(1, 1, 2, 4),
        hierarchy_stages=2,
        codebook_size=64,
        vf_dim=16,
    ),
}


@dataclass
class TokenizerOut:
    """What the training loop gets from ResTok.forward (losses are computed outside the model)."""

    recon: torch.Tensor  # (B, 3, H, W), not clamped
    codes: torch.Tensor  # (B, L) long
    quant_loss: torch.Tensor  # () fp32 = commitment + codebook
    vq_losses: dict[str, torch.Tensor]  # "commitment", "codebook"
    enc_cls_feat: torch.Tensor | None  # (B, vf_dim): projected mean of the coarsest image group
    dec_patch_feat: torch.Tensor | None  # (F, N, vf_dim): projected decoder feature branch of the first F images
    n_keep: torch.Tensor  # (B,) long: nested-dropout keep length used per sample


def _init_weights(module: nn.Module, weight_init: str) -> None:
    """Model-wide init (docs/method.md, tokenizer §6): Linear/Conv weights, zero biases, LayerNorm (1, 0).

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
        self.apply(
            lambda m: _init_weights(m, cfg.weight_init)
        )  # before the quantiser and VF projections, which keep their own init
        if cfg.grey_start:
            out_conv = self.pixel_decoder.layers[-1]
            nn.init.zeros_(out_conv.weight)
            nn.init.constant_(out_conv.bias, 0.5)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            cfg.commitment_cost,
            use_l2_norm=True,
            init_from_data=cfg.codebook_init == "data",
            dead_code_steps=cfg.dead_code_steps,
            bypass_steps=cfg.quantizer_bypass_steps,
        )
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
        shapes. The whole tokenizer as one graph did not finish compiling in 9.5 min at size L (benchmarks/README.md);
        its blocks compile once per distinct input (the encoder's stages, merging or not, and the decoder) and are
        reused. The quantiser, with its data-dependent codebook upkeep, stays eager.

        Every ViT block runs one code object (`Block.forward`), and dynamo's recompile limit (8 by default) counts its
        compiled inputs over all blocks: a sequence length per encoder stage and one for the decoder, each in training
        and under no_grad. Past the limit a new shape runs eager without error (the tiny preset's eval fell back),
        so the limit is raised to cover every region's shapes."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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
        with torch.autocast(
            device_type=feat.device.type, enabled=False
        ):  # fp32 pixel decoder (docs/method.md, restok §4 #17)
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
            raise ValueError(
                f"decode got {n} codes and n_tokens={n_tokens}; need 1 <= n_tokens <= {n} <= "
                f"{self.num_tokens} (the model's token count)"
            )
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
        feature_rows = max(1, round(self.cfg.vf_dec_fraction * img.shape[0])) if self.cfg.vf_align else 0
        feat, features = self.decoder(z_q, n_keep, feature_rows)
        return TokenizerOut(
            recon=self._pixel_decode(feat),
            codes=codes,
            quant_loss=vq_losses["commitment"] + vq_losses["codebook"],
            vq_losses=vq_losses,
            enc_cls_feat=self.vf_enc_proj(coarsest.mean(dim=1)) if self.cfg.vf_align else None,
            dec_patch_feat=self.vf_dec_proj(features) if self.cfg.vf_align else None,
            n_keep=n_keep,
        )
