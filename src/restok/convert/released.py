"""The released checkpoints as pipeline artifacts: fetch (hub cache or local file), import, check against params.

The `official-l` profile sets `train_tokenizer.official` and `train_generator.official`; the two training stages
then call `import_released` instead of training. The hub folders are fetched through huggingface_hub's cache
(`snapshot_download`, so `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` behave as everywhere else), or read from the
local folder or weights file named in `official.file`. Missing weights stop the stage before any work.

The imported model's config comes from the checkpoint's own config.json; the params section must agree with it on
every field that shapes the model's outputs, so params.yaml always says what was evaluated. Fields that only act
during training (dropouts, token drop, VF heads, the loss's commitment cost, the init rule) are taken from the
checkpoint and not compared.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from restok.convert.checkpoint import WEIGHT_FILES, Kind, import_official_checkpoint, weights_file
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.teacher import MissingWeightsError, missing_weights_message
from restok.models.tokenizer import ResTok, TokenizerConfig
from restok.weights import verify_pinned

HUB_FILES = ["config.json", *WEIGHT_FILES]
TRAINING_ONLY = {
    "tokenizer": {"drop_prob", "vf_align", "vf_dim", "weight_init", "commitment_cost"},
    "generator": {"class_dropout_prob", "token_dropout", "attn_dropout", "resid_dropout", "ffn_dropout", "init_std"},
}


def fetch(official, params_key: str) -> Path:
    """The local folder (or weights file) of a released checkpoint; raises MissingWeightsError naming where it
    looked and how to provide it. `official` is a params `Official` section, `params_key` its dotted key."""
    if official.file is not None:
        path = Path(official.file)
        if not path.exists():
            raise MissingWeightsError(
                missing_weights_message(
                    f"the released checkpoint {official.repo_id or path.name}",
                    [str(path)],
                    "no such file or folder",
                    str(path),
                    f"{params_key}.file",
                )
            )
        return path
    if not official.repo_id:
        raise ValueError(f"{params_key}: set repo_id (a Hugging Face hub repo) or file (a local folder)")
    try:
        return Path(snapshot_download(official.repo_id, revision=official.revision, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo or revision, interrupted download: all end here
        cache = Path(hf_constants.HF_HUB_CACHE) / f"models--{official.repo_id.replace('/', '--')}"
        reason = (
            "HF_HUB_OFFLINE=1 and not in the cache"
            if hf_constants.HF_HUB_OFFLINE
            else f"hub download failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise MissingWeightsError(
            missing_weights_message(
                f"the released checkpoint {official.repo_id}@{official.revision or 'main'}",
                [str(cache)],
                reason,
                f"a local folder from `huggingface-cli download {official.repo_id} --local-dir DIR`",
                f"{params_key}.file",
            )
        ) from None


def mismatches(
    kind: Kind,
    expected: TokenizerConfig | GeneratorConfig,
    found: TokenizerConfig | GeneratorConfig,
) -> list[str]:
    """Fields (outside TRAINING_ONLY) where the params' config and the checkpoint's differ."""
    out = []
    for f in dataclasses.fields(expected):
        a, b = getattr(expected, f.name), getattr(found, f.name)
        if f.name not in TRAINING_ONLY[kind] and a != b:
            out.append(f"{f.name}: params {a!r}, checkpoint {b!r}")
    return out


def import_released(
    kind: Kind, official, params_key: str, expected: TokenizerConfig | GeneratorConfig, section: str
) -> tuple[ResTok | HARGenerator, dict]:
    """Fetch, import (exactly or not at all) and check a released checkpoint. Returns (model in eval mode,
    provenance). `expected` is the config the params describe; `section` names the params section for errors."""
    path = fetch(official, params_key)
    origin = None if official.file is not None else f"the hub ({official.repo_id}@{official.revision or 'main'})"
    verify_pinned(weights_file(path), official.sha256, f"the released {kind}", f"{params_key}.sha256", origin)
    model, cfg, provenance = import_official_checkpoint(path, kind)
    bad = mismatches(kind, expected, cfg)
    if bad:
        raise ValueError(
            f"{section} does not describe the released {kind} at {path}: "
            + "; ".join(bad)
            + ". Set these keys in params (the official-l profile has the released values)."
        )
    provenance.update(
        repo_id=official.repo_id or None,
        revision=official.revision,
        local_file=official.file,
        weights=f"official:{official.repo_id or official.file}@{provenance.get('sha256', '')[:12]}",
    )
    provenance.pop("official_config", None)  # kept in the checkpoint folder; the artifact stores our config
    return model, provenance
