"""Params sections `generator` (the model, less what the tokenizer fixes) and `train_generator`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from restok.config.engine import rng, without
from restok.config.training import OFFICIAL_HELP, Loop, Official, Optim
from restok.models.generator_config import GeneratorConfig

GeneratorParams = without(GeneratorConfig, "vocab_size", "num_tokens", "num_classes")


def generator_config(section, vocab_size: int, num_tokens: int, num_classes: int) -> GeneratorConfig:
    return GeneratorConfig(
        vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes, **dataclasses.asdict(section)
    )


@dataclass(frozen=True)
class TrainGenerator:
    loop: Loop = Loop()
    optim: Optim = Optim()
    val_batches: int = field(default=4, metadata=rng(0, help="val batches for the val loss at each log step"))
    official: Official | None = field(default=None, metadata=rng(help=OFFICIAL_HELP))

    def __post_init__(self):
        if self.loop.checkpointing == "all":
            raise ValueError(
                "train_generator.loop.checkpointing='all' names the tokenizer's pixel CNN, which the "
                "generator does not have; use 'blocks'"
            )
