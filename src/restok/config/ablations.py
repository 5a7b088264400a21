"""Params section `ablations`: named variants (dotted-key overrides) and the claims compared on them."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Literal

from restok.config.engine import ParamsError, rng, set_dotted

Override = dict[str, str | int | float | bool | None]
COMPARABLE_METRICS = (
    "rFID",
    "gFID",
    "IS",
    "precision",
    "recall",
    "PSNR_dB",
    "codebook_usage",
    "sampling_steps",
    "generate_images_per_s",
    "probe_sample_accuracy",
    "code_position_entropy_bits",
    "code_conditional_entropy_bits",
)


@dataclass(frozen=True)
class Comparison:
    """One claim of the paper, measured on two variants; the table says agree, disagree or cannot tell."""

    claim: str = field(default="", metadata=rng(help="the paper's claim, in words"))
    variant: str = field(default="", metadata=rng(help="the variant the claim is about (a name in variants)"))
    versus: str = field(default="", metadata=rng(help="the variant it is compared with (a name in variants)"))
    metric: Literal[COMPARABLE_METRICS] = field(
        default="gFID",
        metadata=rng(
            help=("a headline metric of results/metrics.json; the entropy metrics are compared level by level")
        ),
    )
    expect: Literal["lower", "higher", None] = field(
        default=None,
        metadata=rng(
            help=("the paper's direction for `variant` against `versus`; null: no stated direction (difference only)")
        ),
    )


# a variant name becomes a run name, a folder (data/ablations/<run>/) and a shell argument: nothing else is allowed
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Ablations:
    """The paper's ablations as named variants: dotted-key overrides on this params file (`restok ablate`)."""

    seeds: int = field(default=3, metadata=rng(1, 10, help="runs per variant; each sets both training seeds"))
    jobs: int = field(
        default=1,
        metadata=rng(
            1,
            64,
            help=(
                "DVC experiments run at once (`dvc exp run --run-all -j`); each gets cores / jobs CPU threads. On a small "
                "CPU machine two single-thread runs do more work than one two-thread run"
            ),
        ),
    )
    variants: dict[str, Override] = field(
        default_factory=dict,
        metadata={
            **rng(help="variant name -> {dotted.key: value}; each variant is validated as a whole params file"),
            "key_pattern": VARIANT_NAME.pattern,
        },
    )
    comparisons: list[Comparison] = field(
        default_factory=list, metadata=rng(help="the claims the table tests, each on two variants")
    )

    def __post_init__(self):
        for name in self.variants:
            if not VARIANT_NAME.match(name):
                raise ValueError(
                    f"ablations.variants: variant name {name!r} is not allowed; use letters, digits, "
                    f"'_', '.' and '-' only, not starting with '.' or '-' (it names folders and is "
                    f"passed to shell commands)"
                )
        for i, c in enumerate(self.comparisons):
            for role in ("variant", "versus"):
                if getattr(c, role) not in self.variants:
                    raise ValueError(
                        f"ablations.comparisons[{i}].{role}={getattr(c, role)!r} is not a variant; "
                        f"variants: {sorted(self.variants)}"
                    )
            if c.variant == c.versus:
                raise ValueError(f"ablations.comparisons[{i}] compares {c.variant!r} with itself")


def variant_tree(tree: dict, variant: str, seed_offset: int = 0) -> dict:
    """The params tree of ablation `variant`: its overrides applied, and `seed_offset` added to both training seeds
    (the k-th repeat of a variant); `ablations` itself is unchanged."""
    out = copy.deepcopy(tree)
    variants = tree["ablations"]["variants"]
    if variant not in variants:
        raise ParamsError(f"ablations.variants: no variant {variant!r}; known: {sorted(variants)}")
    for key, value in variants[variant].items():
        set_dotted(out, key, value, f"ablations.variants.{variant}: ")
    for stage in ("train_tokenizer", "train_generator"):
        out[stage]["loop"]["seed"] += seed_offset
    return out
