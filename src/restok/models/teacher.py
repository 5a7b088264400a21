"""Frozen foundation models loaded through timm: the DINOv3 teacher and the loader the losses share.

The teacher gives the VF-alignment targets (training-and-eval.md §2.5, tokenizer.md §5): a CLS vector and the patch
tokens of a frozen DINOv3 ViT (paper: `vit_large_patch16_dinov3.lvd1689m`, 1024-d) on the unaugmented image,
ImageNet-normalised, with the 5 prefix tokens (CLS + 4 registers) split off.

Weights come from one of three places, chosen by params and recorded as provenance:
- `None`: timm's normal path, `timm.create_model(name, pretrained=True)` through the HF hub cache;
- a file path: `pretrained_cfg_overlay=dict(file=...)` (safetensors or .pth);
- `"random-init"`: a seeded random init of the same architecture, for offline demos only. It is never a fallback:
  missing weights raise `MissingWeightsError` before any model is built.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from timm.data import resolve_data_config

RANDOM_INIT = "random-init"
HUB_WEIGHTS_FILE = "model.safetensors"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that a stage needs are not on this machine (and cannot be downloaded)."""


def missing_weights_message(what: str, looked_in: list[str], reason: str, expected: str, params_key: str) -> str:
    """The one message every stage prints when real weights are missing (ecosystem.md §8)."""
    return (
        f"restok: pretrained weights for {what} not found (looked in: {', '.join(looked_in)}; {reason}). "
        f"Put the file at {expected} or set {params_key}=<file>; see README, \"Pretrained weights\"."
    )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (gradients still flow to the input)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _hub_file(name: str, params_key: str) -> None:
    """Make sure the hub weights of `name` are in the HF cache (downloading them when online), else raise."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise ValueError(f"{params_key}: timm model {name!r} has no hub weights; give a weights file instead")
    repo_dir = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    try:
        hf_hub_download(repo, HUB_WEIGHTS_FILE)
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError and HTTP errors are OSErrors
        reason = "HF_HUB_OFFLINE=1, no network" if hf_constants.HF_HUB_OFFLINE else f"download failed: {err}"
        expected = f"{repo_dir}/snapshots/<rev>/{HUB_WEIGHTS_FILE} with refs/main containing <rev>"
        looked_in = f"{repo_dir}/snapshots/*/{HUB_WEIGHTS_FILE}"
        raise MissingWeightsError(missing_weights_message(name, [looked_in], reason, expected, params_key)) from err


def load_timm_model(
    name: str, weights_file: str | None = None, *, seed: int = 0, params_key: str = "weights", **create_kwargs
) -> tuple[nn.Module, dict]:
    """Build a frozen timm model with its weights; checks that the weights exist before building anything.

    Args:
        name: timm model name with its pretrained tag, e.g. "vit_small_patch16_dinov3.lvd1689m".
        weights_file: None (hub cache), a path to a .safetensors/.pth file, or "random-init" (seeded, demo only).
        seed: seed of the random init when weights_file == "random-init"; the global RNG is left untouched.
        params_key: the params key that names the weights file, quoted in error messages.
        **create_kwargs: passed to `timm.create_model` (e.g. act_layer).

    Returns:
        (model in eval mode with requires_grad False, provenance {"model": name, "weights": "hub" | "file:<path>" |
        "random-init(seed=N)"}).
    """
    if not timm.is_model(name):
        raise ValueError(f"{params_key}: unknown timm model {name!r}")
    if weights_file == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **create_kwargs)
        source = f"{RANDOM_INIT}(seed={seed})"
    elif weights_file is not None:
        path = Path(weights_file).expanduser().resolve()
        if not path.is_file():
            message = missing_weights_message(name, [str(path)], "file does not exist", str(path), params_key)
            raise MissingWeightsError(message)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **create_kwargs)
        source = f"file:{path}"
    else:
        _hub_file(name, params_key)
        model = timm.create_model(name, pretrained=True, **create_kwargs)
        source = "hub"
    return freeze(model), {"model": name, "weights": source}


class Teacher(nn.Module):
    """Frozen DINOv3 ViT: image in [0,1] -> (CLS (B, D), patch tokens (B, P, D)) for a requested token grid.

    Args:
        name: timm DINOv3 name (paper "vit_large_patch16_dinov3.lvd1689m",
            tiny profile "vit_small_patch16_dinov3.lvd1689m").
        weights: None (hub cache), a weights file, or "random-init" (see `load_timm_model`).
        seed: seed of the random init.
        params_key: params key naming the weights, for error messages.
    """

    def __init__(self, name: str, weights: str | None = None, *, seed: int = 0, params_key: str = "vf.weights"):
        super().__init__()
        self.model, self.provenance = load_timm_model(name, weights, seed=seed, params_key=params_key)
        data_cfg = resolve_data_config({}, model=self.model)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.interpolation = data_cfg["interpolation"]
        self.patch_size = tuple(self.model.patch_embed.patch_size)
        self.num_prefix_tokens = self.model.num_prefix_tokens  # 5 for DINOv3: CLS + 4 registers

    @property
    def feat_dim(self) -> int:
        return self.model.num_features

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.model.eval()  # frozen: always in eval mode, whatever the parent module does
        return self

    @torch.no_grad()
    def forward(self, img: torch.Tensor, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) in [0, 1]; grid (h, w) resizes the view to (h, w) patches, None keeps its size."""
        ph, pw = self.patch_size
        if grid is None:
            if img.shape[-2] % ph or img.shape[-1] % pw:
                raise ValueError(f"teacher input {tuple(img.shape[-2:])} is not a multiple of the patch {ph}x{pw}")
            grid = (img.shape[-2] // ph, img.shape[-1] // pw)
        size = (grid[0] * ph, grid[1] * pw)
        x = img.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        tokens = self.model.forward_features(x)  # (B, prefix + h*w, D), final norm included
        return tokens[:, 0], tokens[:, self.num_prefix_tokens :]  # (B, D), (B, P, D)
