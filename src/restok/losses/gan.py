"""Adversarial loss: DINO discriminator, DiffAugment, hinge and LeCam, docs/method.md, training-and-eval §2.6-2.9.

- Discriminator (`DinoDiscriminator`, norm "bn"): a frozen DINO ViT-S/16 (timm `vit_small_patch16_224.dino`, the
  self-supervised `dino_deitsmall16` weights; tanh GELU, key part of every qkv bias zeroed, no final norm) read out
  after the position embedding and after blocks 2, 5, 8, 11 as (patch tokens + CLS) (B, D, 196); one trainable
  head per readout; the 5 heads' logits concatenated to (B, 980). Only the heads are trainable.
- DiffAugment (policy "color,translation,cutout_0.2", p = 0.5): one Bernoulli(p) draw per group per call, per-sample
  parameters. Every random draw (augmentations, the discriminator's crop-or-resize choice) comes from an explicit
  CPU `torch.Generator` (None = torch's default CPU generator), so no draw needs a device sync.
- Generator side: -mean D(DiffAug(x_hat)), heads frozen for the pass, gradients flowing into x_hat.
- Discriminator side: 1/2 (mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake))) + w * LeCam, with independent
  DiffAugment draws for real and fake and EMAs (decay 0.999) of the batch-mean logits updated after use.
All in fp32. The discriminator starts at `start_step` (`active(step)`); the loop skips the D step before that.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from timm.data import resolve_data_config

from restok.losses.loss_config import parse_diffaug_policy
from restok.models.teacher import load_timm_model

READOUT_BLOCKS = (2, 5, 8, 11)


def _per_sample(x: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """A (B,) CPU draw moved to x's device and dtype, shaped (B, 1, 1, 1)."""
    return draw.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x: torch.Tensor, g: torch.Generator | None, _: float) -> torch.Tensor:
    B = x.shape[0]
    x = x + _per_sample(x, torch.rand(B, generator=g) - 0.5)  # brightness
    m = x.mean(dim=1, keepdim=True)  # (B, 1, H, W) channel mean per pixel
    x = (x - m) * _per_sample(x, torch.rand(B, generator=g) * 2) + m  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1) image mean
    return (x - m) * _per_sample(x, torch.rand(B, generator=g) + 0.5) + m  # contrast


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1), generator=g).to(x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1), generator=g).to(x.device)
    # read the zero-padded image at the shifted index; indices past the image land on the zero border
    rows = (torch.arange(H, device=x.device) + dy + 1).clamp(0, H + 1)  # (B, H)
    cols = (torch.arange(W, device=x.device) + dx + 1).clamp(0, W + 1)  # (B, W)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    top = torch.randint(0, H + 1 - ch % 2, (B, 1), generator=g).to(x.device) - ch // 2  # centre -> top edge
    left = torch.randint(0, W + 1 - cw % 2, (B, 1), generator=g).to(x.device) - cw // 2
    r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    in_rows = (r >= top) & (r < top + ch)  # (B, H); the square is clipped to the image
    in_cols = (c >= left) & (c < left + cw)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


_AUGMENT = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(
    x: torch.Tensor, policy: tuple[tuple[str, float], ...], p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DiffAugment of x (B, 3, H, W); `policy` from `parse_diffaug_policy`; `generator` must live on the CPU."""
    for name, ratio in policy:
        if torch.rand((), generator=generator) < p:  # one batch-wide draw per group (CPU, no device sync)
            x = _AUGMENT[name](x, generator, ratio)
    return x.contiguous()


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches of `virtual_bs` samples (and all positions), per channel; no running stats."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-6):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L = x.shape
        groups = math.ceil(B / self.virtual_bs)
        if B % groups:
            raise ValueError(f"discriminator batch {B} does not split into {groups} equal virtual batches")
        xg = x.float().view(groups, B // groups, C, L)
        mean = xg.mean(dim=(1, 3), keepdim=True)  # (G, 1, C, 1)
        var = xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        xg = (xg - mean) * torch.rsqrt(var + self.eps)
        return xg.view(B, C, L) * self.weight[:, None] + self.bias[:, None]


def _sn_conv(c_in: int, c_out: int, kernel_size: int) -> nn.Conv1d:
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


def _conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(_sn_conv(channels, channels, kernel_size), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (0.5**0.5)


def _head(channels: int, kernel_size: int) -> nn.Sequential:
    """(B, D, P) -> (B, 1, P): 1x1 block, residual k-wide block, 1x1 to one logit per token."""
    return nn.Sequential(
        _conv_block(channels, 1), _Residual(_conv_block(channels, kernel_size)), _sn_conv(channels, 1, 1)
    )


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT backbone with 5 trainable heads; image in [0,1] -> logits (B, 5 * P).

    Args:
        model_name: timm name of the backbone (paper "vit_small_patch16_224.dino").
        weights: None (hub cache), a weights file, or "random-init" (see `restok.models.teacher.load_timm_model`).
        seed: seed of the random init.
        revision, sha256: the pin of the backbone's weights (params disc_revision, disc_sha256; hub weights need it).
        kernel_size: width of the heads' residual conv (9).
        params_key: params key naming the weights, for error messages.
    """

    def __init__(
        self,
        model_name: str,
        weights: str | None = None,
        *,
        seed: int = 0,
        kernel_size: int = 9,
        params_key: str = "disc_weights",
        revision: str | None = None,
        sha256: str | None = None,
    ):
        super().__init__()
        section = params_key.rsplit(".", 1)[0] + "." if "." in params_key else ""
        backbone, self.provenance = load_timm_model(
            model_name,
            weights,
            seed=seed,
            params_key=params_key,
            act_layer="gelu_tanh",
            revision=revision,
            sha256=sha256,
            pin_keys=(f"{section}disc_revision", f"{section}disc_sha256"),
        )
        if len(backbone.blocks) <= max(READOUT_BLOCKS) or backbone.num_prefix_tokens != 1:
            raise ValueError(f"{params_key}: {model_name} needs >= 12 blocks and one CLS token for the DINO readouts")
        with torch.no_grad():
            for block in backbone.blocks:  # the key part of each qkv bias is zeroed at load
                bias, D = block.attn.qkv.bias, backbone.embed_dim
                bias[D : 2 * D].zero_()
        self.backbone = backbone
        data_cfg = resolve_data_config({}, model=backbone)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.img_size = tuple(data_cfg["input_size"][1:])
        self.heads = nn.ModuleList(_head(backbone.embed_dim, kernel_size) for _ in range(len(READOUT_BLOCKS) + 1))

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen; the heads have no train/eval difference except spectral-norm power iteration
        return self

    def _fit(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Larger inputs: one batch-wide random crop with probability 1/2, else an area resize; smaller: bicubic."""
        (H, W), (th, tw) = x.shape[-2:], self.img_size
        if H > th and W > tw and torch.rand((), generator=generator) < 0.5:
            i = int(torch.randint(0, H - th + 1, (), generator=generator))
            j = int(torch.randint(0, W - tw + 1, (), generator=generator))
            return x[..., i : i + th, j : j + tw]
        if (H, W) == (th, tw):
            return x
        return F.interpolate(x, size=(th, tw), mode="area" if H > th else "bicubic", align_corners=None)

    def forward(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._fit((img.float() - self.mean) / self.std, generator)  # (B, 3, 224, 224)
        net = self.backbone
        x = net.norm_pre(net._pos_embed(net.patch_embed(x)))  # (B, 1 + P, D): CLS prepended, position embedding added
        readouts = [x]
        for i, block in enumerate(net.blocks[: max(READOUT_BLOCKS) + 1]):
            x = block(x)
            if i in READOUT_BLOCKS:
                readouts.append(x)
        logits = [
            head((r[:, 1:] + r[:, :1]).transpose(1, 2)).flatten(1)  # (B, D, P) -> (B, P)
            for head, r in zip(self.heads, readouts)
        ]
        return torch.cat(logits, dim=1)  # (B, 5 * P)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor):
    """LeCam regulariser on batch-mean logits against the EMAs of the other side."""
    return F.relu(real_mean - ema_fake).square() + F.relu(ema_real - fake_mean).square()


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Heads excluded from autograd for one forward; inputs still get gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class GANLoss(nn.Module):
    """Hinge GAN with the DINO discriminator, DiffAugment and LeCam; trainable parameters = the discriminator heads.

    Args:
        disc_model, disc_weights, seed: the discriminator backbone and its weights (see `DinoDiscriminator`).
        start_step: first global step with the adversarial term and discriminator updates.
        lecam_weight, lecam_decay: LeCam weight (0.001) and EMA decay of the batch-mean logits (0.999).
        diffaug_policy, diffaug_prob: DiffAugment groups and the per-group probability.
        params_key: params key naming the discriminator weights, for error messages.
    """

    def __init__(
        self,
        *,
        disc_model: str,
        disc_weights: str | None,
        seed: int,
        start_step: int,
        lecam_weight: float,
        lecam_decay: float,
        diffaug_policy: str,
        diffaug_prob: float,
        params_key: str = "disc_weights",
        disc_revision: str | None = None,
        disc_sha256: str | None = None,
    ):
        super().__init__()
        self.discriminator = DinoDiscriminator(
            disc_model, disc_weights, seed=seed, params_key=params_key, revision=disc_revision, sha256=disc_sha256
        )
        self.start_step, self.lecam_weight, self.lecam_decay = start_step, lecam_weight, lecam_decay
        self.policy, self.diffaug_prob = parse_diffaug_policy(diffaug_policy), diffaug_prob
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @property
    def provenance(self) -> dict:
        return self.discriminator.provenance

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def _logits(self, img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        with torch.autocast(device_type=img.device.type, enabled=False):
            x = diff_augment(img.float(), self.policy, self.diffaug_prob, generator)
            return self.discriminator(x, generator)  # (B, 5 * P)

    def generator_loss(self, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """-mean D(DiffAug(fake)); gradients reach `fake`, not the heads."""
        with _frozen(self.discriminator.heads):
            return hinge_g_loss(self._logits(fake, generator))

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge + LeCam on (real, sg(fake)) with independent DiffAugment draws; updates the LeCam EMAs."""
        logits_real = self._logits(real.detach(), generator)
        logits_fake = self._logits(fake.detach(), generator)
        real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
        hinge = hinge_d_loss(logits_real, logits_fake)
        lecam = lecam_loss(real_mean, fake_mean, self.ema_real, self.ema_fake)
        with torch.no_grad():  # EMAs move after the regulariser used them
            self.ema_real.lerp_(real_mean.detach(), 1.0 - self.lecam_decay)
            self.ema_fake.lerp_(fake_mean.detach(), 1.0 - self.lecam_decay)
        loss = hinge + self.lecam_weight * lecam
        logs = {"d_loss": loss, "d_hinge": hinge, "d_lecam": lecam, "logits_real": real_mean, "logits_fake": fake_mean}
        return loss, {k: v.detach() for k, v in logs.items()}
