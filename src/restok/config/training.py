"""What both training stages' sections share: the loop, the optimiser, a released checkpoint to import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import check_sha256_param, rng
from restok.models.recompute_mode import Checkpointing


@dataclass(frozen=True)
class Optim:
    """Linear warmup, then decay to end_lr (docs/method.md, training-and-eval §3.2-3.3: AdamW, cosine)."""

    lr: float = field(default=1e-4, metadata=rng(0.0))
    end_lr: float = field(default=1e-5, metadata=rng(0.0))
    warmup_steps: int = field(default=5000, metadata=rng(0))
    schedule: Literal["cosine", "linear"] = field(
        default="cosine", metadata=rng(help=("decay after the warmup: cosine (official) or linear to end_lr"))
    )
    algorithm: Literal["adamw", "muon"] = field(
        default="adamw",
        metadata=rng(help=("adamw (official); muon: Muon for the linear layers' weight matrices, AdamW for the rest")),
    )
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
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata=rng(help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32"),
    )
    compile: bool = field(
        default=False,
        metadata=rng(
            help=(
                "torch.compile (pays on GPU): the tokenizer by region (each ViT block and pixel CNN), the generator whole"
            )
        ),
    )
    checkpointing: Checkpointing = field(
        default="none",
        metadata=rng(
            help=(
                "activation checkpointing (recompute in the backward pass; same values and gradients, less memory, more "
                "compute): none; blocks: each transformer block; all (tokenizer only): also each pixel-CNN ResBlock"
            )
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class Official:
    """A released checkpoint, imported instead of training (the authors' hub repos; README.md, "Official checkpoints")."""

    repo_id: str = field(
        default="",
        metadata=rng(help="Hugging Face hub repo id, fetched through huggingface_hub's cache when `file` is null"),
    )
    revision: str | None = field(default=None, metadata=rng(help="hub branch, tag or commit (null: main)"))
    file: str | None = field(
        default=None,
        metadata=rng(
            help=(
                "a local folder (config.json + model.safetensors or pytorch_model.bin) or weights file, used instead of "
                "the hub"
            )
        ),
    )
    sha256: str | None = field(
        default=None,
        metadata=rng(
            help=(
                "the weights file's expected sha256, checked before it is read; required when it comes from the hub "
                "(repo_id), checked for a local file when set"
            )
        ),
    )

    def __post_init__(self):
        check_sha256_param("official.sha256", self.sha256)


OFFICIAL_HELP = "null: train; a mapping: import this released checkpoint instead (the stage trains nothing)"
