"""Code collapse can never pass CI: a few dozen steps of the default profile's tokenizer recipe on a small batch of
built-in images, then the codes must differ across images at every level.

Run: .venv/bin/python -m pytest tests/unit/test_tokenizer_collapse.py -q

The recipe is the default profile's model (tokenizer section, including its switches: small layer scale, codebook
init from data, dead-code restarts, grey start), its optimiser (AdamW with the spec's groups, LR, betas, weight decay, clip)
and the MSE + VQ objective, without VF alignment (no teacher here, and without it the old recipe collapsed
completely). Measured (2026-12-02): with the four switches off, this criterion (more than one distinct code tuple
per level over the 16 images) still passed after 40 steps, so it does not yet bite on the old recipe; a stronger
criterion (per-position entropy per level) is the open follow-up.
"""
import dataclasses

import torch

from restok.config import SECTIONS, profile_tree, tokenizer_config
from restok.data.builtin import render
from restok.data.views import to_uint8_tensor
from restok.losses.recon import TokenizerLoss
from restok.models.tokenizer import ResTok
from restok.train import optim
from restok.train.lr import lr_at

STEPS, WARMUP, CLASSES, PER_CLASS = 40, 10, 8, 2


def _train_codes(**overrides) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Codes (N, L) of the training images after STEPS steps of the default recipe (with `overrides` on the
    tokenizer section), and the level sizes."""
    tree = profile_tree("default")
    section = dataclasses.replace(SECTIONS["tokenizer"](**tree["tokenizer"]), vf_align=False, **overrides)
    res, opt_cfg = tree["data"]["resolution"], tree["train_tokenizer"]["optim"]
    cfg = tokenizer_config(section, res, None)
    images = torch.stack([to_uint8_tensor(render(c, i, res, seed=0)) for c in range(CLASSES)
                          for i in range(PER_CLASS)]).float() / 255  # (16, 3, 32, 32)
    torch.manual_seed(0)
    model = ResTok(cfg)
    loss_fn = TokenizerLoss(dataclasses.replace(SECTIONS["train_tokenizer"]().loss, lpips_weight=0.0,
                                                vf_enc_weight=0.0, vf_dec_weight=0.0, gan_weight=0.0))
    opt = optim.adamw(model, opt_cfg["lr"], opt_cfg["weight_decay"], tuple(opt_cfg["betas"]))
    for step in range(STEPS):
        out = model(images)
        loss, _ = loss_fn(images, out.recon, out.quant_loss, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, opt_cfg["lr"], WARMUP, STEPS, end_lr=opt_cfg["end_lr"])
        opt.step()
    model.eval()
    with torch.no_grad():
        return model.encode(images), cfg.level_sizes


def _distinct_per_level(codes: torch.Tensor, level_sizes) -> list[int]:
    """Distinct code tuples across images within each level."""
    return [len({tuple(row) for row in part.tolist()}) for part in codes.split(list(level_sizes), dim=1)]


def test_default_recipe_codes_differ_across_images_at_every_level():
    codes, level_sizes = _train_codes()
    distinct = _distinct_per_level(codes, level_sizes)
    assert all(n > 1 for n in distinct), f"distinct codes per level across {len(codes)} images: {distinct}"

