"""Code collapse can never pass CI: a few dozen steps of the default profile's tokenizer recipe on a small batch of
built-in images must reconstruct them better than their mean image, with codes that differ across images at every
level; the official recipe's decoder queries (one shared learned token) at the same budget must not, so the
criterion is known to bite.

Run: .venv/bin/python -m pytest tests/unit/test_tokenizer_collapse.py -q

The recipe is the default profile's model (tokenizer section, including its switches), its optimiser as the stage
builds it (`optim.algorithm` with the groups, LR, betas, weight decay and clip of the profile) and the MSE + VQ
objective, without VF alignment (no teacher here).
The old default collapsed to the mean image: every prefix decoded to the same blur (docs/experiments.md, "a tokenizer
that learns"). Distinct codes alone did not catch that (they passed on the collapsed recipe); the reconstruction gain
over the mean image does.
"""

import dataclasses

import torch

from restok.config.engine import build
from restok.config.profiles import profile_tree
from restok.config.sections import SECTIONS
from restok.config.tokenizer import tokenizer_config
from restok.data.builtin import render
from restok.data.views import to_uint8_tensor
from restok.losses.recon import TokenizerLoss
from restok.metrics import psnr
from restok.models.tokenizer import ResTok
from restok.train import optim
from restok.train.lr import lr_at

STEPS, WARMUP, CLASSES, PER_CLASS = 60, 10, 8, 2
MIN_GAIN_DB = 3.5  # reconstruction PSNR above the mean image of the same images (measured: default 4.85, shared
#                   learned queries 2.41, shared learned queries with layer scale 0.01: 1.22)


def _train(**overrides) -> tuple[torch.Tensor, float, tuple[int, ...]]:
    """(codes (N, L) of the training images, their reconstruction's PSNR gain in dB over their mean image, the
    level sizes) after STEPS steps of the default recipe with `overrides` on the tokenizer section."""
    tree = profile_tree("default")
    section = dataclasses.replace(SECTIONS["tokenizer"](**tree["tokenizer"]), vf_align=False, **overrides)
    res = tree["data"]["resolution"]
    opt_cfg = build(SECTIONS["train_tokenizer"], tree["train_tokenizer"], "train_tokenizer").optim
    cfg = tokenizer_config(section, res, None)
    images = (
        torch.stack(
            [to_uint8_tensor(render(c, i, res, seed=0)) for c in range(CLASSES) for i in range(PER_CLASS)]
        ).float()
        / 255
    )  # (16, 3, 32, 32)
    torch.manual_seed(0)
    model = ResTok(cfg)
    loss_fn = TokenizerLoss(
        dataclasses.replace(
            SECTIONS["train_tokenizer"]().loss, lpips_weight=0.0, vf_enc_weight=0.0, vf_dec_weight=0.0, gan_weight=0.0
        )
    )
    opt = optim.build(model, opt_cfg)
    for step in range(STEPS):
        out = model(images)
        loss, _ = loss_fn(images, out.recon, out.quant_loss, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, opt_cfg.lr, WARMUP, STEPS, end_lr=opt_cfg.end_lr)
        opt.step()
    model.eval()
    with torch.no_grad():
        codes = model.encode(images)
        recon = (model.decode(codes).clamp(0, 1) * 255).round() / 255
    mean_image = images.mean(0, keepdim=True).expand_as(images)
    gain = float(psnr(recon, images).mean() - psnr(mean_image, images).mean())
    return codes, gain, cfg.level_sizes


def _distinct_per_level(codes: torch.Tensor, level_sizes) -> list[int]:
    """Distinct code tuples across images within each level."""
    return [len({tuple(row) for row in part.tolist()}) for part in codes.split(list(level_sizes), dim=1)]


def test_default_recipe_reconstructs_and_uses_every_level():
    codes, gain, level_sizes = _train()
    distinct = _distinct_per_level(codes, level_sizes)
    assert gain >= MIN_GAIN_DB, f"reconstruction only {gain:.2f} dB above the mean image after {STEPS} steps"
    assert all(n > 1 for n in distinct), f"distinct codes per level across {len(codes)} images: {distinct}"


def test_the_criterion_bites_on_a_collapsing_recipe():
    _, gain, _ = _train(image_queries="learned")
    assert gain < MIN_GAIN_DB, f"shared learned queries gained {gain:.2f} dB: the criterion no longer separates"
