"""Params sections `tokenizer` (the model, less what upstream artifacts fix) and `train_tokenizer`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from restok.config.engine import rng, without
from restok.config.training import OFFICIAL_HELP, Loop, Official, Optim
from restok.losses.loss_config import LossConfig
from restok.models.tokenizer_config import TokenizerConfig

TokenizerParams = without(TokenizerConfig, "resolution", "vf_dim")


def tokenizer_config(section, resolution: int, vf_dim: int | None) -> TokenizerConfig:
    return TokenizerConfig(resolution=resolution, vf_dim=vf_dim, **dataclasses.asdict(section))


@dataclass(frozen=True)
class TrainTokenizer:
    loop: Loop = Loop()
    optim: Optim = Optim()
    disc_lr: float = field(default=1e-4, metadata=rng(0.0, help="discriminator heads' learning rate"))
    loss: LossConfig = LossConfig()
    eval_images: int = field(default=500, metadata=rng(1, help="val images for PSNR/SSIM/codebook stats"))
    export_step: int | None = field(
        default=None,
        metadata=rng(
            1,
            help=(
                "the step whose EMA weights become tokenizer.pt (evaluated here, encoded by extract_latents, decoded by "
                "sample); null: the last step. The paper extracts latents from the 750k-step EMA of its 1M-step run"
            ),
        ),
    )
    baseline_train_images: int | None = field(
        default=None,
        metadata=rng(
            1,
            help=(
                "train images (in shard order) averaged into the per-class and global mean-image PSNR baselines; "
                "null: all"
            ),
        ),
    )
    official: Official | None = field(default=None, metadata=rng(help=OFFICIAL_HELP))

    def __post_init__(self):
        if self.export_step is not None and self.export_step > self.loop.max_steps:
            raise ValueError(
                f"train_tokenizer.export_step={self.export_step} is after the last step "
                f"(loop.max_steps={self.loop.max_steps}); use a step <= max_steps or null"
            )
