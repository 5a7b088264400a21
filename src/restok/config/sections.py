"""Every top-level key of params.yaml and its type: what the whole-file check and the schema walk."""

from __future__ import annotations

from typing import Any

from restok.config.ablations import Ablations
from restok.config.data import Data, Shard
from restok.config.evaluation import CfgSearch, Checks, Fid
from restok.config.features import CacheFeatures, Vf
from restok.config.generator import GeneratorParams, TrainGenerator
from restok.config.latents import ExtractLatents
from restok.config.resources import Resources
from restok.config.sample import Sample
from restok.config.tokenizer import TokenizerParams, TrainTokenizer

# Top-level keys of params.yaml and their types. A stage's PARAMS maps the ones it reads to the same types.
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
